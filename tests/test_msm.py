import torch

from eve_ds.config import preset
from eve_ds.objectives import PretrainingModel, normalized_pixel_targets, patchify
from tests.released_reference import released_gate_loss
from tests.test_model import batch, record_moe_losses


def test_patchify_is_raster_order_of_patches():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 4 * 4 * 3)
    # Patch 1 is the top-right 4x4 block; its features are (row, column, channel).
    expected = images[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[0, 1], expected)


def test_pixel_targets_are_normalised_per_patch():
    targets = normalized_pixel_targets(torch.rand(2, 3, 32, 32) * 5 + 3, 16)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.var(-1), torch.ones(2, 4), atol=1e-3, rtol=0)


def test_losses_count_only_masked_signals():
    config = preset("eve-tiny")
    torch.manual_seed(0)
    model = PretrainingModel(config).eval()
    inputs = batch(config)
    outputs = model(**inputs)
    assert outputs["loss"] == outputs["image_loss"] + outputs["text_loss"] + 0.001 * outputs["aux_loss"]
    # Untrained, the text loss is about ln(vocab) and the pixel loss about the target variance (1).
    assert abs(outputs["text_loss"] - torch.log(torch.tensor(config.vocab_size))) < 0.5
    assert 0.8 < outputs["image_loss"] < 1.5

    # With nothing masked in a modality its loss is exactly zero (not NaN).
    inputs_no_text = {**inputs, "text_labels": torch.full_like(inputs["text_labels"], -100)}
    assert model(**inputs_no_text)["text_loss"] == 0
    inputs_no_image = {**inputs, "image_mask": torch.zeros_like(inputs["image_mask"])}
    assert model(**inputs_no_image)["image_loss"] == 0


def test_image_loss_is_mse_over_masked_patches():
    config = preset("eve-tiny")
    torch.manual_seed(0)
    model = PretrainingModel(config).eval()
    inputs = batch(config)
    hidden, _ = model.encoder(inputs["images"], inputs["text_ids"], inputs["text_padding_mask"], inputs["image_mask"])
    prediction = model.image_head(hidden[:, 1:config.num_image_tokens])
    target = normalized_pixel_targets(inputs["images"], config.patch_size)
    mask = inputs["image_mask"]
    expected = ((prediction - target)**2).mean(-1)[mask].mean()
    torch.testing.assert_close(model(**inputs)["image_loss"], expected, rtol=1e-5, atol=1e-6)


def test_pre_training_weights_the_aux_loss_as_the_authors_gate_loss():
    """0.001 x the mean over MoE layers (the authors' gate loss), not 0.001 x their sum."""
    config = preset("eve-tiny")
    torch.manual_seed(0)
    model = PretrainingModel(config).eval()
    layer_losses = record_moe_losses(model.encoder)
    outputs = model(**batch(config))
    assert len(layer_losses) == 2
    torch.testing.assert_close(config.aux_loss_weight * outputs["aux_loss"], released_gate_loss(layer_losses))
    assert outputs["loss"] == outputs["image_loss"] + outputs["text_loss"] + 0.001 * outputs["aux_loss"]
