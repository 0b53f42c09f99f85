"""Time from a stop signal to a clean exit, and from a restart to training again, on a real run.

    python benchmarks/preemption.py --model eve-base --deepspeed_config ds_configs/zero3.json [--ranks 2] \
        [--micro-batch 2]

Starts the ranks of launch/pretrain.py as srun would (one process group per rank, torch.distributed variables
set), sends SIGUSR1 to every process once step ``--signal-after`` is logged, and times the ranks' exit
(they finish the step, write and digest a checkpoint, exit 75). Then runs the same command again and takes
from its log the times to verify the checkpoint against its manifest and to be back at training.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(args, config: Path, run_dir: Path, log_dir: Path) -> list:
    port, ranks = free_port(), []
    for rank in range(args.ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        env.setdefault("DS_ACCELERATOR", "cpu")
        command = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--deepspeed_config", str(config),
                   "--model", args.model, "--out", str(run_dir), "--auto-resume", "--steps", "1000",
                   "--save-interval", "1000", "--log-interval", "1", "--num-workers", "1"]
        log = open(log_dir / f"rank-{rank}.log", "a")
        ranks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return ranks


def logged_at(log: Path, text: str) -> float:
    """The time stamp of the first log line that holds ``text``, in seconds since the epoch."""
    for line in log.read_text().splitlines():
        if text in line and (match := STAMP.match(line)):
            return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise SystemExit(f"{log}: no line with {text!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="eve-base")
    parser.add_argument("--deepspeed_config", default="ds_configs/zero3.json")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--signal-after", type=int, default=2, help="the step whose log line triggers SIGUSR1")
    parser.add_argument("--micro-batch", type=int, default=None, help="instead of the config's (host memory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, log_dir, config = Path(tmp) / "run", Path(tmp), Path(tmp) / "ds_config.json"
        ds_config = json.loads((REPO / args.deepspeed_config).read_text())
        if args.micro_batch:
            ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch
        config.write_text(json.dumps(ds_config))
        ranks = start_ranks(args, config, run_dir, log_dir)
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= args.signal_after):
            if any(rank.poll() is not None for rank in ranks):
                raise SystemExit(f"a rank ended before step {args.signal_after}: see {log_dir}/rank-0.log:\n"
                                 + (log_dir / "rank-0.log").read_text()[-3000:])
            time.sleep(0.01)
        signalled = time.time()
        for rank in ranks:
            os.killpg(rank.pid, signal.SIGUSR1)
        statuses = [rank.wait() for rank in ranks]
        exited = time.time()
        stopped_at = len(metrics.read_text().splitlines())
        log = (log_dir / "rank-0.log").read_text()
        step_time = re.findall(r"(\d+\.\d+) s/step", log)[-1]
        checkpoint = re.findall(r"checkpoint \S+: (\d+) files, ([\d.]+) GiB, written in ([\d.]+) s, digested and "
                                r"flushed in ([\d.]+) s", log)[-1]

        restarted = time.time()
        ranks = start_ranks(args, config, run_dir, log_dir)
        rank0 = log_dir / "rank-0.log"
        while "resumed from" not in rank0.read_text().split("exiting 75")[-1]:
            if any(rank.poll() is not None for rank in ranks):
                raise SystemExit(f"the restart ended early:\n{rank0.read_text()[-3000:]}")
            time.sleep(0.05)
        for rank in ranks:
            os.killpg(rank.pid, signal.SIGKILL)
        restart_log = rank0.read_text().split("exiting 75")[-1]
        verified = re.findall(r"verified \S+ against its manifest in ([\d.]+) s", restart_log)[-1]
        resumed = max(logged_at(rank0, "resumed from"), restarted) - restarted

    print(f"{args.model}, {args.deepspeed_config}, {args.ranks} ranks, micro batch "
          f"{ds_config['train_micro_batch_size_per_gpu']}: step time {step_time} s")
    print(f"SIGUSR1 after step {args.signal_after}: stopped after step {stopped_at}, exit statuses {statuses}, "
          f"{exited - signalled:.1f} s from the signal to the exit of every rank")
    print(f"  its checkpoint: {checkpoint[0]} files, {checkpoint[1]} GiB, written in {checkpoint[2]} s, digested and "
          f"flushed in {checkpoint[3]} s")
    print(f"restart with --auto-resume: checkpoint verified in {verified} s; {resumed:.1f} s from the start of the "
          "processes to the checkpoint loaded (imports, model, engine, verification, load)")


if __name__ == "__main__":
    main()
