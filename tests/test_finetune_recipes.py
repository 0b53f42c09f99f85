"""Fine-tuning recipes, AdamW parameter groups and the learning-rate schedule."""
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from eve_ds.config import ConfigError, preset
from eve_ds.finetune.nlvr2 import NLVR2Model
from eve_ds.finetune.optim import authors_names, lr_factor, lr_scheduler, param_groups
from eve_ds.finetune.recipes import MODELS, TASKS, recipe
from eve_ds.finetune.retrieval import RetrievalModel
from eve_ds.finetune.vqa import VQAModel
from eve_ds.model import ExpertPlacement
from tests.conftest import REPO, free_port

CONFIG = preset("eve-tiny").replace(image_size=32, max_text_len=12)


def test_the_authors_recipes():
    vqa, nlvr2, coco = recipe("vqa", "eve-base"), recipe("nlvr2", "eve-base"), recipe("retrieval-coco", "eve-base")
    assert (vqa.image_size, vqa.global_batch_size, vqa.lr, vqa.lr_multiplier, vqa.schedule, vqa.warmup_fraction,
            vqa.grad_clip, vqa.aux_weight) == (480, 128, 3e-5, 10, "linear", 0.1, 3.0, 0.0)
    assert (nlvr2.image_size, nlvr2.global_batch_size, nlvr2.lr, nlvr2.lr_multiplier, nlvr2.schedule,
            nlvr2.warmup_fraction, nlvr2.grad_clip, nlvr2.aux_weight) == \
        (384, 128, 3.5e-5, 15, "cosine", 0.2, 3.0, None)
    assert (coco.image_size, coco.global_batch_size, coco.lr, coco.lr_multiplier, coco.warmup_fraction,
            coco.grad_clip, coco.k_test) == (384, 256, 3e-5, 10, 0.1, 1.0, 128)
    assert recipe("retrieval-coco", "eve-large").lr == 5e-5
    # Training augmentation: VQA's RandomAugment always; the README's aug=rand (NLVR2) and augmentation=color.
    assert [recipe(task, "eve-base").augmentation for task in TASKS] == ["rand", "rand", "color", "color"]
    assert all(recipe(task, model).augmentation == recipe(task, "eve-base").augmentation
               for task in TASKS for model in MODELS)
    for task in TASKS:
        for model in ("eve-base", "eve-large"):
            common = recipe(task, model)
            assert (common.max_text_len, common.epochs, common.betas, common.eps, common.weight_decay) == \
                (40, 10, (0.9, 0.98), 1e-8, 0.01)
    assert recipe("vqa", "eve-base").adamw_options() == {"lr": 3e-5, "betas": (0.9, 0.98), "eps": 1e-8,
                                                         "weight_decay": 0.01}
    assert recipe("nlvr2", "eve-base").warmup_steps(1001) == 200


def test_tiny_recipes_fit_the_tiny_model():
    for task in TASKS:
        tiny = recipe(task, "eve-tiny")
        assert tiny.image_size == preset("eve-tiny").image_size and tiny.global_batch_size <= 8 and tiny.epochs <= 3
        assert tiny.lr > recipe(task, "eve-base").lr
    assert recipe("retrieval-coco", "eve-tiny").k_test < 128 and recipe("vqa", "eve-tiny").k_test is None
    # The bi-attention head at the authors' own head lr, not x15 on eve-tiny's 14x larger lr (where it died).
    assert recipe("nlvr2", "eve-tiny").lr * recipe("nlvr2", "eve-tiny").lr_multiplier < 1e-3


@pytest.mark.parametrize("task, model, message", [
    ("vqa2", "eve-base", "unknown fine-tuning task 'vqa2'"),
    ("nlvr2", "eve-huge", "no 'nlvr2' recipe for model 'eve-huge'"),
])
def test_unknown_recipes_name_the_bad_part(task, model, message):
    with pytest.raises(ConfigError, match=message):
        recipe(task, model)
    assert set(MODELS) == {"eve-tiny", "eve-base", "eve-large"}


def test_param_groups_scale_new_parameters_and_keep_experts_apart():
    model = RetrievalModel(CONFIG)
    groups = param_groups(model, lr=2e-5, weight_decay=0.01, lr_multiplier=10)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter once
    new = model.new_parameter_names()
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        assert group["params"], group["name"]
        assert all((n in new) == (group["lr_scale"] == 10) for n in group_names)
        assert group["lr"] == pytest.approx(2e-5 * group["lr_scale"])
        # Experts keep their own groups (for expert parallelism), with the decay of the group they came from.
        assert all(("deepspeed_experts" in n) == bool(group.get("moe")) for n in group_names)
    by_name = {names[id(p)]: group for group in groups for p in group["params"]}
    assert by_name["temperature"]["weight_decay"] == 0.01 and by_name["temperature"]["lr_scale"] == 10
    assert by_name["itm_head.bias"]["weight_decay"] == 0 and by_name["itm_head.weight"]["weight_decay"] == 0.01
    projection = by_name["image_projection.weight"]
    assert projection["weight_decay"] == 0.01 and projection["lr_scale"] == 10
    assert by_name["encoder.blocks.0.attn.proj.bias"]["weight_decay"] == 0
    assert by_name["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == 1
    assert any(g.get("moe") and g["weight_decay"] == 0.01 for g in groups)
    torch.optim.AdamW(groups, lr=1.0)  # a valid optimizer (each group's own lr wins over the default)

    with pytest.raises(ValueError, match="not parameters of the model"):
        param_groups(model, lr=1e-4, weight_decay=0.01, new_parameter_names={"head.weight"})


def _authors_parameter_names(task: str) -> list:
    """Every parameter of the authors' task model for CONFIG, written out from their models/multiway_transformer.py,
    models/layer.py, models/sharded_moe.py, models/attention.py and models/model_{vqa,nlvr,retrieval}_beit.py (MoE
    layers with type routing, the others with an image and a text FFN; NLVR2 with --biattn, "nlvr2-mlp" without it).
    Also mask_embed_vision, which only their pre-training model has and eve-ds's encoder keeps; not their retrieval
    model's unused itc_vl_* heads."""
    backbone = ["patch_embed.weight", "patch_embed.bias", "class_embedding_vision", "pos_embed_vision",
                "type_embed_vision", "mask_embed_vision", "word_embedding.weight", "layer_norm_text.weight",
                "layer_norm_text.bias", "pos_embed_text", "type_embed_text", "pre_layrnorm.weight", "pre_layrnorm.bias",
                "norm.weight", "norm.bias"]
    for layer in range(CONFIG.num_layers):
        block = ["norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
                 "attn.proj.bias", "gamma_1", "gamma_2"]
        if layer in CONFIG.moe_layers:
            block += ["norm2_vl.weight", "norm2_vl.bias", "mlp_moe.moe.gate.wg.weight", "mlp_moe.moe.vision_embed",
                      "mlp_moe.moe.text_embed"]
            block += [f"mlp_moe.moe.experts.experts.{expert}.{fc}.{kind}" for expert in range(CONFIG.num_experts)
                      for fc in ("fc1", "fc2") for kind in ("weight", "bias")]
        else:
            block += [f"{module}.{kind}" for module in ("norm2_imag", "mlp_imag.fc1", "mlp_imag.fc2", "norm2_text",
                                                        "mlp_text.fc1", "mlp_text.fc2") for kind in ("weight", "bias")]
        backbone += [f"encoder.layers.{layer}.{name}" for name in block]
    heads = {"vqa": [f"output.{index}.{kind}" for index in (0, 1, 3) for kind in ("weight", "bias")],
             "retrieval": ["itc_vision_proj_head.weight", "itc_text_proj_head.weight", "itc_temp", "itm_head.weight",
                           "itm_head.bias"]}
    heads["nlvr2-mlp"] = heads["vqa"]
    heads["nlvr2"] = [f"{attention}.{name}" for attention in ("attn1", "attn2")
                      for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
    heads["nlvr2"] += ["fc.0.weight", "fc.0.bias", "attn_pool.fc.0.weight", "attn_pool.fc.0.bias",
                       "nlvr2_output.weight", "nlvr2_output.bias"]
    return ["backbone." + name for name in backbone] + heads[task]


def _authors_rule_decays(name: str) -> bool:
    """ssyze/EVE optim.py: no decay where any of these is a substring of the name."""
    no_decay = {"bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                "norm1.weight", "norm2.bias", "norm2.weight"}
    return not any(pattern in name for pattern in no_decay)


TASK_MODELS = {"vqa": lambda: VQAModel(CONFIG, num_answers=3), "nlvr2": lambda: NLVR2Model(CONFIG),
               "nlvr2-mlp": lambda: NLVR2Model(CONFIG, head="mlp"), "retrieval": lambda: RetrievalModel(CONFIG)}


def _decays(groups: list, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["weight_decay"] > 0 for group in groups for p in group["params"]}


@pytest.mark.parametrize("task", TASK_MODELS)
def test_weight_decay_follows_the_authors_rule_on_their_names(task):
    model = TASK_MODELS[task]()
    decays = _decays(param_groups(model, lr=1e-4, weight_decay=0.01, lr_multiplier=10), model)
    theirs = authors_names(model)
    reference = _authors_parameter_names(task)
    translated = [name for ours in decays for name in theirs[ours]]
    assert sorted(translated) == sorted(reference)  # one eve-ds parameter for each of theirs (a pair for two)
    assert {name for ours, decay in decays.items() if decay for name in theirs[ours]} == \
        {name for name in reference if _authors_rule_decays(name)}
    assert {name for ours, decay in decays.items() if not decay for name in theirs[ours]} == \
        {name for name in reference if not _authors_rule_decays(name)}

    moe, dense = f"encoder.blocks.{CONFIG.moe_layers[0]}.", "encoder.blocks.0."
    expected = {
        "encoder.text_pos": True, "encoder.image_pos": True, "encoder.image_cls": True,
        "encoder.modality_type_embed": True, "encoder.token_embed.weight": True, "encoder.vision_mask_embed": True,
        "encoder.token_norm.weight": True, "encoder.token_norm.bias": False,  # their layer_norm_text: no "norm."
        "encoder.embed_norm.weight": False, "encoder.norm.weight": False,  # pre_layrnorm.weight holds "norm.weight"
        dense + "gamma1": True, dense + "gamma2": True, dense + "norm1.weight": False, dense + "norm1.bias": False,
        dense + "ffn.vision_norm.weight": True, dense + "ffn.text_norm.weight": True,  # norm2_imag, norm2_text
        dense + "ffn.vision_norm.bias": False, dense + "attn.q_bias": False, dense + "attn.proj.bias": False,
        dense + "attn.qkv.weight": True, moe + "norm2.weight": True,  # their norm2_vl.weight
        moe + "ffn.deepspeed_moe.gate.modality_embed": True, moe + "ffn.deepspeed_moe.gate.wg.weight": True,
        moe + "ffn.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight": True,
        moe + "ffn.deepspeed_moe.experts.deepspeed_experts.0.fc1.bias": False,
    }
    classifier = {"head.0.weight": True, "head.0.bias": False, "head.1.weight": True, "head.1.bias": False}
    expected.update({
        "vqa": classifier, "nlvr2-mlp": classifier,
        "nlvr2": {"head.attn1.in_proj_weight": True, "head.attn1.in_proj_bias": False,
                  "head.attn2.out_proj.weight": True, "head.attn2.out_proj.bias": False, "head.fc.0.weight": True,
                  "head.fc.0.bias": False, "head.attn_pool.fc.0.weight": True, "head.nlvr2_output.weight": True,
                  "head.nlvr2_output.bias": False},
        "retrieval": {"temperature": True, "image_projection.weight": True, "itm_head.weight": True,
                      "itm_head.bias": False}}[task])
    assert {name: decays[name] for name in expected} == expected


def test_weight_decay_of_a_share_of_the_experts_and_of_unknown_parameters():
    whole = VQAModel(CONFIG, num_answers=3)
    share = VQAModel(CONFIG, ExpertPlacement(CONFIG.num_experts, ep_size=2, ep_rank=1), num_answers=3)
    whole_decays = _decays(param_groups(whole, lr=1e-4, weight_decay=0.01), whole)
    assert _decays(param_groups(share, lr=1e-4, weight_decay=0.01), share).items() <= whole_decays.items()

    whole.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match="'extra_scale' has no counterpart in the authors' task models"):
        param_groups(whole, lr=1e-4, weight_decay=0.01, new_parameter_names=set())


def test_frozen_parameters_are_left_out():
    model = VQAModel(CONFIG, num_answers=3)
    model.encoder.requires_grad_(False)
    groups = param_groups(model, lr=1e-4, weight_decay=0.01, lr_multiplier=10)
    assert [g["name"] for g in groups] == ["new_decay", "new_no_decay"]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_warms_up_linearly_then_decays_to_zero(schedule):
    factors = [lr_factor(step, total_steps=100, warmup_steps=10, schedule=schedule) for step in range(120)]
    assert factors[0] == 0 and factors[5] == 0.5 and factors[10] == 1.0
    assert factors[100] == pytest.approx(0, abs=1e-12) and factors[119] == pytest.approx(0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    midpoint = factors[55]
    assert midpoint == pytest.approx(0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(30, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 90)))
    assert lr_factor(0, 100, 0, schedule) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(0, 100, 10, "step")


def test_scheduler_keeps_the_multiplier_at_every_step():
    model = VQAModel(CONFIG, num_answers=3)
    optimizer = torch.optim.AdamW(param_groups(model, lr=123.0, weight_decay=0.01, lr_multiplier=10))
    scheduler = lr_scheduler(optimizer, base_lr=1e-3, total_steps=20, warmup_steps=4, schedule="cosine")
    for step in range(1, 20):
        optimizer.step()
        scheduler.step()
        factor = lr_factor(step, 20, 4, "cosine")
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"] * factor)
    state = scheduler.state_dict()
    resumed = lr_scheduler(torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.01, lr_multiplier=10)),
                           base_lr=1e-3, total_steps=20, warmup_steps=4, schedule="cosine")
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 19


def _deepspeed_worker():
    """One rank: the groups and the scheduler through deepspeed.initialize with ZeRO-2 and native MoE."""
    import deepspeed
    from eve_ds.engine import init_distributed
    from eve_ds.model.moe import use_engine_managed_moe

    init_distributed()
    torch.manual_seed(0)
    model = VQAModel(CONFIG, num_answers=3)
    use_engine_managed_moe(model)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 3.0, "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "AdamW", "params": {**recipe("vqa", "eve-tiny").adamw_options(),
                                                           "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=param_groups(model, 1e-3, 0.01, lr_multiplier=10),
        lr_scheduler=partial(lr_scheduler, base_lr=1e-3, total_steps=10, warmup_steps=2, schedule="linear"))
    for _ in range(2):
        text_ids = torch.randint(5, CONFIG.vocab_size, (2, CONFIG.max_text_len))
        out = engine(images=torch.rand(2, 3, 32, 32), text_ids=text_ids, text_padding_mask=text_ids > 0,
                     targets=torch.rand(2, 3))
        engine.backward(out["loss"])
        engine.step()
    groups = engine.optimizer.param_groups
    assert any(group.get("moe") for group in groups)
    assert sorted({(group["lr"], group["lr_scale"]) for group in groups}) == [(1e-3, 1.0), (1e-2, 10)], groups


@pytest.mark.distributed
def test_groups_and_scheduler_work_in_a_deepspeed_engine():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    worker = "from tests.test_finetune_recipes import _deepspeed_worker; _deepspeed_worker()"
    result = subprocess.run([sys.executable, "-c", worker], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_a_vlmo_models_vl_ffn_takes_vlmos_names_for_the_weight_decay_rule():
    model = VQAModel(preset("vlmo-tiny").replace(image_size=32, max_text_len=12), num_answers=3)
    theirs = authors_names(model)
    assert theirs["encoder.blocks.3.ffn.vision_language_norm.weight"] == ("backbone.encoder.layers.3.norm2_vl.weight", )
    assert theirs["encoder.blocks.3.ffn.vision_language.fc1.bias"] == ("backbone.encoder.layers.3.mlp_vl.fc1.bias", )
    decays = _decays(param_groups(model, lr=1e-4, weight_decay=0.01), model)
    assert decays["encoder.blocks.3.ffn.vision_language_norm.weight"]  # as norm2_imag and norm2_text do
    assert not decays["encoder.blocks.3.ffn.vision_language.fc1.bias"]
