from eve_ds.objectives.masking import MaskingConfig, block_patch_mask, mask_text, random_patch_mask
from eve_ds.objectives.msm import MaskedSignalModeling, normalized_pixel_targets, patchify

__all__ = ["MaskingConfig", "block_patch_mask", "mask_text", "random_patch_mask", "MaskedSignalModeling",
           "normalized_pixel_targets", "patchify"]
