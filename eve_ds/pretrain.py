"""Masked-signal-modeling pre-training of EVE with DeepSpeed: data, forward, backward, step, log, checkpoint.

Run through the DeepSpeed launcher (see README):
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/zero3.json
"""
import argparse
import json
import logging
import os
from collections import Counter
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from eve_ds.checkpoint.consolidate import model_config_in, saved_states
from eve_ds.checkpoint.data_position import read_data_position, write_data_position
from eve_ds.checkpoint.pretrained import PRETRAINING, CheckpointError, HeldModel, held_model, load_weights
from eve_ds.checkpoint.training import RunCheckpoints, check_run_folder, run_layout
from eve_ds.checkpoint.universal import load_universal, restore_optimizer_state
from eve_ds.cluster import StopRequest, ignore_stop_signals
from eve_ds.config import PRESETS, EVEConfig, preset
from eve_ds.data import MaskedSamples, PretrainingStream, StreamPosition, TextTokenizer, open_source
from eve_ds.data.sources import check_source_exists, split_modality
from eve_ds.data.stream import REASONS, validation_batches
from eve_ds.data.tokenizer import role_and_token
from eve_ds.engine import (all_gather_objects, build_model, freeze, initialize, load_deepspeed_config, on_gpu,
                           trained_names, zero_stage)
from eve_ds.errors import ArgumentParser
from eve_ds.flops import H100_BF16_DENSE_TFLOPS, batch_training_flops
from eve_ds.model.moe import ExpertPlacement
from eve_ds.objectives import MaskingConfig, PretrainingModel, describe_objectives, loss_names, parse_objectives
from eve_ds.objectives.pretraining import MLM_MASK_RATIO, check_modalities
from eve_ds.params import parameter_counts
from eve_ds.run_start import check_init_from, initialise_from, resumed_settings
from eve_ds.trainer import (Job, Loop, RunLog, distributed_env, on_rank_zero, run_folder_held, run_summary,
                            start_distributed)
from eve_ds.validation import reconstruction_picture, validate

logger = logging.getLogger("eve_ds.pretrain")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data/shapes/shards/{00000..00003}.tar"


def parse_args(argv=None):
    parser = ArgumentParser(description="Pre-train EVE (by masked signal modeling, or other --objectives) with "
                                        "DeepSpeed.")
    parser.add_argument("--model", default="eve-tiny", help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--model-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="changes a key of the preset's config (repeatable), e.g. vl_ffn_layers=2,3 "
                             "moe_layers= or modality_aware_routing=false")
    parser.add_argument("--data", nargs="+", default=[str(DEFAULT_DATA)], metavar="SOURCE",
                        help="tar shards (a brace pattern such as 'cc3m/{00000..00331}.tar', a folder or a file, "
                             "counted by the index.json beside them) or a JSONL manifest; several are mixed by "
                             "--data-weights")
    parser.add_argument("--data-weights", nargs="+", type=float, default=None, metavar="WEIGHT",
                        help="one weight per --data source: the share of samples drawn from it (default: equal)")
    parser.add_argument("--val-data", default=None, metavar="SOURCE",
                        help="shards or manifest evaluated every --val-interval steps with fixed masks")
    parser.add_argument("--val-interval", type=int, default=100)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="the authors' augmentation: random resized crop (50-100%% of the area) and a horizontal "
                             "flip unless a word of the caption begins with left or right")
    parser.add_argument("--normalize-text", action=argparse.BooleanOptionalAction, default=False,
                        help="normalise captions as the authors' fine-tuning does (lower case, punctuation removed, "
                             "30 words); a caption left without a word is skipped")
    parser.add_argument("--shuffle-block", type=int, default=1000,
                        help="each reader shuffles its samples in blocks of this many (memory: one block of raw "
                             "samples per loader worker)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: the one beside the first data source, or in the folder above)")
    parser.add_argument("--special-token", action="append", default=[], type=role_and_token, metavar="ROLE=TOKEN",
                        help="names the tokenizer's token for a role (cls, sep, pad, mask, unk) where its usual "
                             "names do not find it; repeatable")
    parser.add_argument("--routing-embedding-to-experts", action=argparse.BooleanOptionalAction, default=None,
                        help="add the MoE routing embedding to the experts' input too, as the authors' released "
                             "model does (default: the preset's, on); --no-routing-embedding-to-experts adds it "
                             "to the router's input only")
    parser.add_argument("--position-init", choices=("sincos", "normal"), default=None,
                        help="how the learned position embeddings start: sine-cosine tables (the default) or a "
                             "normal of the init std (BEiT's)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<model>)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to train in all")
    parser.add_argument("--save-interval", type=int, default=100, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="newest complete checkpoints kept on disk (0: all)")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--max-bad-steps", type=int, default=10,
                        help="stop as diverged after this many steps in a row that DeepSpeed skipped or whose loss "
                             "or gradient norm is not finite (0: never)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's newest complete checkpoint (an error if it has none)")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from the newest complete checkpoint if the run folder has one, else start: "
                             "the same command starts a run and resumes it after a requeue")
    parser.add_argument("--resume-from", default=None,
                        help="continue from a universal checkpoint folder (tools/reshard.py), at any world size, "
                             "expert-parallel size and ZeRO stage")
    parser.add_argument("--init-from", default=None, metavar="WEIGHTS",
                        help="start (at step 0, with a new optimizer) from a consolidated folder (tools/consolidate.py) "
                             "of a run of the same model: its encoder, and the heads of this run's objectives that it "
                             "holds (a stage of VLMo's recipe starts from the stage before; a checkpoint to resume "
                             "from wins)")
    parser.add_argument("--train-only", default=None, metavar="PATTERN,...",
                        help="train only the parameters whose names (as consolidated) match one of these shell "
                             "patterns, e.g. 'encoder.blocks.*.ffn.text*,text_head.*'; the others stay as they are")
    parser.add_argument("--expert-parallel-size", type=int, default=None,
                        help="replaces the DeepSpeed config's eve.expert_parallel_size (e.g. 1 on one GPU)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="a device's peak TFLOP/s, for the logged MFU (default: H100, dense bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2, help="data loader processes per rank")
    parser.add_argument("--objectives", default="msm", metavar="NAME[=WEIGHT],...",
                        help="the pre-training losses and their weights: msm (masked signal modeling, EVE's), itc "
                             "(image-text contrastive), itm (image-text matching with hard negatives; needs itc), mlm "
                             "(masked language modeling at 15%%); VLMo's recipe is itc,itm,mlm")
    parser.add_argument("--image-mask-ratio", type=float, default=MaskingConfig.image_mask_ratio)
    parser.add_argument("--text-mask-ratio", type=float, default=MaskingConfig.text_mask_ratio)
    parser.add_argument("--image-masking", choices=("random", "block"), default=MaskingConfig.image_masking)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if (args.resume or args.auto_resume) and args.resume_from:
        parser.error("--resume/--auto-resume and --resume-from exclude each other")
    if args.init_from and args.resume_from:
        parser.error("--init-from and --resume-from exclude each other")
    args.train_only = [pattern.strip() for pattern in args.train_only.split(",") if pattern.strip()] \
        if args.train_only is not None else []
    if args.deepspeed_config is None:
        parser.error("--deepspeed_config is required (e.g. ds_configs/zero3.json)")
    at_least = {"steps": 1, "save_interval": 1, "log_interval": 1, "val_interval": 1, "shuffle_block": 1,
                "keep_checkpoints": 0, "num_workers": 0, "max_bad_steps": 0, "expert_parallel_size": 1}
    for name, least in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be {'positive' if least else 'zero or more'}, "
                         f"got {getattr(args, name)}")
    for name in ("image_mask_ratio", "text_mask_ratio"):
        if not 0 < getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must lie between 0 and 1, got {getattr(args, name)}")
    args.objectives = parse_objectives(args.objectives)  # one sentence (a UsageError) for a bad list
    sources = args.data + [args.val_data] * bool(args.val_data)
    check_modalities(args.objectives, {split_modality(spec)[0] for spec in sources})
    if args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    for spec in sources:
        check_source_exists(spec)
    args.out = Path(args.out or REPO_ROOT / "runs" / args.model)
    args.data_weights = args.data_weights or [1.0] * len(args.data)
    if len(args.data_weights) != len(args.data):
        parser.error(f"--data-weights: {len(args.data_weights)} weights for {len(args.data)} sources")
    if any(not weight > 0 for weight in args.data_weights):
        parser.error(f"--data-weights must be positive, got {' '.join(map(str, args.data_weights))}")
    args.tokenizer = Path(args.tokenizer or default_tokenizer(args.data[0]))
    args.special_token = dict(args.special_token)
    return args


def default_tokenizer(source: str) -> Path:
    folder = Path(split_modality(source)[1].removeprefix("file://")).parent
    beside = folder / "tokenizer.json"
    return beside if beside.is_file() or not (folder.parent / "tokenizer.json").is_file() else folder.parent / "tokenizer.json"


def describe_ffn_layers(config: EVEConfig) -> str:
    parts = []
    if config.moe_layers:
        routing = ("plain routing" if not config.modality_aware_routing else "routing embedding to the " +
                   ("router and experts" if config.routing_embedding_to_experts else "router only"))
        parts.append(f"{config.num_experts} experts in layers {list(config.moe_layers)}, {routing}")
    if config.vl_ffn_layers:
        parts.append(f"VL-FFN of width {config.vl_ffn_width} in layers {list(config.vl_ffn_layers)}")
    return "; ".join(parts) or "multiway FFNs only"


def describe_skipped(problems: Counter) -> str:
    total = sum(problems.values())
    return f"{total} ({', '.join(f'{reason} {count}' for reason, count in problems.items() if count)})" if total else "0"


class PretrainingJob(Job):
    """Pre-training over the data stream by ``--objectives``: counts tokens, FLOPs and skipped samples, validates
    every ``--val-interval`` steps, and saves the readers' position with every checkpoint."""

    def __init__(self, engine, config, position: StreamPosition, args, client_state: dict, validation=None,
                 validation_samples=None):
        self.engine, self.config, self.position, self.args = engine, config, position, args
        self.base_state, self.validation, self.validation_samples = client_state, validation, validation_samples
        self.world_size = dist.get_world_size()
        self.objectives = args.objectives
        self.loss_names = loss_names(args.objectives)

    def inputs(self, batch: dict) -> tuple:
        skipped = self.position.consume(batch)
        config = self.config
        size = len(batch["images"] if "images" in batch else batch["text_ids"])
        tokens = size * config.num_image_tokens if "images" in batch else 0
        if "text_padding_mask" in batch:
            tokens = tokens + batch["text_padding_mask"].sum()
        counts = {"samples": size, "tokens": tokens,
                  "flops": batch_training_flops(config, batch, self.objectives), **skipped}
        return batch, counts

    def step_record(self, step: int, counts: dict, step_time: float) -> dict:
        self.position.problems.update({reason: int(counts[reason]) for reason in REASONS if counts[reason]})
        tflops_per_rank = counts["flops"] / step_time / self.world_size / 1e12
        record = {"tokens_per_s": counts["tokens"] / step_time, "tflops_per_rank": tflops_per_rank,
                  "mfu": tflops_per_rank / self.args.peak_tflops,
                  "skipped": {reason: self.position.problems[reason] for reason in REASONS}}
        if self.validation is not None and (step % self.args.val_interval == 0 or step == self.args.steps):
            batches = validation_batches(self.validation, self.validation_samples, dist.get_rank(), self.world_size,
                                         self.position.stream.micro_batch, self.args.seed, Counter())
            first_batch = [] if dist.get_rank() == 0 and self.validation.modality == "pairs" else None
            validation = validate(self.engine, batches, self.config.patch_size, self.objectives, first_batch)
            record.update(validation)
            if dist.get_rank() == 0:
                logger.info("step %d validation: %s", step, "  ".join(
                    f"{name.removeprefix('val_').removesuffix('_loss')} {value:.4f}" for name, value in validation.items()))
                picture = reconstruction_picture(*first_batch[0], self.config, self.validation_samples.tokenizer) \
                    if first_batch and "msm" in self.objectives else None
                if picture is not None:
                    record["images"] = {"val/reconstruction": picture}  # RunLog writes it to tensorboard
        return record

    def console(self, record: dict) -> str:
        return (f"{record['tokens_per_s']:.0f} tokens/s  {record['tflops_per_rank']:.3g} TFLOP/s per rank  "
                f"MFU {100 * record['mfu']:.2g}%  skipped {describe_skipped(self.position.problems)}  ")

    def client_state(self) -> dict:
        """Called by every rank before a save: the readers' position is gathered here, for ``write_files``."""
        self.saved_position = self.position.saved(all_gather_objects)
        return self.base_state

    def write_files(self, folder):
        self.tokenizer.save(folder)
        write_data_position(folder, self.saved_position)


def main(argv=None, stop: StopRequest = None):
    """Everything that can be checked is checked before torch.distributed starts (one sentence, exit 2: see
    launch/pretrain.py); then the run folder is locked for this job."""
    stop = stop or StopRequest()
    args = parse_args(argv)
    rank, world_size = distributed_env()
    tokenizer = TextTokenizer(args.tokenizer, preset(args.model).max_text_len, args.special_token)
    config = preset(args.model).replace(vocab_size=tokenizer.vocab_size).with_settings(args.model_setting)
    if args.routing_embedding_to_experts is not None:
        config = config.replace(routing_embedding_to_experts=args.routing_embedding_to_experts)
    if args.position_init is not None:
        config = config.replace(position_init=args.position_init)
    masking = MaskingConfig(args.image_mask_ratio, args.image_masking, args.text_mask_ratio)
    ds_config, parallelism = load_deepspeed_config(args.deepspeed_config, world_size, config.routed_experts, args.steps,
                                                   expert_parallel_size=args.expert_parallel_size)
    ep_size = parallelism.expert_parallel_size
    layout = run_layout(world_size, ep_size, ds_config)
    check_run_folder(args.out / "checkpoints", args.resume, args.auto_resume, args.resume_from, layout)
    if args.train_only:
        with torch.device("meta"):  # the whole model's parameter names, at no cost
            names = [name for name, _ in PretrainingModel(config, objectives=args.objectives).named_parameters()]
        args.trained = trained_names(names, args.train_only, args.model)
    if args.init_from:
        check_init_from(args.init_from, config)

    start_distributed()
    with run_folder_held(args.out):
        return train(args, stop, tokenizer, config, masking, ds_config, parallelism, layout)


def train(args, stop, tokenizer, config, masking, ds_config, parallelism, layout):
    rank, world_size, ep_size = dist.get_rank(), dist.get_world_size(), parallelism.expert_parallel_size
    is_main = rank == 0
    checkpoints = RunCheckpoints(args.out / "checkpoints", args.keep_checkpoints, layout,
                                 parameter_counts(config).total)
    universal = load_universal(args.resume_from) if args.resume_from else None
    held = held_model(args.resume_from) if universal is not None else None
    if held is not None and held.task != PRETRAINING:
        raise CheckpointError(f"{args.resume_from} holds {held.describe()}, not a pre-training run's: pre-training "
                              "resumes only from its own checkpoints")
    resume_tag = checkpoints.resume_point(args.resume, args.auto_resume)
    if universal is not None or resume_tag is not None:
        if universal is not None:
            source, saved, saved_state = args.resume_from, universal.model_config, universal.client_state
        else:  # the checkpoint's first model-states file, read once for its config and the model it holds
            saved_state, states_path = saved_states(resume_tag)
            source, saved, held = resume_tag, model_config_in(saved_state, states_path), \
                HeldModel.of_training_state(saved_state)
        config, args.objectives = resumed_settings(config, args.objectives, args.train_only, tokenizer, saved, held,
                                                   saved_state, source)
    micro_batch, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]

    # Rank 0 opens each source (counting shards that have no index, scanning a manifest) and hands it to the others.
    sources = on_rank_zero(lambda: [open_source(spec, index_cache=args.out) for spec in args.data])
    for source, weight in zip(sources, args.data_weights):
        logger.info("data: %s, %s, weight %g", source.name, source.describe(), weight)
    stream = PretrainingStream(sources, args.data_weights,
                               MaskedSamples(tokenizer, config.image_size, config.patch_size, masking, args.augment,
                                             args.normalize_text, args.objectives, MLM_MASK_RATIO),
                               micro_batch, rank, world_size, args.num_workers, args.seed, args.shuffle_block)
    position = StreamPosition(stream)
    validation = on_rank_zero(lambda: open_source(args.val_data, index_cache=args.out)) if args.val_data else None
    validation_samples = MaskedSamples(tokenizer, config.image_size, config.patch_size, masking, augment=False,
                                       normalize_text=args.normalize_text, objectives=args.objectives,
                                       mlm_mask_ratio=MLM_MASK_RATIO)

    placement = ExpertPlacement.of_global_rank(rank, config.num_experts, ep_size)
    torch.manual_seed(args.seed)
    model = build_model(lambda: PretrainingModel(config, placement, args.objectives), ds_config)
    if universal is not None:
        load_weights(model, universal.weights.renamed(placement.global_names(model)), args.resume_from)
    elif args.init_from and resume_tag is None:
        initialise_from(model, placement, args.init_from)
    if args.train_only:
        frozen = freeze(model, lambda name: placement.global_name(name) not in args.trained)
        logger.info("--train-only %s: %.2fM parameters trained, %.2fM frozen", ",".join(args.train_only),
                    (parameter_counts(config, objectives=args.objectives).total - frozen) / 1e6, frozen / 1e6)
    model.encoder.activation_checkpointing = parallelism.activation_checkpointing
    counts = parameter_counts(config, objectives=args.objectives)
    logger.info("model %s: %.2fM parameters in all, %.2fM activated per token; %s; ZeRO stage %d, expert-parallel "
                "size %d, activation checkpointing %s; objectives %s", args.model, counts.total / 1e6,
                counts.activated / 1e6, describe_ffn_layers(config), zero_stage(ds_config), ep_size,
                "on" if parallelism.activation_checkpointing else "off", describe_objectives(args.objectives))
    engine, _ = initialize(model, ds_config, placement)

    start_step, saved_position = 0, None
    if resume_tag is not None:
        path, saved_state = engine.load_checkpoint(str(checkpoints.dir), tag=resume_tag.name)
        start_step, saved_position = saved_state["step"], read_data_position(resume_tag, saved_state)
        logger.info("resumed from %s at step %d", path, start_step)
    elif universal is not None:
        restore_optimizer_state(engine, universal, placement.global_name)
        start_step, saved_position = universal.step, universal.client_state.get("data")
        logger.info("resumed from universal checkpoint %s at step %d", args.resume_from, start_step)
        del universal  # unmaps its files, whose pages would count in this rank's resident memory for the whole run
    if start_step and saved_position is not None:
        position.restore(saved_position)
        if saved_position["layout"]["sources"] != stream.describe()["sources"]:
            logger.warning("the checkpoint's data position is for other data sources (%s, now %s): the epochs under "
                           "way go on by position over the data as it is now, so some of their samples may repeat "
                           "or be skipped", saved_position["layout"]["sources"], stream.describe()["sources"])
        elif saved_position["layout"] != stream.describe():
            logger.warning("the checkpoint's data position is for another layout of readers (%s, now %s): each "
                           "unfinished slice of the old readers is finished by a new one, then the new layout "
                           "takes over; no sample is repeated or skipped", saved_position["layout"],
                           stream.describe())
    elif start_step:
        logger.warning("the checkpoint has no data position (written before eve-ds saved one): the data "
                       "stream starts from its beginning")
    if is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    client_state = {"model_config": config.to_dict(), "task": PRETRAINING, "masking": masking.__dict__,
                    "seed": args.seed, "head_options": {"objectives": args.objectives}, "train_only": args.train_only}
    job = PretrainingJob(engine, config, position, args, client_state, validation, validation_samples)
    job.tokenizer = tokenizer
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                                               worker_init_fn=ignore_stop_signals, pin_memory=on_gpu()))
    loop = Loop(engine, job, batches, checkpoints, RunLog(args.out, is_main, start_step), args.steps, accumulation,
                config.moe_layers, args.seed, args.save_interval, args.log_interval, stop, "pre-training",
                args.max_bad_steps)
    step_times = loop.run(start_step)
    summary = run_summary(step_times, engine.device, steps=args.steps, world_size=world_size,
                          expert_parallel_size=ep_size, parameters=counts.total, activated_parameters=counts.activated,
                          skipped=dict(position.problems))
    if is_main:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("done: %s", json.dumps(summary))
    dist.barrier()
    return summary
