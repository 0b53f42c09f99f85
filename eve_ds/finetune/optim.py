"""AdamW parameter groups and the learning-rate schedule of fine-tuning.

The groups follow the authors: no weight decay on biases, norms and other 1-D parameters (and, as in
pre-training, on position tables and embeddings), and a learning-rate multiplier for the parameters that
pre-training did not provide. Each group carries its own ``lr`` (base x multiplier) and the multiplier as
``lr_scale``; expert parameters go to groups of their own, as DeepSpeed's MoE requires.

The schedule (``lr_scheduler``) sets each group's peak to base lr x ``lr_scale`` and multiplies it by one
warmup-then-decay factor, so the multiplier survives every step. Pass it to DeepSpeed as
``deepspeed.initialize(..., lr_scheduler=partial(lr_scheduler, base_lr=..., ...))``; a client scheduler
takes the place of the JSON "scheduler". DeepSpeed's JSON schedulers (0.19.8) are no substitute:
WarmupCosineLR does scale each group's own lr, but defaults to a log warmup and a floor of 1e-4;
WarmupDecayLR sets every group to one ``warmup_max_lr`` (default 0.001, which erases the multiplier) unless
that is null; WarmupLR does not decay.
"""
import math
from functools import partial

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from eve_ds.engine import no_weight_decay

SCHEDULES = ("linear", "cosine")


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, lr_multiplier: float = 1.0,
                 new_parameter_names=None) -> list:
    """Param-group dicts for torch.optim.AdamW or ``deepspeed.initialize(model_parameters=...)``.

    ``new_parameter_names`` (default: ``model.new_parameter_names()``) get ``lr x lr_multiplier``; the
    others ``lr``. Frozen parameters are left out; empty groups too.
    """
    names = {name for name, _ in model.named_parameters()}
    new = frozenset(model.new_parameter_names() if new_parameter_names is None else new_parameter_names)
    if new - names:
        raise ValueError(f"new parameters {sorted(new - names)[:4]} are not parameters of the model")
    groups = {}
    for is_new in (False, True):
        scale = lr_multiplier if is_new else 1.0
        for decays in (True, False):
            name = ("new_" if is_new else "") + ("decay" if decays else "no_decay")
            groups[is_new, decays] = {"name": name, "params": [], "weight_decay": weight_decay if decays else 0.0,
                                      "lr": lr * scale, "lr_scale": scale}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[name in new, not no_weight_decay(name, param)]["params"].append(param)
    nonempty = [group for group in groups.values() if group["params"]]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(nonempty) if group["params"]]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The authors' schedule: linear warmup from 0 over ``warmup_steps``, then linear or cosine decay to 0 at
    ``total_steps`` (and 0 after)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int,
                 schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr = base_lr x its ``lr_scale`` (1 where absent) x ``lr_factor(step)``; call ``step()``
    after each optimizer step (DeepSpeed's engine does)."""
    lr_factor(0, total_steps, warmup_steps, schedule)  # fail on a bad schedule name now, not at the first step
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = base_lr * group.get("lr_scale", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule))
