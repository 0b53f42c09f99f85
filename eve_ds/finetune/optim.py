"""AdamW parameter groups and the learning-rate schedule of fine-tuning.

The groups follow the authors' ``optim.py``. Weight decay: a parameter is exempt when its name *in the
authors' task model* contains one of ``AUTHORS_NO_DECAY`` (a plain, case-sensitive substring test); every
other parameter decays. So biases, ``norm1``, the pre-encoder norm (``pre_layrnorm``) and the final ``norm``
are exempt, while the position, class and type embeddings, the word embedding, the layer scales, the text
embedding norm (``layer_norm_text``), the FFN norms (``norm2_imag``, ``norm2_text``, ``norm2_vl``), the MoE
routing embeddings and gate, the LayerNorm inside the classifier heads (``output.1``) and the retrieval
temperature all decay. The rule reads the authors' names, not eve-ds's (``norm2.weight`` is eve-ds's name for
their ``norm2_vl.weight``, which decays), so each parameter is first renamed (``authors_names``): the encoder
through the one mapping of ``eve_ds.checkpoint.released``, the heads through ``AUTHORS_HEAD_NAMES``.
Pre-training groups its parameters otherwise (``engine.optimizer_param_groups``).

A learning-rate multiplier goes to the parameters that pre-training did not provide. Each group carries its own
``lr`` (base x multiplier) and the multiplier as ``lr_scale``; expert parameters go to groups of their own, as
DeepSpeed's MoE requires.

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

from eve_ds.checkpoint.released import PREFIX, name_pairs

SCHEDULES = ("linear", "cosine")
# The authors' no-decay list, verbatim; a name containing any of these is exempt. In their model only "bias",
# "norm.*" (which also catches "pre_layrnorm.*") and "norm1.*" match: it has no "LayerNorm" and no "norm2" module.
AUTHORS_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                    "norm1.weight", "norm2.bias", "norm2.weight")
# Head parameters (prefix of the eve-ds name -> prefix of the authors'), from their models/model_*_beit.py: VQA and
# NLVR2 (without --biattn) call the classifier ``output``; retrieval has the projections, ``itc_temp``, ``itm_head``.
# Looked up by the longest prefix: NLVR2's bi-attention head keeps the authors' module names under "head.".
AUTHORS_HEAD_NAMES = {"head.": "output.", "image_projection.": "itc_vision_proj_head.",
                      "text_projection.": "itc_text_proj_head.", "temperature": "itc_temp", "itm_head.": "itm_head.",
                      **{f"head.{name}.": f"{name}." for name in ("attn1", "attn2", "fc", "attn_pool", "nlvr2_output")}}
ENCODER = "encoder."


def authors_names(model: torch.nn.Module) -> dict:
    """Each parameter name of a task model -> its names in the authors' task model (two for a [2, width]
    parameter that they hold as a vision and a text vector). An expert-parallel rank counts its experts from 0, so
    its experts get the names of the first global experts: the same names up to the index, which no rule reads.
    Raises ValueError on a parameter the authors' model has no counterpart for."""
    encoder = {ENCODER + ours: theirs if isinstance(theirs, tuple) else (theirs, )
               for ours, theirs in name_pairs(model.config)}
    names = {}
    for name, _ in model.named_parameters():
        head = max((prefix for prefix in AUTHORS_HEAD_NAMES if name.startswith(prefix)), key=len, default=None)
        if name in encoder:
            names[name] = tuple(PREFIX + theirs for theirs in encoder[name])
        elif head is not None:
            names[name] = (AUTHORS_HEAD_NAMES[head] + name.removeprefix(head), )
        else:
            raise ValueError(f"parameter '{name}' has no counterpart in the authors' task models, so their weight-decay "
                             "rule cannot place it")
    return names


def authors_decay(authors_name: str) -> bool:
    """The authors' rule, on one of their parameter names."""
    return not any(pattern in authors_name for pattern in AUTHORS_NO_DECAY)


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, lr_multiplier: float = 1.0,
                 new_parameter_names=None) -> list:
    """Param-group dicts for torch.optim.AdamW or ``deepspeed.initialize(model_parameters=...)``.

    ``new_parameter_names`` (default: ``model.new_parameter_names()``) get ``lr x lr_multiplier``; the
    others ``lr``. Decay follows the authors' rule on the authors' names (module docstring). Frozen parameters
    are left out; empty groups too.
    """
    names = {name for name, _ in model.named_parameters()}
    new = frozenset(model.new_parameter_names() if new_parameter_names is None else new_parameter_names)
    if new - names:
        raise ValueError(f"new parameters {sorted(new - names)[:4]} are not parameters of the model")
    theirs = authors_names(model)
    groups = {}
    for is_new in (False, True):
        scale = lr_multiplier if is_new else 1.0
        for decays in (True, False):
            name = ("new_" if is_new else "") + ("decay" if decays else "no_decay")
            groups[is_new, decays] = {"name": name, "params": [], "weight_decay": weight_decay if decays else 0.0,
                                      "lr": lr * scale, "lr_scale": scale}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # A vision/text pair of theirs is one parameter here; under their rule its two names always agree.
            groups[name in new, all(authors_decay(n) for n in theirs[name])]["params"].append(param)
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
