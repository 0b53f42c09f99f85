"""Wall time and peak memory of tools/consolidate.py and tools/reshard.py on a real checkpoint of a preset.

    python benchmarks/consolidate.py --model eve-base --deepspeed_config ds_configs/zero3.json [--ranks 2]

Writes the checkpoint with benchmarks/memory.py (one training step of the preset at its full vocabulary,
on CPU ranks) into a temporary folder, then runs each tool in a fresh process and prints its wall time,
its peak resident memory and the sizes on disk.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def folder_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def run_measured(command: list) -> tuple:
    """Runs a command to its end; returns (wall seconds, peak resident GiB of that process)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code:
        raise SystemExit(f"{' '.join(map(str, command))} failed with exit code {exit_code}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eve-base")
    parser.add_argument("--deepspeed_config", default=str(REPO / "ds_configs" / "zero3.json"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the checkpoint and outputs go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        workdir = Path(workdir)
        checkpoints = workdir / "checkpoints"
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
                        str(REPO / "benchmarks" / "memory.py"), "--model", args.model, "--deepspeed_config",
                        args.deepspeed_config, "--checkpoint-dir", str(checkpoints)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"{args.model}, {Path(args.deepspeed_config).name}, {args.ranks} ranks: checkpoint "
              f"{folder_gib(checkpoints):.2f} GiB on disk")
        for tool, out in (("consolidate", workdir / "consolidated"), ("reshard", workdir / "universal")):
            seconds, peak = run_measured([sys.executable, str(REPO / "tools" / f"{tool}.py"), str(checkpoints), str(out)])
            print(f"  tools/{tool}.py: {seconds:.1f} s wall, peak resident memory {peak:.2f} GiB, "
                  f"output {folder_gib(out):.2f} GiB")


if __name__ == "__main__":
    main()
