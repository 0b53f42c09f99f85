"""The three fine-tuning tasks as the job runs them: where their data is, which model they train, how they are
evaluated. Evaluation runs on every rank at once (expert parallelism needs every rank in every forward pass):
each rank takes an equal share of the items, padded where they do not divide, and the results are gathered.
"""
import argparse
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from eve_ds.checkpoint.pretrained import FINETUNING_TASKS, HeldModel
from eve_ds.data.augment import POLICIES
from eve_ds.errors import UsageError
from eve_ds.finetune.annotations import (VISUAL_GENOME, VQA_V2, VQASource, read_answer_list, read_karpathy, read_nlvr2,
                                         read_vqa)
from eve_ds.finetune.datasets import NLVR2Dataset, RetrievalEvalSet, RetrievalTrainDataset, VQADataset
from eve_ds.finetune.metrics import accuracy, rerank, retrieval_recall, vqa_accuracy
from eve_ds.finetune.nlvr2 import HEADS as NLVR2_HEADS
from eve_ds.finetune.recipes import task_augmentation
from eve_ds.trainer import to_device

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "data" / "finetune"
TASKS = FINETUNING_TASKS
MODELS = {task: HeldModel(task).model_class() for task in TASKS}
# Inputs of the datasets' items that are not the model's.
NOT_MODEL_INPUTS = ("question_ids", )
SOURCE_FORMS = "vqa:QUESTIONS:ANNOTATIONS:IMAGES[:IMAGE_NAME] or vg:QUESTION_ANSWERS:IMAGES"
SINGLE_SOURCE_OPTIONS = ("train_questions", "train_annotations", "train_images")

logger = logging.getLogger(__name__)


def parse_train_source(text: str) -> VQASource:
    """``vqa:QUESTIONS:ANNOTATIONS:IMAGES[:IMAGE_NAME]`` or ``vg:QUESTION_ANSWERS:IMAGES``; an image-name template
    keeps its colons (``COCO_{folder}_{image_id:012d}.jpg``)."""
    dataset, _, rest = text.partition(":")
    parts = rest.split(":", 3) if dataset == VQA_V2 else rest.split(":")
    if dataset == VQA_V2 and len(parts) >= 3 and all(parts[:3]):
        questions, annotations, images = map(Path, parts[:3])
        return VQASource(VQA_V2, questions, images, annotations, parts[3] if len(parts) == 4 and parts[3] else None)
    if dataset == VISUAL_GENOME and len(parts) == 2 and all(parts):
        return VQASource(VISUAL_GENOME, Path(parts[0]), Path(parts[1]))
    raise argparse.ArgumentTypeError(f"'{text}' is not {SOURCE_FORMS}")


def add_data_arguments(parser):
    """Each task's annotation files and image folders (the defaults are the shipped tiny examples), the text
    normalisation, the training images' augmentation and NLVR2's head."""
    vqa, nlvr2, retrieval = EXAMPLES / "vqa", EXAMPLES / "nlvr2", EXAMPLES / "retrieval"
    group = parser.add_argument_group("VQA v2 data (official layout), Visual Genome QA for training")
    group.add_argument("--train-questions", help="the training split's questions (default: the shipped example's)")
    group.add_argument("--train-annotations", help="the training split's annotations (default: the example's)")
    group.add_argument("--train-images", help="image folder of the training split (default: the example's)")
    group.add_argument("--train-source", action="append", type=parse_train_source, metavar="SOURCE",
                       help=f"a set of training questions, {SOURCE_FORMS}; repeat it to train on all of them, in the "
                            "order given (the authors: VQA v2 train, val and Visual Genome QA), in place of "
                            "--train-questions/--train-annotations/--train-images. IMAGE_NAME defaults to "
                            "--image-name; QUESTION_ANSWERS is VG's question_answers.json, its images "
                            "IMAGES/VG_100K/<image id>.jpg or IMAGES/VG_100K_2/<image id>.jpg")
    group.add_argument("--val-questions", default=str(vqa / "v2_OpenEnded_shapes_val_questions.json"))
    group.add_argument("--val-annotations", default=str(vqa / "v2_shapes_val_annotations.json"),
                       help="'' for a split without answers (test-dev): tools/evaluate.py then writes the results "
                            "file for the evaluation server")
    group.add_argument("--val-images", default=str(vqa / "images/val"))
    group.add_argument("--answer-list", default=str(vqa / "answer_list.json"), help="JSON list of the answers")
    group.add_argument("--image-name", default="shapes_{folder}_{image_id:06d}.png",
                       help="VQA v2 image file name template, {folder} the image folder's name (COCO: "
                            "'COCO_{folder}_{image_id:012d}.jpg')")
    group = parser.add_argument_group("NLVR2 data (official layout)")
    group.add_argument("--nlvr2-train", default=str(nlvr2 / "train.json"))
    group.add_argument("--nlvr2-train-images", default=str(nlvr2 / "images/train"))
    group.add_argument("--nlvr2-val", default=str(nlvr2 / "dev.json"))
    group.add_argument("--nlvr2-val-images", default=str(nlvr2 / "images/dev"))
    parser.add_argument("--nlvr2-head", default="biattn", choices=NLVR2_HEADS,
                        help="NLVR2's head: the authors' bi-attention between the two encodings (their --biattn, "
                             "their recipe's) or their MLP on the two text [CLS] states")
    group = parser.add_argument_group("retrieval data (Karpathy split JSON)")
    group.add_argument("--karpathy", default=str(retrieval / "dataset_shapes.json"))
    group.add_argument("--karpathy-images", default=str(retrieval), help="the folder 'filepath' is relative to")
    group.add_argument("--eval-split", default="val", choices=("val", "test"))
    parser.add_argument("--normalize-text", action=argparse.BooleanOptionalAction, default=True,
                        help="normalise questions, sentences and captions as the authors' fine-tuning does (lower "
                             "case, punctuation removed, their word limits); --no-normalize-text keeps them as written")
    parser.add_argument("--augmentation", default="recipe", choices=("recipe", ) + POLICIES,
                        help="training images (eve_ds/data/augment.py): 'rand', the authors' RandomAugment (random "
                             "resized crop, then 2 of 10 ops, each applied with probability 1/2, at magnitude 7 of "
                             "10); 'color', their colour jitter (crop, then brightness, contrast and saturation by "
                             "0.6-1.4 in a random order); 'none', resized whole. Every one mirrors an image half the "
                             "time where its text names no side; evaluation images are resized whole. Default: the "
                             "recipe's (rand for VQA and NLVR2, color for retrieval)")


@dataclass
class Task:
    name: str
    train: torch.utils.data.Dataset
    evaluation: object  # what ``evaluate`` reads: a dataset, or a RetrievalEvalSet
    problems: Counter
    head_options: dict


def load_task(name: str, args, tokenizer, image_size: int, seed: int, split: str = "val") -> Task:
    """The task's training set and evaluation split (``split``: "val" or, for retrieval, "test"). Training images
    are augmented as --augmentation says, where it says "recipe" as the recipe of --recipe (where ``args`` has it)
    or of the task does, with draws from (``seed``, epoch, index)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose one of {', '.join(TASKS)}")
    normalize_text, augmentation = args.normalize_text, getattr(args, "augmentation", "recipe")
    if augmentation == "recipe":
        augmentation = task_augmentation(name, getattr(args, "recipe", None))
    logger.info("%s training images: augmentation %s", name, augmentation)
    if name == "vqa":
        answers = read_answer_list(args.answer_list)
        train_set = _vqa_training_set(args, answers, tokenizer, image_size, seed, augmentation)
        evaluation, val_problems = read_vqa(args.val_questions, args.val_images, args.val_annotations or None,
                                            args.image_name)
        val_set = VQADataset(evaluation, answers, tokenizer, image_size, train=False, problems=val_problems,
                             normalize_text=normalize_text)
        val_set.answers = answers
        return Task(name, train_set, val_set, train_set.problems + val_set.problems, {"num_answers": len(answers)})
    if name == "nlvr2":
        train, train_problems = read_nlvr2(args.nlvr2_train, args.nlvr2_train_images)
        evaluation, val_problems = read_nlvr2(args.nlvr2_val, args.nlvr2_val_images)
        train_set = NLVR2Dataset(train, tokenizer, image_size, train_problems, normalize_text=normalize_text,
                                 train=True, seed=seed, augmentation=augmentation)
        val_set = NLVR2Dataset(evaluation, tokenizer, image_size, val_problems, normalize_text=normalize_text)
        return Task(name, train_set, val_set, train_set.problems + val_set.problems, {"head": args.nlvr2_head})
    if name == "retrieval":
        train, train_problems = read_karpathy(args.karpathy, args.karpathy_images, "train")
        evaluation, val_problems = read_karpathy(args.karpathy, args.karpathy_images, split)
        train_set = RetrievalTrainDataset(train, tokenizer, image_size, train_problems, normalize_text=normalize_text,
                                          seed=seed, augmentation=augmentation)
        val_set = RetrievalEvalSet(evaluation, tokenizer, image_size, val_problems, normalize_text=normalize_text)
        return Task(name, train_set, val_set, train_set.problems + val_set.problems, {})


def vqa_train_sources(args) -> list:
    """--train-source's sources, or else the one VQA v2 split of --train-questions, --train-annotations and
    --train-images (each the shipped example's where not given)."""
    given = [f"--{name.replace('_', '-')}" for name in SINGLE_SOURCE_OPTIONS if getattr(args, name) is not None]
    if args.train_source:
        if given:
            raise UsageError(f"{' and '.join(given)} and --train-source both name VQA training data; give that split "
                             "as one more --train-source vqa:QUESTIONS:ANNOTATIONS:IMAGES")
        if len(set(args.train_source)) < len(args.train_source):
            raise UsageError("a --train-source is given twice")
        return list(args.train_source)
    vqa = EXAMPLES / "vqa"
    return [VQASource(VQA_V2, Path(args.train_questions or vqa / "v2_OpenEnded_shapes_train_questions.json"),
                      Path(args.train_images or vqa / "images/train"),
                      Path(args.train_annotations or vqa / "v2_shapes_train_annotations.json"))]


def _vqa_training_set(args, answers: list, tokenizer, image_size: int, seed: int, augmentation: str) -> VQADataset:
    """One training set of every source's questions (``vqa_train_sources``), in order; logs each source's count of
    questions, read and kept."""
    questions, problems, counts = [], Counter(), []
    for source in vqa_train_sources(args):
        read, skipped = source.read(args.image_name)
        questions += read
        problems += skipped
        counts.append((source, len(read), skipped))
    train_set = VQADataset(questions, answers, tokenizer, image_size, train=True, seed=seed, problems=problems,
                           normalize_text=args.normalize_text, augmentation=augmentation)
    kept = Counter(question.source for question in train_set.questions)
    for source, read, skipped in counts:
        logger.info("VQA training source %s %s: %d questions, %d with an answer in the list (skipped at reading: %s)",
                    source.dataset, source.questions, read, kept[str(source.questions)], dict(skipped) or "none")
    return train_set


def model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}


def _world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def sharded_map(function, count: int, batch_size: int, device) -> torch.Tensor:
    """``function(indices) -> [len(indices), ...] tensor`` over range(count), shared out over the ranks in equal
    numbers of equal batches (the last items repeated where they do not divide); returns every rank's results in
    order, [count, ...], on every rank."""
    rank, world_size = _world()
    share = math.ceil(count / world_size)
    batches = math.ceil(share / batch_size)
    indices = torch.arange(rank * share, rank * share + batches * batch_size).clamp(max=count - 1)
    mine = torch.cat([function(chunk).to(device) for chunk in indices.split(batch_size)])
    if world_size == 1:
        return mine[:count]
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return torch.cat([part[:share] for part in everyone])[:count]


def _collate(dataset, indices) -> dict:
    return torch.utils.data.default_collate([dataset[int(index)] for index in indices])


@torch.no_grad()
def evaluate(task: Task, engine, batch_size: int, k_test: int = 128) -> dict:
    """The task's metrics on its evaluation split: VQA accuracy (and the predicted answers), NLVR2 accuracy,
    retrieval recall at 1/5/10 both ways, with and without re-ranking by the matching head."""
    model = engine.module
    was_training = model.training
    model.eval()
    try:
        return _EVALUATORS[task.name](task, model, engine, batch_size, k_test)
    finally:
        model.train(was_training)


def _predictions(task, model, engine, batch_size) -> torch.Tensor:
    def predict(indices):
        batch = _collate(task.evaluation, indices)
        return model(**to_device(model_inputs({key: value for key, value in batch.items()
                                               if key not in ("targets", "labels")}), engine))["prediction"]
    return sharded_map(predict, len(task.evaluation), batch_size, engine.device).cpu()


def _evaluate_vqa(task, model, engine, batch_size, k_test) -> dict:
    dataset = task.evaluation
    predicted = [dataset.answers[index] for index in _predictions(task, model, engine, batch_size).tolist()]
    results = [{"question_id": question.question_id, "answer": answer}
               for question, answer in zip(dataset.questions, predicted)]
    metrics = {"results": results}
    if all(question.answers for question in dataset.questions):
        metrics["vqa_accuracy"] = 100.0 * vqa_accuracy(predicted, [question.answers for question in dataset.questions])
    return metrics


def _evaluate_nlvr2(task, model, engine, batch_size, k_test) -> dict:
    labels = [example.label for example in task.evaluation.examples]
    return {"accuracy": 100.0 * accuracy(_predictions(task, model, engine, batch_size), labels)}


def _evaluate_retrieval(task, model, engine, batch_size, k_test) -> dict:
    evaluation, device = task.evaluation, engine.device
    images = sharded_map(lambda indices: model.image_embeddings(**to_device(
        {"images": _collate(evaluation.images, indices)["images"]}, engine)), len(evaluation.images), batch_size,
        device)
    texts = sharded_map(lambda indices: model.text_embeddings(**to_device(
        {key: value for key, value in _collate(evaluation.texts, indices).items() if key != "image_ids"}, engine)),
        len(evaluation.texts), batch_size, device)
    scores = (images @ texts.t()).cpu()
    metrics = {f"itc_{key}": value for key, value in retrieval_recall(scores, evaluation.text_image).items()}

    def pair_score(image_indices, text_indices):
        def score(chunk):
            image_batch = _collate(evaluation.images, image_indices[chunk])
            text_batch = _collate(evaluation.texts, text_indices[chunk])
            return model.match_scores(**to_device({"images": image_batch["images"], "text_ids": text_batch["text_ids"],
                                                   "text_padding_mask": text_batch["text_padding_mask"]}, engine))
        return sharded_map(score, len(image_indices), batch_size, device).cpu()

    image_to_text, text_to_image = rerank(scores, pair_score, k_test)
    metrics.update(retrieval_recall(image_to_text, evaluation.text_image, text_to_image_scores=text_to_image))
    return metrics


_EVALUATORS = {"vqa": _evaluate_vqa, "nlvr2": _evaluate_nlvr2, "retrieval": _evaluate_retrieval}


def write_vqa_results(path, results: list):
    """The file VQA's evaluation server takes: [{"question_id": ..., "answer": ...}, ...]."""
    Path(path).write_text(json.dumps(results) + "\n")
