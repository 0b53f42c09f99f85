"""Masks for masked signal modeling: image patches (random or BEiT-style block-wise) and text tokens.

Every mask is drawn from a ``random.Random`` the caller seeds per sample, so a sample's masks depend
only on (seed, epoch, index): a resumed run sees exactly the masks of an uninterrupted one.
"""
import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    image_mask_ratio: float = 0.75
    image_masking: str = "random"  # or "block"
    text_mask_ratio: float = 0.5

    def __post_init__(self):
        for key in ("image_mask_ratio", "text_mask_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must lie in [0, 1), got {getattr(self, key)}")
        if self.image_masking not in ("random", "block"):
            raise ValueError(f"image_masking must be 'random' or 'block', got {self.image_masking!r}")


def random_patch_mask(num_patches: int, num_masked: int, rng: random.Random) -> torch.Tensor:
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[rng.sample(range(num_patches), num_masked)] = True
    return mask


def block_patch_mask(grid_size: int, num_masked: int, rng: random.Random, min_block_patches: int = 4,
                     min_aspect: float = 0.3, attempts: int = 10) -> torch.Tensor:
    """Masks random rectangles of patches (aspect ratio in [min_aspect, 1/min_aspect], each at least
    ``min_block_patches``) until about ``num_masked`` patches are masked; the rest is topped up at random
    so that every sample masks exactly ``num_masked``."""
    mask = torch.zeros(grid_size, grid_size, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    while int(mask.sum()) < num_masked:
        budget = num_masked - int(mask.sum())
        if budget < min_block_patches:
            break
        added = 0
        for _ in range(attempts):
            area = rng.uniform(min_block_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < height < grid_size and 0 < width < grid_size):
                continue
            top, left = rng.randint(0, grid_size - height), rng.randint(0, grid_size - width)
            region = mask[top:top + height, left:left + width]
            added = int((~region).sum())
            if 0 < added <= budget:
                region.fill_(True)
                break
            added = 0
        if added == 0:
            break
    mask = mask.flatten()
    shortfall = num_masked - int(mask.sum())
    if shortfall > 0:
        free = (~mask).nonzero().flatten().tolist()
        mask[rng.sample(free, shortfall)] = True
    return mask


def mask_text(token_ids: torch.Tensor, maskable: torch.Tensor, ratio: float, mask_id: int,
              random_tokens: Sequence[int], rng: random.Random):
    """BERT-style masking of a [L] sequence: of the chosen positions 80% become [MASK], 10% a token drawn
    from ``random_tokens``, 10% stay. ``maskable`` marks positions that may be chosen (not special, not padding).
    Returns (input ids, labels with IGNORE_INDEX at unchosen positions)."""
    candidates = maskable.nonzero().flatten().tolist()
    count = min(len(candidates), max(1, round(ratio * len(candidates)))) if ratio > 0 else 0
    inputs, labels = token_ids.clone(), torch.full_like(token_ids, IGNORE_INDEX)
    for position in rng.sample(candidates, count):
        labels[position] = token_ids[position]
        draw = rng.random()
        if draw < 0.8:
            inputs[position] = mask_id
        elif draw < 0.9:
            inputs[position] = random_tokens[rng.randrange(len(random_tokens))]
    return inputs, labels
