"""Write image-text tar shards (webdataset layout, as img2dataset writes them) from a JSONL manifest.

    python tools/make_shards.py data/shapes/manifest.jsonl data/shapes-shards --shard-size 1000 --workers 8

Each manifest line is ``{"image": PATH, "caption": TEXT}`` or ``{"image": PATH, "captions": [TEXT, ...]}``
(COCO and Visual Genome give several captions per image: all are kept, and training draws one per epoch);
image paths are relative to the manifest's folder. Shard N holds the well-formed lines N x shard-size onwards and
is named ``{N:05d}.tar``; ``index.json`` counts the samples of each. Malformed lines and unreadable images are
skipped and counted.

The manifest is streamed: a shard's lines are read when a worker is free to write it, so time grows with the
manifest and memory does not. Each shard is written by one of ``--workers`` processes through a temporary name, and
when it is complete one line goes to ``.index.journal`` in the output folder (not a rewrite of the index: at 230,000
shards that would be hours); ``index.json`` is written once, at the end, from the journal. So an interrupted run
resumes where it stopped: the same command skips the shards the journal or the index counts.
"""
import argparse
import itertools
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint.pretrained import write_atomically  # noqa: E402
from eve_ds.data.shards import IMAGE_EXTENSIONS, add_sample, read_index, write_index  # noqa: E402

JOURNAL = ".index.journal"


def read_lines(manifest: Path, problems: Counter):
    """(image path, captions) of each well-formed line, one at a time."""
    with manifest.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions = entry["captions"] if "captions" in entry else [entry["caption"]]
                image = entry["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                problems["malformed line"] += 1
                continue
            captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()] \
                if isinstance(captions, list) else []
            if not isinstance(image, str) or not captions:
                problems["malformed line"] += 1
                continue
            yield str(manifest.parent / image), captions


def shard_chunks(records, size: int):
    """(shard number, first key, the shard's records), for consecutive runs of ``size`` records."""
    for number in itertools.count():
        chunk = list(itertools.islice(records, size))
        if not chunk:
            return
        yield number, number * size, chunk


def read_journal(out: Path) -> dict:
    """{shard name: samples} of the shards a run recorded as complete; a line cut short by a kill is ignored (its
    shard is written again)."""
    counts = {}
    if (out / JOURNAL).is_file():
        for line in (out / JOURNAL).read_text().splitlines():
            try:
                entry = json.loads(line)
                counts[entry["shard"]] = int(entry["samples"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return counts


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
    if args.shard_size < 1 or args.workers < 1:
        parser.exit(2, "make_shards: --shard-size and --workers must be positive\n")
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {**read_index(args.out), **read_journal(args.out)}
    problems, written, skipped = Counter(), 0, 0
    with ProcessPoolExecutor(max_workers=args.workers) as pool, (args.out / JOURNAL).open("a") as journal, \
            tqdm(desc="shards", unit="shard", disable=not sys.stderr.isatty()) as progress:
        running = {}

        def finish(done):
            nonlocal written
            for future in done:
                name = running.pop(future)
                samples, shard_problems = future.result()
                counts[name] = samples
                problems.update(shard_problems)
                journal.write(json.dumps({"shard": name, "samples": samples}) + "\n")
                journal.flush()
                written += 1
                progress.update()

        for number, first_key, chunk in shard_chunks(read_lines(args.manifest, problems), args.shard_size):
            path = args.out / f"{number:05d}.tar"
            if path.name in counts and path.is_file():
                skipped += 1  # written by an earlier run
                continue
            running[pool.submit(write_shard, path, first_key, chunk)] = path.name
            if len(running) >= 2 * args.workers:  # a bounded queue: the manifest is never held whole
                finish(wait(running, return_when=FIRST_COMPLETED).done)
        finish(list(running))
    write_index(args.out, counts)
    (args.out / JOURNAL).unlink()
    print(f"{args.out}: {len(counts)} shards, {sum(counts.values())} samples ({written} written now, {skipped} "
          f"complete from before); skipped: {dict(problems) or 'none'}")


if __name__ == "__main__":
    main()
