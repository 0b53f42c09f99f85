"""The tensors fine-tuning trains and evaluates on, from the records of ``annotations.py``: images decoded at the
task's resolution, text encoded by the caller's TextTokenizer (the authors' recipes use 40 tokens for every task).
"""
import random
from collections import Counter

import torch

from eve_ds.data.dataset import load_image, names_left_or_right
from eve_ds.finetune.annotations import (ANSWER_NOT_IN_LIST, QUESTION_WITHOUT_KNOWN_ANSWER, FinetuneDataError,
                                         VQAQuestion, answer_index)
from eve_ds.finetune.metrics import vqa_soft_target

TEXT_LENGTH = 40


def may_flip(question: VQAQuestion) -> bool:
    """The authors mirror a training image only when neither its question nor any answer names a side: a
    mirrored image would make them false."""
    return not any(map(names_left_or_right, (question.question, *question.answers)))


class VQADataset(torch.utils.data.Dataset):
    """Each item: {"images" [3, S, S], "text_ids", "text_padding_mask" [text length], "targets" [answers]
    (soft scores), "question_ids"}. In training, a question with no answer in the list is left out, and an
    image is mirrored with probability 1/2, drawn from (seed, epoch, index), when ``may_flip`` allows it."""

    def __init__(self, questions, answers: list, tokenizer, image_size: int, train: bool, seed: int = 0,
                 problems: Counter = None):
        self.tokenizer, self.image_size, self.train, self.seed = tokenizer, image_size, train, seed
        self.epoch, self.num_answers = 0, len(answers)
        self.problems = Counter(problems or {})
        index = answer_index(answers)
        self.questions, self.targets = [], []
        for question in questions:
            target, unknown = vqa_soft_target(question.answers, index)
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

    def __len__(self):
        return len(self.questions)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def flips(self, index: int) -> bool:
        if not self.train or not may_flip(self.questions[index]):
            return False
        return random.Random(f"{self.seed}:{self.epoch}:{index}").random() < 0.5

    def __getitem__(self, index: int) -> dict:
        question = self.questions[index]
        image = load_image(question.image_path, self.image_size)
        if self.flips(index):
            image = image.flip(-1)
        text_ids, padding_mask, _ = self.tokenizer.encode(question.question)
        targets = torch.zeros(self.num_answers)
        for answer, score in self.targets[index].items():
            targets[answer] = score
        return {"images": image, "text_ids": text_ids, "text_padding_mask": padding_mask, "targets": targets,
                "question_ids": question.question_id}


class NLVR2Dataset(torch.utils.data.Dataset):
    """Each item: {"images" [2, 3, S, S] (left, right), "text_ids", "text_padding_mask", "labels"}. Images are
    never mirrored: sentences name the left and right image."""

    def __init__(self, examples, tokenizer, image_size: int, problems: Counter = None):
        self.examples, self.tokenizer, self.image_size = list(examples), tokenizer, image_size
        self.problems = Counter(problems or {})

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        text_ids, padding_mask, _ = self.tokenizer.encode(example.sentence)
        images = torch.stack([load_image(example.left_image_path, self.image_size),
                              load_image(example.right_image_path, self.image_size)])
        return {"images": images, "text_ids": text_ids, "text_padding_mask": padding_mask, "labels": example.label}


class RetrievalTrainDataset(torch.utils.data.Dataset):
    """One item per caption: {"images", "text_ids", "text_padding_mask", "image_ids"}; the image id (its
    position in the split) tells which captions share an image, the positives of contrastive training."""

    def __init__(self, images, tokenizer, image_size: int, problems: Counter = None):
        self.images, self.tokenizer, self.image_size = list(images), tokenizer, image_size
        self.pairs = [(image_index, caption) for image_index, image in enumerate(self.images)
                      for caption in image.captions]
        self.problems = Counter(problems or {})

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_index, caption = self.pairs[index]
        text_ids, padding_mask, _ = self.tokenizer.encode(caption)
        return {"images": load_image(self.images[image_index].image_path, self.image_size), "text_ids": text_ids,
                "text_padding_mask": padding_mask, "image_ids": image_index}


class RetrievalEvalSet:
    """An evaluation split, to score every image against every caption: ``images`` (items {"images",
    "image_ids"}) and ``texts`` (items {"text_ids", "text_padding_mask", "image_ids"}) are datasets to
    encode once each, and ``text_image[t]`` is caption t's image, as ``retrieval_recall(scores [images,
    texts], text_image)`` takes it."""

    def __init__(self, images, tokenizer, image_size: int, problems: Counter = None):
        images = list(images)
        self.image_paths = [image.image_path for image in images]
        self.captions = [caption for image in images for caption in image.captions]
        self.text_image = torch.tensor([index for index, image in enumerate(images) for _ in image.captions])
        self.images = _ImageDataset(self.image_paths, image_size)
        self.texts = _CaptionDataset(self.captions, self.text_image, tokenizer)
        self.problems = Counter(problems or {})


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
