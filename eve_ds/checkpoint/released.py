"""The EVE authors' released checkpoint layout, and the one mapping between it and eve-ds's encoder.

The authors' fine-tuning code loads ``torch.load(path)["model"]`` (or the bare dict) and takes the
backbone from keys under ``backbone.``: a BEiT/VLMo-style multiway Transformer whose MoE layers are their
copy of DeepSpeed's MoE (``mlp_moe.moe.gate.wg``, ``mlp_moe.moe.experts.experts.<e>``, router embeddings
``mlp_moe.moe.vision_embed``/``text_embed``). Files written with stock DeepSpeed module names
(``mlp_moe.deepspeed_moe.``, ``experts.deepspeed_experts.``) are read too.

Their task heads lie beside the backbone under their own module names (``head_names``): VQA's and the NLVR2 MLP's
``output.*``, NLVR2's ``--biattn`` head (``attn1``, ``attn2``, ``fc``, ``attn_pool``, ``nlvr2_output``), retrieval's
``itc_vision_proj_head``, ``itc_text_proj_head``, ``itc_temp`` and ``itm_head``. An import keeps the head a file
holds and records its task (``held_by``): their pre-trained files' ``mitc_*`` / ``mitm_head`` heads, and the
``itc_vl_*`` projections where the ``itc_*`` ones are absent, become retrieval's, as their ``--load_head`` maps them.
eve-ds's pre-training heads, which have no counterpart in their released code, travel under
``eve_ds_pretraining.``, which their loaders ignore.

The authors' MoE layer adds the routing embedding to the experts' input as well as the router's, so an
imported model has ``routing_embedding_to_experts`` on, and a router-only model cannot be exported. One
behaviour differs between the codes: their gate samples the second expert in eval mode too (eve-ds routes
deterministically there). A checkpoint's image and text position tables set ``image_size`` and
``max_text_len`` of the imported model; ``EVE.from_pretrained`` fits them to another resolution.
"""
import math
import pickle
import re
from pathlib import Path

import torch

from eve_ds.checkpoint.pretrained import (ENCODER, PRETRAINING, CheckpointError, HeldModel, held_model, key_report,
                                         load_pretrained, state_dict_mismatch, write_atomically)
from eve_ds.config import EVEConfig
from eve_ds.errors import UsageError
from eve_ds.model.moe import TEXT, VISION

PREFIX = "backbone."
# How many leading unit dimensions eve-ds gives parameters that the authors store as [width] or
# [positions, width].
LEADING_UNIT_DIMS = {"image_cls": 2, "vision_mask_embed": 2, "image_pos": 1, "text_pos": 1}
STOCK_DEEPSPEED_NAMES = [(re.compile(r"\.mlp_moe\.deepspeed_moe\."), ".mlp_moe.moe."),
                         (re.compile(r"\.experts\.deepspeed_experts\."), ".experts.experts.")]
MASK_EMBED = "mask_embed_vision"  # only pre-trained files have it; the authors' fine-tuning models do not
PRETRAINING_HEADS = "eve_ds_pretraining."
RETRIEVAL_HEAD = {"image_projection.weight": "itc_vision_proj_head.weight",
                  "text_projection.weight": "itc_text_proj_head.weight", "temperature": "itc_temp",
                  "itm_head.weight": "itm_head.weight", "itm_head.bias": "itm_head.bias"}
# Other names of retrieval's head in the authors' files, in the order their --load_head prefers them after their own.
RETRIEVAL_ALIASES = {"itc_vision_proj_head.weight": ("mitc_vision_proj_head.weight", "itc_vl_vision_proj_head.weight"),
                     "itc_text_proj_head.weight": ("mitc_text_proj_head.weight", "itc_vl_text_proj_head.weight"),
                     "itc_temp": ("mitc_temp", ), "itm_head.weight": ("mitm_head.weight", ),
                     "itm_head.bias": ("mitm_head.bias", )}


def _affine(ours: str, theirs: str) -> list:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


def name_pairs(config: EVEConfig) -> list:
    """(eve-ds encoder name, released name) for every encoder parameter; a released name that is a
    (vision, text) pair holds the rows of a [2, width] eve-ds parameter."""
    pairs = [*_affine("patch_embed", "patch_embed"), ("image_cls", "class_embedding_vision"),
             ("image_pos", "pos_embed_vision"), ("vision_mask_embed", MASK_EMBED),
             ("token_embed.weight", "word_embedding.weight"), *_affine("token_norm", "layer_norm_text"),
             ("text_pos", "pos_embed_text"), ("modality_type_embed", ("type_embed_vision", "type_embed_text")),
             *_affine("embed_norm", "pre_layrnorm"), *_affine("norm", "norm")]
    for layer in range(config.num_layers):
        block = [*_affine("norm1", "norm1"), ("attn.qkv.weight", "attn.qkv.weight"), ("attn.q_bias", "attn.q_bias"),
                 ("attn.v_bias", "attn.v_bias"), *_affine("attn.proj", "attn.proj"), ("gamma1", "gamma_1"),
                 ("gamma2", "gamma_2")]
        if layer in config.moe_layers:
            moe, theirs = "ffn.deepspeed_moe.", "mlp_moe.moe."
            block += [*_affine("norm2", "norm2_vl"), (f"{moe}gate.wg.weight", f"{theirs}gate.wg.weight"),
                      (f"{moe}gate.modality_embed", (f"{theirs}vision_embed", f"{theirs}text_embed"))]
            for expert in range(config.num_experts):
                for fc in ("fc1", "fc2"):
                    block += _affine(f"{moe}experts.deepspeed_experts.{expert}.{fc}",
                                     f"{theirs}experts.experts.{expert}.{fc}")
        else:
            modalities = [("vision", "imag"), ("text", "text")]
            if layer in config.vl_ffn_layers:  # VLMo's names for its VL-FFN, from which the authors' code descends
                modalities.append(("vision_language", "vl"))
            for modality, short in modalities:
                block += [*_affine(f"ffn.{modality}_norm", f"norm2_{short}"),
                          *_affine(f"ffn.{modality}.fc1", f"mlp_{short}.fc1"),
                          *_affine(f"ffn.{modality}.fc2", f"mlp_{short}.fc2")]
        ours_prefix, theirs_prefix = f"blocks.{layer}.", f"encoder.layers.{layer}."
        pairs += [(ours_prefix + ours, tuple(theirs_prefix + t for t in theirs) if isinstance(theirs, tuple)
                   else theirs_prefix + theirs) for ours, theirs in block]
    return pairs


def to_released(encoder_state: dict, config: EVEConfig) -> dict:
    """eve-ds encoder weights -> the authors' backbone keys (with ``backbone.``). Their position-id buffers
    are left out: their model builds them from its own config, and loading one of another length fails."""
    released = {}
    for ours, theirs in name_pairs(config):
        tensor = encoder_state[ours]
        if isinstance(theirs, tuple):
            released.update({name: tensor[row] for row, name in zip((VISION, TEXT), theirs)})
        else:
            released[theirs] = tensor.reshape(tensor.shape[LEADING_UNIT_DIMS.get(ours, 0):])
    return {PREFIX + name: tensor for name, tensor in released.items()}


def head_names(held: HeldModel, config: EVEConfig) -> dict:
    """eve-ds name -> the authors' name of every tensor of the model's head (empty for the encoder alone)."""
    names = [name for name in held.expected_shapes(config) if not name.startswith("encoder.")]
    if held.task == PRETRAINING:
        return {name: PRETRAINING_HEADS + name for name in names}
    if held.task == "retrieval":
        return dict(RETRIEVAL_HEAD)
    if held.task == "nlvr2" and held.head_options.get("head") == "biattn":
        return {name: name.removeprefix("head.") for name in names}
    return {name: "output." + name.removeprefix("head.") for name in names}  # VQA's and NLVR2's MLP classifier


def held_by(others: dict, config: EVEConfig) -> tuple:
    """(HeldModel, the head's tensors under the authors' names, notes) of a released file's tensors outside the
    backbone (``backbone``'s second value), told by the names and shapes the authors' task models give them; the
    notes name what is left out."""
    others, renamed = dict(others), {}
    if any(name.startswith(PRETRAINING_HEADS) for name in others):
        held = HeldModel(PRETRAINING)
    elif "nlvr2_output.weight" in others:
        held = HeldModel("nlvr2", {"head": "biattn"})
    elif "output.0.weight" in others and "output.3.weight" in others:
        if others["output.0.weight"].shape[-1] == config.hidden_size:
            held = HeldModel("vqa", {"num_answers": others["output.3.weight"].shape[0]})
        else:
            held = HeldModel("nlvr2", {"head": "mlp"})
    elif any(name in others for theirs, aliases in RETRIEVAL_ALIASES.items() for name in (theirs, *aliases)):
        held = HeldModel("retrieval")
        for theirs, aliases in RETRIEVAL_ALIASES.items():
            found = next((name for name in (theirs, *aliases) if name in others), None)
            if found is not None and found != theirs:
                others[theirs] = others.pop(found)
                renamed[theirs] = found
    else:
        held = HeldModel(ENCODER)
    names = set(head_names(held, config).values())
    head = {theirs: others.pop(theirs) for theirs in sorted(names) if theirs in others}
    notes = []
    absent = sorted(names - set(head) - {"itc_temp"})
    if held.task == "retrieval" and absent:  # e.g. a pre-trained file with contrastive heads and no matching head
        notes.append(f"an incomplete retrieval head (no {', '.join(absent)}) is left out")
        held, others = HeldModel(ENCODER), {**others, **{renamed.get(name, name): t for name, t in head.items()}}
        head = {}
    if others:
        notes.append(key_report(f"tensors outside '{PREFIX}' left out (no part of {held.describe()})", sorted(others))
                     .strip())
    return held, head, notes


def backbone(checkpoint: dict) -> tuple:
    """The backbone weights of a loaded released file under names without ``backbone.``, in the authors'
    module names, and its other tensors (task heads) under their names."""
    state = checkpoint.get("model", checkpoint.get("module", checkpoint)) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError("holds no state dict (expected a dict of tensors, or one under 'model' or 'module')")
    prefixed = any(name.startswith(PREFIX) for name in state)
    weights, others = {}, {}
    for name, tensor in state.items():
        if prefixed and not name.startswith(PREFIX):
            if torch.is_tensor(tensor):
                others[name] = tensor
            continue
        name = "." + name.removeprefix(PREFIX)
        for pattern, canonical in STOCK_DEEPSPEED_NAMES:
            name = pattern.sub(canonical, name)
        if not name.startswith(".position_ids_"):  # buffers, rebuilt from the config
            weights[name[1:]] = tensor
    return weights, others


def released_config(weights: dict, preset_config: EVEConfig) -> EVEConfig:
    """The model config of released backbone weights: the preset's, with the sizes the file sets itself.
    Raises CheckpointError naming each architectural size in which the file and the preset differ."""
    for required in ("patch_embed.weight", "word_embedding.weight", "pos_embed_vision", "pos_embed_text"):
        if required not in weights:
            raise CheckpointError(f"has no '{PREFIX}{required}': not an EVE backbone")
    width, in_channels, patch_size, _ = weights["patch_embed.weight"].shape
    layers = {int(m[1]) for name in weights if (m := re.match(r"encoder\.layers\.(\d+)\.", name))}
    moe_layers = sorted({int(m[1]) for name in weights if (m := re.match(r"encoder\.layers\.(\d+)\.mlp_moe\.", name))})
    experts = {m[1] for name in weights if (m := re.match(rf"encoder\.layers\.{moe_layers[0]}\.mlp_moe\.moe\.experts"
                                                          r"\.experts\.(\d+)\.", name))} if moe_layers else ()
    first_ffn = next((name for name in sorted(weights) if re.search(r"\.(mlp_imag|experts\.\d+)\.fc1\.weight$", name)),
                     None)
    structure = {"hidden_size": width, "in_channels": in_channels, "patch_size": patch_size,
                 "num_layers": max(layers) + 1 if layers else 0, "moe_layers": tuple(moe_layers),
                 "num_experts": len(experts) or preset_config.num_experts,
                 "ffn_hidden_size": weights[first_ffn].shape[0] if first_ffn else preset_config.ffn_hidden_size}
    differences = [f"{key} {value} (the preset has {getattr(preset_config, key)})" for key, value in structure.items()
                   if value != getattr(preset_config, key)]
    if differences:
        raise CheckpointError("is another architecture than the chosen model: " + ", ".join(differences))
    image_positions = weights["pos_embed_vision"].shape[0] - 1
    grid = math.isqrt(image_positions)
    if grid * grid != image_positions:
        raise CheckpointError(f"'{PREFIX}pos_embed_vision' has {image_positions} patch positions, "
                              "not a square grid")
    return preset_config.replace(vocab_size=weights["word_embedding.weight"].shape[0], image_size=grid * patch_size,
                                 max_text_len=weights["pos_embed_text"].shape[0])


def authors_config(preset_config: EVEConfig) -> EVEConfig:
    """The authors' model has no other MoE variant than the one whose experts see the routing embedding."""
    return preset_config.replace(routing_embedding_to_experts=True)


def from_released(weights: dict, config: EVEConfig, expected_shapes: dict) -> tuple:
    """Released backbone weights (``backbone`` output) -> eve-ds encoder weights; ``expected_shapes`` are the
    encoder's (name -> shape). Returns (weights, notes). Raises CheckpointError naming missing, unexpected and
    mis-shaped keys."""
    weights, encoder, notes, missing = dict(weights), {}, [], []
    for ours, theirs in name_pairs(config):
        names = theirs if isinstance(theirs, tuple) else (theirs, )
        absent = [name for name in names if name not in weights]
        if absent == [MASK_EMBED]:
            encoder[ours] = torch.zeros(expected_shapes[ours])
            notes.append(f"'{PREFIX}{MASK_EMBED}' is absent (a fine-tuned checkpoint?): the vision mask embedding "
                         "starts at zero")
        elif absent:
            missing += [PREFIX + name for name in absent]
        elif isinstance(theirs, tuple):
            encoder[ours] = torch.stack([weights.pop(name) for name in theirs])
        else:
            tensor = weights.pop(theirs)
            unsqueeze = ours in LEADING_UNIT_DIMS and tensor.numel() == math.prod(expected_shapes[ours])
            encoder[ours] = tensor.reshape(expected_shapes[ours]) if unsqueeze else tensor
    problems = [key_report("missing", missing)] if missing else []
    if weights:
        problems.append(key_report("unexpected", [PREFIX + name for name in sorted(weights)]))
    problems += state_dict_mismatch(expected_shapes, encoder) if not problems else []
    if problems:
        raise CheckpointError("does not fit the EVE backbone:\n" + "\n".join(problems))
    return encoder, notes


def _encoder_shapes(config: EVEConfig) -> dict:
    return {name.removeprefix("encoder."): shape for name, shape in HeldModel(ENCODER).expected_shapes(config).items()}


def export_released(consolidated_dir, out_file) -> HeldModel:
    """Writes a consolidated folder (tools/consolidate.py, any model) as a released-layout file: ``{"model":
    {backbone..., the head under the authors' names}, "eve_ds_model_config": {...}}``; returns what model it was.
    Raises CheckpointError on a bad folder."""
    state_dict, config = load_pretrained(consolidated_dir)
    held = held_model(consolidated_dir)
    mismatch = state_dict_mismatch(held.expected_shapes(config), state_dict)
    if mismatch:
        raise CheckpointError("\n".join([f"{consolidated_dir}: the weights do not fit {held.describe()} of its "
                                          "config:", *mismatch]))
    if config.vl_ffn_layers or not config.modality_aware_routing:
        raise CheckpointError(f"{consolidated_dir}: the model has "
                              f"{'VL-FFN layers' if config.vl_ffn_layers else 'routing without modality embeddings'}, "
                              "which the authors' EVE layout cannot hold")
    if not config.routing_embedding_to_experts:
        raise CheckpointError(f"{consolidated_dir}: the model adds the routing embedding to the router's input "
                              "only (routing_embedding_to_experts false); the authors' code adds it to the experts' "
                              "input too, so these weights would compute another function there")
    encoder = {name.removeprefix("encoder."): t for name, t in state_dict.items() if name.startswith("encoder.")}
    released = to_released(encoder, config)
    # The authors store their retrieval temperature as a 0-d tensor, eve-ds as one element.
    released.update({theirs: state_dict[ours].reshape(()) if ours == "temperature" else state_dict[ours]
                     for ours, theirs in head_names(held, config).items()})
    checkpoint = {"model": released, "eve_ds_model_config": config.to_dict()}
    write_atomically(Path(out_file), lambda path: torch.save(checkpoint, path))
    return held


def import_released(path, preset_config: EVEConfig = None, allow_pickle: bool = False) -> tuple:
    """Reads a released-layout file; returns (its weights under eve-ds names: ``encoder.*`` and the head it holds,
    EVEConfig, HeldModel, notes). The config comes from the file where eve-ds wrote it, else from ``preset_config``
    with the sizes the file sets. Raises CheckpointError, naming the file, on anything that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: holds objects beyond tensors and plain containers ({str(error)[:200]}); "
                              "pass --allow-pickle if you trust its source") from None
    except Exception as error:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {str(error)[:200]})") from None
    try:
        embedded = checkpoint.get("eve_ds_model_config") if isinstance(checkpoint, dict) else None
        if embedded is None and preset_config is None:
            raise CheckpointError("carries no eve-ds model config: name the model it is (e.g. --model eve-base)")
        weights, others = backbone(checkpoint)
        config = released_config(weights, EVEConfig.from_dict(embedded) if embedded else authors_config(preset_config))
        encoder, notes = from_released(weights, config, _encoder_shapes(config))
        held, head, head_notes = held_by(others, config)
        notes += head_notes
        state_dict = {f"encoder.{name}": tensor for name, tensor in encoder.items()}
        state_dict.update(_head_from_released(held, head, config))
    except UsageError as error:  # a CheckpointError, or the ConfigError of a bad embedded config
        raise CheckpointError(f"{path}: {error}") from None
    return state_dict, config, held, notes


def _head_from_released(held: HeldModel, head: dict, config: EVEConfig) -> dict:
    """The head's tensors under eve-ds names, shaped as the model's; raises CheckpointError naming missing and
    mis-shaped ones (the retrieval temperature, absent from some files, starts at its initial value)."""
    names = head_names(held, config)
    expected = {ours: shape for ours, shape in held.expected_shapes(config).items() if ours in names}
    tensors, missing = {}, []
    for ours, theirs in names.items():
        if theirs in head:
            tensor = head[theirs]
            tensors[ours] = tensor.reshape(expected[ours]) if tensor.numel() == math.prod(expected[ours]) else tensor
        elif ours == "temperature":
            from eve_ds.objectives.contrastive import INITIAL_TEMPERATURE
            tensors[ours] = torch.full(expected[ours], INITIAL_TEMPERATURE)
        else:
            missing.append(theirs)
    problems = [key_report("missing", missing)] if missing else state_dict_mismatch(expected, tensors)
    if problems:
        raise CheckpointError("\n".join([f"holds {held.describe()} whose head does not fit it:", *problems]))
    return tensors
