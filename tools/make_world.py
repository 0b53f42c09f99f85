"""Write a synthetic vision-language world: pre-training shards, VQA v2, NLVR2 and retrieval sets, a tokenizer.

Every image is a scene of eve_ds/data/world.py (one to three large flat shapes on a 2x2 grid of a plain
background; at 96 px a small object spans about 2x2 patches of 16 px, a large one about 3x3), and every text is
written from the same random choices, so it is true of its picture. Same arguments, same bytes (--workers aside);
each set's items draw from their own seeds (world seed, set name, item number), so no task image is a
pre-training image.

    python tools/make_world.py --out /data/world --world-seed 0 [--pretrain-images 20000] [--vqa-images 700]
        [--nlvr2-pairs 1000] [--retrieval-images 500] [--size 96] [--workers 2]

Output (world.json's paths are relative to DIR, its fine-tuning options' paths start with "{world}" for DIR;
eve_ds.data.world.finetune_options and pretrain_options make them absolute):
    pretrain/{00000..}.tar + index.json   image-text shards as tools/make_shards.py writes them (KEY.png, KEY.txt,
                                          KEY.json with 5 captions from different templates); launch/pretrain.py --data
    pretrain-val/                         the same for --val-data (other seeds)
    tokenizer.json                        BPE over every text of the world (tools/train_tokenizer.py's tokenizer)
    vqa/v2_OpenEnded_world_{train,val}_questions.json, vqa/v2_world_{train,val}_annotations.json,
        vqa/answer_list.json, vqa/images/{train,val}/world_<split>_<image id, 6 digits>.png
    nlvr2/{train,dev}.json, nlvr2/images/train/<directory>/train-<set>-<pair>-img{0,1}.png,
        nlvr2/images/dev/dev-<set>-<pair>-img{0,1}.png
    retrieval/dataset_world.json (Karpathy layout: train, val, test; 5 captions each), retrieval/images/*.png
    scenes/<set>.jsonl                    every item's scene (objects, colours, cells, centres), for probes
    world.json                            arguments, design, counts, launch/finetune.py options per task, the
                                          blind baselines of the task sets
"""
import argparse
import json
import math
import os
import shutil
import sys
import tarfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint.pretrained import write_atomically  # noqa: E402
from eve_ds.data import world  # noqa: E402
from eve_ds.data.shards import add_sample, write_index  # noqa: E402
from eve_ds.finetune.annotations import VQAQuestion, build_answer_list  # noqa: E402
from eve_ds.finetune.metrics import vqa_accuracy  # noqa: E402

OWNED = ("pretrain", "pretrain-val", "vqa", "nlvr2", "retrieval", "scenes", "tokenizer.json", world.WORLD_FILE)
VQA_QUESTIONS_PER_IMAGE = 3
ANNOTATORS = 10
RETRIEVAL_CAPTIONS = 5
TOKENIZER_VOCAB, TOKENIZER_MIN_FREQUENCY = 1000, 2
IMAGE_NAME = "world_{folder}_{image_id:06d}.png"


def write_json(document, path: Path, indent=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=indent) + "\n", encoding="utf-8")


def write_lines(lines: list, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def scene_line(name: str, scene: dict, **extra) -> str:
    return json.dumps({"item": name, **extra, "scene": scene}, separators=(",", ":"))


# ---------------------------------------------------------------- pre-training shards (worker processes)


def write_pretrain_shard(job: tuple) -> tuple:
    """Writes one shard of images [start, stop) of a set; returns (shard name, samples, captions, scene lines)."""
    folder, set_name, number, start, stop, seed, size, captions_per_image = job
    path = Path(folder) / f"{number:05d}.tar"
    texts, lines = [], []

    def write(temporary: Path):
        with tarfile.open(temporary, "w") as archive:
            for index in range(start, stop):
                rng = world.item_rng(seed, set_name, index)
                scene = world.sample_scene(rng, size)
                captions = world.captions(rng, scene, captions_per_image)
                key = f"{index:09d}"
                add_sample(archive, key, ("png", world.png_bytes(scene)), captions)
                texts.extend(captions)
                lines.append(scene_line(key, scene, shard=path.name, captions=captions))

    write_atomically(path, write)
    return path.name, stop - start, texts, lines


def write_pretrain_set(pool, out: Path, folder_name: str, set_name: str, count: int, args) -> tuple:
    """(captions, shard count) of one shard set; its scenes go to scenes/<set>.jsonl."""
    folder = out / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), set_name, number, start, min(count, start + args.shard_size), args.world_seed, args.size,
             args.captions) for number, start in enumerate(range(0, count, args.shard_size))]
    counts, texts, lines = {}, [], []
    for name, samples, shard_texts, shard_lines in (pool.map(write_pretrain_shard, jobs) if pool
                                                     else map(write_pretrain_shard, jobs)):
        counts[name] = samples
        texts += shard_texts
        lines += shard_lines
    write_index(folder, counts)
    write_lines(lines, out / "scenes" / f"{set_name}.jsonl")
    return texts, len(counts)


def save_images(jobs: list):
    for scene, path in jobs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(world.png_bytes(scene))


def save_all(pool, jobs: list, workers: int):
    """Renders and writes (scene, path) jobs, in chunks over the pool."""
    chunk = max(1, math.ceil(len(jobs) / (4 * max(1, workers))))
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    list(pool.map(save_images, chunks) if pool else map(save_images, chunks))


# ---------------------------------------------------------------- VQA v2


def vqa_document(split: str, key: str, entries: list) -> dict:
    return {"info": {"description": "eve-ds synthetic world (tools/make_world.py) in the VQA v2 layout"},
            "task_type": "Open-Ended", "data_type": "world", "data_subtype": split, key: entries}


def make_vqa(out: Path, args, images: dict, pool) -> tuple:
    """Returns ({split: [(type, question, answer)]}, texts)."""
    records, texts, image_jobs, image_id, lines = {}, [], [], 0, []
    for split, count in images.items():
        balancer = world.VQABalancer()
        questions, annotations, records[split] = [], [], []
        for index in range(count):
            image_id += 1
            rng = world.item_rng(args.world_seed, f"vqa-{split}", index)
            scene = world.sample_scene(rng, args.size)
            image_path = out / "images" / split / IMAGE_NAME.format(folder=split, image_id=image_id)
            image_jobs.append((scene, str(image_path)))
            chosen = balancer.choose(rng, world.vqa_candidates(rng, scene), VQA_QUESTIONS_PER_IMAGE)
            for number, (kind, question, answer) in enumerate(chosen):
                question_id = image_id * 10 + number
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotations.append({
                    "question_id": question_id, "image_id": image_id, "question_type": kind,
                    "answer_type": world.VQA_ANSWER_TYPES[kind], "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": n}
                                for n in range(1, ANNOTATORS + 1)]})
                records[split].append((kind, question, answer))
                texts += [question, answer]
            lines.append(scene_line(image_path.relative_to(out).as_posix(), scene, image_id=image_id,
                                    questions=[q for _, q, _ in chosen]))
        write_json(vqa_document(split, "questions", questions), out / f"v2_OpenEnded_world_{split}_questions.json")
        write_json(vqa_document(split, "annotations", annotations), out / f"v2_world_{split}_annotations.json")
    asked = [VQAQuestion(0, Path(), question, (answer, ))
             for split in records for _, question, answer in records[split]]
    write_json(build_answer_list(asked, min_count=1), out / "answer_list.json")
    write_lines(lines, out.parent / "scenes" / "vqa.jsonl")
    save_all(pool, image_jobs, args.workers)
    return records, texts


# ---------------------------------------------------------------- NLVR2


def nlvr2_labels(seed: int, split: str, template: str, occurrence: int) -> bool:
    """Occurrences 2j and 2j+1 of a template get True and False in an order drawn for j: balanced labels per
    template, in no fixed order."""
    order = world.item_rng(seed, f"nlvr2-{split}-labels", f"{template} {occurrence // 2}").random() < 0.5
    return (occurrence % 2 == 0) == order


def make_nlvr2(out: Path, args, pairs: dict, pool) -> tuple:
    """Returns ({split: [(template, sentence, label)]}, texts)."""
    templates = sorted(world.NLVR2_TEMPLATES)
    records, texts, image_jobs, lines = {}, [], [], []
    for split, count in pairs.items():
        rows, records[split], seen = [], [], Counter()
        for index in range(count):
            template = templates[index % len(templates)]
            label = nlvr2_labels(args.world_seed, split, template, seen[template])
            seen[template] += 1
            rng = world.item_rng(args.world_seed, f"nlvr2-{split}", index)
            sentence, parameters, scenes = world.nlvr2_example(rng, template, label, args.size)
            set_id, pair = divmod(index, 2)
            pair_name = f"{split}-{set_id}-{pair}"
            row = {"identifier": f"{pair_name}-0", "sentence": sentence, "label": str(label)}
            folder = out / "images" / split
            if split == "train":
                row["directory"] = set_id % 10
                folder = folder / str(row["directory"])
            for side, scene in enumerate(scenes):
                image_jobs.append((scene, str(folder / f"{pair_name}-img{side}.png")))
            rows.append(json.dumps(row))
            records[split].append((template, sentence, label))
            texts.append(sentence)
            lines.append(json.dumps({"item": row["identifier"], "template": template, "parameters": parameters,
                                     "label": label, "scenes": list(scenes)}, separators=(",", ":")))
        write_lines(rows, out / f"{split}.json")
    write_lines(lines, out.parent / "scenes" / "nlvr2.jsonl")
    save_all(pool, image_jobs, args.workers)
    return records, texts


# ---------------------------------------------------------------- retrieval (Karpathy split)


def make_retrieval(out: Path, args, images: dict, pool) -> tuple:
    """Returns ({split: image count}, texts)."""
    entries, texts, image_jobs, lines, sentence_id, image_id = [], [], [], [], 0, 0
    for split, count in images.items():
        for index in range(count):
            rng = world.item_rng(args.world_seed, f"retrieval-{split}", index)
            scene = world.sample_scene(rng, args.size)
            captions = world.captions(rng, scene, RETRIEVAL_CAPTIONS)
            filename = f"{image_id:06d}.png"
            image_jobs.append((scene, str(out / "images" / filename)))
            sentences = [{"tokens": caption.replace(",", " ,").replace(":", " :").split(), "raw": caption,
                          "imgid": image_id, "sentid": sentence_id + n} for n, caption in enumerate(captions)]
            entries.append({"filepath": "images", "filename": filename, "imgid": image_id, "split": split,
                            "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
            texts += captions
            lines.append(scene_line(f"images/{filename}", scene, split=split, captions=captions))
            sentence_id += len(sentences)
            image_id += 1
    write_json({"images": entries, "dataset": "world"}, out / "dataset_world.json")
    write_lines(lines, out.parent / "scenes" / "retrieval.jsonl")
    save_all(pool, image_jobs, args.workers)
    return dict(images), texts


# ---------------------------------------------------------------- tokenizer


def write_tokenizer(texts: list, path: Path):
    """tools/train_tokenizer.py's tokenizer and training, over ``texts``."""
    from tools.train_tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, TOKENIZER_VOCAB, TOKENIZER_MIN_FREQUENCY)
    tokenizer.save(str(path))
    return tokenizer


# ---------------------------------------------------------------- blind baselines


def vqa_blind(records: dict) -> dict:
    """VQA accuracy on val of answering from the question alone: the most frequent train answer of the question's
    type, and (stronger) of the exact question, falling back to its type's."""
    by_type, by_question = defaultdict(Counter), defaultdict(Counter)
    for kind, question, answer in records["train"]:
        by_type[kind][answer] += 1
        by_question[question][answer] += 1

    def best(counter):
        return min(counter, key=lambda answer: (-counter[answer], answer))

    val = records["val"]
    truths = [(answer, ) * ANNOTATORS for _, _, answer in val]
    type_guess = [best(by_type[kind]) if kind in by_type else "yes" for kind, _, _ in val]
    question_guess = [best(by_question[q]) if q in by_question else guess
                      for (_, q, _), guess in zip(val, type_guess)]
    per_type = {}
    for kind in world.VQA_ANSWERS:
        rows = [i for i, (k, _, _) in enumerate(val) if k == kind]
        if rows:
            per_type[kind] = round(100 * vqa_accuracy([type_guess[i] for i in rows], [truths[i] for i in rows]), 2)
    return {"prior_per_type": round(100 * vqa_accuracy(type_guess, truths), 2),
            "prior_per_question": round(100 * vqa_accuracy(question_guess, truths), 2),
            "prior_per_type_by_type": per_type}


def nlvr2_blind(records: dict) -> dict:
    """NLVR2 accuracy on dev of the majority train label of the statement's template, and of the exact sentence
    (falling back to the template's)."""
    by_template, by_sentence = defaultdict(Counter), defaultdict(Counter)
    for template, sentence, label in records["train"]:
        by_template[template][label] += 1
        by_sentence[sentence][label] += 1

    def majority(counter):
        return counter[True] >= counter[False]

    dev = records["dev"]
    template_guess = [majority(by_template[t]) for t, _, _ in dev]
    sentence_guess = [majority(by_sentence[s]) if s in by_sentence else g for (_, s, _), g in zip(dev, template_guess)]

    def accuracy(guesses):
        return round(100 * sum(g == label for g, (_, _, label) in zip(guesses, dev)) / len(dev), 2)

    return {"majority_per_template": accuracy(template_guess), "majority_per_sentence": accuracy(sentence_guess),
            "dev_true_fraction": round(sum(label for _, _, label in dev) / len(dev), 4)}


# ---------------------------------------------------------------- main


def prepare(out: Path):
    """An empty or absent folder, or one holding an earlier world (whose files are replaced)."""
    if out.exists() and any(out.iterdir()):
        if not (out / world.WORLD_FILE).is_file():
            raise SystemExit(f"make_world: {out} is not empty and holds no {world.WORLD_FILE}: choose another --out")
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--pretrain-images", type=int, default=20000)
    parser.add_argument("--pretrain-val-images", type=int, default=256, help="held-out shards for --val-data")
    parser.add_argument("--captions", type=int, default=5, help="captions per pre-training image (at most 8)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--vqa-images", type=int, default=700, help=f"train images, {VQA_QUESTIONS_PER_IMAGE} "
                        "questions each")
    parser.add_argument("--vqa-val-images", type=int, default=None, help="default: a quarter of --vqa-images")
    parser.add_argument("--nlvr2-pairs", type=int, default=1000, help="train pairs, one statement each")
    parser.add_argument("--nlvr2-dev-pairs", type=int, default=None, help="default: 30%% of --nlvr2-pairs")
    parser.add_argument("--retrieval-images", type=int, default=500, help="train images, 5 captions each")
    parser.add_argument("--retrieval-eval-images", type=int, default=None,
                        help="images of val and of test each (default: a fifth of --retrieval-images)")
    parser.add_argument("--size", type=int, default=96, help="image width and height in pixels")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes that draw the images (the output does not depend on it)")
    args = parser.parse_args(argv)
    args.vqa_val_images = args.vqa_val_images if args.vqa_val_images is not None else math.ceil(args.vqa_images / 4)
    args.nlvr2_dev_pairs = (args.nlvr2_dev_pairs if args.nlvr2_dev_pairs is not None
                            else math.ceil(args.nlvr2_pairs * 0.3))
    args.retrieval_eval_images = (args.retrieval_eval_images if args.retrieval_eval_images is not None
                                  else math.ceil(args.retrieval_images / 5))
    for name in ("pretrain_images", "vqa_images", "vqa_val_images", "nlvr2_pairs", "nlvr2_dev_pairs",
                 "retrieval_images", "retrieval_eval_images", "shard_size", "captions", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.size < 32 or args.size % 2:
        parser.error("--size must be an even number of at least 32")
    return args


def finetune_options() -> dict:
    """launch/finetune.py's data options of each task; paths start with world.WORLD_PLACEHOLDER ("{world}"), the
    world's folder."""
    paths = {
        "vqa": ["--train-questions", "vqa/v2_OpenEnded_world_train_questions.json",
                "--train-annotations", "vqa/v2_world_train_annotations.json", "--train-images", "vqa/images/train",
                "--val-questions", "vqa/v2_OpenEnded_world_val_questions.json",
                "--val-annotations", "vqa/v2_world_val_annotations.json", "--val-images", "vqa/images/val",
                "--answer-list", "vqa/answer_list.json"],
        "nlvr2": ["--nlvr2-train", "nlvr2/train.json", "--nlvr2-train-images", "nlvr2/images/train",
                  "--nlvr2-val", "nlvr2/dev.json", "--nlvr2-val-images", "nlvr2/images/dev"],
        "retrieval": ["--karpathy", "retrieval/dataset_world.json", "--karpathy-images", "retrieval"],
    }
    options = {task: [f"{world.WORLD_PLACEHOLDER}/{value}" if position % 2 else value
                      for position, value in enumerate(values)] for task, values in paths.items()}
    options["vqa"] += ["--image-name", IMAGE_NAME]
    return options


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    prepare(out)
    started, times = time.monotonic(), {}
    workers = args.workers
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        texts, shards = write_pretrain_set(pool, out, "pretrain", "pretrain", args.pretrain_images, args)
        val_texts, val_shards = (write_pretrain_set(pool, out, "pretrain-val", "pretrain-val",
                                                    args.pretrain_val_images, args)
                                 if args.pretrain_val_images > 0 else ([], 0))
        times["pretrain"] = time.monotonic() - started
        vqa_records, vqa_texts = make_vqa(out / "vqa", args, {"train": args.vqa_images, "val": args.vqa_val_images},
                                          pool)
        times["vqa"] = time.monotonic() - started - sum(times.values())
        nlvr2_records, nlvr2_texts = make_nlvr2(out / "nlvr2", args,
                                                {"train": args.nlvr2_pairs, "dev": args.nlvr2_dev_pairs}, pool)
        times["nlvr2"] = time.monotonic() - started - sum(times.values())
        retrieval_counts, retrieval_texts = make_retrieval(
            out / "retrieval", args, {"train": args.retrieval_images, "val": args.retrieval_eval_images,
                                      "test": args.retrieval_eval_images}, pool)
        times["retrieval"] = time.monotonic() - started - sum(times.values())
    tokenizer = write_tokenizer(texts + val_texts + vqa_texts + nlvr2_texts + retrieval_texts, out / "tokenizer.json")
    times["tokenizer"] = time.monotonic() - started - sum(times.values())

    baselines = {
        "vqa": vqa_blind(vqa_records), "nlvr2": nlvr2_blind(nlvr2_records),
        "retrieval": {f"chance_r@1_{split}": round(100 / retrieval_counts[split], 2) for split in ("val", "test")},
    }
    counts = {
        "pretrain": {"images": args.pretrain_images, "shards": shards, "captions": len(texts)},
        "pretrain_val": {"images": args.pretrain_val_images, "shards": val_shards},
        "vqa": {split: {"images": n, "questions": len(vqa_records[split]),
                        "questions_per_type": dict(sorted(Counter(k for k, _, _ in vqa_records[split]).items()))}
                for split, n in (("train", args.vqa_images), ("val", args.vqa_val_images))},
        "vqa_answers": len(json.loads((out / "vqa" / "answer_list.json").read_text())),
        "nlvr2": {split: {"pairs": len(rows), "true": sum(label for _, _, label in rows)}
                  for split, rows in nlvr2_records.items()},
        "retrieval": retrieval_counts,
        "tokenizer_vocab": tokenizer.get_vocab_size(),
    }
    arguments = {name: value for name, value in sorted(vars(args).items()) if name not in ("out", "workers")}
    document = {
        "format": "eve-ds world", "version": 1, "generator": "tools/make_world.py", "arguments": arguments,
        "paths": "'{world}' is the folder of this file (eve_ds.data.world.finetune_options fills it in)",
        "design": {"image_size": args.size, "grid": "2x2 cells", "positions": list(world.POSITIONS),
                   "shapes": list(world.SHAPES), "colours": world.OBJECT_COLOURS, "backgrounds": world.BACKGROUNDS,
                   "radius_px_at_96": world.RADII, "objects_per_scene": [1, world.MAX_OBJECTS],
                   "caption_templates": sorted(world.CAPTION_TEMPLATES), "vqa_question_types": list(world.VQA_ANSWERS),
                   "nlvr2_templates": sorted(world.NLVR2_TEMPLATES)},
        "counts": counts,
        "pretrain": {"data": "pretrain", "val_data": "pretrain-val" if val_shards else None,
                     "tokenizer": "tokenizer.json"},
        "finetune_options": finetune_options(),
        "recommended": {**world.RECOMMENDED_OPTIONS,
                        "why": "the default augmentations make about a quarter of the texts false of the images the "
                               "model sees (eve_ds/data/world.py RECOMMENDED_OPTIONS)"},
        "baselines": baselines,
    }
    write_json(document, out / world.WORLD_FILE)
    total = time.monotonic() - started
    print(f"{out}: {args.pretrain_images} pre-training images in {shards} shards, "
          f"VQA {counts['vqa']['train']['questions']}"
          f"/{counts['vqa']['val']['questions']} questions, NLVR2 {args.nlvr2_pairs}/{args.nlvr2_dev_pairs} pairs, "
          f"retrieval {args.retrieval_images}/{args.retrieval_eval_images}/{args.retrieval_eval_images} images, "
          f"tokenizer of {counts['tokenizer_vocab']} tokens")
    print("time: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in times.items()) + f"; total {total:.1f}s")
    print("blind baselines: " + json.dumps(baselines))


if __name__ == "__main__":
    main()
