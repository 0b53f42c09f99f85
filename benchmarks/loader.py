"""Samples per second of the pre-training data loader alone, per worker count.

    python benchmarks/loader.py [--workers 0 1 2] [--batches 40] [--image-size 224]

Writes the embedded shapes data as 256-pixel JPEGs (the size img2dataset writes at) into a temporary
folder, then times the manifest loader of launch/pretrain.py (decode, resize to ``--image-size``, masks,
tokenization, collation into micro-batches of 32) with each number of worker processes. One H100 consumes
about 1,500-2,000 eve-base samples/s, so the per-worker figure says how many workers a GPU needs.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.data import ImageTextDataset, ResumableShardSampler, TextTokenizer, read_manifest  # noqa: E402
from eve_ds.objectives import MaskingConfig  # noqa: E402

SHAPES = Path(__file__).resolve().parent.parent / "data" / "shapes"


def jpeg_copy(folder: Path, size: int) -> Path:
    lines = []
    for line in (SHAPES / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        target = folder / Path(record["image"]).with_suffix(".jpg").name
        with Image.open(SHAPES / record["image"]) as image:
            image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(target, quality=90)
        lines.append(json.dumps({"image": target.name, "caption": record["caption"]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=40, help="micro-batches timed per worker count")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = read_manifest(jpeg_copy(Path(tmp), args.source_size))
        tokenizer = TextTokenizer(SHAPES / "tokenizer.json", 40)
        dataset = ImageTextDataset(records, tokenizer, args.image_size, 16, MaskingConfig())
        print(f"{len(records)} {args.source_size}-pixel JPEGs -> {args.image_size}-pixel samples, micro-batches of "
              f"{args.batch_size}, torch {torch.__version__}")
        print("| workers | samples/s | samples/s per worker |")
        print("| --- | --- | --- |")
        for workers in args.workers:
            sampler = ResumableShardSampler(len(dataset), 0, 1, seed=0)
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                                 num_workers=workers, persistent_workers=workers > 0)
            batches, epoch, started, count = iter(loader), 0, None, 0
            while count < args.batches + 2:
                try:
                    next(batches)
                except StopIteration:
                    epoch += 1
                    sampler.set_position(epoch, 0)
                    batches = iter(loader)
                    continue
                count += 1
                if count == 2:  # the workers have started and filled their queues once
                    started = time.perf_counter()
            rate = args.batches * args.batch_size / (time.perf_counter() - started)
            print(f"| {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} |")
            del batches, loader  # stops the workers before their files go


if __name__ == "__main__":
    main()
