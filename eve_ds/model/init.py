"""EVE's initial weights: a truncated normal of std ``init_std`` for the weights of linear, convolution and
embedding layers and for learned vectors, zero biases, unit norms; the learned position embeddings start either so
too or as fixed sine-cosine tables (``sincos_positions``), which they leave in training.

Draws are made on the CPU from a generator the model owns (seeded by one draw of the global RNG, which every
rank seeds alike), so the weights come out the same on any device, for any expert layout, and whether or not
``deepspeed.zero.Init`` partitions each module's parameters as soon as it is built: a module's parameters are
gathered while they are written (``whole``), which does nothing to parameters that are not partitioned.
"""
from contextlib import contextmanager

import numpy as np
import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from torch import nn


def fresh_seed(generator: torch.Generator = None) -> int:
    """One draw of ``generator``, or of the global RNG."""
    return int(torch.randint(0, 2**62, (), generator=generator, device="cpu").item())


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def whole(module: nn.Module):
    """The module's own parameters, gathered from their ZeRO-3 partitions while in the context; what is
    written to them is kept (every rank writes the same values; the first rank of each partition group's are
    broadcast)."""
    with GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
        yield


@torch.no_grad()
def trunc_normal_(param: torch.Tensor, std: float, generator: torch.Generator):
    if param.is_meta:  # a model built on the meta device only to count its parameters
        return
    # In fp32 whatever the model's dtype: inside a bf16 deepspeed.zero.Init, torch.empty makes bf16 tensors even
    # when asked for fp32 (Tensor.new_empty is left alone), and a bf16 draw can differ from the rounded fp32 one.
    value = param.new_empty(param.shape, dtype=torch.float32, device="cpu")
    nn.init.trunc_normal_(value, std=std, generator=generator)
    param.copy_(value)


@torch.no_grad()
def init_module_(module: nn.Module, std: float, generator: torch.Generator):
    """Initialises the module's own parameters (not its children's): linear, convolution and embedding layers
    and norms by type, and any parameters the module names in ``normal_init_parameters``."""
    with whole(module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            trunc_normal_(module.weight, std, generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        for name in getattr(module, "normal_init_parameters", ()):
            trunc_normal_(getattr(module, name), std, generator)


def init_modules_(modules, std: float, generator: torch.Generator):
    for module in modules:
        init_module_(module, std, generator)


def sincos_table(positions, width: int) -> torch.Tensor:
    """[len(positions), width]: sines in the first half, cosines in the second, at the transformer's geometric
    frequencies 1 / 10000^(i / (width/2)). Computed in numpy: inside ``deepspeed.zero.Init`` torch's tensor factories
    make tensors of the model's dtype, and a float64 ``arange`` would come out float32 (and other values)."""
    frequencies = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width // 2))
    angles = np.asarray(positions, dtype=np.float64)[:, None] * frequencies[None]
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32))


def sincos_positions(grid_size: int, width: int) -> torch.Tensor:
    """[grid_size**2, width], raster order: the first half of the channels encode the row, the second the column
    (MAE's 2-D table). Every entry lies in [-1, 1], a scale a patch's embedding starts at, so from the first step a
    patch's token says where it is: a position embedding drawn with std 0.02 is a few percent of a patch's embedding
    after the joint layer norm, and a small model trained for thousands of steps never learns to read it."""
    if width % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {width}")
    rows, columns = np.divmod(np.arange(grid_size * grid_size), grid_size)
    return torch.cat([sincos_table(rows, width // 2), sincos_table(columns, width // 2)], dim=1)
