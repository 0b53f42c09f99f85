"""The authors' released checkpoint layout: key names, a forward pass written against those names, the
export -> import round trip, and files that do not fit."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from eve_ds.checkpoint import load_pretrained, save_pretrained
from eve_ds.checkpoint.released import backbone, from_released, import_released, to_released
from eve_ds.config import preset
from eve_ds.model import EVE
from eve_ds.objectives import MaskedSignalModeling
from tests.conftest import REPO
from tests.test_model import batch

# No dropped tokens in eval mode, so that the reference below needs no capacity logic.
CONFIG = preset("eve-tiny").replace(vocab_size=300, eval_capacity_factor=8.0)


def convert_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_released.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory):
    """A consolidated eve-tiny folder whose every weight is random, so that no two tensors can stand in
    for each other unnoticed (fresh norms are all ones, biases all zeros)."""
    torch.manual_seed(0)
    model = MaskedSignalModeling(CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("consolidated")
    save_pretrained(out, model.state_dict(), CONFIG)
    return out


def test_base_export_has_the_authors_key_names_and_shapes():
    config = preset("eve-base")
    with torch.device("meta"):
        released = to_released(EVE(config).state_dict(), config)
    width, ffn = 768, 3072
    expected = {"patch_embed.weight": (width, 3, 16, 16), "patch_embed.bias": (width, ),
                "class_embedding_vision": (width, ), "type_embed_vision": (width, ), "pos_embed_vision": (197, width),
                "mask_embed_vision": (width, ), "word_embedding.weight": (64000, width), "type_embed_text": (width, ),
                "pos_embed_text": (40, width)}
    for norm in ("layer_norm_text", "pre_layrnorm", "norm"):
        expected |= {f"{norm}.weight": (width, ), f"{norm}.bias": (width, )}
    for layer in range(12):
        p = f"encoder.layers.{layer}."
        expected |= {p + "norm1.weight": (width, ), p + "norm1.bias": (width, ), p + "attn.qkv.weight": (3 * width, width),
                     p + "attn.q_bias": (width, ), p + "attn.v_bias": (width, ), p + "attn.proj.weight": (width, width),
                     p + "attn.proj.bias": (width, ), p + "gamma_1": (width, ), p + "gamma_2": (width, )}
        mlps = [f"mlp_moe.moe.experts.experts.{e}" for e in range(32)] if layer in (10, 11) else ["mlp_imag", "mlp_text"]
        norms = ["norm2_vl"] if layer in (10, 11) else ["norm2_imag", "norm2_text"]
        for mlp in mlps:
            expected |= {f"{p}{mlp}.fc1.weight": (ffn, width), f"{p}{mlp}.fc1.bias": (ffn, ),
                         f"{p}{mlp}.fc2.weight": (width, ffn), f"{p}{mlp}.fc2.bias": (width, )}
        for norm in norms:
            expected |= {f"{p}{norm}.weight": (width, ), f"{p}{norm}.bias": (width, )}
        if layer in (10, 11):
            expected |= {p + "mlp_moe.moe.gate.wg.weight": (32, width), p + "mlp_moe.moe.vision_embed": (width, ),
                         p + "mlp_moe.moe.text_embed": (width, )}
    assert {name: tuple(t.shape) for name, t in released.items()} == {f"backbone.{k}": v for k, v in expected.items()}


def released_forward(w, config, images, text_ids, text_padding_mask):
    """EVE's encoder written against the released names (eval mode, top-2 routing on ``h + e_modality``)."""
    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], config.layer_norm_eps)

    def mlp(x, name):
        h = F.linear(x, w[f"{name}.fc1.weight"], w[f"{name}.fc1.bias"])
        return F.linear(h * torch.sigmoid(1.702 * h), w[f"{name}.fc2.weight"], w[f"{name}.fc2.bias"])

    size, text_len = text_ids.shape
    patches = F.conv2d(images, w["patch_embed.weight"], w["patch_embed.bias"], stride=config.patch_size)
    image = torch.cat([w["class_embedding_vision"].expand(size, 1, -1), patches.flatten(2).transpose(1, 2)], 1)
    image = image + w["pos_embed_vision"] + w["type_embed_vision"]
    text = norm(F.embedding(text_ids, w["word_embedding.weight"]), "layer_norm_text")
    text = text + w["pos_embed_text"][:text_len] + w["type_embed_text"]
    x = norm(torch.cat([image, text], 1), "pre_layrnorm")
    split = image.shape[1]
    keep = torch.cat([torch.ones(size, split, dtype=torch.bool), text_padding_mask], 1)[:, None, None, :]
    for layer in range(config.num_layers):
        p = f"encoder.layers.{layer}."
        qkv_bias = torch.cat([w[p + "attn.q_bias"], torch.zeros_like(w[p + "attn.q_bias"]), w[p + "attn.v_bias"]])
        qkv = F.linear(norm(x, p + "norm1"), w[p + "attn.qkv.weight"], qkv_bias)
        q, k, v = qkv.view(size, x.shape[1], 3, config.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        x = x + w[p + "gamma_1"] * F.linear(attended, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        if layer in config.moe_layers:
            m = p + "mlp_moe.moe."
            h = norm(x, p + "norm2_vl")
            router_embed = torch.where(torch.arange(x.shape[1])[:, None] < split, w[m + "vision_embed"], w[m + "text_embed"])
            top = torch.softmax((h + router_embed) @ w[m + "gate.wg.weight"].T, -1).topk(2)
            experts = torch.stack([mlp(h, f"{m}experts.experts.{e}") for e in range(config.num_experts)], -2)
            chosen = experts.gather(-2, top.indices[..., None].expand(-1, -1, -1, h.shape[-1]))
            out = (chosen * (top.values / top.values.sum(-1, keepdim=True))[..., None]).sum(-2)
        else:
            out = torch.cat([mlp(norm(x[:, :split], p + "norm2_imag"), p + "mlp_imag"),
                             mlp(norm(x[:, split:], p + "norm2_text"), p + "mlp_text")], 1)
        x = x + w[p + "gamma_2"] * out
    return norm(x, "norm")


def test_export_computes_what_the_released_names_say(consolidated, tmp_path):
    result = convert_cli("export", consolidated, tmp_path / "released.pth")
    assert result.returncode == 0, result.stderr
    weights, _ = backbone(torch.load(tmp_path / "released.pth", weights_only=True))
    encoder = EVE.from_pretrained(consolidated).eval()
    inputs = batch(CONFIG)
    inputs = {key: inputs[key] for key in ("images", "text_ids", "text_padding_mask")}
    with torch.no_grad():
        ours, _ = encoder(**inputs)
        theirs = released_forward(weights, CONFIG, **inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_export_then_import_is_the_identity(consolidated, tmp_path):
    assert convert_cli("export", consolidated, tmp_path / "released.pth").returncode == 0
    result = convert_cli("import", tmp_path / "released.pth", tmp_path / "imported")
    assert result.returncode == 0, result.stderr
    original, config = load_pretrained(consolidated)
    imported, imported_config = load_pretrained(tmp_path / "imported")
    assert imported_config == config
    assert imported.keys() == {name for name in original if name.startswith("encoder.")}
    for name, tensor in imported.items():
        assert torch.equal(tensor, original[name]), name
    EVE.from_pretrained(tmp_path / "imported")  # strict


def authors_style_file(consolidated, path):
    """What the authors' code saves: task heads beside the backbone, stock DeepSpeed MoE names, no mask
    embedding in a fine-tuned model, and no eve-ds config."""
    state_dict, config = load_pretrained(consolidated)
    released = to_released({k.removeprefix("encoder."): v for k, v in state_dict.items()}, config)
    released = {k.replace(".mlp_moe.moe.", ".mlp_moe.deepspeed_moe.").replace(".experts.experts.", ".experts.deepspeed_experts."): v
                for k, v in released.items() if k != "backbone.mask_embed_vision"}
    torch.save({"model": {**released, "itm_head.weight": torch.zeros(2, 128)}, "config": {"image_res": 96}}, path)
    return state_dict


def test_import_reads_the_authors_files(consolidated, tmp_path):
    original = authors_style_file(consolidated, tmp_path / "authors.pth")
    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "out")
    assert result.returncode == 2 and "--model" in result.stderr and not (tmp_path / "out").exists()

    encoder, config, notes = import_released(tmp_path / "authors.pth", CONFIG.replace(vocab_size=64000))
    assert config == CONFIG  # vocabulary, image and text lengths come from the file
    assert any("mask_embed_vision" in note for note in notes) and any("left out 1" in note for note in notes)
    assert torch.equal(encoder["vision_mask_embed"], torch.zeros(1, 1, 128))
    for name, tensor in encoder.items():
        if name != "vision_mask_embed":
            assert torch.equal(tensor, original[f"encoder.{name}"]), name


def test_files_that_do_not_fit_get_one_clear_error(consolidated, tmp_path):
    authors_style_file(consolidated, tmp_path / "authors.pth")
    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "out", "--model", "eve-base")
    assert result.returncode == 2 and "hidden_size 128 (the preset has 768)" in result.stderr
    assert not (tmp_path / "out").exists()

    weights, _ = backbone(torch.load(tmp_path / "authors.pth", weights_only=True))
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in EVE(CONFIG).state_dict().items()}
    with pytest.raises(ValueError, match=r"1 unexpected: backbone.encoder.relative_position_bias_table"):
        from_released({**weights, "encoder.relative_position_bias_table": torch.zeros(3, 8)}, CONFIG, shapes)
    del weights["encoder.layers.1.norm2_text.bias"]
    with pytest.raises(ValueError, match=r"1 missing: backbone.encoder.layers.1.norm2_text.bias"):
        from_released(weights, CONFIG, shapes)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "authors.pth").read_bytes()[:2000])
    result = convert_cli("import", truncated, tmp_path / "out", "--model", "eve-tiny")
    assert result.returncode == 2 and "truncated.pth: cannot be read" in result.stderr
    result = convert_cli("export", tmp_path, tmp_path / "x.pth")
    assert result.returncode == 2 and "model.safetensors does not exist" in result.stderr
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "out").exists()
