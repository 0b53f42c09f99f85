"""Consolidate an eve-ds DeepSpeed checkpoint (any ZeRO stage, data- and expert-parallel size) of a pre-training
or a fine-tuning run into one folder of weights: model.safetensors + config.json (which says what model it holds),
and the run's tokenizer (tokenizer.json, special_tokens.json) where the checkpoint holds it.

    python tools/consolidate.py runs/eve-tiny/checkpoints runs/eve-tiny/consolidated [--tag step_00000200]
    python tools/consolidate.py runs/finetune-vqa/checkpoints runs/finetune-vqa/consolidated

Load it with ``eve_ds.model.EVE.from_pretrained(OUT)`` (the encoder of any folder),
``eve_ds.objectives.PretrainingModel.from_pretrained(OUT)`` (a pre-training run's, with its heads) or a task
model's ``from_pretrained(OUT)`` (a fine-tuning run's, with its head); ``launch/finetune.py --pretrained OUT`` and
``tools/evaluate.py --pretrained OUT`` take it too. Runs offline on CPU without launching ranks.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint import consolidate, save_pretrained  # noqa: E402
from eve_ds.errors import run_entry_point  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="the run's checkpoints/ folder, or one checkpoint's folder")
    parser.add_argument("out", help="output folder (model.safetensors, config.json, the tokenizer)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    checkpoint = consolidate(args.checkpoint_dir, args.tag)
    for note in checkpoint.notes:
        print(f"note: {note}")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    save_pretrained(args.out, checkpoint.state_dict, checkpoint.model_config, dtype,
                    source={"checkpoint": str(checkpoint.source), "zero_stage": checkpoint.zero_stage,
                            "step": checkpoint.step}, tokenizer=checkpoint.tokenizer, held=checkpoint.held)
    count = sum(t.numel() for t in checkpoint.state_dict.values())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"consolidated {checkpoint.held.describe()} of {checkpoint.source} (ZeRO-{checkpoint.zero_stage}, step "
          f"{checkpoint.step}): "
          f"{len(checkpoint.state_dict)} tensors, {count / 1e6:.2f}M parameters, {args.dtype} -> {args.out} "
          f"in {time.perf_counter() - started:.1f} s, peak memory {peak_mib:.0f} MiB")


if __name__ == "__main__":
    run_entry_point(main, "consolidate")
