"""The pre-training loop's own rules, without launches (tests/test_pretrain_distributed.py launches it)."""
import pytest

from eve_ds.config import ConfigError, preset
from eve_ds.pretrain import resumed_config


def test_resume_keeps_the_checkpoints_routing_setting_and_names_any_other_difference():
    requested = preset("eve-tiny")
    router_only = requested.replace(routing_embedding_to_experts=False)  # e.g. written before the setting existed
    assert resumed_config(requested, router_only, "runs/x/checkpoints") == router_only
    normal = router_only.replace(position_init="normal")  # the start of the weights, not what they compute
    assert resumed_config(requested, normal, "runs/x/checkpoints") == normal
    with pytest.raises(ConfigError, match="runs/x/checkpoints was written for another model configuration: "
                                          "hidden_size 256 where this run has 128, num_heads 8 where this run has 4"):
        resumed_config(requested, router_only.replace(hidden_size=256, num_heads=8), "runs/x/checkpoints")
