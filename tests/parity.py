"""What a distributed step and its single-process reference share: the model and the batch."""
import torch

from eve_ds.config import preset

SEED = 0
PARITY_CONFIG = preset("eve-tiny").replace(vocab_size=300, drop_path_rate=0.1, capacity_factor=1.5)


def global_batch(size: int) -> dict:
    config = PARITY_CONFIG
    generator = torch.Generator().manual_seed(1)
    text_ids = torch.randint(5, config.vocab_size, (size, config.max_text_len), generator=generator)
    lengths = torch.randint(8, config.max_text_len + 1, (size, 1), generator=generator)
    padding = torch.arange(config.max_text_len) < lengths
    labels = torch.where((torch.rand(size, config.max_text_len, generator=generator) < 0.4) & padding, text_ids, -100)
    return {"images": torch.rand(size, 3, config.image_size, config.image_size, generator=generator) * 2 - 1,
            "image_mask": torch.rand(size, config.num_patches, generator=generator) < 0.75,
            "text_ids": text_ids, "text_labels": labels, "text_padding_mask": padding}


def shard(batch: dict, rank: int, world_size: int) -> dict:
    return {key: value.chunk(world_size)[rank] for key, value in batch.items()}
