"""Tests for tools/make_shapes_dataset.py and tools/train_tokenizer.py."""
import json

from PIL import Image
from tokenizers import Tokenizer

from tests.conftest import SHAPES, run_tool


def make_dataset(out, count=8, size=96):
    result = run_tool("make_shapes_dataset.py", "--out", out, "--count", count, "--size", size)
    assert result.returncode == 0, result.stderr


def folder_bytes(folder):
    return {path.relative_to(folder): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_generator_is_deterministic(tmp_path):
    make_dataset(tmp_path / "first")
    make_dataset(tmp_path / "second")
    first, second = folder_bytes(tmp_path / "first"), folder_bytes(tmp_path / "second")
    assert len(first) == 8 + 1  # images and the manifest
    assert first == second


def test_manifest_points_at_valid_images(tmp_path):
    make_dataset(tmp_path, count=8, size=64)
    lines = (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry["caption"], str) and entry["caption"]
        with Image.open(tmp_path / entry["image"]) as image:
            assert image.format == "PNG"
            image.load()
            assert image.size == (64, 64)


def write_manifest(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tokenizer_skips_bad_lines_and_has_fixed_special_ids(tmp_path):
    manifest = write_manifest(tmp_path / "manifest.jsonl", [
        json.dumps({"image": "a.png", "caption": "a red circle on a blue background"}),
        "{this is not json",
        json.dumps({"image": "b.png"}),
        json.dumps({"image": "c.png", "caption": "a small red circle to the left of a square"}),
    ])
    tokenizer_path = tmp_path / "out" / "tokenizer.json"
    result = run_tool("train_tokenizer.py", manifest, "--out", tokenizer_path, "--vocab-size", 200)
    assert result.returncode == 0, result.stderr
    assert "read 2 captions, skipped 2 malformed lines" in result.stdout

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    for expected_id, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]):
        assert tokenizer.token_to_id(token) == expected_id
    assert tokenizer.padding is None and tokenizer.truncation is None

    encoding = tokenizer.encode("a red circle")
    assert encoding.ids[0] == 2 and encoding.ids[-1] == 3
    assert 1 not in encoding.ids  # every word was in the training captions
    assert tokenizer.decode(encoding.ids) == "a red circle"


def test_tokenizer_reports_missing_manifest_and_no_captions(tmp_path):
    out = tmp_path / "tokenizer.json"
    missing = run_tool("train_tokenizer.py", tmp_path / "missing.jsonl", "--out", out)
    assert missing.returncode != 0 and "Not found" in missing.stderr

    empty = write_manifest(tmp_path / "empty.jsonl", ["not json", json.dumps({"caption": 3})])
    no_captions = run_tool("train_tokenizer.py", empty, "--out", out)
    assert no_captions.returncode != 0 and "No captions found" in no_captions.stderr
    assert not out.exists()


def test_shipped_shapes_dataset_is_complete():
    folder = SHAPES
    lines = (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 512
    for line in lines:
        with Image.open(folder / json.loads(line)["image"]) as image:
            assert image.size == (96, 96)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.token_to_id("[CLS]") == 2 and tokenizer.token_to_id("[SEP]") == 3
