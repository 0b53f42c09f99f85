"""Consolidated weights on disk: ``model.safetensors`` plus ``config.json`` in one folder, which says what model it
holds (``HeldModel``), and loading weights into a model whose parameters ZeRO-3 may have partitioned, one tensor read
at a time."""
import copy
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from eve_ds.config import EVEConfig
from eve_ds.errors import UsageError
from eve_ds.model.init import whole

WEIGHTS, CONFIG = "model.safetensors", "config.json"
ENCODER, PRETRAINING = "encoder", "pretraining"
FINETUNING_TASKS = ("vqa", "nlvr2", "retrieval")
TASK_NAMES = {ENCODER: "the EVE encoder alone", PRETRAINING: "the pre-training model", "vqa": "the VQA model",
              "nlvr2": "the NLVR2 model", "retrieval": "the retrieval model"}


class CheckpointError(UsageError):
    """A checkpoint or weights folder that cannot be read or used; the message names the file and what is wrong."""


@dataclass
class HeldModel:
    """Which model a weights folder or a training checkpoint holds: the encoder alone (ENCODER), the pre-training
    model with its heads (PRETRAINING), or a fine-tuning task's model with the options its head was built with
    (``{"num_answers": 3128}``, ``{"head": "biattn"}``). Every tool reads it, so that each serves every job."""
    task: str = PRETRAINING
    head_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise CheckpointError(f"holds a model of unknown kind '{self.task}' (eve-ds knows {', '.join(TASK_NAMES)})")
        self.head_options = dict(self.head_options or {})

    def model_class(self):
        """The nn.Module class of the model (None for the encoder alone, which is stored under ``encoder.``)."""
        if self.task == PRETRAINING:
            from eve_ds.objectives import PretrainingModel
            return PretrainingModel
        if self.task == "vqa":
            from eve_ds.finetune.vqa import VQAModel
            return VQAModel
        if self.task == "nlvr2":
            from eve_ds.finetune.nlvr2 import NLVR2Model
            return NLVR2Model
        if self.task == "retrieval":
            from eve_ds.finetune.retrieval import RetrievalModel
            return RetrievalModel
        return None

    def expected_shapes(self, config: EVEConfig) -> dict:
        """Name -> shape of every tensor of the model's state dict, with every expert (built on the meta device)."""
        from eve_ds.model import EVE

        with torch.device("meta"):
            if self.task == ENCODER:
                return {f"encoder.{name}": t.shape for name, t in EVE(config).state_dict().items()}
            return {name: t.shape for name, t in self.model_class()(config, **self.head_options).state_dict().items()}

    def describe(self) -> str:
        from eve_ds.objectives import describe_objectives

        options = ", ".join(f"{key} {describe_objectives(value) if key == 'objectives' else value}"
                            for key, value in self.head_options.items())
        return TASK_NAMES[self.task] + (f" ({options})" if options else "")

    def to_dict(self) -> dict:
        return {"task": self.task, "head_options": self.head_options}

    @classmethod
    def of_training_state(cls, states: dict) -> "HeldModel":
        """What a DeepSpeed checkpoint holds, from the client state the trainer saved beside it: a fine-tuning run
        stores its task and head options; a pre-training run stores no task."""
        return cls(states.get("task", PRETRAINING), states.get("head_options"))

    @classmethod
    def of_names(cls, names) -> "HeldModel":
        """Told by the tensor names, for folders written before config.json said it: the encoder alone when every
        name is under ``encoder.``, else the pre-training model."""
        return cls(ENCODER if all(name.startswith("encoder.") for name in names) else PRETRAINING)


def write_atomically(path: Path, write, concurrent: bool = False):
    """Writes through a temporary name in the same folder, so a crash never leaves a partial file. The temporary is
    ``.NAME.partial``, which the next write replaces (a crashed write's leftover goes with it); with ``concurrent``
    (ranks that may write the file at once) each writer takes a temporary of its own."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial" if concurrent else f".{path.name}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_pretrained(out_dir, state_dict: dict, config: EVEConfig, dtype=torch.float32, source: dict = None,
                    tokenizer=None, held: HeldModel = None):
    """Writes the weights and config.json, and ``tokenizer`` (a TextTokenizer: what fine-tuning encodes with) where
    given. ``held`` says what model the weights are (default: told by their names, ``HeldModel.of_names``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in state_dict.items()}
    held = held or HeldModel.of_names(tensors)
    description = {"format": "eve-ds", "dtype": str(dtype).removeprefix("torch."), "model_config": config.to_dict(),
                   **held.to_dict(), "source": source or {}}
    write_atomically(out_dir / WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    write_atomically(out_dir / CONFIG, lambda path: path.write_text(json.dumps(description, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save(out_dir)


def pretrained_config(path) -> EVEConfig:
    """The model config of a folder written by save_pretrained, without reading its weights."""
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} does not exist (write it with tools/consolidate.py)")
    try:
        return EVEConfig.from_dict(json.loads((path / CONFIG).read_text())["model_config"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / CONFIG}: not an eve-ds model config ({error})") from None


def held_model(path) -> HeldModel:
    """What model a folder written by save_pretrained holds (told by its tensor names where config.json predates it)."""
    path = Path(path)
    pretrained_config(path)  # the folder's files are there and its config reads
    description = json.loads((path / CONFIG).read_text())
    if "task" not in description:
        return HeldModel.of_names(StoredWeights(path / WEIGHTS))
    try:
        return HeldModel(description["task"], description.get("head_options"))
    except CheckpointError as error:
        raise CheckpointError(f"{path / CONFIG}: {error}") from None


class StoredWeights(Mapping):
    """The tensors of a safetensors file by name, each taken from the mapped file when asked for: a rank that
    loads them into its ZeRO-3 partitions reads only the tensors it needs and copies none but into its
    partitions. ``renamed`` and ``replaced`` are views of the same file under other names or with some tensors
    given in memory."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{self.path}: cannot be read ({error})") from None
        self._keys = {key: key for key in self._file.keys()}  # name -> key in the file
        self._in_memory = {}  # key in the file -> the tensor to give instead

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._keys[name]
        if key in self._in_memory:
            return self._in_memory[key]
        try:
            return self._file.get_tensor(key)
        except SafetensorError as error:
            raise CheckpointError(f"{self.path}: tensor '{key}' cannot be read ({error})") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def renamed(self, names: dict) -> "StoredWeights":
        """A view in which ``name`` is this one's ``names[name]``; a name whose tensor is not here is left out
        (so that ``load_weights`` reports it missing)."""
        view = copy.copy(self)
        view._keys = {name: self._keys[old] for name, old in names.items() if old in self._keys}
        return view

    def replaced(self, tensors: dict) -> "StoredWeights":
        """A view that gives ``tensors`` (by name) instead of what the file holds under those names."""
        view = copy.copy(self)
        view._in_memory = {**self._in_memory, **{self._keys[name]: tensor for name, tensor in tensors.items()}}
        return view


def open_pretrained(path, image_size: int = None, max_text_len: int = None) -> tuple:
    """Returns (StoredWeights, EVEConfig) of a folder written by save_pretrained (tools/consolidate.py).
    ``image_size`` and ``max_text_len``, where given, change the model's; the position tables follow
    (``fitted_positions``)."""
    path = Path(path)
    config = pretrained_config(path)
    weights = StoredWeights(path / WEIGHTS)
    wanted = {key: value for key, value in (("image_size", image_size), ("max_text_len", max_text_len))
              if value is not None}
    if wanted and config.replace(**wanted) != config:
        config = config.replace(**wanted)
        weights = weights.replaced(fitted_positions(weights, config, f"{path / WEIGHTS}: "))
    return weights, config


def load_pretrained(path, image_size: int = None, max_text_len: int = None) -> tuple:
    """``open_pretrained`` with every tensor read: (state dict, EVEConfig)."""
    weights, config = open_pretrained(path, image_size, max_text_len)
    return dict(weights), config


def fitted_positions(weights: Mapping, config: EVEConfig, source: str = "", prefix: str = "encoder.") -> dict:
    """The position tables of ``weights`` fitted to ``config``: the image table interpolated over the patch grid
    (bicubic, the class position kept), as the authors' loader does when fine-tuning at another resolution; the
    text table cut to ``max_text_len`` rows. Raises CheckpointError when the text table is shorter."""
    image_key, text_key = f"{prefix}image_pos", f"{prefix}text_pos"
    image_pos = weights[image_key]
    if image_pos.shape[1] != config.num_image_tokens:
        width, grid = image_pos.shape[-1], math.isqrt(image_pos.shape[1] - 1)
        if grid * grid != image_pos.shape[1] - 1:
            raise CheckpointError(f"{source}'{image_key}' has {image_pos.shape[1] - 1} patch positions, "
                                  "not a square grid")
        new_grid = config.image_size // config.patch_size
        patches = image_pos[:, 1:].float().reshape(1, grid, grid, width).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, width).to(image_pos.dtype)
        image_pos = torch.cat([image_pos[:, :1], patches], dim=1)
    text_pos = weights[text_key]
    if text_pos.shape[1] < config.max_text_len:
        raise CheckpointError(f"{source}'{text_key}' holds {text_pos.shape[1]} text positions, fewer than "
                              f"max_text_len {config.max_text_len}: choose a text length of at most "
                              f"{text_pos.shape[1]}")
    return {image_key: image_pos, text_key: text_pos[:, :config.max_text_len].contiguous()}


def key_report(title: str, keys: list) -> str:
    """One line of a key report: how many keys, and the first of them."""
    return f"  {len(keys)} {title}: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


def state_dict_mismatch(expected: dict, state_dict: dict) -> list:
    """Lines naming the missing, unexpected and mis-shaped keys of ``state_dict`` against ``expected``
    (name -> shape); empty when every key is there with its shape."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k])}"
                   for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    return [key_report(title, keys)
            for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]


@torch.no_grad()
def load_weights(module: torch.nn.Module, weights: Mapping, source, names=None) -> torch.nn.Module:
    """Writes ``weights`` (a state dict, or StoredWeights read one tensor at a time) into every parameter and
    buffer of ``module``'s state dict (or those of ``names``, read from the weights of those names), each module's
    parameters gathered from their ZeRO-3 partitions while they are written (where ``engine.build_model``
    partitioned them). Strict: fails, naming ``source``, on missing, unexpected or mis-shaped weights."""
    # A ZeRO-3 partition's own shape is empty; ds_shape is the whole parameter's.
    expected = {name: getattr(tensor, "ds_shape", tensor.shape)
                for name, tensor in module.state_dict(keep_vars=True).items() if names is None or name in names}
    if names is not None:
        weights = {name: weights[name] for name in expected if name in weights}
    mismatch = state_dict_mismatch(expected, weights)
    if mismatch:
        raise CheckpointError("\n".join([f"{source} does not fit the model:", *mismatch]))
    for prefix, child in module.named_modules():
        with whole(child):
            for name, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                key = f"{prefix}.{name}" if prefix else name
                if key in expected:  # not a buffer that is left out of the state dict
                    tensor.copy_(weights[key])
    return module
