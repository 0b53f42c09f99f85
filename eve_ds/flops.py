"""Activated FLOPs of an EVE pre-training step, for TFLOP/s and MFU.

Counted, for one sample of ``image_tokens`` (class + patches) and ``text_tokens`` (the padded length: every
position is computed), N = image_tokens + text_tokens, width d, FFN width f, E experts, top-k:

- patch projection: 2 · patches · (3 · patch²) · d (a matmul; token-embedding lookups are not counted)
- per layer, attention: 2 · N · d · 3d (qkv) + 2 · N · d · d (output) + 2 · N² · d (scores) + 2 · N² · d (values)
- per multiway layer: 2 · N · 2df (each token passes one of the two FFNs); a layer with a VL-FFN of width g passes
  the tokens of a joint image-text sequence through it instead: 2 · N · 2dg
- per MoE layer: 2 · N · dE (router) + k · 2 · N · 2df (the k experts a token is routed to, as if none is
  dropped: capacity drops and empty capacity slots are not counted)
- heads: 2 · masked_patches · d · (3 · patch²) + 2 · masked_text · d · V (applied to masked positions only)

Backward costs twice the forward: a training step is 3x the forward FLOPs. Recomputation by activation
checkpointing is not counted (these are model FLOPs, as in Megatron's MFU). Biases, norms, activations and
softmax are left out (a few per mille).
"""
from eve_ds.config import EVEConfig
from eve_ds.objectives.masking import IGNORE_INDEX

H100_BF16_DENSE_TFLOPS = 989.0


def forward_flops(config: EVEConfig, image_tokens: int, text_tokens: int, masked_patches: float = 0.0,
                  masked_text: float = 0.0, with_heads: bool = True) -> float:
    """Activated forward FLOPs of one sample (masked counts may be averages, hence floats)."""
    d, f, pixels = config.hidden_size, config.ffn_hidden_size, config.in_channels * config.patch_size**2
    tokens = image_tokens + text_tokens
    flops = 2.0 * (image_tokens - 1) * pixels * d if image_tokens else 0.0
    attention = 2.0 * tokens * d * 4 * d + 4.0 * tokens * tokens * d
    feed_forward = 2.0 * tokens * 2 * d * f
    router = 2.0 * tokens * d * config.num_experts
    num_moe = len(config.moe_layers)
    num_vl = len(config.vl_ffn_layers) if image_tokens and text_tokens else 0
    flops += config.num_layers * attention + (config.num_layers - num_moe - num_vl) * feed_forward
    flops += num_vl * 2.0 * tokens * 2 * d * config.vl_ffn_width
    flops += num_moe * (router + config.top_k * feed_forward)
    if with_heads:
        flops += 2.0 * masked_patches * d * pixels + 2.0 * masked_text * d * config.vocab_size
    return flops


def training_flops(config: EVEConfig, image_tokens: int, text_tokens: int, masked_patches: float = 0.0,
                   masked_text: float = 0.0) -> float:
    """Activated FLOPs of forward and backward for one sample."""
    return 3.0 * forward_flops(config, image_tokens, text_tokens, masked_patches, masked_text)


def batch_training_flops(config: EVEConfig, batch: dict, objectives=("msm", )) -> float:
    """Activated FLOPs of forward and backward for a pre-training micro-batch under ``objectives`` (its masks count
    what the heads see): msm and mlm a joint pass each, itc an image-only and a text-only pass, itm three joint
    passes; a micro-batch of an image-only or text-only source one pass of its modality
    (``objectives.PretrainingModel``)."""
    image_tokens = config.num_image_tokens
    if "text_ids" not in batch:
        size = len(batch["images"])
        return size * training_flops(config, image_tokens, 0, float(batch["image_mask"].sum()) / size)
    size, text_len = batch["text_ids"].shape
    if "images" not in batch:
        labels = batch["mlm_text_labels" if "mlm" in objectives else "text_labels"]
        return size * training_flops(config, 0, text_len, 0.0, float((labels != IGNORE_INDEX).sum()) / size)
    flops = 0.0
    if "msm" in objectives:
        flops += training_flops(config, image_tokens, text_len, float(batch["image_mask"].sum()) / size,
                                float((batch["text_labels"] != IGNORE_INDEX).sum()) / size)
    if "mlm" in objectives:
        flops += training_flops(config, image_tokens, text_len, 0.0,
                                float((batch["mlm_text_labels"] != IGNORE_INDEX).sum()) / size)
    if "itc" in objectives:
        flops += training_flops(config, image_tokens, 0) + training_flops(config, 0, text_len)
    if "itm" in objectives:
        flops += 3 * training_flops(config, image_tokens, text_len)
    return size * flops
