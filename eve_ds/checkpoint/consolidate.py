"""One full state dict from an eve-ds DeepSpeed checkpoint of any ZeRO stage, data- and expert-parallel size.

ZeRO 0-2 (engine-managed MoE) write the dense weights whole in ``mp_rank_00_model_states.pt`` and each
expert in ``layer_L_expert_E_mp_rank_00_model_states.pt`` under its global index. ZeRO-3 writes, per
rank, the parameter shapes (``zero_pp_rank_R_mp_rank_00_model_states.pt``) and that rank's fp32 slices
(``..._optim_states.pt``): every parameter of a sub-group is cut into ``ceil(numel / n)`` pieces over
the sub-group's ``n`` partition ranks, which are all ranks for dense weights and, for experts, the
expert-data-parallel group recorded in ``ds_zero_partition_groups``.
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from eve_ds.config import EVEConfig
from eve_ds.engine import expert_parallel_rank

DENSE_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt")
EXPERT_KEY = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
# What DeepSpeed pickles beside tensors; allowed so that files load with weights_only=True.
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler]


class CheckpointError(ValueError):
    """A checkpoint that cannot be consolidated; the message names the file and what is wrong."""


@dataclass
class ConsolidatedCheckpoint:
    state_dict: dict
    model_config: EVEConfig
    zero_stage: int
    step: int
    source: Path
    notes: list = field(default_factory=list)


def global_expert_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    """``...deepspeed_experts.<local>...`` on expert-parallel rank r -> ``...deepspeed_experts.<global>...``"""
    return EXPERT_KEY.sub(lambda m: f"{m[1]}{ep_rank * num_local_experts + int(m[2])}{m[3]}", name)


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {str(error)[:200]})") from None


def resolve_tag_dir(checkpoint_dir, tag=None) -> Path:
    """The folder of one checkpoint: ``checkpoint_dir/tag``, ``checkpoint_dir/<latest>``, or
    ``checkpoint_dir`` itself when it is such a folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a directory")
    if tag is None:
        if any(checkpoint_dir.glob("*model_states.pt")):
            return checkpoint_dir
        latest = checkpoint_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{checkpoint_dir}: not a DeepSpeed checkpoint (no 'latest' file and no "
                                  "*model_states.pt); pass the folder of a checkpoint or a --tag")
        tag = latest.read_text().strip()
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: checkpoint tag '{tag}' does not exist")
    return tag_dir


def _model_config(states: dict, path: Path) -> EVEConfig:
    if "model_config" not in states:
        raise CheckpointError(f"{path}: has no 'model_config' (not written by eve-ds)")
    return EVEConfig.from_dict(states["model_config"])


def _consolidate_engine_moe(tag_dir: Path):
    """ZeRO 0-2: dense weights whole, one file per expert."""
    path = tag_dir / DENSE_STATES
    states = load_file(path)
    config = _model_config(states, path)
    state_dict = dict(states["module"])
    for layer in range(len(config.moe_layers)):
        for expert in range(config.num_experts):
            state_dict.update(load_file(tag_dir / EXPERT_STATES.format(layer=layer, expert=expert)))
    notes = []
    dtypes = {tensor.dtype for tensor in state_dict.values()}
    if dtypes != {torch.float32}:
        notes.append(f"ZeRO 0-2 checkpoint: weights taken from the module copy in {sorted(map(str, dtypes))}, "
                     "not from the fp32 optimizer partitions")
    return state_dict, config, states, notes


def _consolidate_zero3(tag_dir: Path, rank_files: dict):
    ranks = sorted(rank_files)
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{tag_dir}: ZeRO-3 model states of ranks {ranks}; expected 0..{len(ranks) - 1}")
    model_states = {rank: load_file(rank_files[rank]) for rank in ranks}
    optim_states = {}
    for rank in ranks:
        path = tag_dir / rank_files[rank].name.replace("model_states", "optim_states")
        optim_states[rank] = load_file(path)["optimizer_state_dict"]
        if "fp32_flat_groups" not in optim_states[rank]:
            raise CheckpointError(f"{path}: no fp32_flat_groups (not a ZeRO-3 optimizer state)")
    config = _model_config(model_states[0], rank_files[0])

    def partition_ranks(rank, sub_group):
        metadata = optim_states[rank].get("ds_zero_partition_groups")
        return metadata[sub_group]["partition_ranks"] if metadata else ranks

    # Expert-parallel size: how many experts of the first MoE layer one rank's shapes name.
    first_moe = f"encoder.blocks.{config.moe_layers[0]}.ffn." if config.moe_layers else None
    local_experts = {m[2] for shapes in model_states[0]["param_shapes"] for name in shapes
                     if first_moe and name.startswith(first_moe) and (m := EXPERT_KEY.search(name))}
    ep_size = config.num_experts // len(local_experts) if local_experts else 1

    state_dict = {}
    for sub_group, shapes in enumerate(model_states[0]["param_shapes"]):
        done = set()
        for rank in ranks:
            members = tuple(partition_ranks(rank, sub_group))
            if members in done:
                continue
            done.add(members)
            flats = [optim_states[member]["fp32_flat_groups"][sub_group] for member in members]
            offset = 0
            for name, shape in model_states[members[0]]["param_shapes"][sub_group].items():
                numel = math.prod(shape)
                piece = math.ceil(numel / len(members))
                if offset + piece > min(flat.numel() for flat in flats):
                    raise CheckpointError(f"{tag_dir}: ZeRO-3 partitions of sub-group {sub_group} are shorter "
                                          "than their parameter shapes (truncated or mismatched files)")
                full = torch.cat([flat.narrow(0, offset, piece) for flat in flats])[:numel]
                ep_rank = expert_parallel_rank(members[0], ep_size)
                state_dict[global_expert_name(name, ep_rank, config.num_experts // ep_size)] = full.view(shape).clone()
                offset += piece
    return state_dict, config, model_states[0], []


def _check_complete(state_dict: dict, config: EVEConfig, source: Path):
    from eve_ds.objectives import MaskedSignalModeling  # the model knows its own keys and shapes

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in MaskedSignalModeling(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(name for name in set(expected) & set(state_dict) if tuple(state_dict[name].shape) != expected[name])
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: does not match its model config: {len(missing)} missing "
                              f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}), "
                              f"{len(wrong)} of the wrong shape ({', '.join(wrong[:3])})")


def consolidate(checkpoint_dir, tag=None) -> ConsolidatedCheckpoint:
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    zero3_files = {int(m[1]): path for path in tag_dir.iterdir() if (m := ZERO3_MODEL_STATES.fullmatch(path.name))}
    if (tag_dir / DENSE_STATES).is_file():
        state_dict, config, states, notes = _consolidate_engine_moe(tag_dir)
    elif zero3_files:
        state_dict, config, states, notes = _consolidate_zero3(tag_dir, zero3_files)
    else:
        raise CheckpointError(f"{tag_dir}: neither {DENSE_STATES} nor zero_pp_rank_*_model_states.pt")
    _check_complete(state_dict, config, tag_dir)
    stage = 3 if not (tag_dir / DENSE_STATES).is_file() else states.get("ds_config", {}).get(
        "zero_optimization", {}).get("stage", 0)
    return ConsolidatedCheckpoint(state_dict, config, stage, states.get("step", states.get("global_steps", 0)),
                                  tag_dir, notes)
