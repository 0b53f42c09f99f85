"""One pre-training sample from an image and its caption: decoding, the authors' augmentation, masks."""
import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def load_image(path, size: int) -> torch.Tensor:
    """An image file as [3, size, size] in [-1, 1], resized whole (no augmentation). Errors name the file."""
    try:
        return decode_image(Path(path).read_bytes(), size)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise OSError(f"{path}: {error}") from error


# The authors' pre-training augmentation for pixel targets: a random crop of 50-100% of the area (aspect
# ratio 3/4-4/3) resized bicubically, and a horizontal flip unless the caption names a side (``text.may_mirror``).
CROP_SCALE, CROP_RATIO = (0.5, 1.0), (3 / 4, 4 / 3)
# With ``normalize_text``, captions are cut to this many words, the authors' limit for captions in fine-tuning
# (their pre-training loader is not released).
CAPTION_WORDS = 30


def random_resized_crop_box(width: int, height: int, rng) -> tuple:
    """(left, top, right, bottom) of a crop covering CROP_SCALE of the area with an aspect ratio in
    CROP_RATIO (log-uniform); the central square-ish crop where ten draws do not fit."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_width, crop_height = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
            return left, top, left + crop_width, top + crop_height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode_image(data: bytes, size: int, rng=None, flip_allowed: bool = True) -> torch.Tensor:
    """Image bytes as [3, size, size] in [-1, 1]. With ``rng``, the authors' augmentation (random resized crop,
    and a horizontal flip where ``flip_allowed``); without, the whole image resized. A JPEG is decoded at the
    smallest reduced size that still covers the crop."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            cover = size if rng is None else math.ceil(size / math.sqrt(CROP_SCALE[0]))
            image.draft("RGB", (cover, cover))
            image = to_rgb(image)
    box = None if rng is None else random_resized_crop_box(*image.size, rng)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng is not None and flip_allowed and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1).div_(127.5).sub_(1.0)


class MaskedSamples:
    """Turns (image bytes, caption, rng) into a masked-signal-modeling sample; every random choice (crop,
    flip, image mask, text mask) is drawn from the caller's rng, seeded per sample. With ``normalize_text``, the
    caption is normalised as the authors' ``pre_caption`` does (``text.py``) to CAPTION_WORDS words."""

    def __init__(self, tokenizer: TextTokenizer, image_size: int, patch_size: int, masking: MaskingConfig,
                 augment: bool = True, normalize_text: bool = False):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.grid_size = image_size // patch_size
        self.masking = masking
        self.augment = augment
        self.normalize_text = normalize_text

    def make(self, image_data: bytes, caption: str, rng) -> dict:
        """Raises one of UNREADABLE_IMAGE_ERRORS for an image that cannot be decoded, and ``text.EmptyText`` (a
        ValueError) for a caption that normalisation leaves empty. The flip rule reads the caption as written."""
        flip_allowed = may_mirror(caption)
        if self.normalize_text:
            caption = pre_caption(caption, CAPTION_WORDS)
        image = decode_image(image_data, self.image_size, rng if self.augment else None, flip_allowed=flip_allowed)
        num_patches = self.grid_size**2
        num_masked = round(self.masking.image_mask_ratio * num_patches)
        if self.masking.image_masking == "block":
            image_mask = block_patch_mask(self.grid_size, num_masked, rng)
        else:
            image_mask = random_patch_mask(num_patches, num_masked, rng)
        ids, padding_mask, maskable = self.tokenizer.encode(caption)
        text_ids, text_labels = mask_text(ids, maskable, self.masking.text_mask_ratio, self.tokenizer.mask_id,
                                          self.tokenizer.ordinary_ids, rng)
        return {"images": image, "image_mask": image_mask, "text_ids": text_ids, "text_labels": text_labels,
                "text_padding_mask": padding_mask}
