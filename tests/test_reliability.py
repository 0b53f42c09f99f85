"""A run is never lost, never hangs and never surprises: launch/pretrain.py as one plain process (no launcher), tried
as a hostile cluster would (a second job, a fresh start over a finished run, a diverging loss, data that is all
garbage or never comes, a full disk, bad options). Each failure must be one sentence and an exit status."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eve_ds.checkpoint import consolidate
from eve_ds.checkpoint.manifest import verify_share
from eve_ds.config import preset
from eve_ds.data import TextTokenizer
from eve_ds.errors import EXIT_DIVERGED, EXIT_USAGE, job_status
from eve_ds.objectives import PretrainingModel
from eve_ds.run_folder import RunFolderLock
from tests.conftest import REPO, SHAPES, read_metrics

pytestmark = pytest.mark.distributed
EXIT_REQUEUE = 75
CONFIG = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
CONFIG["eve"]["expert_parallel_size"] = 1
CONFIG["train_micro_batch_size_per_gpu"] = 4


def pretrain_command(tmp_path: Path, out: Path, *args, lr: float = None) -> list:
    config = json.loads(json.dumps(CONFIG))
    if lr is not None:
        config["optimizer"]["params"]["lr"] = lr
    config_path = tmp_path / f"ds_{len(list(tmp_path.glob('ds_*')))}.json"
    config_path.write_text(json.dumps(config))
    return [sys.executable, str(REPO / "launch" / "pretrain.py"), "--deepspeed_config", str(config_path), "--out",
            str(out), "--num-workers", "0", "--log-interval", "1", *map(str, args)]


def environment() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pretrain(tmp_path: Path, out: Path, *args, lr: float = None, timeout: float = 300):
    return subprocess.run(pretrain_command(tmp_path, out, *args, lr=lr), env=environment(), capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("pretrain: error:")]


def one_sentence(result, status: int) -> str:
    """The single error line of a run that had to end with ``status``."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("finished")
    result = pretrain(tmp_path, tmp_path / "run", "--steps", 2, "--save-interval", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run"


def test_one_plain_process_trains_from_its_first_step_and_logs_the_lr_it_applied(finished_run):
    records = read_metrics(finished_run)
    assert [r["step"] for r in records] == [1, 2] and not any(r["step_skipped"] for r in records)
    # Warmup over max(2, steps / 20) steps: step 1 applies half the peak (DeepSpeed's schedule gave steps 1 and 2
    # lr 0, and the log showed the next step's).
    assert records[0]["lr"] == pytest.approx(0.5e-3)
    config = preset("eve-tiny").replace(vocab_size=TextTokenizer(SHAPES / "tokenizer.json", 40).vocab_size)
    torch.manual_seed(0)
    initial = PretrainingModel(config).state_dict()
    after_step_1 = consolidate(finished_run / "checkpoints", tag="step_00000001").state_dict
    moved = max((after_step_1[name] - initial[name]).abs().max().item() for name in after_step_1)
    assert 1e-4 < moved < 1e-3  # AdamW's first step moves each weight by about lr
    # The checkpoint carries the tokenizer; DeepSpeed's zero_to_fp32.py is a pointer to the tool that works.
    tag = finished_run / "checkpoints" / "step_00000002"
    assert (tag / "tokenizer.json").read_bytes() == (SHAPES / "tokenizer.json").read_bytes()
    pointer = subprocess.run([sys.executable, str(finished_run / "checkpoints" / "zero_to_fp32.py")],
                             capture_output=True, text=True)
    assert pointer.returncode == 1 and "tools/consolidate.py" in pointer.stderr


def test_a_fresh_start_over_a_run_and_a_second_job_are_refused_and_nothing_is_lost(finished_run, tmp_path):
    tag = finished_run / "checkpoints" / "step_00000002"
    manifest = (tag / "manifest.json").read_text()
    sentence = one_sentence(pretrain(tmp_path, finished_run, "--steps", 4), EXIT_USAGE)
    assert "already holds the checkpoints of a run (step_00000002)" in sentence
    assert "--resume or --auto-resume, or choose another --out" in sentence
    lock = RunFolderLock(finished_run).acquire()  # a live job holds the folder
    try:
        sentence = one_sentence(pretrain(tmp_path, finished_run, "--steps", 4, "--auto-resume"), EXIT_USAGE)
    finally:
        lock.release()
    assert f"is in use by process {os.getpid()}" in sentence and "choose another --out" in sentence
    assert (tag / "manifest.json").read_text() == manifest and verify_share(tag) == []
    assert [r["step"] for r in read_metrics(finished_run)] == [1, 2]


def test_pre_training_refuses_to_resume_from_a_fine_tuning_runs_universal_folder(tmp_path):
    from eve_ds.checkpoint import ConsolidatedCheckpoint
    from eve_ds.checkpoint.pretrained import HeldModel
    from eve_ds.checkpoint.universal import save_universal
    from eve_ds.finetune.vqa import VQAModel

    config = preset("eve-tiny")
    state_dict = VQAModel(config, num_answers=5).state_dict()
    moments = {key: {name: torch.zeros_like(t) for name, t in state_dict.items()} for key in ("exp_avg", "exp_avg_sq")}
    save_universal(tmp_path / "universal", ConsolidatedCheckpoint(
        state_dict, config, 2, 3, tmp_path, {}, moments, 3, {"last_batch_iteration": 3},
        held=HeldModel("vqa", {"num_answers": 5})))
    line = one_sentence(pretrain(tmp_path, tmp_path / "run", "--resume-from", tmp_path / "universal"), EXIT_USAGE)
    assert "holds the VQA model (num_answers 5), not a pre-training run's" in line


def test_a_diverging_run_stops_with_its_last_good_checkpoints_kept(tmp_path):
    out = tmp_path / "run"
    result = pretrain(tmp_path, out, "--steps", 20, "--save-interval", 1, "--max-bad-steps", 3, lr=1e4)
    sentence = one_sentence(result, EXIT_DIVERGED)
    assert "the run diverged: 3 steps in a row" in sentence
    records = read_metrics(out)
    bad = [r["step"] for r in records if r["step_skipped"] or r["grad_norm"] != r["grad_norm"]]
    assert len(bad) == 3 and bad == list(range(bad[0], bad[0] + 3)) and records[-1]["step"] == bad[-1]
    assert f"step_{bad[0] - 1:08d}, is from before them" in sentence
    assert "optimizer step skipped: 3 bad step(s) in a row" in result.stdout
    # Nothing saved from the first bad step on; the last good checkpoints are still there and verify.
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{bad[0] - 1:08d}"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_{s:08d}" for s in range(1, bad[0])][-2:]
    assert verify_share(checkpoints / f"step_{bad[0] - 1:08d}") == []


def garbage_shards(folder: Path, count: int = 2) -> str:
    folder.mkdir()
    for index in range(count):
        (folder / f"{index:05d}.tar").write_bytes(bytes(range(256)) * 40)
    (folder / "index.json").write_text(json.dumps({"shards": {f"{i:05d}.tar": 32 for i in range(count)}}))
    return f"{folder}/{{00000..{count - 1:05d}}}.tar"


def test_a_loader_with_no_readable_sample_stops_in_one_sentence(tmp_path):
    data = garbage_shards(tmp_path / "shards")
    started = time.monotonic()
    result = pretrain(tmp_path, tmp_path / "run", "--data", data, "--tokenizer", SHAPES / "tokenizer.json",
                      "--num-workers", 1, timeout=120)
    sentence = one_sentence(result, EXIT_USAGE)
    assert "no readable sample" in sentence and data in sentence and "unreadable shard 64" in sentence
    assert time.monotonic() - started < 100


def test_a_stop_signal_ends_a_wait_for_data_that_never_comes(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    os.mkfifo(folder / "00000.tar")  # opening it blocks, as a hung network filesystem would
    (folder / "index.json").write_text(json.dumps({"shards": {"00000.tar": 8}}))
    command = pretrain_command(tmp_path, tmp_path / "run", "--data", folder / "00000.tar", "--tokenizer",
                               SHAPES / "tokenizer.json", "--num-workers", 1)
    process = subprocess.Popen(command, env={**environment(), "EVE_DS_STOP_GRACE_S": "2"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = ""
    for line in process.stdout:
        output += line
        if "model eve-tiny" in line:
            break
    time.sleep(5)  # the worker is blocked in open(), the main process in its wait for the first micro-batch
    process.send_signal(signal.SIGTERM)
    try:
        output += process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == EXIT_REQUEUE, output[-3000:]
    assert "stopped on SIGTERM while waiting for the data of step 1" in output


def test_a_full_disk_is_named_and_the_complete_checkpoints_are_kept(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        result = pretrain(tmp_path, out, "--steps", 4, "--save-interval", 1)  # a checkpoint is about 25 MiB
        sentence = one_sentence(result, EXIT_USAGE)
        assert f"no space left on the filesystem of {out / 'checkpoints'} while rank 0 wrote step_00000002" in sentence
        assert "a checkpoint of this run takes" in sentence
        assert (out / "checkpoints" / "latest").read_text() == "step_00000001"
        assert verify_share(out / "checkpoints" / "step_00000001") == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def before_the_distributed_start(monkeypatch):
    """pretrain's main in this process, which must end before torch.distributed would start."""
    from eve_ds import pretrain as module

    def reached(*args, **kwargs):
        raise AssertionError("the error was not found before the distributed start")

    monkeypatch.setattr(module, "start_distributed", reached)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.setenv(key, "")  # so that the test's end restores the variables that main sets
        monkeypatch.delenv(key)
    return module.main


def refusal(main, capsys, *argv, world_size: int = 1) -> str:
    if world_size > 1:
        os.environ.update(RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    assert job_status(main, "pretrain", [str(arg) for arg in argv], stop=object()) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain: error: "), lines
    return lines[0]


def config_file(tmp_path: Path, content) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("case, expected", [
    ("list_config", "is a JSON list; it must be an object"),
    ("save_interval_0", "--save-interval must be positive, got 0"),
    ("missing_data", "data source /no/such/folder does not exist"),
    ("expert_parallel_3", "--expert-parallel-size is 3, which does not divide the world size 2"),
    ("resume_nothing", "holds no complete checkpoint; start without --resume"),
    ("pad_as_mask", "the pad and mask roles are both the token '[PAD]'"),
])
def test_bad_input_is_one_sentence_before_anything_distributed_starts(before_the_distributed_start, capsys,
                                                                      tmp_path, monkeypatch, case, expected):
    main, zero3 = before_the_distributed_start, REPO / "ds_configs" / "zero3.json"
    out = ["--out", tmp_path / "run"]
    argv = {"list_config": ["--deepspeed_config", config_file(tmp_path, [CONFIG])],
            "save_interval_0": ["--deepspeed_config", zero3, "--save-interval", 0],
            "missing_data": ["--deepspeed_config", zero3, "--data", "/no/such/folder"],
            "expert_parallel_3": ["--deepspeed_config", zero3, "--expert-parallel-size", 3],
            "resume_nothing": ["--deepspeed_config", zero3, "--resume"],
            "pad_as_mask": ["--deepspeed_config", zero3, "--special-token", "mask=[PAD]"]}[case]
    line = refusal(main, capsys, *argv, *out, world_size=2)
    assert expected in line, line


def test_a_checkpoint_of_another_layout_points_to_resharding(before_the_distributed_start, capsys, finished_run):
    line = refusal(before_the_distributed_start, capsys, "--deepspeed_config", REPO / "ds_configs" / "zero3.json",
                   "--out", finished_run, "--resume", world_size=2)
    assert "was written by 1 rank, expert-parallel size 1, ZeRO stage 3, fp32, and this job has 2 ranks, " \
           "expert-parallel size 2, ZeRO stage 3, fp32" in line
    assert "tools/reshard.py" in line and "--resume-from" in line
