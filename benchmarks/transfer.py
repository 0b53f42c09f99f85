"""Does pre-training make a better model? Pre-trains a preset by masked signal modeling on a synthetic world, then
fine-tunes every task from the pre-trained weights at several points of pre-training and from random weights, with
the same recipe, over several seeds; prints one table and plots the downstream metric against pre-training steps.

    python benchmarks/transfer.py --out runs/transfer                      # eve-tiny, the default budget (CPU)
    python benchmarks/transfer.py --out runs/transfer-base --preset eve-base --ranks 8 \\
        --pretrain-steps 20000 --world-args --pretrain-images 500000 --vqa-images 20000

Phases, each kept on disk under --out and skipped when its result is there, so a stopped benchmark resumes where it
was (the pre-training itself resumes from its newest checkpoint):

1. ``world/``: ``tools/make_world.py --world-seed`` (pre-training shards, task sets, tokenizer; ``--world-args``
   are passed on to it).
2. ``pretrain/``: ``launch/pretrain.py`` for ``--pretrain-steps``, keeping a checkpoint at every point of
   ``--points`` (fractions of the budget).
3. ``weights/step_N`` (``tools/consolidate.py`` of each point) and ``weights/scratch-seedS`` (the same model,
   randomly initialised with the fine-tuning seed).
4. ``finetune/TASK/CONDITION/seedS``: ``launch/finetune.py`` with the same options for every condition; its
   ``summary.json`` holds the metric.

The table (``transfer.md``) and the plot (``transfer.png``) are written at the end, with ``results.json``; both show
the level a model reaches without looking at the images (the world's blind baselines, retrieval's chance).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The metric each task reports (summary.json's key) and its name in the table.
METRICS = {"vqa": ("val_vqa_accuracy", "VQA accuracy"), "nlvr2": ("val_accuracy", "NLVR2 accuracy"),
           "retrieval": ("val_r_mean", "retrieval mean recall (re-ranked)")}
SCRATCH = "scratch"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "transfer")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--world-args", nargs=argparse.REMAINDER, default=[],
                        help="the rest of the command line goes to tools/make_world.py (sizes of the world)")
    parser.add_argument("--preset", default="eve-tiny")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of each launch (GPUs, or CPU processes)")
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--pretrain-config", default=str(REPO / "ds_configs" / "zero2_ep.json"))
    parser.add_argument("--pretrain-args", default="", help="more options of launch/pretrain.py, one string")
    parser.add_argument("--points", default="0.25,0.5,1", help="fractions of the budget to fine-tune from")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="vqa,nlvr2,retrieval")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-batch", type=int, default=32, help="global batch of every fine-tuning run")
    parser.add_argument("--finetune-lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--finetune-args", default="", help="more options of launch/finetune.py, one string")
    parser.add_argument("--default-augmentation", action="store_true",
                        help="train with the jobs' default augmentations, not the world's recommended options")
    args = parser.parse_args(argv)
    args.points = [float(point) for point in args.points.split(",")]
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    args.tasks = args.tasks.split(",")
    unknown = [task for task in args.tasks if task not in METRICS]
    if unknown or not all(0 < point <= 1 for point in args.points):
        parser.error(f"--tasks takes {', '.join(METRICS)}; --points are fractions in (0, 1]")
    return args


def environment() -> dict:
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run(command: list, log: Path):
    """Runs a command with its output in ``log``; stops the benchmark, naming the log, when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        result = subprocess.run([str(part) for part in command], stdout=out, stderr=subprocess.STDOUT,
                                env=environment(), cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"transfer: {command[0]} ... failed ({result.returncode}); see {log}")


def launcher(args) -> list:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", args.ranks]


def timed(phases: dict, name: str, function):
    """Runs ``function`` (a phase, which skips the work it finds on disk) and returns its value; the phase's wall time
    goes into ``phases`` the first time it completes, so a resumed benchmark keeps the times of what it did before."""
    started = time.perf_counter()
    value = function()
    phases.setdefault(name, time.perf_counter() - started)
    return value


def step_tags(args) -> list:
    return [max(1, round(point * args.pretrain_steps)) for point in args.points]


def make_world(args) -> dict:
    world = args.out / "world"
    if not (world / "world.json").is_file():
        shutil.rmtree(world, ignore_errors=True)
        run([sys.executable, REPO / "tools" / "make_world.py", "--out", world, "--world-seed", args.world_seed,
             *args.world_args], args.out / "logs" / "world.log")
    return json.loads((world / "world.json").read_text())


def recommended(args, world: dict, job: str) -> list:
    """The options the world recommends for a job (its texts state sizes, places and exact colours, which the default
    augmentations would make false), unless --default-augmentation."""
    return [] if args.default_augmentation else world.get("recommended", {}).get(job, [])


def pretrain(args, world: dict):
    run_dir = args.out / "pretrain"
    if (run_dir / "summary.json").is_file():
        return
    steps = step_tags(args)
    interval = math.gcd(*steps)  # a checkpoint at every point
    data = {key: args.out / "world" / path for key, path in world["pretrain"].items()}
    run([*launcher(args), REPO / "launch" / "pretrain.py", "--deepspeed_config", args.pretrain_config,
         "--model", args.preset, "--data", data["data"], "--val-data", data["val_data"], "--val-interval", interval,
         "--tokenizer", data["tokenizer"], "--out", run_dir, "--steps", args.pretrain_steps, "--save-interval",
         interval, "--keep-checkpoints", 0, "--auto-resume", "--num-workers", 1, *recommended(args, world, "pretrain"),
         *args.pretrain_args.split()], args.out / "logs" / "pretrain.log")


def consolidate(args):
    for step in step_tags(args):
        out = args.out / "weights" / f"step_{step}"
        if not (out / "config.json").is_file():
            run([sys.executable, REPO / "tools" / "consolidate.py", args.out / "pretrain" / "checkpoints", out, "--tag",
                 f"step_{step:08d}"], args.out / "logs" / f"consolidate_{step}.log")


def scratch_weights(args, seed: int) -> Path:
    """The pre-trained model's architecture and tokenizer with random weights drawn from ``seed``."""
    import torch

    from eve_ds.checkpoint.pretrained import pretrained_config, save_pretrained
    from eve_ds.data.tokenizer import TextTokenizer
    from eve_ds.objectives import MaskedSignalModeling

    out = args.out / "weights" / f"{SCRATCH}-seed{seed}"
    if not (out / "config.json").is_file():
        trained = args.out / "weights" / f"step_{step_tags(args)[-1]}"
        config = pretrained_config(trained)
        torch.manual_seed(seed)
        save_pretrained(out, MaskedSignalModeling(config).state_dict(), config,
                        tokenizer=TextTokenizer.from_folder(trained, config.max_text_len))
    return out


def conditions(args) -> list:
    """(condition name, pre-training steps or None) in the order of the table: from scratch, then the points."""
    return [(SCRATCH, None)] + [(f"step_{step}", step) for step in step_tags(args)]


def finetune(args, world: dict, task: str, condition: str, seed: int) -> dict:
    out = args.out / "finetune" / task / condition / f"seed{seed}"
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # a run stopped part-way starts again: runs are short
        weights = scratch_weights(args, seed) if condition == SCRATCH else args.out / "weights" / condition
        options = [option.replace("{world}", str(args.out / "world")) for option in world["finetune_options"][task]]
        lr = ["--lr", args.finetune_lr] if args.finetune_lr else []
        run([*launcher(args), REPO / "launch" / "finetune.py", "--task", task, "--pretrained", weights, "--out", out,
             "--seed", seed, "--epochs", args.finetune_epochs, "--batch-size", args.finetune_batch, *lr,
             "--num-workers", 1, "--log-interval", 50, *options, *recommended(args, world, "finetune"),
             *args.finetune_args.split()],
            args.out / "logs" / f"finetune_{task}_{condition}_seed{seed}.log")
    return json.loads((out / "summary.json").read_text())


def blind_level(world: dict, task: str):
    """What the task's metric is without looking at the images: the world's strongest blind baseline (VQA: the most
    frequent answer of the exact question; NLVR2: the majority label of the statement's template), or chance
    (retrieval's mean recall at 1, 5 and 10 among the evaluation images)."""
    baselines = world.get("baselines", {})
    if task == "vqa" and "vqa" in baselines:
        return baselines["vqa"]["prior_per_question"]
    if task == "nlvr2" and "nlvr2" in baselines:
        return baselines["nlvr2"]["majority_per_sentence"]
    images = world.get("counts", {}).get("retrieval", {}).get("val")
    return 100 * (1 + 5 + 10) / 3 / images if task == "retrieval" and images else None


def table(args, results: dict, phases: dict, world: dict) -> str:
    lines = [f"Transfer on world seed {args.world_seed}, {args.preset}, {args.pretrain_steps} pre-training steps, "
             f"{len(args.seeds)} fine-tuning seeds ({', '.join(map(str, args.seeds))}), "
             f"{args.finetune_epochs} epochs at batch {args.finetune_batch}", "",
             "| task (metric) | blind | " + " | ".join(name for name, _ in conditions(args)) + " | longest "
             "pre-training over scratch (in the larger std) |", "|---" * (len(conditions(args)) + 3) + "|"]
    for task in args.tasks:
        cells, means = [], []
        for condition, _ in conditions(args):
            values = results[task][condition]
            mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.1f} ± {std:.1f}")
            means.append((mean, std))
        (scratch_mean, scratch_std), (best_mean, best_std) = means[0], means[-1]
        spread = max(scratch_std, best_std)
        gain = f"{best_mean - scratch_mean:+.1f} ({(best_mean - scratch_mean) / spread:+.1f} σ)" if spread else \
            f"{best_mean - scratch_mean:+.1f}"
        blind = blind_level(world, task)
        lines.append(f"| {task} ({METRICS[task][1]}) | {'-' if blind is None else f'{blind:.1f}'} | "
                     + " | ".join(cells) + f" | {gain} |")
    lines += ["", "Wall time per phase: " + ", ".join(f"{name} {seconds / 60:.1f} min"
                                                      for name, seconds in phases.items())]
    return "\n".join(lines)


def plot(args, results: dict, path: Path, world: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(args.tasks), figsize=(4.2 * len(args.tasks), 3.4), squeeze=False)
    for axis, task in zip(axes[0], args.tasks):
        steps = [step for _, step in conditions(args)[1:]]
        values = [results[task][f"step_{step}"] for step in steps]
        means = [statistics.mean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        axis.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label="pre-trained")
        scratch = results[task][SCRATCH]
        mean, std = statistics.mean(scratch), statistics.stdev(scratch) if len(scratch) > 1 else 0.0
        axis.axhline(mean, color="gray", linestyle="--", label="from scratch")
        axis.axhspan(mean - std, mean + std, color="gray", alpha=0.2)
        blind = blind_level(world, task)
        if blind is not None:
            axis.axhline(blind, color="black", linestyle=":", label="blind (text only / chance)")
        axis.set_xlabel("pre-training steps")
        axis.set_ylabel(METRICS[task][1])
        axis.set_title(task)
        axis.legend(loc="best", fontsize=8)
    figure.suptitle(f"{args.preset}, world seed {args.world_seed}: mean ± std over {len(args.seeds)} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    phases_path = args.out / "phases.json"
    phases = json.loads(phases_path.read_text()) if phases_path.is_file() else {}

    def keep_phases():
        phases_path.write_text(json.dumps(phases, indent=2) + "\n")

    world = timed(phases, "world", lambda: make_world(args))
    keep_phases()
    timed(phases, "pre-training", lambda: pretrain(args, world))
    keep_phases()
    timed(phases, "consolidation", lambda: consolidate(args))
    keep_phases()
    results = {}
    for task in args.tasks:
        results[task] = {}
        for condition, _ in conditions(args):
            results[task][condition] = timed(phases, f"{task} {condition}", lambda: [
                finetune(args, world, task, condition, seed)[METRICS[task][0]] for seed in args.seeds])
            keep_phases()
            print(f"{task} {condition}: {results[task][condition]}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results, "phases_s": phases}, indent=2) + "\n")
    text = table(args, results, phases, world)
    (args.out / "transfer.md").write_text(text + "\n")
    plot(args, results, args.out / "transfer.png", world)
    print(text)
    print(f"wrote {args.out / 'transfer.md'} and {args.out / 'transfer.png'}")


if __name__ == "__main__":
    main()
