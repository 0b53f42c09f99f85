"""Per-rank training-state memory of EVE under a DeepSpeed config, against the ideal of total / ranks.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/memory.py --model eve-base \\
        --deepspeed_config ds_configs/zero3.json [--finetune-from CONSOLIDATED_DIR | --resume-from UNIVERSAL_DIR]

With ``--finetune-from`` the model is fine-tuning's VQA model loaded from a consolidated folder
(tools/consolidate.py), as ``launch/finetune.py`` starts, and the steps are VQA steps. With ``--resume-from`` the
weights and AdamW moments come from a universal checkpoint (tools/reshard.py), as ``launch/pretrain.py
--resume-from`` starts.

Builds the model, takes one training step on a random micro batch of one sample (so that the optimizer
state exists) and the backward pass of a second, then, before the second optimizer step, counts the
bytes of every tensor alive on each rank, each storage once: the weights, gradients and optimizer
states this rank holds, plus buffers. The ideal is the fp32
training state of the whole model (4 bytes of weight + 4 of gradient + 8 of AdamW moments per
parameter) divided by the number of ranks.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint.pretrained import load_weights, pretrained_config  # noqa: E402
from eve_ds.checkpoint.universal import load_universal, restore_optimizer_state  # noqa: E402
from eve_ds.config import preset  # noqa: E402
from eve_ds.engine import (all_gather_objects, build_model, init_distributed, initialize,  # noqa: E402
                           load_deepspeed_config, zero_stage)
from eve_ds.finetune.vqa import VQAModel  # noqa: E402
from eve_ds.model import ExpertPlacement  # noqa: E402
from eve_ds.objectives import PretrainingModel  # noqa: E402
from eve_ds.params import parameter_counts  # noqa: E402
from eve_ds.trainer import peak_memory_mb  # noqa: E402

BYTES_PER_PARAMETER = 4 + 4 + 8


def _storages(tensors) -> dict:
    found = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta and tensor.numel() > 0:
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def memory_breakdown(engine) -> dict:
    """Bytes of live tensor storage on this rank: model weights (what the module holds, ZeRO-3 partitions
    included), the optimizer's fp32 master weights with their gradients, its moments, and the rest
    (gradient buckets and other buffers). Each storage is counted once, in the first category it is in."""
    zero = engine.optimizer
    inner = zero.optimizer if hasattr(zero, "optimizer") else zero
    # ZeRO-1/2 keep fp32 master partitions in single_partition_of_fp32_groups, ZeRO-3 in
    # fp32_partitioned_groups_flat (outside the inner optimizer's groups between steps).
    masters = [p for group in inner.param_groups for p in group["params"]]
    masters += list(getattr(zero, "single_partition_of_fp32_groups", [])) + list(getattr(zero, "fp32_partitioned_groups_flat", []))
    gradients = [p.grad for p in masters] + [p.grad for p in engine.module.parameters()]
    gradients += [getattr(zero, "grad_partitions_flat_buffer", None)]  # ZeRO-3
    gradients += [g for grads in getattr(zero, "averaged_gradients", {}).values() for g in grads or []]  # ZeRO-1/2
    categories = {
        "weights": _storages([t for p in engine.module.parameters() for t in (p.data, getattr(p, "ds_tensor", None))]),
        "master_weights": _storages(masters),
        "gradients": _storages(gradients),
        "optimizer_moments": _storages([t for state in inner.state.values() for t in state.values()]),
        "other": _storages(obj for obj in gc.get_objects()
                           if isinstance(obj, torch.Tensor) and obj.device.type == engine.device.type),
    }
    seen, breakdown = set(), {}
    for name, storages in categories.items():
        breakdown[name] = sum(size for ptr, size in storages.items() if ptr not in seen)
        seen.update(storages)
    breakdown["total"] = sum(breakdown.values())
    return breakdown


def anonymous_resident_bytes() -> int:
    """This process's resident memory that is not a mapped file (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) * 2**10


def random_micro_batch(config, size: int, vqa_answers: int = None) -> dict:
    """A pre-training micro batch, or with ``vqa_answers`` a VQA one."""
    text = torch.randint(5, config.vocab_size, (size, config.max_text_len))
    batch = {"images": torch.rand(size, 3, config.image_size, config.image_size) * 2 - 1, "text_ids": text,
             "text_padding_mask": torch.ones(size, config.max_text_len, dtype=torch.bool)}
    if vqa_answers:
        return {**batch, "targets": torch.rand(size, vqa_answers)}
    return {**batch, "image_mask": torch.rand(size, config.num_patches) < 0.75,
            "text_labels": torch.where(torch.rand(size, config.max_text_len) < 0.5, text, -100)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eve-base")
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="also save the training state there as an eve-ds checkpoint (benchmarks/consolidate.py)")
    parser.add_argument("--whole-model-build", action="store_true",
                        help="build the whole model on every rank and let the engine partition it (as before ZeRO-3 "
                             "start-up used deepspeed.zero.Init), to compare start-up memory")
    parser.add_argument("--finetune-from", type=Path, default=None, metavar="CONSOLIDATED_DIR",
                        help="start as fine-tuning does: the VQA model loaded from this folder (its model, not "
                             "--model)")
    parser.add_argument("--resume-from", type=Path, default=None, metavar="UNIVERSAL_DIR",
                        help="start from a universal checkpoint of --model, as pre-training's --resume-from does")
    parser.add_argument("--expert-parallel-size", type=int, default=None, help="replaces the config's")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = pretrained_config(args.finetune_from) if args.finetune_from else preset(args.model)
    ds_config, parallelism = load_deepspeed_config(args.deepspeed_config, world_size, config.routed_experts, 10,
                                                   expert_parallel_size=args.expert_parallel_size)
    ds_config["train_micro_batch_size_per_gpu"], ds_config["train_batch_size"] = 1, world_size
    ds_config["bf16"] = {"enabled": False}
    ep_size = parallelism.expert_parallel_size

    torch.manual_seed(0)
    started = time.perf_counter()
    placement = ExpertPlacement.of_global_rank(rank, config.num_experts, ep_size)
    if args.finetune_from:
        model = VQAModel.from_pretrained(args.finetune_from, placement=placement,
                                         ds_config=None if args.whole_model_build else ds_config)
    else:
        build = lambda: PretrainingModel(config, placement)  # noqa: E731
        model = build() if args.whole_model_build else build_model(build, ds_config)
    if args.resume_from:
        universal = load_universal(args.resume_from)
        load_weights(model, universal.weights.renamed(placement.global_names(model)), args.resume_from)
    start_up, anonymous = {}, {}

    def measure(stage: str, device):
        start_up[stage] = peak_memory_mb(device) * 2**20
        if device.type == "cpu":  # the peak counts the pages of weights files mapped while reading them
            anonymous[stage] = anonymous_resident_bytes()

    measure("built", next(model.parameters()).device)  # the GPU under deepspeed.zero.Init, else the CPU
    built_seconds = time.perf_counter() - started
    model.encoder.activation_checkpointing = parallelism.activation_checkpointing
    engine, _ = initialize(model, ds_config, placement)
    if args.resume_from:
        restore_optimizer_state(engine, universal, placement.global_name)
    engine_seconds = time.perf_counter() - started
    measure("engine", engine.device)
    vqa_answers = model.num_answers if args.finetune_from else None
    batch = {key: value.to(engine.device) for key, value in random_micro_batch(config, 1, vqa_answers).items()}
    engine.backward(engine(**batch)["loss"])
    engine.step()
    engine.backward(engine(**batch)["loss"])  # gradients now live beside the optimizer state
    del batch
    gc.collect()

    measure("after_two_steps", engine.device)
    per_rank = all_gather_objects(memory_breakdown(engine))
    start_up_per_rank, anonymous_per_rank = all_gather_objects(start_up), all_gather_objects(anonymous)
    seconds = all_gather_objects((built_seconds, engine_seconds))
    if rank == 0:
        total = parameter_counts(config).total
        ideal = BYTES_PER_PARAMETER * total / world_size
        report = {"model": str(args.finetune_from or args.model), "config": Path(args.deepspeed_config).name,
                  "zero_stage": zero_stage(ds_config),
                  "expert_parallel_size": ep_size, "ranks": world_size, "parameters": total,
                  "ideal_bytes_per_rank": ideal, "per_rank": per_rank,
                  "whole_model_build": args.whole_model_build, "peak_bytes_per_rank": start_up_per_rank,
                  "anonymous_bytes_per_rank": anonymous_per_rank}
        gib = lambda size: f"{size / 2**30:.2f}"  # noqa: E731
        print(f"{report['model']} {report['config']} (ZeRO-{report['zero_stage']}, ep {ep_size}, {world_size} ranks), "
              f"GiB per rank; ideal total/N {gib(ideal)}")
        for rank_index, breakdown in enumerate(per_rank):
            print(f"  rank {rank_index}: " + ", ".join(f"{name} {gib(size)}" for name, size in breakdown.items())
                  + f" ({breakdown['total'] / ideal:.2f} x ideal)")
        zero_init = zero_stage(ds_config) == 3 and not args.whole_model_build
        print(f"peak memory per rank (GiB; resident set on CPU, allocated on GPU), model built "
              f"{'under deepspeed.zero.Init' if zero_init else 'whole on each rank'}, after (on CPU, in brackets: "
              "resident then, not counting mapped files):")
        for rank_index, (peaks, anonymous_now) in enumerate(zip(start_up_per_rank, anonymous_per_rank)):
            print(f"  rank {rank_index}: " + ", ".join(
                f"{stage.replace('_', ' ')} {gib(size)}" + (f" ({gib(anonymous_now[stage])})" if stage in anonymous_now
                                                          else "")
                for stage, size in peaks.items()))
        print(f"start-up seconds (slowest rank): model built (weights loaded) {max(s[0] for s in seconds):.1f}, "
              f"engine ready {max(s[1] for s in seconds):.1f}")
        report["start_up_seconds"] = seconds
        print("RESULT " + json.dumps(report))
    if args.checkpoint_dir:
        engine.save_checkpoint(args.checkpoint_dir, tag="step_00000001",
                               client_state={"model_config": config.to_dict(), "step": 1})
    dist.barrier()


if __name__ == "__main__":
    main()
