"""Base quantizers (rtn, gptq, hqq) on SmolLM2-135M, alone and under corrections; and GPTQ/HQQ
time and memory on Llama-2-7B-shaped layers.

quality: statistics of the float model's layer inputs are gathered once (sotu-calib, 64 x 512,
seed 0) and shared by every row (GPTQ's Hessian, QERA's R). Perplexity is token level over
non-overlapping windows: sotu-test 40 x 512, and sotu-val 40 x 512 as the other text.
speed: one Llama-2-7B block (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008) with
random weights and random correlated R; per-block seconds and peak memory, x32 for the model.

rilq: INT2 g64 rank 64, closed-form corrections against RILQ trained from them. Each row
calibrates on its own sotu-calib windows (64 or 256 x 512, seed 0); RILQ trains on those
windows and stops early on the first 8 x 512 windows of sotu-val, so its sotu-val column is
not independent text (sotu-test is).

    python bench/quantizers.py quality [--device cuda] [--only "INT3 g64 gptq" ...]
    python bench/quantizers.py rilq [--device cuda] [--only ...]
    python bench/quantizers.py speed [--device cuda]
    python bench/quantizers.py rilq-speed [--device cuda]

rilq-speed: RILQ's training cost on Llama-2-7B-shaped models with random weights (bf16 teacher
and student, INT2 g64, rank 64, svd start), with 2, 4 and 8 decoder blocks (after a 1-block
warm-up) so the per-block cost can be read off: seconds per step (batch 8 x 512) and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from loquant.calibration import InputStats, collect
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.formats import WeightFormat, quantize_weight
from loquant.model import QuantConfig, base_quantizer, quantize, targets_of
from loquant.rilq import RilqConfig
from loquant.sources import load_model

ROWS = [  # label, QuantConfig fields
    ("INT3 g64 rtn", dict(bits=3, group_size=64)),
    ("INT3 g64 gptq", dict(bits=3, group_size=64, quantizer="gptq")),
    ("INT3 g64 hqq", dict(bits=3, group_size=64, quantizer="hqq")),
    ("INT4 g128 rtn", dict(bits=4, group_size=128)),
    ("INT4 g128 gptq", dict(bits=4, group_size=128, quantizer="gptq")),
    ("INT4 g128 hqq", dict(bits=4, group_size=128, quantizer="hqq")),
    ("INT3 g64 rtn + qera-exact r32", dict(bits=3, group_size=64, method="qera-exact", rank=32)),
    ("INT3 g64 gptq + qera-exact r32", dict(bits=3, group_size=64, quantizer="gptq", method="qera-exact", rank=32)),
    ("INT3 g64 hqq + qera-exact r32", dict(bits=3, group_size=64, quantizer="hqq", method="qera-exact", rank=32)),
    ("INT3 g64 gptq act-order", dict(bits=3, group_size=64, quantizer="gptq", act_order=True)),
    (
        "INT3 g64 gptq act-order sequential",
        dict(bits=3, group_size=64, quantizer="gptq", act_order=True, sequential=True),
    ),
    (
        "INT3 g64 gptq act-order + qera-exact r32",
        dict(bits=3, group_size=64, quantizer="gptq", act_order=True, method="qera-exact", rank=32),
    ),
    ("INT2 g64 gptq", dict(bits=2, group_size=64, quantizer="gptq")),
    (
        "INT2 g64 hqq + qera-exact r64 iters 5",
        dict(bits=2, group_size=64, quantizer="hqq", method="qera-exact", rank=64, iters=5),
    ),
    (
        "INT2 g64 gptq act-order sequential + qera-exact r64",
        dict(bits=2, group_size=64, quantizer="gptq", act_order=True, method="qera-exact", rank=64, sequential=True),
    ),
    ("INT2 g64 gptq + qera-exact r64", dict(bits=2, group_size=64, quantizer="gptq", method="qera-exact", rank=64)),
    ("INT2 g64 hqq + qera-exact r64", dict(bits=2, group_size=64, quantizer="hqq", method="qera-exact", rank=64)),
]


BEST_INT2 = dict(bits=2, group_size=64, quantizer="gptq", act_order=True, sequential=True, rank=64)
RILQ_ROWS = [  # label, calibration windows, QuantConfig fields
    ("rtn + qera-exact r64", 64, dict(bits=2, group_size=64, method="qera-exact", rank=64)),
    ("gptq act-order seq + qera-exact r64", 64, dict(BEST_INT2, method="qera-exact")),
    ("gptq act-order seq + qera-exact r64", 256, dict(BEST_INT2, method="qera-exact")),
    ("gptq act-order seq + qera-exact r64 iters 5", 256, dict(BEST_INT2, method="qera-exact", iters=5)),
    ("rtn + qera-exact r64 -> rilq", 256, dict(bits=2, group_size=64, method="rilq", rank=64)),
    ("gptq act-order seq + qera-exact r64 -> rilq", 256, dict(BEST_INT2, method="rilq")),
    ("gptq act-order seq + qera-exact r64 -> rilq lr 1e-3", 256, dict(BEST_INT2, method="rilq", rilq=dict(lr=1e-3))),
    ("gptq act-order seq + qera-exact r64 -> rilq lm loss only", 256,
     dict(BEST_INT2, method="rilq", rilq=dict(hidden_weight=0.0))),
]  # fmt: skip


def _ppl(model, windows, device) -> float:
    return perplexity(model, windows, batch_size=8, progress=False)["ppl"]


def quality(args) -> None:
    model, tokenizer = load_model("smollm2-135m")
    model.to(args.device)
    test = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    val = eval_windows(tokenize(tokenizer, load_text("sotu-val")), 512, 40)
    calib = calib_windows(tokenize(tokenizer, load_text("sotu-calib")), 512, 64, 0)
    targets = {name: module for name, module, _, _ in targets_of(model, QuantConfig())}
    start = time.perf_counter()
    stats = collect(model, calib, targets, progress=False)
    print(f"statistics: {time.perf_counter() - start:.1f} s", flush=True)
    rows = [r for r in ROWS if not args.only or r[0] in args.only]
    results = []
    for label, fields in rows:
        q = copy.deepcopy(model)
        start = time.perf_counter()
        config = QuantConfig(**fields)
        if config.sequential:  # block by block, on the outputs of the quantized blocks before
            quantize(q, config, calib=calib, progress=False)
        else:
            quantize(q, config, stats=stats, progress=False)
        seconds = time.perf_counter() - start
        row = {
            "config": label,
            "seconds": seconds,
            "test": _ppl(q, test, args.device),
            "val": _ppl(q, val, args.device),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del q
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nsmollm2-135m, statistics from sotu-calib 64 x 512 (seed 0) shared by every row; token-level ppl, "
          f"sotu-test and sotu-val 40 x 512 each; {device}\n")  # fmt: skip
    print("| config | sotu-test ppl | sotu-val ppl | quantize s |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['config']} | {r['test']:.2f} | {r['val']:.2f} | {r['seconds']:.1f} |")


def rilq(args) -> None:
    model, tokenizer = load_model("smollm2-135m")
    model.to(args.device)
    test = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    val = eval_windows(tokenize(tokenizer, load_text("sotu-val")), 512, 40)
    calib_ids = tokenize(tokenizer, load_text("sotu-calib"))
    results = []
    for label, samples, fields in [r for r in RILQ_ROWS if not args.only or r[0] in args.only]:
        q = copy.deepcopy(model)
        calib = calib_windows(calib_ids, 512, samples, 0)
        fields = dict(fields, rilq=RilqConfig(**fields.get("rilq", {}), device=args.device))
        start = time.perf_counter()
        quantize(q, QuantConfig(**fields), calib=calib, held_out=val[:8], progress=False)
        seconds = time.perf_counter() - start
        record = q.config.quantization_config["recipe"].get("rilq")
        row = {
            "config": label,
            "calib": samples,
            "seconds": seconds,
            "test": _ppl(q, test, args.device),
            "val": _ppl(q, val, args.device),
            "rilq": record and {k: v for k, v in record.items() if k != "log"},
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del q
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nsmollm2-135m INT2 g64, rank 64; token-level ppl, sotu-test and sotu-val 40 x 512; {device}\n")
    print("| config | calib windows | RILQ best step / run | sotu-test ppl | sotu-val ppl | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        steps = f"{r['rilq']['best_step']} / {r['rilq']['steps_run']}" if r["rilq"] else ""
        print(f"| {r['config']} | {r['calib']} | {steps} | {r['test']:.2f} | {r['val']:.2f} | {r['seconds']:.0f} |")


def rilq_speed(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    print(f"\nRILQ on Llama-2-7B-shaped models, random weights, bf16, INT2 g64 rank 64, batch 8 x 512; {args.device}\n")
    print("| decoder blocks | quantize + svd start (s) | RILQ s / step | peak memory (MiB) |")
    print("|---:|---:|---:|---:|")
    for blocks in (1, 2, 4, 8):  # the 1-block run is a warm-up, not printed
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                             num_key_value_heads=32, num_hidden_layers=blocks, vocab_size=32000)  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
        gen = torch.Generator().manual_seed(0)
        calib, held = (
            torch.randint(0, 32000, (64, 512), generator=gen),
            torch.randint(0, 32000, (8, 512), generator=gen),
        )
        steps = 12
        rilq = RilqConfig(init="svd", steps=steps, eval_every=steps, device=args.device)
        quant = QuantConfig(bits=2, group_size=64, method="rilq", rank=64, rilq=rilq)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        quantize(model, quant, calib=calib, held_out=held, progress=False)
        total = time.perf_counter() - start
        record = model.config.quantization_config["recipe"]["rilq"]
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        if blocks == 1:
            continue
        # the RILQ seconds include two held-out evaluations (start and end): an upper bound per step
        print(
            f"| {blocks} | {total - record['seconds']:.1f} | {record['seconds'] / steps:.3f} | {peak:.0f} |", flush=True
        )
        del model


def _correlated_stats(dim: int, device, seed: int) -> InputStats:
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(dim, dim, device=device, generator=g) / math.sqrt(dim)
    L = (torch.eye(dim, device=device) + mix) * torch.exp(torch.randn(dim, device=device, generator=g))
    R = (L @ L.T).double() / dim
    return InputStats(R * 1000, torch.diagonal(R) * 1000, torch.zeros(dim, dtype=R.dtype, device=device), 1000)


def speed(args) -> None:
    device = torch.device(args.device)
    hidden, mlp = 4096, 11008
    layers = [("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden), ("o", hidden, hidden),
              ("gate", mlp, hidden), ("up", mlp, hidden), ("down", hidden, mlp)]  # fmt: skip
    stats = {dim: _correlated_stats(dim, device, dim) for dim in (hidden, mlp)}
    fmt = WeightFormat("int", 3, 64)
    print(f"\nLlama-2-7B-shaped block, random weights, INT3 g64, {args.device}\n")
    print("| quantizer | seconds per block | x32 blocks (s) | peak memory (MiB) |")
    print("|---|---:|---:|---:|")
    for name in ("rtn", "gptq", "hqq"):
        total = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _, out_f, in_f in layers:
            W = torch.randn(out_f, in_f, device=device, generator=torch.Generator(device=device).manual_seed(1)) * 0.02
            fn = base_quantizer(name, stats[in_f]) if name != "rtn" else quantize_weight
            fn(W, fmt)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(W, fmt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total += time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        print(f"| {name} | {total:.2f} | {32 * total:.0f} | {peak:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "rilq", "speed", "rilq-speed"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="+")
    args = ap.parse_args()
    {"quality": quality, "rilq": rilq, "speed": speed, "rilq-speed": rilq_speed}[args.what](args)


if __name__ == "__main__":
    main()
