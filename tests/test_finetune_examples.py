"""The tiny examples that tools/make_finetune_examples.py writes to data/finetune: they read back without
problems, their answers and statements are true of their pictures, and the generator reproduces them."""
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.finetune.annotations import read_answer_list, read_karpathy, read_nlvr2, read_vqa
from eve_ds.finetune.datasets import TEXT_LENGTH, VQADataset, may_flip
from tests.conftest import REPO, SHAPES, run_tool
from tools.make_shapes_dataset import COLOURS

EXAMPLES = REPO / "data" / "finetune"
EXAMPLE_VQA_IMAGE_NAME = "shapes_{folder}_{image_id:06d}.png"  # as data/finetune/README.md says


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(SHAPES / "tokenizer.json", max_len=TEXT_LENGTH)


def read_examples(task_split: str):
    vqa = EXAMPLES / "vqa"
    if task_split in ("train", "val"):
        return read_vqa(vqa / f"v2_OpenEnded_shapes_{task_split}_questions.json", vqa / "images" / task_split,
                        vqa / f"v2_shapes_{task_split}_annotations.json", image_name=EXAMPLE_VQA_IMAGE_NAME)
    return read_vqa(vqa / "v2_OpenEnded_shapes_test-dev_questions.json", vqa / "images" / "test",
                    image_name=EXAMPLE_VQA_IMAGE_NAME)


def pixels(path: Path) -> tuple:
    """(the image as RGB, its width)."""
    with Image.open(path) as image:
        return image.convert("RGB"), image.size[0]


def shape_colour_present(path: Path, colour: str) -> bool:
    """Whether a shape of that colour is drawn: shapes never touch the first row and column, so the colours
    there are the background's (both halves of a two-tone one), and shapes are never the background's colour."""
    image, size = pixels(path)
    background = {image.getpixel((x, 0)) for x in range(size)} | {image.getpixel((0, y)) for y in range(size)}
    return any(count >= 4 and rgb == COLOURS[colour] and rgb not in background
               for count, rgb in image.getcolors(size * size))


def test_shipped_examples_read_back_without_problems(tokenizer):
    answers = read_answer_list(EXAMPLES / "vqa" / "answer_list.json")
    for split, train in (("train", True), ("val", False), ("test", False)):
        questions, problems = read_examples(split)
        dataset = VQADataset(questions, answers, tokenizer, 96, train=train, problems=problems)
        assert dataset.problems == Counter() and len(dataset) == len(questions) == {"train": 144}.get(split, 48)
    assert all(question.answers == () for question in read_examples("test")[0])
    for split, pairs in (("train", 24), ("dev", 8), ("test1", 8)):
        examples, problems = read_nlvr2(EXAMPLES / "nlvr2" / f"{split}.json", EXAMPLES / "nlvr2" / "images" / split)
        assert problems == Counter() and len(examples) == 2 * pairs
        assert sum(example.label for example in examples) == pairs  # balanced
    for split, count in (("train", 64), ("val", 16), ("test", 16)):
        images, problems = read_karpathy(EXAMPLES / "retrieval" / "dataset_shapes.json", EXAMPLES / "retrieval", split)
        assert problems == Counter() and len(images) == count
        assert all(len(set(image.captions)) == 5 for image in images)
    item = VQADataset(read_examples("val")[0], answers, tokenizer, 96, train=False)[0]
    assert item["images"].shape == (3, 96, 96) and 0 < item["targets"].max() <= 1


def test_shipped_vqa_answers_are_true_of_the_images():
    checked = Counter()
    for split in ("train", "val"):
        for question in read_examples(split)[0]:
            answer = Counter(question.answers).most_common(1)[0][0]
            image, size = pixels(question.image_path)
            corner = {"background": (0, 0), "left half": (0, 0), "top half": (0, 0), "right half": (size - 1, 0),
                      "bottom half": (0, size - 1)}  # the outer rows and columns are never under a shape
            for part, pixel in corner.items():
                if question.question == f"What color is the {part} of the background?":
                    assert image.getpixel(pixel) == COLOURS[answer], (question, part)
                    checked["background"] += 1
            if question.question.startswith("What color is the") and "background" not in question.question:
                assert shape_colour_present(question.image_path, answer), question
                checked["shape colour"] += 1
            if question.question.startswith("What shape is "):
                assert shape_colour_present(question.image_path, question.question[len("What shape is "):-1]), question
                checked["colour of a shape"] += 1
    assert min(checked.values()) >= 5 and len(checked) == 3


def test_shipped_nlvr2_statements_are_true_of_the_pairs():
    checked = Counter()
    for split in ("train", "dev", "test1"):
        for example in read_nlvr2(EXAMPLES / "nlvr2" / f"{split}.json", EXAMPLES / "nlvr2" / "images" / split)[0]:
            pair = (example.left_image_path, example.right_image_path)
            if example.sentence == "Both images have a plain background.":
                plain = []
                for path in pair:
                    image, size = pixels(path)
                    corners = (0, 0), (size - 1, 0), (0, size - 1)
                    plain.append(len({image.getpixel(corner) for corner in corners}) == 1)
                assert all(plain) == bool(example.label), example
                checked["plain"] += 1
            if example.sentence.startswith("Both images contain a"):
                colour = example.sentence.split()[-2]
                assert all(shape_colour_present(path, colour) for path in pair) == bool(example.label), example
                checked["colour"] += 1
    assert len(checked) == 2 and sum(checked.values()) >= 5


def test_shipped_vqa_questions_about_sides_never_flip(tokenizer):
    questions, _ = read_examples("train")
    answers = read_answer_list(EXAMPLES / "vqa" / "answer_list.json")
    dataset = VQADataset(questions, answers, tokenizer, 96, train=True)
    sided = [index for index, question in enumerate(dataset.questions) if not may_flip(question)]
    assert len(sided) >= 10 and any("left" in dataset.questions[index].question for index in sided)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        assert not any(dataset.flips(index) for index in sided)


def folder_bytes(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != "README.md"}


def test_generator_reproduces_the_shipped_examples(tmp_path):
    result = run_tool("make_finetune_examples.py", "--out", tmp_path, "--seed", 0)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path) == folder_bytes(EXAMPLES)


def test_scene_refactor_keeps_the_shipped_shapes_data(tmp_path):
    result = run_tool("make_shapes_dataset.py", "--out", tmp_path, "--count", 6, "--size", 96, "--seed", 0)
    assert result.returncode == 0, result.stderr
    shipped = (SHAPES / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    assert (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines() == shipped
    for index in range(6):
        assert (tmp_path / f"images/{index:06d}.png").read_bytes() == (SHAPES / f"images/{index:06d}.png").read_bytes()
