"""Map-style image-text dataset producing masked-signal-modeling samples, and a resumable sampler."""
import logging
import random
import warnings

import numpy as np
import torch
from PIL import Image

from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.objectives.masking import MaskingConfig, block_patch_mask, mask_text, random_patch_mask

logger = logging.getLogger(__name__)

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
    """RGB image resized to size x size, scaled to [-1, 1], as [3, size, size]. No flips: captions say
    "left" and "right". A JPEG larger than the target is decoded at a reduced size."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            image = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1).div_(127.5).sub_(1.0)


class ImageTextDataset(torch.utils.data.Dataset):
    """Each item: the image, its patch mask, the masked caption and its labels.

    Masks come from a generator seeded by (seed, epoch, index). A record whose image cannot be read is
    replaced by the next readable one, so batch shapes stay fixed (expert parallelism needs every rank
    to route the same number of tokens); the item's ``skipped`` field counts the records passed over.
    """

    def __init__(self, records, tokenizer: TextTokenizer, image_size: int, patch_size: int,
                 masking: MaskingConfig, seed: int = 0):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.grid_size = image_size // patch_size
        self.masking = masking
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        for skipped in range(len(self.records)):
            record = self.records[(index + skipped) % len(self.records)]
            try:
                image = load_image(record.image_path, self.image_size)
            except UNREADABLE_IMAGE_ERRORS as error:
                logger.warning("skipped unreadable image %s: %s", record.image_path, error)
                continue
            sample = self._masked_sample(image, record.caption, random.Random(f"{self.seed}:{self.epoch}:{index}"))
            sample["skipped"] = skipped
            return sample
        raise RuntimeError("no image of the data set could be read")

    def _masked_sample(self, image, caption: str, rng: random.Random) -> dict:
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


class ResumableShardSampler(torch.utils.data.Sampler):
    """Shuffles once per epoch with (seed, epoch), gives this data-parallel rank its strided share
    (dropping the tail so that every rank gets the same count), and can start mid-epoch."""

    def __init__(self, dataset_size: int, rank: int, world_size: int, seed: int = 0):
        if dataset_size < world_size:
            raise ValueError(f"data set of {dataset_size} samples is smaller than the {world_size} data-parallel ranks")
        self.dataset_size, self.rank, self.world_size, self.seed = dataset_size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0):
        """Epoch to draw from and how many of this rank's samples of it are already consumed."""
        if not 0 <= start <= self.dataset_size // self.world_size:
            raise ValueError(f"start {start} is outside this rank's {self.dataset_size // self.world_size} samples")
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.dataset_size // self.world_size - self.start

    def __iter__(self):
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        per_rank = self.dataset_size // self.world_size
        mine = order[self.rank:per_rank * self.world_size:self.world_size]
        return iter(mine[self.start:].tolist())
