"""The EVE authors' encoder written from their released code on their parameter names: the reference that
eve-ds's ``EVE`` must reproduce (tests/test_released.py, benchmarks/released_parity.py)."""
import math

import torch
import torch.nn.functional as F


def top2_combine_weights(logits, capacity_factor, min_capacity):
    """GShard top-2 gating of [tokens, experts] router logits -> [tokens, experts] combine weights. Each
    expert takes at most ceil(2 * tokens / experts * capacity_factor) routes (at least ``min_capacity``):
    first choices in token order, then second choices; a dropped route weighs nothing, and the weights
    of the kept routes are renormalised to sum to one."""
    gates = torch.softmax(logits, -1)
    tokens, experts = gates.shape
    capacity = max(math.ceil(tokens / experts * 2 * capacity_factor), min_capacity)
    first = F.one_hot(gates.argmax(-1), experts)
    second = F.one_hot(gates.masked_fill(first.bool(), -math.inf).argmax(-1), experts)
    first = first * (first.cumsum(0) - 1 < capacity)
    second = second * (second.cumsum(0) - 1 + first.sum(0) < capacity)
    weights = gates * (first + second)
    return weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)


def released_forward(w, config, images=None, text_ids=None, text_padding_mask=None, final_norm=True):
    """EVE's encoder written against the released names, in eval mode, as the authors' code computes it:
    an image-text pair, or an image alone (``images`` only: their mode 'vision') or a text alone (their
    mode 'text'). MoE layers route top-2 on LN(x) + e_modality, and the experts compute on that sum too.
    ``final_norm=False``: the layers' output before the final ``norm``, as their retrieval ``forward_eval``
    takes it (their ``forward`` and training-time ``forward_itc`` apply the norm)."""
    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], config.layer_norm_eps)

    def mlp(x, name):
        h = F.linear(x, w[f"{name}.fc1.weight"], w[f"{name}.fc1.bias"])
        return F.linear(h * torch.sigmoid(1.702 * h), w[f"{name}.fc2.weight"], w[f"{name}.fc2.bias"])

    parts, keep = [], []
    if images is not None:
        patches = F.conv2d(images, w["patch_embed.weight"], w["patch_embed.bias"], stride=config.patch_size)
        cls = w["class_embedding_vision"].expand(len(images), 1, -1)
        image = torch.cat([cls, patches.flatten(2).transpose(1, 2)], 1)
        parts.append(image + w["pos_embed_vision"] + w["type_embed_vision"])
        keep.append(torch.ones(image.shape[:2], dtype=torch.bool))
    if text_ids is not None:
        text = norm(F.embedding(text_ids, w["word_embedding.weight"]), "layer_norm_text")
        parts.append(text + w["pos_embed_text"][:text_ids.shape[1]] + w["type_embed_text"])
        keep.append(text_padding_mask)
    x = norm(torch.cat(parts, 1), "pre_layrnorm")
    size, length, split = x.shape[0], x.shape[1], parts[0].shape[1] if images is not None else 0
    keep = torch.cat(keep, 1)[:, None, None, :]
    for layer in range(config.num_layers):
        p = f"encoder.layers.{layer}."
        qkv_bias = torch.cat([w[p + "attn.q_bias"], torch.zeros_like(w[p + "attn.q_bias"]), w[p + "attn.v_bias"]])
        qkv = F.linear(norm(x, p + "norm1"), w[p + "attn.qkv.weight"], qkv_bias)
        q, k, v = qkv.view(size, length, 3, config.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        x = x + w[p + "gamma_1"] * F.linear(attended, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        if layer in config.moe_layers:
            m = p + "mlp_moe.moe."
            is_image = (torch.arange(length) < split)[:, None]
            h = norm(x, p + "norm2_vl") + torch.where(is_image, w[m + "vision_embed"], w[m + "text_embed"])
            weights = top2_combine_weights(h.flatten(0, 1) @ w[m + "gate.wg.weight"].T, config.eval_capacity_factor,
                                           config.min_capacity).view(size, length, -1)
            out = sum(weights[..., e, None] * mlp(h, f"{m}experts.experts.{e}") for e in range(config.num_experts))
        else:
            out = torch.cat([mlp(norm(x[:, :split], p + "norm2_imag"), p + "mlp_imag"),
                             mlp(norm(x[:, split:], p + "norm2_text"), p + "mlp_text")], 1)
        x = x + w[p + "gamma_2"] * out
    return norm(x, "norm") if final_norm else x


def released_retrieval_embeddings(w, config, projection_weight, images=None, text_ids=None, text_padding_mask=None):
    """Their retrieval model's ``forward_eval``: the [CLS] state of the image alone (mode 'vision') or of the
    text alone (mode 'text'), WITHOUT the final norm, through the bias-free projection, L2-normalised."""
    hidden = released_forward(w, config, images, text_ids, text_padding_mask, final_norm=False)
    return F.normalize(F.linear(hidden[:, 0], projection_weight), dim=-1)


def released_gate_loss(layer_pass_losses, gateloss_weight=0.001):
    """Their gate loss (models/model_{vqa,nlvr,retrieval}_beit.py): ``layer_pass_losses`` holds, per MoE layer,
    the l_aux of each encoder pass of the step. Each layer sums them and divides by their number
    (``aux_loss_vl / aux_loss_vl_i``), the layers' means are averaged (``loss / i``) and weighted."""
    layer_means = [sum(losses) / len(losses) for losses in layer_pass_losses]
    return gateloss_weight * sum(layer_means) / len(layer_means)


def encode_every_mode(encoder, weights, config, inputs, final_norm=True) -> dict:
    """mode -> (EVE's hidden states, the reference's), for a pair, the image alone and the text alone."""
    images, text = inputs["images"], {key: inputs[key] for key in ("text_ids", "text_padding_mask")}
    with torch.no_grad():
        return {"pair": (encoder(images, **text, final_norm=final_norm)[0],
                         released_forward(weights, config, images, **text, final_norm=final_norm)),
                "image": (encoder.encode_image(images, final_norm=final_norm)[0],
                          released_forward(weights, config, images, final_norm=final_norm)),
                "text": (encoder.encode_text(**text, final_norm=final_norm)[0],
                         released_forward(weights, config, **text, final_norm=final_norm))}
