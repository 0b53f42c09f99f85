"""Image-text manifests: JSONL, one ``{"image": PATH, "caption": TEXT}`` object per line.

Relative image paths resolve against the manifest's folder. Malformed lines are skipped and counted.
"""
from eve_ds.errors import UsageError
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class ManifestError(UsageError):
    pass


@dataclass(frozen=True)
class ImageTextRecord:
    image_path: Path
    caption: str


def parse_manifest_line(line: str, root: Path) -> ImageTextRecord:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    image, caption = entry.get("image"), entry.get("caption")
    if not isinstance(image, str) or not image:
        raise ValueError("'image' is missing or not a string")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("'caption' is missing, empty or not a string")
    return ImageTextRecord(root / image, caption)


def read_manifest(path) -> tuple:
    """Returns (records, number of skipped malformed lines). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    records, skipped = [], 0
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(parse_manifest_line(line, path.parent))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                skipped += 1
                logger.warning("%s:%d skipped: %s", path, line_number, error)
    if not records:
        raise ManifestError(f"manifest {path} has no valid image-caption line ({skipped} malformed)")
    return records, skipped
