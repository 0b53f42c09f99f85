import math

import pytest
import torch
from deepspeed.moe import sharded_moe

from eve_ds.model import ExpertPlacement, FeedForward, ModalityAwareMoE, TEXT, VISION

WIDTH, EXPERTS = 16, 4


def make_moe(capacity_factor=4.0, min_capacity=1, routing_embedding_to_experts=True):
    torch.manual_seed(0)
    return ModalityAwareMoE(WIDTH, lambda: FeedForward(WIDTH, 32), ExpertPlacement(EXPERTS), k=2,
                            capacity_factor=capacity_factor,
                            eval_capacity_factor=capacity_factor, min_capacity=min_capacity,
                            routing_embedding_to_experts=routing_embedding_to_experts)


def tokens(batch=2, length=10, image_tokens=6):
    hidden = torch.randn(batch, length, WIDTH)
    modality = torch.full((batch, length), TEXT)
    modality[:, :image_tokens] = VISION
    return hidden, modality


def formula_moe(moe, hidden, modality, embedding_to_experts):
    """Top-2 MoE written from the formula: the router scores h + e_modality; each of the two chosen experts
    computes FFN(h + e_modality), or FFN(h) in the router-only variant; weights renormalised over the two."""
    routed = hidden + moe.gate.modality_embed[modality]
    top = torch.softmax(routed @ moe.gate.wg.weight.t(), -1).topk(2)
    expert_input = routed if embedding_to_experts else hidden
    outputs = torch.stack([expert(expert_input) for expert in moe.local_experts], -2)
    chosen = outputs.gather(-2, top.indices[..., None].expand(*top.indices.shape, WIDTH))
    return (chosen * (top.values / top.values.sum(-1, keepdim=True))[..., None]).sum(-2)


@pytest.mark.parametrize("embedding_to_experts", [True, False])
def test_output_is_the_formula_of_its_setting(embedding_to_experts):
    moe = make_moe(capacity_factor=8.0, routing_embedding_to_experts=embedding_to_experts).eval()
    with torch.no_grad():  # embeddings as large as the hidden states, so that the two settings differ clearly
        moe.gate.modality_embed.normal_(0.0, 1.0)
    hidden, modality = tokens()
    with torch.no_grad():
        output, _ = moe(hidden, modality)
        expected = formula_moe(moe, hidden, modality, embedding_to_experts)
        other = formula_moe(moe, hidden, modality, not embedding_to_experts)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert (output - other).abs().max() > 1e-2


@pytest.mark.parametrize("embedding_to_experts", [True, False])
def test_experts_see_what_their_setting_says(monkeypatch, embedding_to_experts):
    moe = make_moe(routing_embedding_to_experts=embedding_to_experts)
    hidden, modality = tokens()
    seen_logits, expert_inputs = [], []
    real_top2 = sharded_moe.top2gating
    monkeypatch.setattr(sharded_moe, "top2gating",
                        lambda logits, *a, **k: seen_logits.append(logits.clone()) or real_top2(logits, *a, **k))
    for expert in moe.local_experts:
        expert.register_forward_hook(lambda module, args, output: expert_inputs.append(args[0].detach()))
    moe.eval()
    moe(hidden, modality)

    flat = hidden.reshape(-1, WIDTH)
    router_input = flat + moe.gate.modality_embed.detach()[modality.reshape(-1)]
    torch.testing.assert_close(seen_logits[0], router_input @ moe.gate.wg.weight.detach().t())
    # Every non-empty capacity slot an expert processes holds h + e, or h in the router-only variant.
    slots = torch.cat([x.reshape(-1, WIDTH) for x in expert_inputs])
    filled = slots[slots.abs().sum(-1) > 0]
    assert len(filled) > 0
    seen, not_seen = (router_input, flat) if embedding_to_experts else (flat, router_input)
    distance = lambda a, b: torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values  # noqa: E731
    assert distance(filled, seen).max() < 1e-5
    assert distance(filled, not_seen).min() > 1e-3


def test_modality_embedding_steers_routing_per_modality():
    moe = make_moe()
    with torch.no_grad():
        direction = torch.zeros(WIDTH)
        direction[0] = 1.0
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0] = direction  # expert 0 likes +direction
        moe.gate.wg.weight[1] = -direction  # expert 1 likes -direction
        moe.gate.wg.weight[2, 1] = 0.5  # experts 2, 3 are the weaker second choices
        moe.gate.modality_embed[VISION] = 20 * direction
        moe.gate.modality_embed[TEXT] = -20 * direction
    hidden, modality = tokens()
    moe.eval()
    moe(hidden * 0.01, modality)
    load = moe.gate.expert_load
    num_vision, num_text = int((modality == VISION).sum()), int((modality == TEXT).sum())
    assert load[VISION, 0] == num_vision and load[VISION, 1] == 0
    assert load[TEXT, 1] == num_text and load[TEXT, 0] == 0
    assert load.sum() == 2 * (num_vision + num_text)  # top-2, nothing dropped at this capacity


def test_aux_loss_is_gshard_balance_loss():
    moe = make_moe()
    hidden, modality = tokens()
    moe.eval()
    _, aux = moe(hidden, modality)
    flat = hidden.reshape(-1, WIDTH) + moe.gate.modality_embed.detach()[modality.reshape(-1)]
    gates = torch.softmax(flat @ moe.gate.wg.weight.detach().t(), dim=1)
    top1 = torch.nn.functional.one_hot(gates.argmax(1), EXPERTS).float()
    expected = (gates.mean(0) * top1.mean(0)).mean() * EXPERTS**2
    torch.testing.assert_close(aux, expected)
    assert aux.requires_grad


def test_capacity_limits_tokens_per_expert():
    moe = make_moe(capacity_factor=0.25, min_capacity=1)
    with torch.no_grad():  # every token prefers expert 0 first and expert 1 second
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0, 0], moe.gate.wg.weight[1, 0] = 2.0, 1.0
        moe.gate.modality_embed.zero_()
    hidden, modality = tokens(batch=4, length=16)
    hidden[..., 0] = 5.0
    moe.eval()
    output, _ = moe(hidden, modality)
    num_tokens = hidden.shape[0] * hidden.shape[1]
    capacity = math.ceil(num_tokens / EXPERTS * 0.25 * 2)
    per_expert = moe.gate.expert_load.sum(0)
    assert per_expert[0] == capacity and per_expert[1] == capacity
    # A token that lost both routes gets a zero FFN output (the residual carries it).
    dropped = output.reshape(num_tokens, WIDTH).abs().sum(-1) == 0
    assert int(dropped.sum()) == num_tokens - capacity


def test_second_expert_sampling_only_in_training():
    moe = make_moe()
    hidden, modality = tokens(batch=8)
    moe.eval()
    first, _ = moe(hidden, modality)
    second, _ = moe(hidden, modality)
    torch.testing.assert_close(first, second)
    moe.train()
    torch.manual_seed(1)
    sampled_a, _ = moe(hidden, modality)
    torch.manual_seed(2)
    sampled_b, _ = moe(hidden, modality)
    assert not torch.allclose(sampled_a, sampled_b)


def test_expert_count_must_divide_over_expert_parallel_ranks():
    with pytest.raises(ValueError, match="not divisible"):
        ExpertPlacement(num_experts=6, ep_size=4)


def test_expert_load_counts_stay_exact_integers_in_a_bf16_model():
    """A bf16 engine casts the model's floating buffers; the routed-token counts are integers, so they stay exact
    (bf16 cannot count past 256) and recording them works."""
    moe = make_moe(capacity_factor=8.0).bfloat16()
    hidden, modality = tokens(batch=30, length=20)
    moe(hidden.bfloat16(), modality)
    load = moe.gate.expert_load
    assert load.dtype == torch.long and load.sum() == 2 * 30 * 20  # top-2, nothing dropped at capacity factor 8


def test_the_step_benchmarks_balanced_routing_gives_every_expert_its_share():
    """benchmarks/step.py's forced routing, against which published MoE figures compare: each expert gets
    exactly its share of the routes, inside the context only."""
    from benchmarks.step import balanced_routing

    moe = make_moe(capacity_factor=1.0)
    hidden, modality = tokens(batch=4, length=8)
    with balanced_routing():
        moe(hidden, modality)
    assert moe.gate.expert_load.sum(0).tolist() == [2 * 32 // EXPERTS] * EXPERTS
    moe(hidden, modality)
    assert moe.gate.expert_load.sum(0).tolist() != [2 * 32 // EXPERTS] * EXPERTS
