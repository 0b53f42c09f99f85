"""A training checkpoint independent of the cluster shape: full fp32 weights, full AdamW moments and the
trainer's position, which a run of any world size, expert-parallel size and ZeRO stage can resume from.

The folder is also a consolidated weights folder (model.safetensors + config.json, see pretrained.py, and the
run's tokenizer where its checkpoint holds one), with ``optimizer.safetensors`` (``exp_avg/<name>``,
``exp_avg_sq/<name>``) and ``trainer_state.json``.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from eve_ds.checkpoint.consolidate import MOMENTS, CheckpointError, ConsolidatedCheckpoint
from eve_ds.checkpoint.pretrained import StoredWeights, open_pretrained, save_pretrained, write_atomically
from eve_ds.config import EVEConfig

OPTIMIZER, TRAINER_STATE = "optimizer.safetensors", "trainer_state.json"


@dataclass
class UniversalCheckpoint:
    """Weights and moments are read from their files one tensor at a time, as a rank loads them."""
    weights: StoredWeights
    moments: dict  # "exp_avg" / "exp_avg_sq" -> StoredWeights
    model_config: EVEConfig
    step: int
    optimizer_steps: int
    lr_scheduler: dict
    client_state: dict


def save_universal(out_dir, checkpoint: ConsolidatedCheckpoint):
    if checkpoint.moments is None:
        raise CheckpointError(f"{checkpoint.source}: holds no optimizer state to reshard (ZeRO stage "
                              f"{checkpoint.zero_stage}; reshard reads ZeRO 1-3 checkpoints)")
    out_dir = Path(out_dir)
    source = {"checkpoint": str(checkpoint.source), "zero_stage": checkpoint.zero_stage, "step": checkpoint.step}
    save_pretrained(out_dir, checkpoint.state_dict, checkpoint.model_config, source=source,
                    tokenizer=checkpoint.tokenizer, held=checkpoint.held)
    moments = {f"{key}/{name}": tensor.contiguous() for key in MOMENTS for name, tensor in checkpoint.moments[key].items()}
    write_atomically(out_dir / OPTIMIZER, lambda path: save_file(moments, str(path)))
    state = {"step": checkpoint.step, "optimizer_steps": checkpoint.optimizer_steps,
             "lr_scheduler": checkpoint.lr_scheduler, "client_state": checkpoint.client_state}
    write_atomically(out_dir / TRAINER_STATE, lambda path: path.write_text(json.dumps(state, indent=2) + "\n"))


def load_universal(path) -> UniversalCheckpoint:
    path = Path(path)
    for name in (OPTIMIZER, TRAINER_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} does not exist (write the folder with tools/reshard.py)")
    weights, config = open_pretrained(path)
    flat = StoredWeights(path / OPTIMIZER)
    for key in MOMENTS:
        if {name.removeprefix(f"{key}/") for name in flat if name.startswith(f"{key}/")} != set(weights):
            raise CheckpointError(f"{path / OPTIMIZER}: its {key} tensors do not match the weights' names")
    moments = {key: flat.renamed({name: f"{key}/{name}" for name in weights}) for key in MOMENTS}
    state = json.loads((path / TRAINER_STATE).read_text())
    return UniversalCheckpoint(weights, moments, config, state["step"], state["optimizer_steps"],
                               state["lr_scheduler"], state["client_state"])


def _set_zero3_fp32_state(zero, param, value, key):
    # key None: the fp32 master weights. DeepSpeed's safe_set_full_* slice the unpadded value, which fails on the
    # last partition ranks of a parameter whose size the partition count does not divide; pad it first.
    partition, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = zero._get_param_partition_rank(param)
    padded = torch.zeros(partition.numel() * zero._get_param_partition_world_size(param), device=value.device)
    padded[:value.numel()] = value.flatten()
    partition.copy_(padded.narrow(0, rank * partition.numel(), partition.numel()))


def _set_fp32_state(engine, name: str, value: torch.Tensor, key: str = None):
    """One parameter's full fp32 master weight (``key`` None) or optimizer state, into this rank's part of it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    param = engine.module.get_parameter(name)
    value = value.to(param.device)
    if hasattr(param, "ds_id"):
        _set_zero3_fp32_state(engine.optimizer, param, value, key)
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


@torch.no_grad()
def set_master_weights(engine, weights, prefix: str = ""):
    """Sets the fp32 master weights of the engine's parameters ``prefix + name`` to ``weights[name]`` (a Mapping of
    full tensors): a bf16 engine makes its masters from its bf16 weights, a rounding of what was loaded."""
    for name in weights:
        _set_fp32_state(engine, prefix + name, weights[name])


@torch.no_grad()
def restore_optimizer_state(engine, universal: UniversalCheckpoint, global_name):
    """Sets the fp32 master weights, AdamW moments and step count of a DeepSpeed engine (ZeRO 1-3, any layout)
    from full tensors; the weights must already be in the model that the engine was built from."""
    zero = engine.optimizer
    inner = zero.optimizer
    # torch's AdamW creates its state at its first step; create it now (zeros, overwritten below) for the
    # fp32 partitions: ZeRO-1/2 keep them in the inner optimizer's groups, ZeRO-3 apart between steps.
    partitions = getattr(zero, "fp32_partitioned_groups_flat", None) or \
        [flat for group in inner.param_groups for flat in group["params"]]
    for flat in partitions:
        if "exp_avg" not in inner.state.get(flat, {}):
            # The fused kernel keeps the step count on the parameters' device, the others on the CPU.
            step_device = flat.device if inner.defaults.get("fused") else "cpu"
            inner.state[flat] = {"step": torch.zeros((), device=step_device), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
    lazy_link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
    if lazy_link is not None:  # ZeRO-1/2 link each parameter's fragment of that state on first use
        lazy_link()
    names = {name: global_name(name) for name, _ in engine.module.named_parameters()}
    set_master_weights(engine, universal.weights.renamed(names))
    for name, saved_name in names.items():
        for key in MOMENTS:
            _set_fp32_state(engine, name, universal.moments[key][saved_name], key)
    if not inner.state:
        raise RuntimeError("the optimizer has no state to restore into (DeepSpeed did not initialise it)")
    for state in inner.state.values():
        state["step"] = torch.full_like(state["step"], universal.optimizer_steps) \
            if torch.is_tensor(state["step"]) else universal.optimizer_steps
    # step(n), not load_state_dict: DeepSpeed's schedulers set the optimizer's learning rate only in step().
    engine.lr_scheduler.step(universal.lr_scheduler["last_batch_iteration"])
