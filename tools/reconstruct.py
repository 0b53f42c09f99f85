"""Draw what a pre-trained EVE restores of masked images and captions: one PNG row per image with the original,
the masked input (masked patches dark grey) and the reconstruction, and beside it, for an image given a caption, the
caption with its masked tokens and the model's top-5 guesses for each with their probabilities.

    python tools/reconstruct.py runs/eve-tiny/consolidated data/shapes/images/000000.png \
        data/shapes/images/000001.png --out recon.png --caption "a large red ring ..." --caption "two shapes ..."
    python tools/reconstruct.py runs/eve-tiny/checkpoints data/shapes/images/00000[0-3].png --out recon.png

WEIGHTS is a consolidated folder of a pre-training run (tools/consolidate.py: model.safetensors, config.json and the
run's tokenizer) or a run's ``checkpoints/`` folder (its newest checkpoint, or ``--tag``), consolidated in memory.
Give one ``--caption`` per image, in order, or none; an image without a caption (or with ``--caption ''``) is
encoded with an empty text, [CLS] [SEP], as pre-training always pairs an image with a text.

The masks are pre-training's (``MaskedSamples`` without augmentation, as validation draws them: the image resized
whole, block-wise or random patch masking, BERT-style token masking), with the run's masking settings, which a
checkpoint stores; a consolidated folder does not, and then the defaults are used (the tool says so). Each
``--mask-*`` option replaces one setting. Image i's masks are drawn from a generator seeded by (``--seed``, i).

The reconstruction shows the image head's predictions of the masked patches, which are pixels normalised per patch
(the pre-training targets, ``normalized_pixel_targets``), un-normalised with the original patch's mean and standard
deviation, as MAE does for the figures of its models trained on normalised targets, and clipped to the image range;
the visible patches are pasted back from the original. The statistics are over a patch's three channels together:
the hue and the structure inside a masked patch are the model's, its brightness and contrast the original's, and a
patch of one grey level (a plain grey, black or white background) comes back exactly whatever the model predicts.
Judge the model by the hues, edges and shapes inside the masked patches, and by the printed per-image loss on the
normalised pixels against predicting each patch as its own mean grey. Runs offline, on CPU unless a GPU is there.
"""
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint import consolidate  # noqa: E402
from eve_ds.checkpoint.pretrained import (CONFIG, PRETRAINING, WEIGHTS, CheckpointError, load_weights,  # noqa: E402
                                          pretrained_config)
from eve_ds.data.dataset import UNREADABLE_IMAGE_ERRORS, MaskedSamples  # noqa: E402
from eve_ds.data.tokenizer import TOKENIZER_FILE, TextTokenizer  # noqa: E402
from eve_ds.errors import ArgumentParser, UsageError, run_entry_point  # noqa: E402
from eve_ds.objectives import PretrainingModel, MaskingConfig  # noqa: E402
from eve_ds.visualize import (PANELS, READABLE_PANEL, TOP_K, captured_predictions, readable_scale,  # noqa: E402
                              reconstruction_grid, rows_of_batch)


DEFAULT_MASKING = "the defaults are used, where no --mask-* or --image-masking option replaces them"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="a consolidated folder (tools/consolidate.py) or a run's checkpoints/ folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one grid row each")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--caption", action="append", default=None,
                        help="the caption of an image, one per image in order ('' for none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--mask-ratio-image", type=float, default=None,
                        help="the share of patches masked (default: the run's)")
    parser.add_argument("--mask-ratio-text", type=float, default=None,
                        help="the share of caption tokens masked (default: the run's)")
    parser.add_argument("--image-masking", choices=("random", "block"), default=None,
                        help="random or block-wise patch masking (default: the run's)")
    parser.add_argument("--tag", default=None, help="with a checkpoints/ folder: the checkpoint (default: latest)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json, where WEIGHTS holds none (or to replace the one it holds)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="guesses shown per masked token")
    parser.add_argument("--scale", type=int, default=None,
                        help="image panels at this many times the model's resolution (default: the smallest that "
                             f"makes them at least {READABLE_PANEL} pixels wide; 1: the model's resolution)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.caption is not None and len(args.caption) != len(args.images):
        parser.error(f"{len(args.caption)} --caption for {len(args.images)} images: give one per image, in order "
                     "('' for an image without one), or none")
    for name in ("mask_ratio_image", "mask_ratio_text"):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{name.replace('_', '-')} must lie between 0 and 1, got {value}")
    if args.top_k < 1 or (args.scale is not None and args.scale < 1):
        parser.error("--top-k and --scale must be positive")
    return args


def open_weights(path: Path, tag=None) -> tuple:
    """(model in eval mode, tokenizer or None, masking settings or None, notes) of a consolidated folder or a run's
    checkpoints folder."""
    if (path / CONFIG).is_file() or (path / WEIGHTS).is_file():
        pretrained_config(path)  # both files are there and the config reads
        model = PretrainingModel.from_pretrained(path)
        model.check_reconstructs(path)
        tokenizer = (TextTokenizer.from_folder(path, model.config.max_text_len)
                     if (path / TOKENIZER_FILE).is_file() else None)
        return model.eval(), tokenizer, None, [f"{path} is a consolidated folder, which does not store the run's "
                                               f"masking settings: {DEFAULT_MASKING}"]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (give a consolidated folder, tools/consolidate.py, or a run's "
                              "checkpoints/ folder)")
    checkpoint = consolidate(path, tag)
    if checkpoint.held.task != PRETRAINING:
        raise CheckpointError(f"{checkpoint.source} holds {checkpoint.held.describe()}, without the pre-training "
                              "heads that reconstruct")
    model = load_weights(PretrainingModel(checkpoint.model_config,
                                          objectives=checkpoint.held.head_options.get("objectives")),
                         checkpoint.state_dict, checkpoint.source)
    model.check_reconstructs(checkpoint.source)
    masking = checkpoint.client_state.get("masking")
    notes = list(checkpoint.notes)
    if masking is None:
        notes.append(f"{checkpoint.source} stores no masking settings: {DEFAULT_MASKING}")
    return model.eval(), checkpoint.tokenizer, masking, notes


def masking_of(saved: dict, args) -> tuple:
    """The masking settings to draw with, and how they were chosen."""
    masking = MaskingConfig(**saved) if saved is not None else MaskingConfig()
    source = "the run's" if saved is not None else "the defaults"
    changes = {key: value for key, value in (("image_mask_ratio", args.mask_ratio_image),
                                             ("text_mask_ratio", args.mask_ratio_text),
                                             ("image_masking", args.image_masking)) if value is not None}
    if changes:
        masking = MaskingConfig(**{**masking.__dict__, **changes})
        source += f", with {', '.join(f'{key} {value}' for key, value in changes.items())} from the command line"
    return masking, source


def read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{path}: cannot be read ({error.strerror or error})") from None


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, saved_masking, notes = open_weights(Path(args.weights), args.tag)
    config = model.config
    if args.tokenizer is not None:
        tokenizer = TextTokenizer(args.tokenizer, config.max_text_len)
    if tokenizer is None:
        raise UsageError(f"{args.weights} holds no {TOKENIZER_FILE}: pass the run's tokenizer with --tokenizer")
    tokenizer.check_fits(config.vocab_size, args.weights)
    masking, masking_source = masking_of(saved_masking, args)
    for note in notes:
        print(f"note: {note}")

    samples_maker = MaskedSamples(tokenizer, config.image_size, config.patch_size, masking, augment=False)
    captions = args.caption or [""] * len(args.images)
    samples = []
    for index, (path, caption) in enumerate(zip(args.images, captions)):
        data = read_image(path)
        try:
            samples.append(samples_maker.make(data, caption, random.Random(f"{args.seed}:reconstruct:{index}")))
        except UNREADABLE_IMAGE_ERRORS as error:
            raise UsageError(f"{path}: cannot be read as an image ({error})") from None
    batch = {key: value.to(args.device) for key, value in torch.utils.data.default_collate(samples).items()}
    model.to(args.device)
    with torch.no_grad(), captured_predictions(model) as predictions:
        outputs = model(**batch)
    rows = rows_of_batch(batch, predictions, config.patch_size, tokenizer, captions=[bool(c) for c in captions],
                         k=args.top_k)
    grid = reconstruction_grid(rows, args.scale or readable_scale(config.image_size))
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.image.save(out, format="PNG")
    except (OSError, ValueError) as error:
        raise UsageError(f"{out}: cannot be written ({error})") from None

    print(f"masking: {masking_source}: {masking.image_masking} patches, image ratio {masking.image_mask_ratio:g}, "
          f"text ratio {masking.text_mask_ratio:g}, seed {args.seed}")
    print(f"columns: {' | '.join(PANELS)} (masked patches dark grey; the reconstruction un-normalises each "
          "predicted patch with the original patch's mean and std, visible patches pasted back)")
    text_loss = (f", text {outputs['text_loss'].item():.4f}" if predictions.token_logits.shape[0] else
                 " (no caption: no text loss)")
    print(f"losses of the batch: image {outputs['image_loss'].item():.4f}{text_loss}")
    for number, (path, row) in enumerate(zip(args.images, rows), 1):
        stats = row.stats
        print(f"row {number}: {path}: {stats.masked_patches} of {stats.patches} patches masked; masked-patch loss on "
              f"normalised pixels {stats.pixel_loss:.4f} (each patch's mean grey: {stats.mean_baseline:.4f})")
        if row.text is None:
            continue
        print("  caption: " + "".join(text for text, _ in row.text.pieces).strip())
        for token_number, token in enumerate(row.text.tokens, 1):
            guesses = " | ".join(f"{text} {probability:.4f}" for _, text, probability in token.guesses)
            print(f"  {token_number}. {token.shown} (true: {token.target}): {guesses}")
    print(f"wrote {out}: {len(rows)} row{'s' * (len(rows) != 1)}, {grid.image.width}x{grid.image.height} pixels")


if __name__ == "__main__":
    run_entry_point(main, "reconstruct")
