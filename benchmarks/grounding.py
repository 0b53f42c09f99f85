"""Does a pre-trained EVE look at the picture? Masked-word accuracy on new scenes of the synthetic world, each
caption read once beside its own image and once beside another scene's image.

    python benchmarks/grounding.py runs/transfer/weights/step_1200 --world-seed 0
    python benchmarks/grounding.py runs/transfer/weights/step_1200 runs/transfer/weights/scratch-seed0 --json out.json

For every scene (drawn from the world's ``probe`` stream, which no set of ``tools/make_world.py`` draws from) the
caption lists each object, in a random order, as "a SIZE COLOUR SHAPE in the POSITION", then "on a BACKGROUND
background". For each kind of word (size, colour, shape, position, background) every word of that kind is masked at
once, the rest of the caption stays, and the image is shown whole (or with ``--image-mask-ratio`` of its patches
masked); the model's top-1 guess of each masked token is scored. With another scene's image (the next scene's) the
same captions measure what the text alone tells: the gap between the two columns is what the model reads off the
image. A model that has learned the objects scores high with its own image on every kind; one that learned only the
language prior scores the same in both columns.
"""
import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.data import world  # noqa: E402
from eve_ds.data.dataset import decode_image  # noqa: E402
from eve_ds.data.tokenizer import TextTokenizer  # noqa: E402
from eve_ds.errors import run_entry_point  # noqa: E402
from eve_ds.objectives import PretrainingModel  # noqa: E402
from eve_ds.objectives.masking import random_patch_mask  # noqa: E402

KINDS = ("size", "colour", "shape", "position", "background")
PROBE_SET = "probe"


def probe_caption(scene: dict, order=None) -> list:
    """The caption of a scene as (word, kind or None) pairs, the objects in ``order`` (indices; default: cell order).
    Pre-training captions name the objects in a random order, and so should a probe: in cell order the first
    object's position is mostly "top left", which the text alone would then tell."""
    words = []
    objects = [scene["objects"][index] for index in order] if order is not None else scene["objects"]
    for number, obj in enumerate(objects):
        if number:
            words.append(("and", None))
        words += [("a", None), (obj["size"], "size"), (obj["colour"], "colour"), (obj["shape"], "shape"),
                  ("in", None), ("the", None)] + [(part, "position") for part in obj["position"].split()]
    return words + [("on", None), ("a", None), (scene["background"], "background"), ("background", None)]


def masked_caption(tokenizer: TextTokenizer, words: list, kind: str) -> tuple:
    """(input ids, labels, padding mask) of the caption with every token of the words of ``kind`` masked (labels
    -100 elsewhere)."""
    text = " ".join(word for word, _ in words)
    ids, padding_mask, _ = tokenizer.encode(text)
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    starts, position = [], 0
    for word, _ in words:
        starts.append(position)
        position += len(word) + 1
    labels = torch.full_like(ids, -100)
    for token_index, (begin, _) in enumerate(encoding.offsets[:tokenizer.max_len - 2]):
        word_index = max(i for i, start in enumerate(starts) if start <= begin)
        if words[word_index][1] == kind:
            labels[token_index + 1] = ids[token_index + 1]  # +1: the class token
    inputs = ids.masked_fill(labels != -100, tokenizer.mask_id)
    return inputs, labels, padding_mask


@torch.no_grad()
def grounding(weights, world_seed: int = 0, scenes: int = 256, image_mask_ratio: float = 0.0, batch_size: int = 64,
              device: str = "cpu") -> dict:
    """{kind: {"own": top-1 %, "other": top-1 %, "tokens": n}} of a consolidated pre-training folder; with
    ``image_mask_ratio``, that share of each image's patches is masked at random (the same patches in both columns)."""
    model = PretrainingModel.from_pretrained(weights).eval().to(device)
    model.check_reconstructs(weights)
    config = model.config
    tokenizer = TextTokenizer.from_folder(weights, config.max_text_len)
    rngs = [world.item_rng(world_seed, PROBE_SET, index) for index in range(scenes)]
    drawn = [world.sample_scene(rng, config.image_size) for rng in rngs]
    orders = [rng.sample(range(len(scene["objects"])), len(scene["objects"])) for rng, scene in zip(rngs, drawn)]
    images = torch.stack([decode_image(world.png_bytes(scene), config.image_size) for scene in drawn])
    patches = config.num_image_tokens - 1
    image_mask = torch.stack([random_patch_mask(patches, round(image_mask_ratio * patches), random.Random(index))
                              for index in range(scenes)])
    results = {}
    for kind in KINDS:
        texts = [masked_caption(tokenizer, probe_caption(scene, order), kind) for scene, order in zip(drawn, orders)]
        inputs, labels, padding = (torch.stack(part) for part in zip(*texts))
        row = {"tokens": int((labels != -100).sum())}
        for name, order in (("own", torch.arange(scenes)), ("other", torch.arange(scenes).roll(-1))):
            correct = 0
            for start in range(0, scenes, batch_size):
                part = slice(start, start + batch_size)
                hidden, _ = model.encoder(images[order[part]].to(device), inputs[part].to(device),
                                          padding[part].to(device), image_mask[part].to(device))
                targets = labels[part].to(device)
                chosen = targets != -100
                logits = model.text_head(hidden[:, config.num_image_tokens:][chosen])
                correct += int((logits.argmax(-1) == targets[chosen]).sum())
            row[name] = 100 * correct / max(row["tokens"], 1)
        results[kind] = row
    return results


def unbound_level(world_seed: int = 0, scenes: int = 256) -> dict:
    """{kind: top-1 %} of a reader that knows every object of the scene but not which one a phrase is about: for each
    masked word it names the word of a random object of the scene (for a position, that object's row or column
    word). A model at this level has learned what is in the picture without binding it to the words around the
    mask; one above it reads which object is meant."""
    drawn = [world.sample_scene(world.item_rng(world_seed, PROBE_SET, index)) for index in range(scenes)]
    hits = {kind: [0.0, 0] for kind in KINDS}
    for scene in drawn:
        objects = scene["objects"]
        hits["background"][0] += 1
        hits["background"][1] += 1
        for obj in objects:
            for kind in ("size", "colour", "shape"):
                hits[kind][0] += sum(other[kind] == obj[kind] for other in objects) / len(objects)
                hits[kind][1] += 1
            for part, word in enumerate(obj["position"].split()):
                hits["position"][0] += sum(other["position"].split()[part] == word for other in objects) / len(objects)
                hits["position"][1] += 1
    return {kind: 100 * right / count for kind, (right, count) in hits.items()}


UNBOUND = "knows the objects, not which is which"


def table(rows: dict, unbound: dict = None) -> str:
    """A markdown table of {name: grounding(...)}, with the ``unbound_level`` row where given."""
    lines = ["| weights | " + " | ".join(f"{kind} own / other" for kind in KINDS) + " |",
             "|---" * (len(KINDS) + 1) + "|"]
    for name, result in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{result[kind]['own']:.1f} / {result[kind]['other']:.1f}"
                                                 for kind in KINDS) + " |")
    if unbound is not None:
        lines.append(f"| *{UNBOUND}* | " + " | ".join(f"{unbound[kind]:.1f} / -" for kind in KINDS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="+", help="consolidated pre-training folders (tools/consolidate.py)")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=256)
    parser.add_argument("--image-mask-ratio", type=float, default=0.0,
                        help="share of each image's patches masked at random (default: none, the image whole)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    rows = {str(path): grounding(path, args.world_seed, args.scenes, args.image_mask_ratio) for path in args.weights}
    print(f"Masked-word top-1 accuracy (%) on {args.scenes} new scenes of world {args.world_seed}, "
          f"{args.image_mask_ratio:.0%} of the image masked: "
          "with the scene's own image / with another scene's")
    print(table(rows, unbound_level(args.world_seed, args.scenes)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    run_entry_point(main, "grounding")
