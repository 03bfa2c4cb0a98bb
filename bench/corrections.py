"""Every correction method x format x rank on the built-in SmolLM2: bits, perplexity, seconds.

One process: the float model is loaded once, calibration statistics are gathered once (64
windows of 512 tokens from sotu-calib, seed 0) and shared by every config; each config
quantizes a copy, corrects it and is evaluated on sotu-test (40 x 512, token level).
Results are appended to a JSON-lines file, so an interrupted sweep resumes where it stopped.

    python bench/corrections.py --results runs/corrections.jsonl [--device cuda] [--max-seconds 500]
    python bench/corrections.py --results runs/corrections.jsonl --table [--plot bits_vs_ppl.png]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from loquant import QuantConfig, quantize
from loquant.calibration import collect
from loquant.corrections import METHODS
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.model import linear_weight
from loquant.sources import load_model
from loquant.storage import model_bits_per_weight

FORMATS = {"INT2 g64": ("int", 2), "INT3 g64": ("int", 3), "INT4 g64": ("int", 4), "NF4 g64": ("nf", 4)}
RANKS = (4, 8, 16, 32, 64)


def configs(formats, methods, ranks):
    for label in formats:
        yield label, "none", 0
        for rank in ranks:
            for method in methods:
                yield label, method, rank


def run(args) -> None:
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {(r["format"], r["method"], r["rank"]) for r in map(json.loads, results.read_text().splitlines())}
    todo = [c for c in configs(args.formats, args.methods, args.ranks) if c not in done]
    if not todo:
        print("nothing to do")
        return
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    model.to(args.device)
    test = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    calib = calib_windows(tokenize(tokenizer, load_text("sotu-calib")), 512, 64, seed=0)
    layers = {n: m for n, m in model.named_modules() if linear_weight(m) is not None and QuantConfig().selects(n)}
    t = time.perf_counter()
    stats = collect(model, calib, layers, progress=False)
    calib_s = time.perf_counter() - t
    print(f"setup {time.perf_counter() - start:.1f} s (calibration {calib_s:.1f} s), {len(todo)} configs to run")
    with results.open("a") as out:
        for label, method, rank in todo:
            if time.perf_counter() - start > args.max_seconds:
                print("time budget spent: run again to resume")
                break
            fmt, bits = FORMATS[label]
            m = copy.deepcopy(model)
            t = time.perf_counter()
            quantize(
                m,
                QuantConfig(format=fmt, bits=bits, group_size=64, method=method, rank=rank),
                stats=stats,
                progress=False,
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            row = {
                "format": label,
                "method": method,
                "rank": rank,
                "bits_per_weight": model_bits_per_weight(m),
                "ppl": perplexity(m, test, batch_size=8, progress=False)["ppl"],
                "quantize_s": seconds,
                "decomposition_s": m.loquant_timings["decomposition_s"],
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{label} {method} r{rank}: {row['bits_per_weight']:.3f} bpw, ppl {row['ppl']:.2f}, {seconds:.1f} s")
            del m


def pareto(rows):
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["ppl"])):
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    by = {(r["format"], r["method"], r["rank"]): r for r in rows}
    methods = [m for m in METHODS if m != "none"]
    print(
        f"smollm2-135m, sotu-test 40 x 512 token-level ppl, calibration 64 x 512 sotu-calib (seed 0); "
        f"device {rows[0]['device']}\n"
    )
    print("| format | rank | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for label in FORMATS:
        if (label, "none", 0) in by:
            r = by[(label, "none", 0)]
            print(
                f"| {label} | 0 (rtn) | {r['ppl']:.2f} at {r['bits_per_weight']:.3f} bits |" + " |" * (len(methods) - 1)
            )
        for rank in RANKS:
            cells = [by.get((label, m, rank)) for m in methods]
            if not any(cells):
                continue
            bits = next(c for c in cells if c)["bits_per_weight"]
            text = [f"{c['ppl']:.2f} ({c['decomposition_s']:.1f} s)" if c else "-" for c in cells]
            print(f"| {label} | {rank} ({bits:.3f} bits) | " + " | ".join(text) + " |")
    front = pareto(rows)
    print("\nPareto front (bits per weight -> ppl):")
    for r in front:
        print(f"- {r['bits_per_weight']:.3f} bits: {r['format']} {r['method']} r{r['rank']}: {r['ppl']:.2f}")
    if args.plot:
        plot(rows, front, args.plot)


def plot(rows, front, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    markers = dict(zip(METHODS, "o^svDP*", strict=True))
    for method in METHODS:
        pts = sorted((r["bits_per_weight"], r["ppl"]) for r in rows if r["method"] == method)
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=markers[method], label=method, s=22, alpha=0.8)
    ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("bits per weight (measured, correction included)")
    ax.set_ylabel("sotu-test perplexity (40 x 512, token level)")
    ax.set_yscale("log")
    ax.set_ylim(top=1000)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("SmolLM2-135M: INT2/3/4 g64 and NF4 g64, ranks 0-64")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "none"])
    ap.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    ap.add_argument("--max-seconds", type=float, default=float("inf"))
    ap.add_argument("--table", action="store_true", help="print the tables from the results instead")
    ap.add_argument("--plot", help="with --table: write the bits-vs-perplexity PNG here")
    args = ap.parse_args()
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
