"""Consolidated weights on disk: ``model.safetensors`` plus ``config.json`` in one folder."""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eve_ds.config import EVEConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def write_atomically(path: Path, write):
    """Writes through a temporary name in the same folder, so a crash never leaves a partial file."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_pretrained(out_dir, state_dict: dict, config: EVEConfig, dtype=torch.float32, source: dict = None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in state_dict.items()}
    description = {"format": "eve-ds", "dtype": str(dtype).removeprefix("torch."), "model_config": config.to_dict(),
                   "source": source or {}}
    write_atomically(out_dir / WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    write_atomically(out_dir / CONFIG, lambda path: path.write_text(json.dumps(description, indent=2) + "\n"))


def pretrained_config(path) -> EVEConfig:
    """The model config of a folder written by save_pretrained, without reading its weights."""
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} does not exist (write it with tools/consolidate.py)")
    try:
        return EVEConfig.from_dict(json.loads((path / CONFIG).read_text())["model_config"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path / CONFIG}: not an eve-ds model config ({error})") from None


def load_pretrained(path, image_size: int = None, max_text_len: int = None) -> tuple:
    """Returns (state dict, EVEConfig) from a folder written by save_pretrained (tools/consolidate.py).
    ``image_size`` and ``max_text_len``, where given, change the model's; the position tables follow
    (``resize_positions``)."""
    path = Path(path)
    config = pretrained_config(path)
    try:
        state_dict = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / WEIGHTS}: cannot be read ({error})") from None
    wanted = {key: value for key, value in (("image_size", image_size), ("max_text_len", max_text_len))
              if value is not None}
    if wanted and config.replace(**wanted) != config:
        config = config.replace(**wanted)
        state_dict = resize_positions(state_dict, config, f"{path / WEIGHTS}: ")
    return state_dict, config


def resize_positions(state_dict: dict, config: EVEConfig, source: str = "", prefix: str = "encoder.") -> dict:
    """The position tables of ``state_dict`` fitted to ``config``: the image table interpolated over the patch
    grid (bicubic, the class position kept), as the authors' loader does when fine-tuning at another
    resolution; the text table cut to ``max_text_len`` rows. Raises ValueError when the text table is shorter."""
    state_dict = dict(state_dict)
    image_key, text_key = f"{prefix}image_pos", f"{prefix}text_pos"
    image_pos = state_dict[image_key]
    if image_pos.shape[1] != config.num_image_tokens:
        width, grid = image_pos.shape[-1], math.isqrt(image_pos.shape[1] - 1)
        if grid * grid != image_pos.shape[1] - 1:
            raise ValueError(f"{source}'{image_key}' has {image_pos.shape[1] - 1} patch positions, not a square grid")
        new_grid = config.image_size // config.patch_size
        patches = image_pos[:, 1:].float().reshape(1, grid, grid, width).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, width).to(image_pos.dtype)
        state_dict[image_key] = torch.cat([image_pos[:, :1], patches], dim=1)
    text_pos = state_dict[text_key]
    if text_pos.shape[1] < config.max_text_len:
        raise ValueError(f"{source}'{text_key}' holds {text_pos.shape[1]} text positions, fewer than max_text_len "
                         f"{config.max_text_len}: choose a text length of at most {text_pos.shape[1]}")
    state_dict[text_key] = text_pos[:, :config.max_text_len].contiguous()
    return state_dict


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


def load_state_dict_strictly(module: torch.nn.Module, state_dict: dict, source):
    """Loads every weight or fails with a report of missing, unexpected and mis-shaped keys."""
    mismatch = state_dict_mismatch({k: v.shape for k, v in module.state_dict().items()}, state_dict)
    if mismatch:
        raise ValueError("\n".join([f"{source} does not fit the model:", *mismatch]))
    module.load_state_dict(state_dict)
    return module
