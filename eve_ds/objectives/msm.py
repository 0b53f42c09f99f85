"""Masked signal modeling's pixel targets: masked image patches are reconstructed (MSE) as their pixels normalised
per patch; masked text tokens by cross entropy (``pretraining.PretrainingModel``, which computes both)."""
import torch


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
