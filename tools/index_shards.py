"""Count the samples of existing tar shards (img2dataset's, or any webdataset-style set) into the ``index.json``
that pre-training reads beside them.

    python tools/index_shards.py 'cc3m/{00000..00331}.tar' --workers 8

Pre-training counts shards without an index itself at start-up; this does it ahead of time, with as many
workers as asked. Shards already counted in the index are left as they are, so an interrupted run resumes. A
shard that cannot be read, or ends in the middle, is counted with the samples it holds and reported.
"""
import argparse
import logging
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.data.shards import count_shards, expand_pattern, read_index, write_index  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", help="shards: a brace pattern, a folder or a file")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shards = [shard for shard in expand_pattern(args.pattern) if shard.is_file()]
    if not shards:
        parser.exit(2, f"index_shards: {args.pattern} names no existing shard\n")
    folders = defaultdict(list)
    for shard in shards:
        folders[shard.parent].append(shard)
    problems = Counter()
    for folder, members in folders.items():
        counts = read_index(folder)
        todo = [shard for shard in members if shard.name not in counts]
        if todo:
            counts.update((shard.name, count) for shard, count in
                          count_shards(todo, problems, str(folder), args.workers).items())
        write_index(folder, counts)
        print(f"{folder / 'index.json'}: {len(counts)} shards, {sum(counts.values())} samples "
              f"({len(todo)} counted now)")
    if problems:
        print(f"damaged shards: {dict(problems)}")


if __name__ == "__main__":
    main()
