"""The fine-tuning metrics on small cases worked out by hand."""
import pytest
import torch

from eve_ds.finetune.metrics import accuracy, rerank, retrieval_recall, vqa_accuracy, vqa_soft_target


def test_vqa_accuracy_counts_annotators_up_to_three():
    annotators = [["red"] * 4 + ["blue"] * 6,  # "red": 4 annotators -> 1
                  ["two"] * 2 + ["three"] * 8,  # "two": 2 -> 2/3
                  ["yes"] + ["no"] * 9,  # "yes": 1 -> 1/3
                  ["cat"] * 10]  # "dog": none -> 0
    assert vqa_accuracy(["Red", "two", "yes.", "dog"], annotators) == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4)
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        vqa_accuracy(["a", "b"], [["a"]])


def test_vqa_soft_targets_and_answers_outside_the_list():
    index = {"red": 0, "blue": 1, "green": 2}
    target, outside = vqa_soft_target(["red", "red", "red", "red", "blue", "blue", "green", "teal", "Teal"], index)
    assert target == {0: 1.0, 1: 0.6, 2: 0.3}
    assert outside == ["teal"]


def test_nlvr2_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="do not match"):
        accuracy([1, 0], [1])


def test_retrieval_recall_with_several_captions_per_image():
    # 3 images, 5 texts: texts 0, 1 show image 0; texts 2, 3 image 1; text 4 image 2.
    text_image = [0, 0, 1, 1, 2]
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.0, 0.0],   # image 0: best text 1 (its own) -> hit at 1
                           [0.7, 0.0, 0.1, 0.6, 0.0],   # image 1: texts 0 (wrong), 3 (own) -> hit at 2
                           [0.0, 0.0, 0.0, 0.5, 0.4]])  # image 2: texts 3 (wrong), 4 (own) -> hit at 2
    result = retrieval_recall(scores, text_image, ks=(1, 2))
    assert result["tr_r@1"] == pytest.approx(100 / 3) and result["tr_r@2"] == 100.0
    # Per text, its image's rank: text 0 -> image 1 first (miss at 1), 1 -> 0, 2 -> 0 first (miss), 3 -> 1, 4 -> 2.
    assert result["ir_r@1"] == pytest.approx(60.0) and result["ir_r@2"] == 100.0
    assert result["r_mean"] == pytest.approx((100 / 3 + 100 + 60 + 100) / 4)
    with pytest.raises(ValueError, match="one of the 3 images"):
        retrieval_recall(scores, [0, 0, 1, 1, 3])


def test_reranking_reorders_only_the_top_k():
    text_image = [0, 1, 2]
    scores = torch.tensor([[0.5, 0.9, 0.1],    # the dual encoder ranks image 0's text second
                           [0.1, 0.8, 0.7],
                           [0.9, 0.5, 0.05]])  # and image 2's text last: outside a top 2, both ways
    assert retrieval_recall(scores, text_image, ks=(1, ))["tr_r@1"] == pytest.approx(100 / 3)
    matching = lambda images, texts: (torch.as_tensor(images) == torch.as_tensor(texts)).double()  # noqa: E731
    image_to_text, text_to_image = rerank(scores, matching, k_test=2)
    result = retrieval_recall(image_to_text, text_image, ks=(1, 2), text_to_image_scores=text_to_image)
    assert result["tr_r@1"] == pytest.approx(200 / 3)  # images 0 and 1 fixed; image 2's text was not a candidate
    assert result["tr_r@2"] == pytest.approx(200 / 3)
    assert result["ir_r@1"] == pytest.approx(200 / 3)  # text 2's image (2) was not among its top 2 either
