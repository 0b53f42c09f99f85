"""One DeepSpeed training step on every rank of a launch, then a checkpoint and an eval-mode forward pass.
Rank 0 saves the losses, the eval losses and the updated weights, gathered from their ZeRO partitions and
expert-parallel ranks under global names. Used by tests/test_step_parity.py, which compares them with a
single-process reference step and with the consolidated checkpoint."""
import argparse
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.engine import (all_gather_objects, build_model, init_distributed, initialize,  # noqa: E402
                           load_deepspeed_config)
from eve_ds.model import ExpertPlacement  # noqa: E402
from eve_ds.objectives import PretrainingModel  # noqa: E402
from eve_ds.trainer import step_seed, to_device  # noqa: E402
from tests.parity import PARITY_CONFIG, SEED, global_batch, shard  # noqa: E402


def gathered_weights(module, placement: ExpertPlacement) -> dict:
    """Every parameter whole (gathered from its ZeRO-3 partitions), under its global name."""
    weights = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            weights[placement.global_name(name)] = param.detach().clone()
    return weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ds_config, parallelism = load_deepspeed_config(args.deepspeed_config, world_size, PARITY_CONFIG.num_experts, 1)
    ep_size = parallelism.expert_parallel_size

    torch.manual_seed(SEED)
    placement = ExpertPlacement.of_global_rank(rank, PARITY_CONFIG.num_experts, ep_size)
    model = build_model(lambda: PretrainingModel(PARITY_CONFIG, placement), ds_config)
    # What each rank holds once built: under ZeRO-3 only partitions (the config persists no parameter whole), each
    # expert's over the ranks that share it.
    built = {"whole_elements": sum(param.data.numel() for param in model.parameters()),
             "expert_partition_ranks": sorted({tuple(dist.get_process_group_ranks(param.ds_process_group))
                                               for moe in model.encoder.moe_layers()
                                               for param in moe.local_experts.parameters()
                                               if hasattr(param, "ds_process_group")})}
    initial = gathered_weights(model, placement)
    model.encoder.activation_checkpointing = parallelism.activation_checkpointing
    engine, _ = initialize(model, ds_config, placement)

    batch = to_device(shard(global_batch(ds_config["train_micro_batch_size_per_gpu"] * world_size), rank,
                            world_size), engine)
    torch.manual_seed(step_seed(SEED, 1, 0, rank))
    loss = engine(**batch)["loss"]
    engine.backward(loss)
    engine.step()

    engine.save_checkpoint(args.checkpoint_dir, tag="step_1",
                           client_state={"model_config": PARITY_CONFIG.to_dict(), "step": 1})
    engine.eval()
    with torch.no_grad():  # eval mode routes deterministically: the reference for consolidated weights
        evaluation = {name: value.item() for name, value in engine(**batch).items()}

    initials, weights = all_gather_objects(initial), all_gather_objects(gathered_weights(engine.module, placement))
    losses, evaluations = all_gather_objects(loss.item()), all_gather_objects(evaluation)
    builds = all_gather_objects(built)
    if rank == 0:
        merged = {name: tensor for part in weights for name, tensor in part.items()}
        initial = {name: tensor for part in initials for name, tensor in part.items()}
        torch.save({"losses": losses, "weights": merged, "initial": initial, "eval": evaluations, "built": builds,
                    "expert_parallel_size": ep_size}, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
