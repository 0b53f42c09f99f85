from eve_ds.data.dataset import MaskedSamples
from eve_ds.data.manifest import ImageTextRecord, ManifestError, read_manifest
from eve_ds.data.sources import DataError, NoReadableData, open_source
from eve_ds.data.stream import PretrainingStream, StreamPosition
from eve_ds.data.tokenizer import TextTokenizer

__all__ = ["MaskedSamples", "ImageTextRecord", "ManifestError", "read_manifest", "DataError", "NoReadableData",
           "open_source", "PretrainingStream", "StreamPosition", "TextTokenizer"]
