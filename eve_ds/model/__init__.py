from eve_ds.model.eve import EVE, FeedForward, MultiwayBlock
from eve_ds.model.moe import ExpertPlacement, ModalityAwareGate, ModalityAwareMoE, VISION, TEXT

__all__ = ["EVE", "ExpertPlacement", "FeedForward", "MultiwayBlock", "ModalityAwareGate", "ModalityAwareMoE", "VISION",
           "TEXT"]
