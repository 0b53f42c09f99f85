"""The run-folder lock, without launches (tests/test_reliability.py launches a job against a held one)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from eve_ds.run_folder import LOCK, STALE_AFTER_S, RunFolderBusy, RunFolderLock, holder_facts


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_goes_with_its_holder(tmp_path):
    first = RunFolderLock(tmp_path).acquire()
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(RunFolderBusy, match=f"{tmp_path} is in use by process {os.getpid()} on "
                                            f"{socket.gethostname()}.*choose another --out"):
        RunFolderLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    RunFolderLock(tmp_path).acquire().release()


@pytest.mark.parametrize("holder, age_s, me, expected", [
    ({"pid": "dead"}, 0, {}, "no longer exists"),
    ({"host": "gpu07", "pid": 1, "job_id": "123", "restart": 0}, 0, {"job_id": "123", "restart": 1},
     "earlier run of SLURM job 123"),
    ({"host": "gpu07", "pid": 1, "job_id": "9"}, STALE_AFTER_S + 60, {}, "heartbeat stopped 31 minutes ago"),
], ids=["dead_process_here", "requeued_slurm_job", "silent_other_host"])
def test_a_stale_lock_of_a_dead_job_is_taken_over_with_a_warning(tmp_path, monkeypatch, caplog, holder, age_s, me,
                                                                  expected):
    holder = {**holder_facts(), **holder, "pid": dead_pid() if holder["pid"] == "dead" else holder["pid"]}
    (tmp_path / LOCK).write_text(json.dumps(holder))
    os.utime(tmp_path / LOCK, (os.path.getmtime(tmp_path / LOCK) - age_s, ) * 2)
    for key, value in me.items():
        monkeypatch.setenv({"job_id": "SLURM_JOB_ID", "restart": "SLURM_RESTART_COUNT"}[key], str(value))
    lock = RunFolderLock(tmp_path).acquire()
    assert expected in caplog.text and json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_holder_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": "gpu07", "pid": 1, "job_id": "9", "restart": 0}))
    with pytest.raises(RunFolderBusy, match="process 1 on gpu07, SLURM job 9"):
        RunFolderLock(tmp_path).acquire()
