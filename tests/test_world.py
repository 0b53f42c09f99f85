"""The synthetic world of tools/make_world.py (eve_ds/data/world.py): reproducible byte for byte, read without a
skip by the pre-training data layer and the fine-tuning readers, its texts true of its pictures, its answers and
labels balanced (blind baselines low), its task images apart from its pre-training images, and its world.json
options accepted by launch/finetune.py."""
import hashlib
import io
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from eve_ds.data import open_source
from eve_ds.data import world
from eve_ds.data.shards import captions_of, image_of, iter_shard, read_index
from eve_ds.data.text import pre_caption
from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.finetune.annotations import read_answer_list, read_karpathy, read_nlvr2, read_vqa
from eve_ds.finetune.train import parse_args as finetune_parse_args
from eve_ds.pretrain import parse_args as pretrain_parse_args
from tools import make_world

SMALL = ["--pretrain-images", "50", "--pretrain-val-images", "10", "--shard-size", "20", "--vqa-images", "24",
         "--nlvr2-pairs", "40", "--retrieval-images", "15"]
COLOUR_WORDS, SHAPE_WORDS = set(world.OBJECT_COLOURS), set(world.SHAPES)
NUMBER = {word: n for n, word in world.NUMBER_WORDS.items()}


def make(out: Path, *extra, seed: int = 0, workers: int = 2) -> Path:
    make_world.main(["--out", str(out), "--world-seed", str(seed), "--workers", str(workers), *SMALL, *extra])
    return out


def folder_bytes(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("world") / "w")


def pixel_names(image: Image.Image, scene: dict) -> tuple:
    """(the colour name at each object's centre, the colour name of the top-left pixel)."""
    image = image.convert("RGB")
    return ([world.nearest_colour(image.getpixel(tuple(obj["centre"]))) for obj in scene["objects"]],
            world.nearest_colour(image.getpixel((0, 0))))


def assert_pixels_match(image: Image.Image, scene: dict):
    centres, corner = pixel_names(image, scene)
    assert centres == [obj["colour"] for obj in scene["objects"]]
    assert corner == scene["background"]


# ---------------------------------------------------------------- reproducible


def test_same_arguments_give_the_same_bytes_whatever_the_workers(built, tmp_path):
    again = make(tmp_path / "again", workers=1)
    first, second = folder_bytes(built), folder_bytes(again)
    assert first.keys() == second.keys() and first == second
    assert {"pretrain/00000.tar", "pretrain/00002.tar", "pretrain/index.json", "pretrain-val/00000.tar",
            "tokenizer.json", "world.json", "vqa/answer_list.json", "nlvr2/train.json",
            "retrieval/dataset_world.json"} <= first.keys()
    make(again)  # an earlier world in the folder is replaced, not mixed in
    assert folder_bytes(again) == first


def test_another_world_seed_draws_other_scenes(built, tmp_path):
    other = make(tmp_path / "other", seed=1)
    for name in ("pretrain", "vqa", "nlvr2", "retrieval"):
        ours, theirs = read_jsonl(built / "scenes" / f"{name}.jsonl"), read_jsonl(other / "scenes" / f"{name}.jsonl")
        assert len(ours) == len(theirs)
        same = sum(a.get("scene", a.get("scenes")) == b.get("scene", b.get("scenes")) for a, b in zip(ours, theirs))
        assert same == 0, name
    assert (built / "pretrain" / "00000.tar").read_bytes() != (other / "pretrain" / "00000.tar").read_bytes()


def test_a_folder_that_is_not_a_world_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        make_world.main(["--out", str(tmp_path), *SMALL])
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- read by the existing readers


def test_pretraining_shards_are_read_by_the_data_layer(built):
    source = open_source(str(built / "pretrain"))
    assert source.total == 50 and len(source.units) == 3 and list(source.counts) == [20, 20, 10]
    assert read_index(built / "pretrain") == {"00000.tar": 20, "00001.tar": 20, "00002.tar": 10}
    scenes = {line["item"]: line for line in read_jsonl(built / "scenes" / "pretrain.jsonl")}
    problems, seen = Counter(), 0
    for shard in source.units:
        for key, files in iter_shard(shard, problems):
            extension, data = image_of(files)
            captions = captions_of(files, problems)
            assert extension == "png" and files["txt"].decode() == captions[0]
            assert captions == scenes[key]["captions"] and len(set(captions)) == 5
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (96, 96)
                assert_pixels_match(image, scenes[key]["scene"])
            seen += 1
    assert seen == 50 and problems == Counter()
    assert open_source(str(built / "pretrain-val")).total == 10


def test_task_files_are_read_without_a_skip(built):
    options = {task: finetune_parse_args(["--task", task, "--pretrained", "unused",
                                          *world.finetune_options(built, task)])
               for task in ("vqa", "nlvr2", "retrieval")}
    vqa = options["vqa"]
    train, problems = read_vqa(vqa.train_questions, vqa.train_images, vqa.train_annotations, vqa.image_name)
    assert problems == Counter() and 60 <= len(train) <= 72
    val, problems = read_vqa(vqa.val_questions, vqa.val_images, vqa.val_annotations, vqa.image_name)
    assert problems == Counter() and 15 <= len(val) <= 18
    answers = read_answer_list(vqa.answer_list)
    assert all(len(question.answers) == 10 and question.answers[0] in answers for question in train + val)
    nlvr2 = options["nlvr2"]
    for path, images, pairs in ((nlvr2.nlvr2_train, nlvr2.nlvr2_train_images, 40),
                                (nlvr2.nlvr2_val, nlvr2.nlvr2_val_images, 12)):
        examples, problems = read_nlvr2(path, images)
        assert problems == Counter() and len(examples) == pairs
    retrieval = options["retrieval"]
    for split, count in (("train", 15), ("val", 3), ("test", 3)):
        images, problems = read_karpathy(retrieval.karpathy, retrieval.karpathy_images, split)
        assert problems == Counter() and len(images) == count
        assert all(len(image.captions) == 5 for image in images)


def test_world_json_options_are_launch_finetunes(built):
    document = world.read_world(built)
    assert set(document["finetune_options"]) == {"vqa", "nlvr2", "retrieval"}
    for task, templated in document["finetune_options"].items():
        args = finetune_parse_args(["--task", task, "--pretrained", "unused", *world.finetune_options(built, task)])
        for name, value in zip(templated[::2], templated[1::2]):
            parsed = getattr(args, name.removeprefix("--").replace("-", "_"))
            if name in world.PATH_OPTIONS:
                assert value.startswith("{world}/"), name
                path = (built / value.removeprefix("{world}/")).resolve()
                assert Path(parsed) == path and path.exists() and Path(parsed).is_absolute(), name
            else:
                assert parsed == value
        # as benchmarks/transfer.py fills them in
        filled = [option.replace("{world}", str(built)) for option in templated]
        assert finetune_parse_args(["--task", task, "--pretrained", "unused", *filled])
    assert world.pretrain_options(built) == ["--data", str((built / "pretrain").resolve()), "--tokenizer",
                                             str((built / "tokenizer.json").resolve()), "--val-data",
                                             str((built / "pretrain-val").resolve())]
    recommended = world.finetune_options(built, "vqa", recommended=True)
    assert recommended[-2:] == ["--augmentation", "none"]
    assert finetune_parse_args(["--task", "vqa", "--pretrained", "unused", *recommended]).augmentation == "none"
    pretrain = pretrain_parse_args(["--deepspeed_config", "ds_configs/zero2_ep.json",
                                    *world.pretrain_options(built, recommended=True)])
    assert pretrain.augment is False and pretrain.data == [str((built / "pretrain").resolve())]
    assert pretrain.val_data == str((built / "pretrain-val").resolve())
    assert document["counts"]["pretrain"] == {"images": 50, "shards": 3, "captions": 250}
    assert "out" not in document["arguments"] and document["arguments"]["world_seed"] == 0


def test_the_tokenizer_covers_every_text_in_single_word_tokens(built):
    tokenizer = TextTokenizer(built / "tokenizer.json", max_len=40)
    ids = tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id
    assert ids == (0, 1, 2, 3, 4)
    for word in (*world.OBJECT_COLOURS, *world.BACKGROUNDS, *world.SHAPES, *world.SIZES, "top", "bottom", "left",
                 "right", "one", "two", "three"):
        assert len(tokenizer.tokenizer.encode(word, add_special_tokens=False).ids) == 1, word
    texts = [c for line in read_jsonl(built / "scenes" / "pretrain.jsonl") for c in line["captions"]]
    texts += [json.loads(line)["sentence"] for line in (built / "nlvr2" / "train.json").read_text().splitlines()]
    for text in texts:
        ids, padding, _ = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids.tolist() and ids[int(padding.sum()) - 1] == tokenizer.sep_id, text


def test_captions_fit_the_text_length_and_word_limits():
    """40 tokens of eve-tiny and the authors' 30-word caption limit: no caption is cut."""
    for index in range(400):
        rng = random.Random(index)
        scene = world.sample_scene(rng, count=3 if index % 2 else None)
        for template in world.CAPTION_TEMPLATES.values():
            caption = template(rng, scene["objects"], scene["background"])
            assert len(pre_caption(caption, 1000).split()) <= 30, caption


# ---------------------------------------------------------------- true of the picture


def caption_facts_hold(caption: str, scene: dict):
    """Checks a caption by reading it, independently of the templates that wrote it."""
    objects, words = scene["objects"], re.findall(r"[a-z]+", caption)
    colours = {w for w in words if w in COLOUR_WORDS}
    assert colours == {o["colour"] for o in objects}, caption
    assert {w for w in words if w in SHAPE_WORDS} == {o["shape"] for o in objects}, caption
    assert {w for w in words if w in world.BACKGROUNDS} <= {scene["background"]}, caption
    count = re.search(r"\b(one|two|three) (?:objects?|shapes?)\b", caption)
    if count:
        assert NUMBER[count[1]] == len(objects), caption
    thing = r"(small|large) (\w+) (\w+)"
    for colour, shape in zip(words, words[1:]):  # every "<colour> <shape>" names an object
        if colour in COLOUR_WORDS and shape in SHAPE_WORDS:
            assert any((o["colour"], o["shape"]) == (colour, shape) for o in objects), caption
    for size, colour, shape in re.findall(thing, caption):
        if colour in COLOUR_WORDS and shape in SHAPE_WORDS:
            assert any((o["size"], o["colour"], o["shape"]) == (size, colour, shape) for o in objects), caption
    for size, colour, shape, position in re.findall(rf"a {thing} in the (top left|top right|bottom left|bottom right)",
                                                  caption) + [
            (s, c, sh, p) for s, sh, p, c in re.findall(
                r"the (small|large) (\w+) in the (top left|top right|bottom left|bottom right) is (\w+)", caption)]:
        assert {"size": size, "colour": colour, "shape": shape, "position": position} in [
            {k: o[k] for k in ("size", "colour", "shape", "position")} for o in objects], caption
    for position, size, colour, shape in re.findall(
            rf"in the (top left|top right|bottom left|bottom right) is a {thing}", caption):
        assert any((o["position"], o["size"], o["colour"], o["shape"]) == (position, size, colour, shape)
                   for o in objects), caption
    relation = re.search(rf"a {thing} (to the left of|to the right of|above|below) a {thing}", caption)
    if relation:
        a, rel, b = relation.groups()[:3], relation[4], relation.groups()[4:]
        first = [o for o in objects if (o["size"], o["colour"], o["shape"]) == a]
        second = [o for o in objects if (o["size"], o["colour"], o["shape"]) == b]
        assert any(world.holds(rel, x, y) for x in first for y in second if x is not y), caption


def test_pretraining_captions_are_true_of_their_scenes():
    for index in range(300):
        rng = world.item_rng(7, "test", index)
        scene = world.sample_scene(rng)
        for caption in world.captions(rng, scene, 8):
            caption_facts_hold(caption, scene)
        if index < 40:
            assert_pixels_match(world.render(scene), scene)


def test_objects_cover_several_patches_and_keep_apart():
    for index in range(300):
        scene = world.sample_scene(random.Random(index))
        for obj in scene["objects"]:
            assert 2 * obj["radius"] >= 30  # at least about 2x2 patches of 16 px
            x, y = obj["centre"]
            row, col = obj["cell"]
            assert col * 48 <= x - obj["radius"] and x + obj["radius"] < (col + 1) * 48  # inside its cell
            assert row * 48 <= y - obj["radius"] and y + obj["radius"] < (row + 1) * 48
    sizes = Counter(obj["size"] for index in range(300) for obj in world.sample_scene(random.Random(index))["objects"])
    assert abs(sizes["small"] - sizes["large"]) < 0.2 * sum(sizes.values())


def referent(objects: list, phrase: str) -> list:
    """The objects a noun phrase such as "the large circle", "the red shape", "the shape in the top left" names."""
    position = re.search(r"in the (top left|top right|bottom left|bottom right)", phrase)
    words = set(phrase.split())
    return [o for o in objects if (position is None or o["position"] == position[1])
            and all(w not in words for w in (COLOUR_WORDS - {o["colour"]}) | (SHAPE_WORDS - {o["shape"]}))
            and all(w not in words for w in set(world.SIZES) - {o["size"]})]


def vqa_answer(scene: dict, question: str) -> str:
    """The answer, worked out from the question's words and the scene."""
    objects = scene["objects"]
    question = question.rstrip("?")
    if question.startswith("how many"):
        return str(len(objects))
    if question.startswith("is there"):
        colour, shape = question.split()[-2:]
        return "yes" if any((o["colour"], o["shape"]) == (colour, shape) for o in objects) else "no"
    relation = re.search(r"(to the left of|to the right of|above|below) (the .*)$", question)
    if relation:
        [anchor] = referent(objects, relation[2])
        [other] = [o for o in objects if o is not anchor and world.holds(relation[1], o, anchor)]
        return other["shape"] if question.startswith("what shape") else other["colour"]
    if question.startswith("what shape is in the"):
        [obj] = referent(objects, question.removeprefix("what shape is "))
        return obj["shape"]
    phrase = re.sub(r"^(what color is|what is the color of|what shape is|where is) ", "", question)
    [obj] = referent(objects, phrase)
    if question.startswith("where"):
        return obj["position"]
    return obj["shape"] if question.startswith("what shape") else obj["colour"]


def test_vqa_answers_are_true_of_their_images(built):
    scenes = read_jsonl(built / "scenes" / "vqa.jsonl")
    by_image = {line["image_id"]: line for line in scenes}
    checked = 0
    for split in ("train", "val"):
        questions = json.loads((built / "vqa" / f"v2_OpenEnded_world_{split}_questions.json").read_text())["questions"]
        annotations = {a["question_id"]: a for a in
                       json.loads((built / "vqa" / f"v2_world_{split}_annotations.json").read_text())["annotations"]}
        for question in questions:
            line = by_image[question["image_id"]]
            answer = annotations[question["question_id"]]["multiple_choice_answer"]
            assert vqa_answer(line["scene"], question["question"]) == answer, question
            checked += 1
        for line in scenes[:5]:
            with Image.open(built / "vqa" / line["item"]) as image:
                assert_pixels_match(image, line["scene"])
    assert checked > 70


def test_vqa_answers_of_many_scenes_are_true():
    for index in range(300):
        rng = random.Random(index)
        scene = world.sample_scene(rng)
        for kind, question, answer in world.vqa_candidates(rng, scene):
            assert vqa_answer(scene, question) == answer, (kind, question)


def nlvr2_truth(sentence: str, left: dict, right: dict) -> bool:
    """The statement's truth, worked out from its words and the two scenes."""
    pair = {"left": left, "right": right}
    counts = [len(left["objects"]), len(right["objects"])]
    colours = [{o["colour"] for o in s["objects"]} for s in (left, right)]
    shapes = [{o["shape"] for o in s["objects"]} for s in (left, right)]
    if sentence == "the left image has more shapes than the right image":
        return counts[0] > counts[1]
    if sentence == "the right image has more shapes than the left image":
        return counts[1] > counts[0]
    if sentence == "both images have the same number of shapes":
        return counts[0] == counts[1]
    if match := re.fullmatch(r"there are (\w+) shapes in total", sentence):
        return sum(counts) == NUMBER[match[1]]
    if match := re.fullmatch(r"both images contain an? (\w+) shape", sentence):
        return all(match[1] in c for c in colours)
    if match := re.fullmatch(r"there is an? (\w+) in exactly one image", sentence):
        return sum(match[1] in s for s in shapes) == 1
    if match := re.fullmatch(r"neither image contains an? (\w+)", sentence):
        return not any(match[1] in s for s in shapes)
    if match := re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", sentence):
        return any((o["colour"], o["shape"]) == match.group(2, 3) for o in pair[match[1]]["objects"])
    if match := re.fullmatch(r"each image contains exactly (\w+) shapes?", sentence):
        return counts == [NUMBER[match[1]]] * 2
    if match := re.fullmatch(r"in the (left|right) image an? (\w+) shape is (to the left of|to the right of|above|"
                             r"below) an? (\w+) shape", sentence):
        objects = pair[match[1]]["objects"]
        return any(a["colour"] == match[2] and b["colour"] == match[4] and world.holds(match[3], a, b)
                   for a in objects for b in objects if a is not b)
    raise AssertionError(f"no reading of {sentence!r}")


def test_nlvr2_labels_are_true_of_their_image_pairs(built):
    lines = {line["item"]: line for line in read_jsonl(built / "scenes" / "nlvr2.jsonl")}
    for split in ("train", "dev"):
        examples, _ = read_nlvr2(built / "nlvr2" / f"{split}.json", built / "nlvr2" / "images" / split)
        for number, example in enumerate(examples):
            left, right = lines[example.identifier]["scenes"]
            assert nlvr2_truth(example.sentence, left, right) == bool(example.label), example.sentence
            if number < 6:
                for path, scene in ((example.left_image_path, left), (example.right_image_path, right)):
                    with Image.open(path) as image:
                        assert_pixels_match(image, scene)


def test_retrieval_captions_are_true_of_their_images(built):
    lines = {line["item"]: line for line in read_jsonl(built / "scenes" / "retrieval.jsonl")}
    for split in ("train", "val", "test"):
        images, _ = read_karpathy(built / "retrieval" / "dataset_world.json", built / "retrieval", split)
        for image in images:
            line = lines[f"images/{image.image_path.name}"]
            assert list(image.captions) == line["captions"] and line["split"] == split
            for caption in image.captions:
                caption_facts_hold(caption, line["scene"])
            with Image.open(image.image_path) as picture:
                assert_pixels_match(picture, line["scene"])


# ---------------------------------------------------------------- balanced


def test_vqa_answers_are_balanced_within_each_type(built):
    for split in ("train", "val"):
        annotations = json.loads((built / "vqa" / f"v2_world_{split}_annotations.json").read_text())["annotations"]
        by_type = defaultdict(Counter)
        for annotation in annotations:
            by_type[annotation["question_type"]][annotation["multiple_choice_answer"]] += 1
        for kind, answers in world.VQA_ANSWERS.items():
            counts = [by_type[kind][answer] for answer in answers]
            assert max(counts) - min(counts) <= 1, (split, kind, by_type[kind])


def test_larger_sets_have_low_blind_baselines():
    """A question's type (or its exact words) tells little of its answer."""
    records = {}
    for split, count in (("train", 400), ("val", 120)):
        balancer, records[split] = world.VQABalancer(), []
        for index in range(count):
            rng = world.item_rng(3, f"vqa-{split}", index)
            records[split] += balancer.choose(rng, world.vqa_candidates(rng, world.sample_scene(rng)), 3)
    types = Counter(kind for kind, _, _ in records["train"])
    assert len(records["train"]) > 0.9 * 3 * 400
    assert max(types.values()) - min(types.values()) <= 0.1 * max(types.values())
    blind = make_world.vqa_blind(records)
    assert blind["prior_per_type"] < 30 and blind["prior_per_question"] < 35, blind


def test_nlvr2_labels_are_balanced_per_template(built):
    document = world.read_world(built)
    for split, count in (("train", 40), ("dev", 12)):
        lines = [json.loads(line) for line in (built / "nlvr2" / f"{split}.json").read_text().splitlines()]
        templates = {line["item"]: line["template"] for line in read_jsonl(built / "scenes" / "nlvr2.jsonl")}
        by_template = defaultdict(Counter)
        for line in lines:
            by_template[templates[line["identifier"]]][line["label"]] += 1
        assert len(lines) == count
        assert all(abs(c["True"] - c["False"]) <= 1 for c in by_template.values()), by_template
    assert document["baselines"]["nlvr2"]["majority_per_template"] == 50.0
    assert document["baselines"]["retrieval"] == {"chance_r@1_val": 33.33, "chance_r@1_test": 33.33}


def test_nlvr2_sentences_do_not_tell_their_label():
    """Parameters are drawn before the label: "there are N shapes in total" names every N as often when true as
    when false (a label drawn first would make the true ones mostly N = 4, the likeliest total)."""
    totals = {True: Counter(), False: Counter()}
    for index in range(200):
        label = index % 2 == 0
        sentence, parameters, (left, right) = world.nlvr2_example(random.Random(index), "total", label, 96)
        assert nlvr2_truth(sentence, left, right) == label
        totals[label][parameters["n"]] += 1
    for label, counts in totals.items():
        assert (counts[2] + counts[6]) / 100 > 0.28, (label, counts)  # 0.4 when N is uniform over 2..6
        assert abs(sum(n * c for n, c in counts.items()) / 100 - 4) < 0.4, (label, counts)


# ---------------------------------------------------------------- apart


def test_task_images_are_not_pretraining_images(built):
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    pretraining = set()
    for folder in ("pretrain", "pretrain-val"):
        for shard in sorted((built / folder).glob("*.tar")):
            pretraining |= {digest(image_of(files)[1]) for _, files in iter_shard(shard, Counter())}
    assert len(pretraining) == 60
    tasks = [digest(path.read_bytes()) for task in ("vqa", "nlvr2", "retrieval")
             for path in sorted((built / task / "images").rglob("*.png"))]
    assert len(tasks) == 24 + 6 + 2 * (40 + 12) + 15 + 3 + 3
    assert not pretraining & set(tasks) and len(set(tasks)) == len(tasks)
    seeds = {world.item_rng(0, name, 0).random() for name in ("pretrain", "pretrain-val", "vqa-train", "vqa-val",
                                                              "nlvr2-train", "nlvr2-dev", "retrieval-train")}
    assert len(seeds) == 7
