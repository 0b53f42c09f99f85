"""Tests for eve_ds/data: manifests, image decoding, augmentation and masked samples (the stream: test_stream.py;
the tokenizer: test_tokenizer.py)."""
import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data.dataset import (CAPTION_WORDS, UNREADABLE_IMAGE_ERRORS, MaskedSamples, load_image,
                                  random_resized_crop_box)
from eve_ds.data import manifest as manifest_module
from eve_ds.data.manifest import ImageTextRecord, ManifestError, line_offsets, open_manifest, read_manifest
from eve_ds.data.sources import LineOrder, open_source
from eve_ds.data.text import EmptyText, pre_caption
from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.objectives.masking import IGNORE_INDEX, MaskingConfig

SHAPES = Path(__file__).resolve().parent.parent / "data" / "shapes"
TOKENIZER = SHAPES / "tokenizer.json"


def shipped_records(count):
    records, _ = read_manifest(SHAPES / "manifest.jsonl")
    return records[:count]


# ---------------------------------------------------------------- read_manifest


def test_read_manifest_counts_valid_and_skipped_lines(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    lines = [
        json.dumps({"image": "images/a.png", "caption": "a red circle"}),
        "this is not json",
        json.dumps(["images/b.png", "a list, not an object"]),
        "",
        json.dumps({"image": "images/c.png"}),                       # no caption
        json.dumps({"image": "images/d.png", "caption": ""}),        # empty caption
        json.dumps({"image": "images/e.png", "caption": "   "}),     # blank caption
        "   \t",
        json.dumps({"caption": "no image"}),                         # no image
        json.dumps({"image": 7, "caption": "image not a string"}),
        json.dumps({"image": "sub/f.png", "caption": "a blue star", "extra": 1}),
        json.dumps({"image": str(tmp_path / "abs.png"), "caption": "absolute path"}),
        "",
    ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")

    records, skipped = read_manifest(manifest)

    assert skipped == 7  # blank lines are not counted
    assert records == [
        ImageTextRecord(folder / "images/a.png", "a red circle"),
        ImageTextRecord(folder / "sub/f.png", "a blue star"),
        ImageTextRecord(tmp_path / "abs.png", "absolute path"),
    ]
    assert records[0].image_path.is_absolute()


def test_read_manifest_accepts_str_path(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "x.png", "caption": "c"}) + "\n", encoding="utf-8")
    records, skipped = read_manifest(str(manifest))
    assert (len(records), skipped) == (1, 0)
    assert records[0].image_path == tmp_path / "x.png"


def test_read_manifest_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nothing.jsonl")
    with pytest.raises(ManifestError):  # a folder is not a manifest
        read_manifest(tmp_path)


def test_read_manifest_all_bad_lines(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("not json\n[1, 2]\n\n{\"image\": \"a.png\"}\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="3 malformed"):
        read_manifest(manifest)


def test_read_manifest_empty_file(tmp_path):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ManifestError):
        read_manifest(manifest)


def test_manifest_error_is_value_error():
    assert issubclass(ManifestError, ValueError)


def test_shipped_manifest_reads_fully():
    records, skipped = read_manifest(SHAPES / "manifest.jsonl")
    assert (len(records), skipped) == (512, 0)
    assert records[0].image_path == SHAPES / "images" / "000000.png"
    assert all(record.image_path.is_file() for record in records[:8])


def test_line_offsets_find_every_non_blank_line_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "_SCAN_CHUNK", 5)  # lines and "\r\n" pairs cut by chunk ends
    path = tmp_path / "lines.jsonl"
    texts = [b"first", b"", b"\r", b"a much longer line", b"x", b"  ", b"", b"\r", b"last, without a newline"]
    path.write_bytes(b"\n".join(texts))
    starts = [sum(len(text) + 1 for text in texts[:i]) for i in range(len(texts))]
    wanted = [start for start, text in zip(starts, texts) if text not in (b"", b"\r")]
    assert line_offsets(path).tolist() == wanted
    path.write_bytes(b"\n".join(texts[:-1]) + b"\n")
    assert line_offsets(path).tolist() == wanted[:-1]
    path.write_bytes(b"")
    assert line_offsets(path).tolist() == []


def write_lines(path, count: int, first: int = 0):
    path.write_text("".join(json.dumps({"image": f"images/{n:06d}.png", "caption": f"caption {n}"}) + "\n"
                            for n in range(first, first + count)))
    return path


def test_a_manifests_offsets_are_kept_beside_it_and_scanned_again_when_it_changes(tmp_path, monkeypatch):
    manifest = write_lines(tmp_path / "m.jsonl", 50)
    lines = open_manifest(manifest)
    assert len(lines) == 50 and lines.record(49).caption == "caption 49"
    assert lines.offsets_file == tmp_path / "m.jsonl.offsets" and lines.offsets_file.stat().st_size == 64 + 8 * 50
    scans = []
    scan = manifest_module.line_offsets
    monkeypatch.setattr(manifest_module, "line_offsets", lambda path: scans.append(path) or scan(path))
    assert open_manifest(manifest).record(7).caption == "caption 7" and scans == []  # mapped, not scanned
    write_lines(manifest, 60, first=100)
    assert open_manifest(manifest).record(59).caption == "caption 159" and scans == [manifest]
    # A process that unpickles the lines (a loader worker, a rank given them) maps the file: no offsets travel.
    again = pickle.loads(pickle.dumps(open_manifest(manifest)))
    assert len(pickle.dumps(open_manifest(manifest))) < 400 and again.record(3).caption == "caption 103"


def test_a_read_only_manifest_folder_keeps_its_offsets_in_the_run_folder(tmp_path, monkeypatch):
    manifest = write_lines(tmp_path / "m.jsonl", 20)
    beside = manifest.with_name("m.jsonl.offsets")
    write = manifest_module._write_offsets
    monkeypatch.setattr(manifest_module, "_write_offsets",
                        lambda place, offsets, stat: place != beside and write(place, offsets, stat))
    lines = open_manifest(manifest, cache=tmp_path / "run")
    assert lines.offsets_file.parent == tmp_path / "run" and not beside.exists()
    assert open_manifest(manifest, cache=tmp_path / "run").offsets_file == lines.offsets_file
    assert open_manifest(manifest).offsets_file is None and len(open_manifest(manifest)) == 20  # in memory


def test_a_manifest_whose_first_lines_are_all_malformed_is_refused_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "FIRST_LINES_CHECKED", 3)
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("not json\n\n[1, 2]\n{}\n" + json.dumps({"image": "a.png", "caption": "fine"}) + "\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl has no valid image-caption line in its first 3 lines$"):
        open_manifest(manifest)
    manifest.write_text("not json\n")
    with pytest.raises(ManifestError, match=r"has no valid image-caption line \(1 malformed\)$"):
        open_manifest(manifest)
    manifest.write_text("\n\n")
    with pytest.raises(ManifestError, match="has no valid image-caption line"):
        open_manifest(manifest)


@pytest.mark.parametrize("size", [1, 2, 3, 17, 1000, 4097])
def test_a_line_order_is_a_bijection_drawn_from_its_key(size):
    order = LineOrder(size, "5:lines:0:3")
    values = order[np.arange(size)]
    assert sorted(values.tolist()) == list(range(size))
    assert order[np.arange(size)].tolist() == values.tolist()  # a function of the key alone
    assert [int(order[[position]][0]) for position in range(min(size, 40))] == values[:40].tolist()
    if size >= 17:
        assert values.tolist() != LineOrder(size, "5:lines:0:4")[np.arange(size)].tolist()
        assert values.tolist() != list(range(size))
    assert LineOrder(size, None)[np.arange(size)].tolist() == list(range(size))


def test_an_epoch_of_a_manifest_reads_each_line_once_and_counts_malformed_lines(tmp_path):
    lines = (SHAPES / "manifest.jsonl").read_text().splitlines()[:30]
    lines = [line.replace('"images/', f'"{SHAPES}/images/') for line in lines]
    lines[4], lines[11] = "not json", json.dumps({"image": "missing.png", "caption": "gone"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines[:20]) + "\n   \n" + "\n".join(lines[20:]) + "\n")
    source = open_source(manifest)
    assert source.total == 31 and source.describe() == "31 lines"
    read = list(source.read(source.epoch_order(0, 2, seed=9), 0, 31))
    assert read.count("malformed line") == 1 and read.count("missing image") == 1 and read.count(None) == 1
    keys = [sample[0] for sample in read if isinstance(sample, tuple)]
    assert len(keys) == len(set(keys)) == 28 and keys != sorted(keys)
    assert [sample[0] for sample in source.read(source.unit_order(), 0, 3)] == [
        str(SHAPES / json.loads(line)["image"]) for line in lines[:3]]


# ---------------------------------------------------------------- images and masked samples

IMAGE_SIZE, PATCH_SIZE, MAX_LEN = 48, 8, 40
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 36


@pytest.fixture(scope="module")
def text_tokenizer():
    return TextTokenizer(TOKENIZER, max_len=MAX_LEN)


def unmasked_ids(item):
    """The caption's ids before text masking: labels where chosen, inputs elsewhere."""
    return torch.where(item["text_labels"] != IGNORE_INDEX, item["text_labels"], item["text_ids"])


def test_load_image_shape_and_range():
    image = load_image(SHAPES / "images" / "000000.png", 48)
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    with Image.open(SHAPES / "images" / "000000.png") as raw:
        corner = raw.convert("RGB").resize((48, 48), Image.Resampling.BICUBIC).getpixel((0, 0))
    assert torch.allclose(image[:, 0, 0], torch.tensor(corner, dtype=torch.float32) / 127.5 - 1.0)


def one_colour(image_size, mode, value, **save):
    return lambda path: Image.new(mode, (image_size, image_size), value).save(path, **save)


@pytest.mark.parametrize("name, write, expected", [
    ("grey16.png", lambda p: Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)).save(p), (128, 128, 128)),
    ("grey.png", one_colour(20, "L", 200), (200, 200, 200)),
    ("cmyk.jpg", one_colour(20, "CMYK", (0, 0, 0, 0)), (255, 255, 255)),
    ("palette.png", lambda p: Image.new("RGB", (20, 20), (0, 0, 255)).convert("P").save(p), (0, 0, 255)),
    ("clear.png", one_colour(20, "RGBA", (255, 0, 0, 0)), (255, 255, 255)),  # transparent: the white below
    ("half.png", one_colour(20, "LA", (0, 128)), (127, 127, 127)),
    ("large.jpg", one_colour(512, "RGB", (10, 200, 30), quality=95), (10, 200, 30)),  # decoded at reduced size
])
def test_image_modes_become_rgb_of_the_right_colour(tmp_path, name, write, expected):
    write(tmp_path / name)
    image = load_image(tmp_path / name, 8)
    assert image.shape == (3, 8, 8)
    colour = ((image[:, 4, 4] + 1.0) * 127.5).round()
    assert torch.allclose(colour, torch.tensor(expected, dtype=torch.float32), atol=2), colour


def test_decompression_bombs_are_unreadable_not_decoded(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "warned.png")  # 1,600 pixels: over the limit, under twice it
    Image.new("RGB", (64, 64)).save(tmp_path / "refused.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("warned.png", "refused.png"):
        with pytest.raises(UNREADABLE_IMAGE_ERRORS):
            load_image(tmp_path / name, 8)


@pytest.mark.parametrize("style", ["random", "block"])
@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_masked_samples_have_fixed_shapes(text_tokenizer, style, ratio):
    samples = MaskedSamples(text_tokenizer, IMAGE_SIZE, PATCH_SIZE, MaskingConfig(ratio, style, 0.5))
    for record in shipped_records(5):
        item = samples.make(record.image_path.read_bytes(), record.caption, random.Random(record.caption))
        assert set(item) == {"images", "image_mask", "text_ids", "text_labels", "text_padding_mask"}
        assert item["images"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["images"].dtype == torch.float32
        assert item["images"].min() >= -1.0 and item["images"].max() <= 1.0
        assert item["image_mask"].shape == (NUM_PATCHES,) and item["image_mask"].dtype == torch.bool
        assert int(item["image_mask"].sum()) == round(ratio * NUM_PATCHES)
        for key in ("text_ids", "text_labels", "text_padding_mask"):
            assert item[key].shape == (MAX_LEN,), key
        # Labels only on real, non-special tokens; their count is round(0.5 * maskable).
        ids, padding_mask, maskable = text_tokenizer.encode(record.caption)
        chosen = item["text_labels"] != IGNORE_INDEX
        assert torch.equal(item["text_padding_mask"], padding_mask)
        assert torch.equal(unmasked_ids(item), ids)
        assert not (chosen & ~maskable).any()
        assert int(chosen.sum()) == max(1, round(0.5 * int(maskable.sum())))


def test_masked_samples_are_a_function_of_their_rng(text_tokenizer):
    samples = MaskedSamples(text_tokenizer, IMAGE_SIZE, PATCH_SIZE, MaskingConfig())
    record = shipped_records(1)[0]
    data = record.image_path.read_bytes()
    a, b = (samples.make(data, record.caption, random.Random("7:0:3")) for _ in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = samples.make(data, record.caption, random.Random("7:1:3"))
    assert not torch.equal(a["image_mask"], c["image_mask"]) and not torch.equal(a["images"], c["images"])
    whole = MaskedSamples(text_tokenizer, IMAGE_SIZE, PATCH_SIZE, MaskingConfig(), augment=False)
    assert torch.equal(whole.make(data, record.caption, random.Random(1))["images"],
                       load_image(record.image_path, IMAGE_SIZE))


def test_random_resized_crops_cover_half_to_all_of_the_image_at_sane_ratios():
    rng = random.Random(0)
    for width, height in [(256, 256), (640, 360), (200, 300)]:
        for _ in range(200):
            left, top, right, bottom = random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            area = (right - left) * (bottom - top) / (width * height)
            ratio = (right - left) / (bottom - top)
            assert 0.49 <= area <= 1.0 and 3 / 4 - 0.02 <= ratio <= 4 / 3 + 0.02
    assert random_resized_crop_box(90, 300, rng) == (0, 105, 90, 195)  # no such crop fits: the central square


def test_images_are_flipped_half_the_time_unless_a_caption_word_begins_with_left_or_right(text_tokenizer):
    half = Image.new("RGB", (32, 32), (255, 0, 0))
    half.paste((0, 0, 255), (16, 0, 32, 32))  # red on the left, blue on the right
    buffer = io.BytesIO()
    half.save(buffer, format="PNG")
    samples = MaskedSamples(text_tokenizer, 32, PATCH_SIZE, MaskingConfig())

    def red_on_the_left(caption, seed):
        # A crop spans at least 61% of the width, so the middle: its first column is red unless mirrored.
        image = samples.make(buffer.getvalue(), caption, random.Random(seed))["images"]
        return image[0, 16, 0] > image[2, 16, 0]

    for caption in ("a red and a blue half", "a bright, upright copyright sign"):
        assert 60 < sum(red_on_the_left(caption, seed) for seed in range(200)) < 140, caption
    for caption in ("red on the left", "blue on the RIGHT", "Left: red.", "the rightmost half is blue",
                    "the leftmost half", "LEFT", "the right-hand half"):
        assert all(red_on_the_left(caption, seed) for seed in range(50)), caption


def test_captions_are_normalised_only_when_asked(text_tokenizer):
    record = shipped_records(1)[0]
    data, caption = record.image_path.read_bytes(), "A  RED circle -- on the left, isn't it?"
    as_written = MaskedSamples(text_tokenizer, IMAGE_SIZE, PATCH_SIZE, MaskingConfig())
    normalised = MaskedSamples(text_tokenizer, IMAGE_SIZE, PATCH_SIZE, MaskingConfig(), normalize_text=True)
    plain, normal = as_written.make(data, caption, random.Random(3)), normalised.make(data, caption, random.Random(3))
    assert torch.equal(unmasked_ids(plain), text_tokenizer.encode(caption)[0])
    assert torch.equal(unmasked_ids(normal), text_tokenizer.encode("a red circle on the left isnt it")[0])
    assert torch.equal(plain["images"], normal["images"])  # same crop and flip: the rule reads the caption as written
    long = " ".join(f"w{n}" for n in range(45))
    assert torch.equal(unmasked_ids(normalised.make(data, long, random.Random(0))),
                       text_tokenizer.encode(pre_caption(long, CAPTION_WORDS))[0])
    with pytest.raises(EmptyText):
        normalised.make(data, "?!", random.Random(0))
    assert issubclass(EmptyText, UNREADABLE_IMAGE_ERRORS)  # the stream skips it (today counted as unreadable)


def test_pretraining_takes_normalize_text_off_by_default():
    from eve_ds.pretrain import parse_args
    config = ["--deepspeed_config", "ds_configs/zero3.json"]
    assert parse_args(config).normalize_text is False
    assert parse_args([*config, "--normalize-text"]).normalize_text is True
    assert parse_args([*config, "--no-normalize-text"]).normalize_text is False
