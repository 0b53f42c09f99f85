"""Reshard an eve-ds training checkpoint for another cluster shape: writes a universal checkpoint folder
(full fp32 weights, full AdamW moments, step and LR-schedule position) from any ZeRO 1-3 checkpoint, at
any world size and expert-parallel size, which a run of any other shape resumes from:

    python tools/reshard.py runs/eve-tiny/checkpoints runs/eve-tiny/universal [--tag TAG]
    deepspeed --num_gpus N launch/pretrain.py --deepspeed_config ds_configs/<config>.json \\
        --out runs/eve-tiny-N --resume-from runs/eve-tiny/universal

The folder doubles as consolidated weights (model.safetensors + config.json, and the run's tokenizer where
the checkpoint holds it). DeepSpeed's own universal checkpoint (ds_to_universal) is not used: it knows
DeepSpeed's native MoE and AutoEP expert layouts, not experts partitioned over expert-data-parallel groups
under ZeRO-3.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint import consolidate  # noqa: E402
from eve_ds.checkpoint.universal import save_universal  # noqa: E402
from eve_ds.errors import run_entry_point  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="the run's checkpoints/ folder, or one checkpoint's folder")
    parser.add_argument("out", help="output folder of the universal checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    checkpoint = consolidate(args.checkpoint_dir, args.tag, optimizer_state=True)
    save_universal(args.out, checkpoint)
    for note in checkpoint.notes:
        print(f"note: {note}")
    print(f"resharded {checkpoint.source} (ZeRO-{checkpoint.zero_stage}, step {checkpoint.step}) -> {args.out} in "
          f"{time.perf_counter() - started:.1f} s; resume with --resume-from {args.out}")


if __name__ == "__main__":
    run_entry_point(main, "reshard")
