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


def released_itm_logits(w, config, head_weight, head_bias, images, text_ids, text_padding_mask, negative_images,
                        negative_text_ids, negative_padding_mask):
    """Their retrieval ``cal_itm_loss``'s logits: three joint passes of B pairs each (the positive pairs, a
    negative image with each text, each image with a negative text), the text [CLS] state of each pass (index
    ``num_patch_embed + 1``) concatenated in that order and put through ``itm_head``."""
    passes = [(images, text_ids, text_padding_mask), (negative_images, text_ids, text_padding_mask),
              (images, negative_text_ids, negative_padding_mask)]
    text_cls = torch.cat([released_forward(w, config, *inputs)[:, config.num_image_tokens] for inputs in passes])
    return F.linear(text_cls, head_weight, head_bias)


def released_nlvr2_biattn_logits(w, num_heads, left, right, text_padding_mask):
    """Their NLVR2 ``--biattn`` head (models/model_nlvr_beit.py, models/attention.py) in eval mode, on their
    parameter names (``attn1.in_proj_weight``, ..., ``nlvr2_output.bias``): ``left`` and ``right`` [B, T, d] are the
    joint encodings after the final norm of the sentence with each image, [image tokens, text tokens];
    ``text_padding_mask`` [B, L] is their ``text_atts``. Returns the logits [B, 2]."""
    batch, length, width = left.shape
    # Their attention_mask is ones over the image tokens, then text_atts; the padding masks are where it is 0.
    padding = torch.cat([torch.ones(batch, length - text_padding_mask.shape[1]), text_padding_mask.float()], 1) == 0

    def multihead_attention(name, query, key_value):
        """Their multi_head_attention_forward, key and value the same tensor, inputs [B, T, d]."""
        weight, bias = w[f"{name}.in_proj_weight"], w[f"{name}.in_proj_bias"]
        head_width = width // num_heads
        q = F.linear(query, weight[:width], bias[:width]) * head_width ** -0.5
        k, v = F.linear(key_value, weight[width:], bias[width:]).chunk(2, dim=-1)
        q, k, v = (x.transpose(0, 1).reshape(length, batch * num_heads, head_width).transpose(0, 1) for x in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)).view(batch, num_heads, length, length)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf")).view(batch * num_heads, length, length)
        out = torch.bmm(torch.softmax(scores, dim=-1), v)
        out = out.transpose(0, 1).reshape(length, batch, width).transpose(0, 1)
        return F.linear(out, w[f"{name}.out_proj.weight"], w[f"{name}.out_proj.bias"])

    def fc(x):
        return torch.relu(F.linear(x, w["fc.0.weight"], w["fc.0.bias"]))

    def attention_pool(x):
        score = torch.relu(F.linear(x, w["attn_pool.fc.0.weight"], w["attn_pool.fc.0.bias"])).squeeze(-1)
        score = score + padding.to(x.dtype) * -1e4
        return F.softmax(score, dim=1).unsqueeze(1).matmul(x).squeeze(1)

    left_fused = fc(torch.cat([multihead_attention("attn1", left, right), left], dim=-1))
    right_fused = fc(torch.cat([multihead_attention("attn2", right, left), right], dim=-1))
    pooled = torch.cat([attention_pool(left_fused), attention_pool(right_fused)], dim=-1)
    return F.linear(pooled, w["nlvr2_output.weight"], w["nlvr2_output.bias"])
