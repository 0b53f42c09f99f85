"""Validation of a pre-training run: the objectives' losses over a fixed set with fixed masks, and the picture of
the model's reconstructions that tensorboard shows at every validation."""
import logging
from contextlib import nullcontext

import numpy as np
import torch

from eve_ds.objectives import loss_names
from eve_ds.objectives.masking import IGNORE_INDEX
from eve_ds.trainer import all_reduce, to_device
from eve_ds.visualize import captured_predictions, readable_scale, reconstruction_grid, rows_of_batch

logger = logging.getLogger("eve_ds.pretrain")

# Validation samples drawn in tensorboard's val/reconstruction at every validation: the first of rank 0's first batch.
RECONSTRUCTION_ROWS = 4


@torch.no_grad()
def validate(engine, batches, patch_size: int, objectives: dict, first_batch: list = None) -> dict:
    """The objectives' losses over the validation set. Masked image, text and MLM losses are means over every
    masked pixel value or token of all ranks, so the grouping into batches and ranks does not change them; the
    contrastive and matching losses, which depend on the batch, are means over the batches of all ranks that hold
    no padding. Where ``first_batch`` is a list, (this rank's first batch, the predictions of its forward:
    ``visualize.captured_predictions``) is appended to it, taken from the validation forward itself: no extra pass,
    and under ZeRO-3 every rank runs the same forward passes as without it."""
    engine.eval()
    names = [name for name in ("image_loss", "text_loss", "mlm_loss", "itc_loss", "itm_loss")
             if name in loss_names(objectives)]
    sums = torch.zeros(2 * len(names), device=engine.device, dtype=torch.float64)  # loss x count, count per name
    for index, batch in enumerate(batches):
        padded = bool(batch.pop("padding").any())
        counts = {}  # the masked pixel values or tokens of each loss; a batch without images or texts has none
        if "image_mask" in batch:
            counts["image_loss"] = batch["image_mask"].sum() * patch_size**2 * batch["images"].shape[1]
        if "text_labels" in batch:
            counts["text_loss"] = (batch["text_labels"] != IGNORE_INDEX).sum()
        if "mlm_text_labels" in batch:
            counts["mlm_loss"] = (batch["mlm_text_labels"] != IGNORE_INDEX).sum()
        keep = first_batch is not None and index == 0
        with captured_predictions(engine.module) if keep and "msm" in objectives else nullcontext() as predictions:
            outputs = engine(**to_device(batch, engine))
        if keep:
            first_batch.append((batch, predictions))
        for place, name in enumerate(names):
            if name not in outputs:
                continue
            count = float(counts.get(name, 0.0 if padded else 1.0))
            sums[2 * place] += float(outputs[name]) * count
            sums[2 * place + 1] += count
    engine.train()
    totals = all_reduce(sums).tolist()
    return {f"val_{name}": totals[2 * place] / totals[2 * place + 1] for place, name in enumerate(names)
            if totals[2 * place + 1] > 0}


def reconstruction_picture(batch: dict, predictions, config, tokenizer):
    """The reconstruction grid (eve_ds/visualize.py) of the first RECONSTRUCTION_ROWS samples of ``batch`` (rank 0's
    first validation batch: the same samples with the same masks at every validation and on any world size), as an
    [H, W, 3] uint8 array (panels enlarged to ``readable_scale``); None where the batch holds padding only."""
    try:
        rows = rows_of_batch(batch, predictions, config.patch_size, tokenizer, count=RECONSTRUCTION_ROWS,
                             skip_unmasked=True)
    except ValueError as error:  # a picture is not worth a run: say why there is none and train on
        logger.warning("no val/reconstruction picture: %s", error)
        return None
    return np.asarray(reconstruction_grid(rows, readable_scale(config.image_size)).image) if rows else None
