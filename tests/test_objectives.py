"""Pre-training objectives (--objectives): their parsing, each loss against a hand-written reference on a small batch,
the samples they need, and what a resumed run may change (2-rank launches: tests/test_pretrain_distributed.py)."""
import random
import re

import pytest
import torch
import torch.nn.functional as F

from eve_ds.checkpoint.pretrained import HeldModel
from eve_ds.config import ConfigError, preset
from eve_ds.data import MaskedSamples, TextTokenizer
from eve_ds.errors import UsageError
from eve_ds.objectives import MaskingConfig, PretrainingModel, loss_names, normalized_pixel_targets, parse_objectives
from eve_ds.objectives.masking import IGNORE_INDEX
from eve_ds.params import parameter_counts
from eve_ds.run_start import resumed_objectives
from tests.conftest import SHAPES
from tests.test_model import batch

CONFIG = preset("eve-tiny").replace(image_size=32, max_text_len=12, capacity_factor=8.0, eval_capacity_factor=8.0)
ALL = {"msm": 1.0, "itc": 0.5, "itm": 2.0, "mlm": 0.25}


def test_objectives_are_named_with_optional_weights():
    assert parse_objectives("msm") == {"msm": 1.0}
    assert parse_objectives("itc,itm,mlm") == {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    assert parse_objectives("msm, itc=0.5,itm=0.5") == {"msm": 1.0, "itc": 0.5, "itm": 0.5}
    assert loss_names(parse_objectives("msm,itc,itm")) == ("loss", "image_loss", "text_loss", "itc_loss", "itm_loss",
                                                           "aux_loss")


@pytest.mark.parametrize("text, wanted", [
    ("msm,ict", "unknown objective 'ict'; choose from msm, itc, itm, mlm"), ("msm,msm", "msm is given twice"),
    ("itc=0", "the weight of itc must be a positive number, got '0'"), ("itc=-1", "got '-1'"),
    ("itc=x", "got 'x'"), ("itc=nan", "got 'nan'"), ("itc=inf", "got 'inf'"),
    ("msm,itm", "itm draws its hard negatives from itc's similarities; add itc"), ("", "unknown objective ''; choose from msm, itc, itm, mlm")])
def test_a_bad_list_of_objectives_is_one_sentence(text, wanted):
    with pytest.raises(UsageError, match=re.escape(wanted) + "$") as error:
        parse_objectives(text)
    assert str(error.value).startswith("--objectives: ") and "\n" not in str(error.value)


def pretraining_batch(size=4, seed=0):
    inputs = batch(CONFIG, size=size, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    plain = torch.randint(5, CONFIG.vocab_size, inputs["text_ids"].shape, generator=generator)
    mlm_labels = torch.where(torch.rand(plain.shape, generator=generator) < 0.3, plain, IGNORE_INDEX)
    mlm_labels[~inputs["text_padding_mask"]] = IGNORE_INDEX
    mlm_ids = torch.where(mlm_labels != IGNORE_INDEX, 3, plain)
    return {**inputs, "plain_text_ids": plain, "mlm_text_ids": mlm_ids, "mlm_text_labels": mlm_labels}


def reference_losses(model, inputs, seed: int) -> dict:
    """Every objective's loss written out from the encoder and the heads."""
    encoder, size, image_tokens = model.encoder, len(inputs["images"]), CONFIG.num_image_tokens
    images, plain, padding = inputs["images"], inputs["plain_text_ids"], inputs["text_padding_mask"]
    aux = []
    image_hidden, image_aux = encoder(images=images)
    text_hidden, text_aux = encoder(text_ids=plain, text_padding_mask=padding)
    aux += [image_aux, text_aux]
    image_features = F.normalize(model.image_projection(image_hidden[:, 0]), dim=-1)
    text_features = F.normalize(model.text_projection(text_hidden[:, 0]), dim=-1)
    logits = image_features @ text_features.t() / model.temperature.clamp(0.001, 0.5)
    targets = torch.arange(size)
    itc = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2

    torch.manual_seed(seed)  # the draws of the hard negatives, as the model makes them
    off_diagonal = ~torch.eye(size, dtype=torch.bool)
    text_weights = torch.where(off_diagonal, logits.detach(), float("-inf")).softmax(1)
    image_weights = torch.where(off_diagonal, logits.detach().t(), float("-inf")).softmax(1)
    negative_text = torch.multinomial(text_weights, 1).squeeze(1)
    negative_image = torch.multinomial(image_weights, 1).squeeze(1)
    match_logits = []
    for pass_images, pass_texts, pass_padding in [(images, plain, padding), (images[negative_image], plain, padding),
                                                  (images, plain[negative_text], padding[negative_text])]:
        hidden, pass_aux = encoder(pass_images, pass_texts, pass_padding)
        match_logits.append(model.itm_head(hidden[:, image_tokens]))
        aux.append(pass_aux)
    itm = F.cross_entropy(torch.cat(match_logits), torch.tensor([1] * size + [0] * 2 * size))

    hidden, mlm_aux = encoder(images, inputs["mlm_text_ids"], padding)
    chosen = inputs["mlm_text_labels"] != IGNORE_INDEX
    mlm = F.cross_entropy(model.text_head(hidden[:, image_tokens:][chosen]), inputs["mlm_text_labels"][chosen])
    aux.append(mlm_aux)

    hidden, msm_aux = encoder(images, inputs["text_ids"], padding, inputs["image_mask"])
    mask = inputs["image_mask"]
    pixels = ((model.image_head(hidden[:, 1:image_tokens]) - normalized_pixel_targets(images, CONFIG.patch_size))**2)
    image = pixels.mean(-1)[mask].mean()
    chosen = inputs["text_labels"] != IGNORE_INDEX
    text = F.cross_entropy(model.text_head(hidden[:, image_tokens:][chosen]), inputs["text_labels"][chosen])
    aux.append(msm_aux)
    aux_loss = torch.stack(aux).mean()
    total = 0.5 * itc + 2.0 * itm + 0.25 * mlm + image + text + CONFIG.aux_loss_weight * aux_loss
    return {"loss": total, "itc_loss": itc, "itm_loss": itm, "mlm_loss": mlm, "image_loss": image,
            "text_loss": text, "aux_loss": aux_loss}


def test_every_objectives_loss_is_its_formula_and_the_sum_is_weighted():
    torch.manual_seed(0)
    model = PretrainingModel(CONFIG, objectives=ALL).eval()
    with torch.no_grad():
        model.temperature.fill_(0.2)  # similarities spread enough for the negatives to be drawn from a real choice
    inputs = pretraining_batch()
    torch.manual_seed(7)
    outputs = model(**inputs)
    expected = reference_losses(model, inputs, seed=7)
    assert set(outputs) == set(loss_names(ALL)) | {"temperature"}
    for name, value in expected.items():
        torch.testing.assert_close(outputs[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert outputs["temperature"] == pytest.approx(0.2)


def test_each_objective_trains_its_own_heads_and_no_other():
    inputs = pretraining_batch()
    for objectives, trained, absent in [({"msm": 1.0}, ["image_head", "text_head"], ["itm_head", "temperature"]),
                                        ({"itc": 1.0}, ["image_projection", "text_projection", "temperature"],
                                         ["itm_head", "text_head", "image_head"]),
                                        ({"itc": 1.0, "itm": 1.0, "mlm": 1.0}, ["itm_head", "text_head"],
                                         ["image_head"])]:
        torch.manual_seed(0)
        model = PretrainingModel(CONFIG, objectives=objectives)
        model(**inputs)["loss"].backward()
        names = {name for name, _ in model.named_parameters()}
        for head in trained:
            grads = [p.grad for name, p in model.named_parameters() if name.startswith(head)]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), (objectives, head)
        assert not any(name.startswith(head) for name in names for head in absent), objectives
        assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("encoder.patch"))


@pytest.mark.parametrize("objectives", [ALL, {"itc": 1.0}, {"itc": 1.0, "itm": 1.0, "mlm": 1.0}, {"msm": 1.0}])
def test_the_parameter_count_formula_counts_the_heads_of_the_objectives(objectives):
    with torch.device("meta"):
        model = PretrainingModel(CONFIG, objectives=objectives)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(CONFIG, objectives=objectives).total


def test_masked_signal_modeling_alone_is_the_model_it_always_was():
    """The default objectives build the same parameters from the same seed and give the same loss as before any
    other objective existed: msm's heads first, drawn from the same generator."""
    inputs = batch(CONFIG, size=3)
    torch.manual_seed(0)
    default = PretrainingModel(CONFIG).eval()
    torch.manual_seed(0)
    mixed = PretrainingModel(CONFIG, objectives={"msm": 1.0, "itc": 1.0}).eval()
    assert [name for name, _ in default.named_parameters()] == ["encoder." + n for n, _ in
                                                                default.encoder.named_parameters()] + \
        ["image_head.weight", "image_head.bias", "text_head.weight", "text_head.bias"]
    for name, tensor in default.state_dict().items():
        assert torch.equal(tensor, mixed.state_dict()[name]), name
    outputs = default(**inputs)
    assert outputs["loss"] == outputs["image_loss"] + outputs["text_loss"] + CONFIG.aux_loss_weight * outputs["aux_loss"]


def test_samples_carry_what_their_objectives_read_and_msms_masks_do_not_change():
    tokenizer = TextTokenizer(SHAPES / "tokenizer.json", 40)
    image = (SHAPES / "images" / "000000.png").read_bytes()
    caption = "a small red circle in the top left and a large blue star in the bottom right on a black background"
    plain = MaskedSamples(tokenizer, 32, 8, MaskingConfig(), augment=False).make(image, caption, random.Random(3))
    every = MaskedSamples(tokenizer, 32, 8, MaskingConfig(), augment=False, objectives=("msm", "itc", "itm", "mlm"),
                          mlm_mask_ratio=0.15).make(image, caption, random.Random(3))
    assert set(plain) == {"images", "image_mask", "text_ids", "text_labels", "text_padding_mask"}
    assert set(every) == set(plain) | {"plain_text_ids", "mlm_text_ids", "mlm_text_labels"}
    for key in plain:
        assert torch.equal(plain[key], every[key]), key
    ids, _, maskable = tokenizer.encode(caption)
    assert torch.equal(every["plain_text_ids"], ids)
    chosen = every["mlm_text_labels"] != IGNORE_INDEX
    assert int(chosen.sum()) == round(0.15 * int(maskable.sum()))
    assert torch.equal(every["mlm_text_labels"][chosen], ids[chosen]) and not chosen[~maskable].any()


def test_a_resumed_run_keeps_its_heads_and_may_reweigh_them():
    held = HeldModel("pretraining", {"objectives": {"itc": 1.0, "itm": 1.0, "mlm": 1.0}})
    assert resumed_objectives({"itc": 1.0, "itm": 0.5, "mlm": 1.0}, held, "ckpt") == {"itc": 1.0, "itm": 0.5,
                                                                                       "mlm": 1.0}
    with pytest.raises(ConfigError, match="ckpt was trained with --objectives itc,itm,mlm, whose heads this run's "
                                          "msm would not match: resume with --objectives itc,itm,mlm"):
        resumed_objectives({"msm": 1.0}, held, "ckpt")
    assert resumed_objectives({"msm": 1.0}, HeldModel("pretraining"), "old") == {"msm": 1.0}  # before objectives
    assert held.describe() == "the pre-training model (objectives itc,itm,mlm)"


def test_the_contrastive_heads_a_pre_training_trained_seed_the_retrieval_jobs(tmp_path):
    from eve_ds.checkpoint.pretrained import save_pretrained
    from eve_ds.finetune.retrieval import RetrievalModel
    from eve_ds.finetune.vqa import VQAModel

    torch.manual_seed(0)
    pretrained = PretrainingModel(CONFIG, objectives={"itc": 1.0, "itm": 1.0, "mlm": 1.0})
    with torch.no_grad():
        pretrained.temperature.fill_(0.03)
    save_pretrained(tmp_path, pretrained.state_dict(), CONFIG, held=HeldModel("pretraining", {"objectives": {
        "itc": 1.0, "itm": 1.0, "mlm": 1.0}}))
    retrieval = RetrievalModel.from_pretrained(tmp_path)
    for name in ("image_projection.weight", "text_projection.weight", "itm_head.weight", "itm_head.bias"):
        assert torch.equal(retrieval.state_dict()[name], pretrained.state_dict()[name]), name
    assert retrieval.temperature.item() == pytest.approx(0.03)
    assert retrieval.new_parameter_names() == frozenset()  # nothing new: no parameter gets the head multiplier
    vqa = VQAModel.from_pretrained(tmp_path, num_answers=5)
    assert vqa.new_parameter_names() == {name for name, _ in vqa.named_parameters() if name.startswith("head.")}

    torch.manual_seed(0)  # a pre-training without itm: the matching head is new, the dual encoder is not
    save_pretrained(tmp_path / "itc", PretrainingModel(CONFIG, objectives={"msm": 1.0, "itc": 1.0}).state_dict(),
                    CONFIG, held=HeldModel("pretraining", {"objectives": {"msm": 1.0, "itc": 1.0}}))
    assert RetrievalModel.from_pretrained(tmp_path / "itc").new_parameter_names() == {"itm_head.weight",
                                                                                      "itm_head.bias"}


def test_unimodal_batches_train_masked_modeling_through_the_unimodal_encodings():
    torch.manual_seed(0)
    model = PretrainingModel(CONFIG, objectives={"msm": 2.0, "itc": 1.0}).eval()
    inputs = pretraining_batch()
    images, mask = inputs["images"], inputs["image_mask"]
    outputs = model(images=images, image_mask=mask)
    hidden, aux = model.encoder.encode_image(images, mask)
    prediction = model.image_head(hidden[:, 1:][mask])
    image_loss = F.mse_loss(prediction, normalized_pixel_targets(images, CONFIG.patch_size)[mask])
    torch.testing.assert_close(outputs["image_loss"], image_loss)
    torch.testing.assert_close(outputs["loss"], 2.0 * image_loss + CONFIG.aux_loss_weight * aux)
    assert set(outputs) == {"loss", "aux_loss", "image_loss"}

    text = {key: inputs[key] for key in ("text_ids", "text_labels", "text_padding_mask")}
    outputs = model(**text)
    hidden, aux = model.encoder.encode_text(text["text_ids"], text["text_padding_mask"])
    chosen = text["text_labels"] != IGNORE_INDEX
    text_loss = F.cross_entropy(model.text_head(hidden[chosen]), text["text_labels"][chosen])
    torch.testing.assert_close(outputs["text_loss"], text_loss)
    assert set(outputs) == {"loss", "aux_loss", "text_loss"}

    mlm = PretrainingModel(CONFIG, objectives={"mlm": 0.5}).eval()
    outputs = mlm(**text, mlm_text_ids=inputs["mlm_text_ids"], mlm_text_labels=inputs["mlm_text_labels"])
    hidden, aux = mlm.encoder.encode_text(inputs["mlm_text_ids"], text["text_padding_mask"])
    chosen = inputs["mlm_text_labels"] != IGNORE_INDEX
    mlm_loss = F.cross_entropy(mlm.text_head(hidden[chosen]), inputs["mlm_text_labels"][chosen])
    torch.testing.assert_close(outputs["mlm_loss"], mlm_loss)
    torch.testing.assert_close(outputs["loss"], 0.5 * mlm_loss + CONFIG.aux_loss_weight * aux)


def test_a_pair_sample_is_its_image_part_and_text_part_with_the_same_draws():
    samples = MaskedSamples(TextTokenizer(SHAPES / "tokenizer.json", 12), 32, 8, MaskingConfig(), objectives=("mlm", ))
    data = (SHAPES / "images" / sorted(p.name for p in (SHAPES / "images").iterdir())[0]).read_bytes()
    whole = samples.make(data, "a red circle", random.Random(3))
    rng = random.Random(3)
    parts = {**samples.make_image(data, rng), **samples.make_text("a red circle", rng)}
    assert set(whole) == set(parts) and all(torch.equal(whole[key], parts[key]) for key in whole)


@pytest.mark.parametrize("config, objectives", [
    (CONFIG, ALL), (preset("vlmo-tiny").replace(image_size=32, max_text_len=12), ALL),
    (preset("vlmo-tiny").replace(image_size=32, max_text_len=12), {"msm": 1.0, "mlm": 1.0})],
    ids=["eve", "vlmo", "vlmo_without_itc"])
def test_every_parameter_gets_a_gradient_from_every_kind_of_micro_batch(config, objectives):
    """ZeRO-3 accumulates a micro-batch's gradients onto its buffers' old contents where a parameter had none in
    the step's first micro-batch: each kind of micro-batch must give every parameter a gradient (zeros for those
    it does not train), such as a joint pass the vision and text FFNs of VLMo's top layers."""
    torch.manual_seed(0)
    model = PretrainingModel(config, objectives=objectives)
    inputs = pretraining_batch()
    text_keys = ("text_ids", "text_labels", "text_padding_mask", "mlm_text_ids", "mlm_text_labels")
    for kind, keys in [("pairs", tuple(inputs)), ("images", ("images", "image_mask")), ("texts", text_keys)]:
        model.zero_grad(set_to_none=True)
        model(**{key: inputs[key] for key in keys})["loss"].backward()
        without = [name for name, parameter in model.named_parameters() if parameter.grad is None]
        assert without == [], (kind, without)
    assert not model.image_head.weight.grad.any()  # a text-only micro-batch does not train the image head
