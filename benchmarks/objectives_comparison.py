"""Pre-training objectives side by side: downstream metric against pre-training wall-clock time, from transfer
benchmarks (benchmarks/transfer.py) that differ in what they pre-train, and the speed-up to equal quality.

    python benchmarks/transfer.py --out runs/transfer                                    # msm, 1,200 steps
    python benchmarks/transfer.py --out runs/transfer-vlmo --pretrain-steps 600 \
        --pretrain-args "--objectives itc,itm,mlm"
    python benchmarks/objectives_comparison.py --runs msm=runs/transfer itc,itm,mlm=runs/transfer-vlmo \\
        --measure-steps 40 --out runs/comparison

A point's wall-clock time is its pre-training steps times the run's seconds per step. With ``--measure-steps N``
those are measured anew: each run's pre-training, with its options, for N steps, one after the other (the median
step after the first five), so that the runs are timed on the same machine in the same state; without, each run's
own median step time is used, which a machine busy with other work inflates. Validation and checkpoints are left
out of both. The speed-up is read at the best level the weaker run reaches: the wall-clock each run needs to get
there, interpolated linearly between its points (from its scratch level at time 0).

Writes ``comparison.md`` (the table), ``comparison.png`` and ``comparison.json`` under ``--out``.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import transfer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=FOLDER",
                        help="transfer benchmark folders, each named (the first is the reference of the speed-up)")
    parser.add_argument("--measure-steps", type=int, default=0,
                        help="time each run's pre-training anew for this many steps (0: use its own step times)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "comparison")
    args = parser.parse_args(argv)
    args.runs = dict(run.split("=", 1) for run in args.runs)
    for name, folder in args.runs.items():
        if not (Path(folder) / "results.json").is_file():
            parser.error(f"--runs {name}={folder}: no results.json (run benchmarks/transfer.py --out {folder} first)")
    return args


def transfer_options(folder: Path) -> argparse.Namespace:
    """The options a transfer benchmark ran with (its results.json keeps them as text)."""
    saved = json.loads((folder / "results.json").read_text())["args"]
    return transfer.parse_args(["--out", str(folder), "--preset", saved["preset"], "--pretrain-steps",
                                saved["pretrain_steps"], "--pretrain-config", saved["pretrain_config"],
                                "--pretrain-args", saved["pretrain_args"],
                                "--points", ",".join(str(p) for p in json.loads(saved["points"]))]
                               + (["--pretrain-lr", saved["pretrain_lr"]] if saved["pretrain_lr"] != "None" else []))


def median_step_time(metrics: Path) -> float:
    times = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()]
    return statistics.median(times[5:] or times)


def measured_step_time(name: str, folder: Path, steps: int, out: Path) -> float:
    """The run's pre-training (its options, its world) for ``steps`` steps in ``out/timing/NAME``."""
    options = transfer_options(folder)
    timing = out / "timing" / name.replace(",", "+")
    if not (timing / "pretrain" / "summary.json").is_file():
        options.out, options.pretrain_steps, options.points = timing, steps, [1.0]
        timing.mkdir(parents=True, exist_ok=True)
        world = timing / "world"
        if not world.exists():
            world.symlink_to((folder / "world").resolve())
        transfer.pretrain(options, transfer.make_world(options))
    return median_step_time(timing / "pretrain" / "metrics.jsonl")


def curve(results: dict, task: str, seconds_per_step: float) -> list:
    """[(minutes, mean, std)] from scratch (0 minutes) through the points."""
    points = []
    for condition, values in results[task].items():
        steps = 0 if condition == transfer.SCRATCH else int(condition.removeprefix("step_"))
        points.append((steps * seconds_per_step / 60, statistics.mean(values), statistics.stdev(values)))
    return sorted(points)


def time_to_reach(points: list, level: float):
    """The first time at which the curve, linear between its points, reaches ``level``; None if it never does."""
    for (t0, m0, _), (t1, m1, _) in zip(points, points[1:]):
        if m0 >= level:
            return t0
        if m1 >= level:
            return t0 + (t1 - t0) * (level - m0) / (m1 - m0)
    return points[-1][0] if points[-1][1] >= level else None


def compare(args) -> dict:
    names = list(args.runs)
    runs = {name: json.loads((Path(folder) / "results.json").read_text()) for name, folder in args.runs.items()}
    step_time = {name: measured_step_time(name, Path(folder), args.measure_steps, args.out) if args.measure_steps else
                 median_step_time(Path(folder) / "pretrain" / "metrics.jsonl") for name, folder in args.runs.items()}
    tasks = [task for task in runs[names[0]]["results"] if all(task in run["results"] for run in runs.values())]
    comparison = {"seconds_per_step": step_time, "measured": bool(args.measure_steps), "tasks": {}}
    for task in tasks:
        curves = {name: curve(runs[name]["results"], task, step_time[name]) for name in names}
        level = min(max(mean for _, mean, _ in points[1:]) for points in curves.values())
        times = {name: time_to_reach(points, level) for name, points in curves.items()}
        reference = times[names[0]]
        speedups = {name: (time / reference if time is not None and reference else None)
                    for name, time in times.items()}
        comparison["tasks"][task] = {"curves": curves, "level": level, "minutes_to_level": times,
                                     "speedup_of_first": speedups}
        if task in transfer.ALSO_SHOWN:
            also = {name: curve(runs[name]["also"], task, step_time[name]) for name in names}
            comparison["tasks"][task]["also"] = also
    return comparison


def table(comparison: dict, names: list) -> str:
    lines = ["Seconds per pre-training step (" + ("measured back to back" if comparison["measured"] else
             "each run's own median") + "): " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in
                                                        comparison["seconds_per_step"].items()), ""]
    for task, result in comparison["tasks"].items():
        lines += [f"**{task}** ({transfer.METRICS[task][1]}); level {result['level']:.1f}, the best the weaker run "
                  "reaches:", "", "| pre-training | points: minutes of pre-training -> metric (mean ± std over seeds) "
                  f"| minutes to {result['level']:.1f} | speed-up of {names[0]} |", "|---|---|---|---|"]
        for name in names:
            cells = ", ".join(f"{minutes:.1f} -> {mean:.1f} ± {std:.1f}"
                              for minutes, mean, std in result["curves"][name])
            time, speedup = result["minutes_to_level"][name], result["speedup_of_first"][name]
            lines.append(f"| {name} | {cells} | {'not reached' if time is None else f'{time:.1f}'} | "
                         f"{'-' if speedup is None else f'{speedup:.2f}x'} |")
        lines.append("")
    return "\n".join(lines)


def plot(comparison: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = comparison["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for axis, (task, result) in zip(axes[0], tasks.items()):
        for name, points in result["curves"].items():
            minutes, means, stds = zip(*points)
            axis.errorbar(minutes, means, yerr=stds, marker="o", capsize=3, label=name)
        axis.axhline(result["level"], color="grey", linestyle=":", linewidth=1)
        axis.set_title(task)
        axis.set_xlabel("pre-training wall-clock (min)")
        axis.set_ylabel(transfer.METRICS[task][1])
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    comparison = compare(args)
    (args.out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    text = table(comparison, list(args.runs))
    (args.out / "comparison.md").write_text(text + "\n")
    plot(comparison, args.out / "comparison.png")
    print(text)
    print(f"wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}")


if __name__ == "__main__":
    main()
