"""Crash-safe training checkpoints: a manifest of every file of a checkpoint, written last.

A checkpoint folder counts as complete only when its ``manifest.json`` lists each file with its size and
SHA-256 digest; the manifest is written, through a temporary name, after every rank has written, digested
and flushed its files, and the ``latest`` pointer moves after that. The digests are spread over the ranks
(each rank first takes the files it wrote, ``zero_pp_rank_<rank>_...``), both when they are written and
when they are verified, so that the time to do either does not grow with the number of ranks.
"""
import hashlib
import json
import os
import re
from pathlib import Path

from eve_ds.checkpoint.pretrained import write_atomically

MANIFEST, LATEST = "manifest.json", "latest"
TAG = re.compile(r"^step_(\d+)$")
# DeepSpeed prefixes a rank's optimizer file with bf16_ or fp16_ when it trains in that precision.
RANK_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_")
DIGEST_CHUNK = 16 * 2**20


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def tags_newest_first(checkpoint_dir: Path) -> list:
    """The checkpoint folders ``step_N`` of a run, highest step first."""
    tags = [(int(m[1]), path) for path in Path(checkpoint_dir).glob("step_*")
            if path.is_dir() and (m := TAG.match(path.name))]
    return [path for _, path in sorted(tags, reverse=True)]


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file()


def predates_manifests(checkpoint_dir: Path) -> bool:
    """Whether a run's checkpoints were written before manifests existed: none of them has one. Otherwise a
    folder without a manifest is a save that did not finish."""
    return not any(is_complete(tag) for tag in tags_newest_first(checkpoint_dir))


def summary(problems: list) -> str:
    """The first problem, and how many more there are."""
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def share(names, rank: int, world_size: int) -> list:
    """The files ``rank`` digests: those it wrote itself, then every world_size-th of the others."""
    names = sorted(names)
    own = [name for name in names if (m := RANK_FILE.match(name)) and int(m[1]) == rank]
    others = [name for name in names if not ((m := RANK_FILE.match(name)) and int(m[1]) < world_size)]
    return own + others[rank::world_size]


def digest(path: Path) -> dict:
    """Size and SHA-256 of a file, which is flushed to disk on the way (the manifest vouches for it)."""
    sha256 = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(DIGEST_CHUNK):
            sha256.update(chunk)
        os.fsync(file.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256.hexdigest()}


def checkpoint_files(tag_dir: Path) -> list:
    return sorted(path.name for path in tag_dir.iterdir()
                  if path.is_file() and path.name != MANIFEST and not path.name.startswith("."))


def digest_share(tag_dir: Path, rank: int, world_size: int) -> dict:
    """name -> {bytes, sha256} for this rank's share of the files of a freshly written checkpoint."""
    return {name: digest(tag_dir / name) for name in share(checkpoint_files(tag_dir), rank, world_size)}


def write_manifest(tag_dir: Path, files: dict, step: int, layout: dict = None):
    """``layout``: the world size, expert-parallel size, ZeRO stage and precision the files were written at, which
    ``--resume`` checks before any rank starts."""
    manifest = {"format": "eve-ds checkpoint manifest", "step": step, "layout": layout,
                "files": dict(sorted(files.items()))}
    write_atomically(tag_dir / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1) + "\n"))
    _fsync_dir(tag_dir)


def point_latest(checkpoint_dir: Path, tag_dir: Path):
    """Moves ``latest`` (DeepSpeed's pointer, which its loader and tools/consolidate.py read) atomically."""
    write_atomically(checkpoint_dir / LATEST, lambda path: path.write_text(tag_dir.name))
    _fsync_dir(checkpoint_dir)


def _fsync_dir(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def manifest_layout(tag_dir: Path):
    """The layout a complete checkpoint was written at, or None (written before manifests said it)."""
    try:
        return json.loads((tag_dir / MANIFEST).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_bytes(tag_dir: Path) -> int:
    """What a complete checkpoint's files take, by its manifest (0 where it cannot be read)."""
    try:
        return sum(entry["bytes"] for entry in read_manifest(tag_dir).values())
    except ValueError:
        return 0


def read_manifest(tag_dir: Path) -> dict:
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
        if not all(isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise TypeError("a file entry lacks bytes or sha256")
        return files
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{tag_dir / MANIFEST}: unreadable manifest ({type(error).__name__}: {error})") from None


def verify_share(tag_dir: Path, rank: int = 0, world_size: int = 1) -> list:
    """Problems of this rank's share of a complete checkpoint's files, one sentence each naming the file
    (empty when they match the manifest). One process verifies everything with rank 0 of world size 1."""
    try:
        files = read_manifest(tag_dir)
    except ValueError as error:
        return [str(error)] if rank == 0 else []
    problems = []
    for name in share(files, rank, world_size):
        path, expected = tag_dir / name, files[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)")
        elif digest(path)["sha256"] != expected["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (damaged)")
    return problems
