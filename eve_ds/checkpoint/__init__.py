from eve_ds.checkpoint.consolidate import CheckpointError, ConsolidatedCheckpoint, consolidate, resolve_tag_dir
from eve_ds.checkpoint.pretrained import load_pretrained, save_pretrained
from eve_ds.checkpoint.released import export_released, import_released

__all__ = ["CheckpointError", "ConsolidatedCheckpoint", "consolidate", "resolve_tag_dir", "load_pretrained",
           "save_pretrained", "export_released", "import_released"]
