"""SLURM without a cluster: node lists, the srun task environment, stop signals, and the batch scripts run
under stand-ins for srun and scontrol (tests/fake_slurm) that record the commands they are given."""
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from eve_ds.cluster import (EXIT_REQUEUE, StopRequest, StoppedWaiting, expand_nodelist, hostnames, master_port,
                            set_distributed_env_from_slurm, set_single_process_env)
from tests.conftest import REPO

FAKE_SLURM = REPO / "tests" / "fake_slurm"


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("node7", ["node7"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("a[08-11]", ["a08", "a09", "a10", "a11"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[1-2],y,z[5]", ["x1", "x2", "y", "z5"]),
])
def test_node_lists_expand_as_slurm_does(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-04", "gpu01]", "gpu[a-b]", "gpu[4-2]", "gpu[[1]]"])
def test_malformed_node_lists_are_one_sentence(nodelist):
    with pytest.raises(ValueError, match=re.escape(f"malformed node list {nodelist!r}")):
        expand_nodelist(nodelist)


def test_hostnames_come_from_scontrol_where_it_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "calls"))
    monkeypatch.setenv("FAKE_SLURM_HOSTS", "alpha beta")
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{os.environ['PATH']}")
    assert hostnames("gpu[1-2]") == ["alpha", "beta"]
    assert (tmp_path / "calls").read_text() == "scontrol show hostnames gpu[1-2]\n"
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the parser
    assert hostnames("gpu[1-2]") == ["gpu1", "gpu2"]


def test_a_stop_signal_during_start_up_does_not_kill_scontrol(monkeypatch, tmp_path):
    """SLURM signals every process of a task; scontrol, asked for the host names at that moment, must answer
    (a killed one left the names to the parser: in a test, names that do not resolve, and a hang)."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\nkill -TERM $$\nkill -USR1 $$\necho alpha\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert hostnames("gpu[1-2]") == ["alpha"]


def test_srun_task_environment():
    environ = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[03-06]",
               "SLURM_JOB_ID": "123456"}
    assert set_distributed_env_from_slurm(environ)
    assert (environ["RANK"], environ["LOCAL_RANK"], environ["WORLD_SIZE"]) == ("5", "1", "8")
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("gpu03", str(master_port("123456")))
    assert 20000 <= master_port("123456") < 40000 and master_port("123456") != master_port("123457")
    launched = {"SLURM_PROCID": "0", "RANK": "3"}  # a launcher set the variables: they are kept
    assert not set_distributed_env_from_slurm(launched) and launched["RANK"] == "3"
    assert not set_distributed_env_from_slurm({"RANK": "0"})


def test_a_plain_process_is_one_rank_of_its_own():
    alone = {}
    assert set_single_process_env(alone) and (alone["RANK"], alone["WORLD_SIZE"]) == ("0", "1")
    assert alone["MASTER_ADDR"] == "127.0.0.1" and 0 < int(alone["MASTER_PORT"]) < 65536
    for launched in ({"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "0"}):  # a launcher's or srun's task
        assert not set_single_process_env(dict(launched))


def test_stop_signals_are_recorded_not_fatal():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop = StopRequest()
        assert stop.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGUSR1"  # the first one counts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_stop_signal_ends_a_wait_for_data_after_its_grace_and_a_short_wait_goes_on():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGALRM)}
    try:
        stop = StopRequest(grace_s=0.3)
        with stop.interruptible():
            time.sleep(0.01)  # no signal: the wait ends as waits do
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with stop.interruptible():
            time.sleep(0.2)  # the signal comes during a wait whose data does come: the step goes on
        assert stop.signal_name == "SIGTERM"
        for came_before in (False, True):
            if not came_before:
                stop = StopRequest(grace_s=0.3)
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            started = time.monotonic()
            with pytest.raises(StoppedWaiting):
                with stop.interruptible():
                    time.sleep(30)  # data that never comes
            assert 0.25 < time.monotonic() - started < 5
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_batch_script(tmp_path, script, *args, exit_status=0, **env):
    """Runs a batch script as sbatch would start it, with srun and scontrol replaced by the recording fakes
    and the Python of the job replaced by one that records its command line and exits with exit_status."""
    python = tmp_path / "python"
    python.write_text(f"#!/usr/bin/env bash\necho \"python $*\" >> {tmp_path / 'calls'}\nexit {exit_status}\n")
    python.chmod(0o755)
    environ = {**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "calls"),
               "FAKE_SLURM_HOSTS": "127.0.0.1", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NAME": "eve-test", "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS_PER_NODE": "2",
               "EVE_DS_PYTHON": str(python), **env}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), *args], cwd=tmp_path, env=environ,
                            capture_output=True, text=True, timeout=60)
    return result, (tmp_path / "calls").read_text().splitlines()


def test_pretrain_script_issues_one_srun_and_requeues_after_a_signal_stop(tmp_path):
    result, calls = run_batch_script(tmp_path, "pretrain.sbatch", "--model", "eve-base")
    assert result.returncode == 0, result.stderr
    log_dir = "runs/eve-test/logs/4242"
    assert calls[0] == (f"srun --kill-on-bad-exit=1 --output={log_dir}/rank-%t.restart-0.log {tmp_path / 'python'} "
                        "launch/pretrain.py --deepspeed_config ds_configs/zero3.json --out runs/eve-test "
                        "--auto-resume --model eve-base")
    assert calls[1:] == ["python launch/pretrain.py --deepspeed_config ds_configs/zero3.json --out runs/eve-test "
                         "--auto-resume --model eve-base"] * 2  # one task per GPU of the node
    assert (tmp_path / log_dir / "rank-0.restart-0.log").is_file() and (tmp_path / log_dir / "rank-1.restart-0.log").is_file()

    (tmp_path / "stopped").mkdir()
    result, calls = run_batch_script(tmp_path / "stopped", "pretrain.sbatch", exit_status=EXIT_REQUEUE, SLURM_RESTART_COUNT="2",
                                     EVE_DS_CONFIG="ds_configs/zero2_ep.json", EVE_DS_RUN_DIR=str(tmp_path / "shared"))
    assert result.returncode == EXIT_REQUEUE
    assert f"--output={tmp_path}/shared/logs/4242/rank-%t.restart-2.log" in calls[0]
    assert f"--deepspeed_config ds_configs/zero2_ep.json --out {tmp_path}/shared --auto-resume" in calls[0]
    assert calls[-1] == "scontrol requeue 4242" and "requeueing it" in result.stdout

    (tmp_path / "failed").mkdir()
    result, calls = run_batch_script(tmp_path / "failed", "pretrain.sbatch", exit_status=1)
    assert result.returncode == 1 and not any(call.startswith("scontrol requeue") for call in calls)


def test_finetune_script_runs_the_fine_tuning_entry_point_with_its_tasks_config(tmp_path):
    (tmp_path / "launch" / "slurm").mkdir(parents=True)  # the batch shell runs from the submit directory
    (tmp_path / "launch" / "slurm" / "pretrain.sbatch").write_text((REPO / "launch/slurm/pretrain.sbatch").read_text())
    result, calls = run_batch_script(tmp_path, "finetune.sbatch", "--task", "vqa", "--pretrained", "runs/x")
    assert result.returncode == 0, result.stderr
    assert calls[0].endswith(f"{tmp_path / 'python'} launch/finetune.py --out runs/eve-test --auto-resume --task vqa "
                             "--pretrained runs/x")
    assert calls[1:] == ["python launch/finetune.py --out runs/eve-test --auto-resume --task vqa --pretrained runs/x"] * 2


def test_convert_script_runs_one_tool(tmp_path):
    result, calls = run_batch_script(tmp_path, "convert.sbatch", "consolidate", "runs/x/checkpoints", "runs/x/out",
                                     SLURM_NTASKS_PER_NODE="1")
    assert result.returncode == 0, result.stderr
    assert calls == [f"srun {tmp_path / 'python'} tools/consolidate.py runs/x/checkpoints runs/x/out",
                     "python tools/consolidate.py runs/x/checkpoints runs/x/out"]
    (tmp_path / "calls").unlink()
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "convert.sbatch"), "rm", "-rf", "/"],
                            env={**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 2 and "usage: sbatch launch/slurm/convert.sbatch" in result.stderr
