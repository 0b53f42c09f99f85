"""One job at a time in a run folder: a lock file that names its holder, made atomically (O_EXCL, which holds on
the shared filesystems clusters run from), kept fresh by a heartbeat while the job lives and removed when it ends.

A lock is stale, and taken over with a warning, when its holder is dead: a process of this host that no longer
exists, an earlier run of this SLURM job (a requeue), or a holder whose heartbeat stopped long ago (a node that
died). Anything else is a live job, and the second one is refused in one sentence.
"""
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from eve_ds.errors import UsageError

logger = logging.getLogger(__name__)
LOCK = ".lock"
HEARTBEAT_S = 60
STALE_AFTER_S = 30 * 60  # a job's heartbeat thread touches the lock every minute, even in a long save


class RunFolderBusy(UsageError):
    pass


def holder_facts() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)), "since": time.time()}


def _process_exists(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def why_stale(holder: dict, age_s: float, me: dict):
    """Why a lock's holder is dead (a sentence), or None where it may be alive."""
    if holder.get("job_id") and holder["job_id"] == me["job_id"] and holder.get("restart", 0) < me["restart"]:
        return f"it was held by an earlier run of SLURM job {holder['job_id']}"
    if holder.get("host") == me["host"] and not _process_exists(holder.get("pid")):
        return f"its holder, process {holder.get('pid')} of this host, no longer exists"
    if age_s > STALE_AFTER_S:
        return f"its holder's heartbeat stopped {age_s / 60:.0f} minutes ago"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}"


class RunFolderLock:
    """Held by one process of a job (rank 0) from ``acquire`` to ``release``."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self.facts, self._stop = None, threading.Event()

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = holder_facts()
        for _ in range(3):  # a takeover races other takers: whoever creates the file holds the folder
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age_s = self._read()
                reason = why_stale(holder, age_s, me) if holder is not None else "it is unreadable"
                if reason is None:
                    raise RunFolderBusy(
                        f"{self.path.parent} is in use by {describe(holder)} (its lock {self.path} was renewed "
                        f"{age_s:.0f} s ago): choose another --out, or wait for that job to end") from None
                logger.warning("taking over the lock %s of a dead job: %s", self.path, reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as file:
                json.dump(me, file)
                file.flush()
                os.fsync(file.fileno())
            self.facts = me
            threading.Thread(target=self._beat, daemon=True, name="run-folder-heartbeat").start()
            return self
        raise RunFolderBusy(f"{self.path.parent}: another job keeps taking its lock {self.path}")

    def _read(self):
        try:
            return json.loads(self.path.read_text()), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, 0.0  # released meanwhile: stale, try again
        except (OSError, ValueError):
            return None, 0.0

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        """Removes the lock if it is still this process's (a takeover by another job leaves it alone)."""
        if self.facts is None:
            return
        self._stop.set()
        holder, _ = self._read()
        if holder and holder.get("pid") == self.facts["pid"] and holder.get("host") == self.facts["host"]:
            self.path.unlink(missing_ok=True)
        self.facts = None
