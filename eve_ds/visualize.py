"""Reconstruction grids of masked signal modeling: what the model restores of masked image patches and masked
text tokens, drawn with Pillow for ``tools/reconstruct.py`` and for pre-training's validation (tensorboard
``val/reconstruction``).

One row per sample, three panels at the model's resolution (times ``scale``), left to right:

* the original image (as the model sees it: resized whole to ``image_size``, no augmentation);
* the masked input: the masked patches a uniform dark grey (MASK_GREY);
* the reconstruction: the image head's prediction for each masked patch, the visible patches pasted back from the
  original, as MAE's figures show it.

The image head predicts each masked patch's pixels normalised by that patch's own mean and standard deviation
(``objectives.msm.normalized_pixel_targets``). To be shown, a prediction is un-normalised with the original patch's
mean and standard deviation (what MAE does for the figures of its models trained on normalised targets) and clipped
to the image range. The statistics are over all of a patch's values, its three channels together, so the model's are
the hue and the structure inside a patch (edges, shapes); its brightness and contrast come from the original, and a
patch of one grey level (a plain grey, black or white background) comes back exactly whatever the model predicts.
``RowStats.pixel_loss`` against ``RowStats.mean_baseline`` (predicting each patch as its own mean grey, all zeros
normalised) says how much the model gets.

Where a sample has a caption, a text panel beside its row gives the caption with the masked tokens as the model
saw them (``[MASK]``; BERT-style masking also replaces a tenth of the chosen tokens by a random one, shown
``[~word]``, and keeps a tenth, shown ``[=word]``), numbered, and for each the true token and the model's top-k
guesses with their probabilities (a correct guess in green).
"""
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from eve_ds.objectives.masking import IGNORE_INDEX
from eve_ds.objectives.msm import normalized_pixel_targets, patchify

PANELS = ("original", "masked input", "reconstruction")
# The masked patches of the masked-input panel: darker than the mid grey (128) of pixel value 0, which is a common
# colour of images (the shapes data set's "gray") and would hide the mask.
MASK_GREY = 96
TEXT_WIDTH = 640  # the text panel beside a row with a caption, in pixels
FONT_SIZE, SMALL_FONT_SIZE, LINE_HEIGHT, MARGIN = 11, 8, 14, 6
TOP_K = 5
READABLE_PANEL = 192  # ``readable_scale`` enlarges smaller panels (eve-tiny's 96 pixels) to at least this
BLACK, GREY, RED, GREEN, WHITE = (0, 0, 0), (110, 110, 110), (200, 0, 0), (0, 130, 0), (255, 255, 255)
NORMALISATION_EPS = 1e-6  # normalized_pixel_targets' default


@dataclass
class Predictions:
    """The two heads' outputs of one forward of PretrainingModel: ``pixels`` [masked patches of the batch,
    patch_size**2 * channels], per-patch normalised, in ``image_mask``'s order (sample by sample, patches in raster
    order, pixels within a patch as ``patchify`` lays them out); ``token_logits`` [chosen text positions, vocab], in
    the order of ``text_labels != IGNORE_INDEX``."""
    pixels: torch.Tensor = None
    token_logits: torch.Tensor = None


@contextmanager
def captured_predictions(model):
    """Keeps the outputs of ``model``'s image and text heads during the forward passes in the block (the last one
    wins): ``with captured_predictions(model) as predictions: model(**batch)``. ``model`` is a PretrainingModel
    or a DeepSpeed engine's module; the forward is the training one (``engine(**batch)`` under ZeRO-3, where every
    rank must run it), so the predictions are exactly what the losses were computed from. The heads run only on
    masked patches and chosen tokens (PretrainingModel.forward), which is what a grid shows."""
    predictions = Predictions()

    def keep(name):
        def hook(module, inputs, output):
            setattr(predictions, name, output.detach().float().cpu())
        return hook

    handles = [model.image_head.register_forward_hook(keep("pixels")),
               model.text_head.register_forward_hook(keep("token_logits"))]
    try:
        yield predictions
    finally:
        for handle in handles:
            handle.remove()


def top_guesses(token_logits: torch.Tensor, k: int = TOP_K) -> tuple:
    """(probabilities [chosen, k] sorted from the highest, token ids [chosen, k]) of the softmax over the vocabulary."""
    probabilities = token_logits.float().softmax(-1)
    return probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """[num_patches, patch_size**2 * channels] (``patchify``'s layout) -> [channels, H, W]."""
    grid = int(round(patches.shape[0] ** 0.5))
    image = patches.reshape(grid, grid, patch_size, patch_size, channels)
    return image.permute(4, 0, 2, 1, 3).reshape(channels, grid * patch_size, grid * patch_size)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] (mean = std = 0.5) -> [H, W, C] uint8, clipped."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def unnormalised(prediction: torch.Tensor, original_patches: torch.Tensor, eps: float = NORMALISATION_EPS):
    """Per-patch normalised pixel predictions [M, P] back in the image range, with the mean and (unbiased)
    variance of the original patches [M, P], as normalized_pixel_targets computed the targets."""
    mean, var = original_patches.mean(-1, keepdim=True), original_patches.var(-1, keepdim=True)
    return prediction * (var + eps).sqrt() + mean


@dataclass
class MaskedToken:
    shown: str  # as the model saw it: "[MASK]", "[~word]" (replaced by a random token) or "[=word]" (kept)
    target_id: int
    target: str
    guesses: list  # (token id, token text, probability), the most probable first


@dataclass
class TextPanel:
    pieces: list  # (text, index into ``tokens`` or None) in caption order; their texts joined give the caption
    tokens: list = field(default_factory=list)  # MaskedToken of each chosen position, in caption order


@dataclass
class RowStats:
    masked_patches: int
    patches: int
    pixel_loss: float  # mean squared error of the normalised predictions over the masked patches (the image loss)
    mean_baseline: float  # the same for predicting each patch as its own mean grey (all zeros): mean(target**2)


@dataclass
class Row:
    original: np.ndarray  # [S, S, 3] uint8
    masked: np.ndarray
    reconstruction: np.ndarray
    text: TextPanel = None  # None: no caption
    stats: RowStats = None


def token_text(tokenizer, token_id: int) -> str:
    """One token as a word for the text panel (``▁red`` -> ``red``; a special token by its name)."""
    text = tokenizer.tokenizer.decode([token_id], skip_special_tokens=False).strip()
    return text or tokenizer.tokenizer.id_to_token(token_id) or str(token_id)


def text_panel(tokenizer, text_ids: torch.Tensor, text_labels: torch.Tensor, padding_mask: torch.Tensor,
               token_logits: torch.Tensor, k: int = TOP_K) -> TextPanel:
    """A sample's caption with its chosen tokens shown as the model saw them, and the top-k guesses for each;
    ``token_logits`` [chosen positions of this sample, vocab]."""
    length = int(padding_mask.sum())
    inputs, labels = text_ids[:length].tolist(), text_labels[:length].tolist()
    original = [label if label != IGNORE_INDEX else token for token, label in zip(inputs, labels)]
    special = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id}
    body = [position for position in range(length) if original[position] not in special]
    probabilities, ids = top_guesses(token_logits, k) if token_logits.shape[0] else (None, None)
    panel, decoded, chosen = TextPanel([]), "", 0
    for count, position in enumerate(body, 1):
        # Each token's text with the spacing the tokenizer's decoder gives it in the caption (word starts, "," glued).
        text = tokenizer.tokenizer.decode([original[p] for p in body[:count]], skip_special_tokens=False)
        piece = text[len(decoded):] if text.startswith(decoded) else " " + token_text(tokenizer, original[position])
        decoded = text
        if labels[position] == IGNORE_INDEX:
            panel.pieces.append((piece, None))
            continue
        given = inputs[position]
        shown = ("[MASK]" if given == tokenizer.mask_id else
                 f"[={token_text(tokenizer, given)}]" if given == labels[position] else
                 f"[~{token_text(tokenizer, given)}]")
        guesses = [(int(i), token_text(tokenizer, int(i)), float(p))
                   for p, i in zip(probabilities[chosen], ids[chosen])]
        panel.tokens.append(MaskedToken(shown, labels[position], token_text(tokenizer, labels[position]), guesses))
        panel.pieces.append((piece[:len(piece) - len(piece.lstrip())] + shown, len(panel.tokens) - 1))
        chosen += 1
    # Chosen positions among special tokens (never, with mask_text's maskable) would leave logits unused.
    if chosen != token_logits.shape[0]:
        raise ValueError(f"{token_logits.shape[0]} token predictions for {chosen} masked tokens of the caption")
    return panel


def rows_of_batch(batch: dict, predictions: Predictions, patch_size: int, tokenizer=None, count: int = None,
                  captions=None, k: int = TOP_K, skip_unmasked: bool = False) -> list:
    """The grid rows of a batch (the model's keyword arguments, on any device) and the predictions of its forward
    (``captured_predictions``): the first ``count`` samples (all by default), leaving out those without a masked
    patch where ``skip_unmasked`` (validation's padding samples). ``captions[i]`` False leaves sample i without a
    text panel (a sample encoded from an empty text); without a ``tokenizer`` no row has one."""
    images = batch["images"].detach().float().cpu()
    image_mask = batch["image_mask"].detach().cpu().bool()
    text_ids, text_labels = batch["text_ids"].detach().cpu(), batch["text_labels"].detach().cpu()
    padding_mask = batch["text_padding_mask"].detach().cpu()
    if predictions.pixels is None or predictions.pixels.shape[0] != int(image_mask.sum()):
        raise ValueError("the image head's predictions do not match the masked patches of the batch (is "
                         "PretrainingModel.forward still applying it to the masked patches only?)")
    chosen = text_labels != IGNORE_INDEX
    if predictions.token_logits is None or predictions.token_logits.shape[0] != int(chosen.sum()):
        raise ValueError("the text head's predictions do not match the masked tokens of the batch")
    pixel_starts = np.concatenate([[0], image_mask.sum(1).cumsum(0).numpy()])
    token_starts = np.concatenate([[0], chosen.sum(1).cumsum(0).numpy()])
    rows = []
    for index in range(images.shape[0]):
        if count is not None and len(rows) >= count:
            break
        mask = image_mask[index]
        if skip_unmasked and not mask.any():
            continue
        image = images[index]
        patches = patchify(image[None], patch_size)[0]
        predicted = predictions.pixels[pixel_starts[index]:pixel_starts[index + 1]]
        restored = patches.clone()
        restored[mask] = unnormalised(predicted, patches[mask])
        original = to_uint8(image)
        reconstruction = to_uint8(unpatchify(restored, patch_size, image.shape[0]))
        visible = np.repeat(np.repeat((~mask).reshape(int(mask.numel() ** 0.5), -1).numpy(), patch_size, 0),
                            patch_size, 1)
        reconstruction[visible] = original[visible]  # the original's pixels exactly, not a round trip
        masked_panel = original.copy()
        masked_panel[~visible] = MASK_GREY
        target = normalized_pixel_targets(image[None], patch_size)[0][mask]
        stats = RowStats(int(mask.sum()), mask.numel(), float(((predicted - target) ** 2).mean()),
                         float((target ** 2).mean()))
        text = None
        if tokenizer is not None and (captions is None or captions[index]):
            text = text_panel(tokenizer, text_ids[index], text_labels[index], padding_mask[index],
                              predictions.token_logits[token_starts[index]:token_starts[index + 1]], k)
        rows.append(Row(original, masked_panel, reconstruction, text, stats))
    return rows


def readable_scale(image_size: int) -> int:
    """The smallest whole scale that draws an image panel at least READABLE_PANEL pixels wide."""
    return max(1, -(-READABLE_PANEL // image_size))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _words(pieces: list) -> list:
    """The caption's pieces grouped into words (a piece without leading space goes on its word), each a list of
    (text, token index or None)."""
    words = []
    for text, index in pieces:
        if not words or text[:1].isspace():
            words.append([(text.lstrip(), index)])
        else:
            words[-1].append((text, index))
    return words


def _layout_text(panel: TextPanel, width: int, font, small) -> list:
    """Drawing instructions (x, y, text, colour, font) of a text panel, within ``width``; y from 0."""
    items, x, y, space = [], MARGIN, MARGIN, font.getlength(" ")
    for word in _words(panel.pieces):
        parts = []
        for text, index in word:
            parts.append((text, RED if index is not None else BLACK, font))
            if index is not None:
                parts.append((str(index + 1), RED, small))
        word_width = sum(f.getlength(text) for text, _, f in parts)
        if x > MARGIN and x + space + word_width > width - MARGIN:
            x, y = MARGIN, y + LINE_HEIGHT
        elif x > MARGIN:
            x += space
        for text, colour, f in parts:
            items.append((x, y + (0 if f is font else -2), text, colour, f))
            x += f.getlength(text)
    if not panel.tokens:
        return items
    y += LINE_HEIGHT + 2
    items.append((MARGIN, y, f"[MASK] masked, [~w] replaced by w, [=w] kept; each: the true token, then the top "
                             f"{len(panel.tokens[0].guesses)} guesses (green: right)", GREY, font))
    y += LINE_HEIGHT
    entries = []
    for number, token in enumerate(panel.tokens, 1):
        entry = [(f"{number}. {token.target}:", BLACK)]
        entry += [(f"  {text} {probability:.2f}", GREEN if token_id == token.target_id else GREY)
                  for token_id, text, probability in token.guesses]
        entries.append(entry)
    column = max(sum(font.getlength(text) for text, _ in entry) for entry in entries) + 3 * MARGIN
    columns = max(1, int((width - MARGIN) // column))
    per_column = -(-len(entries) // columns)
    for number, entry in enumerate(entries):
        x = MARGIN + (number // per_column) * column
        line_y = y + (number % per_column) * LINE_HEIGHT
        for text, colour in entry:
            items.append((x, line_y, text, colour, font))
            x += font.getlength(text)
    return items


@dataclass
class Grid:
    image: Image.Image  # RGB
    row_tops: list  # the y of each row's top edge
    panel_size: int  # the side of an image panel in pixels (the model's image size times the scale)
    text_left: int  # the x where the text panels begin (None where no row has a caption)


def reconstruction_grid(rows: list, scale: int = 1, text_width: int = TEXT_WIDTH) -> Grid:
    """The rows drawn one under the other: the three image panels (PANELS) side by side, each ``scale`` times the
    model's resolution (nearest neighbour), and where any row has a caption a text panel ``text_width`` wide beside
    them. A row is as high as its panels or its text, whichever is higher; the rest is white."""
    if not rows:
        raise ValueError("no rows to draw")
    side = rows[0].original.shape[0] * scale
    font, small = _font(FONT_SIZE), _font(SMALL_FONT_SIZE)
    with_text = any(row.text is not None for row in rows)
    layouts = [_layout_text(row.text, text_width, font, small) if row.text is not None else [] for row in rows]
    heights = [max(side, max((y for _, y, *_ in items), default=0) + LINE_HEIGHT + MARGIN if items else 0)
               for items in layouts]
    panels_width = len(PANELS) * side
    grid = Image.new("RGB", (panels_width + (text_width if with_text else 0), sum(heights)), WHITE)
    draw = ImageDraw.Draw(grid)
    tops = [int(top) for top in np.concatenate([[0], np.cumsum(heights)[:-1]])]
    for row, items, top in zip(rows, layouts, tops):
        for column, panel in enumerate((row.original, row.masked, row.reconstruction)):
            picture = Image.fromarray(panel, "RGB")
            if scale != 1:
                picture = picture.resize((side, side), Image.Resampling.NEAREST)
            grid.paste(picture, (column * side, top))
        for x, y, text, colour, f in items:
            draw.text((panels_width + x, top + y), text, fill=colour, font=f)
        if top and row.text is not None:  # a rule between text panels, never over the image panels
            draw.line([(panels_width, top), (grid.width, top)], fill=(220, 220, 220))
    return Grid(grid, tops, side, panels_width if with_text else None)
