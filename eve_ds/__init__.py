"""eve-ds: a DeepSpeed trainer for EVE, a vision-language Transformer with modality-aware MoE."""
from eve_ds.config import EVEConfig, preset, PRESETS

__all__ = ["EVEConfig", "preset", "PRESETS"]
