"""Full tensors from an eve-ds DeepSpeed checkpoint of any ZeRO stage, data- and expert-parallel size.

Every layout stores fp32 weights and AdamW moments as flat per-rank partitions of optimizer groups:

* ZeRO-1/2 (``zero_pp_rank_R_mp_rank_00_optim_states.pt``): a group's flat buffer is cut into one
  contiguous piece per partition rank; ``param_slice_mappings`` says where each parameter's fragment lies
  in a rank's piece. ``mp_rank_00_model_states.pt`` holds the shapes and the trainer's client state.
* ZeRO-3 (``zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt``): every parameter is cut into
  ``ceil(numel / n)`` pieces, one per partition rank, laid end to end in each rank's flat buffer.

Dense groups are partitioned over all ranks; expert groups over the expert-data-parallel group (the
ranks that hold the same experts), and expert names are local to their expert-parallel rank.
ZeRO stage 0 has no partitions: its weights come whole from ``mp_rank_00_model_states.pt`` and
``layer_L_expert_E_mp_rank_00_model_states.pt``, without optimizer moments.

The trainer's client state says which model a checkpoint holds (``HeldModel``: the pre-training model, or a
fine-tuning task's with its head), and the checkpoint holds the run's tokenizer (``tokenizer.json``,
``special_tokens.json``): both travel on with the weights.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from eve_ds.checkpoint.data_position import read_data_position
from eve_ds.checkpoint.manifest import LATEST, is_complete, predates_manifests, summary, verify_share
from eve_ds.checkpoint.pretrained import CheckpointError, HeldModel, state_dict_mismatch
from eve_ds.config import EVEConfig
from eve_ds.data.tokenizer import TOKENIZER_FILE, TextTokenizer
from eve_ds.model.moe import LOCAL_EXPERT_KEY, ExpertPlacement

DENSE_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
RANK_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
RANK_OPTIM_STATES = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
# DeepSpeed's name for the same file when the model trains in bf16 or fp16 (the states are fp32 all the same).
PRECISION_PREFIXES = ("", "bf16_", "fp16_")
MOMENTS = ("exp_avg", "exp_avg_sq")
# What DeepSpeed pickles beside tensors; allowed so that files load with weights_only=True.
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@dataclass
class ConsolidatedCheckpoint:
    state_dict: dict  # full weights under global names
    model_config: EVEConfig
    zero_stage: int
    step: int
    source: Path
    client_state: dict  # what the trainer stored beside the weights
    moments: dict = None  # {"exp_avg": {name: tensor}, "exp_avg_sq": {...}}; None for ZeRO stage 0
    optimizer_steps: int = None
    lr_scheduler: dict = None
    notes: list = field(default_factory=list)
    tokenizer: TextTokenizer = None  # the one the run trained with, where the checkpoint holds it
    held: HeldModel = field(default_factory=HeldModel)  # which model the weights are


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {str(error)[:200]})") from None


def resolve_tag_dir(checkpoint_dir, tag=None) -> Path:
    """The folder of one checkpoint: ``checkpoint_dir/tag``, ``checkpoint_dir/<latest>``, or
    ``checkpoint_dir`` itself when it is such a folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: " + ("not a directory" if checkpoint_dir.exists() else
                                                       "no such checkpoints folder"))
    if tag is None:
        if any(checkpoint_dir.glob("*model_states.pt")):
            return checkpoint_dir
        latest = checkpoint_dir / LATEST
        if not latest.is_file():
            raise CheckpointError(f"{checkpoint_dir}: not a DeepSpeed checkpoint (no 'latest' file and no "
                                  "*model_states.pt); pass the folder of a checkpoint or a --tag")
        tag = latest.read_text(errors="replace").strip()
        if not tag:
            raise CheckpointError(f"{latest} is empty, so it names no checkpoint; {_tags(checkpoint_dir)}")
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: checkpoint tag '{tag}' does not exist; {_tags(checkpoint_dir)}")
    return tag_dir


def _tags(checkpoint_dir: Path) -> str:
    """What to pass as --tag instead: the checkpoint folders there are."""
    tags = sorted(path.name for path in checkpoint_dir.iterdir()
                  if path.is_dir() and any(path.glob("*model_states.pt")))
    if not tags:
        return f"{checkpoint_dir} holds no checkpoint folder"
    return f"pass --tag with one of {', '.join(tags)}"


def _verify(tag_dir: Path) -> list:
    """Raises CheckpointError, naming the file, unless the checkpoint's files match its manifest; returns a
    note for a checkpoint written before manifests existed."""
    if is_complete(tag_dir):
        problems = verify_share(tag_dir)
        if problems:
            raise CheckpointError(f"{summary(problems)}: the checkpoint does not verify against its manifest")
        return []
    if not predates_manifests(tag_dir.parent):
        raise CheckpointError(f"{tag_dir}: incomplete (no manifest: its save did not finish)")
    return [f"{tag_dir} was written before checkpoints had manifests: its files are not verified"]


def saved_states(checkpoint_dir, tag=None) -> tuple:
    """(what a checkpoint's first model-states file holds: the module and the trainer's client state, its path),
    memory-mapped: the tensors are not read."""
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    for name in (RANK_MODEL_STATES.format(rank=0), DENSE_STATES):
        if (tag_dir / name).is_file():
            return load_file(tag_dir / name), tag_dir / name
    raise CheckpointError(f"{tag_dir}: neither {RANK_MODEL_STATES.format(rank=0)} nor {DENSE_STATES}")


def saved_model_config(checkpoint_dir, tag=None) -> EVEConfig:
    """The model config a checkpoint was written with."""
    return model_config_in(*saved_states(checkpoint_dir, tag))


class _Layout:
    """Which ranks share a partition of an optimizer group, and global names of expert parameters."""

    def __init__(self, config: EVEConfig, world_size: int, param_shapes: list):
        first_moe = f"encoder.blocks.{config.moe_layers[0]}.ffn." if config.moe_layers else "-"
        local = {m[2] for shapes in param_shapes for name in shapes
                 if name.startswith(first_moe) and (m := LOCAL_EXPERT_KEY.search(name))}
        ep_size = config.num_experts // len(local) if local else 1
        self.placements = [ExpertPlacement.of_global_rank(rank, config.num_experts, ep_size)
                           for rank in range(world_size)]
        self.world_size = world_size

    def members(self, rank: int, names) -> list:
        if any(LOCAL_EXPERT_KEY.search(name) for name in names):
            return self.placements[rank].sharing_ranks(self.world_size)
        return list(range(self.world_size))

    def global_name(self, name: str, rank: int) -> str:
        return self.placements[rank].global_name(name)


def _unflatten(tag_dir, layout, param_shapes, flats, piece_of):
    """Full tensors of every optimizer group: ``flats[rank][group]`` is a rank's flat partition and
    ``piece_of(rank, group, name, numel, offset)`` gives (start, length) of ``name``'s piece in it."""
    tensors = {}
    for group, shapes in enumerate(param_shapes):
        for rank in range(layout.world_size):
            members = layout.members(rank, shapes)
            if members[0] != rank:  # each partition group is read once, from its first member
                continue
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                pieces = []
                for member in members:
                    start, length = piece_of(member, group, name, numel, offset)
                    flat = flats[member][group]
                    if start + length > flat.numel():
                        raise CheckpointError(f"{tag_dir}: partitions of rank {member} are shorter than the "
                                              f"parameter shapes say (truncated or mismatched files)")
                    pieces.append(flat.narrow(0, start, length))
                offset += math.ceil(numel / len(members))
                full = torch.cat(pieces)[:numel]
                if full.numel() != numel:
                    raise CheckpointError(f"{tag_dir}: {name} has {full.numel()} of its {numel} values")
                tensors[layout.global_name(name, rank)] = full.view(shape).clone()
    return tensors


def _expert_files(tag_dir: Path, config: EVEConfig) -> list:
    """ZeRO 0-2 write one file per (MoE layer, global expert)."""
    return [tag_dir / EXPERT_STATES.format(layer=layer, expert=expert)
            for layer in range(len(config.moe_layers)) for expert in range(config.num_experts)]


def model_config_in(states: dict, path: Path) -> EVEConfig:
    if "model_config" not in states:
        raise CheckpointError(f"{path}: has no 'model_config' (not written by eve-ds)")
    return EVEConfig.from_dict(states["model_config"])


def rank_optim_states(tag_dir: Path, rank: int) -> Path:
    """A rank's optimizer file, under the name DeepSpeed gave it for the training precision (the plain name
    when there is none, for the error that follows)."""
    names = [tag_dir / (prefix + RANK_OPTIM_STATES.format(rank=rank)) for prefix in PRECISION_PREFIXES]
    return next((path for path in names if path.is_file()), names[0])


def _inner_optimizer(optim: dict, path: Path) -> dict:
    inner = optim.get("base_optimizer_state") or optim.get("optimizer_state_dict")
    if not inner or "state" not in inner:
        raise CheckpointError(f"{path}: holds no optimizer state")
    return inner


def _read_partitioned(tag_dir: Path, zero3: bool, optimizer_state: bool):
    states_path = tag_dir / (RANK_MODEL_STATES.format(rank=0) if zero3 else DENSE_STATES)
    states = load_file(states_path)
    config = model_config_in(states, states_path)
    world_size = states["dp_world_size"]
    optim_files = [rank_optim_states(tag_dir, rank) for rank in range(world_size)]
    optims = [load_file(path)["optimizer_state_dict"] for path in optim_files]
    if not zero3:
        # The fp32 experts come from the optimizer partitions, but a damaged per-expert file makes the
        # checkpoint unresumable, so each is opened (memory-mapped: no tensor data is read).
        for path in _expert_files(tag_dir, config):
            load_file(path)
    param_shapes = states["param_shapes"]
    layout = _Layout(config, world_size, param_shapes)
    inners = [_inner_optimizer(optim, path) for optim, path in zip(optims, optim_files)]

    if zero3:
        def piece_of(rank, group, name, numel, offset):
            return offset, math.ceil(numel / len(layout.members(rank, param_shapes[group])))
        weights = [optim["fp32_flat_groups"] for optim in optims]
    else:
        def piece_of(rank, group, name, numel, offset):
            fragment = optims[rank]["param_slice_mappings"][group].get(name)
            return (fragment.start, fragment.numel) if fragment is not None else (0, 0)
        weights = [optim["single_partition_of_fp32_groups"] for optim in optims]

    def moment(key):
        return [[inner["state"][group][key] for group in range(len(param_shapes))] for inner in inners]

    state_dict = _unflatten(tag_dir, layout, param_shapes, weights, piece_of)
    moments = {key: _unflatten(tag_dir, layout, param_shapes, moment(key), piece_of) for key in MOMENTS} \
        if optimizer_state else None
    steps = int(inners[0]["state"][0]["step"])
    return state_dict, config, 3 if zero3 else states["ds_config"]["zero_optimization"]["stage"], states, moments, steps


def _read_stage0(tag_dir: Path):
    path = tag_dir / DENSE_STATES
    states = load_file(path)
    config = model_config_in(states, path)
    state_dict = dict(states["module"])
    for expert_path in _expert_files(tag_dir, config):
        state_dict.update(load_file(expert_path))
    return state_dict, config, 0, states, None, None


def _check_complete(state_dict: dict, config: EVEConfig, held: HeldModel, source: Path):
    mismatch = state_dict_mismatch(held.expected_shapes(config), state_dict)
    if mismatch:
        raise CheckpointError("\n".join([f"{source}: does not match its model config ({held.describe()}):", *mismatch]))


def consolidate(checkpoint_dir, tag=None, optimizer_state: bool = False) -> ConsolidatedCheckpoint:
    """Full weights of a checkpoint under global names; with ``optimizer_state`` also the full AdamW moments
    (ZeRO 1-3), which resharding needs and fine-tuning does not."""
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    notes = _verify(tag_dir)
    if (tag_dir / RANK_MODEL_STATES.format(rank=0)).is_file():
        state_dict, config, stage, states, moments, steps = _read_partitioned(tag_dir, True, optimizer_state)
    elif rank_optim_states(tag_dir, 0).is_file():
        state_dict, config, stage, states, moments, steps = _read_partitioned(tag_dir, False, optimizer_state)
    elif (tag_dir / DENSE_STATES).is_file():
        state_dict, config, stage, states, moments, steps = _read_stage0(tag_dir)
    else:
        raise CheckpointError(f"{tag_dir}: neither {RANK_MODEL_STATES.format(rank=0)}, "
                              f"{RANK_OPTIM_STATES.format(rank=0)} nor {DENSE_STATES}")
    try:
        held = HeldModel.of_training_state(states)
    except CheckpointError as error:
        raise CheckpointError(f"{tag_dir}: {error}") from None
    _check_complete(state_dict, config, held, tag_dir)
    tokenizer = None
    if (tag_dir / TOKENIZER_FILE).is_file():
        tokenizer = TextTokenizer.from_folder(tag_dir, config.max_text_len)
        tokenizer.check_fits(config.vocab_size, tag_dir)
    else:
        notes.append(f"{tag_dir} holds no {TOKENIZER_FILE}: give fine-tuning the tokenizer the run trained with "
                     "(--tokenizer)")
    if any(tensor.dtype == torch.bfloat16 for tensor in state_dict.values()):
        notes.append("ZeRO stage 0 keeps no fp32 master weights: these are the module's bfloat16 weights")
    client_keys = ("model_config", "task", "head_options", "masking", "seed", "step")
    client_state = {key: states[key] for key in client_keys if key in states}
    data_position = read_data_position(tag_dir, states)  # every reader's position
    if data_position is not None:
        client_state["data"] = data_position
    return ConsolidatedCheckpoint(state_dict, config, stage, states.get("step", states.get("global_steps", 0)),
                                  tag_dir, client_state,
                                  moments, steps, states.get("lr_scheduler"), notes, tokenizer, held)
