from eve_ds.data.dataset import ImageTextDataset, ResumableShardSampler
from eve_ds.data.manifest import ImageTextRecord, ManifestError, read_manifest
from eve_ds.data.tokenizer import TextTokenizer

__all__ = ["ImageTextDataset", "ResumableShardSampler", "ImageTextRecord", "ManifestError", "read_manifest",
           "TextTokenizer"]
