"""ICQ (IR-QLoRA) against plain NF on the built-in SmolLM2: code entropy, weight error, bits, time.

Every linear layer `loquant quantize` targets by default (210 matrices, 106,168,320 weights)
is quantized with `quantize_weight` at NF2/3/4 g64, with and without ICQ. Per setting: the
mean Shannon entropy of the code histogram per group (bits; the maximum is b), the relative
weight error sqrt(Σ‖W - Q(W)‖² / Σ‖W‖²) over all those matrices, the mean of the per-matrix
relative errors, the stored bits per weight and the seconds spent quantizing. Prints a
markdown table for BENCHMARKS.md.

    python bench/icq.py [--bits 4 3 2] [--group-size 64]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from loquant import QuantConfig
from loquant.allocation import storage_bits
from loquant.formats import WeightFormat, dequantize_weight, quantize_weight
from loquant.formats.codec import _grouped, unpack_codes
from loquant.formats.icq import code_entropy
from loquant.model import linear_weight
from loquant.sources import load_model


def measure(weights: dict[str, torch.Tensor], fmt: WeightFormat) -> dict:
    err2 = norm2 = ent_sum = groups = bits = rel_sum = seconds = 0.0
    for w in weights.values():
        shape = tuple(w.shape)
        start = time.perf_counter()
        t = quantize_weight(w, fmt)
        seconds += time.perf_counter() - start
        d2 = (dequantize_weight(t, fmt, shape) - w).square().sum().item()
        n2 = w.square().sum().item()
        err2, norm2, rel_sum = err2 + d2, norm2 + n2, rel_sum + math.sqrt(d2 / n2)
        g = fmt.group_len(shape[1])
        valid = _grouped(torch.ones(1, shape[1], dtype=torch.bool), g, False)
        h = code_entropy(_grouped(unpack_codes(t, fmt, shape), g, 0), fmt.bits, valid)
        ent_sum, groups = ent_sum + h.sum().item(), groups + h.numel()
        bits += storage_bits(fmt, shape, 0, False)
    numel = sum(w.numel() for w in weights.values())
    return {
        "entropy": ent_sum / groups,
        "error": math.sqrt(err2 / norm2),
        "mean_layer_error": rel_sum / len(weights),
        "bits_per_weight": bits / numel,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    config = QuantConfig()
    weights = {}
    for name, module in model.named_modules():
        w = linear_weight(module)
        if w is not None and config.selects(name):
            weights[name] = w.detach().float()
    numel = sum(w.numel() for w in weights.values())
    print(
        f"{args.model}: {len(weights)} matrices, {numel:,} weights; {platform.node()} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| format | bits/weight | mean code entropy (bits) | rel. weight error | mean matrix error | quantize s |")
    print("|---|---|---|---|---|---|")
    for bits in args.bits:
        for icq in (False, True):
            fmt = WeightFormat("nf", bits, args.group_size, icq=icq)
            r = measure(weights, fmt)
            print(
                f"| {fmt.describe()} | {r['bits_per_weight']:.4f} | {r['entropy']:.4f} | {r['error']:.4f} "
                f"| {r['mean_layer_error']:.4f} | {r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
