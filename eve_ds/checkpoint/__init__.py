from eve_ds.checkpoint.consolidate import CheckpointError, ConsolidatedCheckpoint, consolidate, resolve_tag_dir
from eve_ds.checkpoint.pretrained import load_pretrained, save_pretrained

__all__ = ["CheckpointError", "ConsolidatedCheckpoint", "consolidate", "resolve_tag_dir", "load_pretrained",
           "save_pretrained"]
