from eve_ds.objectives.masking import MaskingConfig, block_patch_mask, mask_text, random_patch_mask
from eve_ds.objectives.msm import normalized_pixel_targets, patchify
from eve_ds.objectives.pretraining import (DEFAULT_OBJECTIVES, OBJECTIVES, PretrainingModel, describe_objectives,
                                           loss_names, parse_objectives)

__all__ = ["MaskingConfig", "block_patch_mask", "mask_text", "random_patch_mask", "PretrainingModel",
           "normalized_pixel_targets", "patchify", "DEFAULT_OBJECTIVES", "OBJECTIVES", "describe_objectives",
           "loss_names", "parse_objectives"]
