"""Where pre-training samples come from: tar shard sets and JSONL manifests, read as numbered positions.

A source is a list of units with known sample counts: the shards of a set (counted by its ``index.json``, or at
start-up where there is none) or the lines of a manifest (one sample each). An epoch of a source orders its
units by a permutation drawn from (seed, source, epoch) and numbers the samples of the units in that order 0, 1,
2, ...; readers ask for a range of those positions and get every position of it back, as (key, files) or, where
the data is missing (a truncated or unreadable shard, an unreadable image file), as the reason.
"""
import os
import random
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from eve_ds.data.manifest import read_manifest
from eve_ds.data.shards import IMAGE_EXTENSIONS, SHARD_SUFFIXES, DataError, expand_pattern, iter_shard, shard_counts


class NoReadableData(DataError):
    """A reader passed over all its sources' positions without one usable sample."""


@dataclass(frozen=True)
class Source:
    name: str  # the pattern or manifest as given
    units: tuple  # shard paths, or manifest records
    counts: tuple  # samples per unit
    is_manifest: bool
    malformed_lines: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> list:
        return [self.name, len(self.units), self.total]


def open_source(spec: str, index_cache=None) -> Source:
    """A shard pattern, folder or file, or a JSONL manifest. Shards that no ``index.json`` beside them counts are
    counted now; where their folder is read-only the counts are kept in ``index_cache`` (a folder: the run's)."""
    spec = str(spec).removeprefix("file://")
    if spec.endswith(".jsonl"):
        records, malformed = read_manifest(spec)
        return Source(spec, tuple(records), (1, ) * len(records), True, malformed)
    shards = expand_pattern(spec)
    _check_exist(spec, shards)
    counts = shard_counts(shards, spec, index_cache)
    if sum(counts) == 0:
        raise DataError(f"data source {spec} holds no sample: its {len(shards)} shards count 0")
    return Source(spec, tuple(shards), tuple(counts), False)


def check_source_exists(spec: str):
    """What ``open_source`` refuses first, without reading or counting anything: cheap enough for every rank to
    check before the distributed start."""
    spec = str(spec).removeprefix("file://")
    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise DataError(f"data source {spec} does not exist")
        return
    _check_exist(spec, expand_pattern(spec))


def _check_exist(spec: str, shards: list):
    """One listing per folder rather than a look-up per shard: a set may have 100,000 shards on a network disk."""
    if not shards:
        raise DataError(f"data source {spec} holds no shard ({', '.join(SHARD_SUFFIXES)})")
    listings = {}
    for folder in dict.fromkeys(shard.parent for shard in shards):
        try:
            listings[folder] = set(os.listdir(folder))
        except OSError:  # no such folder, or not a folder
            listings[folder] = set()
    missing = [shard for shard in shards if shard.name not in listings[shard.parent]]
    if len(missing) == len(shards):
        raise DataError(f"data source {spec} does not exist")
    if missing:
        raise DataError(f"data source {spec}: {len(missing)} of its {len(shards)} shards are missing, the first "
                        f"{missing[0]}")


def epoch_order(source: Source, source_index: int, epoch: int, seed: int) -> list:
    """The units of an epoch, in the order their samples are numbered."""
    order = list(range(len(source.units)))
    random.Random(f"{seed}:units:{source_index}:{epoch}").shuffle(order)
    return order


def read_positions(source: Source, order: list, start: int, stop: int):
    """For each position of [start, stop) of an epoch, in order: (key, files), or where the sample is lost the
    reason, a string ("truncated shard", "unreadable shard", "missing image"). A unit is only opened when one of
    its positions is asked for; the samples before ``start`` in it are passed over unread."""
    ends = list(accumulate(source.counts[unit] for unit in order))
    position = start
    for unit, end in zip(order, ends):
        if end <= position:
            continue
        if position >= stop:
            return
        first = position - (end - source.counts[unit])
        wanted = min(stop, end) - position
        lost = Counter()  # why the unit ended before the positions asked for: one reason
        samples = _read_unit(source, source.units[unit], first, wanted, lost)
        for _ in range(wanted):
            sample = next(samples, None)
            yield sample if sample is not None else next(iter(lost))
        position += wanted


def _read_unit(source: Source, unit, first: int, wanted: int, problems: Counter):
    if source.is_manifest:
        try:
            data = Path(unit.image_path).read_bytes()
        except OSError:
            problems["missing image"] += 1
            return
        extension = Path(unit.image_path).suffix.lower().lstrip(".")
        extension = extension if extension in IMAGE_EXTENSIONS else "jpg"  # Pillow reads the bytes, not the name
        yield str(unit.image_path), {extension: data, "txt": unit.caption.encode("utf-8")}
        return
    yield from iter_shard(unit, problems, skip=first, stop=first + wanted)
