"""Samples per second of the pre-training data loader alone, per worker count.

    python benchmarks/loader.py [--workers 0 1 2] [--batches 40] [--image-size 224]

Writes the embedded shapes data as 256-pixel JPEGs (the size img2dataset writes at) into temporary tar shards,
then times the stream of launch/pretrain.py over them (tar reading, decoding, the authors' random resized crop
and flip to ``--image-size``, masks, tokenization, collation into micro-batches of 32) with each number of worker
processes. One H100 consumes about 1,500-2,000 eve-base samples/s, so the per-worker figure says how many
workers a GPU needs.
"""
import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.data import MaskedSamples, PretrainingStream, TextTokenizer, open_source, read_manifest  # noqa: E402
from eve_ds.data.shards import add_sample, write_index  # noqa: E402
from eve_ds.objectives import MaskingConfig  # noqa: E402

SHAPES = Path(__file__).resolve().parent.parent / "data" / "shapes"


def jpeg_shards(folder: Path, size: int, shard_size: int = 128) -> str:
    records, _ = read_manifest(SHAPES / "manifest.jsonl")
    counts = {}
    for start in range(0, len(records), shard_size):
        name = f"{start // shard_size:05d}.tar"
        with tarfile.open(folder / name, "w") as archive:
            for offset, record in enumerate(records[start:start + shard_size]):
                buffer = io.BytesIO()
                with Image.open(record.image_path) as image:
                    image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG",
                                                                                              quality=90)
                add_sample(archive, f"{start + offset:09d}", ("jpg", buffer.getvalue()), [record.caption])
        counts[name] = len(records[start:start + shard_size])
    write_index(folder, counts)
    return str(folder / f"{{00000..{len(counts) - 1:05d}}}.tar")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=40, help="micro-batches timed per worker count")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(jpeg_shards(Path(tmp), args.source_size))
        samples = MaskedSamples(TextTokenizer(SHAPES / "tokenizer.json", 40), args.image_size, 16, MaskingConfig(),
                                augment=args.augment)
        print(f"{source.total} {args.source_size}-pixel JPEGs in {len(source.units)} shards -> {args.image_size}-pixel "
              f"samples ({'random resized crop and flip' if args.augment else 'resized whole'}), micro-batches of "
              f"{args.batch_size}, torch {torch.__version__}")
        print("| workers | samples/s | samples/s per worker |")
        print("| --- | --- | --- |")
        for workers in args.workers:
            stream = PretrainingStream([source], [1.0], samples, args.batch_size, 0, 1, workers)
            loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
            for _ in range(max(workers, 1)):  # the workers have started and filled their queues once
                next(loader)
            started = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            rate = args.batches * args.batch_size / (time.perf_counter() - started)
            print(f"| {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} |")
            del loader  # stops the workers before their files go


if __name__ == "__main__":
    main()
