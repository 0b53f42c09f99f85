"""Tests for eve_ds/finetune/annotations.py (readers of VQA v2, Visual Genome QA, NLVR2 and Karpathy-split files),
eve_ds/finetune/datasets.py (their tensors) and the data options of eve_ds/finetune/tasks.py; the shipped tiny
examples: test_finetune_examples.py."""
import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from eve_ds.data.dataset import load_image
from eve_ds.data.text import pre_caption, pre_question
from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.errors import ArgumentParser, UsageError
from eve_ds.finetune.annotations import (VISUAL_GENOME, VQA_V2, CaptionedImage, FinetuneDataError, NLVR2Example,
                                         VQAQuestion, VQASource, answer_index, build_answer_list, read_answer_list,
                                         read_karpathy, read_nlvr2, read_visual_genome_qa, read_vqa)
from eve_ds.finetune.datasets import (TEXT_LENGTH, NLVR2Dataset, RetrievalEvalSet, RetrievalTrainDataset, VQADataset,
                                      may_flip)
from eve_ds.finetune.metrics import retrieval_recall
from eve_ds.finetune.tasks import EXAMPLES, add_data_arguments, load_task, vqa_train_sources
from tests.conftest import SHAPES

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(SHAPES / "tokenizer.json", max_len=TEXT_LENGTH)


def write_image(path: Path, left=(200, 30, 30), right=(30, 30, 200), image_format="PNG") -> Path:
    """A 16-pixel image whose two halves differ, so that a mirrored copy does not equal it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (16, 16), left)
    image.paste(right, (8, 0, 16, 16))
    image.save(path, format=image_format)
    return path


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def coco_image(root: Path, image_id: int) -> Path:
    return write_image(root / f"COCO_{root.name}_{image_id:012d}.jpg", image_format="JPEG")


def annotation(question_id: int, answers: list) -> dict:
    return {"question_id": question_id, "image_id": 0, "answers": [{"answer": a, "answer_id": n}
                                                                   for n, a in enumerate(answers, 1)]}


# ---------------------------------------------------------------- VQA v2


def test_read_vqa_joins_questions_with_annotations_and_finds_coco_images(tmp_path):
    root = tmp_path / "train2014"
    coco_image(root, 9), coco_image(root, 25)
    questions = write_json(tmp_path / "questions.json", {"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "What is on the plate?", "question_id": 9000},
        {"image_id": 25, "question": "How many giraffes?", "question_id": 25000},
    ]})
    annotations = write_json(tmp_path / "annotations.json", {"annotations": [
        annotation(25000, ["2"] * 10), annotation(9000, ["pizza"] * 9 + ["food"])]})

    records, problems = read_vqa(questions, root, annotations)

    assert problems == Counter()
    assert records == [
        VQAQuestion(9000, root / "COCO_train2014_000000000009.jpg", "What is on the plate?",
                    ("pizza", ) * 9 + ("food", )),
        VQAQuestion(25000, root / "COCO_train2014_000000000025.jpg", "How many giraffes?", ("2", ) * 10),
    ]


def test_read_vqa_without_annotations_reads_test_dev_with_its_own_image_names(tmp_path):
    write_image(tmp_path / "test" / "img_7.png")
    questions = write_json(tmp_path / "test-dev.json", {"questions": [
        {"image_id": 7, "question": "Is it raining?", "question_id": 70}]})

    records, problems = read_vqa(questions, tmp_path / "test", image_name="img_{image_id}.png")

    assert records == [VQAQuestion(70, tmp_path / "test" / "img_7.png", "Is it raining?", ())]
    assert problems == Counter()


def test_answer_list_is_read_normalised_in_its_own_order(tmp_path):
    path = write_json(tmp_path / "answer_list.json", ["Yes", "no ", "2", "Yes."])
    answers = read_answer_list(path)
    assert answers == ["yes", "no", "2", "yes"]  # kept as long as the head it indexes
    assert answer_index(answers) == {"yes": 0, "no": 1, "2": 2}


def test_build_answer_list_keeps_frequent_answers_most_frequent_first():
    questions = [VQAQuestion(1, Path(), "q", ("Red", "red", "blue", "green")),
                 VQAQuestion(2, Path(), "q", ("blue", "red.", "yellow", "green"))]
    assert build_answer_list(questions, min_count=2) == ["red", "blue", "green"]
    assert build_answer_list(questions, min_count=1) == ["red", "blue", "green", "yellow"]


def test_vqa_items_carry_soft_targets_over_the_answer_list(tmp_path, tokenizer):
    image = write_image(tmp_path / "a.png")
    answers = ["yes", "no", "2", "maybe", "blue"]
    question = VQAQuestion(5, image, "Is it red?", ("Yes.", "yes", "yes ", "YES") + ("no", ) * 3 + ("maybe", ) * 2
                           + ("2", ))

    item = VQADataset([question], answers, tokenizer, IMAGE_SIZE, train=True)[0]

    assert torch.allclose(item["targets"], torch.tensor([1.0, 0.9, 0.3, 0.6, 0.0]))
    assert item["images"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert item["text_ids"].shape == item["text_padding_mask"].shape == (TEXT_LENGTH, )
    assert item["text_padding_mask"].dtype == torch.bool and item["question_ids"] == 5


def test_flip_rule_never_mirrors_a_question_or_answer_naming_a_side(tmp_path, tokenizer):
    image = write_image(tmp_path / "a.png")
    questions = [VQAQuestion(1, image, "What is on the left?", ("dog", )),
                 VQAQuestion(2, image, "Where is the dog?", ("on the Right", )),
                 VQAQuestion(3, image, "What is on the rightmost shelf?", ("dog", )),
                 VQAQuestion(4, image, "Where is the dog?", ("LEFTMOST", "dog")),
                 VQAQuestion(5, image, "Is the sky bright?", ("yes", ))]  # "bright" names no side
    answers = ["dog", "on the right", "yes", "leftmost"]
    dataset = VQADataset(questions, answers, tokenizer, IMAGE_SIZE, train=True, seed=3)
    unflipped = load_image(image, IMAGE_SIZE)
    flips = {index: [] for index in range(5)}
    for epoch in range(16):
        dataset.set_epoch(epoch)
        for index in range(5):
            flips[index].append(dataset.flips(index))
            expected = unflipped.flip(-1) if flips[index][-1] else unflipped
            assert torch.equal(dataset[index]["images"], expected)

    assert [may_flip(question) for question in questions] == [False, False, False, False, True]
    assert not any(flips[0] + flips[1] + flips[2] + flips[3])
    assert any(flips[4]) and not all(flips[4])
    dataset.set_epoch(5)
    assert dataset.flips(4) == flips[4][5]  # drawn from (seed, epoch, index): reproducible
    evaluation = VQADataset(questions, answers, tokenizer, IMAGE_SIZE, train=False, seed=3)
    assert not any(evaluation.flips(index) for index in range(5))


def test_vqa_questions_are_normalised_as_the_authors_30_words_in_training_50_in_evaluation(tmp_path, tokenizer):
    image = write_image(tmp_path / "a.png")
    long = "Is " + " ".join(f"shape{n}," for n in range(60)) + " red?"
    questions = [VQAQuestion(1, image, "What's the  Colour (of the circle)?", ("red", )),
                 VQAQuestion(2, image, long, ("red", ))]
    training = VQADataset(questions, ["red"], tokenizer, IMAGE_SIZE, train=True)
    evaluation = VQADataset(questions, ["red"], tokenizer, IMAGE_SIZE, train=False)
    as_written = VQADataset(questions, ["red"], tokenizer, IMAGE_SIZE, train=True, normalize_text=False)

    assert training.texts[0] == evaluation.texts[0] == "whats the  colour of the circle"
    assert training.texts[1] == pre_question(long, 30) and len(training.texts[1].split(" ")) == 30
    assert evaluation.texts[1] == pre_question(long, 50) and len(evaluation.texts[1].split(" ")) == 50
    assert torch.equal(training[0]["text_ids"], tokenizer.encode("whats the  colour of the circle")[0])
    assert as_written.texts == [question.question for question in questions]
    assert training.questions == questions  # the records keep the text as written


def test_read_vqa_counts_and_skips_each_kind_of_bad_entry(tmp_path, caplog):
    root = tmp_path / "val2014"
    coco_image(root, 1)
    questions = write_json(tmp_path / "questions.json", {"questions": [
        {"image_id": 1, "question": "Good?", "question_id": 10},
        {"image_id": 2, "question": "Image missing?", "question_id": 20},
        {"image_id": 1, "question_id": 30},  # no question text
        {"image_id": 1, "question": "Not annotated?", "question_id": 40},
        {"image_id": 1, "question": "Annotation lacks answers?", "question_id": 50},
    ]})
    annotations = write_json(tmp_path / "annotations.json", {"annotations": [
        annotation(10, ["yes"] * 10), annotation(20, ["no"] * 10), {"question_id": 50, "image_id": 1},
        annotation(60, ["unasked"] * 10)]})

    with caplog.at_level(logging.WARNING):
        records, problems = read_vqa(questions, root, annotations)

    assert [record.question_id for record in records] == [10]
    assert problems == Counter(malformed_entry=2, missing_image=1, question_without_annotation=2,
                               annotation_without_question=1)
    assert f"{questions}: entry 3 skipped" in caplog.text
    assert f"{annotations}: entry 3 skipped" in caplog.text


def test_vqa_dataset_counts_answers_outside_the_list(tmp_path, tokenizer):
    image = write_image(tmp_path / "a.png")
    questions = [VQAQuestion(1, image, "Colour?", ("red", ) * 8 + ("mauve", "taupe")),
                 VQAQuestion(2, image, "Breed?", ("corgi", ) * 10)]

    training = VQADataset(questions, ["red", "blue"], tokenizer, IMAGE_SIZE, train=True,
                          problems=Counter(missing_image=3))
    evaluation = VQADataset(questions, ["red", "blue"], tokenizer, IMAGE_SIZE, train=False)

    assert [question.question_id for question in training.questions] == [1]
    assert training.problems == Counter(missing_image=3, answer_not_in_list=3, question_without_known_answer=1)
    assert len(evaluation) == 2 and evaluation.problems == Counter(answer_not_in_list=3)
    assert evaluation[1]["targets"].sum() == 0
    with pytest.raises(FinetuneDataError, match="no question to train on"):
        VQADataset(questions[1:], ["red"], tokenizer, IMAGE_SIZE, train=True)


# ---------------------------------------------------------------- Visual Genome QA and several training sources

EXAMPLE_VQA = EXAMPLES / "vqa"
EXAMPLE_VQA_SOURCE = (f"vqa:{EXAMPLE_VQA / 'v2_OpenEnded_shapes_train_questions.json'}:"
                      f"{EXAMPLE_VQA / 'v2_shapes_train_annotations.json'}:{EXAMPLE_VQA / 'images/train'}")


def vg_qa(qa_id: int, image_id, question: str, answer: str) -> dict:
    """A question of VG's question_answers.json as downloaded (image_id None: left out)."""
    qa = {"a_objects": [], "question": question, "qa_id": qa_id, "answer": answer, "q_objects": []}
    return qa if image_id is None else {**qa, "image_id": image_id}


def visual_genome(root: Path) -> Path:
    """A tiny VG download: images 1 (VG_100K) and 2 (VG_100K_2), 5 questions of which 4 are usable, the 4th's answer
    outside the shapes answer list, and one image entry without its 'qas'."""
    write_image(root / "VG_100K" / "1.jpg", image_format="JPEG")
    write_image(root / "VG_100K_2" / "2.jpg", image_format="JPEG")
    return write_json(root / "question_answers.json", [
        {"id": 1, "qas": [vg_qa(101, 1, "What color is the square?", "Red."),
                          vg_qa(102, 1, "Where is the star?", "Left."),
                          vg_qa(103, 1, "What shape is blue?", "")]},  # an empty answer
        {"image_id": 2, "qas": [vg_qa(201, None, "How many shapes are there?", "Two"),  # the entry's image id
                                vg_qa(202, 2, "Is there a circle?", "Yes.")]},
        {"id": 3, "regions": []},  # no 'qas'
    ])


def test_read_visual_genome_qa_reads_vg_layout_with_both_image_folders(tmp_path, caplog):
    root = tmp_path / "visual_genome"
    path = visual_genome(root)

    with caplog.at_level(logging.WARNING):
        records, problems = read_visual_genome_qa(path, root)

    first, second = root / "VG_100K" / "1.jpg", root / "VG_100K_2" / "2.jpg"
    assert records == [VQAQuestion(101, first, "What color is the square?", ("Red.", ), VISUAL_GENOME),
                       VQAQuestion(102, first, "Where is the star?", ("Left.", ), VISUAL_GENOME),
                       VQAQuestion(201, second, "How many shapes are there?", ("Two", ), VISUAL_GENOME),
                       VQAQuestion(202, second, "Is there a circle?", ("Yes.", ), VISUAL_GENOME)]
    assert all(record.source == str(path) for record in records)
    assert problems == Counter(malformed_entry=2)
    assert f"{path}: entry 1 question 3 skipped" in caplog.text and f"{path}: entry 3 skipped" in caplog.text
    (root / "VG_100K_2" / "2.jpg").unlink()
    records, problems = read_visual_genome_qa(path, root)
    assert len(records) == 2 and problems == Counter(malformed_entry=2, missing_image=2)
    with pytest.raises(FinetuneDataError, match="is the image folder right.*no 1.jpg in"):
        read_visual_genome_qa(path, tmp_path / "elsewhere")


def test_a_visual_genome_answer_scores_one_as_the_authors_weight_it(tmp_path, tokenizer):
    image = write_image(tmp_path / "a.png")
    questions = [VQAQuestion(1, image, "Colour?", ("Red.", ), VISUAL_GENOME),
                 VQAQuestion(2, image, "Colour?", ("red", )),  # one VQA v2 annotator
                 VQAQuestion(3, image, "Colour?", ("Mauve", ), VISUAL_GENOME)]

    dataset = VQADataset(questions, ["red", "blue"], tokenizer, IMAGE_SIZE, train=True)

    assert [question.question_id for question in dataset.questions] == [1, 2]
    assert torch.equal(dataset[0]["targets"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(dataset[1]["targets"], torch.tensor([0.3, 0.0]))
    assert dataset.problems == Counter(answer_not_in_list=1, question_without_known_answer=1)


def data_arguments(argv: list):
    parser = ArgumentParser()
    add_data_arguments(parser)
    return parser.parse_args(argv)


def test_training_sources_join_the_vqa_example_and_visual_genome(tmp_path, tokenizer, caplog):
    vg = visual_genome(tmp_path / "vg")
    argv = ["--train-source", EXAMPLE_VQA_SOURCE, "--train-source", f"vg:{vg}:{tmp_path / 'vg'}"]

    with caplog.at_level(logging.INFO, logger="eve_ds.finetune.tasks"):
        task = load_task("vqa", data_arguments(argv), tokenizer, IMAGE_SIZE, seed=7)

    today = load_task("vqa", data_arguments([]), tokenizer, IMAGE_SIZE, seed=7).train
    train = task.train
    assert len(today) == 144 and len(train) == 144 + 3  # "Two" is not in the list ("2" is)
    assert train.questions[:144] == today.questions and train.targets[:144] == today.targets
    assert [question.question_id for question in train.questions[144:]] == [101, 102, 202]
    answers = read_answer_list(EXAMPLE_VQA / "answer_list.json")
    for index, answer in zip(range(144, 147), ("red", "left", "yes")):
        assert train.targets[index] == {answers.index(answer): 1.0}
        assert torch.equal(train[index]["targets"].nonzero().flatten(), torch.tensor([answers.index(answer)]))
    assert any(score < 1.0 for target in today.targets for score in target.values())  # VQA v2's scores stay
    assert task.problems == Counter(malformed_entry=2, answer_not_in_list=1, question_without_known_answer=1)
    assert f"vqa {EXAMPLE_VQA / 'v2_OpenEnded_shapes_train_questions.json'}: 144 questions, 144 with" in caplog.text
    assert f"vg {vg}: 4 questions, 3 with an answer in the list (skipped at reading: {{'malformed_entry': 2}})" \
        in caplog.text
    again = load_task("vqa", data_arguments(argv), tokenizer, IMAGE_SIZE, seed=7).train
    for epoch in range(3):
        train.set_epoch(epoch), again.set_epoch(epoch)
        assert [train.flips(i) for i in range(len(train))] == [again.flips(i) for i in range(len(again))]
    assert not train.flips(145)  # "Left."


def test_old_single_source_options_give_todays_training_set(tokenizer):
    explicit = ["--train-questions", str(EXAMPLE_VQA / "v2_OpenEnded_shapes_train_questions.json"),
                "--train-annotations", str(EXAMPLE_VQA / "v2_shapes_train_annotations.json"),
                "--train-images", str(EXAMPLE_VQA / "images/train")]
    default, given = data_arguments([]), data_arguments(explicit)
    expected = [VQASource(VQA_V2, EXAMPLE_VQA / "v2_OpenEnded_shapes_train_questions.json",
                          EXAMPLE_VQA / "images/train", EXAMPLE_VQA / "v2_shapes_train_annotations.json")]
    assert vqa_train_sources(default) == vqa_train_sources(given) == expected
    assert vqa_train_sources(data_arguments(["--train-source", EXAMPLE_VQA_SOURCE])) == expected
    sets = [load_task("vqa", args, tokenizer, IMAGE_SIZE, seed=0).train for args in (default, given)]
    assert len(sets[0]) == 144 and sets[0].questions == sets[1].questions and sets[0].targets == sets[1].targets


def test_train_source_options_read_as_written_or_are_refused():
    coco = data_arguments(["--train-source", "vqa:q.json:a.json:train2014:COCO_{folder}_{image_id:012d}.jpg",
                           "--train-source", "vg:question_answers.json:VG"]).train_source
    assert coco == [VQASource(VQA_V2, Path("q.json"), Path("train2014"), Path("a.json"),
                              "COCO_{folder}_{image_id:012d}.jpg"),
                    VQASource(VISUAL_GENOME, Path("question_answers.json"), Path("VG"))]
    for bad in ("vqa:q.json:a.json", "vg:question_answers.json", "vg:qa.json:VG:extra", "gqa:q.json:images",
                "q.json", "vqa:q.json::images"):
        with pytest.raises(UsageError, match="--train-source: .* is not vqa:QUESTIONS:ANNOTATIONS:IMAGES"):
            data_arguments(["--train-source", bad])
    both = data_arguments(["--train-questions", "q.json", "--train-source", "vg:qa.json:VG"])
    with pytest.raises(UsageError, match="--train-questions and --train-source both name"):
        vqa_train_sources(both)
    with pytest.raises(UsageError, match="given twice"):
        vqa_train_sources(data_arguments(["--train-source", "vg:qa.json:VG"] * 2))


# ---------------------------------------------------------------- NLVR2


def nlvr2_line(identifier, sentence="There are two dogs.", label="True", **fields) -> dict:
    return {"identifier": identifier, "sentence": sentence, "label": label, **fields}


def test_read_nlvr2_finds_pair_images_in_train_directories_and_flat_dev(tmp_path):
    for name in ("train-10171-0-img0.png", "train-10171-0-img1.png"):
        write_image(tmp_path / "train" / "53" / name)
    for name in ("dev-850-0-img0.png", "dev-850-0-img1.png"):
        write_image(tmp_path / "dev" / name)
    train = write_lines(tmp_path / "train.json", [nlvr2_line("train-10171-0-0", directory=53),
                                                   nlvr2_line("train-10171-0-1", "One dog.", "False", directory=53)])
    dev = write_lines(tmp_path / "dev.json", ["", nlvr2_line("dev-850-0-0", label="False")])

    train_examples, train_problems = read_nlvr2(train, tmp_path / "train")
    dev_examples, dev_problems = read_nlvr2(dev, tmp_path / "dev")

    folder = tmp_path / "train" / "53"
    assert train_examples == [
        NLVR2Example("train-10171-0-0", folder / "train-10171-0-img0.png", folder / "train-10171-0-img1.png",
                     "There are two dogs.", 1),
        NLVR2Example("train-10171-0-1", folder / "train-10171-0-img0.png", folder / "train-10171-0-img1.png",
                     "One dog.", 0),
    ]
    assert dev_examples == [NLVR2Example("dev-850-0-0", tmp_path / "dev" / "dev-850-0-img0.png",
                                         tmp_path / "dev" / "dev-850-0-img1.png", "There are two dogs.", 0)]
    assert train_problems == dev_problems == Counter()


def test_read_nlvr2_counts_and_skips_bad_lines(tmp_path, caplog):
    for name in ("dev-1-0-img0.png", "dev-1-0-img1.png"):
        write_image(tmp_path / name)
    path = write_lines(tmp_path / "dev.json", [
        nlvr2_line("dev-1-0-0"),
        "{not json",
        {"identifier": "dev-1-0-1", "sentence": "No label."},
        nlvr2_line("dev-1-0-2", label="maybe"),
        nlvr2_line("dev1"),  # not split-set-pair-sentence
        nlvr2_line("dev-2-0-0"),  # its images are missing
    ])

    with caplog.at_level(logging.WARNING):
        examples, problems = read_nlvr2(path, tmp_path)

    assert [example.identifier for example in examples] == ["dev-1-0-0"]
    assert problems == Counter(malformed_line=4, missing_image=1)
    assert f"{path}: line 2 skipped" in caplog.text and f"{path}: line 5 skipped" in caplog.text


def test_nlvr2_items_hold_both_images_and_the_label(tmp_path, tokenizer):
    left, right = write_image(tmp_path / "l.png"), write_image(tmp_path / "r.png", left=(0, 255, 0))
    item = NLVR2Dataset([NLVR2Example("dev-1-0-0", left, right, "A green image.", 1)], tokenizer, IMAGE_SIZE)[0]
    assert item["images"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(item["images"][0], load_image(left, IMAGE_SIZE))
    assert torch.equal(item["images"][1], load_image(right, IMAGE_SIZE))
    assert item["labels"] == 1 and item["text_ids"].shape == (TEXT_LENGTH, )


def test_nlvr2_sentences_are_normalised_to_40_words_and_empty_ones_left_out(tmp_path, tokenizer):
    left, right = write_image(tmp_path / "l.png"), write_image(tmp_path / "r.png")
    long = " ".join(f"Word{n}" for n in range(45)) + "."
    examples = [NLVR2Example("dev-1-0-0", left, right, "The LEFT image: two dogs!", 1),
                NLVR2Example("dev-1-0-1", left, right, "...", 0),
                NLVR2Example("dev-1-0-2", left, right, long, 0)]

    dataset = NLVR2Dataset(examples, tokenizer, IMAGE_SIZE, problems=Counter(missing_image=1))

    assert dataset.sentences == ["the left image two dogs", pre_caption(long, 40)]
    assert len(dataset.sentences[1].split()) == 40
    assert [example.identifier for example in dataset.examples] == ["dev-1-0-0", "dev-1-0-2"] and len(dataset) == 2
    assert dataset.problems == Counter(missing_image=1, empty_once_normalised=1)
    assert torch.equal(dataset[0]["text_ids"], tokenizer.encode("the left image two dogs")[0])
    as_written = NLVR2Dataset(examples, tokenizer, IMAGE_SIZE, normalize_text=False)
    assert as_written.sentences == [example.sentence for example in examples]


# ---------------------------------------------------------------- Karpathy splits


def karpathy_image(filename, split, captions, filepath=None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    return entry if filepath is None else {"filepath": filepath, **entry}


def test_read_karpathy_coco_takes_restval_as_train(tmp_path):
    for folder, name in [("train2014", "a.jpg"), ("val2014", "b.jpg"), ("val2014", "c.jpg"), ("val2014", "d.jpg")]:
        write_image(tmp_path / folder / name, image_format="JPEG")
    path = write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        karpathy_image("a.jpg", "train", ["A cat.", " Another cat. "], "train2014"),
        karpathy_image("b.jpg", "restval", ["A dog."], "val2014"),
        karpathy_image("c.jpg", "val", ["A bird."], "val2014"),
        karpathy_image("d.jpg", "test", ["A fish.", "Some fish."], "val2014"),
    ]})

    train, problems = read_karpathy(path, tmp_path, "train")
    test, _ = read_karpathy(path, tmp_path, "test")

    assert train == [CaptionedImage(tmp_path / "train2014" / "a.jpg", ("A cat.", "Another cat.")),
                     CaptionedImage(tmp_path / "val2014" / "b.jpg", ("A dog.", ))]
    assert test == [CaptionedImage(tmp_path / "val2014" / "d.jpg", ("A fish.", "Some fish."))]
    assert problems == Counter()


def test_read_karpathy_flickr_and_its_bad_entries(tmp_path, caplog):
    write_image(tmp_path / "1.jpg"), write_image(tmp_path / "3.jpg"), write_image(tmp_path / "4.jpg")
    path = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        karpathy_image("1.jpg", "test", ["A man runs."]),
        karpathy_image("2.jpg", "test", ["Its image is missing."]),
        karpathy_image("3.jpg", "test", []),
        {"filename": "4.jpg", "split": "test", "sentences": [{"tokens": ["no", "raw"]}, {"raw": "A boat."}]},
        {"split": "test", "sentences": [{"raw": "No file name."}]},
        karpathy_image("5.jpg", "train", ["Another split: not read, not checked."]),
    ]})

    with caplog.at_level(logging.WARNING):
        images, problems = read_karpathy(path, tmp_path, "test")

    assert images == [CaptionedImage(tmp_path / "1.jpg", ("A man runs.", )),
                      CaptionedImage(tmp_path / "4.jpg", ("A boat.", ))]
    assert problems == Counter(missing_image=1, image_without_captions=1, malformed_entry=2)
    assert f"{path}: image 4 sentence 1 skipped" in caplog.text and f"{path}: image 5 skipped" in caplog.text


def test_retrieval_datasets_pair_captions_with_their_images(tmp_path, tokenizer):
    images = [CaptionedImage(write_image(tmp_path / "a.png"), ("A red square.", "Red.")),
              CaptionedImage(write_image(tmp_path / "b.png", left=(0, 0, 0)), ("A black one.", )),
              CaptionedImage(write_image(tmp_path / "c.png", left=(9, 9, 9)), ("Grey.", "Dark.", "Gray."))]

    train = RetrievalTrainDataset(images, tokenizer, IMAGE_SIZE)
    evaluation = RetrievalEvalSet(images, tokenizer, IMAGE_SIZE, problems=Counter(missing_image=1))

    assert len(train) == 6 and [train[i]["image_ids"] for i in range(6)] == [0, 0, 1, 2, 2, 2]
    whole = load_image(images[1].image_path, IMAGE_SIZE)  # augmentation "none": resized whole, maybe mirrored
    assert torch.equal(train[2]["images"], whole.flip(-1) if train.flips(2) else whole)
    assert evaluation.text_image.tolist() == [0, 0, 1, 2, 2, 2]
    assert evaluation.captions[3] == "grey" and evaluation.problems == Counter(missing_image=1)
    assert len(evaluation.images) == 3 and evaluation.images[2]["image_ids"] == 2
    assert [evaluation.texts[t]["image_ids"] for t in range(6)] == [0, 0, 1, 2, 2, 2]
    assert evaluation.texts[0]["text_ids"].shape == (TEXT_LENGTH, )
    perfect = (torch.arange(3)[:, None] == evaluation.text_image[None, :]).float()
    assert retrieval_recall(perfect, evaluation.text_image, ks=(1, ))["r_mean"] == 100.0


def test_retrieval_captions_are_normalised_to_30_words_and_empty_ones_dropped(tmp_path, tokenizer):
    long = " ".join(f"Word{n}" for n in range(35))
    images = [CaptionedImage(write_image(tmp_path / "a.png"), ("A  Red square.", "?!", long)),
              CaptionedImage(write_image(tmp_path / "b.png"), ("...", )),  # no caption left: the image goes too
              CaptionedImage(write_image(tmp_path / "c.png"), ("Grey <person>.", ))]

    train = RetrievalTrainDataset(images, tokenizer, IMAGE_SIZE)
    evaluation = RetrievalEvalSet(images, tokenizer, IMAGE_SIZE)

    expected = ["a red square", pre_caption(long, 30), "grey person"]
    assert [caption for _, caption in train.pairs] == evaluation.captions == expected
    assert len(expected[1].split()) == 30
    assert [image_index for image_index, _ in train.pairs] == evaluation.text_image.tolist() == [0, 0, 1]
    assert evaluation.image_paths == [images[0].image_path, images[2].image_path]
    assert train.problems == evaluation.problems == Counter(empty_once_normalised=2, image_without_captions=1)
    assert torch.equal(evaluation.texts[0]["text_ids"], tokenizer.encode("a red square")[0])
    as_written = RetrievalEvalSet(images, tokenizer, IMAGE_SIZE, normalize_text=False)
    assert as_written.captions == [caption for image in images for caption in image.captions]


def test_load_task_normalises_text_unless_told_not_to(tokenizer):
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    normalised = load_task("nlvr2", parser.parse_args([]), tokenizer, IMAGE_SIZE, seed=0)
    as_written = load_task("nlvr2", parser.parse_args(["--no-normalize-text"]), tokenizer, IMAGE_SIZE, seed=0)
    sentence = as_written.train.sentences[0]
    assert sentence == as_written.train.examples[0].sentence and sentence != sentence.lower()
    assert normalised.train.sentences[0] == pre_caption(sentence, 40)
    retrieval = load_task("retrieval", parser.parse_args([]), tokenizer, IMAGE_SIZE, seed=0)
    assert all(caption == pre_caption(caption, 30) for caption in retrieval.evaluation.captions)


# ---------------------------------------------------------------- files that are missing or not in the layout


def test_each_reader_names_a_missing_or_foreign_file(tmp_path):
    vqa_questions = write_json(tmp_path / "questions.json", {"questions": [{"image_id": 1, "question": "Q?",
                                                                           "question_id": 1}]})
    nlvr2 = write_lines(tmp_path / "dev.json", [nlvr2_line("dev-1-0-0")])
    karpathy = write_json(tmp_path / "dataset_coco.json", {"images": []})
    pretty_json = tmp_path / "pretty.json"
    pretty_json.write_text(json.dumps({"questions": []}, indent=1))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    missing = tmp_path / "missing.json"
    answer_list = write_json(tmp_path / "answer_list.json", ["yes", "no"])
    # X-VLM's vg_qa.json rows, not VG's own layout
    x_vlm = write_json(tmp_path / "vg_qa.json", [{"question": "Q?", "answer": "yes", "image": "VG_100K/1.jpg",
                                                   "dataset": "vg"}])
    visual_genome_qa = visual_genome(tmp_path / "vg")
    attempts = [
        (missing, lambda: read_vqa(missing, tmp_path)),
        (nlvr2, lambda: read_vqa(nlvr2, tmp_path)),  # JSON lines, not one JSON document
        (karpathy, lambda: read_vqa(karpathy, tmp_path)),  # no "questions" list
        (vqa_questions, lambda: read_vqa(vqa_questions, tmp_path, annotations_path=vqa_questions)),
        (binary, lambda: read_vqa(binary, tmp_path)),
        (visual_genome_qa, lambda: read_vqa(visual_genome_qa, tmp_path)),
        (missing, lambda: read_visual_genome_qa(missing, tmp_path)),
        (vqa_questions, lambda: read_visual_genome_qa(vqa_questions, tmp_path)),
        (karpathy, lambda: read_visual_genome_qa(karpathy, tmp_path)),
        (answer_list, lambda: read_visual_genome_qa(answer_list, tmp_path)),
        (x_vlm, lambda: read_visual_genome_qa(x_vlm, tmp_path)),
        (binary, lambda: read_visual_genome_qa(binary, tmp_path)),
        (missing, lambda: read_nlvr2(missing, tmp_path)),
        (pretty_json, lambda: read_nlvr2(pretty_json, tmp_path)),  # no line is an NLVR2 example
        (binary, lambda: read_nlvr2(binary, tmp_path)),
        (missing, lambda: read_karpathy(missing, tmp_path, "test")),
        (vqa_questions, lambda: read_karpathy(vqa_questions, tmp_path, "test")),
        (missing, lambda: read_answer_list(missing)),
        (vqa_questions, lambda: read_answer_list(vqa_questions)),
    ]
    for path, attempt in attempts:
        with pytest.raises(FinetuneDataError) as error:
            attempt()
        assert isinstance(error.value, ValueError) and str(path) in str(error.value)


def test_a_split_whose_images_are_all_missing_points_at_the_image_folder(tmp_path):
    path = write_lines(tmp_path / "dev.json", [nlvr2_line("dev-1-0-0")])
    with pytest.raises(FinetuneDataError, match="is the image folder right"):
        read_nlvr2(path, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="split 'restval'"):
        read_karpathy(path, tmp_path, "restval")
