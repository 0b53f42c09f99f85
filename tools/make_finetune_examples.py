"""Write a tiny example of each fine-tuning task (VQA v2, NLVR2, Karpathy-split retrieval) in its public layout.

The images are synthetic "shapes" scenes drawn by tools/make_shapes_dataset.py; the questions, statements and
captions are written from the same scenes, so they are true of the images. Same arguments, same bytes.

    python tools/make_finetune_examples.py --out data/finetune --seed 0

Output:
    vqa/images/{train,val,test}/shapes_<folder>_<image id, 6 digits>.png
        (read with image_name="shapes_{folder}_{image_id:06d}.png")
    vqa/v2_OpenEnded_shapes_{train,val,test-dev}_questions.json, vqa/v2_shapes_{train,val}_annotations.json
    vqa/answer_list.json
    nlvr2/{train,dev,test1}.json; nlvr2/images/train/<directory>/train-<set>-<pair>-img{0,1}.png,
        nlvr2/images/{dev,test1}/<split>-<set>-<pair>-img{0,1}.png
    retrieval/dataset_shapes.json (Karpathy layout, "filepath": "images"), retrieval/images/<image id>.png
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.finetune.annotations import VQAQuestion, build_answer_list  # noqa: E402
from tools.make_shapes_dataset import CELLS, COLOURS, SHAPES, describe, make_caption, make_scene  # noqa: E402

VQA_IMAGES = {"train": 48, "val": 16, "test": 16}
VQA_QUESTIONS_PER_IMAGE = 3
NLVR2_PAIRS = {"train": 24, "dev": 8, "test1": 8}
NLVR2_PAIRS_PER_SET = 2
RETRIEVAL_IMAGES = {"train": 48, "restval": 16, "val": 16, "test": 16}
ANNOTATORS = 10
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
SIZES = ["small", "large"]


def save_png(image, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)


def write_json(document, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def unique(objects, key: str) -> list:
    """The objects whose ``key`` value no other object in the scene shares."""
    values = [obj[key] for obj in objects]
    return [obj for obj in objects if values.count(obj[key]) == 1]


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def shape_phrase(count: int) -> str:
    return f"{NUMBER_WORDS[count]} shape{'' if count == 1 else 's'}"


# ---------------------------------------------------------------- VQA v2


def background_questions(scene) -> list:
    first, second = scene["backgrounds"][0], scene["backgrounds"][-1]
    if scene["split"] is None:
        return [("What color is the background?", first)]
    halves = ("left", "right") if scene["split"] == "vertical" else ("top", "bottom")
    return [(f"What color is the {halves[0]} half of the background?", first),
            (f"What color is the {halves[1]} half of the background?", second)]


def vqa_candidates(rng, scene) -> list:
    """(question, answer, answer type, wrong answers an annotator might give) that are true of the scene."""
    objects, colours = scene["objects"], list(COLOURS)
    other_counts = [str(n) for n in range(1, 5) if n != len(objects)]
    candidates = [("How many shapes are there?", str(len(objects)), "number", other_counts)]
    candidates += [(question, answer, "other", [c for c in colours if c != answer])
                   for question, answer in background_questions(scene)]
    for obj in unique(objects, "shape"):
        candidates.append((f"What color is the {obj['shape']}?", obj["colour"], "other",
                           [c for c in colours if c != obj["colour"]]))
        candidates.append((f"Is the {obj['shape']} small or large?", obj["size"], "other",
                           [s for s in SIZES if s != obj["size"]]))
    for obj in unique(objects, "colour"):
        candidates.append((f"What shape is {obj['colour']}?", obj["shape"], "other",
                           [s for s in SHAPES if s != obj["shape"]]))
        candidates.append((f"Where is the {obj['colour']} {obj['shape']}?", CELLS[obj["cell"]][0], "other",
                           [name for name, _ in CELLS.values() if name != CELLS[obj["cell"]][0]]))
    present = {(obj["colour"], obj["shape"]) for obj in objects}
    shown = rng.choice(objects)
    absent = rng.choice(sorted({(c, s) for c in colours for s in SHAPES} - present))
    candidates.append((f"Is there {with_article(shown['colour'])} {shown['shape']}?", "yes", "yes/no", ["no"]))
    candidates.append((f"Is there {with_article(absent[0])} {absent[1]}?", "no", "yes/no", ["yes"]))
    return candidates


def annotator_answers(rng, answer: str, wrong_answers: list) -> list:
    """Ten answers, mostly the true one; the few dissenters share two wrong answers, so their soft scores vary
    (0.3 to 0.9)."""
    dissenters = rng.choice([0, 0, 0, 1, 1, 2, 3, 4])
    plausible = rng.sample(wrong_answers, min(2, len(wrong_answers)))
    answers = [answer] * (ANNOTATORS - dissenters) + [rng.choice(plausible) for _ in range(dissenters)]
    rng.shuffle(answers)
    return answers


def vqa_document(split: str, key: str, entries: list) -> dict:
    return {"info": {"description": "eve-ds synthetic shapes example of the VQA v2 layout"},
            "task_type": "Open-Ended", "data_type": "shapes", "data_subtype": split, key: entries}


def make_vqa(out: Path, rng, size: int):
    image_id, asked = 0, []
    for split, count in VQA_IMAGES.items():
        questions, annotations = [], []
        for _ in range(count):
            image_id += 1
            image, scene = make_scene(rng, size)
            save_png(image, out / "images" / split / f"shapes_{split}_{image_id:06d}.png")
            for number, (question, answer, answer_type, wrong) in enumerate(
                    rng.sample(vqa_candidates(rng, scene), VQA_QUESTIONS_PER_IMAGE)):
                question_id = image_id * 10 + number
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                answers = annotator_answers(rng, answer, wrong)
                annotations.append({
                    "question_id": question_id, "image_id": image_id,
                    "question_type": " ".join(question.lower().split()[:2]),
                    "answer_type": answer_type, "multiple_choice_answer": answer,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n}
                                for n, a in enumerate(answers, 1)]})
                if split != "test":
                    asked.append(VQAQuestion(question_id, Path(), question, tuple(answers)))
        questions_split = "test-dev" if split == "test" else split
        write_json(vqa_document(questions_split, "questions", questions),
                   out / f"v2_OpenEnded_shapes_{questions_split}_questions.json")
        if split != "test":
            write_json(vqa_document(split, "annotations", annotations), out / f"v2_shapes_{split}_annotations.json")
    # Every answer of train and val, so the example reads back with no answer outside the list.
    write_json(build_answer_list(asked, min_count=1), out / "answer_list.json")


# ---------------------------------------------------------------- NLVR2


def colours_of(scene) -> set:
    return {obj["colour"] for obj in scene["objects"]}


def shapes_of(scene) -> set:
    return {obj["shape"] for obj in scene["objects"]}


def nlvr2_statements(rng, left, right) -> list:
    """(sentence, truth) about a pair of scenes, true ones and false ones."""
    counts = len(left["objects"]), len(right["objects"])
    colour = rng.choice(sorted(colours_of(left) | colours_of(right)))
    shape = rng.choice(sorted(shapes_of(left) | shapes_of(right)))
    other_shape = rng.choice(SHAPES)
    obj = rng.choice(right["objects"])
    return [
        ("The left image has more shapes than the right image.", counts[0] > counts[1]),
        ("The right image has more shapes than the left image.", counts[1] > counts[0]),
        ("Both images show the same number of shapes.", counts[0] == counts[1]),
        (f"There are {shape_phrase(sum(counts))} in total.", True),
        (f"There are {shape_phrase(sum(counts) + rng.choice([-1, 1]))} in total.", False),
        (f"Both images contain {with_article(colour)} shape.", colour in colours_of(left) & colours_of(right)),
        (f"Exactly one image contains a {shape}.", (shape in shapes_of(left)) != (shape in shapes_of(right))),
        (f"Neither image contains a {other_shape}.", other_shape not in shapes_of(left) | shapes_of(right)),
        (f"The left image contains {with_article(obj['colour'])} {obj['shape']}.",
         any(o["colour"] == obj["colour"] and o["shape"] == obj["shape"] for o in left["objects"])),
        ("Both images have a plain background.", left["split"] is None and right["split"] is None),
    ]


def make_nlvr2(out: Path, rng, size: int):
    set_id = 0
    for split, pairs in NLVR2_PAIRS.items():
        lines = []
        for pair in range(pairs):
            if pair % NLVR2_PAIRS_PER_SET == 0:
                set_id += 1
            pair_name = f"{split}-{set_id}-{pair % NLVR2_PAIRS_PER_SET}"
            directory = set_id % 4 if split == "train" else None
            folder = out / "images" / split / ("" if directory is None else str(directory))
            scenes = []
            for side in (0, 1):
                image, scene = make_scene(rng, size)
                save_png(image, folder / f"{pair_name}-img{side}.png")
                scenes.append(scene)
            statements = nlvr2_statements(rng, *scenes)
            chosen = [rng.choice([s for s in statements if s[1]]), rng.choice([s for s in statements if not s[1]])]
            rng.shuffle(chosen)  # balanced labels, in no fixed order
            for sentence_id, (sentence, truth) in enumerate(chosen):
                line = {"identifier": f"{pair_name}-{sentence_id}", "sentence": sentence, "label": str(truth)}
                if directory is not None:
                    line["directory"] = directory
                lines.append(json.dumps(line))
        (out / f"{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- retrieval (Karpathy split)


def where(obj) -> str:
    return CELLS[obj["cell"]][1]


def paraphrases(scene) -> list:
    """Four more captions of the scene, worded differently from the generator's."""
    objects, background = scene["objects"], scene["background"]
    plain = [with_article(f"{obj['colour']} {obj['shape']}") for obj in objects]
    listed = plain[0] if len(plain) == 1 else ", ".join(plain[:-1]) + " and " + plain[-1]
    located = ", ".join(f"{describe(obj)} {where(obj)}" for obj in objects)
    return [
        f"{shape_phrase(len(objects)).capitalize()} on {background}",
        f"A picture of {listed}",
        f"On {background}: {located}",
        f"{background[0].upper()}{background[1:]} with {listed}",
    ]


def tokens(text: str) -> list:
    return re.findall(r"[a-z0-9]+", text.lower())


def make_retrieval(out: Path, rng, size: int):
    images, sentence_id, image_id = [], 0, 0
    for split, count in RETRIEVAL_IMAGES.items():
        for _ in range(count):
            image, scene = make_scene(rng, size)
            filename = f"{image_id:06d}.png"
            save_png(image, out / "images" / filename)
            captions = [make_caption(rng, scene["objects"], scene["background"]), *paraphrases(scene)]
            sentences = [{"tokens": tokens(c), "raw": c, "imgid": image_id, "sentid": sentence_id + n}
                         for n, c in enumerate(captions)]
            images.append({"filepath": "images", "filename": filename, "imgid": image_id, "split": split,
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
            sentence_id += len(sentences)
            image_id += 1
    write_json({"images": images, "dataset": "shapes"}, out / "dataset_shapes.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/finetune", help="output folder")
    parser.add_argument("--size", type=int, default=96, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    # One stream per task, so changing one task leaves the others' bytes alone.
    make_vqa(out / "vqa", random.Random(f"{args.seed}:vqa"), args.size)
    make_nlvr2(out / "nlvr2", random.Random(f"{args.seed}:nlvr2"), args.size)
    make_retrieval(out / "retrieval", random.Random(f"{args.seed}:retrieval"), args.size)
    print(f"wrote the VQA v2, NLVR2 and retrieval examples under {out}")


if __name__ == "__main__":
    main()
