import pytest
import torch

from eve_ds.config import ConfigError, EVEConfig, PRESETS, preset
from eve_ds.model import EVE, ExpertPlacement
from eve_ds.objectives import PretrainingModel
from eve_ds.flops import forward_flops
from eve_ds.params import parameter_counts


def batch(config, size=3, text_len=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text_len = text_len or config.max_text_len
    images = torch.rand(size, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
    text_ids = torch.randint(5, config.vocab_size, (size, text_len), generator=generator)
    padding = torch.ones(size, text_len, dtype=torch.bool)
    padding[0, text_len // 2:] = False
    image_mask = torch.rand(size, config.num_patches, generator=generator) < 0.5
    labels = torch.where(torch.rand(size, text_len, generator=generator) < 0.3, text_ids, -100)
    labels[~padding] = -100
    return dict(images=images, image_mask=image_mask, text_ids=text_ids, text_labels=labels,
                text_padding_mask=padding)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_formula_matches_the_module(name):
    config = PRESETS[name]
    with torch.device("meta"):
        model = PretrainingModel(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(config).total


def test_presets_have_the_released_sizes():
    base, large = preset("eve-base"), preset("eve-large")
    assert (base.num_layers, base.hidden_size, base.num_heads, base.ffn_hidden_size) == (12, 768, 12, 3072)
    assert (large.num_layers, large.hidden_size, large.num_heads, large.ffn_hidden_size) == (24, 1024, 16, 4096)
    assert base.moe_layers == (10, 11) and large.moe_layers == (21, 22, 23)
    for config in (base, large):
        assert (config.num_experts, config.top_k, config.aux_loss_weight, config.patch_size) == (32, 2, 0.001, 16)
        assert config.vocab_size == 64000 and config.drop_path_rate == 0.1
    # Activated per token: shared weights + one multiway FFN (with its norm) per ordinary layer + 2 of 32
    # experts per MoE layer.
    counts = parameter_counts(base, with_heads=False)
    expert, norm = 2 * 768 * 3072 + 3072 + 768, 2 * 768
    assert counts.total - counts.activated == 10 * (expert + norm) + 2 * 30 * expert
    tiny = preset("eve-tiny")
    assert len(tiny.moe_layers) >= 1 and tiny.num_experts >= 4


def test_routing_embedding_reaches_the_experts_by_default_and_old_configs_are_router_only():
    assert all(config.routing_embedding_to_experts for config in PRESETS.values())
    saved = preset("eve-base").to_dict()
    assert EVEConfig.from_dict(saved) == preset("eve-base")
    del saved["routing_embedding_to_experts"]  # as written before the setting existed
    assert EVEConfig.from_dict(saved) == preset("eve-base").replace(routing_embedding_to_experts=False)


def test_positions_start_as_sine_cosine_tables_and_old_configs_as_normal():
    config = preset("eve-tiny")
    torch.manual_seed(0)
    model = EVE(config)
    grid, half = config.image_size // config.patch_size, config.hidden_size // 2
    image = model.image_pos[0, 1:].detach().view(grid, grid, -1)
    assert torch.equal(image[:, :1, :half].expand(-1, grid, -1), image[..., :half])  # rows: the first half
    assert torch.equal(image[:1, :, half:].expand(grid, -1, -1), image[..., half:])  # columns: the second
    assert torch.allclose(image[:, 0, 0], torch.arange(grid).float().sin())  # the fastest frequency is 1
    assert torch.allclose(image[:, 0, half + half // 2], torch.ones(grid))  # the columns' cosines: 1 at column 0
    assert torch.allclose(model.text_pos[0, :, 0].detach(), torch.arange(config.max_text_len).float().sin())
    assert image.abs().max() <= 1 and image.reshape(grid * grid, -1).std(0).mean() > 0.1

    normal = EVE(config.replace(position_init="normal"))
    assert 0.015 < normal.image_pos.std().item() < 0.025 and 0.015 < normal.text_pos.std().item() < 0.025
    saved = config.to_dict()
    del saved["position_init"]  # as written before the setting existed
    assert EVEConfig.from_dict(saved).position_init == "normal"
    with pytest.raises(ConfigError, match="'position_init'"):
        config.replace(position_init="learned")


def test_invalid_configs_name_the_key():
    with pytest.raises(ConfigError, match="'hidden_size'"):
        EVEConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ConfigError, match="'moe_layers'"):
        EVEConfig(num_layers=4, moe_layers=(4, ))
    with pytest.raises(ConfigError, match="unknown model config key"):
        EVEConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="unknown model"):
        preset("eve-huge")


def test_experts_differ_and_do_not_depend_on_expert_parallel_layout():
    config = preset("eve-tiny")
    torch.manual_seed(0)
    whole = EVE(config).state_dict()
    for ep_rank in range(2):
        placement = ExpertPlacement(config.num_experts, ep_size=2, ep_rank=ep_rank)
        torch.manual_seed(0)
        half = EVE(config, placement).state_dict()
        assert len(half) < len(whole)
        for name, tensor in half.items():  # dense weights alike, and each expert is its global namesake
            torch.testing.assert_close(tensor, whole[placement.global_name(name)], rtol=0, atol=0, msg=name)
    experts = [whole[f"blocks.2.ffn.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"] for e in range(4)]
    assert all(not torch.equal(experts[0], other) for other in experts[1:])


def test_padding_tokens_do_not_change_real_outputs():
    config = preset("eve-tiny").replace(capacity_factor=8.0, eval_capacity_factor=8.0)
    torch.manual_seed(0)
    model = EVE(config).eval()
    inputs = batch(config)
    hidden, _ = model(inputs["images"], inputs["text_ids"], inputs["text_padding_mask"], inputs["image_mask"])
    changed = inputs["text_ids"].clone()
    changed[~inputs["text_padding_mask"]] = 7
    hidden_changed, _ = model(inputs["images"], changed, inputs["text_padding_mask"], inputs["image_mask"])
    real = torch.cat([torch.ones(3, config.num_image_tokens, dtype=torch.bool), inputs["text_padding_mask"]], 1)
    torch.testing.assert_close(hidden[real], hidden_changed[real])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    config = preset("eve-tiny").replace(drop_path_rate=0.1)
    torch.manual_seed(0)
    model = PretrainingModel(config).train()
    inputs = batch(config, size=4)

    def loss_and_grads(checkpointing):
        model.zero_grad()
        model.encoder.activation_checkpointing = checkpointing
        torch.manual_seed(123)  # same drop path and sampled second experts in both runs
        outputs = model(**inputs)
        outputs["loss"].backward()
        return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = loss_and_grads(False)
    recomputed, recomputed_grads = loss_and_grads(True)
    for key in ("loss", "aux_loss"):  # the aux loss is counted once, not again by the recomputation
        torch.testing.assert_close(plain[key], recomputed[key], rtol=0, atol=0)
    assert plain_grads.keys() == recomputed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    gate_grad = plain_grads["encoder.blocks.2.ffn.deepspeed_moe.gate.modality_embed"]
    assert gate_grad.abs().sum() > 0  # the router embeddings learn through the aux loss and gate weights


def test_a_bf16_model_takes_the_fp32_batch_and_scores_against_fp32_pixels():
    """Batches stay fp32 on the device (soft VQA targets and pixel targets are not rounded to bf16): the model
    casts the images it embeds to its own dtype."""
    config = preset("eve-tiny").replace(capacity_factor=8.0, eval_capacity_factor=8.0)
    torch.manual_seed(0)
    model = PretrainingModel(config).eval()
    inputs = batch(config)
    fp32 = model(**inputs)
    bf16 = model.bfloat16()(**inputs)
    assert bf16["image_loss"].dtype == torch.float32
    assert bf16["image_loss"].item() == pytest.approx(fp32["image_loss"].item(), rel=0.02)
    assert bf16["text_loss"].item() == pytest.approx(fp32["text_loss"].item(), rel=0.02)


def record_moe_losses(encoder):
    """Hooks that append each MoE layer's load-balancing loss at every call: a list per MoE layer."""
    losses = [[] for _ in encoder.moe_layers()]
    for layer_losses, moe in zip(losses, encoder.moe_layers()):
        moe.register_forward_hook(lambda module, args, output, record=layer_losses: record.append(output[1].detach()))
    return losses


def test_aux_loss_is_the_mean_over_moe_layers():
    """The authors average their gate loss over the MoE layers (models/model_*_beit.py: ``loss / i``), so its
    weight does not grow with the number of MoE layers (2 on eve-base, 3 on eve-large)."""
    config = preset("eve-tiny").replace(capacity_factor=8.0, eval_capacity_factor=8.0)
    assert len(config.moe_layers) == 2
    torch.manual_seed(0)
    model = EVE(config).eval()
    losses = record_moe_losses(model)
    inputs = batch(config)
    _, aux_loss = model(inputs["images"], inputs["text_ids"], inputs["text_padding_mask"])
    (first, ), (second, ) = losses
    assert first > 0 and second > 0 and not torch.isclose(first, second)
    torch.testing.assert_close(aux_loss, (first + second) / 2)


def test_final_norm_is_the_last_step():
    config = preset("eve-tiny").replace(capacity_factor=8.0, eval_capacity_factor=8.0)
    torch.manual_seed(0)
    model = EVE(config).eval()
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.5)  # a fresh norm's weight is all ones
    images = batch(config)["images"]
    normed, aux_loss = model.encode_image(images)
    unnormed, unnormed_aux_loss = model.encode_image(images, final_norm=False)
    torch.testing.assert_close(model.norm(unnormed), normed)
    assert (unnormed - normed).abs().max() > 0.1 and aux_loss == unnormed_aux_loss


def test_model_settings_are_read_as_their_keys_types():
    config = preset("eve-tiny").with_settings(["moe_layers=", "vl_ffn_layers=2,3", "vl_ffn_hidden_size=1024",
                                               "modality_aware_routing=False", "capacity_factor=1.5"])
    assert (config.moe_layers, config.vl_ffn_layers, config.vl_ffn_width) == ((), (2, 3), 1024)
    assert config.modality_aware_routing is False and config.capacity_factor == 1.5
    assert preset("eve-tiny").with_settings([]) == preset("eve-tiny")
    for setting, message in [("experts=4", "not KEY=VALUE"), ("num_layers", "not KEY=VALUE"),
                             ("num_layers=four", "'four' is not a int"), ("modality_aware_routing=1", "not a bool"),
                             ("vl_ffn_layers=3", "'vl_ffn_layers'")]:  # layer 3 is an MoE layer of eve-tiny
        with pytest.raises(ConfigError, match=message):
            preset("eve-tiny").with_settings([setting])


def test_vlmo_presets_have_vlmo_sizes_and_no_moe():
    for name, layers, width, vl_layers in [("vlmo-base", 12, 768, (10, 11)), ("vlmo-large", 24, 1024, (21, 22, 23))]:
        config = preset(name)
        assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (layers, width, 4 * width)
        assert config.vl_ffn_layers == vl_layers and config.moe_layers == () and config.routed_experts == 0
    # VLMo-Base without its heads and relative position bias: the paper's 175M less BEiT's rel-pos tables, with a
    # 64k vocabulary where VLMo's is BERT's 30k (the text embeddings differ by 34k x 768 = 26M).
    counts = parameter_counts(preset("vlmo-base"), with_heads=False)
    assert 170e6 < counts.total + (30522 - 64000) * 768 < 180e6


def test_vl_ffn_takes_the_joint_sequence_and_an_image_or_text_alone_its_own_ffn():
    config = preset("vlmo-tiny")
    torch.manual_seed(0)
    model = EVE(config)
    inputs = batch(config)
    used = {}
    for name, run in [("joint", lambda: model(inputs["images"], inputs["text_ids"], inputs["text_padding_mask"])),
                      ("image", lambda: model.encode_image(inputs["images"])),
                      ("text", lambda: model.encode_text(inputs["text_ids"], inputs["text_padding_mask"]))]:
        model.zero_grad(set_to_none=True)
        hidden, aux_loss = run()
        assert float(aux_loss) == 0.0
        hidden.sum().backward()
        ffn = model.blocks[3].ffn
        used[name] = {part for part in ("vision", "text", "vision_language")
                      if getattr(ffn, part).fc1.weight.grad is not None and getattr(ffn, part).fc1.weight.grad.any()}
        assert not hasattr(model.blocks[1].ffn, "vision_language")
    assert used == {"joint": {"vision_language"}, "image": {"vision"}, "text": {"text"}}


def test_plain_routing_routes_by_the_hidden_state_alone():
    inputs = torch.randn(6, preset("eve-tiny").hidden_size)
    modality_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    for aware in (True, False):
        torch.manual_seed(0)
        model = EVE(preset("eve-tiny").replace(modality_aware_routing=aware)).eval()  # no sampled second expert
        gate = model.moe_layers()[0].gate
        assert hasattr(gate, "modality_embed") == aware
        with torch.no_grad():
            if aware:
                gate.modality_embed.normal_()
            same_state = inputs[[0, 1, 2, 0, 1, 2]]  # text tokens with the image tokens' hidden states
            hidden = model.moe_layers()[0](same_state.unsqueeze(0), modality_ids.unsqueeze(0))[0][0]
        assert torch.allclose(hidden[:3], hidden[3:]) != aware
    counts = parameter_counts(preset("eve-tiny").replace(modality_aware_routing=False))
    assert counts.total == parameter_counts(preset("eve-tiny")).total - 2 * 2 * 128


def test_a_vl_ffn_of_twice_the_width_activates_the_flops_of_top_2_experts():
    eve = preset("eve-tiny")
    vlmo = preset("vlmo-tiny").replace(vl_ffn_hidden_size=2 * eve.ffn_hidden_size)
    router = 2.0 * (eve.num_image_tokens + eve.max_text_len) * eve.hidden_size * eve.num_experts
    joint = forward_flops(eve, eve.num_image_tokens, eve.max_text_len, with_heads=False)
    assert forward_flops(vlmo, eve.num_image_tokens, eve.max_text_len, with_heads=False) == joint - 2 * router
    # alone, an image takes the vision FFN (one expert's width) in VLMo's top layers, and still two experts in EVE's
    image = eve.num_image_tokens
    assert forward_flops(vlmo, image, 0, with_heads=False) < forward_flops(eve, image, 0, with_heads=False)
