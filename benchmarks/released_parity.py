"""How far eve-ds's EVE is from the authors' function, per encoding mode, after their checkpoint layout.

    python benchmarks/released_parity.py --model eve-base [--load-size 384]

Gives every weight of a preset a random value, exports it to the authors' layout
(tools/convert_released.py export), imports that file back (import), loads it with EVE.from_pretrained and
prints the largest absolute difference between EVE's final hidden states and the reference forward pass
written on the released names (tests/released_reference.py) for an image-text pair, an image alone and a
text alone; then the same for the router-only variant (the function the authors' weights would get without
routing_embedding_to_experts), and for the weights loaded at ``--load-size`` pixels.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.checkpoint import export_released, import_released, save_pretrained  # noqa: E402
from eve_ds.checkpoint.released import backbone  # noqa: E402
from eve_ds.config import PRESETS, preset  # noqa: E402
from eve_ds.model import EVE  # noqa: E402
from tests.released_reference import encode_every_mode  # noqa: E402
from tests.test_model import batch  # noqa: E402


def report(title: str, encoder: EVE, weights: dict, config, inputs: dict):
    for mode, (ours, theirs) in encode_every_mode(encoder, weights, config, inputs).items():
        print(f"{title:42s} {mode:6s} max |EVE - reference| {(ours - theirs).abs().max().item():.2e}   "
              f"(largest hidden value {theirs.abs().max().item():.1f})")


def interpolated_image_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """The authors' loader's resize of a [1 + g*g, width] image position table to [1 + grid*grid, width]."""
    old_grid = round((table.shape[0] - 1) ** 0.5)
    patches = table[1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(PRESETS), default="eve-base")
    parser.add_argument("--load-size", type=int, default=384, help="image size of the second load")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    config = preset(args.model)
    torch.manual_seed(0)
    model = EVE(config)
    with torch.no_grad():  # fresh norms are ones and biases zeros: perturb all, routing embeddings at init scale
        for name, param in model.named_parameters():
            if "modality_embed" not in name:
                param.add_(torch.randn_like(param) * config.init_std)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_pretrained(tmp / "ours", {f"encoder.{k}": v for k, v in model.state_dict().items()}, config)
        export_released(tmp / "ours", tmp / "released.pth")
        imported_state, imported_config, held, _ = import_released(tmp / "released.pth")
        save_pretrained(tmp / "imported", imported_state, imported_config, held=held)
        weights, _ = backbone(torch.load(tmp / "released.pth", weights_only=True))
        encoder = EVE.from_pretrained(tmp / "imported").eval()
        resized = EVE.from_pretrained(tmp / "imported", image_size=args.load_size).eval()
    print(f"{args.model}, torch {torch.__version__}; routing embedding norms of the first MoE layer "
          f"{[round(x, 3) for x in model.moe_layers()[0].gate.modality_embed.norm(dim=1).tolist()]}")
    inputs = batch(config, size=args.batch)
    report("imported, as loaded", encoder, weights, config, inputs)
    router_only = EVE(config.replace(routing_embedding_to_experts=False)).eval()
    router_only.load_state_dict(encoder.state_dict())
    report("router-only variant of the same weights", router_only, weights, config, inputs)
    resized_config = resized.config
    weights["pos_embed_vision"] = interpolated_image_positions(weights["pos_embed_vision"],
                                                               resized_config.image_size // config.patch_size)
    report(f"loaded at {args.load_size} pixels", resized, weights, resized_config, batch(resized_config, size=args.batch))


if __name__ == "__main__":
    main()
