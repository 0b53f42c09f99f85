"""Image-text pairs in webdataset-style tar shards, as img2dataset writes them: the files of one sample lie
next to each other and share a key, ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``), ``KEY.txt`` (the
caption) and ``KEY.json`` (metadata; eve-ds keeps every caption of a sample under ``"captions"``). Shards are
``.tar``, ``.tar.gz`` or ``.tgz``; shard sets are named by brace patterns (``cc3m/{00000..00331}.tar``), and
``index.json`` beside the shards counts the samples of each (``shard_counts`` counts those it lacks).

Read with the standard library's ``tarfile`` rather than the ``webdataset`` package: the loader has to know
exactly how many samples it consumed, which is simplest when eve-ds owns the iteration.
"""
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from eve_ds.errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX = "index.json"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


class DataError(UsageError):
    pass


def expand_pattern(pattern) -> list:
    """Shard paths of a brace pattern (``{00000..00331}``, ``{a,b}``), a folder (its shards) or one file, as Paths."""
    return [Path(name) for name in shard_names(pattern)]


def shard_names(pattern) -> list:
    """``expand_pattern`` as strings, which a set of 230,000 shards opens with in a fraction of the Paths' time. Names
    that end in a shard suffix are taken as they are, without a look at the filesystem (as many metadata calls on
    every rank, on a network disk); any other name, a folder, stands for its shards."""
    names = []
    for name in _braces(str(pattern)):
        if name.endswith(SHARD_SUFFIXES) or not os.path.isdir(name):
            names.append(name)
        else:
            names += sorted(str(path) for suffix in SHARD_SUFFIXES for path in Path(name).glob(f"*{suffix}"))
    return names


def _braces(pattern: str) -> list:
    """The names of a brace pattern, as the shell expands them (the leftmost group varies slowest)."""
    groups = [match for match in (_RANGE.search(pattern), _CHOICE.search(pattern)) if match]
    if not groups:
        return [pattern]
    match = min(groups, key=lambda m: m.start())
    if match.re is _RANGE:
        first, last = match[1], match[2]
        if int(last) < int(first):
            raise DataError(f"shard pattern {pattern!r}: range {{{first}..{last}}} runs backwards")
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = match[1].split(",")
    head, tail = pattern[:match.start()], _braces(pattern[match.end():])
    return [head + choice + rest for choice in choices for rest in tail]


def iter_shard(path, problems: Counter, skip: int = 0, stop: int = None):
    """(key, {extension: bytes}) for samples [skip, stop) of a shard, in order; the first ``skip`` are passed over
    without being extracted. It never raises. Given ``stop`` (from the shard's count in its index), every sample of
    the range that the shard does not deliver counts 1 in ``problems``: "unreadable shard" where the shard cannot
    be opened, else "truncated shard" (cut off, or a damaged header, which the streaming reader silently takes for
    the end of the archive). Without ``stop`` the loss is unknown and a damaged shard counts 1."""
    key, files, seen, delivered, opened, damaged = None, {}, 0, 0, False, False
    wanted = None if stop is None else stop - skip
    try:
        with tarfile.open(path, mode="r|*") as archive:  # a stream: no seeking, as over a network file
            opened = True
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                member_key, _, extension = name.partition(".")
                if member_key != key:
                    if files:
                        yield key, files
                        delivered, files = delivered + 1, {}
                        if delivered == wanted:
                            return
                    key, seen = member_key, seen + 1
                if seen <= skip:
                    continue
                data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError(f"{name}: {len(data)} of {member.size} bytes")
                files[extension.lower()] = data
        if files:
            yield key, files
            delivered += 1
    except (tarfile.TarError, EOFError, OSError):  # the sample being read when the data ran out is lost
        damaged = True
    reason = "truncated shard" if opened else "unreadable shard"
    if wanted is not None and delivered < wanted:
        problems[reason] += wanted - delivered
    elif wanted is None and damaged:
        problems[reason] += 1


def captions_of(files: dict, problems: Counter) -> list:
    """Every caption of a sample: the json's ``"captions"`` where there are several, else the txt. Missing,
    empty or non-UTF-8 text counts in ``problems`` and gives no caption."""
    if "json" in files:
        try:
            captions = json.loads(files["json"].decode("utf-8")).get("captions")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            captions = None
        if isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions):
            return captions
    if "txt" not in files:
        problems["missing caption"] += 1
        return []
    try:
        caption = files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        problems["non-UTF-8 caption"] += 1
        return []
    if not caption:
        problems["empty caption"] += 1
        return []
    return [caption]


def image_of(files: dict):
    """(extension, bytes) of a sample's image, or None."""
    return next(((extension, files[extension]) for extension in IMAGE_EXTENSIONS if extension in files), None)


def add_sample(archive: tarfile.TarFile, key: str, image: tuple, captions: list):
    """Writes one sample: the image as it is, the first caption as txt, every caption in the json."""
    extension, data = image
    for name, payload in ((f"{key}.{extension}", data), (f"{key}.txt", captions[0].encode("utf-8")),
                          (f"{key}.json", json.dumps({"captions": captions}).encode("utf-8"))):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))


def read_index(folder) -> dict:
    """{shard file name: sample count} of ``index.json`` in a shard folder ({} where there is none)."""
    return _read_counts(Path(folder) / INDEX)


def write_index(folder, counts: dict):
    _write_counts(Path(folder) / INDEX, counts)


def count_samples(shard) -> tuple:
    """(samples, problems) of one shard, read whole."""
    problems = Counter()
    return sum(1 for _ in iter_shard(shard, problems)), problems


def count_shards(shards: list, problems: Counter, name: str, workers: int = None) -> dict:
    """{shard: samples} of shards that no index counts, read in parallel processes (by default min(8, CPUs)), with
    a progress line on the log every half minute; what damaged shards hold is counted, the damage in ``problems``."""
    workers = min(workers or min(8, os.cpu_count() or 1), len(shards))
    counts, logged = {}, time.monotonic()
    logger.info("counting %d shards of %s without an index", len(shards), name)
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        results = pool.map(count_samples, shards) if pool else map(count_samples, shards)
        for done, (shard, (count, shard_problems)) in enumerate(zip(shards, results), 1):
            counts[shard] = count
            problems.update(shard_problems)
            if done == len(shards) or time.monotonic() - logged > 30:
                logger.info("counting %d shards of %s without an index: %d/%d", len(shards), name, done, len(shards))
                logged = time.monotonic()
    return counts


def shard_counts(shards: list, name: str, cache=None) -> list:
    """The sample count of each shard (paths as strings; ``name``: the set's, for the log): from the ``index.json``
    beside it, or from ``cache`` (a folder that keeps the counts of shards whose folder is read-only, one file per shard
    folder). Shards counted in neither are counted now and their counts recorded: beside the shards where that folder
    is writable, else in ``cache``, so that later starts read them. Each folder's index is read once."""
    places = [os.path.split(shard) for shard in shards]
    known = {}
    for folder in dict.fromkeys(folder for folder, _ in places):
        cached = _read_counts(_cache_file(folder, cache)) if cache is not None else {}
        known[folder] = {**cached, **read_index(folder)}
    todo = [shard for shard, (folder, base) in zip(shards, places) if base not in known[folder]]
    if todo:
        problems = Counter()
        counted = count_shards(todo, problems, name)
        if problems:
            logger.warning("%s: damaged shards, counted with the samples they hold: %s", name, dict(problems))
        new = {}
        for shard, count in counted.items():
            folder, base = os.path.split(shard)
            new.setdefault(folder, {})[base] = count
        for folder, counts in new.items():
            known[folder].update(counts)
            _record(Path(folder), counts, cache)
    return [known[folder][base] for folder, base in places]


def _record(folder: Path, new: dict, cache):
    """Merges new counts into the index as it is now: another rank may have written it meanwhile."""
    try:
        write_index(folder, {**read_index(folder), **new})
        return
    except OSError as error:
        if cache is None:
            logger.warning("counts of %s not recorded (%s): they are counted again at the next start", folder, error)
            return
    path = _cache_file(folder, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_counts(path, {**_read_counts(path), **new}, folder)


def run_cache_file(cache, path, kind: str, suffix: str) -> Path:
    """The file in ``cache`` (a run folder) that keeps what a read-only folder could not hold beside ``path`` (a
    shard folder's counts, a manifest's offsets), named by a hash of the path: two folders' shards may share names."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return Path(cache) / f"{kind}-{digest}{suffix}"


def _cache_file(folder: Path, cache) -> Path:
    return run_cache_file(cache, folder, "index", ".json")


def _read_counts(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["shards"])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not an index of shards ({error}): delete it to have the shards counted "
                         f"again") from None


def _write_counts(path: Path, counts: dict, folder: Path = None):
    """Readers never see a partial file, and ranks writing at once never share a temporary."""
    from eve_ds.checkpoint.pretrained import write_atomically  # eve_ds.checkpoint imports eve_ds.data

    index = {"format": "eve-ds shards", "samples": sum(counts.values()), "shards": dict(sorted(counts.items()))}
    if folder is not None:
        index["folder"] = str(Path(folder).resolve())
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(index, indent=1) + "\n"), concurrent=True)
