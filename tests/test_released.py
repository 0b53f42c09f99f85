"""The authors' released checkpoint layout: key names, a forward pass written against those names, the
export -> import round trip, and files that do not fit."""
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from eve_ds.checkpoint import load_pretrained, save_pretrained
from eve_ds.checkpoint.pretrained import HeldModel, held_model
from eve_ds.checkpoint.released import backbone, from_released, import_released, to_released
from eve_ds.config import preset
from eve_ds.data.tokenizer import SPECIAL_TOKENS_FILE, TOKENIZER_FILE, TextTokenizer
from eve_ds.model import EVE
from eve_ds.objectives import PretrainingModel
from tests.conftest import run_tool
from tests.released_reference import encode_every_mode
from tests.test_model import batch
from tests.test_tokenizer import roberta_style_tokenizer

CONFIG = preset("eve-tiny").replace(vocab_size=300)


convert_cli = partial(run_tool, "convert_released.py")


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory):
    """A consolidated eve-tiny folder whose every weight is random, so that no two tensors can stand in
    for each other unnoticed (fresh norms are all ones, biases all zeros)."""
    torch.manual_seed(0)
    model = PretrainingModel(CONFIG)
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


def test_export_computes_what_the_released_names_say(consolidated, tmp_path):
    result = convert_cli("export", consolidated, tmp_path / "released.pth")
    assert result.returncode == 0, result.stderr
    weights, _ = backbone(torch.load(tmp_path / "released.pth", weights_only=True))
    encoder = EVE.from_pretrained(consolidated).eval()
    for final_norm in (True, False):  # also before the final norm, where their retrieval evaluation reads
        for mode, (ours, theirs) in encode_every_mode(encoder, weights, CONFIG, batch(CONFIG), final_norm).items():
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"{mode}, final norm {final_norm}")


def test_import_computes_the_authors_function_in_every_mode(consolidated, tmp_path):
    authors_style_file(consolidated, tmp_path / "authors.pth")
    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "imported", "--model", "eve-tiny")
    assert result.returncode == 0, result.stderr
    weights, _ = backbone(torch.load(tmp_path / "authors.pth", weights_only=True))
    weights["mask_embed_vision"] = torch.zeros(CONFIG.hidden_size)
    encoder = EVE.from_pretrained(tmp_path / "imported").eval()
    assert encoder.config.routing_embedding_to_experts
    inputs = batch(CONFIG)
    for mode, (ours, theirs) in encode_every_mode(encoder, weights, CONFIG, inputs).items():
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=mode)
    text_tokens = inputs["text_ids"].numel()
    assert encoder.moe_layers()[0].gate.expert_load.sum() < 2 * text_tokens  # capacity dropped routes alike
    # The routing embeddings are large enough here that the router-only variant computes something else.
    router_only = EVE(CONFIG.replace(routing_embedding_to_experts=False)).eval()
    router_only.load_state_dict(encoder.state_dict())
    for mode, (ours, theirs) in encode_every_mode(router_only, weights, CONFIG, inputs).items():
        assert (ours - theirs).abs().max() > 1e-2, mode


def test_higher_resolution_load_interpolates_image_positions(consolidated, tmp_path):
    """Weights pre-trained at 96 pixels (a 6x6 grid), loaded at 144 (9x9) and with a shorter text, as
    fine-tuning at 384 loads weights pre-trained at 224."""
    assert convert_cli("export", consolidated, tmp_path / "released.pth").returncode == 0
    assert convert_cli("import", tmp_path / "released.pth", tmp_path / "imported").returncode == 0
    encoder = EVE.from_pretrained(tmp_path / "imported", image_size=144, max_text_len=24).eval()
    assert (encoder.config.image_size, encoder.config.max_text_len, encoder.config.num_image_tokens) == (144, 24, 82)

    weights, _ = backbone(torch.load(tmp_path / "released.pth", weights_only=True))
    table = weights["pos_embed_vision"]  # [37, width], as the authors store it
    grid = table[1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(9, 9), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(81, -1)
    weights["pos_embed_vision"] = torch.cat([table[:1], grid])
    weights["pos_embed_text"] = weights["pos_embed_text"][:24]
    config = CONFIG.replace(image_size=144, max_text_len=24)
    for mode, (ours, theirs) in encode_every_mode(encoder, weights, config, batch(config)).items():
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=mode)

    with pytest.raises(ValueError, match="holds 40 text positions, fewer than max_text_len 64"):
        EVE.from_pretrained(tmp_path / "imported", max_text_len=64)
    with pytest.raises(ValueError, match="'image_size'"):
        EVE.from_pretrained(tmp_path / "imported", image_size=100)


def test_export_refuses_a_router_only_model(consolidated, tmp_path):
    state_dict, config = load_pretrained(consolidated)
    save_pretrained(tmp_path / "router_only", state_dict, config.replace(routing_embedding_to_experts=False))
    result = convert_cli("export", tmp_path / "router_only", tmp_path / "released.pth")
    assert result.returncode == 2 and "router's input only" in result.stderr
    assert not (tmp_path / "released.pth").exists()


def test_export_then_import_is_the_identity(consolidated, tmp_path):
    assert convert_cli("export", consolidated, tmp_path / "released.pth").returncode == 0
    result = convert_cli("import", tmp_path / "released.pth", tmp_path / "imported")
    assert result.returncode == 0, result.stderr
    original, config = load_pretrained(consolidated)
    imported, imported_config = load_pretrained(tmp_path / "imported")
    assert imported_config == config
    assert imported.keys() == original.keys()  # the pre-training heads travel too, under eve_ds_pretraining.
    for name, tensor in imported.items():
        assert torch.equal(tensor, original[name]), name
    assert held_model(tmp_path / "imported") == HeldModel("pretraining")
    PretrainingModel.from_pretrained(tmp_path / "imported")  # strict


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

    state_dict, config, held, notes = import_released(tmp_path / "authors.pth", CONFIG.replace(vocab_size=64000))
    assert config == CONFIG  # vocabulary, image and text lengths come from the file
    assert held.task == "encoder"  # a matching head's weight alone is no retrieval head
    assert any("mask_embed_vision" in note for note in notes)
    assert any("1 tensors outside 'backbone.' left out" in note and "itm_head.weight" in note for note in notes)
    encoder = {name.removeprefix("encoder."): tensor for name, tensor in state_dict.items()}
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


def test_import_writes_the_tokenizer_and_its_roles_into_the_folder(consolidated, tmp_path):
    authors_style_file(consolidated, tmp_path / "authors.pth")
    tokenizer = roberta_style_tokenizer(tmp_path / "bpe.json", with_mask=False, extra_words=CONFIG.vocab_size - 9)
    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "out", "--model", "eve-tiny",
                         "--tokenizer", tokenizer, "--special-token", "mask=c")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / TOKENIZER_FILE).read_bytes() == tokenizer.read_bytes()
    assert json.loads((tmp_path / "out" / SPECIAL_TOKENS_FILE).read_text())["mask"] == "c"
    assert TextTokenizer.from_folder(tmp_path / "out", 40).mask_id == 8

    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "bare", "--model", "eve-tiny")
    assert result.returncode == 0 and "no --tokenizer" in result.stdout
    assert not (tmp_path / "bare" / TOKENIZER_FILE).exists()
    small = roberta_style_tokenizer(tmp_path / "small.json")
    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "refused", "--model", "eve-tiny",
                         "--tokenizer", small)
    assert result.returncode == 2 and "has 10 tokens but the token table of" in result.stderr
    result = convert_cli("import", tmp_path / "authors.pth", tmp_path / "refused", "--model", "eve-tiny",
                         "--tokenizer", tokenizer, "--special-token", "mask")
    assert result.returncode == 2 and "--special-token: wants ROLE=TOKEN, got 'mask'" in result.stderr
    assert not (tmp_path / "refused").exists()
