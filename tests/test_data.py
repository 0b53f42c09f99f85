"""Tests for eve_ds/data: manifest reading, the image-text dataset and its sampler (tokenizer: test_tokenizer.py)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data.dataset import UNREADABLE_IMAGE_ERRORS, ImageTextDataset, ResumableShardSampler, load_image
from eve_ds.data.manifest import ImageTextRecord, ManifestError, read_manifest
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


# ---------------------------------------------------------------- ImageTextDataset

IMAGE_SIZE, PATCH_SIZE, MAX_LEN = 48, 8, 40
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 36


@pytest.fixture(scope="module")
def text_tokenizer():
    return TextTokenizer(TOKENIZER, max_len=MAX_LEN)


@pytest.fixture
def broken_records(tmp_path):
    """[good0, corrupt, truncated, missing, good1, good2, missing]."""
    good = shipped_records(3)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(os.urandom(2048))
    truncated = tmp_path / "truncated.png"
    png = good[1].image_path.read_bytes()
    truncated.write_bytes(png[:len(png) // 2])
    lines = [
        {"image": str(good[0].image_path), "caption": good[0].caption},
        {"image": "corrupt.png", "caption": "corrupt image"},
        {"image": "truncated.png", "caption": "truncated image"},
        {"image": "missing.png", "caption": "missing image"},
        {"image": str(good[1].image_path), "caption": good[1].caption},
        {"image": str(good[2].image_path), "caption": good[2].caption},
        {"image": "also_missing.png", "caption": "missing at the end"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    records, skipped = read_manifest(manifest)
    assert (len(records), skipped) == (7, 0)
    return records


def make_dataset(records, tokenizer, ratio=0.4, style="random", text_ratio=0.5, seed=0):
    return ImageTextDataset(records, tokenizer, IMAGE_SIZE, PATCH_SIZE,
                            MaskingConfig(image_mask_ratio=ratio, image_masking=style, text_mask_ratio=text_ratio),
                            seed=seed)


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
def test_dataset_items_have_fixed_shapes(broken_records, text_tokenizer, style, ratio):
    dataset = make_dataset(broken_records, text_tokenizer, ratio=ratio, style=style)
    assert len(dataset) == 7
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"images", "image_mask", "text_ids", "text_labels", "text_padding_mask", "skipped"}
        assert item["images"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert item["images"].dtype == torch.float32
        assert item["images"].min() >= -1.0 and item["images"].max() <= 1.0
        assert item["image_mask"].shape == (NUM_PATCHES,) and item["image_mask"].dtype == torch.bool
        assert int(item["image_mask"].sum()) == round(ratio * NUM_PATCHES)
        for key in ("text_ids", "text_labels", "text_padding_mask"):
            assert item[key].shape == (MAX_LEN,), key
        assert item["text_ids"].dtype == torch.long and item["text_labels"].dtype == torch.long
        assert item["text_padding_mask"].dtype == torch.bool
        # Labels only on real, non-special tokens; their count is round(0.5 * maskable).
        _, padding_mask, maskable = text_tokenizer.encode(broken_records[(index + item["skipped"]) % 7].caption)
        chosen = item["text_labels"] != IGNORE_INDEX
        assert torch.equal(item["text_padding_mask"], padding_mask)
        assert not (chosen & ~maskable).any()
        assert int(chosen.sum()) == max(1, round(0.5 * int(maskable.sum())))


def test_dataset_skips_unreadable_records(broken_records, text_tokenizer):
    dataset = make_dataset(broken_records, text_tokenizer)
    # requested index -> (record whose data comes back, records passed over)
    expected = {0: (0, 0), 1: (4, 3), 2: (4, 2), 3: (4, 1), 4: (4, 0), 5: (5, 0), 6: (0, 1)}
    for index, (source, skipped) in expected.items():
        item = dataset[index]
        assert item["skipped"] == skipped, index
        record = broken_records[source]
        assert torch.equal(item["images"], load_image(record.image_path, IMAGE_SIZE)), index
        assert torch.equal(unmasked_ids(item), text_tokenizer.encode(record.caption)[0]), index


def test_dataset_all_unreadable_raises(tmp_path, text_tokenizer):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    records = [ImageTextRecord(tmp_path / "bad.png", "a"), ImageTextRecord(tmp_path / "none.png", "b")]
    dataset = make_dataset(records, text_tokenizer)
    with pytest.raises(RuntimeError):
        dataset[0]


@pytest.mark.parametrize("style", ["random", "block"])
def test_dataset_masks_depend_on_seed_epoch_index(broken_records, text_tokenizer, style):
    first = make_dataset(broken_records, text_tokenizer, style=style)
    second = make_dataset(broken_records, text_tokenizer, style=style)
    first.set_epoch(3)
    second.set_epoch(3)
    for index in (0, 4, 5):
        a, b = first[index], second[index]
        for key in ("image_mask", "text_ids", "text_labels", "text_padding_mask", "images"):
            assert torch.equal(a[key], b[key]), (index, key)
        # Repeated access gives the same item.
        assert torch.equal(first[index]["image_mask"], a["image_mask"])

    second.set_epoch(4)
    for index in (0, 4, 5):
        a, b = first[index], second[index]
        assert not torch.equal(a["image_mask"], b["image_mask"]), index
        assert not torch.equal(a["text_labels"], b["text_labels"]), index
        assert torch.equal(a["images"], b["images"])  # the data itself does not change

    other_seed = make_dataset(broken_records, text_tokenizer, style=style, seed=1)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed[0]["image_mask"], first[0]["image_mask"])
    # Different indices that resolve to the same record still draw their own masks.
    assert not torch.equal(first[3]["image_mask"], first[4]["image_mask"])


# ---------------------------------------------------------------- ResumableShardSampler


@pytest.mark.parametrize("size,world_size", [(11, 2), (10, 2), (17, 4), (5, 5), (9, 1)])
def test_sampler_ranks_are_disjoint_equal_and_cover(size, world_size):
    shares = []
    for rank in range(world_size):
        sampler = ResumableShardSampler(size, rank, world_size, seed=7)
        sampler.set_position(2)
        share = list(sampler)
        assert len(share) == len(sampler) == size // world_size
        shares.append(share)
    flat = [i for share in shares for i in share]
    assert len(flat) == len(set(flat)) == (size // world_size) * world_size
    assert all(0 <= i < size for i in flat)


def test_sampler_two_ranks_cover_all_but_the_tail():
    size = 11
    ranks = [ResumableShardSampler(size, rank, 2, seed=0) for rank in range(2)]
    shares = [list(sampler) for sampler in ranks]
    assert len(shares[0]) == len(shares[1]) == 5
    assert not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) == 10


def test_sampler_order_per_epoch():
    sampler = ResumableShardSampler(64, 0, 2, seed=3)
    sampler.set_position(5)
    first = list(sampler)
    again = ResumableShardSampler(64, 0, 2, seed=3)
    again.set_position(5)
    assert list(again) == first == list(sampler)
    sampler.set_position(6)
    assert list(sampler) != first
    other_seed = ResumableShardSampler(64, 0, 2, seed=100)
    other_seed.set_position(5)
    assert list(other_seed) != first


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_sampler_set_position_resumes_mid_epoch(rank):
    full_sampler = ResumableShardSampler(50, rank, 3, seed=11)
    full_sampler.set_position(4)
    full = list(full_sampler)
    assert len(full) == 16
    for start in (0, 1, 7, 15, 16):
        sampler = ResumableShardSampler(50, rank, 3, seed=11)
        sampler.set_position(4, start)
        tail = list(sampler)
        assert tail == full[start:]
        assert len(sampler) == 16 - start


def test_sampler_default_position_is_epoch_zero_start():
    fresh = list(ResumableShardSampler(20, 1, 2, seed=0))
    positioned = ResumableShardSampler(20, 1, 2, seed=0)
    positioned.set_position(0, 0)
    assert fresh == list(positioned)


@pytest.mark.parametrize("size,world_size", [(1, 2), (3, 4), (0, 1)])
def test_sampler_rejects_dataset_smaller_than_world(size, world_size):
    with pytest.raises(ValueError):
        ResumableShardSampler(size, 0, world_size)
