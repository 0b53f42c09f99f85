"""The MoE FFN against a dense FFN of the same activated FLOPs, forward and backward, at a preset's size.

    python benchmarks/moe_vs_dense.py --model eve-base [--tokens 4096] [--repeats 5]

The MoE FFN is EVE's layer as trained (top-2 of the preset's experts, capacity factor 1, routing embedding,
expert parallelism 1, so every expert runs on this device one after the other); the dense FFN has twice the
FFN width, which is the FLOPs of the two experts a token is routed to. Both in the dtype a step would use
(bf16 on a GPU, fp32 on CPU). Prints the median time of each and their ratio.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.config import preset  # noqa: E402
from eve_ds.model import ExpertPlacement, FeedForward, ModalityAwareMoE, TEXT, VISION  # noqa: E402


def timed(function, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="eve-base")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in one call (e.g. 16 samples x 256)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = preset(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width, ffn = config.hidden_size, config.ffn_hidden_size
    torch.manual_seed(0)
    moe = ModalityAwareMoE(width, lambda: FeedForward(width, ffn), ExpertPlacement(config.num_experts), k=config.top_k,
                           capacity_factor=1.0, eval_capacity_factor=1.0).to(device)
    moe.gate.float()  # the router stays in fp32, as in training
    moe.deepspeed_moe.experts.to(dtype)
    dense = FeedForward(width, config.top_k * ffn).to(device, dtype)
    hidden = torch.randn(1, args.tokens, width, device=device, dtype=dtype, requires_grad=True)
    modality = torch.full((1, args.tokens), TEXT, device=device)
    modality[:, :args.tokens // 2] = VISION

    def moe_step():
        output, aux = moe(hidden, modality)
        (output.float().sum() + aux).backward()

    def dense_step():
        dense(hidden).float().sum().backward()

    results = {}
    for name, step in (("MoE FFN", moe_step), ("dense FFN", dense_step)):
        results[name] = timed(step, device, args.repeats)
    with torch.no_grad():
        forward = {"MoE FFN": timed(lambda: moe(hidden, modality), device, args.repeats),
                   "dense FFN": timed(lambda: dense(hidden), device, args.repeats)}
    print(f"{args.model}: {args.tokens} tokens, width {width}, FFN {ffn}, top-{config.top_k} of {config.num_experts} "
          f"experts (capacity factor 1) against a dense FFN of width {config.top_k * ffn}; {device.type}, {dtype}, "
          f"torch {torch.__version__}")
    print("| layer | forward | forward + backward |")
    print("| --- | --- | --- |")
    for name in results:
        print(f"| {name} | {forward[name] * 1e3:.1f} ms | {results[name] * 1e3:.1f} ms |")
    print(f"| ratio MoE / dense | {forward['MoE FFN'] / forward['dense FFN']:.2f} | "
          f"{results['MoE FFN'] / results['dense FFN']:.2f} |")


if __name__ == "__main__":
    main()
