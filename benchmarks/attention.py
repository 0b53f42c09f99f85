"""EVE's self-attention over image patches and padded text: the ways to run it, checked and timed.

    python benchmarks/attention.py --model eve-base [--batch 32] [--repeats 10]

EVE's sequences are [CLS, patches, text], with the text padded to ``max_text_len``; padded keys are masked.
A boolean mask keeps ``scaled_dot_product_attention`` off its flash kernel. Each option below is checked
against the reference (the math kernel in fp32 with the boolean mask, today's semantics) on the real tokens,
then its forward and backward are timed (median of ``--repeats``), on the device at hand (bf16 on CUDA, fp32
on the CPU):

- boolean mask, the backend torch chooses (the model today) and each backend forced;
- an additive float mask (0 or -inf), which the memory-efficient kernel takes;
- the real tokens packed as a nested (jagged) tensor, no mask at all: what flash can run;
- no mask, padding attended: not EVE's function, the bound of what dropping the mask could gain.
"""
import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eve_ds.config import preset  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cuDNN": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def inputs(batch: int, heads: int, head_dim: int, image_tokens: int, text_len: int, real_fraction: float,
           dtype, device, generator):
    """Queries, keys and values [B, H, L, D] and the [B, L] mask of real tokens (text lengths vary around
    ``real_fraction`` of ``text_len``)."""
    length = image_tokens + text_len
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    text_lengths = (real_fraction * text_len * (0.5 + torch.rand(batch, generator=generator))).long().clamp(1, text_len)
    real = torch.cat([torch.ones(batch, image_tokens, dtype=torch.bool),
                      torch.arange(text_len).expand(batch, -1) < text_lengths[:, None]], 1)
    return q, k, v, real.to(device)


def boolean_mask(q, k, v, real):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])


def additive_mask(q, k, v, real):
    bias = torch.zeros(real.shape, dtype=q.dtype, device=q.device).masked_fill(~real, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])


def unmasked(q, k, v, real):
    return F.scaled_dot_product_attention(q, k, v)


def packed(q, k, v, real):
    """The real tokens of each sample as one jagged sequence; padded positions of the output are zero."""
    offsets = torch.cat([real.new_zeros(1, dtype=torch.long), real.sum(1).cumsum(0)])

    def pack(x):  # [B, H, L, D] -> nested [B, H, j, D]
        return torch.nested.nested_tensor_from_jagged(x.transpose(1, 2)[real], offsets).transpose(1, 2)

    out = F.scaled_dot_product_attention(pack(q), pack(k), pack(v)).transpose(1, 2).values()
    result = torch.zeros_like(q.transpose(1, 2))
    result[real] = out
    return result.transpose(1, 2)


def forced(function, backend):
    def run(*args):
        with sdpa_kernel(backend):
            return function(*args)
    return run


def time_forward_backward(function, q, k, v, real, repeats: int) -> float:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    times = []
    for repeat in range(repeats + 1):
        if q.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        function(q, k, v, real).float().square().sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()
        if repeat:  # the first call warms up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="eve-base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--real-text", type=float, default=0.6, help="mean fraction of the text that is not padding")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("torch.nested").setLevel(logging.ERROR)  # why each kernel was refused: the table says it
    config = preset(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, real = inputs(args.batch, config.num_heads, config.hidden_size // config.num_heads,
                           config.num_image_tokens, config.max_text_len, args.real_text, dtype, device,
                           torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH):
        reference = boolean_mask(q.float(), k.float(), v.float(), real)
    options = {"boolean mask (today), torch's choice": boolean_mask,
               **{f"boolean mask, {name}": forced(boolean_mask, backend) for name, backend in BACKENDS.items()},
               "additive mask, torch's choice": additive_mask,
               "additive mask, memory-efficient": forced(additive_mask, SDPBackend.EFFICIENT_ATTENTION),
               "packed real tokens (nested), torch's choice": packed,
               "packed real tokens (nested), flash": forced(packed, SDPBackend.FLASH_ATTENTION),
               "no mask (padding attended: not EVE)": unmasked}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.model} attention, batch {args.batch}, {config.num_heads} heads, sequence "
          f"{config.num_image_tokens} + {config.max_text_len} ({real.float().mean():.0%} real), {dtype}, {name}, "
          f"torch {torch.__version__}")
    print("| option | max error on real tokens | forward + backward | vs today |")
    print("| --- | --- | --- | --- |")
    baseline = None
    for label, function in options.items():
        try:
            out = function(q, k, v, real)
            seconds = time_forward_backward(function, q, k, v, real, args.repeats)
        except (RuntimeError, NotImplementedError) as error:
            print(f"| {label} | not available on this device ({type(error).__name__}) | | |")
            continue
        error = (out.float() - reference).abs().masked_fill(~real[:, None, :, None], 0).max().item()
        baseline = baseline or seconds
        print(f"| {label} | {error:.1e} | {seconds * 1e3:.2f} ms | {seconds / baseline:.2f} |")


if __name__ == "__main__":
    main()
