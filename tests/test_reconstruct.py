"""Reconstruction grids (eve_ds/visualize.py), tools/reconstruct.py, and the grid a pre-training run with --val-data
writes to tensorboard."""
import io
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eve_ds.checkpoint import save_pretrained
from eve_ds.checkpoint.pretrained import PRETRAINING, HeldModel
from eve_ds.config import preset
from eve_ds.data import MaskedSamples, TextTokenizer
from eve_ds.errors import job_status
from eve_ds.objectives import PretrainingModel, MaskingConfig, normalized_pixel_targets
from eve_ds.objectives.masking import IGNORE_INDEX
from eve_ds.visualize import (MASK_GREY, PANELS, TEXT_WIDTH, Predictions, captured_predictions,
                              reconstruction_grid, rows_of_batch, to_uint8)
from tests.conftest import SHAPES, launch_pretrain, read_metrics, run_tool, small_ds_config
from tools import reconstruct as TOOL

SIZE, PATCH = 96, 16  # eve-tiny
GRID = SIZE // PATCH
CAPTIONS = [json.loads(line)["caption"] for line in (SHAPES / "manifest.jsonl").read_text().splitlines()[:4]]
IMAGES = [SHAPES / "images" / f"{index:06d}.png" for index in range(4)]
GUESS_LINE = re.compile(r"^  (\d+)\. (\S+) \(true: (.*)\): (.*)$")




@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(SHAPES / "tokenizer.json", preset("eve-tiny").max_text_len)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return PretrainingModel(preset("eve-tiny").replace(vocab_size=tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, model, tokenizer):
    """A consolidated folder of a randomly initialised eve-tiny pre-training model, with the shapes tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_consolidated")
    save_pretrained(folder, model.state_dict(), model.config, tokenizer=tokenizer, held=HeldModel(PRETRAINING))
    return folder


def forward(model, tokenizer, captions, masking=MaskingConfig(), seed=0):
    maker = MaskedSamples(tokenizer, SIZE, PATCH, masking, augment=False)
    samples = [maker.make(path.read_bytes(), caption, random.Random(f"{seed}:{index}"))
               for index, (path, caption) in enumerate(zip(IMAGES, captions))]
    batch = torch.utils.data.default_collate(samples)
    with torch.no_grad(), captured_predictions(model) as predictions:
        model(**batch)
    return batch, predictions


def pixel_mask(patch_mask: torch.Tensor) -> np.ndarray:
    """[num_patches] -> [SIZE, SIZE] bool, True on the pixels of masked patches."""
    return np.kron(patch_mask.reshape(GRID, GRID).numpy(), np.ones((PATCH, PATCH), dtype=bool)).astype(bool)


def panel(grid, row: int, column: int) -> np.ndarray:
    top, side = grid.row_tops[row], grid.panel_size
    return np.asarray(grid.image)[top:top + side, column * side:(column + 1) * side]


def test_grid_layout_panels_and_pasted_back_patches(model, tokenizer):
    captions = [CAPTIONS[0], "", CAPTIONS[2], CAPTIONS[3]]
    batch, predictions = forward(model, tokenizer, captions)
    rows = rows_of_batch(batch, predictions, PATCH, tokenizer, captions=[bool(c) for c in captions])
    grid = reconstruction_grid(rows)
    assert len(PANELS) == 3 and grid.panel_size == SIZE and grid.text_left == 3 * SIZE
    assert grid.image.width == 3 * SIZE + TEXT_WIDTH
    heights = np.diff(grid.row_tops + [grid.image.height])
    assert len(heights) == 4 and all(height >= SIZE for height in heights)
    assert heights[1] == SIZE  # no caption: no text making the row higher than its panels
    assert rows[1].text is None and all(rows[i].text is not None for i in (0, 2, 3))
    for index, row in enumerate(rows):
        original = to_uint8(batch["images"][index])
        masked = pixel_mask(batch["image_mask"][index])
        assert masked.any() and not masked.all()
        assert np.array_equal(panel(grid, index, 0), original)
        assert np.array_equal(panel(grid, index, 1)[masked], np.full((masked.sum(), 3), MASK_GREY, np.uint8))
        assert np.array_equal(panel(grid, index, 1)[~masked], original[~masked])
        assert np.array_equal(panel(grid, index, 2)[~masked], original[~masked])  # pasted back exactly
        assert not np.array_equal(panel(grid, index, 2)[masked], original[masked])  # a random model's guess
    # Without captions: exactly rows x panels at the model's resolution; with a scale, that many times larger.
    plain = rows_of_batch(batch, predictions, PATCH)
    assert reconstruction_grid(plain).image.size == (3 * SIZE, 4 * SIZE)
    scaled = reconstruction_grid(plain, scale=2)
    assert scaled.image.size == (6 * SIZE, 8 * SIZE) and scaled.row_tops == [0, 192, 384, 576]
    assert np.array_equal(panel(scaled, 1, 0)[::2, ::2], to_uint8(batch["images"][1]))


def test_a_perfect_prediction_reconstructs_the_original(model, tokenizer):
    """Predictions equal to the normalised targets, un-normalised with the original patches' mean and std, give
    the original back (to the rounding of a uint8)."""
    batch, predictions = forward(model, tokenizer, CAPTIONS)
    targets = normalized_pixel_targets(batch["images"], PATCH)[batch["image_mask"]]
    perfect = Predictions(targets, predictions.token_logits)
    for index, row in enumerate(rows_of_batch(batch, perfect, PATCH, tokenizer)):
        original = to_uint8(batch["images"][index]).astype(int)
        assert np.abs(row.reconstruction.astype(int) - original).max() <= 1
        assert row.stats.pixel_loss == pytest.approx(0.0, abs=1e-8) and row.stats.mean_baseline > 0
        assert row.stats.masked_patches == round(0.75 * GRID**2) and row.stats.patches == GRID**2


def test_captured_predictions_are_the_heads_outputs_on_the_masked_signals(model, tokenizer):
    batch, predictions = forward(model, tokenizer, CAPTIONS)
    with torch.no_grad():
        hidden, _ = model.encoder(batch["images"], batch["text_ids"], batch["text_padding_mask"], batch["image_mask"])
        pixels = model.image_head(hidden[:, 1:model.config.num_image_tokens][batch["image_mask"]])
        chosen = batch["text_labels"] != IGNORE_INDEX
        logits = model.text_head(hidden[:, model.config.num_image_tokens:][chosen])
    torch.testing.assert_close(predictions.pixels, pixels)
    torch.testing.assert_close(predictions.token_logits, logits)
    with pytest.raises(ValueError, match="do not match the masked patches"):
        rows_of_batch(batch, Predictions(pixels[:-1], logits), PATCH)


def test_text_panel_shows_the_masked_tokens_and_sorted_guesses(model, tokenizer):
    batch, predictions = forward(model, tokenizer, CAPTIONS)
    rows = rows_of_batch(batch, predictions, PATCH, tokenizer, k=5)
    for index, row in enumerate(rows):
        labels, inputs = batch["text_labels"][index], batch["text_ids"][index]
        chosen = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(row.text.tokens) == len(chosen) > 0
        caption = "".join(text for text, _ in row.text.pieces)
        assert caption.count("[MASK]") == sum(int(inputs[p]) == tokenizer.mask_id for p in chosen)
        for position, token in zip(chosen, row.text.tokens):
            assert token.target_id == int(labels[position])
            probabilities = [probability for _, _, probability in token.guesses]
            assert len(probabilities) == 5 and all(0 < p <= 1 for p in probabilities)
            assert probabilities == sorted(probabilities, reverse=True)
    # The tokens left unmasked are there as the tokenizer writes them (lower-cased), the masked ones numbered.
    first = rows[0].text
    kept = [text.strip() for text, index in first.pieces if index is None]
    assert kept and all(word in CAPTIONS[0].lower() for word in kept)
    assert [index for _, index in first.pieces if index is not None] == list(range(len(first.tokens)))


def guesses_of(stdout: str) -> list:
    """The probabilities of each masked token's guesses that the tool prints."""
    found = []
    for line in stdout.splitlines():
        match = GUESS_LINE.match(line)
        if match:
            found.append([float(item.rsplit(" ", 1)[1]) for item in match[4].split(" | ")])
    return found


def test_tool_end_to_end_on_a_consolidated_folder(tmp_path, tiny_folder):
    out = tmp_path / "grid.png"
    result = run_tool("reconstruct.py", tiny_folder, IMAGES[0], IMAGES[1], "--out", out, "--caption", CAPTIONS[0],
                      "--caption", "", "--seed", 3, "--mask-ratio-image", 0.5, "--scale", 1)
    assert result.returncode == 0, result.stderr
    assert "does not store the run's masking settings" in result.stdout
    assert "masking: the defaults, with image_mask_ratio 0.5 from the command line" in result.stdout
    assert result.stdout.count(f"18 of {GRID**2} patches masked") == 2
    with Image.open(out) as picture:
        assert picture.mode == "RGB" and picture.width == 3 * SIZE + TEXT_WIDTH and picture.height >= 2 * SIZE
        first = np.asarray(picture)
    assert sum(line.startswith("  caption: ") for line in result.stdout.splitlines()) == 1  # the second has none
    guesses = guesses_of(result.stdout)
    assert guesses  # a line per masked token of the first caption
    for probabilities in guesses:
        assert len(probabilities) == 5 and all(0 < p <= 1 for p in probabilities)
        assert probabilities == sorted(probabilities, reverse=True)
    # The same seed draws the same masks: the same picture (in process this time).
    again = tmp_path / "again.png"
    assert job_status(TOOL.main, "reconstruct", [str(tiny_folder), str(IMAGES[0]), str(IMAGES[1]), "--out",
                                                  str(again), "--caption", CAPTIONS[0], "--caption", "", "--seed",
                                                  "3", "--mask-ratio-image", "0.5", "--scale", "1"]) == 0
    with Image.open(again) as picture:
        assert np.array_equal(np.asarray(picture), first)


def test_tool_refuses_bad_input_in_one_sentence(tmp_path, tiny_folder, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = str(tmp_path / "grid.png")
    cases = [([str(tiny_folder), str(corrupt), "--out", out], f"{corrupt}: cannot be read as an image"),
             ([str(tiny_folder), str(tmp_path / "nowhere.png"), "--out", out], f"{tmp_path / 'nowhere.png'}: "
                                                                             "cannot be read"),
             ([str(tmp_path / "no_such_run"), str(IMAGES[0]), "--out", out], f"{tmp_path / 'no_such_run'}: "
                                                                             "no such folder"),
             ([str(tiny_folder), str(IMAGES[0]), str(IMAGES[1]), "--out", out, "--caption", "a caption"],
              "1 --caption for 2 images: give one per image")]
    for argv, message in cases:
        assert job_status(TOOL.main, "reconstruct", argv) == 2, argv
        stderr = capsys.readouterr().err
        assert stderr.startswith(f"reconstruct: error: {message}") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "grid.png").exists()
    # And as a program: exit status 2, one line.
    result = run_tool("reconstruct.py", tiny_folder, IMAGES[0], IMAGES[1], "--out", out, "--caption", "a caption")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "reconstruct: error: 1 --caption for 2 images: give one per image, in order ('' for an image without one), "
        "or none"]


@pytest.fixture()
def small_validation_set(tmp_path):
    """Six shipped pairs: one validation batch of four and one of two plus two padding samples."""
    root = tmp_path / "val"
    (root / "images").mkdir(parents=True)
    lines = (SHAPES / "manifest.jsonl").read_text().splitlines()[-6:]
    for line in lines:
        shutil.copy(SHAPES / json.loads(line)["image"], root / json.loads(line)["image"])
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def test_pretraining_writes_the_validation_grid_to_tensorboard(tmp_path, small_validation_set):
    """One rank under ZeRO-3 (the forward gathers parameters collectively): every validation writes the grid of the
    first four validation samples to val/reconstruction; metrics.jsonl stays scalars. The run's checkpoints folder
    feeds the tool, with the run's masking settings."""
    ds_config = small_ds_config(zero_optimization={"stage": 3, "overlap_comm": False,
                                                   "stage3_param_persistence_threshold": 0},
                                eve={"expert_parallel_size": 1})
    out = tmp_path / "run"
    records, log = launch_pretrain(tmp_path, out, ds_config, "--steps", 2, "--val-interval", 1, "--val-data",
                                   small_validation_set, "--image-masking", "block", "--image-mask-ratio", 0.5,
                                   num_ranks=1)
    assert "step 2 validation" in log
    assert all("val_image_loss" in record and "images" not in record for record in records)
    assert records == read_metrics(out)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "val/reconstruction" in events.Tags()["images"]
    pictures = events.Images("val/reconstruction")
    assert [picture.step for picture in pictures] == [1, 2]
    side = 2 * SIZE  # eve-tiny's panels drawn twice as large (visualize.readable_scale)
    for picture in pictures:
        assert picture.width == 3 * side + TEXT_WIDTH and picture.height >= 4 * side
    # The same samples and masks at every validation: the image panels are the same (the reconstructions differ).
    first, second = (np.asarray(Image.open(io.BytesIO(p.encoded_image_string)).convert("RGB")) for p in pictures)
    assert np.array_equal(first[:side, :2 * side], second[:side, :2 * side])

    grid = tmp_path / "from_checkpoint.png"
    result = run_tool("reconstruct.py", out / "checkpoints", IMAGES[0], "--out", grid, "--caption", CAPTIONS[0])
    assert result.returncode == 0, result.stderr
    assert "masking: the run's: block patches, image ratio 0.5, text ratio 0.5" in result.stdout
    assert f"18 of {GRID**2} patches masked" in result.stdout
    with Image.open(grid) as picture:  # by default at least visualize.READABLE_PANEL pixels a panel
        assert picture.width == 3 * side + TEXT_WIDTH and picture.height >= side
