"""The pre-training data stream: every (rank, loader worker) pair reads its own slice of each source, shuffles
it in blocks, mixes the sources by weight and yields full micro-batches, endlessly; its position goes into
every checkpoint so that a resumed run sees exactly the samples an uninterrupted one would (one file per checkpoint:
``eve_ds/checkpoint/data_position.py``).

Readers. With R data-parallel ranks and W workers per rank there are R x W readers; worker w of rank r is
reader r x W + w. In epoch e of a source of N samples (numbered as its ``epoch_order`` says: units
shuffled by (seed, source, e)), reader g reads positions [g L, (g + 1) L) with L = N // (R x W): disjoint,
complete but for fewer than R x W samples, equal in length whatever the shard sizes. A reader shuffles its
slice in blocks of ``block`` consecutive positions, by (seed, source, epoch, slice, block).

Position. A reader's state says, per source, which slices it still has to read (normally one: its slice of
the current epoch, with how many of its positions are consumed) and the next epoch; and how many samples it
has drawn, which seeds the weighted choice of source. Every micro-batch carries its reader's state after it,
so the trainer knows each reader's position without asking the workers. The DataLoader takes batches from its
workers in turn, starting with worker 0; after k micro-batches worker 0 of a resumed loader plays reader role
k mod W, so the order goes on where it stopped.

Resuming at another number of readers (another world size or worker count): the old readers' unfinished slices
are handed out whole, round robin, to the new readers, each followed by the old reader's slices of any epoch
it had not begun while another reader had; then every new reader goes on with the new partition from the
epoch after the newest one begun. No sample is repeated or skipped, but readers move between epochs at
different times until those slices are done.

Every random choice for a sample (caption among several, crop, flip, masks) is seeded by (seed, source, epoch,
position): independent of the number of readers.

Modalities. Image-only and text-only sources (``sources.split_modality``) are mixed with pairs by micro-batch: each
micro-batch holds one modality, drawn by weight (the sum of its sources') from (seed, reader role, the reader's
micro-batch count), which is the same on every rank for the micro-batch that every rank trains at once; within it,
sources are drawn by weight per sample, as before. So all ranks run the same encoder passes on micro-batches of
the same shape: ZeRO-3 gathers the same parameters everywhere, and expert parallelism exchanges the same number of
tokens (texts are padded to the model's text length).
"""
import copy
import json
import math
import random
from collections import Counter

import torch
from PIL import Image

from eve_ds.data.dataset import UNREADABLE_IMAGE_ERRORS, MaskedSamples
from eve_ds.data.shards import captions_of, image_of
from eve_ds.data.sources import DataError, NoReadableData
from eve_ds.data.text import EmptyText
from eve_ds.objectives.masking import IGNORE_INDEX

REASONS = ("unreadable image", "image too large", "missing image", "missing caption", "empty caption",
           "non-UTF-8 caption", "truncated shard", "unreadable shard", "malformed line")
TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def fresh_state(num_sources: int, reader: int, readers: int) -> dict:
    return {"drawn": 0, "sources": [{"pending": [[0, reader, readers, 0]], "next_epoch": 1}
                                    for _ in range(num_sources)]}


def source_samples(source, index: int, state: dict, reader: int, readers: int, seed: int, block: int):
    """(epoch, position, raw sample or the reason it was lost) of one source for one reader, endlessly; ``state``
    (the source's part of the reader state) is kept current after each."""
    while True:
        if not state["pending"]:
            state["pending"].append([state["next_epoch"], reader, readers, 0])
            state["next_epoch"] += 1
        current = state["pending"][0]
        epoch, slice_reader, slice_readers, resume_at = current
        length = source.total // slice_readers
        if length == 0:
            raise DataError(f"{source.name} has {source.total} samples, fewer than the {slice_readers} readers "
                            f"(data-parallel ranks x loader workers)")
        start = slice_reader * length
        first_block = resume_at // block
        raw = source.read(source.epoch_order(index, epoch, seed), start + first_block * block, start + length)
        for number in range(first_block, math.ceil(length / block)):
            offset = number * block
            items = [(start + offset + i, next(raw)) for i in range(min(block, length - offset))]
            random.Random(f"{seed}:block:{index}:{epoch}:{slice_reader}:{slice_readers}:{number}").shuffle(items)
            for i, (position, sample) in enumerate(items):
                if offset + i < resume_at:
                    continue
                current[3] = offset + i + 1
                yield epoch, position, sample
        state["pending"].pop(0)


def reader_samples(sources: list, weights: list, members: list, state: dict, reader: int, readers: int, seed: int,
                   block: int):
    """(source index, epoch, position, raw sample or the reason it was lost) of the sources numbered ``members``,
    drawn by weight, endlessly."""
    streams = {index: source_samples(sources[index], index, state["sources"][index], reader, readers, seed, block)
               for index in members}
    while True:
        index = members[0]
        if len(members) > 1:
            index = random.Random(f"{seed}:mix:{reader}:{state['drawn']}").choices(
                members, [weights[member] for member in members])[0]
        state["drawn"] += 1
        yield (index, *next(streams[index]))


def modality_members(sources: list, weights: list) -> dict:
    """{modality: (indices of its sources, the sum of their weights)}, in the order the sources first name them."""
    members = {}
    for index, source in enumerate(sources):
        indices, weight = members.get(source.modality, ([], 0.0))
        members[source.modality] = (indices + [index], weight + weights[index])
    return members


class PretrainingStream(torch.utils.data.IterableDataset):
    """Endless micro-batches of masked samples for one rank (see the module's description). A micro-batch
    holds only readable samples, so every one has the same shape; each also carries ``keys`` (source:epoch:key of
    each sample), ``problems`` (counts per REASONS of what was skipped since the reader's previous batch) and
    ``data_state`` (the reader's state after it, as JSON). A reader that passes over as many positions in a row as
    its sources hold together without one usable sample raises NoReadableData rather than spin."""

    def __init__(self, sources: list, weights: list, samples: MaskedSamples, micro_batch: int, rank: int,
                 world_size: int, num_workers: int, seed: int = 0, block: int = 1000):
        if len(weights) != len(sources) or any(weight <= 0 for weight in weights):
            raise DataError(f"{len(sources)} data sources want as many positive weights, got {weights}")
        self.sources, self.weights, self.samples = sources, weights, samples
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.roles = max(1, num_workers)
        self.seed, self.block = seed, block
        self.states, self.rotation = [None] * self.roles, 0

    @property
    def readers(self) -> int:
        return self.world_size * self.roles

    def describe(self) -> dict:
        """What a saved position is only exact for."""
        return {"world_size": self.world_size, "workers": self.roles, "micro_batch": self.micro_batch,
                "seed": self.seed, "block": self.block, "sources": [source.fingerprint() for source in self.sources]}

    def resume(self, states: list, batches: int):
        """Start from per-role reader states (None: from the beginning) after ``batches`` micro-batches."""
        self.states, self.rotation = states, batches % self.roles

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        role = ((info.id if info else 0) + self.rotation) % self.roles
        reader = self.rank * self.roles + role
        state = copy.deepcopy(self.states[role]) or fresh_state(len(self.sources), reader, self.readers)
        state.setdefault("batches", 0)  # micro-batches made (a state saved before modalities has none)
        problems = Counter()
        members = modality_members(self.sources, self.weights)
        modalities, modality_weights = list(members), [weight for _, weight in members.values()]
        samples = {modality: reader_samples(self.sources, self.weights, indices, state, reader, self.readers,
                                            self.seed, self.block) for modality, (indices, _) in members.items()}
        unusable, before_them = 0, Counter()  # positions in a row without a usable sample; the counts before them
        while True:
            batch, keys = [], []
            modality = modalities[0]
            if len(modalities) > 1:  # keyed by the role, not the reader: every rank draws the same
                modality = random.Random(f"{self.seed}:modality:{role}:{state['batches']}").choices(
                    modalities, modality_weights)[0]
            one_pass = sum(self.sources[index].total for index in members[modality][0])
            while len(batch) < self.micro_batch:
                index, epoch, position, raw = next(samples[modality])
                sample = masked_sample(self.samples, raw, random.Random(f"{self.seed}:{index}:{epoch}:{position}"),
                                       problems, modality)
                if sample is not None:
                    batch.append(sample)
                    keys.append(f"{index}:{epoch}:{raw[0]}")
                    unusable, before_them = 0, problems.copy()
                    continue
                unusable += 1
                if unusable == one_pass:
                    raise no_readable_data([self.sources[index] for index in members[modality][0]], one_pass,
                                           problems - before_them)
            state["batches"] += 1
            collated = torch.utils.data.default_collate(batch)
            collated["keys"] = keys
            collated["problems"] = torch.tensor([problems[reason] for reason in REASONS])
            collated["data_state"] = json.dumps({"role": role, "state": state})
            problems.clear()
            before_them.clear()
            yield collated


def no_readable_data(sources: list, positions: int, skipped: Counter) -> NoReadableData:
    counts = ", ".join(f"{reason} {skipped[reason]}" for reason in REASONS if skipped[reason])
    return NoReadableData(f"no readable sample in a pass over {', '.join(source.name for source in sources)} "
                          f"({positions} positions: {counts or 'none skipped'}): check the data")


def masked_sample(samples: MaskedSamples, raw, rng: random.Random, problems: Counter, modality: str = "pairs"):
    """The masked sample of a raw one (key, files) of a source of ``modality``, its caption drawn by ``rng`` where it
    has several; None, counted in ``problems`` by reason, where it has no usable caption or image (of those its
    modality reads), or where ``raw`` is the reason the sample was lost. Counted here, as it is drawn, rather than
    where it was read a block ahead: the counts of a batch are those of the positions it consumed. A raw None (a
    padding place) is not counted."""
    if raw is None:
        return None
    if isinstance(raw, str):
        problems[raw] += 1
        return None
    _, files = raw
    captions = captions_of(files, problems) if modality != "images" else None
    if modality != "images" and not captions:
        return None
    image = image_of(files) if modality != "texts" else None
    if modality != "texts" and image is None:
        problems["missing image"] += 1
        return None
    try:
        if modality == "images":
            return samples.make_image(image[1], rng)
        if modality == "texts":
            return samples.make_text(rng.choice(captions), rng)
        return samples.make(image[1], rng.choice(captions), rng)
    except TOO_LARGE:
        problems["image too large"] += 1
    except EmptyText:  # a caption with no word left once normalised (--normalize-text)
        problems["empty caption"] += 1
    except UNREADABLE_IMAGE_ERRORS:
        problems["unreadable image"] += 1
    return None


def _sample_keys(samples: MaskedSamples, modality: str) -> list:
    """The keys of a sample that ``samples`` makes for a source of ``modality``."""
    keys = [] if modality == "texts" else ["images", "image_mask"]
    if modality != "images":
        keys += ["text_ids", "text_labels", "text_padding_mask"]
        keys += ["plain_text_ids"] * ("itc" in samples.objectives or "itm" in samples.objectives)
        keys += ["mlm_text_ids", "mlm_text_labels"] * ("mlm" in samples.objectives)
    return keys


def resumed_states(saved: dict, stream: PretrainingStream) -> list:
    """This rank's per-role reader states from a checkpoint's data position (``StreamPosition.saved``): its own
    where the position was saved by the same layout of readers, else the old readers' unfinished slices dealt
    out as the module's description says."""
    if saved["layout"] == stream.describe():
        return saved["states"][stream.rank]
    old = [state or fresh_state(len(stream.sources), reader, len(saved["states"]) * saved["layout"]["workers"])
           for reader, state in enumerate(s for rank_states in saved["states"] for s in rank_states)]
    old_readers = len(old)
    states = []
    for role in range(stream.roles):
        reader = stream.rank * stream.roles + role
        state = {"drawn": 0, "sources": []}
        for index in range(len(stream.sources)):
            newest = max(reader_state["sources"][index]["next_epoch"] for reader_state in old)
            pending = []
            for old_reader in range(reader, old_readers, stream.readers):
                own = old[old_reader]["sources"][index]
                pending += own["pending"] + [[epoch, old_reader, old_readers, 0]
                                             for epoch in range(own["next_epoch"], newest)]
            state["sources"].append({"pending": pending, "next_epoch": newest})
        states.append(state)
    return states


class StreamPosition:
    """The trainer's side of the stream: the newest reader states seen per role, the micro-batches consumed
    and the skip counts, for checkpoints and logs."""

    def __init__(self, stream: PretrainingStream):
        self.stream = stream
        self.states = [None] * stream.roles
        self.batches = 0
        self.problems = Counter()

    def restore(self, saved: dict):
        """Continue from ``saved()`` of a checkpoint."""
        self.states = resumed_states(saved, self.stream)
        self.batches = saved["batches"] if saved["layout"] == self.stream.describe() else 0
        self.problems = Counter(saved["problems"])
        self.stream.resume(self.states, self.batches)

    def consume(self, batch: dict) -> dict:
        """Takes the bookkeeping out of a micro-batch; returns this micro-batch's skip counts (this rank's)."""
        data_state = json.loads(batch.pop("data_state"))
        self.states[data_state["role"]] = data_state["state"]
        self.batches += 1
        batch.pop("keys")
        return dict(zip(REASONS, batch.pop("problems").tolist()))

    def saved(self, gather) -> dict:
        """The position of every rank (``gather`` collects one object from each rank), for ``write_data_position``."""
        return {"layout": self.stream.describe(), "batches": self.batches, "states": gather(self.states),
                "problems": dict(self.problems)}


def validation_batches(source, samples: MaskedSamples, rank: int, world_size: int, micro_batch: int,
                       seed: int, problems: Counter):
    """The validation set in micro-batches, the same samples with the same masks every time and on any world size:
    positions in unit order, rank r taking the r-th of ``world_size`` equal parts, each sample seeded by (seed,
    position), no augmentation. Every rank yields the same number of batches; places left by the last samples or
    by unreadable ones hold a padding sample with nothing masked, which adds nothing to the losses."""
    share = math.ceil(source.total / world_size)
    start, stop = min(rank * share, source.total), min((rank + 1) * share, source.total)
    raw = source.read(source.unit_order(), start, stop)
    batch = []
    for position in range(start, start + math.ceil(share / micro_batch) * micro_batch):
        item = next(raw, None) if position < stop else None
        batch.append(masked_sample(samples, item, random.Random(f"{seed}:validation:{position}"), problems,
                                   source.modality))
        if len(batch) == micro_batch:
            yield _with_padding(batch, samples, source.modality)
            batch = []


def _with_padding(batch: list, samples: MaskedSamples, modality: str) -> dict:
    """The batch with its empty places (None) filled by a padding sample with nothing masked, and ``padding`` [B]
    saying which they are (a contrastive loss must leave such a batch out: its padding repeats a pair)."""
    template = next((sample for sample in batch if sample is not None), None)
    if template is None:
        size = samples.image_size
        ids, padding_mask, _ = samples.tokenizer.encode("")
        template = {"images": torch.zeros(3, size, size), "image_mask": torch.zeros(samples.grid_size**2, dtype=bool),
                    "text_ids": ids, "text_labels": ids, "text_padding_mask": padding_mask, "plain_text_ids": ids,
                    "mlm_text_ids": ids, "mlm_text_labels": ids}
        template = {key: template[key] for key in _sample_keys(samples, modality)}
    padding = {key: torch.zeros_like(value) if key == "image_mask" else
               torch.full_like(value, IGNORE_INDEX) if key.endswith("labels") else value
               for key, value in template.items()}
    collated = torch.utils.data.default_collate([sample if sample is not None else padding for sample in batch])
    collated["padding"] = torch.tensor([sample is None for sample in batch])
    return collated
