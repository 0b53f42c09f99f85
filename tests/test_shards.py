"""Tar shards: written from a manifest (tools/make_shards.py), read back, damaged, counted where no index counts
them (at start-up, or by tools/index_shards.py), and the tokenizer trained over them (tools/train_tokenizer.py)."""
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from eve_ds.data import DataError, ManifestError, open_source
from eve_ds.data import shards as shards_module
from eve_ds.data.shards import captions_of, expand_pattern, image_of, iter_shard, read_index, write_index
from tests.conftest import REPO, SHAPES, run_tool


def test_shard_patterns_expand_like_the_shells_braces(tmp_path):
    assert [str(p) for p in expand_pattern("cc3m/{00008..00011}.tar")] == \
        ["cc3m/00008.tar", "cc3m/00009.tar", "cc3m/00010.tar", "cc3m/00011.tar"]
    assert [str(p) for p in expand_pattern("{coco,vg}/{0..1}.tar")] == ["coco/0.tar", "coco/1.tar", "vg/0.tar",
                                                                       "vg/1.tar"]
    for name in ("b.tar", "a.tar", "c.tar.gz", "d.tgz", "notes.txt", ".e.tar.partial"):
        (tmp_path / name).touch()
    assert expand_pattern(tmp_path) == [tmp_path / name for name in ("a.tar", "b.tar", "c.tar.gz", "d.tgz")]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_pattern("x/{9..1}.tar")
    for name in ("coco", "vg"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "00000.tar").touch()
    assert expand_pattern(f"{tmp_path}/{{coco,vg}}") == [tmp_path / "coco/00000.tar", tmp_path / "vg/00000.tar"]


def test_a_pattern_of_shard_names_expands_without_one_look_at_the_filesystem(monkeypatch):
    looked = []
    monkeypatch.setattr(os.path, "isdir", lambda path: looked.append(path) or False)
    monkeypatch.setattr(Path, "is_dir", lambda path: looked.append(path) or False)
    assert len(expand_pattern("/laion/{000000..229999}.tar")) == 230_000 and looked == []
    assert expand_pattern("/laion/part-{0..1}") == [Path("/laion/part-0"), Path("/laion/part-1")]
    assert looked == ["/laion/part-0", "/laion/part-1"]  # names without a suffix may be folders


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


def test_the_shard_writer_resumes_after_a_kill_with_the_shards_of_an_uninterrupted_run(manifest, tmp_path):
    """Killed part-way (SIGKILL, its workers too), with its journal's last line cut short: the same command finishes
    the set, which is byte for byte the set of a run that was never stopped."""
    lines = manifest.read_text().splitlines()
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines * 40) + "\n")  # 1,680 well-formed lines (a shard each), 1,640 readable images
    whole = tmp_path / "whole"
    assert run_tool("make_shards.py", big, whole, "--shard-size", 1, "--workers", 1).returncode == 0
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "make_shards.py"), big, out, "--shard-size", "1",
                                "--workers", "1"], start_new_session=True)
    journal = out / ".index.journal"
    while process.poll() is None and (not journal.is_file() or journal.read_text().count("\n") < 100):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = journal.read_text().count("\n")
    assert 100 <= done < 1680 and not (out / "index.json").exists()
    with journal.open("a") as file:
        file.write('{"shard": "01500.t')  # the kill came in the middle of a line
    result = run_tool("make_shards.py", big, out, "--shard-size", 1, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert f"1680 shards, 1640 samples ({1680 - done} written now, {done} complete from before)" in result.stdout
    assert read_index(out) == read_index(whole) and not journal.exists()
    assert all((out / name).read_bytes() == (whole / name).read_bytes() for name in read_index(whole))


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


def test_damaged_shards_count_every_sample_their_index_promises(tmp_path):
    """With the count from the index, each sample of the range asked for that a shard does not deliver counts 1."""
    image = (SHAPES / "images/000000.png").read_bytes()
    good = shard_bytes({f"{key}.{extension}": payload for key in "abcde"
                        for extension, payload in (("png", image), ("txt", key.encode()))})
    with tarfile.open(fileobj=io.BytesIO(good)) as archive:
        inside_b, header_of_c = archive.getmember("b.png").offset_data + 100, archive.getmember("c.png").offset
    (tmp_path / "truncated.tar").write_bytes(good[:inside_b])
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "garbage.tar").write_bytes(bytes(range(256)) * 40)
    for name, header in (("zeroed.tar", bytes(512)), ("garbled.tar", b"not a tar header" * 32)):
        (tmp_path / name).write_bytes(good[:header_of_c] + header + good[header_of_c + 512:])

    def read(name, skip=0, stop=5):
        problems = Counter()
        return [key for key, _ in iter_shard(tmp_path / name, problems, skip, stop)], dict(problems)

    assert read("truncated.tar") == (["a"], {"truncated shard": 4})
    for name in ("empty.tar", "garbage.tar", "absent.tar"):
        assert read(name) == ([], {"unreadable shard": 5})
        assert read(name, skip=3) == ([], {"unreadable shard": 2})
    for name in ("zeroed.tar", "garbled.tar"):  # tarfile's streaming reader takes the header for the end
        assert read(name) == (["a", "b"], {"truncated shard": 3})
        assert read(name, skip=1, stop=4) == (["b"], {"truncated shard": 2})
        assert read(name, skip=3) == ([], {"truncated shard": 2})
        assert read(name, stop=2) == (["a", "b"], {})  # the damage lies past the range
    assert read("zeroed.tar", stop=None) == (["a", "b"], {})  # without a count the loss cannot be seen


def foreign_shards(folder, sizes, suffix=".tar", mode="w", first=0) -> list:
    """Shards as others write them (shipped pairs, png and txt, no json), without an index."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = iter((SHAPES / "manifest.jsonl").read_text().splitlines()[first:])
    paths = []
    for number, size in enumerate(sizes):
        paths.append(folder / f"{number:05d}{suffix}")
        with tarfile.open(paths[-1], mode) as archive:
            for _ in range(size):
                entry = json.loads(next(lines))
                key = f"{number:05d}{archive.offset:08d}"
                for name, payload in ((f"{key}.png", (SHAPES / entry["image"]).read_bytes()),
                                      (f"{key}.txt", entry["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return paths


def counting_lines(caplog) -> list:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("counting")]


def test_shards_without_an_index_are_counted_at_start_up_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="eve_ds.data.shards")
    folder = tmp_path / "foreign"
    foreign_shards(folder, [3, 2, 4])
    write_index(folder, {"00000.tar": 3})  # an index that counts some of them
    pattern = str(folder / "{00000..00002}.tar")
    source = open_source(pattern)
    assert source.counts == (3, 2, 4)
    assert counting_lines(caplog) == [f"counting 2 shards of {pattern} without an index",
                                      f"counting 2 shards of {pattern} without an index: 2/2"]
    assert read_index(folder) == {"00000.tar": 3, "00001.tar": 2, "00002.tar": 4}
    caplog.clear()
    assert open_source(pattern).counts == (3, 2, 4) and counting_lines(caplog) == []  # read, not counted again

    (folder / "index.json").unlink()
    result = run_tool("index_shards.py", pattern, "--workers", 1)  # the same counting, ahead of time
    assert result.returncode == 0, result.stderr
    assert "3 shards, 9 samples (3 counted now)" in result.stdout
    assert read_index(folder) == {"00000.tar": 3, "00001.tar": 2, "00002.tar": 4}


def test_an_index_is_read_once_per_folder(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    foreign_shards(folder, [1, 1, 1, 1])
    write_index(folder, {f"0000{number}.tar": 1 for number in range(4)})
    parsed = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kwargs: parsed.append(1) or loads(text, **kwargs))
    assert open_source(folder / "{00000..00003}.tar").total == 4
    assert len(parsed) == 1


def test_counts_of_read_only_shard_folders_are_cached_in_the_run_folder(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="eve_ds.data.shards")

    def read_only(folder, counts):
        raise PermissionError(f"{folder}: read-only file system")

    monkeypatch.setattr(shards_module, "write_index", read_only)
    foreign_shards(tmp_path / "a", [3, 2])
    foreign_shards(tmp_path / "b", [1, 4], first=10)  # the same shard names, other counts
    run = tmp_path / "run"
    assert open_source(tmp_path / "a", index_cache=run).counts == (3, 2)
    assert open_source(tmp_path / "b", index_cache=run).counts == (1, 4)
    cached = sorted(run.glob("index-*.json"))
    assert len(cached) == 2 and not (tmp_path / "a" / "index.json").exists()
    assert sorted(json.loads(path.read_text())["samples"] for path in cached) == [5, 5]
    caplog.clear()
    assert open_source(tmp_path / "a", index_cache=run).counts == (3, 2)  # the cache read at a later start
    assert open_source(tmp_path / "b", index_cache=run).counts == (1, 4)
    assert counting_lines(caplog) == []
    assert open_source(tmp_path / "a").counts == (3, 2)  # no cache given: counted again, not recorded
    assert counting_lines(caplog) == [f"counting 2 shards of {tmp_path / 'a'} without an index",
                                      f"counting 2 shards of {tmp_path / 'a'} without an index: 2/2"]


def test_gzipped_shards_are_found_counted_and_read(tmp_path):
    folder = tmp_path / "gz"
    shards = foreign_shards(folder, [3, 2], ".tar.gz", "w:gz") + foreign_shards(folder / "tgz", [4], ".tgz", "w:gz")
    source = open_source(folder)
    assert [Path(path).name for path in source.units] == ["00000.tar.gz", "00001.tar.gz"] and source.counts == (3, 2)
    assert open_source(f"{folder}/{{00000,00001}}.tar.gz").counts == (3, 2)
    assert open_source(folder / "tgz").counts == (4, )
    assert read_index(folder) == {"00000.tar.gz": 3, "00001.tar.gz": 2}
    problems = Counter()
    assert len([files["png"] for _, files in iter_shard(shards[0], problems, stop=3)]) == 3 and not problems
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:len(data) // 2])  # a gzip stream cut in the middle
    samples = list(iter_shard(shards[2], problems, stop=4))
    assert 0 < len(samples) < 4 and problems == {"truncated shard": 4 - len(samples)}


def test_missing_data_sources_are_named_in_one_sentence(tmp_path):
    foreign_shards(tmp_path / "set", [1, 1])
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "absent": f"data source {tmp_path / 'absent'} does not exist",
             tmp_path / "absent.tar": f"data source {tmp_path / 'absent.tar'} does not exist",
             tmp_path / "set" / "{00005..00009}.tar": "does not exist",
             tmp_path / "set" / "{00000..00003}.tar": f"2 of its 4 shards are missing, the first "
                                                      f"{tmp_path}/set/00002.tar",
             tmp_path / "empty": "holds no shard"}
    for spec, message in cases.items():
        with pytest.raises(DataError, match=re.escape(message)):
            open_source(spec)
    with pytest.raises(DataError, match="runs backwards"):
        open_source(tmp_path / "set" / "{3..1}.tar")
    with pytest.raises(ManifestError, match="does not exist"):
        open_source(tmp_path / "absent.jsonl")
