import json

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from eve_ds.config import ConfigError, preset
from eve_ds.engine import freeze, load_deepspeed_config, optimizer_param_groups, trained_names
from eve_ds.errors import UsageError
from eve_ds.model import ExpertPlacement
from eve_ds.objectives import PretrainingModel
from tests.conftest import REPO, small_ds_config


def write(tmp_path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config) if isinstance(config, dict) else config)
    return str(path)


@pytest.mark.parametrize("name", ["zero2_ep", "zero3", "zero3_offload"])
def test_shipped_configs_fill_launch_dependent_values(name):
    config, options = load_deepspeed_config(REPO / "ds_configs" / f"{name}.json", world_size=4, num_experts=4,
                                            train_steps=200)
    assert options.expert_parallel_size == 2 and "eve" not in config
    assert options.activation_checkpointing == name.startswith("zero3")
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * 4
    assert config["scheduler"]["params"]["total_num_steps"] == 200
    assert config["scheduler"]["params"]["warmup_num_steps"] == 10
    assert config["bf16"]["enabled"] is (get_accelerator().device_name() == "cuda" and torch.cuda.is_bf16_supported())


@pytest.mark.parametrize("change, world_size, message", [
    ({"eve": {"expert_parallel_size": 3}}, 4, "does not divide the world size 4"),
    ({"eve": {"expert_parallel_size": 8}}, 8, "does not divide the model's 4 experts"),
    ({"eve": {"expert_parallel_size": 0}}, 2, "must be a positive integer"),
    ({"eve": {"expert_paralel_size": 2}}, 2, "'eve.expert_paralel_size' is not an option"),
    ({"eve": {"activation_checkpointing": "yes"}}, 2, "must be true or false"),
    ({"zero_optimization": {"stage": 4}}, 2, "'zero_optimization.stage' is 4"),
    ({"expert_parallel": {"enabled": True, "autoep_size": 2}}, 2, "set 'eve.expert_parallel_size' instead"),
    ({"train_micro_batch_size_per_gpu": 0}, 2, "'train_micro_batch_size_per_gpu' must be a positive integer"),
    ({"train_batch_size": 10}, 2, "micro batch 4 x accumulation 1 x 2 ranks = 8"),
])
def test_invalid_configs_get_one_clear_sentence(tmp_path, change, world_size, message):
    with pytest.raises(ConfigError, match=message):
        load_deepspeed_config(write(tmp_path, small_ds_config(**change)), world_size, num_experts=4, train_steps=10)


def test_an_expert_parallel_size_given_replaces_the_configs_and_is_checked_alike():
    config_of_two = REPO / "ds_configs" / "zero3.json"
    _, options = load_deepspeed_config(config_of_two, 1, 4, 10, expert_parallel_size=1)
    assert options.expert_parallel_size == 1 and options.activation_checkpointing
    with pytest.raises(ConfigError, match="does not divide the world size 2"):
        load_deepspeed_config(config_of_two, 2, 4, 10, expert_parallel_size=4)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_deepspeed_config(tmp_path / "nope.json", 2, 4, 10)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_config(write(tmp_path, "{oops"), 2, 4, 10)


def test_expert_placement_follows_deepspeed_layout():
    placements = [ExpertPlacement.of_global_rank(rank, num_experts=8, ep_size=2) for rank in range(4)]
    assert [p.ep_rank for p in placements] == [0, 1, 0, 1]
    assert placements[3].sharing_ranks(world_size=4) == [1, 3]
    assert placements[3].global_name("encoder.blocks.2.ffn.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight") \
        == "encoder.blocks.2.ffn.deepspeed_moe.experts.deepspeed_experts.5.fc1.weight"


def test_param_groups_split_experts_and_exempt_norms_from_decay():
    model = PretrainingModel(preset("eve-tiny"))
    groups = optimizer_param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        if group.get("moe"):
            assert all("deepspeed_experts" in n for n in group_names)
        else:
            assert not any("deepspeed_experts" in n for n in group_names)
        if group["weight_decay"] > 0:
            assert not any(n.endswith(("bias", "gamma1", "norm.weight", "modality_embed", "token_embed.weight"))
                           for n in group_names)
    assert any(g.get("moe") and g["weight_decay"] == 0.05 for g in groups)


def test_a_model_without_moe_layers_refuses_expert_parallelism():
    with pytest.raises(ConfigError, match="has no MoE layers whose experts it could place; set it to 1"):
        load_deepspeed_config(REPO / "ds_configs" / "zero2_ep.json", 2, preset("vlmo-tiny").routed_experts, 10)
    _, options = load_deepspeed_config(REPO / "ds_configs" / "zero2_ep.json", 2, 0, 10, expert_parallel_size=1)
    assert options.expert_parallel_size == 1


def test_train_only_patterns_select_names_and_a_pattern_that_selects_nothing_is_refused():
    names = ["encoder.token_embed.weight", "encoder.blocks.0.ffn.text.fc1.weight",
             "encoder.blocks.0.ffn.vision.fc1.weight", "text_head.weight"]
    assert trained_names(names, [], "m") == set(names)
    assert trained_names(names, ["encoder.blocks.*.ffn.text*", "text_head.*"], "m") == {names[1], names[3]}
    with pytest.raises(UsageError, match=r"--train-only: 'encoder.blocks.\*.ffn.txt\*' matches no parameter of m \(its "
                                         r"names look like encoder.token_embed.weight or text_head.weight\)"):
        trained_names(names, ["encoder.blocks.*.ffn.txt*"], "m")


def test_frozen_parameters_stay_bit_for_bit_and_leave_the_gradient_norm():
    torch.manual_seed(0)
    model = PretrainingModel(preset("eve-tiny").replace(image_size=32, max_text_len=12))
    frozen_count = freeze(model, lambda name: not name.startswith("encoder.blocks.1."))
    assert frozen_count == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder.blocks.1."))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.05), lr=1e-2)
    assert all(group["weight_decay"] == 0 for group in optimizer.param_groups
               for p in group["params"] if getattr(p, "frozen", False))
    from tests.test_objectives import pretraining_batch
    inputs = {k: v for k, v in pretraining_batch().items() if k in ("images", "image_mask", "text_ids", "text_labels",
                                                                     "text_padding_mask")}
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs)["loss"].backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("encoder.blocks.1."), name
        if not name.startswith("encoder.blocks.1."):
            assert not p.grad.any()
