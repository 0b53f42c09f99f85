"""The fine-tuning task models on eve-tiny with random weights: outputs, losses by hand, hard negatives,
training on a fixed batch, loading from a consolidated checkpoint, retrieval over 2 ranks, and the fp32 master
weights a bf16 engine starts fine-tuning from."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from eve_ds.checkpoint.pretrained import save_pretrained
from eve_ds.checkpoint.released import backbone, to_released
from eve_ds.config import preset
from eve_ds.finetune.metrics import rerank, retrieval_recall
from eve_ds.finetune.nlvr2 import BiAttentionHead, NLVR2Model
from eve_ds.finetune.optim import param_groups
from eve_ds.finetune.retrieval import RetrievalModel
from eve_ds.finetune.vqa import VQAModel
from eve_ds.model import ExpertPlacement
from eve_ds.objectives import PretrainingModel
from eve_ds.objectives.contrastive import (TEMPERATURE_RANGE, clamp_temperature, contrastive_loss, gather_with_grad,
                                           sample_hard_negatives)
from tests.conftest import REPO, free_port
from tests.released_reference import (released_forward, released_gate_loss, released_itm_logits,
                                      released_nlvr2_biattn_logits, released_retrieval_embeddings)
from tests.test_model import record_moe_losses

# Small images and texts keep each pass to a few milliseconds. A capacity factor of num_experts keeps every
# route (no drops), so that passes of different sizes compute the same per-sample outputs.
CONFIG = preset("eve-tiny").replace(image_size=32, max_text_len=12, capacity_factor=4.0, eval_capacity_factor=4.0)


def images(size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, CONFIG.image_size, CONFIG.image_size, generator=generator) * 2 - 1


def texts(size, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    text_ids = torch.randint(5, CONFIG.vocab_size, (size, CONFIG.max_text_len), generator=generator)
    padding_mask = torch.ones(size, CONFIG.max_text_len, dtype=torch.bool)
    padding_mask[0, CONFIG.max_text_len // 2:] = False
    return text_ids, padding_mask


def vqa_batch(size=3, num_answers=7):
    text_ids, padding_mask = texts(size)
    targets = torch.zeros(size, num_answers)
    targets[0, 1], targets[1, [2, 3]], targets[2, 6] = 1.0, torch.tensor([0.3, 0.9]), 0.6
    return dict(images=images(size), text_ids=text_ids, text_padding_mask=padding_mask, targets=targets)


def nlvr2_batch(size=3):
    text_ids, padding_mask = texts(size)
    pairs = images(2 * size).view(size, 2, 3, CONFIG.image_size, CONFIG.image_size)
    return dict(images=pairs, text_ids=text_ids, text_padding_mask=padding_mask, labels=torch.tensor([0, 1, 1])[:size])


def retrieval_batch():
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])  # two captions of image 0 and of image 2
    text_ids, padding_mask = texts(len(image_ids))
    return dict(images=images(4)[image_ids], text_ids=text_ids, text_padding_mask=padding_mask, image_ids=image_ids)


def test_vqa_logits_and_loss_by_hand():
    torch.manual_seed(0)
    model = VQAModel(CONFIG, num_answers=7).eval()
    layer_losses = record_moe_losses(model.encoder)
    batch = vqa_batch()
    out = model(**batch)
    torch.testing.assert_close(out["aux_loss"], released_gate_loss(layer_losses, gateloss_weight=1.0))
    assert out["logits"].shape == (3, 7) and out["prediction"].tolist() == out["logits"].argmax(-1).tolist()

    hidden, _ = model.encoder(batch["images"], batch["text_ids"], batch["text_padding_mask"])
    logits = model.head(hidden[:, CONFIG.num_image_tokens])
    torch.testing.assert_close(out["logits"], logits)
    probabilities, targets = torch.sigmoid(logits), batch["targets"]
    bce = -(targets * probabilities.log() + (1 - targets) * (1 - probabilities).log())
    torch.testing.assert_close(out["task_loss"], bce.sum(dim=1).mean())
    assert out["loss"] == out["task_loss"] and out["aux_loss"] > 0  # VQA leaves the MoE loss out by default

    weighted = VQAModel(CONFIG, num_answers=7, aux_weight=0.5).eval()
    out = weighted(**batch)
    torch.testing.assert_close(out["loss"], out["task_loss"] + 0.5 * out["aux_loss"])
    assert set(weighted(**{k: v for k, v in batch.items() if k != "targets"})) == {"logits", "prediction"}


# The authors' --biattn head: their names, under head. (their attn1 is head.attn1, and so on).
BIATTN_HEAD_NAMES = {f"head.{name}" for name in (
    "attn1.in_proj_weight", "attn1.in_proj_bias", "attn1.out_proj.weight", "attn1.out_proj.bias",
    "attn2.in_proj_weight", "attn2.in_proj_bias", "attn2.out_proj.weight", "attn2.out_proj.bias",
    "fc.0.weight", "fc.0.bias", "attn_pool.fc.0.weight", "attn_pool.fc.0.bias", "nlvr2_output.weight",
    "nlvr2_output.bias")}
MLP_HEAD_NAMES = {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "head.3.weight", "head.3.bias"}


def nlvr2_head_weights_in_their_names(model) -> dict:
    return {name.removeprefix("head."): param.detach() for name, param in model.named_parameters()
            if name.startswith("head.")}


def randomise_head(model, std=0.1):
    """Fresh heads have zero biases and small weights; random ones make every term of the formula count."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.head.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_dropped_routes_matter(encoder):
    """Fresh experts add little to the residual stream; these make a dropped route change the outputs."""
    with torch.no_grad():
        for block in encoder.blocks:
            if block.is_moe:
                block.gamma2.fill_(1.0)
                for name, param in block.ffn.named_parameters():
                    if "experts" in name and name.endswith("weight"):
                        param.normal_(0.0, 0.1)


def test_nlvr2_biattn_head_is_the_default_with_the_authors_shapes():
    torch.manual_seed(0)
    model = NLVR2Model(CONFIG)
    width = CONFIG.hidden_size
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters() if name.startswith("head.")}
    attention = {"in_proj_weight": (3 * width, width), "in_proj_bias": (3 * width, ),
                 "out_proj.weight": (width, width), "out_proj.bias": (width, )}
    expected = {f"head.{side}.{name}": shape for side in ("attn1", "attn2") for name, shape in attention.items()}
    expected.update({"head.fc.0.weight": (width, 2 * width), "head.fc.0.bias": (width, ),
                     "head.attn_pool.fc.0.weight": (1, width), "head.attn_pool.fc.0.bias": (1, ),
                     "head.nlvr2_output.weight": (2, 2 * width), "head.nlvr2_output.bias": (2, )})
    assert shapes == expected
    assert set(shapes) == BIATTN_HEAD_NAMES
    assert model.head.attn1.num_heads == CONFIG.num_heads and model.head.attn1.dropout == 0.1
    assert model.head.fc[2].p == 0.1 and model.head.attn_pool.dropout.p == 0.1
    assert model.head.attn1.in_proj_weight.std() > 0 and not model.head.attn1.in_proj_bias.any()
    head = BiAttentionHead(width, CONFIG.num_heads).eval()
    keep = torch.ones(4, 9, dtype=torch.bool)
    assert head(torch.randn(4, 9, width), torch.randn(4, 9, width), keep).shape == (4, 2)
    with pytest.raises(ValueError, match="unknown NLVR2 head 'pool'; choose one of biattn, mlp"):
        NLVR2Model(CONFIG, head="pool")


def test_nlvr2_biattn_logits_are_the_authors_formula():
    """Their --biattn head in eval mode (no dropout) on the same weights and encodings, written from their
    models/model_nlvr_beit.py and models/attention.py."""
    torch.manual_seed(0)
    model = NLVR2Model(CONFIG).eval()
    randomise_head(model)
    layer_losses = record_moe_losses(model.encoder)
    batch = nlvr2_batch()
    out = model(**batch)
    assert out["logits"].shape == (3, 2) and out["prediction"].shape == (3, ) and out["loss"].shape == ()
    assert out["prediction"].tolist() == out["logits"].argmax(-1).tolist()
    assert [len(losses) for losses in layer_losses] == [2, 2]  # two passes
    torch.testing.assert_close(out["loss"] - out["task_loss"], released_gate_loss(layer_losses))

    text = {"text_ids": batch["text_ids"], "text_padding_mask": batch["text_padding_mask"]}
    with torch.no_grad():
        left, right = (model.encoder(batch["images"][:, side], **text)[0] for side in (0, 1))
    reference = released_nlvr2_biattn_logits(nlvr2_head_weights_in_their_names(model), CONFIG.num_heads, left, right,
                                             batch["text_padding_mask"])
    torch.testing.assert_close(out["logits"], reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["task_loss"], F.cross_entropy(reference, batch["labels"]), rtol=1e-6, atol=1e-6)
    assert reference.std() > 0.1  # the random head makes the logits differ between examples
    # The padding of example 0's sentence is masked: what its padded tokens hold does not change its logits.
    with torch.no_grad():
        moved = right.clone()
        moved[0, CONFIG.num_image_tokens + CONFIG.max_text_len // 2:] += 1.0
        keep = torch.cat([torch.ones(3, CONFIG.num_image_tokens, dtype=torch.bool), batch["text_padding_mask"]], 1)
        torch.testing.assert_close(model.head(left, moved, keep)[0], out["logits"][0])


def test_nlvr2_mlp_head_logits_and_loss_by_hand():
    torch.manual_seed(0)
    model = NLVR2Model(CONFIG, head="mlp").eval()
    assert {name for name, _ in model.named_parameters() if name.startswith("head.")} == MLP_HEAD_NAMES
    layer_losses = record_moe_losses(model.encoder)
    batch = nlvr2_batch()
    out = model(**batch)
    assert out["logits"].shape == (3, 2) and out["prediction"].shape == (3, )
    # The loss adds the authors' gate loss: 0.001 x the mean over MoE layers of each layer's mean over the passes.
    assert [len(losses) for losses in layer_losses] == [2, 2]
    torch.testing.assert_close(out["loss"] - out["task_loss"], released_gate_loss(layer_losses))

    with torch.no_grad():
        cls_states = [model.encoder(batch["images"][:, side], batch["text_ids"], batch["text_padding_mask"])[0]
                      [:, CONFIG.num_image_tokens] for side in (0, 1)]
        logits = model.head(torch.cat(cls_states, dim=-1))
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["task_loss"], F.cross_entropy(logits, batch["labels"]))
    torch.testing.assert_close(out["loss"], out["task_loss"] + CONFIG.aux_loss_weight * out["aux_loss"])


def test_nlvr2_runs_the_authors_two_passes_of_the_batch():
    """The authors encode the sentence with the left images, then with the right images: two passes of B. An
    expert's capacity counts a pass's tokens, so at a capacity that drops routes one pass of 2B computes other
    logits."""
    config = CONFIG.replace(capacity_factor=1.0, eval_capacity_factor=1.0)
    torch.manual_seed(0)
    model = NLVR2Model(config).eval()
    randomise_head(model)
    make_dropped_routes_matter(model.encoder)
    batch = nlvr2_batch()
    with torch.no_grad():
        out = model(**batch)
    pass_tokens = len(batch["text_ids"]) * (config.num_image_tokens + config.max_text_len)
    assert model.encoder.moe_layers()[0].gate.expert_load.sum() < 2 * pass_tokens  # routes were dropped

    text = {"text_ids": batch["text_ids"], "text_padding_mask": batch["text_padding_mask"]}
    weights, _ = backbone(to_released(model.encoder.state_dict(), config))
    head_weights = nlvr2_head_weights_in_their_names(model)
    with torch.no_grad():
        # Two separate single-image forwards, and the authors' encoder and head on them.
        left, right = (model.encoder(batch["images"][:, side], **text)[0] for side in (0, 1))
        theirs = [released_forward(weights, config, batch["images"][:, side], **text) for side in (0, 1)]
        one_pass, _ = model.encoder(torch.cat([batch["images"][:, 0], batch["images"][:, 1]]),
                                    text["text_ids"].repeat(2, 1), text["text_padding_mask"].repeat(2, 1))
    torch.testing.assert_close(out["logits"], released_nlvr2_biattn_logits(head_weights, config.num_heads, left, right,
                                                                           text["text_padding_mask"]))
    reference = released_nlvr2_biattn_logits(head_weights, config.num_heads, *theirs, text["text_padding_mask"])
    torch.testing.assert_close(out["logits"], reference, rtol=1e-4, atol=1e-5)

    one_pass_logits = released_nlvr2_biattn_logits(head_weights, config.num_heads, *one_pass.chunk(2),
                                                   text["text_padding_mask"])
    assert (one_pass_logits - out["logits"]).abs().max() > 0.05


def test_contrastive_loss_spreads_targets_over_pairs_of_one_image():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=generator) * 3
    image_ids = torch.tensor([4, 4, 7, 7, 9])
    total = 0.0
    for matrix in (logits, logits.t()):
        for row in range(5):
            positives = [col for col in range(5) if image_ids[col] == image_ids[row]]
            log_normaliser = math.log(sum(math.exp(matrix[row, col]) for col in range(5)))
            total += -sum(matrix[row, col].item() - log_normaliser for col in positives) / len(positives) / 5
    torch.testing.assert_close(contrastive_loss(logits, image_ids), torch.tensor(total / 2))
    # With distinct images it is the usual symmetric InfoNCE.
    distinct = torch.arange(5)
    expected = (F.cross_entropy(logits, distinct) + F.cross_entropy(logits.t(), distinct)) / 2
    torch.testing.assert_close(contrastive_loss(logits, distinct), expected)


def test_hard_negatives_never_show_the_same_image_and_follow_the_seed():
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = image_ids[:, None] == image_ids[None, :]
    logits = torch.randn(8, 8) * 20
    logits[positives] += 100  # positives dominate the softmax: negatives must still be drawn, never positives
    for _ in range(50):
        texts_for_images, images_for_texts = sample_hard_negatives(logits, image_ids, slice(2, 8))
        assert texts_for_images.shape == images_for_texts.shape == (6, )
        assert (image_ids[texts_for_images] != image_ids[2:]).all()
        assert (image_ids[images_for_texts] != image_ids[2:]).all()
    torch.manual_seed(3)
    first = sample_hard_negatives(logits, image_ids, slice(0, 8))
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, sample_hard_negatives(logits, image_ids, slice(0, 8))))
    # The harder a negative, the more often it is drawn.
    scores = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    draws = torch.stack([sample_hard_negatives(scores, torch.arange(3), slice(0, 1))[0] for _ in range(200)])
    assert (draws == 1).float().mean() > 0.9
    with pytest.raises(ValueError, match="two different images"):
        sample_hard_negatives(logits[:2, :2], image_ids[:2], slice(0, 2))


def test_retrieval_outputs_and_evaluation_helpers():
    torch.manual_seed(0)
    model = RetrievalModel(CONFIG).eval()
    batch = retrieval_batch()
    out = model(**batch)
    assert out["itm_logits"].shape == (18, 2)
    torch.testing.assert_close(out["task_loss"], out["itc_loss"] + out["itm_loss"])
    torch.testing.assert_close(out["loss"], out["task_loss"] + CONFIG.aux_loss_weight * out["aux_loss"])
    assert out["temperature"] == pytest.approx(0.07)

    image_embeddings = model.image_embeddings(batch["images"][:4])
    text_embeddings = model.text_embeddings(batch["text_ids"], batch["text_padding_mask"])
    assert image_embeddings.shape == (4, CONFIG.hidden_size) and text_embeddings.shape == (6, CONFIG.hidden_size)
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(6))
    # The ITC logits are the cosine similarities over the temperature, of the [CLS] states after the final norm
    # (the authors' forward_itc).
    with torch.no_grad():
        image_cls = model.encoder.encode_image(batch["images"])[0][:, 0]
        text_cls = model.encoder.encode_text(batch["text_ids"], batch["text_padding_mask"])[0][:, 0]
    image_features = F.normalize(model.image_projection(image_cls), dim=-1)
    text_features = F.normalize(model.text_projection(text_cls), dim=-1)
    itc = contrastive_loss(image_features @ text_features.t() / 0.07, batch["image_ids"])
    torch.testing.assert_close(out["itc_loss"], itc, rtol=1e-5, atol=1e-5)

    scores = model.match_scores(batch["images"][:2], batch["text_ids"][:2], batch["text_padding_mask"][:2])
    assert scores.shape == (2, )
    unique_images = images(4)
    pair_score = model.pair_scorer(unique_images, batch["text_ids"], batch["text_padding_mask"], batch_size=4)
    image_to_text, text_to_image = rerank(image_embeddings @ text_embeddings.t(), pair_score, k_test=3)
    best = int(image_to_text[0].argmax())  # image 0's top text after re-ranking carries its matching score
    assert image_to_text[0, best] == pytest.approx(model.match_scores(
        unique_images[:1], batch["text_ids"][best:best + 1], batch["text_padding_mask"][best:best + 1]).item(),
        abs=1e-5)
    recall = retrieval_recall(image_to_text, batch["image_ids"], text_to_image_scores=text_to_image)
    assert 0 <= recall["r_mean"] <= 100


def test_retrieval_evaluation_embeddings_are_the_authors_forward_eval():
    """Their forward_eval projects the image-only / text-only [CLS] state WITHOUT the final norm."""
    torch.manual_seed(0)
    model = RetrievalModel(CONFIG).eval()
    with torch.no_grad():  # a fresh final norm is the identity up to standardisation; make it matter
        model.encoder.norm.weight.normal_(1.0, 0.5)
        model.encoder.norm.bias.normal_(0.0, 0.5)
    weights, _ = backbone(to_released(model.encoder.state_dict(), CONFIG))
    batch = retrieval_batch()
    text = {"text_ids": batch["text_ids"], "text_padding_mask": batch["text_padding_mask"]}
    image_reference = released_retrieval_embeddings(weights, CONFIG, model.image_projection.weight, batch["images"])
    text_reference = released_retrieval_embeddings(weights, CONFIG, model.text_projection.weight, **text)
    torch.testing.assert_close(model.image_embeddings(batch["images"]), image_reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.text_embeddings(**text), text_reference, rtol=1e-4, atol=1e-5)
    # What the contrastive loss is trained on (after the norm) is another thing.
    with torch.no_grad():
        normed = F.normalize(model.image_projection(model.encoder.encode_image(batch["images"])[0][:, 0]), dim=-1)
    assert (normed - image_reference).abs().max() > 0.05


def test_retrieval_gate_loss_is_the_mean_over_the_authors_five_passes():
    """The authors' retrieval model runs five encoder passes (image alone, text alone, ITM positives, ITM negative
    images, ITM negative texts), each MoE layer averages its l_aux over them and the layers are averaged."""
    torch.manual_seed(0)
    model = RetrievalModel(CONFIG).eval()
    layer_losses = record_moe_losses(model.encoder)
    out = model(**retrieval_batch())
    assert [len(losses) for losses in layer_losses] == [5, 5]
    torch.testing.assert_close(out["loss"] - out["task_loss"], released_gate_loss(layer_losses))
    # The same as the mean over the five passes of each pass's loss (the mean over MoE layers).
    pass_losses = torch.stack([torch.stack(losses) for losses in layer_losses]).mean(dim=0)
    assert len(set(pass_losses.tolist())) == 5
    torch.testing.assert_close(out["aux_loss"], pass_losses.mean())


def test_retrieval_matching_runs_the_authors_three_passes_of_the_batch(monkeypatch):
    """The authors' ITM encodes the positive pairs, the negative images with each text and each image with a
    negative text as three joint passes of B pairs. An expert's capacity counts a pass's tokens, so at a capacity
    that drops routes one pass of 3B computes other logits."""
    config = CONFIG.replace(capacity_factor=1.0, eval_capacity_factor=1.0)
    torch.manual_seed(0)
    model = RetrievalModel(config).eval()
    with torch.no_grad():  # fresh experts add little to the residual stream; make a dropped route matter
        for block in model.encoder.blocks:
            if block.is_moe:
                block.gamma2.fill_(1.0)
                for name, param in block.ffn.named_parameters():
                    if "experts" in name and name.endswith("weight"):
                        param.normal_(0.0, 0.1)
    drawn = []
    monkeypatch.setattr("eve_ds.objectives.contrastive.sample_hard_negatives",
                        lambda *args: drawn.append(sample_hard_negatives(*args)) or drawn[-1])
    batch = retrieval_batch()
    with torch.no_grad():
        out = model(**batch)
    (negative_text, negative_image), = drawn
    pass_tokens = len(batch["images"]) * (config.num_image_tokens + config.max_text_len)
    assert model.encoder.moe_layers()[0].gate.expert_load.sum() < 2 * pass_tokens  # routes were dropped

    weights, _ = backbone(to_released(model.encoder.state_dict(), config))
    images, text_ids, padding = batch["images"], batch["text_ids"], batch["text_padding_mask"]
    negatives = (images[negative_image], text_ids[negative_text], padding[negative_text])
    reference = released_itm_logits(weights, config, model.itm_head.weight, model.itm_head.bias, images, text_ids,
                                    padding, *negatives)
    torch.testing.assert_close(out["itm_logits"], reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["itm_loss"], F.cross_entropy(reference, torch.tensor([1] * 6 + [0] * 12)),
                               rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        one_pass, _ = model.encoder(torch.cat([images, negatives[0], images]),
                                    torch.cat([text_ids, text_ids, negatives[1]]),
                                    torch.cat([padding, padding, negatives[2]]))
        one_pass_logits = model.itm_head(model.text_cls(one_pass))
    assert (one_pass_logits - out["itm_logits"]).abs().max() > 0.05


def test_temperature_below_its_bound_is_used_at_the_bound_and_still_gets_a_gradient():
    """The authors clamp the parameter in place, so its gradient is that of the clamped value; a clamp of the
    value alone would give a parameter below 0.001 no gradient, and it would stay there."""
    torch.manual_seed(0)
    model = RetrievalModel(CONFIG).eval()
    with torch.no_grad():
        model.temperature.fill_(1e-4)
    out = model(**retrieval_batch())
    assert out["temperature"] == pytest.approx(0.001)
    out["loss"].backward()
    assert model.temperature.grad.item() < 0  # at 0.001 on random features the loss wants a larger temperature


def _optimise_temperature(start, image_features, text_features, steps=300, lr=1e-4):
    """AdamW (the authors' betas and weight decay) on the temperature alone of a fixed contrastive problem."""
    temperature = torch.nn.Parameter(torch.tensor([start]))
    optimizer = torch.optim.AdamW([temperature], lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    image_ids = torch.arange(len(image_features))
    for _ in range(steps):
        optimizer.zero_grad()
        logits = image_features @ text_features.t() / clamp_temperature(temperature)
        contrastive_loss(logits, image_ids).backward()
        optimizer.step()
    return temperature.item()


def test_temperature_climbs_back_from_below_its_bound():
    generator = torch.Generator().manual_seed(0)
    image_features = F.normalize(torch.randn(16, 8, generator=generator), dim=-1)
    text_features = F.normalize(torch.randn(16, 8, generator=generator), dim=-1)  # unrelated: wants a soft match
    assert _optimise_temperature(0.0005, image_features, text_features) > 2 * TEMPERATURE_RANGE[0]


def test_temperature_does_not_drift_far_past_its_bound():
    """Features that match perfectly want the temperature ever lower. Past the bound the gradient stops (as the
    authors' in-place clamp stops it), so the parameter goes no further than the optimizer's momentum carries
    it (a dozen steps here), where a plain straight-through clamp would carry it 300 steps down."""
    angles = torch.arange(64) * 2 * math.pi / 64  # neighbours close enough that the gradient does not underflow
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    lr, low = 1e-4, TEMPERATURE_RANGE[0]
    final = _optimise_temperature(0.002, features, features, lr=lr)
    assert low - 20 * lr < final < low
    value = torch.tensor([final], requires_grad=True)
    assert clamp_temperature(value).item() == pytest.approx(low)


@pytest.mark.parametrize("build, batch", [(lambda: VQAModel(CONFIG, num_answers=7), vqa_batch),
                                          (lambda: NLVR2Model(CONFIG), nlvr2_batch),
                                          (lambda: NLVR2Model(CONFIG, head="mlp"), nlvr2_batch),
                                          (lambda: RetrievalModel(CONFIG), retrieval_batch)],
                         ids=["vqa", "nlvr2", "nlvr2-mlp", "retrieval"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(build, batch):
    torch.manual_seed(0)
    model, inputs = build(), batch()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4, weight_decay=0.01))

    def loss():
        torch.manual_seed(1)  # the same gate sampling and hard negatives at every measurement
        return model(**inputs)["loss"]

    first = loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    # Retrieval learns slowest: noise images leave the matching head little to tell pairs apart by.
    assert loss().item() < 0.95 * first


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A consolidated folder as tools/consolidate.py writes it: the pre-training model's weights and config."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(5)
    pretrained = PretrainingModel(CONFIG)
    save_pretrained(folder, pretrained.state_dict(), CONFIG)
    weights = pretrained.state_dict()
    return folder, {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}


@pytest.mark.parametrize("cls, options, head", [
    (VQAModel, {"num_answers": 5}, {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "head.3.weight",
                                    "head.3.bias"}),
    (NLVR2Model, {}, BIATTN_HEAD_NAMES),
    (NLVR2Model, {"head": "mlp"}, MLP_HEAD_NAMES),
    (RetrievalModel, {}, {"image_projection.weight", "text_projection.weight", "temperature", "itm_head.weight",
                          "itm_head.bias"}),
], ids=["vqa", "nlvr2", "nlvr2-mlp", "retrieval"])
def test_from_pretrained_loads_the_encoder_and_reports_the_head_as_new(checkpoint, cls, options, head):
    folder, encoder_weights = checkpoint
    model = cls.from_pretrained(folder, **options)
    assert model.new_parameter_names() == head
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_weights[name]), name
    groups = param_groups(model, lr=1e-4, weight_decay=0.01, lr_multiplier=10)
    scaled = {id(p) for g in groups if g["lr_scale"] == 10 for p in g["params"]}
    assert scaled == {id(p) for n, p in model.named_parameters() if n in head}


def test_from_pretrained_at_another_resolution_and_with_a_share_of_the_experts(checkpoint):
    folder, encoder_weights = checkpoint
    model = VQAModel.from_pretrained(folder, image_size=48, max_text_len=8, num_answers=5)
    assert model.config.image_size == 48 and model.encoder.image_pos.shape[1] == 10
    assert model.encoder.text_pos.shape[1] == 8

    placement = ExpertPlacement(CONFIG.num_experts, ep_size=2, ep_rank=1)
    model = RetrievalModel.from_pretrained(folder, placement=placement)
    local = model.encoder.state_dict()
    expert = "blocks.2.ffn.deepspeed_moe.experts.deepspeed_experts.{}.fc1.weight"
    assert expert.format(2) not in local
    assert torch.equal(local[expert.format(0)], encoder_weights[expert.format(2)])
    assert torch.equal(local[expert.format(1)], encoder_weights[expert.format(3)])


def _retrieval_rank(rank, port, features, image_ids, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = slice(rank * 3, rank * 3 + 3)
        weight = torch.nn.Parameter(torch.eye(4))
        image_features = gather_with_grad(features[0][local] @ weight)
        text_features = gather_with_grad(features[1][local] @ weight)
        loss = contrastive_loss(image_features @ text_features.t() / 0.1, image_ids)
        loss.backward()
        torch.distributed.all_reduce(weight.grad)  # data parallelism averages the ranks' gradients

        torch.manual_seed(0)
        model = RetrievalModel(CONFIG).eval()
        out = model(**{key: value[local] for key, value in retrieval_batch().items()})
        out["loss"].backward()
        if rank == 0:
            torch.save({"loss": loss.detach(), "grad": weight.grad / 2, "itc_loss": out["itc_loss"],
                        "itm_logits": out["itm_logits"]}, result_path)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_retrieval_over_two_ranks_matches_one_process(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = (torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator))
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    torch.multiprocessing.spawn(_retrieval_rank, args=(free_port(), features, image_ids, tmp_path / "rank0.pt"),
                                nprocs=2)
    weight = torch.nn.Parameter(torch.eye(4))
    loss = contrastive_loss((features[0] @ weight) @ (features[1] @ weight).t() / 0.1, image_ids)
    loss.backward()
    result = torch.load(tmp_path / "rank0.pt")
    torch.testing.assert_close(result["loss"], loss.detach())
    torch.testing.assert_close(result["grad"], weight.grad)

    # The model's contrastive loss on two ranks of three pairs is that of one process with all six.
    torch.manual_seed(0)
    whole = RetrievalModel(CONFIG).eval()(**retrieval_batch())
    torch.testing.assert_close(result["itc_loss"], whole["itc_loss"], rtol=1e-5, atol=1e-5)
    assert result["itm_logits"].shape == (9, 2)


def _bf16_masters_worker(folder, stage):
    """One rank: a bf16 engine's fp32 masters for the encoder, before and after starting them from the file."""
    from deepspeed.utils import safe_get_full_fp32_param
    from eve_ds.checkpoint.pretrained import load_pretrained, open_pretrained
    from eve_ds.engine import init_distributed, initialize
    from eve_ds.finetune.train import start_masters_from_pretrained

    init_distributed()
    placement = ExpertPlacement(CONFIG.num_experts)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": stage},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    model = VQAModel.from_pretrained(folder, placement=placement, ds_config=ds_config, num_answers=3)
    engine, _ = initialize(model, ds_config, placement)
    pretrained, _ = load_pretrained(folder)

    def largest_error():
        return max((safe_get_full_fp32_param(param) - pretrained[name]).abs().max().item()
                   for name, param in engine.module.named_parameters() if name.startswith("encoder."))

    rounded = largest_error()
    start_masters_from_pretrained(engine, model, open_pretrained(folder)[0], placement)
    print("RESULT " + json.dumps({"rounded": rounded, "restored": largest_error()}))


def one_rank(worker: str, folder, stage: int) -> dict:
    """Runs ``worker(folder, stage)`` of this module as one torch.distributed rank (gloo) in a process of its own;
    returns what it printed after RESULT."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    code = f"from tests.test_finetune_heads import {worker}; {worker}({str(folder)!r}, {stage})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT ")[-1])


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_fine_tuning_starts_its_masters_from_the_fp32_weights(checkpoint, stage):
    errors = one_rank("_bf16_masters_worker", checkpoint[0], stage)
    assert errors["rounded"] > 1e-5  # DeepSpeed made the masters from the bf16 weights
    assert errors["restored"] == 0.0


def _nlvr2_steps_worker(folder, stage):
    """One rank: three training steps of the bi-attention NLVR2 model (two encoder passes a step) on a fixed batch
    under ZeRO ``stage`` (at 3, every parameter partitioned); prints the losses."""
    from eve_ds.engine import init_distributed, initialize

    init_distributed()
    placement = ExpertPlacement(CONFIG.num_experts)
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    ds_config = {"train_micro_batch_size_per_gpu": 3, "train_batch_size": 3, "gradient_clipping": 3.0,
                 "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    torch.manual_seed(0)
    model = NLVR2Model.from_pretrained(folder, placement=placement, ds_config=ds_config)
    engine, _ = initialize(model, ds_config, placement, param_groups(model, 1e-3, 0.01, lr_multiplier=15))
    partitioned = all(param.numel() == 0 for param in model.parameters())
    losses = []
    for step in range(3):
        torch.manual_seed(step)  # the same dropout and gate sampling under either stage
        out = engine(**nlvr2_batch())
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
    print("RESULT " + json.dumps({"losses": losses, "partitioned": partitioned}))


@pytest.mark.distributed
def test_nlvr2_two_passes_train_under_zero3_as_under_zero2(checkpoint):
    """Under ZeRO-3 each of the two passes gathers the encoder's parameters in its forward, and the head's modules,
    run once per side, gather theirs at each call: the steps are ZeRO-2's."""
    results = {}
    for stage in (2, 3):
        results[stage] = one_rank("_nlvr2_steps_worker", checkpoint[0], stage)
    assert results[3]["partitioned"] and not results[2]["partitioned"]
    assert results[3]["losses"] == pytest.approx(results[2]["losses"], rel=1e-5)
    assert results[2]["losses"][-1] < results[2]["losses"][0]
