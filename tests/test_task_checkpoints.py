"""Checkpoints that say what model they hold: the authors' fine-tuned files imported with their heads (their
logits), heads of the wrong task or size refused, every model exported under the authors' names and imported back,
and a fine-tuned VQA file carried through import -> evaluate -> fine-tune -> consolidate -> export."""
import pytest
import torch
import torch.nn.functional as F

from eve_ds.checkpoint import load_pretrained, save_pretrained
from eve_ds.checkpoint.pretrained import CheckpointError, HeldModel, held_model
from eve_ds.checkpoint.released import authors_config, backbone, export_released, import_released, to_released
from eve_ds.config import preset
from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.finetune.annotations import read_answer_list
from eve_ds.finetune.nlvr2 import NLVR2Model
from eve_ds.finetune.retrieval import RetrievalModel
from eve_ds.finetune.tasks import EXAMPLES
from eve_ds.finetune.vqa import VQAModel
from eve_ds.model import EVE
from eve_ds.objectives import PretrainingModel
from tests.conftest import SHAPES, launch, run_tool
from tests.released_reference import released_forward, released_nlvr2_biattn_logits

CONFIG = authors_config(preset("eve-tiny"))
WIDTH = CONFIG.hidden_size


def random_like(shape, generator, std=0.2):
    return torch.randn(shape, generator=generator) * std


def authors_file(path, head: dict, seed=0, config=CONFIG) -> dict:
    """A file as the authors' task models save it: ``{"model": {backbone.*, the head under their names}}``, every
    weight random (so that no tensor can stand in for another unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in EVE(config).state_dict().items()}
    encoder = {name: random_like(shape, generator) for name, shape in shapes.items()}
    released = {name: t for name, t in to_released(encoder, config).items() if name != "backbone.mask_embed_vision"}
    released.update({name: random_like(shape, generator) for name, shape in head.items()})
    torch.save({"model": released}, path)
    return released


def vqa_head(num_answers):
    return {"output.0.weight": (2 * WIDTH, WIDTH), "output.0.bias": (2 * WIDTH, ), "output.1.weight": (2 * WIDTH, ),
            "output.1.bias": (2 * WIDTH, ), "output.3.weight": (num_answers, 2 * WIDTH),
            "output.3.bias": (num_answers, )}


def imported(file, out):
    state_dict, config, held, notes = import_released(file, preset("eve-tiny"))
    save_pretrained(out, state_dict, config, held=held)
    return held, notes


def inputs(size=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, CONFIG.image_size, CONFIG.image_size, generator=generator) * 2 - 1
    text_ids = torch.randint(5, CONFIG.vocab_size, (size, CONFIG.max_text_len), generator=generator)
    padding_mask = torch.ones(size, CONFIG.max_text_len, dtype=torch.bool)
    padding_mask[0, 10:] = False
    return images, text_ids, padding_mask


def test_the_authors_fine_tuned_vqa_file_gives_their_logits(tmp_path):
    file = authors_file(tmp_path / "vqa.pth", vqa_head(11))
    held, _ = imported(tmp_path / "vqa.pth", tmp_path / "vqa")
    assert held == HeldModel("vqa", {"num_answers": 11}) == held_model(tmp_path / "vqa")

    model = VQAModel.from_pretrained(tmp_path / "vqa", num_answers=11).eval()
    assert model.head_loaded and model.new_parameter_names() == frozenset()  # nothing new: no lr multiplier
    images, text_ids, padding_mask = inputs()
    ours = model(images, text_ids, padding_mask)["logits"]

    weights, head = backbone(file)
    cls = released_forward(weights, CONFIG, images, text_ids, padding_mask)[:, CONFIG.num_image_tokens]
    hidden = F.linear(cls, head["output.0.weight"], head["output.0.bias"])
    hidden = F.gelu(F.layer_norm(hidden, hidden.shape[-1:], head["output.1.weight"], head["output.1.bias"]))
    theirs = F.linear(hidden, head["output.3.weight"], head["output.3.bias"])  # their VQA model's `output`
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_heads_of_another_task_or_size_are_one_clear_error(tmp_path):
    authors_file(tmp_path / "vqa.pth", vqa_head(11))
    imported(tmp_path / "vqa.pth", tmp_path / "vqa")
    with pytest.raises(CheckpointError, match="holds a vqa head with num_answers 11, but this job's data makes "
                                              "num_answers 7: it is a head of another size"):
        VQAModel.from_pretrained(tmp_path / "vqa", num_answers=7)
    with pytest.raises(CheckpointError, match="holds the VQA model .num_answers 11., which has no nlvr2 head"):
        NLVR2Model.from_pretrained(tmp_path / "vqa", require_head=True)
    with pytest.raises(CheckpointError, match="holds the VQA model .num_answers 11., without the pre-training heads"):
        PretrainingModel.from_pretrained(tmp_path / "vqa")

    # Fine-tuning another task from it takes the encoder and draws a new head.
    model = NLVR2Model.from_pretrained(tmp_path / "vqa")
    assert not model.head_loaded and model.new_parameter_names()
    EVE.from_pretrained(tmp_path / "vqa")  # the encoder of any folder


@pytest.mark.parametrize("head_type", ["biattn", "mlp"])
def test_nlvr2_files_bring_their_head_type(tmp_path, head_type):
    model = NLVR2Model(CONFIG, head=head_type)
    names = {name: tuple(t.shape) for name, t in model.state_dict().items() if name.startswith("head.")}
    theirs = {(name.removeprefix("head.") if head_type == "biattn" else "output." + name.removeprefix("head.")): shape
              for name, shape in names.items()}
    file = authors_file(tmp_path / "nlvr2.pth", theirs)
    held, _ = imported(tmp_path / "nlvr2.pth", tmp_path / "nlvr2")
    assert held == HeldModel("nlvr2", {"head": head_type})

    asked = "mlp" if head_type == "biattn" else "biattn"
    model = NLVR2Model.from_pretrained(tmp_path / "nlvr2", head=asked).eval()  # the stored head decides
    assert model.head_type == head_type and model.head_loaded
    if head_type == "biattn":
        images, text_ids, padding_mask = inputs(size=2)
        pairs = torch.stack([images, images.flip(0)], dim=1)
        ours = model(pairs, text_ids, padding_mask)["logits"]
        weights, head = backbone(file)
        left, right = (released_forward(weights, CONFIG, side, text_ids, padding_mask) for side in (images,
                                                                                                     images.flip(0)))
        theirs = released_nlvr2_biattn_logits(head, CONFIG.num_heads, left, right, padding_mask)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_retrieval_heads_under_the_authors_pre_training_names(tmp_path):
    head = {"mitc_vision_proj_head.weight": (WIDTH, WIDTH), "mitc_text_proj_head.weight": (WIDTH, WIDTH),
            "mitc_temp": (), "mitm_head.weight": (2, WIDTH), "mitm_head.bias": (2, )}
    file = authors_file(tmp_path / "pretrained.pth", head)
    held, notes = imported(tmp_path / "pretrained.pth", tmp_path / "retrieval")
    assert held == HeldModel("retrieval") and not any("left out" in note for note in notes if "tensors" in note)
    model = RetrievalModel.from_pretrained(tmp_path / "retrieval")
    _, stored = backbone(file)
    assert torch.equal(model.image_projection.weight, stored["mitc_vision_proj_head.weight"])
    assert torch.equal(model.itm_head.bias, stored["mitm_head.bias"])
    assert model.temperature.shape == (1, ) and model.temperature.item() == stored["mitc_temp"].item()

    # Contrastive heads without the matching head are no retrieval head: the encoder alone, said in a note.
    del head["mitm_head.weight"], head["mitm_head.bias"]
    authors_file(tmp_path / "itc_only.pth", head)
    held, notes = imported(tmp_path / "itc_only.pth", tmp_path / "itc_only")
    assert held.task == "encoder" and any("incomplete retrieval head" in note for note in notes)


@pytest.mark.parametrize("held", [HeldModel("vqa", {"num_answers": 5}), HeldModel("nlvr2", {"head": "biattn"}),
                                  HeldModel("nlvr2", {"head": "mlp"}), HeldModel("retrieval"),
                                  HeldModel("pretraining")], ids=lambda held: held.describe())
def test_export_then_import_keeps_every_model_whole(tmp_path, held):
    torch.manual_seed(3)
    model = held.model_class()(CONFIG, **held.head_options)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        if held.task == "retrieval":
            model.temperature.fill_(0.05)
    save_pretrained(tmp_path / "ours", model.state_dict(), CONFIG, held=held)
    assert export_released(tmp_path / "ours", tmp_path / "released.pth") == held
    file = torch.load(tmp_path / "released.pth", weights_only=True)["model"]
    if held.task == "retrieval":  # the authors' names and their 0-d temperature
        assert file["itc_temp"].shape == () and "itc_vision_proj_head.weight" in file and "itm_head.bias" in file
    elif held.task != "pretraining":
        assert not any(name.startswith("head.") for name in file)
    state_dict, config, imported_held, notes = import_released(tmp_path / "released.pth")
    assert imported_held == held and config == CONFIG and not [note for note in notes if "left out" in note]
    original, _ = load_pretrained(tmp_path / "ours")
    assert state_dict.keys() == original.keys()
    for name, tensor in state_dict.items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.distributed
def test_a_fine_tuned_file_round_trips_import_evaluate_fine_tune_consolidate_export(tmp_path):
    """The shipped VQA example's answers, the authors' layout of a fine-tuned eve-tiny VQA model: imported, evaluated
    without a run, fine-tuned from its head (at a learning rate too small to move it), the run evaluated and
    consolidated, and the consolidated folder exported: the same model all the way."""
    num_answers = len(read_answer_list(EXAMPLES / "vqa" / "answer_list.json"))
    tokenizer = TextTokenizer(SHAPES / "tokenizer.json", CONFIG.max_text_len)
    original = authors_file(tmp_path / "authors_vqa.pth", vqa_head(num_answers),
                            config=CONFIG.replace(vocab_size=tokenizer.vocab_size))
    result = run_tool("convert_released.py", "import", tmp_path / "authors_vqa.pth", tmp_path / "imported", "--model",
                      "eve-tiny", "--tokenizer", SHAPES / "tokenizer.json")
    assert result.returncode == 0 and f"imported the VQA model (num_answers {num_answers})" in result.stdout

    evaluated = launch("tools/evaluate.py", "--task", "vqa", "--pretrained", tmp_path / "imported")
    accuracy = next(line for line in evaluated.splitlines() if "VQA accuracy (val):" in line).split(":")[-1].strip()

    launch("launch/finetune.py", "--task", "vqa", "--pretrained", tmp_path / "imported", "--out", tmp_path / "run",
           "--epochs", 1, "--batch-size", 16, "--lr", 1e-12, "--num-workers", 0)
    assert f"VQA accuracy (val): {accuracy}" in launch("tools/evaluate.py", "--task", "vqa", "--pretrained",
                                                       tmp_path / "imported", "--run", tmp_path / "run")
    result = run_tool("consolidate.py", tmp_path / "run" / "checkpoints", tmp_path / "consolidated")
    assert result.returncode == 0 and "consolidated the VQA model" in result.stdout
    assert held_model(tmp_path / "consolidated") == HeldModel("vqa", {"num_answers": num_answers})
    assert f"VQA accuracy (val): {accuracy}" in launch("tools/evaluate.py", "--task", "vqa", "--pretrained",
                                                       tmp_path / "consolidated")

    result = run_tool("convert_released.py", "export", tmp_path / "consolidated", tmp_path / "exported.pth")
    assert result.returncode == 0, result.stderr
    exported = torch.load(tmp_path / "exported.pth", weights_only=True)["model"]
    assert set(exported) == set(original) | {"backbone.mask_embed_vision"}  # the mask embedding started at zero
    for name, tensor in original.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-8, msg=name)
