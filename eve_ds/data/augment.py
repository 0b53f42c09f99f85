"""The authors' image augmentation, pre-training's and fine-tuning's, in Pillow: every random choice is drawn from
the caller's ``random.Random``, so that an image is a function of the seed its caller derives (sample position;
seed, epoch and index).

Random resized crop (both jobs): 50-100% of the area at an aspect ratio of 3/4-4/3, resized bicubically, as their
torchvision ``RandomResizedCrop(res, scale=(0.5, 1.0), interpolation=BICUBIC)``; where ten draws do not fit, the
central square (torchvision takes the largest central crop of the nearest allowed ratio). Pre-training (pixel
targets, their ``naive_pretrain_transform``) is that crop and a flip (``dataset.decode_image``).

Fine-tuning (their ``dataset/__init__.py``), by policy:

- "rand" (VQA; NLVR2 at the README's aug=rand): crop, flip, then their own ``RandomAugment(2, 7, isPIL=True,
  augs=RAND_AUGMENT_OPS)`` (``dataset/randaugment.py``, cv2 and numpy, not torchvision's RandAugment): two ops
  drawn uniformly with replacement from the ten, each applied with probability 1/2 at level 7 of 10:
  Brightness and Sharpness by the factor 7/10 * 1.8 + 0.1 = 1.36 (no sign draw), ShearX/ShearY by 7/10 * 0.3 =
  0.21, TranslateX/TranslateY by 7/10 * 10 = 7 pixels (absolute, not a fraction of the size), Rotate by 7/10 * 30
  = 21 degrees, each of those negated with probability 1/2; shears, translations and rotations fill with grey
  (128, 128, 128) and interpolate bilinearly; AutoContrast (no cut-off), Equalize and Identity take no level.
- "color" (retrieval, the README's augmentation=color): crop, flip, then torchvision's ``ColorJitter(0.4, 0.4,
  0.4)``: brightness, contrast and saturation factors each uniform in [0.6, 1.4], applied in a random order.
- "none": the whole image resized (evaluation's view), still mirrored where the caller allows it.

The flip: the authors mirror with probability 1/2 whatever the text says (VQA: unless a question or answer has the
substring "left" or "right"); eve-ds's callers decide it by their text rule (``text.may_mirror``) and pass it in.

Their geometric ops are cv2 ``warpAffine`` calls with a forward matrix in cv2's pixel coordinates (pixel centres
at integers, rotation about (W/2, H/2)); ``pil_affine_data`` turns such a matrix into Pillow's output-to-input
coefficients (pixel centres at i + 0.5), so the geometry is theirs exactly. Pillow and cv2 still differ at the
border: cv2 blends the last pixel with the grey fill, Pillow does not (one pixel along the image's edges).
Their ops are equal to Pillow's otherwise (their docstrings say so): AutoContrast and Equalize are
``ImageOps``'s, Brightness ``ImageEnhance.Brightness``'s, Sharpness ``ImageEnhance.Sharpness``'s (SMOOTH kernel,
edges kept) but for one bug not reproduced: their Sharpness casts to uint8 without clipping, so values over 255
wrap around; Pillow clips.
"""
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# ------------------------------------------------------------------ random resized crop, flip

CROP_SCALE, CROP_RATIO = (0.5, 1.0), (3 / 4, 4 / 3)


def crop_draft_size(size: int) -> int:
    """The smallest side a JPEG may be decoded at (``Image.draft``) that still covers a crop resized to ``size``."""
    return math.ceil(size / math.sqrt(CROP_SCALE[0]))


def random_resized_crop_box(width: int, height: int, rng) -> tuple:
    """(left, top, right, bottom) of a crop covering CROP_SCALE of the area with an aspect ratio in
    CROP_RATIO (log-uniform); the central square-ish crop where ten draws do not fit."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_width, crop_height = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
            return left, top, left + crop_width, top + crop_height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def random_resized_crop(image: Image.Image, size: int, rng) -> Image.Image:
    """A random crop (``random_resized_crop_box``) resized bicubically to size x size."""
    return image.resize((size, size), Image.Resampling.BICUBIC, box=random_resized_crop_box(*image.size, rng))


def mirror(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# ------------------------------------------------------------------ the authors' RandomAugment

RAND_AUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                    "TranslateX", "TranslateY", "Rotate")
RAND_AUGMENT_N, RAND_AUGMENT_LEVEL, MAX_LEVEL = 2, 7, 10
APPLY_PROBABILITY = 0.5  # of each drawn op
FILL = (128, 128, 128)  # their replace_value
TRANSLATE_PIXELS = 10  # their translate_const: the shift at MAX_LEVEL, in pixels


def enhance_factor(level: float) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


def shear_factor(level: float) -> float:
    return level / MAX_LEVEL * 0.3


def translate_pixels(level: float) -> float:
    return level / MAX_LEVEL * TRANSLATE_PIXELS


def rotate_degrees(level: float) -> float:
    return level / MAX_LEVEL * 30


def pil_affine_data(forward) -> tuple:
    """Pillow's AFFINE data (a, b, c, d, e, f: output (x, y) samples input (ax + by + c, dx + ey + f), pixel centres
    at i + 0.5) of cv2.warpAffine's 2x3 ``forward`` matrix (input to output, pixel centres at integers)."""
    inverse = np.linalg.inv(np.vstack([np.asarray(forward, dtype=np.float64).reshape(2, 3), (0.0, 0.0, 1.0)]))
    (a, b, c), (d, e, f) = inverse[:2].tolist()
    # Pillow evaluates at x + 0.5 and samples at the result - 0.5.
    return a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e)


def warp_affine(image: Image.Image, forward) -> Image.Image:
    """cv2.warpAffine(image, forward, image size, bilinear, border FILL), in Pillow."""
    return image.transform(image.size, Image.Transform.AFFINE, pil_affine_data(forward),
                           resample=Image.Resampling.BILINEAR, fillcolor=FILL)


def rotation_matrix(width: int, height: int, degrees: float) -> tuple:
    """cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1): counter-clockwise as the image is shown."""
    alpha, beta = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = width / 2, height / 2
    return ((alpha, beta, (1 - alpha) * cx - beta * cy), (-beta, alpha, beta * cx + (1 - alpha) * cy))


def shear_x(image, factor: float):
    return warp_affine(image, ((1, factor, 0), (0, 1, 0)))


def shear_y(image, factor: float):
    return warp_affine(image, ((1, 0, 0), (factor, 1, 0)))


def translate_x(image, offset: float):
    """Content moves ``offset`` pixels left (their matrix [[1, 0, -offset], [0, 1, 0]])."""
    return warp_affine(image, ((1, 0, -offset), (0, 1, 0)))


def translate_y(image, offset: float):
    return warp_affine(image, ((1, 0, 0), (0, 1, -offset)))


def rotate(image, degrees: float):
    return warp_affine(image, rotation_matrix(*image.size, degrees))


def brightness(image, factor: float):
    return ImageEnhance.Brightness(image).enhance(factor)


def sharpness(image, factor: float):
    return ImageEnhance.Sharpness(image).enhance(factor)


# Each op's arguments at a level, with its sign draw as theirs: shears and translations are negated when
# random() > 0.5, rotations when random() < 0.5.
def _no_arguments(level, rng) -> tuple:
    return ()


def _enhance_arguments(level, rng) -> tuple:
    return (enhance_factor(level), )


def _shear_arguments(level, rng) -> tuple:
    factor = shear_factor(level)
    return (-factor if rng.random() > 0.5 else factor, )


def _translate_arguments(level, rng) -> tuple:
    offset = translate_pixels(level)
    return (-offset if rng.random() > 0.5 else offset, )


def _rotate_arguments(level, rng) -> tuple:
    degrees = rotate_degrees(level)
    return (-degrees if rng.random() < 0.5 else degrees, )


# name: (op(image, *arguments), arguments(level, rng))
RAND_AUGMENT = {
    "Identity": (lambda image: image, _no_arguments),
    "AutoContrast": (ImageOps.autocontrast, _no_arguments),
    "Equalize": (ImageOps.equalize, _no_arguments),
    "Brightness": (brightness, _enhance_arguments),
    "Sharpness": (sharpness, _enhance_arguments),
    "ShearX": (shear_x, _shear_arguments),
    "ShearY": (shear_y, _shear_arguments),
    "TranslateX": (translate_x, _translate_arguments),
    "TranslateY": (translate_y, _translate_arguments),
    "Rotate": (rotate, _rotate_arguments),
}


def random_augment_plan(rng, n: int = RAND_AUGMENT_N, level: float = RAND_AUGMENT_LEVEL,
                        ops=RAND_AUGMENT_OPS) -> list:
    """Their draws in their order: ``n`` ops uniformly with replacement, then for each whether it applies
    (probability APPLY_PROBABILITY) and, where it does, its arguments (sign draw included). [(name, arguments or
    None where the op is skipped)]."""
    chosen = [rng.choice(ops) for _ in range(n)]
    return [(name, None if rng.random() > APPLY_PROBABILITY else RAND_AUGMENT[name][1](level, rng))
            for name in chosen]


def random_augment(image: Image.Image, rng, **options) -> Image.Image:
    for name, arguments in random_augment_plan(rng, **options):
        if arguments is not None:
            image = RAND_AUGMENT[name][0](image, *arguments)
    return image


# ------------------------------------------------------------------ colour jitter

COLOR_JITTER = 0.4  # brightness, contrast and saturation; no hue
JITTERS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast, "saturation": ImageEnhance.Color}


def color_jitter_plan(rng) -> list:
    """torchvision ColorJitter's draws: a random order, then the brightness, contrast and saturation factors,
    each uniform in [1 - COLOR_JITTER, 1 + COLOR_JITTER]. [(name, factor)] in the order they apply."""
    order = rng.sample(tuple(JITTERS), len(JITTERS))
    factors = {name: rng.uniform(1 - COLOR_JITTER, 1 + COLOR_JITTER) for name in JITTERS}
    return [(name, factors[name]) for name in order]


def color_jitter(image: Image.Image, rng) -> Image.Image:
    for name, factor in color_jitter_plan(rng):
        image = JITTERS[name](image).enhance(factor)
    return image


# ------------------------------------------------------------------ fine-tuning's training view

POLICIES = ("rand", "color", "none")


@dataclass(frozen=True)
class TrainingAugmentation:
    """One fine-tuning training image's augmentation under ``policy`` (the module's docstring): its draws come from
    ``rng`` (crop, then the policy's), the mirror is decided by the caller (``flip``)."""
    policy: str
    rng: random.Random
    flip: bool = False

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown augmentation '{self.policy}'; choose one of {', '.join(POLICIES)}")

    def draft_size(self, size: int) -> int:
        """The side a JPEG may be decoded at for this view (``Image.draft``)."""
        return size if self.policy == "none" else crop_draft_size(size)

    def __call__(self, image: Image.Image, size: int) -> Image.Image:
        if self.policy == "none":
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            image = random_resized_crop(image, size, self.rng)
        if self.flip:
            image = mirror(image)
        if self.policy == "rand":
            image = random_augment(image, self.rng)
        elif self.policy == "color":
            image = color_jitter(image, self.rng)
        return image
