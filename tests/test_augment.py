"""Tests for eve_ds/data/augment.py, the authors' augmentation in Pillow: each RandomAugment op against a
hand-written reference of their formula (dataset/randaugment.py) at level 7, their draws, the colour jitter, and
how fine-tuning's datasets use them (draws from seed, epoch and index; flips only where the text allows;
evaluation resized whole; the recipes' policies)."""
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from eve_ds.data import augment
from eve_ds.data.augment import (COLOR_JITTER, FILL, POLICIES, RAND_AUGMENT, RAND_AUGMENT_OPS, TrainingAugmentation,
                                 color_jitter, color_jitter_plan, mirror, pil_affine_data, random_augment,
                                 random_augment_plan, random_resized_crop)
from eve_ds.data.dataset import load_image, to_pixels
from eve_ds.data.tokenizer import TextTokenizer
from eve_ds.errors import ArgumentParser, UsageError
from eve_ds.finetune.annotations import CaptionedImage, NLVR2Example, VQAQuestion
from eve_ds.finetune.datasets import TEXT_LENGTH, NLVR2Dataset, RetrievalEvalSet, RetrievalTrainDataset, VQADataset
from eve_ds.finetune.recipes import MODELS, RECIPES, recipe, task_augmentation
from eve_ds.finetune.tasks import TASKS, add_data_arguments, load_task
from tests.conftest import SHAPES

LEVEL = 7  # their RandomAugment(2, 7, ...)
SIZE = 48


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(SHAPES / "tokenizer.json", max_len=TEXT_LENGTH)


def noise(width=40, height=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def smooth(width=40, height=30) -> Image.Image:
    """A picture with gradients and an edge, not saturated, for the ops that compare within a level or two."""
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([60 + 3 * x, 40 + 4 * y, np.where(x < width // 2, 90, 170)], axis=-1)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def two_tone(path: Path, size=16) -> Path:
    """Red left half, blue right half: a mirrored copy differs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (200, 30, 30))
    image.paste((30, 30, 200), (size // 2, 0, size, size))
    image.save(path)
    return path


class Fixed:
    """An rng whose random() always returns ``value``."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


# ---------------------------------------------------------------- magnitudes and their draws


def test_magnitudes_at_level_7_are_the_authors():
    arguments = {name: RAND_AUGMENT[name][1] for name in RAND_AUGMENT_OPS}
    assert RAND_AUGMENT_OPS == ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                                "TranslateX", "TranslateY", "Rotate") and tuple(RAND_AUGMENT) == RAND_AUGMENT_OPS
    for name in ("Identity", "AutoContrast", "Equalize"):
        assert arguments[name](LEVEL, Fixed(0.9)) == ()
    for name in ("Brightness", "Sharpness"):  # (level / MAX_LEVEL) * 1.8 + 0.1, never negated
        for value in (0.1, 0.9):
            assert arguments[name](LEVEL, Fixed(value)) == pytest.approx((7 / 10 * 1.8 + 0.1, ))
    assert 7 / 10 * 1.8 + 0.1 == pytest.approx(1.36)
    # Shears (level / 10) * 0.3 and translations (level / 10) * 10 pixels are negated when random() > 0.5 ...
    for name, magnitude in (("ShearX", 0.21), ("ShearY", 0.21), ("TranslateX", 7.0), ("TranslateY", 7.0)):
        assert arguments[name](LEVEL, Fixed(0.7)) == pytest.approx((-magnitude, ))
        assert arguments[name](LEVEL, Fixed(0.3)) == pytest.approx((magnitude, ))
        assert arguments[name](LEVEL, Fixed(0.5)) == pytest.approx((magnitude, ))
    # ... rotations (level / 10) * 30 degrees when random() < 0.5.
    assert arguments["Rotate"](LEVEL, Fixed(0.3)) == pytest.approx((-21.0, ))
    assert arguments["Rotate"](LEVEL, Fixed(0.7)) == pytest.approx((21.0, ))
    assert arguments["Rotate"](LEVEL, Fixed(0.5)) == pytest.approx((21.0, ))
    assert FILL == (128, 128, 128)


def test_random_augment_draws_two_ops_with_replacement_each_applied_half_the_time():
    rng = random.Random(0)
    plans = [random_augment_plan(rng) for _ in range(4000)]
    assert all(len(plan) == 2 for plan in plans)
    chosen = Counter(name for plan in plans for name, _ in plan)
    assert set(chosen) == set(RAND_AUGMENT_OPS) and all(700 < count < 900 for count in chosen.values())  # 1/10 each
    assert 300 < sum(plan[0][0] == plan[1][0] for plan in plans) < 500  # with replacement: a repeat 1/10 of the time
    applied = sum(arguments is not None for plan in plans for _, arguments in plan)
    assert 0.47 < applied / 8000 < 0.53
    signs = Counter(arguments[0] > 0 for plan in plans for name, arguments in plan
                    if arguments is not None and name in ("ShearX", "Rotate"))
    assert 0.4 < signs[True] / sum(signs.values()) < 0.6


def test_random_augment_applies_its_plan_in_order():
    image = smooth()
    for seed in range(30):
        expected = image
        for name, arguments in random_augment_plan(random.Random(seed)):
            if arguments is not None:
                expected = RAND_AUGMENT[name][0](expected, *arguments)
        assert random_augment(image, random.Random(seed)).tobytes() == expected.tobytes()


# ---------------------------------------------------------------- geometric ops: their cv2 matrices


def cv2_warp_affine(image: Image.Image, forward) -> np.ndarray:
    """cv2.warpAffine's definition, by hand: output pixel (x, y) (centres at integers) is the bilinear sample of
    the input at the inverse of ``forward`` applied to (x, y); samples outside read FILL. Float, unrounded."""
    source = np.asarray(image, dtype=np.float64)
    height, width = source.shape[:2]
    padded = np.empty((height + 2, width + 2, 3))
    padded[:] = FILL
    padded[1:-1, 1:-1] = source
    inverse = np.linalg.inv(np.vstack([np.asarray(forward, dtype=np.float64), (0, 0, 1)]))
    y, x = np.mgrid[:height, :width].astype(np.float64)
    u = inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2]
    v = inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2]
    inside = (u > -1) & (u < width) & (v > -1) & (v < height)
    cu, cv = np.clip(u, -1, width - 1e-9), np.clip(v, -1, height - 1e-9)
    u0, v0 = np.floor(cu).astype(int), np.floor(cv).astype(int)
    du, dv = (cu - u0)[..., None], (cv - v0)[..., None]
    u0, v0 = u0 + 1, v0 + 1  # into the padded array
    out = ((1 - du) * (1 - dv) * padded[v0, u0] + du * (1 - dv) * padded[v0, np.minimum(u0 + 1, width + 1)]
           + (1 - du) * dv * padded[np.minimum(v0 + 1, height + 1), u0]
           + du * dv * padded[np.minimum(v0 + 1, height + 1), np.minimum(u0 + 1, width + 1)])
    out[~inside] = FILL
    return out, (u, v)


def rotation(width, height, degrees):
    """cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1), written out."""
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [[a, b, (1 - a) * width / 2 - b * height / 2], [-b, a, b * width / 2 + (1 - a) * height / 2]]


@pytest.mark.parametrize("name, argument, forward", [
    ("ShearX", 0.21, [[1, 0.21, 0], [0, 1, 0]]), ("ShearX", -0.21, [[1, -0.21, 0], [0, 1, 0]]),
    ("ShearY", 0.21, [[1, 0, 0], [0.21, 1, 0]]), ("ShearY", -0.21, [[1, 0, 0], [-0.21, 1, 0]]),
    ("TranslateX", 7.0, [[1, 0, -7.0], [0, 1, 0]]), ("TranslateX", -7.0, [[1, 0, 7.0], [0, 1, 0]]),
    ("TranslateY", 7.0, [[1, 0, 0], [0, 1, -7.0]]), ("TranslateY", -7.0, [[1, 0, 0], [0, 1, 7.0]]),
    ("Rotate", 21.0, rotation(40, 30, 21.0)), ("Rotate", -21.0, rotation(40, 30, -21.0)),
])
def test_geometric_ops_are_the_authors_cv2_warps(name, argument, forward):
    image = noise()  # any half-pixel slip shows (tens of levels), as a wrong matrix would
    result = np.asarray(RAND_AUGMENT[name][0](image, argument), dtype=np.float64)
    expected, (u, v) = cv2_warp_affine(image, forward)
    # Away from the border (where cv2 blends with the fill and Pillow does not), the same pixels to rounding.
    interior = (u >= 0.01) & (u <= 40 - 1.01) & (v >= 0.01) & (v <= 30 - 1.01)
    assert interior.mean() > 0.6
    assert np.abs(result - expected)[interior].max() <= 1.0 + 1e-9
    outside = (u < -1.01) | (u > 40.01) | (v < -1.01) | (v > 30.01)
    assert outside.any() and (result[outside] == FILL).all()


def test_affine_coefficients_of_shear_translate_and_rotate():
    # Pillow's data maps output to input with pixel centres at i + 0.5: cv2's inverse, shifted by half a pixel.
    assert pil_affine_data([[1, 0.21, 0], [0, 1, 0]]) == pytest.approx((1, -0.21, 0.105, 0, 1, 0))
    assert pil_affine_data([[1, 0, 0], [-0.21, 1, 0]]) == pytest.approx((1, 0, 0, 0.21, 1, -0.105))
    assert pil_affine_data([[1, 0, -7], [0, 1, 0]]) == pytest.approx((1, 0, 7, 0, 1, 0))
    assert pil_affine_data([[1, 0, 0], [0, 1, 7]]) == pytest.approx((1, 0, 0, 0, 1, -7))
    a, b = math.cos(math.radians(21)), math.sin(math.radians(21))
    cx, cy = 20.0, 15.0  # (W / 2, H / 2) of 40 x 30, in cv2's coordinates: Pillow's (20.5, 15.5)
    expected = (a, -b, cx + 0.5 - a * (cx + 0.5) + b * (cy + 0.5), b, a, cy + 0.5 - b * (cx + 0.5) - a * (cy + 0.5))
    assert pil_affine_data(augment.rotation_matrix(40, 30, 21)) == pytest.approx(expected)


def test_translations_move_content_whole_pixels_and_rotations_turn_counter_clockwise():
    image = noise(20, 20)
    shifted = np.asarray(augment.translate_x(image, 7.0))
    assert (shifted[:, :13] == np.asarray(image)[:, 7:]).all() and (shifted[:, 13:] == FILL).all()
    down = np.asarray(augment.translate_y(image, -7.0))
    assert (down[7:] == np.asarray(image)[:13]).all() and (down[:7] == FILL).all()
    dot = Image.new("RGB", (9, 9))
    dot.putpixel((7, 4), (255, 255, 255))  # right of cv2's centre (W / 2, H / 2) = (4.5, 4.5)
    turned = np.asarray(augment.rotate(dot, 90.0))[..., 0]
    # Counter-clockwise as shown: (x, y) goes to (y, 9 - x), above the centre.
    assert turned[2, 4] >= 250 and np.sort(turned.ravel())[-2] <= FILL[0]


# ---------------------------------------------------------------- photometric ops: their numpy formulas


def reference_autocontrast(image):
    out = []
    for channel in np.asarray(image).transpose(2, 0, 1):
        low, high = int(channel.min()), int(channel.max())
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            table = np.arange(256) * scale - low * scale
        out.append(table.clip(0, 255).astype(np.uint8)[channel])
    return np.stack(out, axis=-1)


def reference_equalize(image):
    out = []
    for channel in np.asarray(image).transpose(2, 0, 1):
        histogram = np.bincount(channel.ravel(), minlength=256)
        nonzero = histogram[histogram != 0]
        step = np.sum(nonzero[:-1]) // 255
        if step == 0:
            out.append(channel)
            continue
        n = np.empty_like(histogram)
        n[0], n[1:] = step // 2, histogram[:-1]
        out.append((np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[channel])
    return np.stack(out, axis=-1)


def reference_sharpness(image, factor):
    pixels = np.asarray(image, dtype=np.float64)
    kernel = np.ones((3, 3))
    kernel[1, 1] = 5
    kernel /= 13
    degenerate = sum(kernel[dy, dx] * pixels[dy:dy + pixels.shape[0] - 2, dx:dx + pixels.shape[1] - 2]
                     for dy in range(3) for dx in range(3))
    out = pixels.copy()
    out[1:-1, 1:-1] = np.round(degenerate) + factor * (pixels[1:-1, 1:-1] - np.round(degenerate))
    return out.clip(0, 255)  # clipped where theirs wraps around (a uint8 cast without clip)


def test_photometric_ops_are_the_authors_formulas():
    image, low = noise(), Image.fromarray((np.asarray(noise()) // 2 + 40).astype(np.uint8))
    for picture in (image, low):
        assert (np.asarray(RAND_AUGMENT["AutoContrast"][0](picture)) == reference_autocontrast(picture)).all()
        assert (np.asarray(RAND_AUGMENT["Equalize"][0](picture)) == reference_equalize(picture)).all()
        assert RAND_AUGMENT["Identity"][0](picture) is picture
    factor = 7 / 10 * 1.8 + 0.1
    brightened = np.asarray(RAND_AUGMENT["Brightness"][0](low, factor), dtype=np.int64)
    expected = (np.arange(256) * factor).clip(0, 255).astype(np.uint8)[np.asarray(low)]
    assert np.abs(brightened - expected).max() <= 1
    sharpened = np.asarray(RAND_AUGMENT["Sharpness"][0](low, factor), dtype=np.float64)
    assert np.abs(sharpened - reference_sharpness(low, factor)).max() <= 1.0
    assert (sharpened[0] == np.asarray(low)[0]).all() and (sharpened[:, -1] == np.asarray(low)[:, -1]).all()


def test_color_jitter_draws_three_factors_in_range_in_a_random_order():
    rng = random.Random(0)
    plans = [color_jitter_plan(rng) for _ in range(2000)]
    factors = np.array([factor for plan in plans for _, factor in plan])
    assert ((factors >= 1 - COLOR_JITTER) & (factors <= 1 + COLOR_JITTER)).all()
    assert factors.min() < 0.62 and factors.max() > 1.38 and abs(factors.mean() - 1.0) < 0.02
    assert all(sorted(name for name, _ in plan) == ["brightness", "contrast", "saturation"] for plan in plans)
    assert len({tuple(name for name, _ in plan) for plan in plans}) == 6  # every order
    image = smooth()
    for seed in range(10):
        expected = image
        for name, factor in color_jitter_plan(random.Random(seed)):
            enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                        "saturation": ImageEnhance.Color}[name]
            expected = enhancer(expected).enhance(factor)
        assert color_jitter(image, random.Random(seed)).tobytes() == expected.tobytes()


# ---------------------------------------------------------------- the training view


def test_training_view_is_crop_flip_then_the_policy_from_one_rng():
    image = noise(60, 45)
    for seed in range(5):
        for flip in (False, True):
            rng = random.Random(seed)
            cropped = random_resized_crop(image, SIZE, rng)
            cropped = mirror(cropped) if flip else cropped
            assert TrainingAugmentation("rand", random.Random(seed), flip)(image, SIZE).tobytes() == \
                random_augment(cropped, rng).tobytes()
            rng = random.Random(seed)
            cropped = random_resized_crop(image, SIZE, rng)
            cropped = mirror(cropped) if flip else cropped
            assert TrainingAugmentation("color", random.Random(seed), flip)(image, SIZE).tobytes() == \
                color_jitter(cropped, rng).tobytes()
    whole = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    assert TrainingAugmentation("none", random.Random(0))(image, SIZE).tobytes() == whole.tobytes()
    assert TrainingAugmentation("none", random.Random(0), True)(image, SIZE).tobytes() == mirror(whole).tobytes()
    with pytest.raises(ValueError, match="unknown augmentation 'auto'"):
        TrainingAugmentation("auto", random.Random(0))
    assert POLICIES == ("rand", "color", "none")


def test_augmented_pixels_stay_in_range(tmp_path):
    path = tmp_path / "a.jpg"
    noise(70, 50).save(path, quality=90)
    for policy in POLICIES:
        pixels = load_image(path, SIZE, TrainingAugmentation(policy, random.Random(1)))
        assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.allclose(to_pixels(Image.new("RGB", (2, 2), (255, 0, 128)))[:, 0, 0],
                          torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0]), atol=1e-6)


# ---------------------------------------------------------------- fine-tuning's datasets


def datasets(tmp_path, tokenizer, augmentation, seed=3):
    left, right = two_tone(tmp_path / "l.png"), two_tone(tmp_path / "r.png", size=24)
    vqa = VQADataset([VQAQuestion(1, left, "What colour is it?", ("red", )),
                      VQAQuestion(2, left, "What is on the left?", ("red", ))], ["red"], tokenizer, SIZE, train=True,
                     seed=seed, augmentation=augmentation)
    nlvr2 = NLVR2Dataset([NLVR2Example("a", left, right, "Both images are red and blue.", 1),
                          NLVR2Example("b", left, right, "The left image is red.", 0)], tokenizer, SIZE, train=True,
                         seed=seed, augmentation=augmentation)
    retrieval = RetrievalTrainDataset([CaptionedImage(left, ("Red and blue.", "Red on the LEFT.")),
                                       CaptionedImage(right, ("Two halves.", ))], tokenizer, SIZE, seed=seed,
                                      augmentation=augmentation)
    return {"vqa": vqa, "nlvr2": nlvr2, "retrieval": retrieval}


def epoch_images(dataset, epoch) -> list:
    dataset.set_epoch(epoch)
    return [dataset[index]["images"] for index in range(len(dataset))]


@pytest.mark.parametrize("augmentation", POLICIES)
def test_training_items_are_a_function_of_seed_epoch_and_index(tmp_path, tokenizer, augmentation):
    first, again = datasets(tmp_path, tokenizer, augmentation), datasets(tmp_path, tokenizer, augmentation)
    other_seed = datasets(tmp_path, tokenizer, augmentation, seed=4)
    for name in first:
        for epoch in (0, 5):
            assert all(torch.equal(a, b) for a, b in zip(epoch_images(first[name], epoch),
                                                         epoch_images(again[name], epoch))), name
        assert all(torch.equal(a, b) for a, b in zip(epoch_images(first[name], 2), epoch_images(first[name], 2)))
        if augmentation != "none":
            changed = [not torch.equal(a, b) for epoch in range(1, 4)
                       for a, b in zip(epoch_images(first[name], 0), epoch_images(first[name], epoch))]
            assert all(changed), name  # every crop differs
            assert any(not torch.equal(a, b) for a, b in zip(epoch_images(first[name], 0),
                                                             epoch_images(other_seed[name], 0))), name
    pair = first["nlvr2"][0]["images"]
    if augmentation != "none":
        assert not torch.equal(pair[0], pair[1])  # each image of a pair draws its own


def test_flips_only_where_the_text_allows_and_drawn_apart_from_the_augmentation(tmp_path, tokenizer):
    plain, rand = datasets(tmp_path, tokenizer, "none"), datasets(tmp_path, tokenizer, "rand")
    flips = Counter()
    for epoch in range(24):
        for sets in (plain, rand):
            for dataset in sets.values():
                dataset.set_epoch(epoch)
        # VQA: question 1 may flip, question 2 names a side; NLVR2: example 0 may flip (each image on its own),
        # example 1 names a side; retrieval: caption 1 names a side.
        assert not plain["vqa"].flips(1) and not any(plain["nlvr2"].flips(1, slot) for slot in (0, 1))
        assert not plain["retrieval"].flips(1)
        flips["vqa"] += plain["vqa"].flips(0)
        flips["nlvr2 left"] += plain["nlvr2"].flips(0, 0)
        flips["nlvr2 right"] += plain["nlvr2"].flips(0, 1)
        flips["nlvr2 one"] += plain["nlvr2"].flips(0, 0) != plain["nlvr2"].flips(0, 1)
        flips["retrieval"] += plain["retrieval"].flips(0) + plain["retrieval"].flips(2)
        for name in plain:
            for index in range(len(plain[name])):
                if name == "nlvr2":
                    assert [rand[name].flips(index, slot) for slot in (0, 1)] == \
                        [plain[name].flips(index, slot) for slot in (0, 1)]
                    expected = [load_image(path, SIZE) for path in (plain[name].examples[index].left_image_path,
                                                                     plain[name].examples[index].right_image_path)]
                    expected = torch.stack([image.flip(-1) if plain[name].flips(index, slot) else image
                                            for slot, image in enumerate(expected)])
                else:
                    assert rand[name].flips(index) == plain[name].flips(index)
                    path = (plain[name].questions[index].image_path if name == "vqa"
                            else plain[name].images[plain[name].pairs[index][0]].image_path)
                    expected = load_image(path, SIZE)
                    expected = expected.flip(-1) if plain[name].flips(index) else expected
                assert torch.equal(plain[name][index]["images"], expected), (name, index)
    assert all(4 <= flips[key] for key in ("vqa", "nlvr2 left", "nlvr2 right", "nlvr2 one", "retrieval")), flips
    assert all(flips[key] <= 20 for key in ("vqa", "nlvr2 left", "nlvr2 right")), flips


def test_evaluation_items_are_resized_whole_whatever_the_augmentation(tmp_path, tokenizer):
    path = tmp_path / "a.jpg"
    noise(70, 50).save(path, quality=90)
    whole = load_image(path, SIZE)
    for augmentation in POLICIES:
        vqa = VQADataset([VQAQuestion(1, path, "What colour?", ("red", ))], ["red"], tokenizer, SIZE, train=False,
                         augmentation=augmentation)
        nlvr2 = NLVR2Dataset([NLVR2Example("a", path, path, "Both are noisy.", 1)], tokenizer, SIZE,
                             augmentation=augmentation)
        for epoch in range(3):
            vqa.set_epoch(epoch), nlvr2.set_epoch(epoch)
            assert torch.equal(vqa[0]["images"], whole) and not vqa.flips(0)
            assert torch.equal(nlvr2[0]["images"], torch.stack([whole, whole]))
    evaluation = RetrievalEvalSet([CaptionedImage(path, ("Noise.", ))], tokenizer, SIZE)
    assert torch.equal(evaluation.images[0]["images"], whole)


# ---------------------------------------------------------------- recipes and the command line


def test_recipes_carry_the_authors_augmentation():
    expected = {"vqa": "rand", "nlvr2": "rand", "retrieval-coco": "color", "retrieval-flickr": "color"}
    for (task, model), chosen in RECIPES.items():
        assert chosen.augmentation == expected[task], (task, model)
    assert set(MODELS) == {model for _, model in RECIPES}
    assert [task_augmentation(task) for task in TASKS] == ["rand", "rand", "color"]
    assert task_augmentation("vqa", "retrieval-flickr") == "color"
    assert recipe("retrieval-flickr", "eve-tiny").augmentation == "color"


def data_arguments(argv):
    parser = ArgumentParser()
    add_data_arguments(parser)
    return parser.parse_args(argv)


def test_augmentation_option_defaults_to_the_recipe_and_reaches_the_training_sets(tokenizer):
    for name, default in zip(TASKS, ("rand", "rand", "color")):
        task = load_task(name, data_arguments([]), tokenizer, 32, seed=0)
        assert task.train.augmentation == default and task.train.train
        evaluation = task.evaluation if name != "retrieval" else None
        assert evaluation is None or not evaluation.train
        for policy in POLICIES:
            assert load_task(name, data_arguments(["--augmentation", policy]), tokenizer, 32,
                             seed=0).train.augmentation == policy
    args = data_arguments([])
    args.recipe = "retrieval-flickr"  # train.py's --recipe
    assert load_task("vqa", args, tokenizer, 32, seed=0).train.augmentation == "color"
    with pytest.raises(UsageError, match="invalid choice: 'autoaugment'"):
        data_arguments(["--augmentation", "autoaugment"])
