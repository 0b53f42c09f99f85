"""The training loop that pre-training and fine-tuning share: step (with gradient accumulation), log, checkpoint,
resume and stop on a signal. A job supplies what differs through a small interface (``Job``).
"""
import json
import logging
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eve_ds.checkpoint.training import RunCheckpoints
from eve_ds.cluster import (EXIT_REQUEUE, StopRequest, StoppedWaiting, end_helper_processes,
                            set_distributed_env_from_slurm, set_single_process_env)
from eve_ds.engine import init_distributed
from eve_ds.errors import TrainingDiverged, UsageError
from eve_ds.model.moe import TEXT, VISION
from eve_ds.run_folder import RunFolderLock

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """Dropout, drop path and the gate's sampled second expert draw from the global RNG, reseeded for
    every micro-step from (seed, step, micro-step, rank): a resumed run needs no saved RNG state."""
    return ((seed * 1_000_003 + step) * 1_009 + micro_step) * 10_007 + rank


def all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(values, op=op)
    return values


def distributed_env() -> tuple:
    """Logging, and the variables torch.distributed reads: a launcher's, an srun task's, or one process of its
    own (started without either); returns (rank, world size) before anything distributed starts, so that a job
    can check its input first. Only rank 0 logs below warnings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if set_distributed_env_from_slurm():
        logger.info("srun task %s of %s: master %s:%s", os.environ["RANK"], os.environ["WORLD_SIZE"],
                    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    set_single_process_env()
    rank = int(os.environ["RANK"])
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return rank, int(os.environ["WORLD_SIZE"])


def start_distributed() -> tuple:
    """torch.distributed (after ``distributed_env``); returns (rank, world size)."""
    distributed_env()
    if not dist.is_initialized():
        init_distributed()
    return dist.get_rank(), dist.get_world_size()


def on_rank_zero(build):
    """``build()`` on rank 0 alone, its value handed to every rank (a data source opened once, not once per rank: at
    1,024 ranks that is a metadata call per shard less on every rank). A UsageError of rank 0 is raised on every
    rank, so that all stop with its sentence instead of waiting for it."""
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(build(), None)]
        except UsageError as error:
            outcome = [(None, error)]
    dist.broadcast_object_list(outcome, src=0)
    result, failure = outcome[0]
    if failure is not None:
        raise failure
    return result


@contextmanager
def run_folder_held(out: Path):
    """This job's hold on its run folder for as long as the block runs: rank 0 holds the lock, and a folder that
    another live job holds is refused on every rank."""
    lock = RunFolderLock(out)

    def acquire():  # the lock stays on rank 0: only the outcome travels
        lock.acquire()

    on_rank_zero(acquire)
    try:
        yield
    finally:
        if dist.get_rank() == 0:
            lock.release()


def to_device(batch: dict, engine) -> dict:
    """A batch of tensors on the engine's device, in their own dtypes: the model casts the images it embeds to
    its weights' dtype, and targets (soft VQA scores, pixels) stay fp32 under bf16."""
    return {key: value.to(engine.device, non_blocking=True) for key, value in batch.items()}


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # ru_maxrss is in KiB on Linux


def records_up_to(path: Path, last_step: int) -> list:
    """The lines of a metrics file that a run continuing after ``last_step`` keeps: one per step up to it (the
    newest, where an earlier resume left two), in step order. Steps after it are redone; a torn line (a crash in
    the middle of a write) is dropped with a warning."""
    kept = {}
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: line %d is torn or not a record (a crash in the middle of a write?); dropped",
                           path, number)
            continue
        if step <= last_step:
            kept[step] = line
    return [kept[step] for step in sorted(kept)]


class RunLog:
    """Rank 0's outputs: console lines, tensorboard scalars and images, and metrics.jsonl (one object per step,
    whatever crashes and resumes came before). A record's ``images`` ({tag: picture}, e.g. pre-training's
    ``val/reconstruction``) go to tensorboard only (``add_image``)."""

    def __init__(self, out: Path, active: bool, resume_step: int):
        self.active = active
        if not active:
            return
        self.metrics_path = out / "metrics.jsonl"
        kept = records_up_to(self.metrics_path, resume_step) if resume_step else []  # a fresh start keeps none
        self.metrics_path.write_text("".join(line + "\n" for line in kept))
        self.metrics = self.metrics_path.open("a")
        # Events of steps after the resume point, written by the run that died, are hidden by tensorboard.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict):
        if not self.active:
            return
        self.metrics.write(json.dumps({key: value for key, value in record.items() if key != "images"}) + "\n")
        self.metrics.flush()
        for tag, picture in record.get("images", {}).items():
            self.add_image(tag, picture, record["step"])
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                name = f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(name, value, record["step"])
        for reason, count in record.get("skipped", {}).items():
            self.writer.add_scalar(f"skipped/{reason}", count, record["step"])
        for layer, load in record.get("expert_load", {}).items():
            self.writer.add_image(f"expert_load/{layer}", expert_load_picture(load), record["step"])

    def add_image(self, tag: str, picture, step: int):
        """A picture in tensorboard under ``tag``: an [H, W, 3] uint8 array or a PIL image (RGB)."""
        if not self.active:
            return
        picture = np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture)
        if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
            raise ValueError(f"{tag}: a picture must be [H, W, 3] uint8, got {picture.dtype} {picture.shape}")
        self.writer.add_image(tag, picture, step, dataformats="HWC")

    def close(self):
        if self.active:
            self.metrics.close()
            self.writer.close()


def expert_load_picture(load: dict, cell: int = 8) -> torch.Tensor:
    """One MoE layer's load as a [1, H, W] grey picture: a row of cells per modality (vision above text), a
    column per expert, white for the most loaded; collapse or specialisation shows at a glance."""
    fractions = torch.tensor([load["vision"], load["text"]])
    picture = fractions / fractions.max().clamp(min=1e-9)
    return picture.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(0)


def summarize_expert_load(layer_indices, loads) -> dict:
    summary = {}
    for layer, load in zip(layer_indices, loads):
        fractions = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        summary[f"layer_{layer}"] = {"vision": [round(x, 4) for x in fractions[VISION].tolist()],
                                     "text": [round(x, 4) for x in fractions[TEXT].tolist()]}
    return summary


class Job:
    """What a training job adds to the loop. ``loss_names`` are outputs of the model averaged over
    micro-batches and ranks (the first is back-propagated); ``inputs`` turns a micro-batch of the job's loader
    into the model's keyword arguments plus counts summed over micro-batches and ranks (``samples`` among them);
    ``step_record`` adds the job's figures to a step's record, ``console`` says them, ``client_state`` is
    saved with every checkpoint and ``write_files(folder)`` adds files to it (on rank 0)."""
    loss_names = ("loss", )
    write_files = None

    def inputs(self, batch: dict) -> tuple:
        raise NotImplementedError

    def step_record(self, step: int, counts: dict, step_time: float) -> dict:
        return {}

    def console(self, record: dict) -> str:
        return ""

    def client_state(self) -> dict:
        return {}


def is_bad_step(skipped: bool, loss: float, grad_norm) -> bool:
    """A step whose update cannot be trusted: DeepSpeed skipped it (an overflow), or its loss or gradient norm is
    not finite (under bf16 and fp32 there is no loss scaler to skip it). ``grad_norm`` is None where the engine
    does not compute one (ZeRO stage 0), which says nothing against the step."""
    return skipped or not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))


@dataclass
class Loop:
    engine: object
    job: Job
    batches: object  # an iterator of micro-batches
    checkpoints: RunCheckpoints
    run_log: RunLog
    steps: int
    accumulation: int
    moe_layers: tuple
    seed: int = 0
    save_interval: int = 100
    log_interval: int = 10
    stop: StopRequest = field(default_factory=StopRequest)
    description: str = "training"
    max_bad_steps: int = 10  # consecutive skipped or non-finite steps before the run stops as diverged

    def run(self, start_step: int) -> list:
        """Trains from ``start_step`` to ``steps``; returns the step times. On an agreed stop signal it saves a
        checkpoint and exits with EXIT_REQUEUE (also, without a checkpoint, when the signal comes while a rank
        waits for data). After ``max_bad_steps`` bad steps in a row it raises TrainingDiverged; no checkpoint is
        written while the newest steps are bad, so the last good ones are never rotated away."""
        # The bar is for terminals; batch logs (CI, SLURM) get the periodic log lines only.
        progress = tqdm(total=self.steps, initial=start_step,
                        disable=not (dist.get_rank() == 0 and sys.stderr.isatty()), desc=self.description, unit="step")
        try:
            return self._train(start_step, progress)
        finally:  # however the run ends
            progress.close()
            self.run_log.close()

    def _train(self, start_step: int, progress) -> list:
        engine, job, device = self.engine, self.job, self.engine.device
        rank, world_size = dist.get_rank(), dist.get_world_size()
        is_main = rank == 0
        step_times, count_names, bad_steps = [], None, 0
        for step in range(start_step + 1, self.steps + 1):
            started = time.perf_counter()
            # per loss: its sum over micro-batches, and how many micro-batches computed it (a micro-batch of a
            # unimodal source computes some of them only)
            num_losses = len(job.loss_names)
            losses, counts, loads = torch.zeros(2 * num_losses, device=device, dtype=torch.float64), None, None
            data_wait, lr, skipped_before = 0.0, engine.get_lr()[0], engine.skipped_steps
            for micro_step in range(self.accumulation):
                waiting = time.perf_counter()
                try:
                    with self.stop.interruptible():
                        batch = next(self.batches)
                except StoppedWaiting:
                    self._exit_waiting(step)
                data_wait += time.perf_counter() - waiting
                inputs, micro_counts = job.inputs(batch)
                count_names = count_names or tuple(micro_counts)
                micro_counts = torch.tensor([float(micro_counts[name]) for name in count_names], dtype=torch.float64)
                counts = micro_counts if counts is None else counts + micro_counts
                inputs = to_device(inputs, engine)
                torch.manual_seed(step_seed(self.seed, step, micro_step, rank))
                outputs = engine(**inputs)
                engine.backward(outputs[job.loss_names[0]])
                engine.step()
                for place, name in enumerate(job.loss_names):
                    if name in outputs:
                        losses[place] += outputs[name].detach().double()
                        losses[num_losses + place] += 1
                micro_loads = tuple(moe.gate.expert_load.clone() for moe in engine.module.encoder.moe_layers())
                loads = micro_loads if loads is None else tuple(a + b for a, b in zip(loads, micro_loads))
            totals = all_reduce(torch.cat([losses, counts.to(device)]))
            step_time = time.perf_counter() - started
            step_times.append(step_time)
            step_losses = {name: float(totals[place] / totals[num_losses + place])
                           for place, name in enumerate(job.loss_names) if totals[num_losses + place] > 0}
            step_counts = dict(zip(count_names, totals[2 * num_losses:].tolist()))
            grad_norm = engine.get_global_grad_norm()
            record = {"step": step, **step_losses, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "step_skipped": engine.skipped_steps > skipped_before,
                      "samples_per_s": step_counts["samples"] / step_time, "step_time_s": step_time,
                      "data_wait_s": data_wait, **job.step_record(step, step_counts, step_time)}
            bad_steps = bad_steps + 1 if is_bad_step(record["step_skipped"], record["loss"], grad_norm) else 0
            if bad_steps and is_main:
                taken = "skipped" if record["step_skipped"] else "taken"
                progress.write(f"step {step}/{self.steps}: loss {record['loss']:.4g}, grad_norm "
                               f"{record['grad_norm']:.4g}, optimizer step {taken}: {bad_steps} bad step(s) in a "
                               f"row (the run stops at {self.max_bad_steps})")
            if step % self.log_interval == 0 or step == self.steps:
                record["expert_load"] = summarize_expert_load(self.moe_layers, [all_reduce(load) for load in loads])
                if is_main:
                    losses_said = "  ".join(f"{name.removesuffix('_loss')} {value:.4f}"
                                            for name, value in step_losses.items())
                    progress.write(f"step {step}/{self.steps}  {losses_said}  lr {record['lr']:.2e}  grad_norm "
                                   f"{record['grad_norm']:.3f}  {record['samples_per_s']:.1f} samples/s  "
                                   f"{job.console(record)}{step_time:.3f} s/step, "
                                   f"{100 * data_wait / step_time:.0f}% waiting for data, "
                                   f"{engine.skipped_steps} optimizer steps skipped")
            self.run_log.write(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
            if bad_steps >= self.max_bad_steps > 0:
                latest = self.checkpoints.dir / "latest"
                kept = (f"the newest checkpoint, {self.checkpoints.dir / latest.read_text().strip()}, is from "
                        f"before them" if latest.is_file() else "no checkpoint was written before them")
                raise TrainingDiverged(
                    f"the run diverged: {bad_steps} steps in a row up to step {step} were skipped or had a "
                    f"non-finite loss or gradient norm (loss {record['loss']:.4g}, grad_norm "
                    f"{record['grad_norm']:.4g}); {kept} (lower the learning rate, or raise --max-bad-steps)")
            stopping = self.stop.agreed(device)
            saved = step % self.save_interval == 0 or step == self.steps or stopping
            if saved and bad_steps:
                if is_main:
                    logger.warning("step %d not saved: its update is not trustworthy (%d bad steps in a row)",
                                   step, bad_steps)
            elif saved:
                self.checkpoints.save(engine, step, job.client_state(), job.write_files)
            if stopping:
                logger.warning("stopped on %s after step %d%s; exiting %d for a requeue",
                               self.stop.signal_name or "a signal to another rank", step,
                               "" if bad_steps else " with its checkpoint written", EXIT_REQUEUE)
                sys.exit(EXIT_REQUEUE)
        return step_times

    def _exit_waiting(self, step: int):
        logger.warning("stopped on %s while waiting for the data of step %d, which did not come within %g s: "
                       "no checkpoint written (the run resumes from its newest complete one); exiting %d for a "
                       "requeue", self.stop.signal_name, step, self.stop.grace_s, EXIT_REQUEUE)
        end_helper_processes()
        sys.exit(EXIT_REQUEUE)


def run_summary(step_times: list, device, **facts) -> dict:
    """Mean step time after the first five steps and the peak memory of the busiest rank."""
    peak = all_reduce(torch.tensor([peak_memory_mb(device)], device=device), op=dist.ReduceOp.MAX).item()
    timed = step_times[min(5, len(step_times) - 1):] if step_times else [float("nan")]
    return {**facts, "mean_step_time_s": sum(timed) / len(timed), "peak_memory_mb_per_rank": peak}
