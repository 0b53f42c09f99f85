"""The synthetic vision-language "world": scenes of large flat shapes, drawn with Pillow, and everything that is
said about them (pre-training captions, VQA questions, NLVR2 statements, retrieval captions), written from the
same random choices so that it is true of the picture. ``tools/make_world.py`` writes a world to disk; this module
is what it (and a benchmark or probe that wants the scenes) imports.

Design, at the default 96 px (eve-tiny: patch 16, a 6x6 patch grid):

- The image is a 2x2 grid of cells of 48x48 px (3x3 patches each): "top left", "top right", "bottom left",
  "bottom right". A scene has 1 to 3 objects, each in its own cell.
- An object has a shape (circle, square, triangle, diamond, star, cross), a colour (red, green, blue, yellow,
  purple, orange, white) and a size: small spans 30-34 px (about 2x2 patches), large 42-46 px (about 3x3
  patches, nearly its whole cell). Small objects are jittered inside their cell.
- The background is plain gray, black or brown: colours that no object has. Every colour is drawn with a small
  per-image jitter (+-10 per channel), so no two images are alike byte for byte, and names stay unambiguous.
- Relations come from the grid: A is "to the left of" B when A's column is left of B's (any row), "above" B
  when A's row is above B's; a diagonal pair has both a horizontal and a vertical relation.

Every random choice is drawn from ``random.Random`` streams named by strings (``item_rng``), so one item's
scene does not depend on which process draws it or on how many items come before it.
"""
import io
import json
import math
import random
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

OBJECT_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (245, 245, 245),
}
BACKGROUNDS = {"gray": (115, 115, 115), "black": (25, 25, 25), "brown": (110, 70, 40)}
COLOUR_JITTER = 10
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Half the object's width in pixels at 96 px: (smallest, largest).
RADII = {"small": (15, 17), "large": (21, 23)}
SIZES = tuple(RADII)
REFERENCE_SIZE = 96
# (row, column) -> name; the image is a 2x2 grid of cells.
CELLS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
POSITIONS = tuple(CELLS.values())
MAX_OBJECTS = 3
NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
RELATIONS = ("to the left of", "to the right of", "above", "below")


def item_rng(world_seed: int, set_name: str, index) -> random.Random:
    """The random stream of one item of one set: a string seed, hashed by ``random`` (sha512), the same in every
    process and Python run."""
    return random.Random(f"eve-ds world {world_seed} {set_name} {index}")


# ---------------------------------------------------------------- scenes


def jittered(rng, rgb) -> list:
    return [min(255, max(0, channel + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for channel in rgb]


def sample_scene(rng, size: int = REFERENCE_SIZE, count: int = None) -> dict:
    """A scene: {"background", "background_rgb", "objects": [{"shape", "colour", "size", "cell": [row, col],
    "position", "centre": [x, y], "radius", "rgb"}]} with objects in cell order. Plain data (JSON-able)."""
    scale = size / REFERENCE_SIZE
    cell_size = size / 2
    background = rng.choice(sorted(BACKGROUNDS))
    count = count or rng.randint(1, MAX_OBJECTS)
    objects = []
    for cell in sorted(rng.sample(sorted(CELLS), count)):
        shape, colour, object_size = rng.choice(SHAPES), rng.choice(sorted(OBJECT_COLOURS)), rng.choice(SIZES)
        low, high = RADII[object_size]
        radius = max(2, round(rng.randint(low, high) * scale))
        slack = max(0, int(cell_size / 2) - radius - 1)  # jitter that keeps the object in its cell
        centre = [int((cell[1] + 0.5) * cell_size) + rng.randint(-slack, slack),
                  int((cell[0] + 0.5) * cell_size) + rng.randint(-slack, slack)]
        objects.append({"shape": shape, "colour": colour, "size": object_size, "cell": list(cell),
                        "position": CELLS[cell], "centre": centre, "radius": radius,
                        "rgb": jittered(rng, OBJECT_COLOURS[colour])})
    return {"size": size, "background": background, "background_rgb": jittered(rng, BACKGROUNDS[background]),
            "objects": objects}


def draw_shape(draw, shape: str, centre, radius: int, fill):
    x, y = centre
    box = [x - radius, y - radius, x + radius, y + radius]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        inset = round(radius * 0.1)  # a square of the same width looks bigger than the other shapes
        draw.rectangle([x - radius + inset, y - radius + inset, x + radius - inset, y + radius - inset], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=fill)
    elif shape == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((x + r * math.cos(angle), y + r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        arm = max(1, round(radius / 3))
        draw.rectangle([x - radius, y - arm, x + radius, y + arm], fill=fill)
        draw.rectangle([x - arm, y - radius, x + arm, y + radius], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict) -> Image.Image:
    size = scene["size"]
    image = Image.new("RGB", (size, size), tuple(scene["background_rgb"]))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        draw_shape(draw, obj["shape"], obj["centre"], obj["radius"], tuple(obj["rgb"]))
    return image


def png_bytes(scene: dict) -> bytes:
    buffer = io.BytesIO()
    render(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def nearest_colour(rgb) -> str:
    """The name of the palette colour (objects' and backgrounds') nearest to ``rgb``."""
    palette = {**OBJECT_COLOURS, **BACKGROUNDS}
    return min(palette, key=lambda name: sum((a - b) ** 2 for a, b in zip(palette[name], rgb)))


# ---------------------------------------------------------------- words


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def describe(obj) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def join(parts: list) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relations(a, b) -> list:
    """Every relation phrase true of object a relative to object b (grid cells)."""
    true = []
    if a["cell"][1] < b["cell"][1]:
        true.append("to the left of")
    if a["cell"][1] > b["cell"][1]:
        true.append("to the right of")
    if a["cell"][0] < b["cell"][0]:
        true.append("above")
    if a["cell"][0] > b["cell"][0]:
        true.append("below")
    return true


def holds(relation: str, a, b) -> bool:
    return relation in relations(a, b)


def plural(count: int, noun: str) -> str:
    return f"{NUMBER_WORDS[count]} {noun}{'' if count == 1 else 's'}"


# ---------------------------------------------------------------- captions

def _caption_list(rng, objects, bg):
    located = [f"{describe(o)} in the {o['position']}" for o in objects]
    return f"{join(located)} on a {bg} background"


def _caption_background_first(rng, objects, bg):
    located = [f"{describe(o)} in the {o['position']}" for o in objects]
    return f"a {bg} background with {join(located)}"


def _caption_count(rng, objects, bg):
    if len(objects) == 1:
        return f"there is one object on a {bg} background: {describe(objects[0])}"
    return f"there are {plural(len(objects), 'object')} on a {bg} background: {join([describe(o) for o in objects])}"


def _caption_each(rng, objects, bg):
    plain = [f"one {o['colour']} {o['shape']}" for o in objects]
    return f"{plural(len(objects), 'shape')} on a {bg} background, {join(plain)}"


def _caption_relation(rng, objects, bg):
    if len(objects) == 1:
        obj = objects[0]
        return f"a {bg} picture with a single {obj['size']} {obj['colour']} {obj['shape']} in the {obj['position']}"
    a, b = rng.sample(objects, 2)
    text = f"{describe(a)} {rng.choice(relations(a, b))} {describe(b)}"
    rest = [o for o in objects if o is not a and o is not b]
    if rest:
        text += f" and {describe(rest[0])} in the {rest[0]['position']}"
    return f"{text} on a {bg} background"


def _caption_where(rng, objects, bg):
    return join([f"in the {o['position']} is {describe(o)}" for o in objects])


def _caption_attributes(rng, objects, bg):
    return join([f"the {o['size']} {o['shape']} in the {o['position']} is {o['colour']}" for o in objects])


def _caption_colours(rng, objects, bg):
    named = [with_article(f"{o['colour']} {o['shape']}") for o in objects]
    return f"{join(named)} on {with_article(bg)} background"


CAPTION_TEMPLATES = {
    "list": _caption_list, "background_first": _caption_background_first, "count": _caption_count,
    "each": _caption_each, "relation": _caption_relation, "where": _caption_where,
    "attributes": _caption_attributes, "colours": _caption_colours,
}


def captions(rng, scene: dict, count: int = 5) -> list:
    """``count`` captions of the scene, each from a different template (at most len(CAPTION_TEMPLATES)), the
    objects named in a random order in each."""
    chosen = rng.sample(sorted(CAPTION_TEMPLATES), min(count, len(CAPTION_TEMPLATES)))
    texts = []
    for name in chosen:
        objects = list(scene["objects"])
        rng.shuffle(objects)
        texts.append(CAPTION_TEMPLATES[name](rng, objects, scene["background"]))
    return texts


# ---------------------------------------------------------------- VQA

# Question type -> the answers it has; questions are chosen so that each type's answers come out balanced.
VQA_ANSWERS = {
    "color": sorted(OBJECT_COLOURS), "shape": list(SHAPES), "count": [str(n) for n in range(1, MAX_OBJECTS + 1)],
    "position": list(POSITIONS), "existence": ["yes", "no"], "relation": list(SHAPES) + sorted(OBJECT_COLOURS),
}
VQA_ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "position": "other",
                    "existence": "yes/no", "relation": "other"}


def _unique(objects, *keys) -> list:
    values = [tuple(o[k] for k in keys) for o in objects]
    return [o for o, value in zip(objects, values) if values.count(value) == 1]


def _references(objects, obj, avoid: str) -> list:
    """Noun phrases ("the circle", "the red shape", ...) that pick ``obj`` out of ``objects`` without naming
    its ``avoid`` attribute."""
    phrases = []
    if avoid != "shape":
        if obj in _unique(objects, "shape"):
            phrases.append(f"the {obj['shape']}")
        if obj in _unique(objects, "size", "shape"):
            phrases.append(f"the {obj['size']} {obj['shape']}")
    if avoid != "colour" and obj in _unique(objects, "colour"):
        phrases.append(f"the {obj['colour']} shape")
    if avoid not in ("shape", "colour") and obj in _unique(objects, "colour", "shape"):
        phrases.append(f"the {obj['colour']} {obj['shape']}")
    if avoid != "position":
        phrases.append(f"the shape in the {obj['position']}")
    return phrases


def vqa_candidates(rng, scene: dict) -> list:
    """(type, question, answer) questions true of the scene, several of each type where the scene allows."""
    objects = scene["objects"]
    candidates = []
    for obj in objects:
        for phrase in _references(objects, obj, "colour"):
            candidates.append(("color", rng.choice([f"what color is {phrase}?", f"what is the color of {phrase}?"]),
                               obj["colour"]))
        for phrase in _references(objects, obj, "shape"):
            if phrase.startswith("the shape in the "):
                question = f"what shape is in the {obj['position']}?"
            else:
                question = f"what shape is {phrase.replace(' shape', ' object')}?"
            candidates.append(("shape", question, obj["shape"]))
        for phrase in _references(objects, obj, "position"):
            candidates.append(("position", f"where is {phrase}?", obj["position"]))
    candidates.append(("count", rng.choice(["how many objects are there?", "how many shapes are there?",
                                            "how many shapes are in the picture?"]), str(len(objects))))
    present = sorted({(o["colour"], o["shape"]) for o in objects})
    absent = sorted({(c, s) for c in OBJECT_COLOURS for s in SHAPES} - set(present))
    for (colour, shape), answer in ((rng.choice(present), "yes"), (rng.choice(absent), "no")):
        candidates.append(("existence", f"is there {with_article(colour)} {shape}?", answer))
    for b in objects:
        for relation in RELATIONS:
            related = [a for a in objects if a is not b and holds(relation, a, b)]
            if len(related) != 1:
                continue
            a = related[0]
            for phrase in _references(objects, b, "position"):
                candidates.append(("relation", f"what shape is {relation} {phrase}?", a["shape"]))
                candidates.append(("relation", f"what color is the shape {relation} {phrase}?", a["colour"]))
    return candidates


class VQABalancer:
    """Picks each image's questions so that the question types come out equally often and, within a type, every
    answer equally often (within ``slack`` of the type's rarest answer)."""

    def __init__(self, slack: int = 1):
        self.slack = slack
        self.type_counts = Counter({kind: 0 for kind in VQA_ANSWERS})
        self.answer_counts = {kind: Counter({answer: 0 for answer in answers}) for kind, answers in VQA_ANSWERS.items()}

    def choose(self, rng, candidates: list, count: int) -> list:
        by_type = {}
        for candidate in candidates:
            by_type.setdefault(candidate[0], []).append(candidate)
        kinds = sorted(by_type, key=lambda kind: (self.type_counts[kind], rng.random()))
        chosen = []
        for kind in kinds:
            if len(chosen) == count:
                break
            answers = self.answer_counts[kind]
            ceiling = min(answers.values()) + self.slack
            allowed = [c for c in by_type[kind] if answers[c[2]] < ceiling or answers[c[2]] == min(answers.values())]
            if not allowed:
                continue
            lowest = min(answers[c[2]] for c in allowed)
            pick = rng.choice([c for c in allowed if answers[c[2]] == lowest])
            chosen.append(pick)
            self.type_counts[kind] += 1
            answers[pick[2]] += 1
        return chosen


# ---------------------------------------------------------------- NLVR2


def _colours(scene) -> set:
    return {o["colour"] for o in scene["objects"]}


def _shapes(scene) -> set:
    return {o["shape"] for o in scene["objects"]}


def _has(scene, colour, shape) -> bool:
    return any(o["colour"] == colour and o["shape"] == shape for o in scene["objects"])


def _side(pair, side):
    return pair[0] if side == "left" else pair[1]


def _count(scene) -> int:
    return len(scene["objects"])


def _relation_in(scene, colour_a, relation, colour_b) -> bool:
    return any(a["colour"] == colour_a and b["colour"] == colour_b and holds(relation, a, b)
               for a in scene["objects"] for b in scene["objects"] if a is not b)


# Template name -> (parameter sampler, sentence, truth of a (left, right) pair of scenes). Parameters are drawn
# before the label, and the pair is drawn until the statement has the label: nothing in the sentence tells the label.
NLVR2_TEMPLATES = {
    "left_more": (lambda rng: {}, lambda p: "the left image has more shapes than the right image",
                  lambda pair, p: _count(pair[0]) > _count(pair[1])),
    "right_more": (lambda rng: {}, lambda p: "the right image has more shapes than the left image",
                   lambda pair, p: _count(pair[1]) > _count(pair[0])),
    "same_count": (lambda rng: {}, lambda p: "both images have the same number of shapes",
                   lambda pair, p: _count(pair[0]) == _count(pair[1])),
    "total": (lambda rng: {"n": rng.randint(2, 2 * MAX_OBJECTS)},
              lambda p: f"there are {plural(p['n'], 'shape')} in total",
              lambda pair, p: _count(pair[0]) + _count(pair[1]) == p["n"]),
    "both_colour": (lambda rng: {"colour": rng.choice(sorted(OBJECT_COLOURS))},
                    lambda p: f"both images contain {with_article(p['colour'])} shape",
                    lambda pair, p: p["colour"] in _colours(pair[0]) & _colours(pair[1])),
    "exactly_one_shape": (lambda rng: {"shape": rng.choice(SHAPES)},
                          lambda p: f"there is {with_article(p['shape'])} in exactly one image",
                          lambda pair, p: (p["shape"] in _shapes(pair[0])) != (p["shape"] in _shapes(pair[1]))),
    "neither_shape": (lambda rng: {"shape": rng.choice(SHAPES)},
                      lambda p: f"neither image contains {with_article(p['shape'])}",
                      lambda pair, p: p["shape"] not in _shapes(pair[0]) | _shapes(pair[1])),
    "side_has": (lambda rng: {"side": rng.choice(["left", "right"]), "colour": rng.choice(sorted(OBJECT_COLOURS)),
                              "shape": rng.choice(SHAPES)},
                 lambda p: f"the {p['side']} image contains {with_article(p['colour'])} {p['shape']}",
                 lambda pair, p: _has(_side(pair, p["side"]), p["colour"], p["shape"])),
    "each_count": (lambda rng: {"n": rng.randint(1, MAX_OBJECTS)},
                   lambda p: f"each image contains exactly {plural(p['n'], 'shape')}",
                   lambda pair, p: _count(pair[0]) == _count(pair[1]) == p["n"]),
    "relation": (lambda rng: {"side": rng.choice(["left", "right"]), "a": rng.choice(sorted(OBJECT_COLOURS)),
                              "relation": rng.choice(RELATIONS), "b": rng.choice(sorted(OBJECT_COLOURS))},
                 lambda p: f"in the {p['side']} image {with_article(p['a'])} shape is {p['relation']} "
                           f"{with_article(p['b'])} shape",
                 lambda pair, p: _relation_in(_side(pair, p["side"]), p["a"], p["relation"], p["b"])),
}


def nlvr2_example(rng, template: str, label: bool, size: int, max_tries: int = 20000) -> tuple:
    """(sentence, parameters, (left scene, right scene)) with the statement's truth equal to ``label``. The
    parameters are drawn first, then pairs of scenes until one fits; parameters that no pair fits within
    ``max_tries`` are drawn again."""
    sample, sentence, truth = NLVR2_TEMPLATES[template]
    while True:
        parameters = sample(rng)
        for _ in range(max_tries):
            pair = (sample_scene(rng, size), sample_scene(rng, size))
            if truth(pair, parameters) == label:
                return sentence(parameters), parameters, pair


# ---------------------------------------------------------------- reading a world


# The fine-tuning options (launch/finetune.py, eve_ds/finetune/tasks.py add_data_arguments) whose values are paths.
PATH_OPTIONS = {"--train-questions", "--train-annotations", "--train-images", "--val-questions", "--val-annotations",
                "--val-images", "--answer-list", "--nlvr2-train", "--nlvr2-train-images", "--nlvr2-val",
                "--nlvr2-val-images", "--karpathy", "--karpathy-images"}
WORLD_FILE = "world.json"
WORLD_PLACEHOLDER = "{world}"  # the world's folder, in world.json's "finetune_options"


def read_world(world_dir) -> dict:
    return json.loads((Path(world_dir) / WORLD_FILE).read_text(encoding="utf-8"))


# Options that keep the world's texts true of the images the model sees (world.json "recommended"): the default
# augmentations make about a quarter of them false. Pre-training's random resized crop (50-100% of the area) zooms
# by up to 1.4x, which makes a small object as wide as a large one, cuts some part of an object off in most views
# and an object's centre in about 14% of them (counts, colours and positions then go wrong); fine-tuning's "rand"
# (AutoContrast, Equalize, Brightness) and "color" (brightness, saturation) policies move an object's colour to
# another colour's name in about 23% and 31% of the images. Which to use is the benchmark's choice.
RECOMMENDED_OPTIONS = {"pretrain": ["--no-augment"], "finetune": ["--augmentation", "none"]}


def finetune_options(world_dir, task: str, recommended: bool = False) -> list:
    """launch/finetune.py's data options for ``task`` ("vqa", "nlvr2", "retrieval") of the world in ``world_dir``,
    with absolute paths (world.json's "finetune_options" name the world's folder WORLD_PLACEHOLDER); with
    ``recommended``, followed by RECOMMENDED_OPTIONS["finetune"]."""
    world_dir = Path(world_dir).resolve()
    document = read_world(world_dir)
    resolved = [option.replace(WORLD_PLACEHOLDER, str(world_dir)) for option in document["finetune_options"][task]]
    return resolved + (list(document["recommended"]["finetune"]) if recommended else [])


def pretrain_options(world_dir, recommended: bool = False) -> list:
    """launch/pretrain.py's data options for the world: --data, --tokenizer and --val-data, absolute; with
    ``recommended``, followed by RECOMMENDED_OPTIONS["pretrain"]."""
    world_dir = Path(world_dir).resolve()
    document = read_world(world_dir)
    data = document["pretrain"]
    options = ["--data", str(world_dir / data["data"]), "--tokenizer", str(world_dir / data["tokenizer"])]
    if data.get("val_data"):
        options += ["--val-data", str(world_dir / data["val_data"])]
    return options + (list(document["recommended"]["pretrain"]) if recommended else [])
