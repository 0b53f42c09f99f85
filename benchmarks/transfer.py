"""Does pre-training make a better model? Pre-trains a preset by masked signal modeling on a synthetic world, then
fine-tunes every task from the pre-trained weights at several points of pre-training and from random weights, with
the same recipe, over several seeds; prints one table and plots the downstream metric against pre-training steps.

    python benchmarks/transfer.py --out runs/transfer                      # eve-tiny, the default budget (CPU)
    python benchmarks/transfer.py --out runs/transfer-base --preset eve-base --ranks 8 --jobs 8 \\
        --pretrain-steps 20000 --world-args --pretrain-images 500000 --vqa-images 20000

Phases, each kept on disk under --out and skipped when its result is there, so a stopped benchmark resumes where it
was (the pre-training itself resumes from its newest checkpoint):

1. ``world/``: ``tools/make_world.py --world-seed`` (pre-training shards, task sets, tokenizer; ``--world-args``
   are passed on to it).
2. ``pretrain/``: ``launch/pretrain.py`` for ``--pretrain-steps`` at ``--pretrain-lr``, keeping a checkpoint at every
   point of ``--points`` (fractions of the budget).
3. ``weights/step_N`` (``tools/consolidate.py`` of each point) and ``weights/scratch-seedS`` (the same model,
   randomly initialised with the fine-tuning seed).
4. ``grounding.json``: ``benchmarks/grounding.py`` on every point and on random weights (which words of a caption
   the model reads off the picture).
5. ``finetune/TASK/CONDITION/seedS``: ``launch/finetune.py`` with the same options for every condition, ``--jobs``
   runs side by side (each on ``--finetune-ranks`` ranks of its own); its ``summary.json`` holds the metric.

The table (``transfer.md``) and the plot (``transfer.png``) are written at the end, with ``results.json``; both show
the level a model reaches without looking at the images (the world's blind baselines, retrieval's chance).
"""
import argparse
import concurrent.futures
import json
import math
import os
import queue
import shutil
import socket
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
# Shown in the table too, from the same runs: retrieval's recall without the matching head's re-ranking.
ALSO_SHOWN = {"retrieval": ("val_itc_r_mean", "the same, dual encoder alone")}
SCRATCH = "scratch"
TINY_LR = 2e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "transfer")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--world-args", nargs=argparse.REMAINDER, default=[],
                        help="the rest of the command line goes to tools/make_world.py (sizes of the world)")
    parser.add_argument("--preset", default="eve-tiny")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the pre-training (GPUs, or CPU processes)")
    parser.add_argument("--finetune-ranks", type=int, default=1, help="ranks of each fine-tuning run; with --jobs J, "
                        "J runs at a time take J x this many GPUs or CPU cores")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning runs side by side (on 2 CPU cores, two "
                        "1-rank runs take 46 s each against 99 s for one 2-rank run, docs/transfer.md)")
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--pretrain-config", default=str(REPO / "ds_configs" / "zero2_ep.json"))
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help=f"peak learning rate of the pre-training (default: {TINY_LR:g} for eve-tiny and "
                             "vlmo-tiny: eve-tiny's validation losses after 1,200 steps at batch 32 are lower than at "
                             "the config's 1e-3, text 0.50 against 0.72, docs/transfer.md; the config's for others)")
    parser.add_argument("--pretrain-args", default="", help="more options of launch/pretrain.py, one string")
    parser.add_argument("--points", default="0.25,0.5,1", help="fractions of the budget to fine-tune from")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="vqa,nlvr2,retrieval")
    parser.add_argument("--finetune-epochs", default="vqa=5,nlvr2=5,retrieval=2",
                        help="epochs of the fine-tuning runs: one number for every task, or one per task")
    parser.add_argument("--finetune-batch", type=int, default=32, help="global batch of every fine-tuning run")
    parser.add_argument("--finetune-lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="fine-tuning recomputes activations in the backward pass, as the task configs do to fit "
                             "eve-base on a GPU (off by default: a small preset needs no memory saving, and runs "
                             "about 1.4x faster without)")
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
    if min(args.ranks, args.finetune_ranks, args.jobs) < 1:
        parser.error("--ranks, --finetune-ranks and --jobs must be positive")
    try:
        args.finetune_epochs = per_task(args.finetune_epochs, args.tasks)
    except ValueError as error:
        parser.error(f"--finetune-epochs: {error}")
    return args


def per_task(text: str, tasks: list) -> dict:
    """{task: positive int} of "N" (every task) or "task=N,task=N" (every task of ``tasks`` named)."""
    if "=" not in text:
        values = {task: text for task in tasks}
    else:
        values = dict(part.split("=", 1) for part in text.split(","))
        missing = [task for task in tasks if task not in values]
        if missing:
            raise ValueError(f"no value for {', '.join(missing)}")
    values = {task: int(values[task]) for task in tasks}
    if min(values.values()) < 1:
        raise ValueError("epochs must be positive")
    return values


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(ranks: int, slot: int = 0) -> list:
    """The DeepSpeed launcher for ``ranks`` ranks in job slot ``slot``: slots run side by side, on GPUs each on its own
    devices (slot s takes devices s*ranks to (s+1)*ranks - 1); every launch rendezvous on a free port of its own (two
    launches on one port fail with EADDRINUSE)."""
    import torch

    where = ["--num_gpus", ranks]
    if torch.cuda.is_available():
        where = ["--include", "localhost:" + ",".join(str(slot * ranks + rank) for rank in range(ranks))]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *where, "--master_port", free_port()]


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
    config = json.loads(Path(args.pretrain_config).read_text())
    lr = args.pretrain_lr or (TINY_LR if args.preset.endswith("-tiny") else None)
    if lr is not None:
        config.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})["lr"] = lr
    config_path = args.out / "configs" / "pretrain.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    run([*launcher(args.ranks), REPO / "launch" / "pretrain.py", "--deepspeed_config", config_path,
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
    from eve_ds.objectives import PretrainingModel

    out = args.out / "weights" / f"{SCRATCH}-seed{seed}"
    if not (out / "config.json").is_file():
        trained = args.out / "weights" / f"step_{step_tags(args)[-1]}"
        config = pretrained_config(trained)
        torch.manual_seed(seed)
        save_pretrained(out, PretrainingModel(config).state_dict(), config,
                        tokenizer=TextTokenizer.from_folder(trained, config.max_text_len))
    return out


def conditions(args) -> list:
    """(condition name, pre-training steps or None) in the order of the table: from scratch, then the points."""
    return [(SCRATCH, None)] + [(f"step_{step}", step) for step in step_tags(args)]


def finetune(args, world: dict, task: str, condition: str, seed: int, slot: int = 0) -> dict:
    """The summary of one fine-tuning run (launched in job slot ``slot`` unless its folder holds it), with the run's
    wall time as ``wall_s``."""
    out = args.out / "finetune" / task / condition / f"seed{seed}"
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # a run stopped part-way starts again: runs are short
        weights = scratch_weights(args, seed) if condition == SCRATCH else args.out / "weights" / condition
        options = [option.replace("{world}", str(args.out / "world")) for option in world["finetune_options"][task]]
        lr = ["--lr", args.finetune_lr] if args.finetune_lr else []
        started = time.perf_counter()
        run([*launcher(args.finetune_ranks, slot), REPO / "launch" / "finetune.py", "--task", task, "--pretrained",
             weights, "--out", out, "--seed", seed, "--epochs", args.finetune_epochs[task], "--batch-size",
             args.finetune_batch, *lr, "--deepspeed_config", finetune_config_path(args, task),
             "--save-interval", 10**9, "--eval-interval", 10**9, "--num-workers", 1, "--log-interval", 50, *options,
             *recommended(args, world, "finetune"), *args.finetune_args.split()],
            args.out / "logs" / f"finetune_{task}_{condition}_seed{seed}.log")
        (out / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}) + "\n")
    wall = out / "wall.json"
    return {**json.loads((out / "summary.json").read_text()),
            "wall_s": json.loads(wall.read_text())["wall_s"] if wall.is_file() else None}


def finetune_config_path(args, task: str) -> Path:
    return args.out / "configs" / f"finetune_{task}.json"


def finetune_config(args, task: str) -> Path:
    """The task's shipped DeepSpeed config (ds_configs/finetune_TASK.json) with the benchmark's activation
    checkpointing and an expert-parallel size that divides the ranks of a run, written under --out/configs."""
    config = json.loads((REPO / "ds_configs" / f"finetune_{task}.json").read_text())
    eve = config.setdefault("eve", {})
    eve["activation_checkpointing"] = args.activation_checkpointing
    eve["expert_parallel_size"] = math.gcd(eve.get("expert_parallel_size", 1), args.finetune_ranks)
    path = finetune_config_path(args, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def finetune_all(args, world: dict) -> dict:
    """{task: {condition: [summary of each seed]}}, running --jobs fine-tunings at a time (each in its own slot)."""
    for seed in args.seeds:  # what the runs share is written before they start side by side
        scratch_weights(args, seed)
    for task in args.tasks:
        finetune_config(args, task)
    runs = [(task, condition, seed) for task in args.tasks for condition, _ in conditions(args) for seed in args.seeds]
    slots = queue.SimpleQueue()
    for slot in range(args.jobs):
        slots.put(slot)

    def one(task, condition, seed):
        slot = slots.get()
        try:
            return finetune(args, world, task, condition, seed, slot)
        finally:
            slots.put(slot)

    results = {task: {condition: [None] * len(args.seeds) for condition, _ in conditions(args)} for task in args.tasks}
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    futures = {pool.submit(one, *item): item for item in runs}
    try:
        for future in concurrent.futures.as_completed(futures):
            task, condition, seed = futures[future]
            summary = future.result()
            results[task][condition][args.seeds.index(seed)] = summary
            print(f"{task} {condition} seed {seed}: {METRICS[task][0]} {summary[METRICS[task][0]]:.2f}", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def pretraining_options(args):
    """The options of the benchmark's pre-training (launch/pretrain.py's defaults and --pretrain-args)."""
    from eve_ds.pretrain import parse_args as pretrain_options

    return pretrain_options(["--deepspeed_config", args.pretrain_config, *args.pretrain_args.split()])


def grounding_probe(args):
    """benchmarks/grounding.py on every point and on the random weights of the first seed, with the pre-training's
    share of masked patches (the masks it was trained to read past): {condition: {kind: {"own", "other", "tokens"}}};
    None where the pre-training has no masked signal modeling heads to probe with."""
    from benchmarks.grounding import grounding

    path = args.out / "grounding.json"
    if path.is_file():
        return json.loads(path.read_text())
    options = pretraining_options(args)
    if "msm" not in options.objectives:
        return None
    ratio = options.image_mask_ratio
    rows = {condition: grounding(scratch_weights(args, args.seeds[0]) if condition == SCRATCH else
                                 args.out / "weights" / condition, args.world_seed, image_mask_ratio=ratio)
            for condition, _ in conditions(args)}
    rows = {"image_mask_ratio": ratio, "rows": rows}
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


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


def probe_table(probe, world_seed: int) -> str:
    from benchmarks.grounding import table as grounding_table, unbound_level

    if probe is None:
        return "No grounding probe: the pre-training has no masked signal modeling heads (--objectives without msm)."
    return (f"Masked words of new scenes, top-1 % with the scene's own image / another scene's "
            f"(benchmarks/grounding.py, {probe['image_mask_ratio']:.0%} of the image masked):\n\n"
            + grounding_table(probe["rows"], unbound_level(world_seed)))


def table(args, results: dict, phases: dict, world: dict, also: dict) -> str:
    lines = [f"Transfer on world seed {args.world_seed}, {args.preset}, {args.pretrain_steps} pre-training steps, "
             f"{len(args.seeds)} fine-tuning seeds ({', '.join(map(str, args.seeds))}), "
             f"epochs {', '.join(f'{task} {n}' for task, n in args.finetune_epochs.items())} at batch "
             f"{args.finetune_batch}", "",
             "| task (metric) | blind | " + " | ".join(name for name, _ in conditions(args)) + " | longest "
             "pre-training over scratch (in the larger std) |", "|---" * (len(conditions(args)) + 3) + "|"]
    for task in args.tasks:
        lines.append(table_row(f"{task} ({METRICS[task][1]})", blind_level(world, task), results[task], args))
        if task in also:
            lines.append(table_row(f"{task} ({ALSO_SHOWN[task][1]})", blind_level(world, task), also[task], args))
    lines += ["", "Wall time per phase: " + ", ".join(f"{name} {seconds / 60:.1f} min"
                                                      for name, seconds in phases.items())]
    return "\n".join(lines)


def table_row(name: str, blind, by_condition: dict, args) -> str:
    cells, means = [], []
    for condition, _ in conditions(args):
        values = by_condition[condition]
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{mean:.1f} ± {std:.1f}")
        means.append((mean, std))
    (scratch_mean, scratch_std), (best_mean, best_std) = means[0], means[-1]
    spread = max(scratch_std, best_std)
    gain = f"{best_mean - scratch_mean:+.1f} ({(best_mean - scratch_mean) / spread:+.1f} σ)" if spread else \
        f"{best_mean - scratch_mean:+.1f}"
    return f"| {name} | {'-' if blind is None else f'{blind:.1f}'} | " + " | ".join(cells) + f" | {gain} |"


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
    probe = timed(phases, "grounding probe", lambda: grounding_probe(args))
    keep_phases()
    summaries = timed(phases, "fine-tuning", lambda: finetune_all(args, world))
    keep_phases()
    results = {task: {condition: [summary[METRICS[task][0]] for summary in runs] for condition, runs in by_task.items()}
               for task, by_task in summaries.items()}
    also = {task: {condition: [summary[ALSO_SHOWN[task][0]] for summary in runs] for condition, runs in by_task.items()}
            for task, by_task in summaries.items() if task in ALSO_SHOWN}
    walls = {task: [summary["wall_s"] for runs in by_task.values() for summary in runs if summary["wall_s"]]
             for task, by_task in summaries.items()}
    phases.update({f"{task} run (mean)": statistics.mean(times) for task, times in walls.items() if times})
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results, "also": also, "grounding": probe,
                                                       "phases_s": phases}, indent=2) + "\n")
    text = table(args, results, phases, world, also) + "\n\n" + probe_table(probe, args.world_seed)
    (args.out / "transfer.md").write_text(text + "\n")
    plot(args, results, args.out / "transfer.png", world)
    print(text)
    print(f"wrote {args.out / 'transfer.md'} and {args.out / 'transfer.png'}")


if __name__ == "__main__":
    main()
