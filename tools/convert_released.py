"""Convert between eve-ds weights and the EVE authors' released checkpoint layout.

    python tools/convert_released.py export runs/eve-tiny/consolidated eve-tiny-released.pth
    python tools/convert_released.py import EVE_base.pth runs/eve-base-released --model eve-base

``export`` takes a consolidated folder (tools/consolidate.py) and writes ``{"model": {"backbone.…"}}`` as
the authors' fine-tuning code loads it. ``import`` takes such a file (the authors' pre-trained or
fine-tuned weights, or an export) and writes a consolidated folder of the encoder, which
``eve_ds.model.EVE.from_pretrained`` loads. The key mapping is eve_ds/checkpoint/released.py.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint import export_released, import_released, save_pretrained  # noqa: E402
from eve_ds.config import PRESETS, preset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="consolidated folder -> released-layout .pth")
    export.add_argument("consolidated", help="folder written by tools/consolidate.py")
    export.add_argument("out", help="output file (.pth)")
    imports = commands.add_parser("import", help="released-layout file -> consolidated folder")
    imports.add_argument("checkpoint", help="released-layout file (.pth/.th)")
    imports.add_argument("out", help="output folder (model.safetensors, config.json)")
    imports.add_argument("--model", choices=list(PRESETS), default=None,
                         help="the architecture of the file (not needed for files exported by eve-ds)")
    imports.add_argument("--allow-pickle", action="store_true",
                         help="unpickle arbitrary objects (only for files from a source you trust)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.command == "export":
            export_released(args.consolidated, args.out)
            print(f"exported {args.consolidated} -> {args.out} in {time.perf_counter() - started:.1f} s")
            return
        encoder, config, notes = import_released(args.checkpoint, preset(args.model) if args.model else None,
                                                 args.allow_pickle)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"convert_released: {error}\n")
    for note in notes:
        print(f"note: {note}")
    save_pretrained(args.out, {f"encoder.{name}": tensor for name, tensor in encoder.items()}, config,
                    source={"released_checkpoint": str(args.checkpoint)})
    print(f"imported {args.checkpoint} ({len(encoder)} tensors, {config.num_layers} layers, MoE in "
          f"{list(config.moe_layers)}) -> {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
