"""tools/reshard.py: a checkpoint of one cluster shape resumed at another (real launches, CPU)."""

import pytest
import torch

from eve_ds.checkpoint import consolidate
from eve_ds.checkpoint.consolidate import MOMENTS
from eve_ds.checkpoint.universal import load_universal, save_universal
from eve_ds.config import preset
from eve_ds.data.tokenizer import SPECIAL_TOKENS_FILE, TOKENIZER_FILE, TextTokenizer
from tests.conftest import SHAPES, launch_pretrain, run_tool, small_ds_config
from tests.test_consolidate import write_stage0_checkpoint
ZERO3_EP2 = small_ds_config(zero_optimization={"stage": 3}, eve={"expert_parallel_size": 2})
ZERO2_EP1 = small_ds_config(eve={"expert_parallel_size": 1})


def reshard(*args):
    result = run_tool("reshard.py", *args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.distributed
def test_resharded_checkpoint_resumes_at_another_shape(tmp_path):
    steps, interrupted_at = 5, 3
    original, _ = launch_pretrain(tmp_path, tmp_path / "original", ZERO3_EP2, "--steps", steps, "--save-interval",
                                  interrupted_at, "--keep-checkpoints", 3)
    reshard(tmp_path / "original" / "checkpoints", tmp_path / "universal", "--tag", f"step_{interrupted_at:08d}")
    universal = load_universal(tmp_path / "universal")
    assert (universal.step, universal.optimizer_steps) == (interrupted_at, interrupted_at)

    # Same world size, other expert-parallel size and ZeRO stage: the very loss sequence goes on (the
    # second resumed step depends on the restored AdamW moments, step count and learning rate).
    resumed, log = launch_pretrain(tmp_path, tmp_path / "ep1", ZERO2_EP1, "--steps", steps, "--resume-from",
                                   tmp_path / "universal")
    assert "resumed from universal checkpoint" in log and "expert-parallel size 1" in log
    for before, after in zip(original[interrupted_at:], resumed[interrupted_at:]):
        assert after["step"] == before["step"]
        for key in ("loss", "image_loss", "text_loss", "aux_loss", "lr"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (after["step"], key)

    # Two ranks with ep 2 -> one rank (the ep-2 config, as on one GPU) -> back to two ranks with ep 2.
    single, log = launch_pretrain(tmp_path, tmp_path / "one_rank", small_ds_config(), "--expert-parallel-size", 1,
                                  "--steps", steps, "--save-interval", interrupted_at + 1, "--resume-from",
                                  tmp_path / "universal", num_ranks=1)
    assert [r["step"] for r in single] == [4, 5]
    assert "data position is for another layout of readers" in log  # the unfinished slices are dealt out
    reshard(tmp_path / "one_rank" / "checkpoints", tmp_path / "universal_1", "--tag", f"step_{4:08d}")
    after_one_step = load_universal(tmp_path / "universal_1")
    assert (after_one_step.step, after_one_step.optimizer_steps) == (4, 4)
    assert any(not torch.equal(after_one_step.weights[k], v) for k, v in universal.weights.items())
    back, _ = launch_pretrain(tmp_path, tmp_path / "back", ZERO3_EP2, "--steps", steps, "--resume-from",
                              tmp_path / "universal_1")
    assert [r["step"] for r in back] == [5] and back[0]["loss"] == pytest.approx(single[-1]["loss"], rel=0.2)


@pytest.mark.distributed
def test_bf16_run_resumes_from_its_fp32_master_weights(tmp_path):
    """A bf16 run trains fp32 master weights of which the model's weights are a rounding. Resumed from a universal
    checkpoint, it goes on from those masters, not from their bf16 rounding: the step after the resume writes the
    masters the uninterrupted run wrote."""
    bf16 = small_ds_config(zero_optimization={"stage": 3}, eve={"expert_parallel_size": 2}, bf16={"enabled": True})
    launch_pretrain(tmp_path, tmp_path / "original", bf16, "--steps", 4, "--save-interval", 3, "--keep-checkpoints", 2)
    for step in (3, 4):
        reshard(tmp_path / "original" / "checkpoints", tmp_path / f"original_{step}", "--tag", f"step_{step:08d}")
    masters = load_universal(tmp_path / "original_3").weights
    assert sum(int((w.bfloat16().float() != w).sum()) for w in masters.values()) > 0.9 * sum(
        w.numel() for w in masters.values())  # the masters have moved off the bf16 grid
    launch_pretrain(tmp_path, tmp_path / "resumed", bf16, "--steps", 4, "--resume-from", tmp_path / "original_3")
    reshard(tmp_path / "resumed" / "checkpoints", tmp_path / "resumed_4", "--tag", f"step_{4:08d}")
    uninterrupted, resumed = load_universal(tmp_path / "original_4"), load_universal(tmp_path / "resumed_4")
    for name, expected in uninterrupted.weights.items():
        torch.testing.assert_close(resumed.weights[name], expected, rtol=1e-6, atol=1e-8, msg=name)


def test_reshard_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    result = run_tool("reshard.py", tmp_path, tmp_path / "o")
    assert result.returncode == 2 and "not a DeepSpeed checkpoint" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_universal_folder_carries_the_runs_tokenizer(tmp_path):
    tokenizer = TextTokenizer(SHAPES / TOKENIZER_FILE, 40, {"unk": "[MASK]", "mask": "[UNK]"})  # roles of its own
    config = preset("eve-tiny").replace(vocab_size=tokenizer.vocab_size)
    tag_dir = write_stage0_checkpoint(tmp_path / "checkpoints", config, step=3, tokenizer=tokenizer)
    checkpoint = consolidate(tmp_path / "checkpoints")
    # ZeRO-0 keeps no AdamW moments; stand-ins let the universal folder be written from this checkpoint.
    checkpoint.moments = {key: {name: torch.zeros_like(tensor) for name, tensor in checkpoint.state_dict.items()}
                          for key in MOMENTS}
    checkpoint.optimizer_steps, checkpoint.lr_scheduler = 3, {"last_batch_iteration": 3}
    save_universal(tmp_path / "universal", checkpoint)
    assert load_universal(tmp_path / "universal").step == 3
    for name in (TOKENIZER_FILE, SPECIAL_TOKENS_FILE):
        assert (tmp_path / "universal" / name).read_bytes() == (tag_dir / name).read_bytes()
    reopened = TextTokenizer.from_folder(tmp_path / "universal", 40)
    assert (reopened.mask_id, reopened.unk_id) == (1, 4)
