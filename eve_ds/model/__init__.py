from eve_ds.model.eve import EVE, FeedForward, MultiwayBlock
from eve_ds.model.moe import ModalityAwareGate, ModalityAwareMoE, VISION, TEXT

__all__ = ["EVE", "FeedForward", "MultiwayBlock", "ModalityAwareGate", "ModalityAwareMoE", "VISION", "TEXT"]
