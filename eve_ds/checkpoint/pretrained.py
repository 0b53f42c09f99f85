"""Consolidated weights on disk: ``model.safetensors`` plus ``config.json`` in one folder."""
import json
import os
from pathlib import Path

import torch
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


def load_pretrained(path) -> tuple:
    """Returns (state dict, EVEConfig) from a folder written by save_pretrained (tools/consolidate.py)."""
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} does not exist (write it with tools/consolidate.py)")
    try:
        description = json.loads((path / CONFIG).read_text())
        config = EVEConfig.from_dict(description["model_config"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path / CONFIG}: not an eve-ds model config ({error})") from None
    try:
        state_dict = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / WEIGHTS}: cannot be read ({error})") from None
    return state_dict, config


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
