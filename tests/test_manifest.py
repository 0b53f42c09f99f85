"""Checkpoint manifests without launches: how the files are shared out over ranks, and what verification
catches (tests/test_cluster_distributed.py and tests/test_consolidate.py use them on real checkpoints)."""
import json

import pytest

from eve_ds.checkpoint.manifest import (MANIFEST, checkpoint_files, digest_share, share, tags_newest_first, verify_share,
                                        write_manifest)
from eve_ds.checkpoint.training import remove_old_checkpoints

NAMES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_2_mp_rank_00_optim_states.pt",
         *[f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_file_is_digested_once_and_ranks_take_their_own_first(world_size):
    shares = [share(NAMES, rank, world_size) for rank in range(world_size)]
    assert sorted(name for part in shares for name in part) == sorted(NAMES)
    for rank, part in enumerate(shares):
        if rank < 3 and world_size >= 3:
            assert part[0] == f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    assert max(map(len, shares)) - min(map(len, shares)) <= 2  # spread evenly, whatever the world size


def test_a_rank_takes_its_own_file_under_deepspeeds_bf16_name():
    names = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
             "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert share(names, 1, 2) == ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_model_states.pt"]


def make_checkpoint(tmp_path, world_size=3):
    tag_dir = tmp_path / "step_00000010"
    tag_dir.mkdir()
    for index, name in enumerate(NAMES):
        (tag_dir / name).write_bytes(bytes([index]) * (1000 + index))
    files = {}
    for rank in range(world_size):
        files.update(digest_share(tag_dir, rank, world_size))
    write_manifest(tag_dir, files, step=10)
    return tag_dir


def test_verification_names_truncated_damaged_and_missing_files(tmp_path):
    tag_dir = make_checkpoint(tmp_path)
    assert checkpoint_files(tag_dir) == sorted(NAMES)
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    assert manifest["step"] == 10 and manifest["files"][NAMES[1]]["bytes"] == 1001
    assert all(verify_share(tag_dir, rank, 2) == [] for rank in range(2))

    (tag_dir / NAMES[1]).write_bytes(b"\x01" * 500)
    (tag_dir / NAMES[5]).write_bytes(b"\x07" * 1005)  # same size, other content
    (tag_dir / NAMES[9]).unlink()
    problems = verify_share(tag_dir)  # one process checks everything
    assert f"{tag_dir / NAMES[1]}: 500 bytes, the manifest says 1001 (truncated?)" in problems
    assert f"{tag_dir / NAMES[5]}: SHA-256 differs from the manifest (damaged)" in problems
    assert f"{tag_dir / NAMES[9]}: missing" in problems
    split = [problem for rank in range(4) for problem in verify_share(tag_dir, rank, 4)]
    assert sorted(split) == sorted(problems)  # ranks verifying their shares find the same

    (tag_dir / MANIFEST).write_text("{broken")
    assert verify_share(tag_dir, 0, 2)[0].startswith(f"{tag_dir / MANIFEST}: unreadable manifest")
    assert verify_share(tag_dir, 1, 2) == []  # reported once


def test_tags_are_ordered_by_step_not_by_name(tmp_path):
    for name in ("step_00000009", "step_00000100", "step_00000010", "latest_not_a_tag", "step_x"):
        (tmp_path / name).mkdir()
    assert [p.name for p in tags_newest_first(tmp_path)] == ["step_00000100", "step_00000010", "step_00000009"]
    assert tags_newest_first(tmp_path / "absent") == []


def test_retention_keeps_complete_checkpoints_and_never_the_incomplete_in_their_place(tmp_path):
    def make(step, complete):
        (tmp_path / f"step_{step:08d}").mkdir()
        if complete:
            (tmp_path / f"step_{step:08d}" / MANIFEST).write_text("{}")

    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False), (6, False)):
        make(step, complete)
    remove_old_checkpoints(tmp_path, keep=1)  # steps 5 and 6 are saves that did not finish
    assert [p.name for p in tags_newest_first(tmp_path)] == ["step_00000006", "step_00000005", "step_00000004"]
    make(7, True)
    remove_old_checkpoints(tmp_path, keep=2)
    assert [p.name for p in tags_newest_first(tmp_path)] == ["step_00000007", "step_00000006", "step_00000005",
                                                             "step_00000004"]
    remove_old_checkpoints(tmp_path, keep=0)  # keeps all
    assert len(tags_newest_first(tmp_path)) == 4
