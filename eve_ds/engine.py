"""DeepSpeed glue: config loading and validation, optimizer parameter groups, engine construction.

The model knows nothing of DeepSpeed launch details; everything distributed is applied from here.
"""
import atexit
import ctypes
import fnmatch
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from eve_ds.config import ConfigError
from eve_ds.errors import UsageError
from eve_ds.model.moe import ExpertPlacement, use_engine_managed_moe

# Our own section of the DeepSpeed JSON; it is removed before the rest goes to DeepSpeed.
EVE_SECTION = "eve"


@dataclass(frozen=True)
class ParallelismOptions:
    """The ``"eve"`` section: what eve-ds applies itself, beside DeepSpeed's own keys."""
    expert_parallel_size: int = 1
    activation_checkpointing: bool = False  # recompute each Transformer block in the backward pass
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


# glibc's mallopt parameter for the size from which allocations are mmapped (and unmapped when freed).
M_MMAP_THRESHOLD = -3


def return_freed_memory_to_the_os():
    """On CPU, ZeRO-3 gathers every parameter whole for each use and frees it after; glibc's malloc raises its
    mmap threshold after the first large free (up to 32 MiB), so later buffers come from the heap and stay in
    the process when freed. Mapping every allocation of 4 MiB or more keeps a rank's resident memory near what
    it holds, at no measured cost in step time (eve-base, 4 ranks under zero3.json on 24 GiB: 5.2 GiB peak per
    rank, where without it the ranks passed 6 GiB and were OOM-killed; docs/performance.md)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 4 << 20)
    except OSError:  # not glibc
        pass


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed():
    """torch.distributed through DeepSpeed, on its accelerator's backend (nccl on GPUs, gloo on CPU). On CPU,
    when every rank is on one machine, DeepSpeed's shared-memory all-reduce creates a 66 MB file in /dev/shm per
    rank and never removes it; once all ranks have mapped their peers' files (a barrier), each removes its file's
    name, so that the memory goes with the processes however they end. A gloo process that exits with its process
    groups alive can abort in interpreter teardown ("terminate called without an active exception",
    pytorch#190489): a finished run would exit -6; the groups are destroyed at exit instead. On GPUs each rank
    takes its local device first: the object collectives before the engine exists (a data source handed from rank
    0, the run folder's lock) run on the current device, which would otherwise be GPU 0 for every rank of a node."""
    if on_gpu():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if on_gpu():
        return
    atexit.register(close_distributed)
    return_freed_memory_to_the_os()
    dist.barrier()
    shared = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                                 f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    shared.unlink(missing_ok=True)


def all_gather_objects(value) -> list:
    """One picklable object from every rank, in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_gpu() -> bool:
    """Whether DeepSpeed's accelerator is a GPU: DS_ACCELERATOR=cpu keeps a run on the CPU of a GPU machine."""
    return get_accelerator().device_name() != "cpu"


def bf16_available() -> bool:
    return on_gpu() and get_accelerator().is_bf16_supported()


def load_deepspeed_config(path, world_size: int, num_experts: int, train_steps: int, global_batch: int = None,
                          expert_parallel_size: int = None) -> tuple:
    """Reads and validates a DeepSpeed JSON config; returns (config for DeepSpeed, ParallelismOptions).
    ``expert_parallel_size`` replaces the config's (a command line's override).

    Fills what depends on the launch: an ``"auto"`` micro batch (``global_batch`` over accumulation and
    data-parallel size), ``train_batch_size`` (micro batch x accumulation x data-parallel size), ``"auto"``
    bf16 (on where the GPU supports it), and the scheduler's ``"auto"`` lengths (all training steps; warmup
    over the first 5%).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} is a JSON {type(config).__name__}; it must be an object "
                          f"({{\"train_micro_batch_size_per_gpu\": ..., ...}})")

    ep_key = f"{EVE_SECTION}.expert_parallel_size"

    def fail(key, message):
        from_command_line = key == ep_key and expert_parallel_size is not None
        raise ConfigError(f"{'--expert-parallel-size' if from_command_line else f'{path}: {key!r}'} {message}")

    section = config.pop(EVE_SECTION, {})
    if not isinstance(section, dict):
        fail(EVE_SECTION, f"must be an object, got {section!r}")
    if expert_parallel_size is not None:
        section["expert_parallel_size"] = expert_parallel_size
    known = {f.name for f in fields(ParallelismOptions)}
    for key in sorted(set(section) - known):
        fail(f"{EVE_SECTION}.{key}", f"is not an option; the options are {', '.join(sorted(known))}")
    options = ParallelismOptions(**section)
    ep_size = options.expert_parallel_size
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        fail(ep_key, f"must be a positive integer, got {ep_size!r}")
    if world_size % ep_size:
        other = "" if expert_parallel_size is not None else ", or set --expert-parallel-size"
        fail(ep_key, f"is {ep_size}, which does not divide the world size {world_size}; launch a multiple of "
                     f"{ep_size} ranks{other}")
    if num_experts == 0 and ep_size > 1:
        fail(ep_key, f"is {ep_size}, but the model has no MoE layers whose experts it could place; set it to 1 "
                     "(--expert-parallel-size 1)")
    if num_experts % ep_size:
        fail(ep_key, f"is {ep_size}, which does not divide the model's {num_experts} experts")
    if not isinstance(options.activation_checkpointing, bool):
        fail(f"{EVE_SECTION}.activation_checkpointing", f"must be true or false, got {options.activation_checkpointing!r}")

    if "expert_parallel" in config:
        fail("expert_parallel", f"(DeepSpeed's AutoEP) would replace EVE's MoE layers; set "
             f"'{EVE_SECTION}.expert_parallel_size' instead")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        fail("zero_optimization.stage", f"is {stage!r}; ZeRO stages are 0, 1, 2 and 3")

    micro_batch = config.get("train_micro_batch_size_per_gpu")
    if micro_batch == "auto" and global_batch is not None:
        per_micro_step = config.get("gradient_accumulation_steps", 1) * world_size
        if global_batch % per_micro_step:
            fail("train_micro_batch_size_per_gpu", f"is \"auto\", but the global batch {global_batch} does not "
                 f"divide into {per_micro_step} (accumulation steps x ranks)")
        micro_batch = config["train_micro_batch_size_per_gpu"] = global_batch // per_micro_step
    if not isinstance(micro_batch, int) or micro_batch < 1:
        fail("train_micro_batch_size_per_gpu", f"must be a positive integer, got {micro_batch!r}")
    accumulation = config.setdefault("gradient_accumulation_steps", 1)
    if not isinstance(accumulation, int) or accumulation < 1:
        fail("gradient_accumulation_steps", f"must be a positive integer, got {accumulation!r}")
    global_batch = micro_batch * accumulation * world_size
    declared = config.get("train_batch_size", "auto")
    if declared not in ("auto", global_batch):
        fail("train_batch_size", f"is {declared}, but micro batch {micro_batch} x accumulation {accumulation} x "
             f"{world_size} ranks = {global_batch}; set it to \"auto\"")
    config["train_batch_size"] = global_batch

    bf16 = config.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_available()

    scheduler_params = config.get("scheduler", {}).get("params", {})
    if scheduler_params.get("total_num_steps") == "auto":
        scheduler_params["total_num_steps"] = train_steps
    if scheduler_params.get("warmup_num_steps") == "auto":
        scheduler_params["warmup_num_steps"] = max(1, train_steps // 20)
    return config, options


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.dim() < 2 or name.endswith(("_pos", "_cls", "_embed", "token_embed.weight",
                                             "modality_type_embed"))


def trained_names(names, patterns: list, model_name: str) -> set:
    """The parameter names that ``--train-only`` ``patterns`` (shell patterns over a whole model's parameter names,
    as tools/consolidate.py writes them) select: all of ``names`` where there are none. UsageError for a pattern that
    selects nothing."""
    names = list(names)
    if not patterns:
        return set(names)
    selected = set()
    for pattern in patterns:
        matched = {name for name in names if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise UsageError(f"--train-only: {pattern!r} matches no parameter of {model_name} (its names look like "
                             f"{names[0]} or {names[-1]})")
        selected |= matched
    return selected


def freeze(model: torch.nn.Module, frozen) -> int:
    """Gives the parameters of ``model`` that ``frozen(name)`` says a gradient of zeros, so that AdamW leaves them
    as they are (``optimizer_param_groups`` puts them where nothing decays) and gradient clipping measures the
    others alone. They keep their place in the optimizer, so checkpoints, consolidation and resharding treat
    every run alike, at the cost of their optimizer state's memory. Returns how many elements are frozen."""
    count = 0
    for name, param in model.named_parameters():
        if frozen(name):
            param.register_hook(torch.zeros_like)
            param.frozen = True
            count += getattr(param, "ds_numel", param.numel())
    return count


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups (no decay for biases, norms, layer scales, embeddings and frozen parameters), with expert
    parameters split into their own groups as DeepSpeed's MoE requires."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = no_weight_decay(name, param) or getattr(param, "frozen", False)
            (no_decay if exempt else decay).append(param)
    param_groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
                    {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def build_model(build, ds_config: dict) -> torch.nn.Module:
    """``build()``; under ZeRO-3 inside ``deepspeed.zero.Init``, which partitions each module's parameters as soon
    as the module is built (the experts' over their expert-data-parallel group, see ModalityAwareMoE): no rank
    holds the whole model, even while building it."""
    if zero_stage(ds_config) != 3:
        return build()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build()


def start_schedule_at_step_one(scheduler):
    """Makes optimizer step s apply the schedule's value at s. DeepSpeed's warmup schedulers begin at iteration -1
    (lr 0) and torch's at 0, which a linear warmup maps to lr 0: the first steps would not train (two of them under
    DeepSpeed's). A resumed engine then loads the scheduler's saved position over this one."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.step()
    elif hasattr(scheduler, "last_batch_iteration"):
        scheduler.step(1)


def initialize(model: torch.nn.Module, ds_config: dict, placement: ExpertPlacement, param_groups: list = None,
               lr_scheduler=None):
    """Wraps the model (built with ``placement``) in a DeepSpeed engine; returns (engine, lr scheduler).
    ``param_groups`` default to ``optimizer_param_groups``; ``lr_scheduler`` (a callable of the optimizer)
    replaces the config's "scheduler"."""
    if zero_stage(ds_config) != 3:
        use_engine_managed_moe(model)
    if param_groups is None:
        param_groups = optimizer_param_groups(model, ds_config.get("optimizer", {}).get("params", {}).get(
            "weight_decay", 0.0))
    engine, _, _, scheduler = deepspeed.initialize(model=model, config=ds_config, model_parameters=param_groups,
                                                   lr_scheduler=lr_scheduler)
    if scheduler is not None:
        start_schedule_at_step_one(scheduler)
    if placement.ep_size > 1:
        actual = groups._get_expert_parallel_rank(f"ep_size_{placement.ep_size}")
        expected = placement.ep_rank
        if actual != expected:
            raise RuntimeError(f"expert-parallel rank is {actual}, expected {expected}: experts were initialised "
                               "for a different layout (is use_data_before_expert_parallel_ set?)")
    return engine, scheduler
