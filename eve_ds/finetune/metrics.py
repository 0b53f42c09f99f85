"""The metrics the EVE paper reports: VQA accuracy, NLVR2 accuracy, retrieval recall at K both ways.

Each takes plain predictions and labels (lists, or tensors on any device), so evaluation loops and
``tools/evaluate.py`` share them.
"""
from collections import Counter

import torch

# VQA's soft target of an answer given by n annotators (n = 1, 2, 3, 4 or more), as the authors train it.
VQA_SCORE_BY_COUNT = {1: 0.3, 2: 0.6, 3: 0.9}


def normalize_answer(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".").split())


def vqa_accuracy(predictions: list, annotator_answers: list) -> float:
    """Mean over questions of min(#annotators who gave the predicted answer / 3, 1)."""
    if len(predictions) != len(annotator_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(annotator_answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    scores = [min(Counter(map(normalize_answer, answers))[normalize_answer(prediction)] / 3, 1.0)
              for prediction, answers in zip(predictions, annotator_answers)]
    return sum(scores) / len(scores)


def vqa_soft_target(annotator_answers: list, answer_index: dict) -> tuple:
    """A question's annotators' answers -> ({answer id: soft score}, answers outside the answer list), with
    0.3 / 0.6 / 0.9 / 1.0 for answers given by 1 / 2 / 3 / 4 or more annotators."""
    counts = Counter(map(normalize_answer, annotator_answers))
    target = {answer_index[answer]: VQA_SCORE_BY_COUNT.get(count, 1.0)
              for answer, count in counts.items() if answer in answer_index}
    return target, sorted(answer for answer in counts if answer not in answer_index)


def accuracy(predictions, labels) -> float:
    """NLVR2's metric: the fraction of predicted labels equal to the true ones."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.shape != labels.shape or predictions.numel() == 0:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} do not match")
    return (predictions == labels).float().mean().item()


def retrieval_recall(scores, text_image, ks=(1, 5, 10), text_to_image_scores=None) -> dict:
    """Recall at K both ways from a [images, texts] score matrix (and another for text-to-image retrieval
    where the two differ, as after ``rerank``); ``text_image[t]`` is the image of text t (an image may have
    several texts). Image-to-text retrieval (``tr_r@k``) hits when any of the image's texts is in its top K;
    text-to-image (``ir_r@k``) when the text's image is. ``r_mean`` averages all of them."""
    scores, text_image = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(text_image)
    text_to_image_scores = scores if text_to_image_scores is None else torch.as_tensor(text_to_image_scores,
                                                                                        dtype=torch.float64)
    images, texts = scores.shape
    if text_image.shape != (texts, ) or int(text_image.min()) < 0 or int(text_image.max()) >= images:
        raise ValueError(f"text_image must name one of the {images} images for each of the {texts} texts")
    # Rank of each text's best-ranked true match, in each direction (0 = first).
    text_order = scores.argsort(dim=1, descending=True)  # per image, texts best first
    text_ranks = torch.full((images, ), texts, dtype=torch.long)
    for image in range(images):
        hits = (text_image[text_order[image]] == image).nonzero()
        if len(hits):
            text_ranks[image] = hits[0, 0]
    image_order = text_to_image_scores.t().argsort(dim=1, descending=True)  # per text, images best first
    image_ranks = (image_order == text_image[:, None]).float().argmax(dim=1)
    result = {}
    for k in ks:
        result[f"tr_r@{k}"] = 100.0 * (text_ranks < k).float().mean().item()
        result[f"ir_r@{k}"] = 100.0 * (image_ranks < k).float().mean().item()
    result["r_mean"] = sum(result.values()) / len(result)
    return result


def rerank(scores, pair_score, k_test: int = 128):
    """Re-ranks each image's top ``k_test`` texts and each text's top ``k_test`` images by ``pair_score(image
    indices, text indices) -> scores`` (the matching head), called once with every pair so that it can batch
    them and share them out over ranks; everything outside the top stays below them. Returns (image-to-text
    scores, text-to-image scores), both [images, texts], for retrieval_recall."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    images, texts = scores.shape
    texts_per_image, images_per_text = min(k_test, texts), min(k_test, images)
    top_texts = scores.topk(texts_per_image, dim=1).indices.reshape(-1)
    top_images = scores.t().topk(images_per_text, dim=1).indices.reshape(-1)
    image_indices = torch.cat([torch.arange(images).repeat_interleave(texts_per_image), top_images])
    text_indices = torch.cat([top_texts, torch.arange(texts).repeat_interleave(images_per_text)])
    pair_scores = torch.as_tensor(pair_score(image_indices, text_indices), dtype=torch.float64)
    split = images * texts_per_image
    floor = torch.finfo(torch.float64).min
    image_to_text, text_to_image = torch.full_like(scores, floor), torch.full_like(scores, floor)
    image_to_text[image_indices[:split], text_indices[:split]] = pair_scores[:split]
    text_to_image[image_indices[split:], text_indices[split:]] = pair_scores[split:]
    return image_to_text, text_to_image
