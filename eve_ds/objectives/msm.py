"""Masked signal modeling: reconstruct masked image pixels (MSE) and masked text tokens (cross entropy)."""
import torch
import torch.nn.functional as F
from torch import nn

from eve_ds.config import EVEConfig
from eve_ds.model import EVE, ExpertPlacement
from eve_ds.model.init import fresh_seed, init_modules_, seeded_generator
from eve_ds.objectives.masking import IGNORE_INDEX


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, num_patches, patch_size * patch_size * C], patches in raster order."""
    batch, channels, _, _ = images.shape
    patches = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(batch, -1, patch_size * patch_size * channels)


def normalized_pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Pixels of each patch normalised by the patch's own mean and variance (as in MAE)."""
    patches = patchify(images.float(), patch_size)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class MaskedSignalModeling(nn.Module):
    """EVE with its two pre-training heads; ``forward`` returns the loss and its parts."""

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None):
        super().__init__()
        self.config = config
        heads_seed = fresh_seed()
        self.encoder = EVE(config, placement)
        self.image_head = nn.Linear(config.hidden_size, config.patch_size**2 * config.in_channels)
        self.text_head = nn.Linear(config.hidden_size, config.vocab_size)
        init_modules_([self.image_head, self.text_head], config.init_std, seeded_generator(heads_seed))

    @classmethod
    def from_pretrained(cls, path, image_size: int = None, max_text_len: int = None) -> "MaskedSignalModeling":
        """Encoder and pre-training heads from a consolidated checkpoint folder of a pre-training run
        (tools/consolidate.py); the options are ``EVE.from_pretrained``'s, which loads the encoder of any folder."""
        from eve_ds.checkpoint.pretrained import PRETRAINING, CheckpointError, held_model, load_weights, open_pretrained

        held = held_model(path)
        if held.task != PRETRAINING:
            raise CheckpointError(f"{path} holds {held.describe()}, without the pre-training heads "
                                  "(EVE.from_pretrained loads its encoder)")
        weights, config = open_pretrained(path, image_size, max_text_len)
        return load_weights(cls(config), weights, path)

    def forward(self, images, image_mask, text_ids, text_labels, text_padding_mask):
        hidden, aux_loss = self.encoder(images, text_ids, text_padding_mask, image_mask)
        num_image_tokens = self.config.num_image_tokens

        patch_hidden = hidden[:, 1:num_image_tokens][image_mask]
        pixel_prediction = self.image_head(patch_hidden).float()
        pixel_target = normalized_pixel_targets(images, self.config.patch_size)[image_mask]
        image_loss = F.mse_loss(pixel_prediction, pixel_target, reduction="sum") / max(pixel_target.numel(), 1)

        chosen = text_labels != IGNORE_INDEX
        token_logits = self.text_head(hidden[:, num_image_tokens:][chosen]).float()
        text_loss = F.cross_entropy(token_logits, text_labels[chosen], reduction="sum") / chosen.sum().clamp(min=1)

        # aux_loss is the mean over MoE layers (EVE.forward), weighted 0.001 as the authors weight their gate loss.
        loss = image_loss + text_loss + self.config.aux_loss_weight * aux_loss
        return {"loss": loss, "image_loss": image_loss.detach(), "text_loss": text_loss.detach(),
                "aux_loss": aux_loss.detach()}
