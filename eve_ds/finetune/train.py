"""Fine-tuning EVE for VQA v2, NLVR2 or image-text retrieval with DeepSpeed, from a consolidated eve-ds
checkpoint or the authors' released weights (tools/convert_released.py), with the authors' recipes as defaults.

    deepspeed --num_gpus 2 launch/finetune.py --task vqa --pretrained runs/eve-tiny/consolidated
"""
import argparse
import json
from dataclasses import dataclass
import logging
import math
import os
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from eve_ds.checkpoint.consolidate import CheckpointError, model_config_in, saved_model_config, saved_states
from eve_ds.checkpoint.pretrained import StoredWeights, open_pretrained, pretrained_config as read_pretrained_config
from eve_ds.checkpoint.training import RunCheckpoints, check_run_folder, run_layout
from eve_ds.checkpoint.universal import set_master_weights
from eve_ds.cluster import StopRequest, ignore_stop_signals
from eve_ds.config import PRESETS, ConfigError
from eve_ds.data.tokenizer import TOKENIZER_FILE, TextTokenizer, role_and_token
from eve_ds.engine import build_model, initialize, load_deepspeed_config, on_gpu, zero_stage
from eve_ds.errors import ArgumentParser
from eve_ds.finetune.optim import lr_scheduler, param_groups
from eve_ds.finetune.recipes import recipe
from eve_ds.finetune.tasks import (MODELS, TASKS, add_data_arguments, evaluate, load_task, model_inputs,
                                   write_vqa_results)
from eve_ds.model.moe import ExpertPlacement
from eve_ds.trainer import Job, Loop, RunLog, run_folder_held, run_summary, start_distributed

logger = logging.getLogger("eve_ds.finetune")
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RECIPE_NAMES = {"vqa": "vqa", "nlvr2": "nlvr2", "retrieval": "retrieval-coco"}
SHAPES_TOKENIZER = REPO_ROOT / "data" / "shapes" / TOKENIZER_FILE


def bounded(kind, lowest, inclusive: bool = False):
    """An argparse type: a finite number of ``kind`` (int or float) above ``lowest``, or from it on when
    ``inclusive``; the parser refuses anything else in one sentence."""
    wanted = f"{'an integer' if kind is int else 'a number'} {'of at least' if inclusive else 'above'} {lowest}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < lowest or (value == lowest and not inclusive):
            raise argparse.ArgumentTypeError(f"wants {wanted}, got '{text}'")
        return value
    return parse


POSITIVE_INT, POSITIVE = bounded(int, 0), bounded(float, 0)
NON_NEGATIVE_INT, NON_NEGATIVE = bounded(int, 0, inclusive=True), bounded(float, 0, inclusive=True)


def parse_args(argv=None, evaluating: bool = False):
    parser = ArgumentParser(description="Evaluate a fine-tuned EVE checkpoint." if evaluating else
                                     "Fine-tune EVE for VQA v2, NLVR2 or image-text retrieval.")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--pretrained", required=True,
                        help="consolidated weights folder (tools/consolidate.py, tools/convert_released.py import)"
                             + (": with --run, the one the run started from, for its recipe and tokenizer; without, "
                                "the weights to evaluate, with their task head" if evaluating else
                                "; where it holds this task's model (a fine-tuning run's, the authors' fine-tuned "
                                "file), training continues from its head"))
    if evaluating:
        parser.add_argument("--run", default=None,
                            help="the fine-tuning run folder to evaluate (its newest complete checkpoint)")
        parser.add_argument("--results", default=None, help="VQA: write [{question_id, answer}] here")
    parser.add_argument("--recipe", default=None, help="the authors' recipe to start from (default: the task's; "
                        "retrieval-flickr for Flickr30K)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one that travels with the "
                        "weights in --pretrained, with its roles, else the shipped shapes tokenizer)")
    parser.add_argument("--special-token", action="append", type=role_and_token, default=[], metavar="ROLE=TOKEN",
                        help="the tokenizer's token for a role (cls, sep, pad, mask, unk) where its usual names do not "
                             "find it (over the roles saved in --pretrained); repeatable")
    parser.add_argument("--out", default=None, help="run folder (default: runs/finetune-<task>)")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="global batch (default: the recipe's)")
    parser.add_argument("--lr", type=POSITIVE, default=None, help="default: the recipe's")
    parser.add_argument("--lr-multiplier", type=POSITIVE, default=None,
                        help="for the parameters the pre-trained weights do not have (default: the recipe's)")
    parser.add_argument("--image-size", type=POSITIVE_INT, default=None, help="default: the recipe's")
    parser.add_argument("--aux-weight", type=NON_NEGATIVE, default=None, help="MoE load-balancing loss weight "
                        "(default: the recipe's; VQA 0 as the authors, else the pre-training weight)")
    parser.add_argument("--k-test", type=POSITIVE_INT, default=None,
                        help="retrieval: candidates re-ranked by the matching head")
    parser.add_argument("--eval-batch-size", type=POSITIVE_INT, default=16, help="per rank")
    parser.add_argument("--eval-before", action="store_true",
                        help="evaluate once before training too (step 0 in metrics.jsonl)")
    parser.add_argument("--eval-interval", type=POSITIVE_INT, default=None,
                        help="steps between evaluations (default: once per epoch); the last step always evaluates")
    parser.add_argument("--save-interval", type=POSITIVE_INT, default=None, help="default: once per epoch")
    parser.add_argument("--keep-checkpoints", type=NON_NEGATIVE_INT, default=1, help="0 keeps all")
    parser.add_argument("--log-interval", type=POSITIVE_INT, default=10)
    parser.add_argument("--max-bad-steps", type=NON_NEGATIVE_INT, default=10,
                        help="stop as diverged after this many skipped or non-finite steps in a row (0: never)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--auto-resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=NON_NEGATIVE_INT, default=2)
    parser.add_argument("--expert-parallel-size", type=POSITIVE_INT, default=None,
                        help="replaces the DeepSpeed config's eve.expert_parallel_size (e.g. 1 on one GPU)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    add_data_arguments(parser)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    args.deepspeed_config = args.deepspeed_config or str(REPO_ROOT / "ds_configs" / f"finetune_{args.task}.json")
    args.out = Path(args.out or REPO_ROOT / "runs" / f"finetune-{args.task}")
    args.special_token = dict(args.special_token)
    return args


def open_tokenizer(args, max_len: int) -> TextTokenizer:
    """--tokenizer where given; else the tokenizer that travels with the weights in --pretrained, with the roles saved
    beside it; else the shipped shapes tokenizer. --special-token names roles over any of them."""
    if args.tokenizer is None and (Path(args.pretrained) / TOKENIZER_FILE).is_file():
        return TextTokenizer.from_folder(args.pretrained, max_len, args.special_token)
    return TextTokenizer(args.tokenizer or SHAPES_TOKENIZER, max_len, args.special_token)


def given(value, default):
    """The command line's value where one was given, else the recipe's."""
    return default if value is None else value


def preset_name(config) -> str:
    """The preset whose size the weights have, for the recipe (eve-base where none has)."""
    return next((name for name, preset in PRESETS.items() if (preset.hidden_size, preset.num_layers) ==
                 (config.hidden_size, config.num_layers)), "eve-base")


def epoch_batches(size: int, micro_batch: int, rank: int, world_size: int, seed: int, start: int):
    """Endless micro-batches of (epoch, index) pairs: each epoch shuffles by (seed, epoch), every rank takes an
    equal strided share (the tail that does not divide is left out), beginning after ``start`` micro-batches."""
    per_rank = size // world_size // micro_batch * micro_batch
    if per_rank == 0:
        raise ConfigError(f"{size} training items give no micro-batch of {micro_batch} on each of {world_size} ranks")
    epoch, offset = divmod(start, per_rank // micro_batch)
    while True:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        mine = order[rank:per_rank * world_size:world_size]
        for first in range(offset * micro_batch, per_rank, micro_batch):
            yield [(epoch, index) for index in mine[first:first + micro_batch]]
        epoch, offset = epoch + 1, 0


class EpochItems(torch.utils.data.Dataset):
    """Items asked for as (epoch, index), so that a dataset's per-epoch randomness (VQA's flips) follows the
    epoch inside loader workers too."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class FinetuningJob(Job):
    """A task's loss, and its evaluation every ``--eval-interval`` steps (default: every epoch) and at the end."""

    def __init__(self, task, engine, args, steps_per_epoch: int, client_state: dict, k_test: int):
        self.task, self.engine, self.args = task, engine, args
        self.steps_per_epoch, self.base_state, self.k_test = steps_per_epoch, client_state, k_test
        self.loss_names = ("loss", "task_loss", "aux_loss")
        self.last_metrics = {}

    def inputs(self, batch: dict) -> tuple:
        return model_inputs(batch), {"samples": batch["text_ids"].shape[0]}

    def step_record(self, step: int, counts: dict, step_time: float) -> dict:
        if step % given(self.args.eval_interval, self.steps_per_epoch) and step != self.args.steps:
            return {"epoch": step / self.steps_per_epoch}
        return {"epoch": step / self.steps_per_epoch,
                **{f"val_{key}": value for key, value in self.evaluate(step).items()}}

    def evaluate(self, step: int) -> dict:
        metrics = evaluate(self.task, self.engine, self.args.eval_batch_size, self.k_test)
        metrics.pop("results", None)
        self.last_metrics = metrics
        if dist.get_rank() == 0:
            logger.info("step %d (epoch %.2f) %s: %s", step, step / self.steps_per_epoch, self.args.eval_split,
                        "  ".join(f"{key} {value:.2f}" for key, value in metrics.items()))
        return metrics

    def client_state(self) -> dict:
        return self.base_state


@dataclass
class Setup:
    """What training and evaluation of a task both need."""
    task: object
    recipe: object
    image_size: int
    global_batch: int
    lr: float
    multiplier: float
    aux_weight: float
    k_test: int
    config: object  # the pre-trained model's EVEConfig
    tokenizer: TextTokenizer


def start(args) -> Setup:
    """The recipe with the command line's changes, the tokenizer and the task's data (after distributed start-up)."""
    config = read_pretrained_config(args.pretrained)
    chosen = recipe(args.recipe or RECIPE_NAMES[args.task], preset_name(config))
    image_size = given(args.image_size, chosen.image_size)
    tokenizer = open_tokenizer(args, chosen.max_text_len)
    tokenizer.check_fits(config.vocab_size, args.pretrained)
    logger.info("tokenizer %s: %d tokens", tokenizer.path, tokenizer.vocab_size)
    task = load_task(args.task, args, tokenizer, image_size, args.seed, args.eval_split)
    if task.problems:
        logger.warning("data: skipped %s", dict(task.problems))
    return Setup(task, chosen, image_size, given(args.batch_size, chosen.global_batch_size), given(args.lr, chosen.lr),
                 given(args.lr_multiplier, chosen.lr_multiplier), given(args.aux_weight, chosen.aux_weight),
                 given(args.k_test, chosen.k_test or 128), config, tokenizer)


def fine_tuning_deepspeed_config(args, world_size: int, config, global_batch: int) -> tuple:
    """The DeepSpeed config and eve-ds options, without its "scheduler": the recipe's schedule
    (``optim.lr_scheduler``) replaces it, keeping the new parameters' multiplier, so its lengths do not matter."""
    ds_config, parallelism = load_deepspeed_config(args.deepspeed_config, world_size, config.routed_experts, 1,
                                                   global_batch, args.expert_parallel_size)
    if ds_config["train_batch_size"] != global_batch:
        raise ConfigError(f"{args.deepspeed_config}: micro batch {ds_config['train_micro_batch_size_per_gpu']} x "
                          f"accumulation {ds_config['gradient_accumulation_steps']} x {world_size} ranks is a global "
                          f"batch of {ds_config['train_batch_size']}, not the {global_batch} asked for (--batch-size "
                          "or the recipe); set \"train_micro_batch_size_per_gpu\": \"auto\"")
    ds_config.pop("scheduler", None)
    return ds_config, parallelism


def start_masters_from_pretrained(engine, model, weights: StoredWeights, placement):
    """A bf16 (or fp16) engine makes its fp32 master weights from its half-precision weights; the masters of what
    was loaded (the encoder, and the head where the folder held it) start from the fp32 ``weights``
    (``open_pretrained``'s) themselves instead, not from their rounding."""
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        module, view = model.stored_part(weights, placement)
        set_master_weights(engine, view, prefix="" if module is model else "encoder.")


def main(argv=None, stop: StopRequest = None):
    stop = stop or StopRequest()
    args = parse_args(argv)
    start_distributed()
    setup = start(args)
    task, chosen, pretrained_config = setup.task, setup.recipe, setup.config
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    logger.info("task %s: %d training items, %d to evaluate; recipe %s for %s: image %d, global batch %d, lr %g x%g "
                "for new parameters, %s decay after %.0f%% warmup", args.task, len(task.train),
                len(task.evaluation.captions) if args.task == "retrieval" else len(task.evaluation),
                chosen.task, chosen.model, setup.image_size, setup.global_batch, setup.lr, setup.multiplier,
                chosen.schedule, 100 * chosen.warmup_fraction)

    epochs = given(args.epochs, chosen.epochs)
    ds_config, parallelism = fine_tuning_deepspeed_config(args, world_size, pretrained_config, setup.global_batch)
    micro_batch, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    steps_per_epoch = len(task.train) // world_size // micro_batch // accumulation
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(task.train)} training items give no step of {micro_batch} x {accumulation} on "
                          f"each of {world_size} ranks")
    args.steps = epochs * steps_per_epoch
    ds_config["gradient_clipping"] = chosen.grad_clip
    ds_config.setdefault("optimizer", {"type": "AdamW"})["params"] = {
        **ds_config["optimizer"].get("params", {}), **chosen.adamw_options(), "lr": setup.lr,
        "betas": list(chosen.betas)}

    layout = run_layout(world_size, parallelism.expert_parallel_size, ds_config)
    check_run_folder(args.out / "checkpoints", args.resume, args.auto_resume, None, layout)
    with run_folder_held(args.out):
        placement = ExpertPlacement.of_global_rank(rank, pretrained_config.num_experts,
                                                   parallelism.expert_parallel_size)
        torch.manual_seed(args.seed)
        pretrained, fitted_config = open_pretrained(args.pretrained, setup.image_size, chosen.max_text_len)
        model = MODELS[args.task].from_weights(pretrained, fitted_config, placement, ds_config,
                                               aux_weight=setup.aux_weight, **task.head_options)
        model.encoder.activation_checkpointing = parallelism.activation_checkpointing
        groups = param_groups(model, setup.lr, chosen.weight_decay, setup.multiplier)
        scheduler = partial(lr_scheduler, base_lr=setup.lr, total_steps=args.steps,
                            warmup_steps=chosen.warmup_steps(args.steps), schedule=chosen.schedule)
        engine, _ = initialize(model, ds_config, placement, groups, scheduler)
        logger.info("%d epochs of %d steps; ZeRO stage %d, expert-parallel size %d", epochs, steps_per_epoch,
                    zero_stage(ds_config), parallelism.expert_parallel_size)

        checkpoints = RunCheckpoints(args.out / "checkpoints", args.keep_checkpoints, layout)
        resume_tag = checkpoints.resume_point(args.resume, args.auto_resume)
        start_step = 0
        if resume_tag is None:
            start_masters_from_pretrained(engine, model, pretrained, placement)
        else:
            saved = saved_model_config(resume_tag)
            if saved != model.config:
                raise ConfigError(f"{resume_tag} was written for another model: {model.config.differences(saved)}")
            path, saved_state = engine.load_checkpoint(str(checkpoints.dir), tag=resume_tag.name)
            start_step = saved_state["step"]
            logger.info("resumed from %s at step %d", path, start_step)
        if is_main:
            args.out.mkdir(parents=True, exist_ok=True)
        client_state = {"model_config": model.config.to_dict(), **model.held().to_dict(), "seed": args.seed,
                        "deepspeed_config": ds_config}
        job = FinetuningJob(task, engine, args, steps_per_epoch, client_state, setup.k_test)
        job.write_files = setup.tokenizer.save
        batches = iter(torch.utils.data.DataLoader(
            EpochItems(task.train), batch_sampler=epoch_batches(len(task.train), micro_batch, rank, world_size, args.seed,
                                                                start_step * accumulation),
            num_workers=args.num_workers, worker_init_fn=ignore_stop_signals, pin_memory=on_gpu()))
        run_log = RunLog(args.out, is_main, start_step)
        if args.eval_before and start_step == 0:
            run_log.write({"step": 0, **{f"val_{key}": value for key, value in job.evaluate(0).items()}})
        loop = Loop(engine, job, batches, checkpoints, run_log, args.steps, accumulation,
                    model.config.moe_layers, args.seed, given(args.save_interval, steps_per_epoch), args.log_interval, stop,
                    f"fine-tuning {args.task}", args.max_bad_steps)
        step_times = loop.run(start_step)
        summary = run_summary(step_times, engine.device, task=args.task, steps=args.steps, epochs=epochs,
                              world_size=world_size, **{f"val_{key}": value for key, value in job.last_metrics.items()})
        if is_main:
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            logger.info("done: %s", json.dumps(summary))
        dist.barrier()
        return summary


def trained_head_options(states: dict, task: str, asked: dict, source) -> dict:
    """The head a run trained with, from its checkpoint (``TaskModel.fitted_head_options``; the command line's where
    the checkpoint has none). NLVR2 runs saved before the head became a choice trained the MLP head."""
    saved = states.get("head_options")
    if saved is None:
        return asked
    return MODELS[task].fitted_head_options({**({"head": "mlp"} if task == "nlvr2" else {}), **saved}, asked, source)


def evaluate_run(argv=None) -> dict:
    """tools/evaluate.py: a fine-tuned model on a split, from the newest complete checkpoint of a fine-tuning run
    (--run) or from a weights folder that holds the task's head (--pretrained alone); prints the metrics in the
    paper's layout and writes VQA's results file."""
    args = parse_args(argv, evaluating=True)
    start_distributed()
    engine, setup = run_engine(args) if args.run else weights_engine(args)
    metrics = evaluate(setup.task, engine, args.eval_batch_size, setup.k_test)
    results = metrics.pop("results", None)
    if dist.get_rank() == 0:
        if results is not None and args.results:
            write_vqa_results(args.results, results)
            logger.info("wrote %d answers to %s", len(results), args.results)
        print(paper_layout(args.task, metrics, args.eval_split))
    dist.barrier()
    return metrics


def evaluation_deepspeed_config(args, config, setup) -> tuple:
    ds_config, parallelism = load_deepspeed_config(args.deepspeed_config, dist.get_world_size(), config.num_experts, 1,
                                                   setup.global_batch, args.expert_parallel_size)
    ds_config.pop("scheduler", None)
    placement = ExpertPlacement.of_global_rank(dist.get_rank(), config.num_experts, parallelism.expert_parallel_size)
    return ds_config, placement


def run_engine(args) -> tuple:
    """(engine, Setup) of a fine-tuning run's newest complete checkpoint, at the run's layout of ranks (its
    expert-parallel size) and under its ZeRO settings."""
    checkpoints = RunCheckpoints(Path(args.run) / "checkpoints", 0)
    tag = checkpoints.newest_verified()
    if tag is None:
        raise CheckpointError(f"{checkpoints.dir}: no complete checkpoint (--run names the fine-tuning run's folder)")
    states, states_path = saved_states(tag)
    config = model_config_in(states, states_path)
    args.image_size = config.image_size  # the resolution it trained at
    setup = start(args)
    ds_config, placement = evaluation_deepspeed_config(args, config, setup)
    # The checkpoint's layout follows the ZeRO stage it was trained under: evaluate under the run's ZeRO settings.
    trained_under = states.get("deepspeed_config", {}).get("zero_optimization")
    if trained_under is not None and trained_under != ds_config.get("zero_optimization"):
        logger.info("the run trained under ZeRO stage %d: evaluating under its ZeRO settings",
                    trained_under.get("stage", 0))
        ds_config["zero_optimization"] = trained_under
    head_options = trained_head_options(states, args.task, setup.task.head_options, tag)
    model = build_model(lambda: MODELS[args.task](config, placement, **head_options), ds_config)
    # ZeRO-3 keeps the weights in the optimizer's flat partitions, one per parameter group (the training groups),
    # and reads them with the optimizer's state: DeepSpeed's reader of the weights alone knows no partitioned experts.
    groups = param_groups(model, setup.lr, setup.recipe.weight_decay, setup.multiplier)
    engine, _ = initialize(model, ds_config, placement, groups)
    engine.load_checkpoint(str(checkpoints.dir), tag=tag.name, load_optimizer_states=zero_stage(ds_config) == 3,
                           load_lr_scheduler_states=False, load_module_strict=True)
    return engine, setup


def weights_engine(args) -> tuple:
    """(engine, Setup) of a weights folder that holds the task's model with its head (a consolidated fine-tuning run,
    an imported fine-tuned file), at the resolution it holds."""
    config = read_pretrained_config(args.pretrained)
    args.image_size = config.image_size
    setup = start(args)
    ds_config, placement = evaluation_deepspeed_config(args, config, setup)
    weights, fitted_config = open_pretrained(args.pretrained, setup.image_size, setup.recipe.max_text_len)
    model = MODELS[args.task].from_weights(weights, fitted_config, placement, ds_config, require_head=True,
                                           **setup.task.head_options)
    groups = param_groups(model, setup.lr, setup.recipe.weight_decay, setup.multiplier)
    engine, _ = initialize(model, ds_config, placement, groups)
    return engine, setup


def paper_layout(task: str, metrics: dict, split: str) -> str:
    if task == "retrieval":
        lines = [f"retrieval ({split})   text retrieval R@1 R@5 R@10   image retrieval R@1 R@5 R@10   mean"]
        for name, prefix in (("dual encoder", "itc_"), ("re-ranked", "")):
            said = [f"{metrics[f'{prefix}tr_r@{k}']:5.1f}" for k in (1, 5, 10)] + \
                   [f"{metrics[f'{prefix}ir_r@{k}']:5.1f}" for k in (1, 5, 10)]
            lines.append(f"{name:>21}   {' '.join(said[:3])}              {' '.join(said[3:])}              "
                         f"{metrics[f'{prefix}r_mean']:5.1f}")
        return "\n".join(lines)
    name, key = ("VQA accuracy", "vqa_accuracy") if task == "vqa" else ("NLVR2 accuracy", "accuracy")
    if key not in metrics:
        return f"{name}: no answers in this split (results file written for the evaluation server)"
    return f"{name} ({split}): {metrics[key]:.2f}"
