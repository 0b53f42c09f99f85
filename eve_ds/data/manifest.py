"""JSONL manifests: image-text ones, one ``{"image": PATH, "caption": TEXT}`` object per line, and text corpora, one
``{"text": TEXT}`` per line (``texts:`` sources).

Relative image paths resolve against the manifest's folder. A manifest is held as the byte offsets of its
non-blank lines (``ManifestLines``, 8 bytes a line), found by one scan of the file and kept in an offsets file
that later starts, other ranks and loader workers read instead of scanning again; a line is parsed when it is
read, and a malformed one is skipped and counted then.
"""
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eve_ds.data.shards import run_cache_file
from eve_ds.errors import UsageError

logger = logging.getLogger(__name__)

OFFSETS_SUFFIX = ".offsets"
_MAGIC = b"eve-ds manifest offsets v1\n"
# 64 bytes, so that the offsets after it are aligned
_HEADER = np.dtype([("magic", "S40"), ("size", "<i8"), ("mtime_ns", "<i8"), ("lines", "<i8")])
_SCAN_CHUNK = 64 * 2**20
_LINE_READ = 4096
# Lines parsed when a manifest is opened: a file in which none of them is an image-caption line is refused then.
FIRST_LINES_CHECKED = 100


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


def parse_text_line(line: str, root: Path) -> str:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' is missing, empty or not a string")
    return text


# What a manifest's lines hold: its parser, and the name of a valid line in messages.
LINE_KINDS = {"image-caption": parse_manifest_line, "text": parse_text_line}


def line_offsets(path: Path) -> np.ndarray:
    """The byte offset of each line of a file that holds more than a newline ("\n" or "\r\n"), int64: one pass
    over the file in fixed-size chunks. A line of other white space is kept (``ManifestLines.record`` passes over
    it)."""
    size = path.stat().st_size
    if size == 0:
        return np.empty(0, np.int64)
    data = np.memmap(path, np.uint8, "r")
    newlines = np.concatenate([np.flatnonzero(data[start:start + _SCAN_CHUNK] == 10) + start
                               for start in range(0, size, _SCAN_CHUNK)]).astype(np.int64)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [size]])  # the last "line" is empty where the file ends with a newline
    lengths = ends - starts
    keep = lengths > 0
    carriage = np.flatnonzero(lengths == 1)
    keep[carriage] = data[starts[carriage]] != 13
    offsets = starts[keep]
    del data
    return offsets


class ManifestLines:
    """The non-blank lines of a manifest by number, read from the file where they are asked for. Their offsets are
    an array, or the offsets file (``offsets_file``) where there is one: each look-up reads its 8 bytes from it
    (page cache, which the processes share), so a process holds none of it. Pickled, such a manifest carries the
    file's name rather than its offsets. Reads are positional (pread): forked loader workers share descriptors."""

    def __init__(self, path, offsets: np.ndarray = None, offsets_file: Path = None, lines: int = None,
                 kind: str = "image-caption"):
        self.path, self.offsets, self.offsets_file, self.kind = Path(path), offsets, offsets_file, kind
        self.lines = len(offsets) if offsets is not None else lines
        self._file = self._offsets = None

    def __len__(self) -> int:
        return self.lines

    def offset(self, number: int) -> int:
        if self.offsets is not None:
            return int(self.offsets[number])
        if self._offsets is None:
            self._offsets = os.open(self.offsets_file, os.O_RDONLY)
        return int.from_bytes(os.pread(self._offsets, 8, _HEADER.itemsize + 8 * number), "little", signed=True)

    def line(self, number: int) -> bytes:
        """Line ``number`` without its newline."""
        if not 0 <= number < self.lines:
            raise IndexError(f"line {number} of a manifest of {self.lines}")
        if self._file is None:
            self._file = os.open(self.path, os.O_RDONLY)
        start, parts = self.offset(number), []
        while True:
            part = os.pread(self._file, _LINE_READ, start)
            end = part.find(b"\n")
            if end >= 0 or len(part) < _LINE_READ:
                parts.append(part if end < 0 else part[:end])
                return b"".join(parts)
            parts.append(part)
            start += len(part)

    def record(self, number: int):
        """The record of line ``number`` (an ``ImageTextRecord``, or a text), None where it holds only white space;
        ValueError where it is malformed (not UTF-8 included)."""
        line = self.line(number).decode("utf-8")
        return LINE_KINDS[self.kind](line, self.path.parent) if line.strip() else None

    def __getstate__(self):
        return {"path": self.path, "offsets": self.offsets, "offsets_file": self.offsets_file, "lines": self.lines,
                "kind": self.kind}

    def __setstate__(self, state):
        self.__init__(state["path"], state["offsets"], state["offsets_file"], state["lines"], state["kind"])


def open_manifest(path, cache=None, kind: str = "image-caption") -> ManifestLines:
    """A manifest's lines by their offsets: from its offsets file (``MANIFEST.offsets`` beside it, else one in
    ``cache``, a folder: the run's), written by the first start that scans the manifest, where it can be; a file
    written for another size or time of change of the manifest is scanned again. A manifest none of whose first
    FIRST_LINES_CHECKED lines is a valid line of its ``kind`` (``LINE_KINDS``) is refused."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    stat = path.stat()
    places = [path.with_name(path.name + OFFSETS_SUFFIX)]
    if cache is not None:
        places.append(run_cache_file(cache, path, "manifest", OFFSETS_SUFFIX))
    lines = next((ManifestLines(path, offsets_file=place, lines=count, kind=kind) for place in places
                  if (count := _counted_lines(place, stat)) is not None), None)
    if lines is None:
        offsets = line_offsets(path)
        place = next((place for place in places if _write_offsets(place, offsets, stat)), None)
        lines = ManifestLines(path, offsets, kind=kind) if place is None else ManifestLines(
            path, offsets_file=place, lines=len(offsets), kind=kind)
        if place is None:
            logger.warning("the line offsets of %s could not be written beside it%s: every start scans it again",
                           path, " nor in " + str(cache) if cache is not None else "")
    _check_first_lines(lines)
    return lines


def _check_first_lines(lines: ManifestLines):
    checked = min(len(lines), FIRST_LINES_CHECKED)
    for number in range(checked):
        try:
            if lines.record(number) is not None:
                return
        except ValueError:
            continue
    where = f"({checked} malformed)" if checked == len(lines) else f"in its first {checked} lines"
    raise ManifestError(f"manifest {lines.path} has no valid {lines.kind} line {where}")


def _counted_lines(place: Path, stat):
    """The number of lines in ``place`` where it is an offsets file of the manifest as it is now; else None."""
    try:
        header = np.fromfile(place, _HEADER, count=1)
    except (OSError, ValueError):
        return None
    if len(header) != 1 or header["magic"][0] != _MAGIC:
        return None
    size, mtime_ns, lines = (int(header[key][0]) for key in ("size", "mtime_ns", "lines"))
    if (size, mtime_ns) != (stat.st_size, stat.st_mtime_ns) or place.stat().st_size != _HEADER.itemsize + 8 * lines:
        return None
    return lines


def _write_offsets(place: Path, offsets: np.ndarray, stat) -> bool:
    """Written atomically (ranks may write it at once); False where it cannot be."""
    from eve_ds.checkpoint.pretrained import write_atomically  # eve_ds.checkpoint imports eve_ds.data

    header = np.array([(_MAGIC, stat.st_size, stat.st_mtime_ns, len(offsets))], _HEADER)
    try:
        place.parent.mkdir(parents=True, exist_ok=True)
        content = header.tobytes() + offsets.astype("<i8").tobytes()
        write_atomically(place, lambda temporary: temporary.write_bytes(content), concurrent=True)
        return True
    except OSError:
        return False


def read_manifest(path) -> tuple:
    """(records, number of skipped malformed lines) of a whole manifest, held in memory: for small ones (tools,
    benchmarks); training reads manifests through ``open_manifest``. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    lines = ManifestLines(path, line_offsets(path))
    records, skipped = [], 0
    for number in range(len(lines)):
        try:
            record = lines.record(number)
            if record is not None:
                records.append(record)
        except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            skipped += 1
            logger.warning("%s: line %d of its non-blank lines skipped: %s", path, number + 1, error)
    if not records:
        raise ManifestError(f"manifest {path} has no valid image-caption line ({skipped} malformed)")
    return records, skipped
