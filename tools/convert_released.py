"""Convert between eve-ds weights and the EVE authors' released checkpoint layout.

    python tools/convert_released.py export runs/eve-tiny/consolidated eve-tiny-released.pth
    python tools/convert_released.py import EVE_base.pth runs/eve-base-released --model eve-base \\
        --tokenizer eve_tokenizer.json

``export`` takes a consolidated folder (tools/consolidate.py, of any run) and writes ``{"model": {"backbone.…",
the task head}}`` as the authors' code loads it: a fine-tuned VQA, NLVR2 or retrieval model's head under their names,
so that their ``--evaluate`` re-initialises nothing. ``import`` takes such a file (the authors' pre-trained or
fine-tuned weights, or an export) and writes a consolidated folder of the encoder and the task head the file holds,
its config.json saying which (``launch/finetune.py --pretrained OUT`` continues from that head,
``tools/evaluate.py --pretrained OUT`` evaluates it), with the tokenizer of ``--tokenizer`` (its vocabulary checked
against the token table), which fine-tuning then takes from the folder. The key mapping is
eve_ds/checkpoint/released.py.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint import export_released, import_released, save_pretrained  # noqa: E402
from eve_ds.config import PRESETS, preset  # noqa: E402
from eve_ds.data.tokenizer import TextTokenizer, role_and_token  # noqa: E402
from eve_ds.errors import run_entry_point  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="consolidated folder -> released-layout .pth")
    export.add_argument("consolidated", help="folder written by tools/consolidate.py")
    export.add_argument("out", help="output file (.pth)")
    imports = commands.add_parser("import", help="released-layout file -> consolidated folder")
    imports.add_argument("checkpoint", help="released-layout file (.pth/.th)")
    imports.add_argument("out", help="output folder (model.safetensors, config.json, the tokenizer)")
    imports.add_argument("--model", choices=list(PRESETS), default=None,
                         help="the architecture of the file (not needed for files exported by eve-ds)")
    imports.add_argument("--allow-pickle", action="store_true",
                         help="unpickle arbitrary objects (only for files from a source you trust)")
    imports.add_argument("--tokenizer", default=None,
                         help="the weights' tokenizers JSON file (e.g. the authors' 64k BPE), written into the folder")
    imports.add_argument("--special-token", action="append", type=role_and_token, default=[], metavar="ROLE=TOKEN",
                         help="the tokenizer's token for a role (cls, sep, pad, mask, unk) where its usual names do "
                              "not find it; repeatable")
    args = parser.parse_args(argv)
    if args.command == "import" and args.special_token and args.tokenizer is None:
        parser.error("--special-token names tokens of the --tokenizer file; give that file too")
    started = time.perf_counter()
    if args.command == "export":
        held = export_released(args.consolidated, args.out)
        print(f"exported {held.describe()} of {args.consolidated} -> {args.out} in "
              f"{time.perf_counter() - started:.1f} s")
        return
    state_dict, config, held, notes = import_released(args.checkpoint, preset(args.model) if args.model else None,
                                                      args.allow_pickle)
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = TextTokenizer(args.tokenizer, config.max_text_len, dict(args.special_token))
        tokenizer.check_fits(config.vocab_size, args.checkpoint)
    else:
        notes.append(f"no --tokenizer: {args.out} holds none, so fine-tuning must be given it with --tokenizer")
    for note in notes:
        print(f"note: {note}")
    save_pretrained(args.out, state_dict, config, source={"released_checkpoint": str(args.checkpoint)},
                    tokenizer=tokenizer, held=held)
    print(f"imported {held.describe()} of {args.checkpoint} ({len(state_dict)} tensors, {config.num_layers} layers, "
          f"MoE in {list(config.moe_layers)}) -> {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run_entry_point(main, "convert_released")
