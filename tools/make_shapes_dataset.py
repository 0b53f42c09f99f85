"""Generate the small synthetic "shapes" image-caption data set.

Every image is drawn by this script with Pillow: a plain or two-tone
background with one to three coloured shapes (circle, square, triangle,
diamond, star, ring, cross) placed on a 3x3 grid. The caption is written
from the same random choices, so it describes the image truthfully. The
images are self-made, so the data set carries no licence concerns.

Output (byte-identical for the same arguments):
    DIR/images/000000.png ...
    DIR/manifest.jsonl   one {"image": "images/000000.png", "caption": "..."} per line

Usage:
    python tools/make_shapes_dataset.py --out data/shapes --count 512 --size 96 --seed 0
"""
import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (245, 215, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
    "white": (250, 250, 250), "black": (15, 15, 15), "pink": (245, 150, 190),
    "gray": (128, 128, 128),
}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "ring", "cross"]
# Fraction of a grid cell that a shape's half-width takes up.
SIZE_SCALE = {"small": 0.22, "large": 0.42}
# Grid cell (row, column) -> (short name, phrase used in captions).
CELLS = {
    (0, 0): ("top left", "in the top left corner"), (0, 1): ("top", "at the top"),
    (0, 2): ("top right", "in the top right corner"), (1, 0): ("left", "on the left"),
    (1, 1): ("center", "in the center"), (1, 2): ("right", "on the right"),
    (2, 0): ("bottom left", "in the bottom left corner"), (2, 1): ("bottom", "at the bottom"),
    (2, 2): ("bottom right", "in the bottom right corner"),
}


def draw_shape(draw, shape, centre, radius, fill):
    x, y = centre
    box = [x - radius, y - radius, x + radius, y + radius]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, radius // 3))
    elif shape == "cross":
        arm = max(1, radius // 3)
        draw.rectangle([x - radius, y - arm, x + radius, y + arm], fill=fill)
        draw.rectangle([x - arm, y - radius, x + arm, y + radius], fill=fill)
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


def relation(a, b):
    """How grid cell a lies relative to grid cell b, e.g. 'above and to the left of'."""
    vertical = "above" if a[0] < b[0] else "below" if a[0] > b[0] else ""
    horizontal = "to the left of" if a[1] < b[1] else "to the right of" if a[1] > b[1] else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def describe(obj):
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def make_caption(rng, objects, background):
    first = objects[0]
    if len(objects) == 1:
        templates = [
            "{a} {where} on {bg}",
            "{a} {where} of the image, on {bg}",
            "{bg_cap} with {a} {where}",
        ]
        text = rng.choice(templates).format(
            a=describe(first), where=CELLS[first["cell"]][1], bg=background,
            bg_cap=background[0].upper() + background[1:])
    elif len(objects) == 2:
        second = objects[1]
        templates = [
            "{a} {rel} {b} on {bg}",
            "on {bg}, {a} {rel} {b}",
            "two shapes on {bg}: {a} {where_a} and {b} {where_b}",
        ]
        text = rng.choice(templates).format(
            a=describe(first), b=describe(second), bg=background,
            rel=relation(first["cell"], second["cell"]),
            where_a=CELLS[first["cell"]][1], where_b=CELLS[second["cell"]][1])
    else:
        parts = [f"{describe(o)} {CELLS[o['cell']][1]}" for o in objects]
        listed = f"{parts[0]}, {parts[1]} and {parts[2]}"
        text = rng.choice([
            "three shapes on {bg}: {listed}",
            "{listed}, all on {bg}",
        ]).format(bg=background, listed=listed)
    return text[0].upper() + text[1:]


def make_scene(rng, size):
    """Draw one image; return it with its scene: {"backgrounds": colour names, "split": "vertical",
    "horizontal" or None, "background": the caption's phrase, "objects": [{"cell", "shape", "colour",
    "size"}]}."""
    colour_names = list(COLOURS)
    backgrounds = rng.sample(colour_names, rng.choice([1, 2]))
    image = Image.new("RGB", (size, size), COLOURS[backgrounds[0]])
    draw = ImageDraw.Draw(image)
    if len(backgrounds) == 2:
        split_vertically = rng.random() < 0.5
        second_half = [size // 2, 0, size, size] if split_vertically else [0, size // 2, size, size]
        draw.rectangle(second_half, fill=COLOURS[backgrounds[1]])
        if split_vertically:
            first_side, second_side = "on the left", "on the right"
        else:
            first_side, second_side = "at the top", "at the bottom"
        background = (f"a background split into {backgrounds[0]} {first_side} "
                      f"and {backgrounds[1]} {second_side}")
        split = "vertical" if split_vertically else "horizontal"
    else:
        background = f"a plain {backgrounds[0]} background"
        split = None

    cell_size = size / 3
    shape_colours = [c for c in colour_names if c not in backgrounds]
    objects = []
    for cell in rng.sample(sorted(CELLS), rng.choice([1, 2, 3])):
        obj = {"cell": cell, "shape": rng.choice(SHAPES), "colour": rng.choice(shape_colours),
               "size": rng.choice(list(SIZE_SCALE))}
        radius = max(2, round(cell_size * SIZE_SCALE[obj["size"]]))
        slack = max(0, int(cell_size / 2) - radius - 1)  # jitter that keeps the shape in its cell
        centre = (int((cell[1] + 0.5) * cell_size) + rng.randint(-slack, slack),
                  int((cell[0] + 0.5) * cell_size) + rng.randint(-slack, slack))
        draw_shape(draw, obj["shape"], centre, radius, COLOURS[obj["colour"]])
        objects.append(obj)
    return image, {"backgrounds": backgrounds, "split": split, "background": background, "objects": objects}


def make_example(rng, size):
    """Draw one image and return it with its caption."""
    image, scene = make_scene(rng, size)
    return image, make_caption(rng, scene["objects"], scene["background"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shapes", help="output folder")
    parser.add_argument("--count", type=int, default=512, help="number of images")
    parser.add_argument("--size", type=int, default=96, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(out / "manifest.jsonl", "w", encoding="utf-8", newline="\n") as manifest:
        for index in range(args.count):
            image, caption = make_example(rng, args.size)
            relative_path = f"images/{index:06d}.png"
            image.save(out / relative_path, format="PNG", optimize=True)
            manifest.write(json.dumps({"image": relative_path, "caption": caption}) + "\n")
    print(f"wrote {args.count} images and {out / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
