"""Fine-tuning recipes, AdamW parameter groups and the learning-rate schedule."""
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from eve_ds.config import ConfigError, preset
from eve_ds.finetune.optim import lr_factor, lr_scheduler, param_groups
from eve_ds.finetune.recipes import MODELS, TASKS, recipe
from eve_ds.finetune.retrieval import RetrievalModel
from eve_ds.finetune.vqa import VQAModel
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


@pytest.mark.parametrize("task, model, message", [
    ("vqa2", "eve-base", "unknown fine-tuning task 'vqa2'"),
    ("nlvr2", "eve-huge", "no 'nlvr2' recipe for model 'eve-huge'"),
])
def test_unknown_recipes_name_the_bad_part(task, model, message):
    with pytest.raises(ConfigError, match=message):
        recipe(task, model)
    assert set(MODELS) == {"eve-tiny", "eve-base", "eve-large"}


def test_param_groups_exempt_biases_and_norms_and_scale_new_parameters():
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
        if group["weight_decay"] > 0:
            assert not any(n.endswith(("bias", "norm.weight", "norm1.weight", "gamma1", "temperature"))
                           for n in group_names)
        # Experts keep their own groups (for expert parallelism), with the decay of the group they came from.
        assert all(("deepspeed_experts" in n) == bool(group.get("moe")) for n in group_names)
    by_name = {names[id(p)]: group for group in groups for p in group["params"]}
    assert by_name["temperature"]["weight_decay"] == 0 and by_name["temperature"]["lr_scale"] == 10
    assert by_name["itm_head.bias"]["weight_decay"] == 0 and by_name["itm_head.weight"]["weight_decay"] == 0.01
    projection = by_name["image_projection.weight"]
    assert projection["weight_decay"] == 0.01 and projection["lr_scale"] == 10
    assert by_name["encoder.blocks.0.attn.proj.bias"]["weight_decay"] == 0
    assert by_name["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == 1
    assert any(g.get("moe") and g["weight_decay"] == 0.01 for g in groups)
    torch.optim.AdamW(groups, lr=1.0)  # a valid optimizer (each group's own lr wins over the default)

    with pytest.raises(ValueError, match="not parameters of the model"):
        param_groups(model, lr=1e-4, weight_decay=0.01, new_parameter_names={"head.weight"})


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
