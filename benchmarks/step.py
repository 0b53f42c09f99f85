"""Speed of an EVE pre-training step: time, throughput, activated TFLOP/s, MFU, memory, and where the time goes.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/step.py --model eve-tiny \\
        --deepspeed_config ds_configs/zero2_ep.json [--routing both] [--micro-batch 8] [--warmup 3 --steps 10] \\
        [--data 'data/shapes/shards/{00000..00003}.tar' --num-workers 2]

Runs ``--warmup`` untimed and ``--steps`` timed steps of the preset on synthetic batches (random pixels, text
of 60% real tokens, the pre-training masks), or with ``--data`` on the pre-training stream of those sources
(decoding, augmentation and masking in ``--num-workers`` loader processes; the time spent waiting for them is
reported), on the device at hand, with the model's own routing and/or with
routing forced to balance (every token to experts i and i+1 mod E, so each expert gets exactly its share, as
published MoE figures measure). Then one profiled step splits the time between attention, multiway FFNs, layer
norms, the MoE layer (gate; experts; dispatch, combine and all-to-all), the backward pass, the optimizer step and
waiting for data.
TFLOP/s count the activated FLOPs of eve_ds/flops.py; MFU is against ``--peak-tflops`` per rank.
"""
import argparse
import itertools
import resource
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from deepspeed.moe import sharded_moe
from deepspeed.moe.experts import Experts
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.config import preset  # noqa: E402
from eve_ds.data import MaskedSamples, PretrainingStream, StreamPosition, TextTokenizer, open_source  # noqa: E402
from eve_ds.engine import build_model, init_distributed, initialize, load_deepspeed_config  # noqa: E402
from eve_ds.flops import H100_BF16_DENSE_TFLOPS, batch_training_flops  # noqa: E402
from eve_ds.model.eve import Attention, MultiwayFFN  # noqa: E402
from eve_ds.model.moe import ExpertPlacement, ModalityAwareGate, ModalityAwareMoE  # noqa: E402
from eve_ds.objectives import PretrainingModel, MaskingConfig  # noqa: E402
from eve_ds.objectives.masking import IGNORE_INDEX  # noqa: E402
from eve_ds.pretrain import default_tokenizer  # noqa: E402
from eve_ds.trainer import to_device  # noqa: E402

PARTS = {Attention: "attention", MultiwayFFN: "multiway FFN", nn.LayerNorm: "layer norms",
         ModalityAwareMoE: "MoE layer", ModalityAwareGate: "MoE gate", Experts: "MoE experts"}


def synthetic_batch(config, size: int, generator) -> dict:
    masking = MaskingConfig()
    text_len, real = config.max_text_len, int(0.6 * config.max_text_len)
    text_ids = torch.randint(5, config.vocab_size, (size, text_len), generator=generator)
    padding = torch.arange(text_len).expand(size, -1) < real
    chosen = (torch.rand(size, text_len, generator=generator) < masking.text_mask_ratio) & padding
    image_mask = torch.rand(size, config.num_patches, generator=generator).argsort(1) < \
        round(masking.image_mask_ratio * config.num_patches)
    return {"images": torch.rand(size, 3, config.image_size, config.image_size, generator=generator) * 2 - 1,
            "image_mask": image_mask, "text_ids": text_ids, "text_labels": torch.where(chosen, text_ids, IGNORE_INDEX),
            "text_padding_mask": padding}


@contextmanager
def balanced_routing():
    """Token t goes to experts t mod E (first) and t + 1 mod E (second), whatever the router says: DeepSpeed's
    top-2 gating is handed forced logits (through which the router's gradient still flows, so the backward does
    the same work). The router's weight is read, not called, so a hook on it could not do this."""
    top2gating = sharded_moe.top2gating

    def forced_top2gating(logits, *args, **kwargs):
        token = torch.arange(logits.shape[0], device=logits.device)
        forced = torch.zeros_like(logits)
        forced[token, token % logits.shape[1]] = 40.0
        forced[token, (token + 1) % logits.shape[1]] = 20.0  # 20 above the rest: the Gumbel noise added to pick
        return top2gating(logits - logits.detach() + forced, *args, **kwargs)  # the second never reorders them

    sharded_moe.top2gating = forced_top2gating
    try:
        yield
    finally:
        sharded_moe.top2gating = top2gating


def label_parts(model) -> list:
    """Forward hooks that wrap each part's forward in a profiler range named after it."""
    handles = []
    for module in model.modules():
        name = next((label for kind, label in PARTS.items() if isinstance(module, kind)), None)
        if name is None:
            continue
        stack = []
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name, stack=stack: stack.append(torch.profiler.record_function(name).__enter__())))
        handles.append(module.register_forward_hook(
            lambda m, args, output, stack=stack: stack.pop().__exit__(None, None, None)))
    return handles


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(config, args, engine, rank):
    """Two synthetic micro-batches on the device, used in turn: no time is spent waiting for data."""
    generator = torch.Generator().manual_seed(rank)
    batches = [to_device(synthetic_batch(config, args.micro_batch, generator), engine) for _ in range(2)]
    return (batches[step % 2] for step in itertools.count())


def stream_batches(config, tokenizer, args, engine, rank, world_size):
    """Micro-batches of the pre-training stream of ``--data``, read by ``--num-workers`` loader processes."""
    stream = PretrainingStream([open_source(spec) for spec in args.data], [1.0] * len(args.data),
                               MaskedSamples(tokenizer, config.image_size, config.patch_size, MaskingConfig()),
                               args.micro_batch, rank, world_size, args.num_workers)
    position = StreamPosition(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers)
    for batch in loader:
        position.consume(batch)
        yield to_device(batch, engine)


def run(engine, config, batches, args, device, routing: str) -> dict:
    times, waits, flops, tokens = [], [], [], []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        started = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - started
        outputs = engine(**batch)
        engine.backward(outputs["loss"])
        engine.step()
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            waits.append(waited)
            flops.append(batch_training_flops(config, batch))
            tokens.append(len(batch["images"]) * config.num_image_tokens + int(batch["text_padding_mask"].sum()))
    split = profile_step(engine, next(batches), device)
    split["waiting for data"] = statistics.median(waits)
    median = statistics.median(times)
    tflops = statistics.median(flops) / median / 1e12
    return {"routing": routing, "median": median, "spread": (max(times) - min(times)) / median,
            "samples": args.micro_batch / median, "tokens": statistics.median(tokens) / median, "tflops": tflops,
            "mfu": tflops / args.peak_tflops, "wait": sum(waits) / sum(times), "split": split}


def profile_step(engine, batch, device) -> dict:
    """Seconds of one step in each phase (forward, backward, optimizer step: wall time, the device synchronised
    at each phase's end) and in each labelled part of the model (the operators run inside the part: CPU time on
    a CPU, kernel time on a GPU; a part recomputed under activation checkpointing counts twice)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = label_parts(engine.module)
    phases = {}

    def end_of(phase, started):
        synchronize(device)
        phases[phase] = time.perf_counter() - started
        return time.perf_counter()

    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        outputs = engine(**batch)
        started = end_of("forward", started)
        engine.backward(outputs["loss"])
        started = end_of("backward", started)
        engine.step()
        end_of("optimizer step", started)
    for handle in handles:
        handle.remove()
    # Each range is also recorded on the GPU's timeline (device type CUDA, its span from first to last kernel);
    # the host-side range sums its kernels' time, including those of ranges opened by autograd's threads.
    field = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    parts = {event.key: getattr(event, field) / 1e6 for event in profiler.key_averages()
             if event.key in PARTS.values() and event.device_type == DeviceType.CPU}
    moe = parts.get("MoE layer", 0.0)
    parts["MoE dispatch, combine, all-to-all"] = moe - parts.get("MoE gate", 0.0) - parts.get("MoE experts", 0.0)
    return parts | phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="eve-tiny")
    parser.add_argument("--deepspeed_config", default="ds_configs/zero2_ep.json")
    parser.add_argument("--micro-batch", type=int, default=None, help="per rank (default: the config's)")
    parser.add_argument("--expert-parallel-size", type=int, default=None,
                        help="replaces the config's (1 to run a config of several expert-parallel ranks on one GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--routing", choices=("real", "balanced", "both"), default="both")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--data", nargs="+", default=None,
                        help="shard patterns, folders or manifests to read (default: synthetic batches)")
    parser.add_argument("--tokenizer", default=None, help="with --data: default, the one beside the first source")
    parser.add_argument("--num-workers", type=int, default=2, help="with --data: loader processes per rank")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = preset(args.model)
    if args.data:
        tokenizer = TextTokenizer(args.tokenizer or default_tokenizer(args.data[0]), config.max_text_len)
        config = config.replace(vocab_size=tokenizer.vocab_size)
    ds_config, parallelism = load_deepspeed_config(args.deepspeed_config, world_size, config.routed_experts,
                                                   args.warmup + args.steps + 1,
                                                   expert_parallel_size=args.expert_parallel_size)
    if args.micro_batch:
        ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch
        ds_config["train_batch_size"] = args.micro_batch * ds_config["gradient_accumulation_steps"] * world_size
    args.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    placement = ExpertPlacement.of_global_rank(rank, config.num_experts, parallelism.expert_parallel_size)
    torch.manual_seed(0)
    model = build_model(lambda: PretrainingModel(config, placement), ds_config)
    model.encoder.activation_checkpointing = parallelism.activation_checkpointing
    engine, _ = initialize(model, ds_config, placement)
    device = engine.device
    batches = (stream_batches(config, tokenizer, args, engine, rank, world_size) if args.data
               else synthetic_batches(config, args, engine, rank))
    routings = ("real", "balanced") if args.routing == "both" else (args.routing, )
    results = []
    for routing in routings:
        with balanced_routing() if routing == "balanced" else nullcontext():
            results.append(run(engine, config, batches, args, device, routing))
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if rank != 0:
        return
    data = f"data {' '.join(args.data)} ({args.num_workers} workers)" if args.data else "synthetic batches"
    print(f"\n{args.model}, {Path(args.deepspeed_config).name}, {world_size} ranks ({device.type}), micro batch "
          f"{args.micro_batch} per rank, {data}, torch {torch.__version__}; per rank:")
    print("| routing | step (median) | spread | samples/s | tokens/s | TFLOP/s | MFU | waiting for data | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['routing']} | {r['median'] * 1e3:.1f} ms | {100 * r['spread']:.0f}% | {r['samples']:.1f} | "
              f"{r['tokens']:.0f} | {r['tflops']:.3g} | {100 * r['mfu']:.2g}% | {100 * r['wait']:.1f}% | "
              f"{peak:.2f} GiB |")
    parts = ["attention", "multiway FFN", "layer norms", "MoE gate", "MoE experts", "MoE dispatch, combine, all-to-all",
             "forward", "backward", "optimizer step", "waiting for data"]
    print("\nOne profiled step, seconds (the model's parts are inside 'forward', and inside 'backward' where "
          "activation checkpointing recomputes them; the multiway FFN's norms are in both its column and the norms'):")
    print("| routing | " + " | ".join(parts) + " |")
    print("| --- " * (len(parts) + 1) + "|")
    for r in results:
        print(f"| {r['routing']} | " + " | ".join(f"{r['split'].get(part, 0.0):.3f}" for part in parts) + " |")


if __name__ == "__main__":
    main()
