"""The activated-FLOP formula (eve_ds/flops.py) against torch's FLOP counter on the modules themselves."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eve_ds.config import preset
from eve_ds.flops import forward_flops, training_flops
from eve_ds.model import EVE, ExpertPlacement, FeedForward, ModalityAwareMoE


def counted(function) -> dict:
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as countable bmm
        function()
    return {str(op).removeprefix("aten."): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def test_dense_layers_match_the_counter_in_every_encoding_mode():
    config = preset("eve-tiny").replace(moe_layers=())
    model = EVE(config).eval()
    images, text_ids = torch.randn(2, 3, 96, 96), torch.randint(5, 1000, (2, 40))
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[0, 20:] = False  # padding is computed all the same
    cases = [(lambda: model(images, text_ids, padding), config.num_image_tokens, 40),
             (lambda: model.encode_image(images), config.num_image_tokens, 0),
             (lambda: model.encode_text(text_ids, padding), 0, 40)]
    for run, image_tokens, text_tokens in cases:
        expected = 2 * forward_flops(config, image_tokens, text_tokens, with_heads=False)
        assert sum(counted(run).values()) == expected


def test_moe_layer_counts_router_and_top_k_experts():
    width, ffn, experts, tokens = 16, 32, 4, 64
    moe = ModalityAwareMoE(width, lambda: FeedForward(width, ffn), ExpertPlacement(experts), capacity_factor=1.0,
                           eval_capacity_factor=1.0, min_capacity=1).eval()
    # Capacity 2 * 64 / 4 = 32 slots per expert: the experts compute exactly top-2 routes of every token.
    flops = counted(lambda: moe(torch.randn(2, tokens // 2, width), torch.zeros(2, tokens // 2, dtype=torch.long)))
    config = preset("eve-tiny").replace(hidden_size=width, num_heads=1, ffn_hidden_size=ffn, num_experts=experts,
                                        num_layers=1, moe_layers=(0, ))
    attention = 2 * tokens * width * 4 * width + 4 * tokens**2 * width
    assert flops["mm"] + flops["addmm"] == forward_flops(config, 0, tokens, with_heads=False) - attention
    assert set(flops) == {"mm", "addmm", "bmm"}  # bmm: the weighted combination of the two experts' outputs


def test_training_is_three_forwards_and_heads_count_masked_positions():
    config = preset("eve-base")
    plain = forward_flops(config, 197, 40, with_heads=False)
    with_heads = forward_flops(config, 197, 40, masked_patches=147, masked_text=20)
    assert with_heads - plain == 2 * 147 * 768 * 768 + 2 * 20 * 768 * 64000
    assert training_flops(config, 197, 40, 147, 20) == 3 * with_heads
