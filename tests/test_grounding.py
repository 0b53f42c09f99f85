"""benchmarks/grounding.py: the probe masks exactly the words of one kind in a caption true of the scene, counts
every masked token, and gives the same figures twice."""
import pytest
import torch

from benchmarks import grounding as PROBE
from eve_ds.checkpoint import save_pretrained
from eve_ds.checkpoint.pretrained import PRETRAINING, HeldModel
from eve_ds.config import preset
from eve_ds.data import TextTokenizer, world
from eve_ds.objectives import PretrainingModel
from tools import make_world

SCENES = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A consolidated folder of a random eve-tiny with a small world's tokenizer."""
    root = tmp_path_factory.mktemp("grounding")
    make_world.main(["--out", str(root / "world"), "--pretrain-images", "30", "--pretrain-val-images", "5",
                     "--shard-size", "30", "--vqa-images", "12", "--nlvr2-pairs", "20", "--retrieval-images", "10"])
    config = preset("eve-tiny")
    tokenizer = TextTokenizer(root / "world" / "tokenizer.json", config.max_text_len)
    torch.manual_seed(0)
    model = PretrainingModel(config.replace(vocab_size=tokenizer.vocab_size))
    save_pretrained(root / "weights", model.state_dict(), model.config, tokenizer=tokenizer,
                    held=HeldModel(PRETRAINING))
    return root / "weights"


def test_each_kind_masks_exactly_its_words(folder):
    tokenizer = TextTokenizer.from_folder(folder, preset("eve-tiny").max_text_len)
    scene = world.sample_scene(world.item_rng(0, PROBE.PROBE_SET, 3), 96, count=3)
    words = PROBE.probe_caption(scene)
    assert " ".join(word for word, _ in words).startswith(world.describe(scene["objects"][0]))
    for kind in PROBE.KINDS:
        inputs, labels, padding = PROBE.masked_caption(tokenizer, words, kind)
        masked = labels != -100
        assert (inputs[masked] == tokenizer.mask_id).all() and (inputs[~masked & padding] != tokenizer.mask_id).all()
        expected = [word for word, word_kind in words if word_kind == kind]
        assert tokenizer.decode(labels[masked].tolist()).split() == expected


def test_figures_count_every_word_and_repeat(folder):
    first = PROBE.grounding(folder, scenes=SCENES, image_mask_ratio=0.5)
    assert first == PROBE.grounding(folder, scenes=SCENES, image_mask_ratio=0.5)
    scenes = [world.sample_scene(world.item_rng(0, PROBE.PROBE_SET, index), 96) for index in range(SCENES)]
    objects = sum(len(scene["objects"]) for scene in scenes)
    expected = {"size": objects, "colour": objects, "shape": objects, "position": 2 * objects, "background": SCENES}
    assert {kind: row["tokens"] for kind, row in first.items()} == expected
    assert all(0 <= row[column] <= 100 for row in first.values() for column in ("own", "other"))
    table = PROBE.table({"random": first})
    assert table.count("\n") == 2 and f"{first['shape']['own']:.1f} / {first['shape']['other']:.1f}" in table


def test_unbound_level_names_a_random_object_of_the_scene(monkeypatch):
    """One scene of three objects (two red, one blue; two in the top row, two in the right column): a reader that
    names a random object's word is right 5/9 of the time for colours, sizes and both position words, 1/3 for
    shapes."""
    levels = PROBE.unbound_level(scenes=SCENES)
    assert levels["background"] == 100 and all(0 < levels[kind] <= 100 for kind in PROBE.KINDS)
    scene = {"objects": [{"size": "small", "colour": "red", "shape": "star", "position": "top left"},
                         {"size": "small", "colour": "red", "shape": "cross", "position": "top right"},
                         {"size": "large", "colour": "blue", "shape": "circle", "position": "bottom right"}]}
    monkeypatch.setattr(PROBE.world, "sample_scene", lambda rng, *args, **kwargs: scene)
    levels = PROBE.unbound_level(scenes=1)
    assert levels["colour"] == pytest.approx(100 * 5 / 9) and levels["size"] == pytest.approx(100 * 5 / 9)
    assert levels["shape"] == pytest.approx(100 / 3)
    assert levels["position"] == pytest.approx(100 * 5 / 9)
