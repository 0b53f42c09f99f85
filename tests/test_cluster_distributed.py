"""The cluster path with real ranks (gloo on CPU), through launch/slurm/pretrain.sbatch under the srun and
scontrol stand-ins of tests/fake_slurm: a simulated 2-node job, a stop on SIGUSR1 and its requeue, a rank
killed in the middle of a save, and a damaged checkpoint file. Every run must reproduce the loss sequence
of one uninterrupted 2-rank run of ds_configs/zero3.json started by the DeepSpeed launcher."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from eve_ds.checkpoint.manifest import MANIFEST
from eve_ds.cluster import EXIT_REQUEUE
from tests.conftest import REPO, free_port, launch_pretrain, read_metrics

pytestmark = pytest.mark.distributed
FAKE_SLURM = REPO / "tests" / "fake_slurm"
STEPS = 8
TRAIN_ARGS = ["--steps", STEPS, "--save-interval", 3, "--keep-checkpoints", 3]
LOSSES = ("loss", "image_loss", "text_loss", "aux_loss", "lr")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    metrics, _ = launch_pretrain(tmp_path, tmp_path / "run", config, *TRAIN_ARGS)
    assert [record["step"] for record in metrics] == list(range(1, STEPS + 1))
    return tmp_path / "run", metrics


def assert_same_losses(run_dir, reference):
    metrics = read_metrics(run_dir)
    assert [record["step"] for record in metrics] == list(range(1, STEPS + 1))
    for ours, theirs in zip(metrics, reference):
        for key in LOSSES:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (ours["step"], key)


class SlurmJob:
    """One submission of launch/slurm/pretrain.sbatch, as SLURM would start its batch shell."""

    def __init__(self, tmp_path, run_dir, hosts=("127.0.0.1", ), tasks_per_node=2, restart=0, **env):
        self.calls, self.groups = tmp_path / f"calls-{restart}", tmp_path / f"groups-{restart}"
        environ = {**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(self.calls),
                   "FAKE_SLURM_HOSTS": " ".join(hosts), "FAKE_SLURM_TASK_GROUPS": str(self.groups),
                   "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "eve-ci",
                   "SLURM_JOB_NODELIST": "ci[1-2]", "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
                   "SLURM_RESTART_COUNT": str(restart), "EVE_DS_RUN_DIR": str(run_dir), "EVE_DS_PYTHON": sys.executable,
                   "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                   "PYTHONUNBUFFERED": "1", **env}
        self.run_dir = run_dir
        self.process = subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "--num-workers", "1",
                                         "--log-interval", "2", *map(str, TRAIN_ARGS)],
                                        env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self):
        output, _ = self.process.communicate(timeout=600)
        return self.process.returncode, output, self.calls.read_text().splitlines()

    def rank_log(self, rank, restart=0) -> str:
        return (self.run_dir / "logs" / "777" / f"rank-{rank}.restart-{restart}.log").read_text()

    def signal_tasks(self, signum):
        """As SLURM's --signal does: to every process of every task, not to the batch shell."""
        for group in self.groups.read_text().split():
            os.killpg(int(group), signum)


def wait_for_steps(run_dir, count, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {count}")


def test_two_node_job_trains_like_one_node(uninterrupted, tmp_path):
    job = SlurmJob(tmp_path, tmp_path / "run", hosts=("127.0.0.1", "127.0.0.2"), tasks_per_node=1)
    status, output, calls = job.wait()
    assert status == 0, output + job.rank_log(0)[-3000:] + job.rank_log(1)[-3000:]
    assert calls[0].startswith("srun --kill-on-bad-exit=1") and "scontrol show hostnames ci[1-2]" in calls
    assert "srun task 0 of 2: master 127.0.0.1" in job.rank_log(0)
    assert_same_losses(tmp_path / "run", uninterrupted[1])


def test_sigusr1_stops_with_a_checkpoint_and_the_requeued_job_continues(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = SlurmJob(tmp_path, run_dir)
    wait_for_steps(run_dir, 2)
    job.signal_tasks(signal.SIGUSR1)
    status, output, calls = job.wait()
    assert status == EXIT_REQUEUE, output + job.rank_log(0)[-3000:]
    assert calls[-1] == "scontrol requeue 777" and "requeueing it" in output
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stopped_at < STEPS
    tag = f"step_{stopped_at:08d}"
    assert (run_dir / "checkpoints" / tag / MANIFEST).is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert f"stopped on SIGUSR1 after step {stopped_at} with its checkpoint written" in job.rank_log(0)

    requeued = SlurmJob(tmp_path, run_dir, restart=1)
    status, output, _ = requeued.wait()
    assert status == 0, output + requeued.rank_log(0, restart=1)[-3000:]
    assert f"at step {stopped_at}" in requeued.rank_log(0, restart=1)
    assert_same_losses(run_dir, uninterrupted[1])


def test_rank_killed_during_a_save_resumes_from_the_previous_checkpoint(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = SlurmJob(tmp_path, run_dir, EVE_DS_KILL_DURING_SAVE="1:6")
    status, output, calls = job.wait()
    assert status not in (0, EXIT_REQUEUE) and not any(call.startswith("scontrol requeue") for call in calls)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_00000006").is_dir() and not (checkpoints / "step_00000006" / MANIFEST).exists()
    assert (checkpoints / "latest").read_text() == "step_00000003"

    restarted = SlurmJob(tmp_path, run_dir, restart=1)
    status, output, _ = restarted.wait()
    log = restarted.rank_log(0, restart=1)
    assert status == 0, output + log[-3000:]
    assert "step_00000006: incomplete (no manifest: its save did not finish); skipped" in log
    assert "at step 3" in log
    assert_same_losses(run_dir, uninterrupted[1])


def test_damaged_checkpoint_file_is_named_and_fallen_back_from(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    victim = next((run_dir / "checkpoints" / f"step_{STEPS:08d}").glob("zero_pp_rank_1_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:4096])
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    _, log = launch_pretrain(tmp_path, run_dir, config, *TRAIN_ARGS, "--resume")
    assert f"{victim}: 4096 bytes, the manifest says" in log and "falling back to an earlier checkpoint" in log
    assert "at step 6" in log
    assert_same_losses(run_dir, uninterrupted[1])
    # The step-8 save of the resumed run does not delete the complete (damaged) checkpoint it did not write.
    aside = run_dir / "checkpoints" / f"step_{STEPS:08d}.damaged"
    assert (aside / victim.name).stat().st_size == 4096 and "kept as step_00000008.damaged" in log


def test_sigterm_during_start_up_stops_after_the_first_step(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = SlurmJob(tmp_path, run_dir)
    log = run_dir / "logs" / "777" / "rank-0.restart-0.log"
    deadline = time.monotonic() + 120
    # Rank 0 has imported torch and is about to set up torch.distributed: seconds before its first step.
    while not (log.exists() and "srun task 0 of 2" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    job.signal_tasks(signal.SIGTERM)
    status, output, calls = job.wait()
    assert status == EXIT_REQUEUE, output + job.rank_log(0)[-3000:]
    assert "stopped on SIGTERM after step 1 with its checkpoint written" in job.rank_log(0)
    assert (run_dir / "checkpoints" / "step_00000001" / MANIFEST).is_file()
    assert read_metrics(run_dir)[0]["loss"] == pytest.approx(uninterrupted[1][0]["loss"], rel=1e-5)
