"""Where pre-training samples come from: tar shard sets and JSONL manifests, read as numbered positions.

A source holds image-text pairs, or, named with a prefix, images alone (``images:SHARDS``: samples with an image and
no caption) or texts alone (``texts:CORPUS.jsonl`` of ``{"text": ...}`` lines, or ``texts:SHARDS`` of ``.txt``
members); its ``modality`` says which ("pairs", "images", "texts").

A source is a list of units with known sample counts: the shards of a set (counted by its ``index.json``, or at
start-up where there is none) or the lines of a manifest (one sample each). An epoch of a source orders its
units by a permutation drawn from (seed, source, epoch) and numbers the samples of the units in that order 0, 1,
2, ...; readers ask for a range of those positions and get every position of it back, as (key, files) or, where
the data is missing (a truncated or unreadable shard, a malformed line, an unreadable image file), as the reason.

A shard set's permutation is a shuffled list of its shards (230,000 at LAION's size: 2 MB). A manifest's is a
bijection of its line numbers computed per position (``LineOrder``): no list of every line is made, so a manifest
of 12M lines costs its offsets (8 bytes a line, shared) and nothing per epoch.
"""
import hashlib
import os
import random
from collections import Counter
from itertools import accumulate
from pathlib import Path

import numpy as np

from eve_ds.data.manifest import ManifestLines, open_manifest
from eve_ds.data.shards import IMAGE_EXTENSIONS, SHARD_SUFFIXES, DataError, iter_shard, shard_counts, shard_names


class NoReadableData(DataError):
    """A reader passed over all its sources' positions without one usable sample."""


MODALITIES = ("pairs", "images", "texts")
PREFIXES = ("images:", "texts:")


def split_modality(spec: str) -> tuple:
    """(modality, the rest) of a source as ``--data`` names it: ``images:...``, ``texts:...``, or pairs."""
    spec = str(spec)
    for prefix in PREFIXES:
        if spec.startswith(prefix):
            return prefix[:-1], spec[len(prefix):]
    return "pairs", spec


def _named(name: str, modality: str) -> str:
    return name if modality == "pairs" else f"{modality}:{name}"


class ShardSet:
    """The shards of a pattern, folder or file (paths as strings), with the sample count of each."""

    def __init__(self, name: str, shards: tuple, counts: tuple, modality: str = "pairs"):
        self.name, self.units, self.counts, self.modality = _named(name, modality), shards, counts, modality
        self.total = sum(counts)

    def fingerprint(self) -> list:
        return [self.name, len(self.units), self.total]

    def describe(self) -> str:
        return f"{self.total} samples in {len(self.units)} shards"

    def epoch_order(self, source_index: int, epoch: int, seed: int) -> list:
        """The shards of an epoch, in the order their samples are numbered."""
        order = list(range(len(self.units)))
        random.Random(f"{seed}:units:{source_index}:{epoch}").shuffle(order)
        return order

    def unit_order(self) -> list:
        return list(range(len(self.units)))

    def read(self, order: list, start: int, stop: int):
        """For each position of [start, stop) of an epoch, in order: (key, files), or where the sample is lost the
        reason ("truncated shard", "unreadable shard"). A shard is only opened when one of its positions is asked
        for; the samples before ``start`` in it are passed over unread."""
        ends = accumulate(self.counts[unit] for unit in order)
        position = start
        for unit, end in zip(order, ends):
            if end <= position:
                continue
            if position >= stop:
                return
            first = position - (end - self.counts[unit])
            wanted = min(stop, end) - position
            lost = Counter()  # why the shard ended before the positions asked for: one reason
            samples = iter_shard(self.units[unit], lost, skip=first, stop=first + wanted)
            for _ in range(wanted):
                sample = next(samples, None)
                yield sample if sample is not None else next(iter(lost))
            position += wanted


class LineOrder:
    """A pseudo-random bijection of [0, size) drawn from ``key``: a balanced Feistel network on the smallest even
    number of bits that holds ``size``, walked again while a value falls outside (at most 4x the size: a few walks).
    ``LineOrder(size, None)`` is the identity."""
    ROUNDS = 4

    def __init__(self, size: int, key):
        self.size = size
        self.half = max(1, ((size - 1).bit_length() + 1) // 2)
        self.keys = None if key is None else [
            np.uint64(int.from_bytes(hashlib.sha256(f"{key}:{round_}".encode()).digest()[:8], "little"))
            for round_ in range(self.ROUNDS)]

    def __getitem__(self, positions) -> np.ndarray:
        values = np.asarray(positions, dtype=np.uint64)
        if self.keys is None:
            return values.astype(np.int64)
        values = self._permute(values)
        outside = values >= self.size
        while outside.any():
            values[outside] = self._permute(values[outside])
            outside = values >= self.size
        return values.astype(np.int64)

    def _permute(self, values: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = values >> half, values & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << half) | right


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


class Manifest:
    """The non-blank lines of a JSONL manifest, one sample each (an image-caption pair, or a text of a ``texts:``
    source); a line is parsed when it is read, and a malformed line is a lost sample."""
    READ_AHEAD = 1024  # positions whose line numbers are computed at once

    def __init__(self, name: str, lines: ManifestLines, modality: str = "pairs"):
        self.name, self.lines, self.total, self.modality = _named(name, modality), lines, len(lines), modality

    def fingerprint(self) -> list:
        return [self.name, self.total, self.total, "line order"]

    def describe(self) -> str:
        return f"{self.total} lines"

    def epoch_order(self, source_index: int, epoch: int, seed: int) -> LineOrder:
        return LineOrder(self.total, f"{seed}:lines:{source_index}:{epoch}")

    def unit_order(self) -> LineOrder:
        return LineOrder(self.total, None)

    def read(self, order: LineOrder, start: int, stop: int):
        """For each position of [start, stop): (key, files), or "malformed line" or "missing image", or None for a
        line of white space."""
        for first in range(start, stop, self.READ_AHEAD):
            for number in order[np.arange(first, min(stop, first + self.READ_AHEAD))]:
                yield self._sample(int(number))

    def _sample(self, number: int):
        try:
            record = self.lines.record(number)
        except ValueError:
            return "malformed line"
        if record is None:
            return None  # a line of white space: a place without a sample, not counted
        if self.modality == "texts":
            return f"{self.lines.path}:{number}", {"txt": record.encode("utf-8")}
        try:
            data = Path(record.image_path).read_bytes()
        except OSError:
            return "missing image"
        extension = Path(record.image_path).suffix.lower().lstrip(".")
        extension = extension if extension in IMAGE_EXTENSIONS else "jpg"  # Pillow reads the bytes, not the name
        return str(record.image_path), {extension: data, "txt": record.caption.encode("utf-8")}


def open_source(spec: str, index_cache=None):
    """A shard pattern, folder or file (a ``ShardSet``), or a JSONL manifest (a ``Manifest``), after the prefix of
    its modality if it has one (``split_modality``). Shards that no ``index.json`` beside them counts are counted
    now, and a manifest without an offsets file is scanned; where their folder is read-only, the counts and offsets
    are kept in ``index_cache`` (a folder: the run's)."""
    modality, spec = split_modality(spec)
    spec = spec.removeprefix("file://")
    if spec.endswith(".jsonl"):
        return Manifest(spec, open_manifest(spec, index_cache, "text" if modality == "texts" else "image-caption"),
                        modality)
    shards = shard_names(spec)
    _check_exist(spec, shards)
    counts = shard_counts(shards, spec, index_cache)
    if sum(counts) == 0:
        raise DataError(f"data source {spec} holds no sample: its {len(shards)} shards count 0")
    return ShardSet(spec, tuple(shards), tuple(counts), modality)


def check_source_exists(spec: str):
    """What ``open_source`` refuses first, without reading or counting anything: cheap enough for every rank to
    check before the distributed start."""
    modality, spec = split_modality(spec)
    spec = spec.removeprefix("file://")
    if spec.endswith(".jsonl") and modality == "images":
        raise DataError(f"images:{spec}: image-only sources are tar shards (samples with an image and no caption)")
    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise DataError(f"data source {spec} does not exist")
        return
    _check_exist(spec, shard_names(spec))


def _check_exist(spec: str, shards: list):
    """One listing per folder rather than a look-up per shard: a set may have 100,000 shards on a network disk."""
    if not shards:
        raise DataError(f"data source {spec} holds no shard ({', '.join(SHARD_SUFFIXES)})")
    places = [os.path.split(shard) for shard in shards]
    listings = {}
    for folder in dict.fromkeys(folder for folder, _ in places):
        try:
            listings[folder] = set(os.listdir(folder or "."))
        except OSError:  # no such folder, or not a folder
            listings[folder] = set()
    missing = [shard for shard, (folder, base) in zip(shards, places) if base not in listings[folder]]
    if len(missing) == len(shards):
        raise DataError(f"data source {spec} does not exist")
    if missing:
        raise DataError(f"data source {spec}: {len(missing)} of its {len(shards)} shards are missing, the first "
                        f"{missing[0]}")
