"""The pre-training loop's own rules, without launches (tests/test_pretrain_distributed.py launches it)."""
import pytest

from eve_ds.config import ConfigError, preset
from eve_ds.run_start import resumed_config


def test_resume_keeps_the_checkpoints_routing_setting_and_names_any_other_difference():
    requested = preset("eve-tiny")
    router_only = requested.replace(routing_embedding_to_experts=False)  # e.g. written before the setting existed
    assert resumed_config(requested, router_only, "runs/x/checkpoints") == router_only
    normal = router_only.replace(position_init="normal")  # the start of the weights, not what they compute
    assert resumed_config(requested, normal, "runs/x/checkpoints") == normal
    with pytest.raises(ConfigError, match="runs/x/checkpoints was written for another model configuration: "
                                          "hidden_size 256 where this run has 128, num_heads 8 where this run has 4"):
        resumed_config(requested, router_only.replace(hidden_size=256, num_heads=8), "runs/x/checkpoints")


@pytest.mark.parametrize("options, message", [
    (["--model-setting", "num_layers=four"], "model setting 'num_layers=four': 'four' is not a int"),
    (["--model", "vlmo-tiny"], "has no MoE layers whose experts it could place; set it to 1"),
    (["--train-only", "encoder.blocks.*.ffn.txt*"], "--train-only: 'encoder.blocks.*.ffn.txt*' matches no parameter"),
    (["--objectives", "itc,itm,mlm", "--data", "images:data/shapes/shards/00000.tar"], "add msm to --objectives"),
    (["--data", "images:data/shapes/manifest.jsonl"], "image-only sources are tar shards"),
    (["--model", "vlmo-tiny", "--expert-parallel-size", "1", "--init-from", "EVE_TINY"],
     "holds another model configuration: vocab_size 1000 where this run has 177, moe_layers (2, 3) where this run has ()"),
    (["--init-from", "EVE_TINY", "--resume-from", "EVE_TINY"], "--init-from and --resume-from exclude each other"),
])
def test_bad_options_are_one_sentence_before_anything_starts(tmp_path, monkeypatch, capsys, options, message):
    import torch

    from eve_ds.checkpoint.pretrained import save_pretrained
    from eve_ds.errors import UsageError
    from eve_ds.objectives import PretrainingModel
    from eve_ds.pretrain import main
    from tests.conftest import REPO, SHAPES

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    tiny = preset("eve-tiny")
    save_pretrained(tmp_path / "eve-tiny", PretrainingModel(tiny).state_dict(), tiny)
    options = [str(tmp_path / "eve-tiny") if option == "EVE_TINY" else option for option in options]
    with pytest.raises((UsageError, SystemExit)) as error:
        main(["--deepspeed_config", "ds_configs/zero2_ep.json", "--out", str(tmp_path / "run"), "--tokenizer",
              str(SHAPES / "tokenizer.json"), *options])
    text = str(error.value) if error.type is not SystemExit else capsys.readouterr().err
    assert message in text.strip().splitlines()[-1], text  # one line: the error, or argparse's last
    assert not (tmp_path / "run").exists()
