"""Tar shards: written from a manifest (tools/make_shards.py), read back, damaged, and the tokenizer trained
over them (tools/train_tokenizer.py)."""
import io
import json
import shutil
import tarfile
from collections import Counter

import pytest
from tokenizers import Tokenizer

from eve_ds.data.shards import captions_of, expand_pattern, image_of, iter_shard, read_index
from tests.conftest import SHAPES, run_tool


def test_shard_patterns_expand_like_the_shells_braces(tmp_path):
    assert [str(p) for p in expand_pattern("cc3m/{00008..00011}.tar")] == \
        ["cc3m/00008.tar", "cc3m/00009.tar", "cc3m/00010.tar", "cc3m/00011.tar"]
    assert [str(p) for p in expand_pattern("{coco,vg}/{0..1}.tar")] == ["coco/0.tar", "coco/1.tar", "vg/0.tar",
                                                                       "vg/1.tar"]
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).touch()
    assert expand_pattern(tmp_path) == [tmp_path / "a.tar", tmp_path / "b.tar"]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_pattern("x/{9..1}.tar")


@pytest.fixture
def manifest(tmp_path):
    """40 shipped pairs, one image with two captions, a malformed line and a missing image."""
    lines = [json.dumps({"image": str(SHAPES / json.loads(line)["image"]), "caption": json.loads(line)["caption"]})
             for line in (SHAPES / "manifest.jsonl").read_text().splitlines()[:40]]
    lines.insert(3, json.dumps({"image": str(SHAPES / "images/000100.png"), "captions": ["a first", "a second"]}))
    lines.insert(7, "{not json")
    lines.insert(9, json.dumps({"image": "images/absent.png", "caption": "gone"}))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shards_hold_the_manifest_and_an_interrupted_run_resumes(manifest, tmp_path):
    out = tmp_path / "shards"
    result = run_tool("make_shards.py", manifest, out, "--shard-size", 16, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert "3 shards, 41 samples" in result.stdout
    assert "'malformed line': 1" in result.stdout and "'unreadable image': 1" in result.stdout
    assert read_index(out) == {"00000.tar": 15, "00001.tar": 16, "00002.tar": 10}  # the missing image was in 0

    problems, samples = Counter(), []
    for shard in expand_pattern(out / "{00000..00002}.tar"):
        samples += list(iter_shard(shard, problems))
    assert not problems and len(samples) == 41 and len({key for key, _ in samples}) == 41
    key, files = samples[0]
    assert image_of(files) == ("png", (SHAPES / "images/000000.png").read_bytes())
    assert captions_of(files, problems) == [json.loads((SHAPES / "manifest.jsonl").read_text().splitlines()[0])["caption"]]
    assert captions_of(samples[3][1], problems) == ["a first", "a second"]

    before = (out / "00001.tar").read_bytes()
    (out / "00001.tar").unlink()  # as if the run had died while writing it
    (out / ".00001.tar.partial").write_bytes(b"half a shard")
    result = run_tool("make_shards.py", manifest, out, "--shard-size", 16, "--workers", 2)
    assert result.returncode == 0 and "(1 written now, 2 complete from before)" in result.stdout
    assert (out / "00001.tar").read_bytes() == before and not (out / ".00001.tar.partial").exists()


def shard_bytes(samples: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, payload in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_damaged_shards_and_captions_are_counted_not_fatal(tmp_path):
    image = (SHAPES / "images/000000.png").read_bytes()
    good = shard_bytes({"a.png": image, "a.txt": b"a caption", "b.png": image, "b.txt": b"another",
                        "c.png": image, "c.txt": b"\xff\xfe not utf-8", "d.png": image, "d.txt": b"   ",
                        "e.png": image})
    (tmp_path / "good.tar").write_bytes(good)
    problems = Counter()
    captions = [captions_of(files, problems) for _, files in iter_shard(tmp_path / "good.tar", problems)]
    assert captions == [["a caption"], ["another"], [], [], []]
    assert problems == {"non-UTF-8 caption": 1, "empty caption": 1, "missing caption": 1}

    with tarfile.open(tmp_path / "good.tar") as archive:
        cut = archive.getmember("b.png").offset_data + 100
    (tmp_path / "truncated.tar").write_bytes(good[:cut])  # cut inside b's image
    (tmp_path / "empty.tar").write_bytes(b"")
    problems = Counter()
    keys = [key for shard in ("truncated.tar", "empty.tar", "absent.tar")
            for key, _ in iter_shard(tmp_path / shard, problems)]
    assert keys == ["a"]  # the samples before the cut
    assert problems == {"truncated shard": 1, "unreadable shard": 2}


def test_tokenizer_trains_over_shards(manifest, tmp_path):
    assert run_tool("make_shards.py", manifest, tmp_path / "shards", "--shard-size", 16).returncode == 0
    shutil.copy(tmp_path / "shards" / "00000.tar", tmp_path / "extra.tar")
    out = tmp_path / "tokenizer.json"
    result = run_tool("train_tokenizer.py", str(tmp_path / "shards" / "{00000..00002}.tar"), "--out", out,
                      "--vocab-size", 300)
    assert result.returncode == 0, result.stderr
    assert "read 42 captions" in result.stdout  # 41 samples, one with two captions
    tokenizer = Tokenizer.from_file(str(out))
    assert tokenizer.token_to_id("[MASK]") == 4 and tokenizer.get_vocab_size() <= 300
    missing = run_tool("train_tokenizer.py", str(tmp_path / "shards" / "{00000..00005}.tar"), "--out", out)
    assert missing.returncode != 0 and "00003.tar" in missing.stderr


def test_index_shards_counts_foreign_shards_and_pretraining_then_reads_them(tmp_path):
    from eve_ds.data import DataError, open_source

    folder = tmp_path / "foreign"
    folder.mkdir()
    for number, lines in enumerate(([0, 1, 2], [3, 4])):
        with tarfile.open(folder / f"{number:05d}.tar", "w") as archive:
            for line in lines:
                entry = json.loads((SHAPES / "manifest.jsonl").read_text().splitlines()[line])
                for name, payload in ((f"{line:04d}.png", (SHAPES / entry["image"]).read_bytes()),
                                      (f"{line:04d}.txt", entry["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    pattern = str(folder / "{00000..00001}.tar")
    with pytest.raises(DataError, match="tools/index_shards.py"):
        open_source(pattern)
    result = run_tool("index_shards.py", pattern, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert read_index(folder) == {"00000.tar": 3, "00001.tar": 2}
    assert open_source(pattern).total == 5
