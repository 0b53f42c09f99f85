"""Tests for eve_ds/objectives/masking.py: image patch masks, text masks and their config."""
import random

import pytest
import torch

from eve_ds.objectives.masking import (IGNORE_INDEX, MaskingConfig, block_patch_mask, mask_text,
                                       random_patch_mask)


def adjacent_pairs(mask: torch.Tensor, grid_size: int) -> int:
    """Number of horizontally or vertically adjacent pairs of masked patches."""
    grid = mask.view(grid_size, grid_size)
    return int((grid[:, 1:] & grid[:, :-1]).sum() + (grid[1:] & grid[:-1]).sum())


# ---------------------------------------------------------------- random_patch_mask


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.0), (16, 0.25), (36, 0.4), (36, 0.75), (196, 0.4),
                                               (196, 0.75), (196, 0.9)])
def test_random_patch_mask_masks_exact_count(num_patches, ratio):
    num_masked = round(ratio * num_patches)
    mask = random_patch_mask(num_patches, num_masked, random.Random("count"))
    assert mask.shape == (num_patches,)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == num_masked


def test_random_patch_mask_same_seed_same_mask():
    first = random_patch_mask(196, 147, random.Random("0:3:17"))
    second = random_patch_mask(196, 147, random.Random("0:3:17"))
    assert torch.equal(first, second)


def test_random_patch_mask_different_seed_different_mask():
    first = random_patch_mask(196, 147, random.Random("0:3:17"))
    second = random_patch_mask(196, 147, random.Random("0:4:17"))
    third = random_patch_mask(196, 147, random.Random("0:3:18"))
    assert not torch.equal(first, second)
    assert not torch.equal(first, third)
    assert not torch.equal(second, third)


# ---------------------------------------------------------------- block_patch_mask


@pytest.mark.parametrize("grid_size", [6, 14])
@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_block_patch_mask_masks_exact_count(grid_size, ratio):
    num_patches = grid_size**2
    num_masked = round(ratio * num_patches)
    for seed in range(20):
        mask = block_patch_mask(grid_size, num_masked, random.Random(f"block:{seed}"))
        assert mask.shape == (num_patches,)
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == num_masked, f"seed {seed}"


def test_block_patch_mask_exact_count_for_tiny_budgets():
    # Budgets below min_block_patches are filled by the random top-up alone.
    for num_masked in (0, 1, 3, 4, 5):
        mask = block_patch_mask(6, num_masked, random.Random(f"tiny:{num_masked}"))
        assert int(mask.sum()) == num_masked


@pytest.mark.parametrize("grid_size,num_masked", [(6, 14), (14, 78), (14, 147)])
def test_block_patch_mask_deterministic_per_seed(grid_size, num_masked):
    first = block_patch_mask(grid_size, num_masked, random.Random("0:1:5"))
    second = block_patch_mask(grid_size, num_masked, random.Random("0:1:5"))
    other = block_patch_mask(grid_size, num_masked, random.Random("0:2:5"))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_block_patch_mask_is_block_like():
    grid_size, num_patches = 14, 196
    num_masked = round(0.4 * num_patches)  # 78
    seeds = range(8)
    block = [adjacent_pairs(block_patch_mask(grid_size, num_masked, random.Random(f"b{s}")), grid_size)
             for s in seeds]
    scattered = [adjacent_pairs(random_patch_mask(num_patches, num_masked, random.Random(f"b{s}")), grid_size)
                 for s in seeds]
    block_mean, random_mean = sum(block) / len(block), sum(scattered) / len(scattered)
    # A uniform mask of 78 of 196 patches has 2*14*13 * (78*77)/(196*195) ~= 57 adjacent pairs on average.
    expected_random = 2 * grid_size * (grid_size - 1) * num_masked * (num_masked - 1) / (num_patches * (num_patches - 1))
    assert abs(random_mean - expected_random) < 0.25 * expected_random
    assert block_mean > 1.6 * random_mean, (block, scattered)
    assert min(block) > max(scattered), (block, scattered)


# ---------------------------------------------------------------- MaskingConfig


def test_masking_config_defaults_and_valid_values():
    config = MaskingConfig()
    assert (config.image_mask_ratio, config.image_masking, config.text_mask_ratio) == (0.75, "random", 0.5)
    MaskingConfig(image_mask_ratio=0.0, image_masking="block", text_mask_ratio=0.0)
    MaskingConfig(image_mask_ratio=0.99, image_masking="random", text_mask_ratio=0.99)


@pytest.mark.parametrize("key", ["image_mask_ratio", "text_mask_ratio"])
@pytest.mark.parametrize("value", [-0.1, -1e-9, 1.0, 1.5])
def test_masking_config_rejects_ratio_outside_unit_interval(key, value):
    with pytest.raises(ValueError, match=key):
        MaskingConfig(**{key: value})


@pytest.mark.parametrize("style", ["blocks", "Random", "", "grid"])
def test_masking_config_rejects_unknown_style(style):
    with pytest.raises(ValueError, match="image_masking"):
        MaskingConfig(image_masking=style)


# ---------------------------------------------------------------- mask_text

MASK_ID = 4
RANDOM_TOKENS = range(5, 500)


def make_sequence(num_real: int, max_len: int = 40):
    """[CLS] t1 .. tn [SEP] [PAD]...: ids of real tokens lie outside RANDOM_TOKENS so that a random
    replacement can always be told apart from an unchanged token."""
    ids = torch.zeros(max_len, dtype=torch.long)
    ids[0] = 2
    ids[1:num_real + 1] = torch.arange(1000, 1000 + num_real)
    ids[num_real + 1] = 3
    maskable = torch.zeros(max_len, dtype=torch.bool)
    maskable[1:num_real + 1] = True
    return ids, maskable


@pytest.mark.parametrize("num_real,ratio,expected", [
    (10, 0.5, 5),
    (10, 0.15, 2),   # round(1.5) = 2
    (10, 0.04, 1),   # round(0.4) = 0, but at least one when ratio > 0
    (20, 0.5, 10),
    (20, 0.75, 15),
    (30, 0.9, 27),
    (1, 0.5, 1),
])
def test_mask_text_chooses_round_ratio_times_maskable(num_real, ratio, expected):
    ids, maskable = make_sequence(num_real)
    for seed in range(5):
        inputs, labels = mask_text(ids, maskable, ratio, MASK_ID, RANDOM_TOKENS, random.Random(f"t{seed}"))
        chosen = labels != IGNORE_INDEX
        assert int(chosen.sum()) == expected
        # Only maskable positions get labels, and labels are the original ids there.
        assert not (chosen & ~maskable).any()
        assert torch.equal(labels[chosen], ids[chosen])
        assert (labels[~chosen] == IGNORE_INDEX).all()
        # Unchosen positions keep their ids; inputs keep shape and dtype; the argument is untouched.
        assert torch.equal(inputs[~chosen], ids[~chosen])
        assert inputs.shape == ids.shape and inputs.dtype == ids.dtype


def test_mask_text_does_not_modify_its_input():
    ids, maskable = make_sequence(20)
    before = ids.clone()
    mask_text(ids, maskable, 0.5, MASK_ID, RANDOM_TOKENS, random.Random("x"))
    assert torch.equal(ids, before)


def test_mask_text_ratio_zero_gives_no_labels():
    ids, maskable = make_sequence(20)
    inputs, labels = mask_text(ids, maskable, 0.0, MASK_ID, RANDOM_TOKENS, random.Random("zero"))
    assert (labels == IGNORE_INDEX).all()
    assert torch.equal(inputs, ids)


def test_mask_text_nothing_maskable_gives_no_labels():
    ids, _ = make_sequence(20)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    inputs, labels = mask_text(ids, maskable, 0.5, MASK_ID, RANDOM_TOKENS, random.Random("none"))
    assert (labels == IGNORE_INDEX).all()
    assert torch.equal(inputs, ids)


def test_mask_text_deterministic_per_seed():
    ids, maskable = make_sequence(30)
    first = mask_text(ids, maskable, 0.5, MASK_ID, RANDOM_TOKENS, random.Random("same"))
    second = mask_text(ids, maskable, 0.5, MASK_ID, RANDOM_TOKENS, random.Random("same"))
    other = mask_text(ids, maskable, 0.5, MASK_ID, RANDOM_TOKENS, random.Random("other"))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_mask_text_80_10_10_split():
    ids, maskable = make_sequence(30)
    masked = replaced = unchanged = 0
    for seed in range(400):
        inputs, labels = mask_text(ids, maskable, 0.5, MASK_ID, RANDOM_TOKENS, random.Random(f"split{seed}"))
        chosen = labels != IGNORE_INDEX
        chosen_inputs, originals = inputs[chosen], ids[chosen]
        is_mask = chosen_inputs == MASK_ID
        is_same = chosen_inputs == originals
        is_random = ~is_mask & ~is_same
        # Random replacements are drawn from the tokens given.
        assert all(token in RANDOM_TOKENS for token in chosen_inputs[is_random].tolist())
        masked += int(is_mask.sum())
        unchanged += int(is_same.sum())
        replaced += int(is_random.sum())
    total = masked + replaced + unchanged
    assert total == 400 * 15
    assert 0.75 < masked / total < 0.85
    assert 0.07 < replaced / total < 0.13
    assert 0.07 < unchanged / total < 0.13
