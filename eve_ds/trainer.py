"""The training loop that pre-training and fine-tuning share: step (with gradient accumulation), log, checkpoint,
resume and stop on a signal. A job supplies what differs through a small interface (``Job``).
"""
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eve_ds.checkpoint.training import RunCheckpoints
from eve_ds.cluster import EXIT_REQUEUE, StopRequest, set_distributed_env_from_slurm
from eve_ds.engine import init_distributed
from eve_ds.model.moe import TEXT, VISION

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """Dropout, drop path and the gate's sampled second expert draw from the global RNG, reseeded for
    every micro-step from (seed, step, micro-step, rank): a resumed run needs no saved RNG state."""
    return ((seed * 1_000_003 + step) * 1_009 + micro_step) * 10_007 + rank


def all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(values, op=op)
    return values


def start_distributed() -> tuple:
    """Logging, the ranks' variables under srun, torch.distributed; returns (rank, world size). Only rank 0 logs
    below warnings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if set_distributed_env_from_slurm():
        logger.info("srun task %s of %s: master %s:%s", os.environ["RANK"], os.environ["WORLD_SIZE"],
                    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    init_distributed()
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return dist.get_rank(), dist.get_world_size()


def to_device(batch: dict, engine) -> dict:
    """A batch of tensors on the engine's device, in their own dtypes: the model casts the images it embeds to
    its weights' dtype, and targets (soft VQA scores, pixels) stay fp32 under bf16."""
    return {key: value.to(engine.device, non_blocking=True) for key, value in batch.items()}


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # ru_maxrss is in KiB on Linux


class RunLog:
    """Rank 0's outputs: console lines, tensorboard scalars and metrics.jsonl (one object per step)."""

    def __init__(self, out: Path, active: bool, resume_step: int):
        self.active = active
        if not active:
            return
        self.metrics_path = out / "metrics.jsonl"
        if resume_step and self.metrics_path.exists():  # drop steps after the checkpoint: they are redone
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if json.loads(line)["step"] <= resume_step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        self.metrics = self.metrics_path.open("a")
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict):
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        for reason, count in record.get("skipped", {}).items():
            self.writer.add_scalar(f"skipped/{reason}", count, record["step"])
        for layer, load in record.get("expert_load", {}).items():
            self.writer.add_image(f"expert_load/{layer}", expert_load_picture(load), record["step"])

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
    saved with every checkpoint."""
    loss_names = ("loss", )

    def inputs(self, batch: dict) -> tuple:
        raise NotImplementedError

    def step_record(self, step: int, counts: dict, step_time: float) -> dict:
        return {}

    def console(self, record: dict) -> str:
        return ""

    def client_state(self) -> dict:
        return {}


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

    def run(self, start_step: int) -> list:
        """Trains from ``start_step`` to ``steps``; returns the step times. On an agreed stop signal it saves a
        checkpoint and exits with EXIT_REQUEUE."""
        engine, job, device = self.engine, self.job, self.engine.device
        rank, world_size = dist.get_rank(), dist.get_world_size()
        is_main = rank == 0
        # The bar is for terminals; batch logs (CI, SLURM) get the periodic log lines only.
        progress = tqdm(total=self.steps, initial=start_step, disable=not (is_main and sys.stderr.isatty()),
                        desc=self.description, unit="step")
        step_times, count_names = [], None
        for step in range(start_step + 1, self.steps + 1):
            started = time.perf_counter()
            losses, counts, loads = torch.zeros(len(job.loss_names), device=device, dtype=torch.float64), None, None
            data_wait = 0.0
            for micro_step in range(self.accumulation):
                waiting = time.perf_counter()
                batch = next(self.batches)
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
                losses += torch.stack([outputs[name].detach().double() for name in job.loss_names]) / self.accumulation
                micro_loads = tuple(moe.gate.expert_load.clone() for moe in engine.module.encoder.moe_layers())
                loads = micro_loads if loads is None else tuple(a + b for a, b in zip(loads, micro_loads))
            totals = all_reduce(torch.cat([losses, counts.to(device)]))
            step_time = time.perf_counter() - started
            step_times.append(step_time)
            step_losses = (totals[:len(job.loss_names)] / world_size).tolist()
            step_counts = dict(zip(count_names, totals[len(job.loss_names):].tolist()))
            grad_norm = engine.get_global_grad_norm()
            record = {"step": step, **dict(zip(job.loss_names, step_losses)), "lr": engine.get_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "samples_per_s": step_counts["samples"] / step_time, "step_time_s": step_time,
                      "data_wait_s": data_wait, **job.step_record(step, step_counts, step_time)}
            if step % self.log_interval == 0 or step == self.steps:
                record["expert_load"] = summarize_expert_load(self.moe_layers, [all_reduce(load) for load in loads])
                if is_main:
                    losses_said = "  ".join(f"{name.removesuffix('_loss')} {value:.4f}"
                                            for name, value in zip(job.loss_names, step_losses))
                    progress.write(f"step {step}/{self.steps}  {losses_said}  lr {record['lr']:.2e}  grad_norm "
                                   f"{record['grad_norm']:.3f}  {record['samples_per_s']:.1f} samples/s  "
                                   f"{job.console(record)}{step_time:.3f} s/step, "
                                   f"{100 * data_wait / step_time:.0f}% waiting for data")
            self.run_log.write(record)
            progress.update(1)
            progress.set_postfix(loss=f"{step_losses[0]:.3f}")
            saved = step % self.save_interval == 0 or step == self.steps
            if saved:
                self.checkpoints.save(engine, step, job.client_state())
            if self.stop.agreed(device):
                if not saved:
                    self.checkpoints.save(engine, step, job.client_state())
                progress.close()
                self.run_log.close()
                logger.warning("stopped on %s after step %d with its checkpoint written; exiting %d for a requeue",
                               self.stop.signal_name or "a signal to another rank", step, EXIT_REQUEUE)
                sys.exit(EXIT_REQUEUE)
        progress.close()
        self.run_log.close()
        return step_times


def run_summary(step_times: list, device, **facts) -> dict:
    """Mean step time after the first five steps and the peak memory of the busiest rank."""
    peak = all_reduce(torch.tensor([peak_memory_mb(device)], device=device), op=dist.ReduceOp.MAX).item()
    timed = step_times[min(5, len(step_times) - 1):] if step_times else [float("nan")]
    return {**facts, "mean_step_time_s": sum(timed) / len(timed), "peak_memory_mb_per_rank": peak}
