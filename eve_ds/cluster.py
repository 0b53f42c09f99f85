"""Running under SLURM: node lists, the torch.distributed environment of an ``srun`` task, and stop signals.

``srun`` starts one task per GPU. DeepSpeed's ``init_distributed`` discovers MPI, AzureML and SageMaker
environments but not SLURM's, so each task maps SLURM's variables to the ones torch.distributed reads;
the master is the first node of the job and its port is derived from the job id, so that jobs sharing a
node do not collide.
"""
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
from contextlib import contextmanager

# Only the standard library at import time: launch/pretrain.py installs StopRequest before it imports
# torch, so that a signal during the seconds of start-up is recorded too.
logger = logging.getLogger(__name__)
# The exit status of a run that stopped on a signal after writing its checkpoint: "try again later"
# (EX_TEMPFAIL); the batch script requeues the job on it.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list:
    """SLURM's compressed host list -> host names: ``gpu[01-04,07],cpu3`` -> gpu01 ... gpu04, gpu07, cpu3.
    Several bracket groups in one name (``rack[1-2]-n[1-2]``) expand to their product, in SLURM's order."""
    hosts, depth, start = [], 0, 0
    for position, char in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"malformed node list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            if position > start:
                hosts += _expand_name(nodelist[start:position], nodelist)
            start = position + 1
    if depth:
        raise ValueError(f"malformed node list {nodelist!r}: unbalanced brackets")
    return hosts


def _expand_name(name: str, nodelist: str) -> list:
    parts = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
    choices = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            choices.append([part])
            continue
        values = []
        for item in part.split(","):
            match = _RANGE.match(item.strip())
            if not match:
                raise ValueError(f"malformed node list {nodelist!r}: {item!r} is not a number or a range")
            first, last = match[1], match[2] or match[1]
            if int(last) < int(first):
                raise ValueError(f"malformed node list {nodelist!r}: range {item!r} runs backwards")
            values += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
        choices.append(values)
    return ["".join(combination) for combination in itertools.product(*choices)]


def hostnames(nodelist: str) -> list:
    """The hosts of a SLURM node list, by ``scontrol show hostnames`` where it exists, else by the parser."""
    if shutil.which("scontrol"):
        # A stop signal for the job reaches every process of the task: scontrol must not die of it, or the
        # names would come from the parser in its place (the same hosts, where they resolve).
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                preexec_fn=ignore_stop_signals)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()
        logger.warning("scontrol show hostnames failed (%s); parsing the node list", result.stderr.strip()[:200])
    return expand_nodelist(nodelist)


def master_port(job_id: str) -> int:
    return 20000 + int(job_id) % 20000


def set_distributed_env_from_slurm(environ=os.environ) -> bool:
    """Inside an ``srun`` task and without a launcher's variables, sets RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT from SLURM's (a value already set is kept). Returns whether it did."""
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["LOCAL_RANK"] = environ["SLURM_LOCALID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ.setdefault("MASTER_ADDR", hostnames(environ["SLURM_JOB_NODELIST"])[0])
    environ.setdefault("MASTER_PORT", str(master_port(environ["SLURM_JOB_ID"])))
    return True


def set_single_process_env(environ=os.environ) -> bool:
    """Started as a plain ``python launch/....py``, without a launcher or srun: one rank on this host (DeepSpeed
    would otherwise look for MPI). Returns whether it did."""
    if any(key in environ for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID")):
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


class StoppedWaiting(BaseException):
    """A stop signal ended a wait (for data) that no step boundary would have ended. A BaseException, so that
    the readers' handlers of bad data do not take it for one."""


class StopRequest:
    """Records SIGUSR1/SIGTERM (SLURM's warning before a time limit, preemption, scancel) instead of dying,
    so that the training loop can finish its step and write a checkpoint first. A rank that waits for its data
    when the signal comes (or comes to wait after it) waits ``grace_s`` more, then StoppedWaiting is raised in the
    wait: where the data does not come (a hung filesystem), no step boundary would."""

    def __init__(self, grace_s: float = None):
        self.signal_name = None
        # EVE_DS_STOP_GRACE_S: for tests, which would otherwise wait the grace out.
        self.grace_s = grace_s if grace_s is not None else float(os.environ.get("EVE_DS_STOP_GRACE_S", 30))
        self._waiting = self._armed = False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        if self._waiting:
            self._arm()

    def _arm(self):
        if not self._armed:
            self._armed = True
            signal.signal(signal.SIGALRM, self._end_wait)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _end_wait(self, signum, frame):
        if self._waiting:
            self._waiting = False
            raise StoppedWaiting(self.signal_name)

    @contextmanager
    def interruptible(self):
        """A wait (for data) that a stop signal ends after ``grace_s``."""
        self._waiting = True
        if self.signal_name is not None:
            self._arm()
        try:
            yield
        finally:
            self._waiting = False
            if self._armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self._armed = False

    def agreed(self, device) -> bool:
        """Whether any rank has been signalled: every rank must stop at the same step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def end_helper_processes():
    """Kills this process's multiprocessing children (data-loader workers) before a job ends early: they ignore
    SIGTERM (see ignore_stop_signals), so a worker stuck in a read would keep the exit waiting for it forever."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers as a failure
    for child in multiprocessing.active_children():
        child.kill()


def ignore_stop_signals(worker_id: int = 0):
    """For data-loader workers and helper processes: a signal for the job reaches every process of a task, and a
    worker that it killed would fail the step that the main process is finishing before it stops."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
