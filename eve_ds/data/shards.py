"""Image-text pairs in webdataset-style tar shards, as img2dataset writes them: the files of one sample lie
next to each other and share a key, ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``), ``KEY.txt`` (the
caption) and ``KEY.json`` (metadata; eve-ds keeps every caption of a sample under ``"captions"``). Shard sets
are named by brace patterns (``cc3m/{00000..00331}.tar``), and ``index.json`` beside the shards counts the
samples of each.

Read with the standard library's ``tarfile`` rather than the ``webdataset`` package: the loader has to know
exactly how many samples it consumed, which is simplest when eve-ds owns the iteration.
"""
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX = "index.json"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_pattern(pattern) -> list:
    """Shard paths of a brace pattern (``{00000..00331}``, ``{a,b}``), a folder (its ``*.tar``) or one file."""
    pattern = str(pattern)
    if Path(pattern).is_dir():
        return sorted(Path(pattern).glob("*.tar"))
    groups = [match for match in (_RANGE.search(pattern), _CHOICE.search(pattern)) if match]
    if not groups:
        return [Path(pattern)]
    match = min(groups, key=lambda m: m.start())  # the leftmost group varies slowest, as in the shell
    if match.re is _RANGE:
        first, last = match[1], match[2]
        if int(last) < int(first):
            raise ValueError(f"shard pattern {pattern!r}: range {{{first}..{last}}} runs backwards")
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = match[1].split(",")
    return [path for choice in choices
            for path in expand_pattern(pattern[:match.start()] + choice + pattern[match.end():])]


def iter_shard(path, problems: Counter, skip: int = 0):
    """(key, {extension: bytes}) for each sample of a shard, in order, after the first ``skip`` samples (passed
    over without being extracted). A shard that cannot be opened, or that ends in the middle (truncated), counts
    in ``problems`` ("unreadable shard", "truncated shard") after yielding what it holds; it never raises."""
    key, files, seen = None, {}, 0
    try:
        with tarfile.open(path, mode="r|*") as archive:  # a stream: no seeking, as over a network file
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                member_key, _, extension = name.partition(".")
                if member_key != key:
                    if files:
                        yield key, files
                        files = {}
                    key, seen = member_key, seen + 1
                if seen <= skip:
                    continue
                data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError(f"{name}: {len(data)} of {member.size} bytes")
                files[extension.lower()] = data
    except FileNotFoundError:
        problems["unreadable shard"] += 1
        return
    except (tarfile.ReadError, EOFError, OSError):  # the sample being read when the data ran out is lost
        problems["truncated shard" if key is not None else "unreadable shard"] += 1
        return
    if files:
        yield key, files


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
    path = Path(folder) / INDEX
    return json.loads(path.read_text())["shards"] if path.is_file() else {}


def write_index(folder, counts: dict):
    from eve_ds.checkpoint.pretrained import write_atomically

    index = {"format": "eve-ds shards", "samples": sum(counts.values()), "shards": dict(sorted(counts.items()))}
    write_atomically(Path(folder) / INDEX, lambda path: path.write_text(json.dumps(index, indent=1) + "\n"))
