"""The tensors fine-tuning trains and evaluates on, from the records of ``annotations.py``: images decoded at the
task's resolution, text normalised as the authors' fine-tuning does (``eve_ds/data/text.py``; ``normalize_text``
False keeps it as written) and encoded by the caller's TextTokenizer (the authors' recipes use 40 tokens for every
task).

Training images are augmented by a policy of ``eve_ds/data/augment.py`` ("rand": the authors' RandomAugment,
"color": their colour jitter, "none": resized whole), each after a random resized crop but for "none"; evaluation
images are resized whole. A training image is mirrored with probability 1/2 where its text names no side
(``text.may_mirror``: VQA's question and answers, NLVR2's sentence, a retrieval caption, each as written). Every
draw is a function of (seed, epoch, index) and, for NLVR2, the image's slot (0 left, 1 right): the flip from
``random.Random("seed:epoch:index[:slot]")``, the augmentation from that key followed by ":augment". ``set_epoch``
sets the epoch (the fine-tuning loop calls it for every item it asks for).
"""
import random
from collections import Counter
from dataclasses import replace

import torch

from eve_ds.data.augment import POLICIES, TrainingAugmentation
from eve_ds.data.dataset import load_image
from eve_ds.data.text import EmptyText, may_mirror, pre_caption, pre_question
from eve_ds.finetune.annotations import (ANSWER_NOT_IN_LIST, EMPTY_ONCE_NORMALISED, IMAGE_WITHOUT_CAPTIONS,
                                         QUESTION_WITHOUT_KNOWN_ANSWER, VISUAL_GENOME, FinetuneDataError, VQAQuestion,
                                         answer_index)
from eve_ds.finetune.metrics import vqa_soft_target

TEXT_LENGTH = 40
# The authors' word limits (their dataset classes): VQA questions 30 words in training, 50 in evaluation; NLVR2
# sentences 40; retrieval captions 30, in training and evaluation.
VQA_TRAIN_WORDS, VQA_EVAL_WORDS, NLVR2_WORDS, RETRIEVAL_WORDS = 30, 50, 40, 30
# The authors' soft score of a Visual Genome answer (their vqa_dataset: a "vg" row's one answer weighs 1.0), where
# one VQA v2 annotator's answer scores 0.3.
VG_ANSWER_SCORE = 1.0


def may_flip(question: VQAQuestion) -> bool:
    """A training image is mirrored only when neither its question nor any answer names a side, as written
    (``text.may_mirror``): a mirrored image would make them false."""
    return may_mirror(question.question, *question.answers)


def soft_target(question: VQAQuestion, answer_index: dict) -> tuple:
    """({answer id: soft score}, answers outside the list) of a question: VQA v2's 0.3 / 0.6 / 0.9 / 1.0 by the
    number of annotators (``metrics.vqa_soft_target``), VG_ANSWER_SCORE for a Visual Genome answer."""
    target, unknown = vqa_soft_target(question.answers, answer_index)
    if question.dataset == VISUAL_GENOME:
        target = {answer: VG_ANSWER_SCORE for answer in target}
    return target, unknown


def _normalised_captions(images, max_words: int, normalize_text: bool, problems: Counter) -> list:
    """[(image with its captions normalised, those captions as written)]; a caption left empty is dropped, and an
    image left without captions too, each counted in ``problems``."""
    if not normalize_text:
        return [(image, image.captions) for image in images]
    kept = []
    for image in images:
        captions, written = [], []
        for caption in image.captions:
            try:
                captions.append(pre_caption(caption, max_words))
                written.append(caption)
            except EmptyText:
                problems[EMPTY_ONCE_NORMALISED] += 1
        if captions:
            kept.append((replace(image, captions=tuple(captions)), tuple(written)))
        else:
            problems[IMAGE_WITHOUT_CAPTIONS] += 1
    return kept


def _require_some(items: list, what: str, problems: Counter) -> list:
    if not items:
        raise FinetuneDataError(f"no {what} left (problems: {dict(problems)})")
    return items


class _TrainingImages:
    """The random side of a dataset's images (the module's docstring): in training, augmented by ``augmentation``
    and mirrored where allowed, from draws of (seed, epoch, index[, slot]); else resized whole."""

    def __init__(self, image_size: int, train: bool, seed: int, augmentation: str):
        if augmentation not in POLICIES:
            raise ValueError(f"unknown augmentation '{augmentation}'; choose one of {', '.join(POLICIES)}")
        self.image_size, self.train, self.seed, self.augmentation = image_size, train, seed, augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _draws(self, index: int, *key) -> random.Random:
        return random.Random(":".join(str(part) for part in (self.seed, self.epoch, index, *key)))

    def _flips(self, index: int, allowed: bool, *slot) -> bool:
        return self.train and allowed and self._draws(index, *slot).random() < 0.5

    def _image(self, path, index: int, flip: bool, *slot) -> torch.Tensor:
        if not self.train:
            return load_image(path, self.image_size)
        return load_image(path, self.image_size,
                          TrainingAugmentation(self.augmentation, self._draws(index, *slot, "augment"), flip))


class VQADataset(_TrainingImages, torch.utils.data.Dataset):
    """Each item: {"images" [3, S, S], "text_ids", "text_padding_mask" [text length], "targets" [answers]
    (soft scores, ``soft_target``), "question_ids"}. In training, a question with no answer in the list is left
    out, images are augmented (``augmentation``, the authors' "rand"; the default "none" resizes them whole) and
    mirrored with probability 1/2 where ``may_flip`` allows it (``flips``). Questions are normalised by
    ``pre_question`` to VQA_TRAIN_WORDS words in training, VQA_EVAL_WORDS else."""

    def __init__(self, questions, answers: list, tokenizer, image_size: int, train: bool, seed: int = 0,
                 problems: Counter = None, normalize_text: bool = True, augmentation: str = "none"):
        super().__init__(image_size, train, seed, augmentation)
        self.tokenizer, self.num_answers = tokenizer, len(answers)
        self.problems = Counter(problems or {})
        index = answer_index(answers)
        self.questions, self.targets = [], []
        for question in questions:
            target, unknown = soft_target(question, index)
            if unknown:
                self.problems[ANSWER_NOT_IN_LIST] += len(unknown)
            if train and not target:
                self.problems[QUESTION_WITHOUT_KNOWN_ANSWER] += 1
                continue
            self.questions.append(question)
            self.targets.append(target)
        if not self.questions:
            raise FinetuneDataError(f"no question to {'train' if train else 'evaluate'} on (problems: "
                                    f"{dict(self.problems)})")
        max_words = VQA_TRAIN_WORDS if train else VQA_EVAL_WORDS
        self.texts = [pre_question(question.question, max_words) if normalize_text else question.question
                      for question in self.questions]

    def __len__(self):
        return len(self.questions)

    def flips(self, index: int) -> bool:
        return self._flips(index, may_flip(self.questions[index]))

    def __getitem__(self, index: int) -> dict:
        question = self.questions[index]
        image = self._image(question.image_path, index, self.flips(index))
        text_ids, padding_mask, _ = self.tokenizer.encode(self.texts[index])
        targets = torch.zeros(self.num_answers)
        for answer, score in self.targets[index].items():
            targets[answer] = score
        return {"images": image, "text_ids": text_ids, "text_padding_mask": padding_mask, "targets": targets,
                "question_ids": question.question_id}


class NLVR2Dataset(_TrainingImages, torch.utils.data.Dataset):
    """Each item: {"images" [2, 3, S, S] (left, right), "text_ids", "text_padding_mask", "labels"}. In training
    (``train``), each image is augmented on its own (``augmentation``, the authors' "rand"; the default "none"
    resizes them whole) and mirrored with probability 1/2 where the sentence as written names no side (``flips``;
    the authors mirror each image whatever it says). Sentences are normalised by ``pre_caption`` to NLVR2_WORDS
    words; an example whose sentence that leaves empty is left out, counted."""

    def __init__(self, examples, tokenizer, image_size: int, problems: Counter = None, normalize_text: bool = True,
                 train: bool = False, seed: int = 0, augmentation: str = "none"):
        super().__init__(image_size, train, seed, augmentation)
        self.tokenizer = tokenizer
        self.problems = Counter(problems or {})
        self.examples, self.sentences = [], []
        for example in examples:
            try:
                sentence = pre_caption(example.sentence, NLVR2_WORDS) if normalize_text else example.sentence
            except EmptyText:
                self.problems[EMPTY_ONCE_NORMALISED] += 1
                continue
            self.examples.append(example)
            self.sentences.append(sentence)
        _require_some(self.examples, "NLVR2 example", self.problems)

    def __len__(self):
        return len(self.examples)

    def flips(self, index: int, slot: int) -> bool:
        """Whether image ``slot`` (0 left, 1 right) of example ``index`` is mirrored this epoch."""
        return self._flips(index, may_mirror(self.examples[index].sentence), slot)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        text_ids, padding_mask, _ = self.tokenizer.encode(self.sentences[index])
        images = torch.stack([self._image(path, index, self.flips(index, slot), slot)
                              for slot, path in enumerate((example.left_image_path, example.right_image_path))])
        return {"images": images, "text_ids": text_ids, "text_padding_mask": padding_mask, "labels": example.label}


class RetrievalTrainDataset(_TrainingImages, torch.utils.data.Dataset):
    """One item per caption: {"images", "text_ids", "text_padding_mask", "image_ids"}; the image id (its
    position in the split) tells which captions share an image, the positives of contrastive training. Images are
    augmented (``augmentation``, the authors' "color"; the default "none" resizes them whole) and mirrored with
    probability 1/2 where the item's caption as written names no side (``flips``). Captions are normalised by
    ``pre_caption`` to RETRIEVAL_WORDS words (``_normalised_captions``)."""

    def __init__(self, images, tokenizer, image_size: int, problems: Counter = None, normalize_text: bool = True,
                 seed: int = 0, augmentation: str = "none"):
        super().__init__(image_size, True, seed, augmentation)
        self.tokenizer = tokenizer
        self.problems = Counter(problems or {})
        kept = _normalised_captions(images, RETRIEVAL_WORDS, normalize_text, self.problems)
        self.images = [image for image, _ in kept]
        self.pairs = [(image_index, caption) for image_index, image in enumerate(self.images)
                      for caption in image.captions]
        self.mirrorable = [may_mirror(caption) for _, written in kept for caption in written]
        _require_some(self.pairs, "caption", self.problems)

    def __len__(self):
        return len(self.pairs)

    def flips(self, index: int) -> bool:
        return self._flips(index, self.mirrorable[index])

    def __getitem__(self, index: int) -> dict:
        image_index, caption = self.pairs[index]
        text_ids, padding_mask, _ = self.tokenizer.encode(caption)
        return {"images": self._image(self.images[image_index].image_path, index, self.flips(index)),
                "text_ids": text_ids, "text_padding_mask": padding_mask, "image_ids": image_index}


class RetrievalEvalSet:
    """An evaluation split, to score every image against every caption: ``images`` (items {"images",
    "image_ids"}) and ``texts`` (items {"text_ids", "text_padding_mask", "image_ids"}) are datasets to
    encode once each, and ``text_image[t]`` is caption t's image, as ``retrieval_recall(scores [images,
    texts], text_image)`` takes it. Captions are normalised as in training."""

    def __init__(self, images, tokenizer, image_size: int, problems: Counter = None, normalize_text: bool = True):
        self.problems = Counter(problems or {})
        images = _require_some([image for image, _ in _normalised_captions(images, RETRIEVAL_WORDS, normalize_text,
                                                                           self.problems)], "image", self.problems)
        self.image_paths = [image.image_path for image in images]
        self.captions = [caption for image in images for caption in image.captions]
        self.text_image = torch.tensor([index for index, image in enumerate(images) for _ in image.captions])
        self.images = _ImageDataset(self.image_paths, image_size)
        self.texts = _CaptionDataset(self.captions, self.text_image, tokenizer)


class _ImageDataset(torch.utils.data.Dataset):

    def __init__(self, image_paths: list, image_size: int):
        self.image_paths, self.image_size = image_paths, image_size

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        return {"images": load_image(self.image_paths[index], self.image_size), "image_ids": index}


class _CaptionDataset(torch.utils.data.Dataset):

    def __init__(self, captions: list, text_image: torch.Tensor, tokenizer):
        self.captions, self.text_image, self.tokenizer = captions, text_image, tokenizer

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        text_ids, padding_mask, _ = self.tokenizer.encode(self.captions[index])
        return {"text_ids": text_ids, "text_padding_mask": padding_mask,
                "image_ids": int(self.text_image[index])}
