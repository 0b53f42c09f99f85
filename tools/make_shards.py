"""Write image-text tar shards (webdataset layout, as img2dataset writes them) from a JSONL manifest.

    python tools/make_shards.py data/shapes/manifest.jsonl data/shapes-shards --shard-size 1000 --workers 8

Each manifest line is ``{"image": PATH, "caption": TEXT}`` or ``{"image": PATH, "captions": [TEXT, ...]}``
(COCO and Visual Genome give several captions per image: all are kept, and training draws one per epoch);
image paths are relative to the manifest's folder. Shard N holds lines N x shard-size onwards and is named
``{N:05d}.tar``; ``index.json`` counts the samples of each. Shards are written by ``--workers`` processes,
each through a temporary name, so an interrupted run resumes where it stopped: the same command skips
the shards that are complete. Malformed lines and unreadable images are skipped and counted.
"""
import argparse
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint.pretrained import write_atomically  # noqa: E402
from eve_ds.data.shards import IMAGE_EXTENSIONS, add_sample, read_index, write_index  # noqa: E402


def read_lines(manifest: Path, problems: Counter) -> list:
    """(image path, captions) of every well-formed line."""
    records = []
    for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions = entry["captions"] if "captions" in entry else [entry["caption"]]
            image = entry["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            problems["malformed line"] += 1
            continue
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()] if isinstance(captions, list) else []
        if not isinstance(image, str) or not captions:
            problems["malformed line"] += 1
            continue
        records.append((str(manifest.parent / image), captions))
    return records


def write_shard(path: Path, first_key: int, records: list) -> tuple:
    """Writes one shard through a temporary name; returns (samples written, problems)."""
    problems, written = Counter(), 0

    def write(temporary: Path):
        nonlocal written
        with tarfile.open(temporary, "w") as archive:
            for offset, (image_path, captions) in enumerate(records):
                extension = Path(image_path).suffix.lower().lstrip(".")
                try:
                    data = Path(image_path).read_bytes()
                except OSError:
                    data = b""
                if extension not in IMAGE_EXTENSIONS or not data:
                    problems["unreadable image"] += 1
                    continue
                add_sample(archive, f"{first_key + offset:09d}",
                           ("jpg" if extension == "jpeg" else extension, data), captions)
                written += 1

    write_atomically(path, write)
    return written, problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path, help="folder of the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(argv)
    if not args.manifest.is_file():
        parser.exit(2, f"make_shards: {args.manifest} does not exist\n")
    problems = Counter()
    records = read_lines(args.manifest, problems)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = read_index(args.out)
    jobs = []
    for number, start in enumerate(range(0, len(records), args.shard_size)):
        path = args.out / f"{number:05d}.tar"
        if path.is_file() and path.name in counts:
            continue  # written by an earlier run
        jobs.append((path, start, records[start:start + args.shard_size]))
    skipped = len(range(0, len(records), args.shard_size)) - len(jobs)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(write_shard, path, start, chunk): path for path, start, chunk in jobs}
        for future in tqdm(futures, desc="shards", unit="shard", disable=not sys.stderr.isatty()):
            written, shard_problems = future.result()
            counts[futures[future].name] = written
            problems += shard_problems
            write_index(args.out, counts)  # after each shard: an interrupted run keeps what is done
    write_index(args.out, counts)
    print(f"{args.out}: {len(counts)} shards, {sum(counts.values())} samples ({len(jobs)} written now, {skipped} "
          f"complete from before); skipped: {dict(problems) or 'none'}")


if __name__ == "__main__":
    main()
