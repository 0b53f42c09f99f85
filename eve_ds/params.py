"""Parameter counts of an EVE configuration: in all, and activated for one token."""
from dataclasses import dataclass

from eve_ds.config import EVEConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    activated: int


def parameter_counts(config: EVEConfig, with_heads: bool = True, objectives=("msm", )) -> ParameterCounts:
    """Counted from the architecture, independent of how experts are sharded over ranks; with the heads of the
    pre-training ``objectives`` (``objectives.PretrainingModel``) unless not ``with_heads``.

    A token activates the shared weights, one of the two multiway FFNs (and its norm) of an ordinary
    layer, ``top_k`` experts of an MoE layer (plus its norm and the router), and, in a joint image-text sequence,
    the VL-FFN (and its norm) of a layer that has one.
    """
    width, ffn = config.hidden_size, config.ffn_hidden_size
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731
    feed_forward = linear(width, ffn) + linear(ffn, width)
    layer_norm = 2 * width
    attention = 3 * width * width + 2 * width + linear(width, width)  # qkv without bias, q and v biases, proj
    shared_per_layer = layer_norm + attention + 2 * width  # norm1, attention, layer-scale gammas
    router = config.num_experts * width + 2 * width * config.modality_aware_routing  # gate weight, vision/text embeddings

    embeddings = (config.in_channels * config.patch_size**2 * width + width  # patch projection
                  + width + config.num_image_tokens * width + width  # image CLS, positions, mask embedding
                  + config.vocab_size * width + layer_norm + config.max_text_len * width  # tokens, norm, positions
                  + 2 * width + layer_norm)  # modality types, norm of the joint sequence
    heads = (linear(width, config.patch_size**2 * config.in_channels) * ("msm" in objectives)
             + linear(width, config.vocab_size) * ("msm" in objectives or "mlm" in objectives)
             + (2 * width * width + 1) * ("itc" in objectives) + linear(width, 2) * ("itm" in objectives))
    common = embeddings + layer_norm + config.num_layers * shared_per_layer + (heads if with_heads else 0)

    num_moe = len(config.moe_layers)
    num_multiway = config.num_layers - num_moe
    multiway = 2 * (layer_norm + feed_forward)  # a norm and an FFN per modality
    moe = layer_norm + router  # + experts
    num_vl = len(config.vl_ffn_layers)
    vl_ffn = layer_norm + linear(width, config.vl_ffn_width) + linear(config.vl_ffn_width, width)
    total = common + num_multiway * multiway + num_vl * vl_ffn + num_moe * (moe + config.num_experts * feed_forward)
    activated = (common + (num_multiway - num_vl) * multiway // 2 + num_vl * vl_ffn
                 + num_moe * (moe + config.top_k * feed_forward))
    return ParameterCounts(total, activated)
