"""The pre-training stream over shards and manifests: disjoint complete coverage by ranks and workers, exact
resume, resume at another number of readers, mixing weights, bad samples counted, no readable data, validation
batches."""
import io
import json
import signal
import tarfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eve_ds.data import MaskedSamples, NoReadableData, PretrainingStream, StreamPosition, TextTokenizer, open_source
from eve_ds.data.shards import add_sample, write_index
from eve_ds.data.stream import validation_batches
from eve_ds.errors import first_sentence
from eve_ds.objectives import MaskingConfig
from tests.conftest import SHAPES

MICRO_BATCH = 4


def shipped_pairs(count: int, first: int = 0) -> list:
    lines = (SHAPES / "manifest.jsonl").read_text().splitlines()[first:first + count]
    return [(SHAPES / json.loads(line)["image"], json.loads(line)["caption"]) for line in lines]


def write_shards(folder, pairs, sizes):
    """Shards of the given sample counts (uneven on purpose), with their index."""
    folder.mkdir(parents=True, exist_ok=True)
    counts, pairs = {}, iter(pairs)
    for number, size in enumerate(sizes):
        with tarfile.open(folder / f"{number:05d}.tar", "w") as archive:
            for offset in range(size):
                image, caption = next(pairs)
                add_sample(archive, f"{number:03d}{offset:05d}", ("png", image.read_bytes()), [caption])
        counts[f"{number:05d}.tar"] = size
    write_index(folder, counts)
    return f"{folder}/{{00000..{len(sizes) - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def samples():
    return MaskedSamples(TextTokenizer(SHAPES / "tokenizer.json", 40), 32, 8, MaskingConfig())


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """100 samples in shards of 30, 7, 41 and 22."""
    return write_shards(tmp_path_factory.mktemp("shards"), shipped_pairs(100), [30, 7, 41, 22])


@pytest.fixture(scope="module", params=["shards", "manifest"])
def hundred(request, shard_set, tmp_path_factory):
    """The same 100 samples as shards or as the lines of a manifest."""
    if request.param == "shards":
        return shard_set
    manifest = tmp_path_factory.mktemp("manifest") / "hundred.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(image), "caption": caption}) + "\n"
                                for image, caption in shipped_pairs(100)))
    return manifest


def loaders(sources, samples, world_size, workers, weights=None, saved=None):
    """One DataLoader per rank, each with its StreamPosition (restored from ``saved`` where given)."""
    ranks = []
    for rank in range(world_size):
        stream = PretrainingStream(sources, weights or [1.0] * len(sources), samples, MICRO_BATCH, rank, world_size,
                                   workers, seed=5, block=16)
        position = StreamPosition(stream)
        if saved is not None:
            position.restore(saved)
        ranks.append((iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)), position))
    return ranks


def take(ranks, batches: int) -> list:
    """Per rank, the keys and the masks of its next micro-batches; the positions advance as in training."""
    taken = [[] for _ in ranks]
    for _ in range(batches):
        for rank, (loader, position) in enumerate(ranks):
            batch = next(loader)
            keys = batch["keys"]
            position.consume(batch)
            taken[rank] += list(zip(keys, batch["image_mask"].sum(1).tolist(), batch["text_ids"][:, :5].tolist(),
                                    batch["images"][:, 0, 0, 0].tolist()))
    return taken


def save(ranks) -> dict:
    return ranks[0][1].saved(lambda _: [position.states for _, position in ranks])


def test_two_ranks_with_two_workers_read_disjoint_complete_slices(hundred, samples):
    source = open_source(hundred)
    taken = take(loaders([source], samples, 2, 2), 100 // 4 // MICRO_BATCH * 2)  # one epoch of each reader
    keys = [key for rank in taken for key, *_ in rank]
    assert len(keys) == len(set(keys)) == 96  # 4 readers x 25 positions, rounded down to whole micro-batches
    assert {key.split(":")[1] for key in keys} == {"0"}
    more = take(loaders([source], samples, 2, 2), 13 * 2)  # on into epoch 1: the four slices of 25 are complete
    assert len({key for rank in more for key, *_ in rank if key.split(":")[1] == "0"}) == 100


def test_resume_at_the_same_world_size_sees_exactly_the_uninterrupted_samples(hundred, samples):
    source = open_source(hundred)
    uninterrupted = take(loaders([source], samples, 2, 2), 19)
    first = loaders([source], samples, 2, 2)
    before = take(first, 7)  # odd: the resumed loaders start with worker 1's reader
    saved = json.loads(json.dumps(save(first)))
    after = take(loaders([source], samples, 2, 2, saved=saved), 12)
    assert [b + a for b, a in zip(before, after)] == uninterrupted


@pytest.mark.parametrize("world_size, workers", [(1, 3), (3, 2)])
def test_resume_at_another_number_of_readers_neither_repeats_nor_skips(hundred, samples, world_size, workers):
    source = open_source(hundred)
    first = loaders([source], samples, 2, 2)
    before = take(first, 5)
    after = take(loaders([source], samples, world_size, workers, saved=save(first)), 40)
    epoch0 = [key for rank in before + after for key, *_ in rank if key.split(":")[1] == "0"]
    assert len(epoch0) == len(set(epoch0)) == 100


def test_mixing_draws_the_sources_in_proportion_to_their_weights(tmp_path, samples):
    a = open_source(write_shards(tmp_path / "a", shipped_pairs(40), [20, 20]))
    b = open_source(write_shards(tmp_path / "b", shipped_pairs(40, first=40), [40]))
    taken = take(loaders([a, b], samples, 2, 2, weights=[3.0, 1.0]), 100)
    drawn = Counter(key.split(":")[0] for rank in taken for key, *_ in rank)
    assert abs(drawn["0"] / sum(drawn.values()) - 0.75) < 0.04  # 800 draws: 3 standard deviations is 0.046


def encoded(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def put(archive, key: str, files: dict):
    for extension, payload in files.items():
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))


def bad_shards(folder) -> str:
    """Shard 0: 4 good samples, 5 in modes that are converted, and one of each kind of bad sample; shard 1: 2 good
    samples, then cut off in the middle of a third; shard 2: not a tar file, of 5 samples in the index."""
    good = [(image.read_bytes(), caption.encode()) for image, caption in shipped_pairs(4)]
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for index, (image, caption) in enumerate(good):
            put(archive, f"good{index}", {"png": image, "txt": caption})
        put(archive, "corrupt", {"jpg": b"\xff\xd8\xff not a jpeg", "txt": b"a corrupt image"})
        put(archive, "zero", {"jpg": b"", "txt": b"a zero-byte image"})
        put(archive, "bomb", {"png": encoded(Image.new("L", (256, 256))), "txt": b"too many pixels"})
        put(archive, "nocaption", {"png": good[0][0]})
        put(archive, "emptycaption", {"png": good[0][0], "txt": b"  \n"})
        put(archive, "latin1", {"png": good[0][0], "txt": "caf\xe9 au lait".encode("latin-1")})
        put(archive, "noimage", {"txt": b"a caption without its image"})
        converted = {"grey": encoded(Image.new("L", (16, 16), 200)),
                     "rgba": encoded(Image.new("RGBA", (16, 16), (200, 0, 0, 128))),
                     "grey16": encoded(Image.fromarray(np.full((16, 16), 50000, dtype=np.uint16))),
                     "palette": encoded(Image.new("P", (16, 16), 3))}
        for key, image in converted.items():
            put(archive, key, {"png": image, "txt": f"a {key} image".encode()})
        put(archive, "cmyk", {"jpg": encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "txt": b"cmyk"})
    with tarfile.open(folder / "00001.tar", "w") as archive:
        for index in (1, 2, 3):
            put(archive, f"more{index}", {"txt": good[index][1], "png": good[index][0]})
    with tarfile.open(folder / "00001.tar") as archive:
        last = archive.getmember("more3.png")
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[:last.offset_data + last.size // 2])
    (folder / "00002.tar").write_bytes(b"<html>404 Not Found</html>" * 100)
    write_index(folder, {"00000.tar": 16, "00001.tar": 3, "00002.tar": 5})
    return f"{folder}/{{00000..00002}}.tar"


def whole_epochs(source, samples, batches: int) -> tuple:
    """One reader's skip counts per epoch and the keys it read, up to the first epoch that ends on a good sample
    (then every position of the epochs read is counted)."""
    stream = PretrainingStream([source], [1.0], samples, 1, 0, 1, 0, seed=0, block=64)
    position, iterator, problems, keys = StreamPosition(stream), iter(stream), Counter(), []
    for _ in range(batches):
        batch = next(iterator)
        assert batch["images"].shape == (1, 3, 32, 32)
        keys += batch["keys"]
        problems.update(position.consume(batch))
        (epoch, _, _, consumed), = position.states[0]["sources"][0]["pending"]
        if consumed == source.total:
            return {reason: count / (epoch + 1) for reason, count in problems.items() if count}, keys
    pytest.fail("no epoch ended on a good sample")


def test_bad_samples_are_skipped_and_counted_per_reason(tmp_path, samples, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 96)  # the shipped images pass, 256 x 256 is an error
    source = open_source(bad_shards(tmp_path / "bad"))
    per_epoch, _ = whole_epochs(source, samples, 40 * 11)  # 11 good samples in each epoch of 24 positions
    assert per_epoch == {"unreadable image": 2, "image too large": 1, "missing caption": 1, "empty caption": 1,
                         "non-UTF-8 caption": 1, "missing image": 1, "truncated shard": 1, "unreadable shard": 5}


def test_a_bad_header_in_a_shard_loses_the_samples_after_it_counted(tmp_path, samples):
    """tarfile's streaming reader takes a damaged header for the end of the archive: the samples that the index
    promises beyond it are counted as lost, one each."""
    pattern = write_shards(tmp_path / "shards", shipped_pairs(128), [64, 64])
    shard = tmp_path / "shards" / "00001.tar"
    with tarfile.open(shard) as archive:
        header = archive.getmember("00100032.png").offset  # the 33rd sample's first file
    data = shard.read_bytes()
    shard.write_bytes(data[:header] + bytes(512) + data[header + 512:])
    per_epoch, keys = whole_epochs(open_source(pattern), samples, 96 * 10)
    assert per_epoch == {"truncated shard": 32}
    assert len({key for key in keys if key.split(":")[1] == "0"}) == 96
    assert not any(key.split(":")[2] >= "00100032" for key in keys)


@contextmanager
def within(seconds: int):
    """Fails a test that would otherwise run for ever."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_loader_without_a_readable_sample_stops_with_one_sentence(tmp_path, samples):
    folder = tmp_path / "garbage"
    folder.mkdir()
    for number in range(4):
        (folder / f"{number}.tar").write_bytes(bytes(range(256)) * 8)
    write_index(folder, {f"{number}.tar": 128 for number in range(4)})
    source = open_source(f"{folder}/{{0..3}}.tar")
    expected = (f"no readable sample in a pass over {folder}/{{0..3}}.tar (512 positions: unreadable shard 512): "
                f"check the data")
    stream = PretrainingStream([source], [1.0], samples, MICRO_BATCH, 0, 1, 1, seed=0)
    with within(60), pytest.raises(NoReadableData) as error:  # from a loader worker, re-raised by the DataLoader
        next(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)))
    assert first_sentence(error.value) == expected

    pattern = write_shards(tmp_path / "deleted", shipped_pairs(16), [8, 8])
    good = open_source(pattern)
    stream = PretrainingStream([good, good], [1.0, 1.0], samples, MICRO_BATCH, 0, 1, 0, seed=0, block=16)
    batches = iter(stream)
    assert len(next(batches)["keys"]) == MICRO_BATCH
    for shard in good.units:
        Path(shard).unlink()  # deleted during the run: the rest of the epochs' blocks in memory are still read
    taken = 0
    with within(60), pytest.raises(NoReadableData, match=r"\(32 positions: unreadable shard 32\)"):
        while True:
            next(batches)
            taken += 1
    assert taken == (2 * 16 - MICRO_BATCH) // MICRO_BATCH


def test_manifests_stream_like_shards(samples):
    source = open_source(SHAPES / "manifest.jsonl")
    taken = take(loaders([source], samples, 2, 1), 8)
    keys = [key for rank in taken for key, *_ in rank]
    assert len(set(keys)) == 64 and all(key.endswith(".png") for key in keys)


def test_validation_batches_are_the_same_on_any_world_size(shard_set, samples):
    source = open_source(shard_set)

    def real_samples(world_size):
        found = []
        counts = set()
        for rank in range(world_size):
            batches = list(validation_batches(source, samples, rank, world_size, MICRO_BATCH, 3, Counter()))
            counts.add(len(batches))
            for batch in batches:
                for index in range(MICRO_BATCH):
                    if batch["image_mask"][index].any():
                        found.append((batch["images"][index].sum().item(), batch["image_mask"][index].tolist(),
                                      batch["text_labels"][index].tolist()))
        assert len(counts) == 1  # every rank runs the same number of batches
        return sorted(found)

    one = real_samples(1)
    assert len(one) == 100
    assert one == real_samples(3)


def test_validation_over_unreadable_shards_is_padding_and_every_position_counted(tmp_path, samples):
    folder = tmp_path / "garbage"
    folder.mkdir()
    for number in range(2):
        (folder / f"{number}.tar").write_bytes(bytes(range(256)) * 8)
    write_index(folder, {"0.tar": 8, "1.tar": 8})
    source = open_source(folder)
    problems, batches = Counter(), []
    with within(60):
        for rank in range(2):
            batches += validation_batches(source, samples, rank, 2, MICRO_BATCH, 3, problems)
    assert len(batches) == 4 and not any(batch["image_mask"].any() for batch in batches)
    assert problems == {"unreadable shard": 16}


def test_resume_at_another_number_of_readers_when_readers_are_in_different_epochs(tmp_path, samples):
    """With two sources mixed, readers cross a small source's epochs at different times; resumed at another
    number of readers, every epoch any reader had begun is still seen exactly once."""
    small = open_source(write_shards(tmp_path / "small", shipped_pairs(12), [5, 7]))
    large = open_source(write_shards(tmp_path / "large", shipped_pairs(60, first=12), [60]))
    first = loaders([small, large], samples, 2, 2, weights=[1.0, 1.0])
    before = take(first, 7)  # 28 draws per reader, half from the small source: slices of 3 per epoch
    saved = save(first)
    epochs_begun = {state["sources"][0]["pending"][0][0] for rank in saved["states"] for state in rank}
    assert len(epochs_begun) > 1
    after = take(loaders([small, large], samples, 1, 3, weights=[1.0, 1.0], saved=saved), 60)
    seen = Counter(key for rank in before + after for key, *_ in rank if key.startswith("0:"))
    for epoch in range(max(epochs_begun) + 1):
        keys = [key for key in seen if key.split(":")[1] == str(epoch)]
        assert len(keys) == 12 and all(seen[key] == 1 for key in keys), epoch


def image_only_shards(folder, count: int) -> str:
    """Shards of images without captions; sample 3 has a caption only (no image)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for number, (image, _) in enumerate(shipped_pairs(count, first=50)):
            put(archive, f"img{number:05d}", {"txt": b"no image"} if number == 3 else {"png": image.read_bytes()})
    write_index(folder, {"00000.tar": count})
    return f"images:{folder}/00000.tar"


def text_corpus(path, count: int) -> str:
    """A JSONL corpus of ``{"text": ...}`` lines; line 5 is malformed and line 6 has no text."""
    lines = [json.dumps({"text": caption}) for _, caption in shipped_pairs(count, first=20)]
    lines[5], lines[6] = "{not json", json.dumps({"title": "no text"})
    path.write_text("\n".join(lines) + "\n")
    return f"texts:{path}"


def modality_of(batch: dict) -> str:
    return "texts" if "images" not in batch else "images" if "text_ids" not in batch else "pairs"


def test_unimodal_sources_give_micro_batches_of_one_modality_the_same_on_every_rank(tmp_path, samples, shard_set):
    sources = [open_source(shard_set), open_source(image_only_shards(tmp_path / "images", 40)),
               open_source(text_corpus(tmp_path / "corpus.jsonl", 60))]
    assert [source.modality for source in sources] == ["pairs", "images", "texts"]
    assert sources[2].name == f"texts:{tmp_path / 'corpus.jsonl'}" and sources[2].total == 60
    ranks = loaders(sources, samples, 2, 2, weights=[2.0, 1.0, 1.0])
    seen, problems = [[], []], Counter()
    for _ in range(60):
        for rank, (loader, position) in enumerate(ranks):
            batch = next(loader)
            modality = modality_of(batch)
            seen[rank].append(modality)
            assert {key.split(":")[0] for key in batch["keys"]} == {str(["pairs", "images", "texts"].index(modality))}
            problems.update({reason: count for reason, count in position.consume(batch).items() if count})
            if modality == "images":
                assert set(batch) == {"images", "image_mask"} and batch["image_mask"].any()
            if modality == "texts":
                assert set(batch) == {"text_ids", "text_labels", "text_padding_mask"}
                assert batch["text_ids"].shape == (MICRO_BATCH, 40)  # padded: every rank routes as many tokens
    assert seen[0] == seen[1]  # ranks agree on every micro-batch's modality
    counts = Counter(seen[0])
    assert abs(counts["pairs"] / 60 - 0.5) < 0.2 and counts["images"] and counts["texts"]
    assert problems["missing image"] >= 1 and problems["malformed line"] >= 1


def test_resume_with_unimodal_sources_sees_exactly_the_uninterrupted_batches(tmp_path, samples, shard_set):
    sources = [open_source(shard_set), open_source(text_corpus(tmp_path / "corpus.jsonl", 60))]

    def keys(ranks, batches):
        taken = [[] for _ in ranks]
        for _ in range(batches):
            for rank, (loader, position) in enumerate(ranks):
                batch = next(loader)
                taken[rank].append((modality_of(batch), tuple(batch["keys"]), batch["text_ids"][:, :6].tolist()))
                position.consume(batch)
        return taken

    uninterrupted = keys(loaders(sources, samples, 2, 2), 15)
    first = loaders(sources, samples, 2, 2)
    before = keys(first, 7)
    after = keys(loaders(sources, samples, 2, 2, saved=json.loads(json.dumps(save(first)))), 8)
    assert [b + a for b, a in zip(before, after)] == uninterrupted
    assert {modality for rank in uninterrupted for modality, *_ in rank} == {"pairs", "texts"}


def test_unimodal_sources_are_refused_where_nothing_would_train_them(tmp_path):
    from eve_ds.data.sources import check_source_exists
    from eve_ds.errors import UsageError
    from eve_ds.objectives.pretraining import check_modalities

    with pytest.raises(UsageError, match="add msm to --objectives"):
        check_modalities({"itc": 1.0, "itm": 1.0, "mlm": 1.0}, {"pairs", "images"})
    with pytest.raises(UsageError, match="add mlm"):
        check_modalities({"itc": 1.0}, {"texts"})
    check_modalities({"mlm": 1.0}, {"texts"})
    (tmp_path / "pictures.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="image-only sources are tar shards"):
        check_source_exists(f"images:{tmp_path / 'pictures.jsonl'}")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a caption"}) + "\n")
    with pytest.raises(UsageError, match="has no valid text line"):
        open_source(f"texts:{tmp_path / 'captions.jsonl'}")


def test_unimodal_validation_batches_hold_only_their_modality(tmp_path, samples):
    corpus = open_source(text_corpus(tmp_path / "corpus.jsonl", 9))
    batches = list(validation_batches(corpus, samples, 0, 1, MICRO_BATCH, 0, Counter()))
    assert len(batches) == 3 and all(modality_of(batch) == "texts" for batch in batches)
    assert batches[-1]["padding"].tolist() == [False, True, True, True] and batches[1]["padding"].tolist()[1:3] == [True, True]
