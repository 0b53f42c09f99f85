"""Where pre-training samples come from: tar shard sets and JSONL manifests, read as numbered positions.

A source is a list of units with known sample counts: the shards of a set (counted by its ``index.json``) or
the lines of a manifest (one sample each). An epoch of a source orders its units by a permutation drawn from
(seed, source, epoch) and numbers the samples of the units in that order 0, 1, 2, ...; readers ask for a range
of those positions and get every position of it back, as (key, files) or, where the data is missing (a
truncated or unreadable shard, an unreadable image file), as None.
"""
import random
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from eve_ds.data.manifest import read_manifest
from eve_ds.data.shards import IMAGE_EXTENSIONS, expand_pattern, iter_shard, read_index


class DataError(ValueError):
    pass


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


def open_source(spec: str) -> Source:
    """A shard pattern, folder or file (counted by the ``index.json`` beside the shards), or a JSONL manifest."""
    spec = str(spec).removeprefix("file://")
    if spec.endswith(".jsonl"):
        records, malformed = read_manifest(spec)
        return Source(spec, tuple(records), (1, ) * len(records), True, malformed)
    shards = expand_pattern(spec)
    if not shards:
        raise DataError(f"{spec} names no shard")
    counts, indexes = [], {}
    for shard in shards:
        index = indexes.setdefault(shard.parent, read_index(shard.parent))
        if shard.name not in index:
            raise DataError(f"{shard} is not counted in {shard.parent / 'index.json'}: shards written by "
                            f"tools/make_shards.py have one; for others (img2dataset's) run "
                            f"python tools/index_shards.py '{spec}'")
        counts.append(index[shard.name])
    if sum(counts) == 0:
        raise DataError(f"{spec}: its index counts no sample")
    return Source(spec, tuple(shards), tuple(counts), False)


def epoch_order(source: Source, source_index: int, epoch: int, seed: int) -> list:
    """The units of an epoch, in the order their samples are numbered."""
    order = list(range(len(source.units)))
    random.Random(f"{seed}:units:{source_index}:{epoch}").shuffle(order)
    return order


def read_positions(source: Source, order: list, start: int, stop: int, problems: Counter):
    """(key, files) or None for each position of [start, stop) of an epoch, in order. A unit is only opened
    when one of its positions is asked for; the samples before ``start`` in it are passed over unread."""
    ends = list(accumulate(source.counts[unit] for unit in order))
    position = start
    for unit, end in zip(order, ends):
        if end <= position:
            continue
        if position >= stop:
            return
        first = position - (end - source.counts[unit])
        wanted = min(stop, end) - position
        samples = _read_unit(source, source.units[unit], first, wanted, problems)
        for _ in range(wanted):
            yield next(samples, None)
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
    for index, sample in enumerate(iter_shard(unit, problems, skip=first)):
        if index >= wanted:
            return
        yield sample
