"""One pre-training sample from an image and its caption: decoding, the authors' augmentation (``augment.py``),
masks."""
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eve_ds.data.augment import TrainingAugmentation, crop_draft_size, mirror, random_resized_crop
from eve_ds.data.augment import random_resized_crop_box  # noqa: F401 (its old home, still importable from here)
from eve_ds.data.text import may_mirror, pre_caption
from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.objectives.masking import MaskingConfig, block_patch_mask, mask_text, random_patch_mask

# Pillow's decompression-bomb warning (more pixels than Image.MAX_IMAGE_PIXELS) is raised as an error here:
# such an image is skipped, not decoded.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16- and 32-bit grey scaled down (not clipped to white), transparency laid
    on white, palette, CMYK and grey converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(grey, 0, 65535) / 257).round().astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_image(path, size: int, augmentation: TrainingAugmentation = None) -> torch.Tensor:
    """An image file as [3, size, size] in [-1, 1]: resized whole, or as ``augmentation`` makes it (fine-tuning's
    training view, ``augment.TrainingAugmentation``). Errors name the file."""
    try:
        data = Path(path).read_bytes()
        if augmentation is None:
            return decode_image(data, size)
        return to_pixels(augmentation(open_image(data, augmentation.draft_size(size)), size))
    except UNREADABLE_IMAGE_ERRORS as error:
        raise OSError(f"{path}: {error}") from error


def open_image(data: bytes, draft_size: int) -> Image.Image:
    """Image bytes as an RGB image (``to_rgb``); a JPEG decoded at the smallest reduced size that still covers
    ``draft_size`` on each side."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (draft_size, draft_size))
            return to_rgb(image)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as [3, H, W] in [-1, 1] (mean = std = 0.5)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1).div_(127.5).sub_(1.0)


def decode_image(data: bytes, size: int, rng=None, flip_allowed: bool = True) -> torch.Tensor:
    """Image bytes as [3, size, size] in [-1, 1]. With ``rng``, the authors' pre-training augmentation for pixel
    targets (``augment.py``: random resized crop, then a horizontal flip with probability 1/2 where
    ``flip_allowed``); without, the whole image resized."""
    if rng is None:
        return to_pixels(open_image(data, size).resize((size, size), Image.Resampling.BICUBIC))
    image = random_resized_crop(open_image(data, crop_draft_size(size)), size, rng)
    if flip_allowed and rng.random() < 0.5:
        image = mirror(image)
    return to_pixels(image)


# With ``normalize_text``, captions are cut to this many words, the authors' limit for captions in fine-tuning
# (their pre-training loader is not released).
CAPTION_WORDS = 30


class MaskedSamples:
    """Turns (image bytes, caption, rng) into a pre-training sample; every random choice (crop, flip, image mask,
    text masks) is drawn from the caller's rng, seeded per sample. With ``normalize_text``, the caption is normalised
    as the authors' ``pre_caption`` does (``text.py``) to CAPTION_WORDS words.

    Every sample holds masked signal modeling's inputs (``image_mask``, the masked caption ``text_ids`` and its
    ``text_labels``); the other ``objectives`` add theirs (``itc``, ``itm``: the caption unmasked as
    ``plain_text_ids``; ``mlm``: ``mlm_text_ids`` and ``mlm_text_labels``, masked at ``mlm_mask_ratio``), drawn after
    masked signal modeling's, so that its masks do not depend on the objectives."""

    def __init__(self, tokenizer: TextTokenizer, image_size: int, patch_size: int, masking: MaskingConfig,
                 augment: bool = True, normalize_text: bool = False, objectives=("msm", ),
                 mlm_mask_ratio: float = 0.15):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.grid_size = image_size // patch_size
        self.masking = masking
        self.augment = augment
        self.normalize_text = normalize_text
        self.objectives, self.mlm_mask_ratio = tuple(objectives), mlm_mask_ratio

    def make(self, image_data: bytes, caption: str, rng) -> dict:
        """Raises one of UNREADABLE_IMAGE_ERRORS for an image that cannot be decoded, and ``text.EmptyText`` (a
        ValueError) for a caption that normalisation leaves empty. The flip rule reads the caption as written."""
        flip_allowed = may_mirror(caption)
        return {**self.make_image(image_data, rng, flip_allowed), **self.make_text(caption, rng)}

    def make_image(self, image_data: bytes, rng, flip_allowed: bool = True) -> dict:
        """The image part of a sample (an image-only source's whole sample): ``images`` and ``image_mask``."""
        image = decode_image(image_data, self.image_size, rng if self.augment else None, flip_allowed=flip_allowed)
        num_patches = self.grid_size**2
        num_masked = round(self.masking.image_mask_ratio * num_patches)
        if self.masking.image_masking == "block":
            image_mask = block_patch_mask(self.grid_size, num_masked, rng)
        else:
            image_mask = random_patch_mask(num_patches, num_masked, rng)
        return {"images": image, "image_mask": image_mask}

    def make_text(self, caption: str, rng) -> dict:
        """The text part of a sample (a text-only source's whole sample): the masked ``text_ids``, ``text_labels``,
        ``text_padding_mask``, and the other objectives' inputs."""
        if self.normalize_text:
            caption = pre_caption(caption, CAPTION_WORDS)
        ids, padding_mask, maskable = self.tokenizer.encode(caption)
        text_ids, text_labels = mask_text(ids, maskable, self.masking.text_mask_ratio, self.tokenizer.mask_id,
                                          self.tokenizer.ordinary_ids, rng)
        sample = {"text_ids": text_ids, "text_labels": text_labels, "text_padding_mask": padding_mask}
        if "itc" in self.objectives or "itm" in self.objectives:
            sample["plain_text_ids"] = ids
        if "mlm" in self.objectives:
            sample["mlm_text_ids"], sample["mlm_text_labels"] = mask_text(
                ids, maskable, self.mlm_mask_ratio, self.tokenizer.mask_id, self.tokenizer.ordinary_ids, rng)
        return sample
