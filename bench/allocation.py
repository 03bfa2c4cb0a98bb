"""Mixed precision under a budget: solver speed at Llama-2-70B size, and perplexity of budgeted
plans against uniform formats at the same measured bits, on the built-in SmolLM2.

    python bench/allocation.py [--budgets 2.5 3.0 3.25 3.5] [--skip-model]

Part 1 times `scipy.optimize.milp` (HiGHS) on a synthetic cost table of 560 matrices x 40
candidates (Llama-2-70B has 80 blocks x 7 matrices). Part 2 gathers calibration statistics
once (64 x 512 sotu-calib, seed 0), computes the activation error table once (all default
candidates, no correction), solves each budget, quantizes with the plan and measures sotu-test
perplexity (40 x 512, token level), next to uniform formats.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from loquant import QuantConfig, quantize
from loquant.allocation import default_candidates, error_table, solve, storage_bits
from loquant.calibration import collect, fisher_diagonal
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.model import targets_of
from loquant.sources import load_model
from loquant.storage import model_bits_per_weight

UNIFORM = [("int", 2, 64), ("nf", 2, 32), ("int", 2, 32), ("int", 3, 128), ("nf", 3, 64), ("int", 3, 64), ("nf", 3, 32)]


def synthetic_solve(M=560, C=40, seed=0) -> float:
    rng = np.random.default_rng(seed)
    bits = rng.choice([2.125, 2.25, 2.5, 3.125, 3.25, 3.5, 4.125, 4.25, 4.5, 8.25], size=C)
    sizes = np.outer(rng.integers(1, 240, M) * 1e6 / 4, bits)  # 8192 x 28672 down to small matrices
    errors = np.outer(rng.lognormal(0, 1, M), 4.0 ** (-bits)) * rng.uniform(0.8, 1.2, (M, C))
    budget = sizes.min(axis=1).sum() * 1.25
    start = time.perf_counter()
    choice = solve(errors, sizes, budget)
    seconds = time.perf_counter() - start
    assert sizes[np.arange(M), choice].sum() <= budget * (1 + 1e-9)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.25, 3.5])
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--alloc-error", default="activation", choices=["activation", "fisher", "frobenius"])
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform baselines")
    ap.add_argument("--plans-dir", help="write each budget's plan here (for loquant quantize --plan)")
    args = ap.parse_args()
    print(f"{platform.node()}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n")
    times = [synthetic_solve(seed=s) for s in range(3)]
    print(f"HiGHS on 560 matrices x 40 candidates (22,400 binaries): {', '.join(f'{t:.2f}' for t in times)} s\n")
    if args.skip_model:
        return
    model, tokenizer = load_model("smollm2-135m")
    test = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    calib = calib_windows(tokenize(tokenizer, load_text("sotu-calib")), 512, 64, seed=0)
    config = QuantConfig()
    targets = targets_of(model, config)
    modules = {n: m for n, m, _, _ in targets}
    weights = {n: w for n, _, w, _ in targets}
    t = time.perf_counter()
    stats = collect(model, calib, modules, progress=False) if args.alloc_error == "activation" else None
    fisher = None
    if args.alloc_error == "fisher":
        fisher = fisher_diagonal(model, calib, {n: m.weight for n, m in modules.items()}, progress=False)
    candidates = default_candidates()
    errors = error_table(weights, candidates, kind=args.alloc_error, stats=stats, fisher=fisher, progress=False)
    table_s = time.perf_counter() - t
    sizes = np.array([[storage_bits(c, tuple(w.shape), 0, False) for c in candidates] for w in weights.values()])
    total = sum(w.numel() for w in weights.values())
    print(
        f"error table: {len(weights)} matrices x {len(candidates)} candidates, {args.alloc_error} error, "
        f"{table_s:.0f} s including calibration\n"
    )
    print("| configuration | bits/weight (measured) | sotu-test ppl |")
    print("|---|---|---|")
    rows = []
    for budget in args.budgets:
        t = time.perf_counter()
        choice = solve(errors, sizes, budget * total)
        solve_s = time.perf_counter() - t
        overrides = {n: candidates[c].to_dict() for n, c in zip(weights, choice, strict=True)}
        if args.plans_dir:
            Path(args.plans_dir).mkdir(parents=True, exist_ok=True)
            record = {"budget": budget, "alloc_error": args.alloc_error, "layers": overrides}
            (Path(args.plans_dir) / f"plan-{budget}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        m = quantize(copy.deepcopy(model), QuantConfig(overrides=overrides), progress=False)
        rows.append(
            (
                f"budget {budget} (plan, HiGHS {solve_s:.2f} s)",
                model_bits_per_weight(m),
                perplexity(m, test, progress=False)["ppl"],
            )
        )
        print(f"| {rows[-1][0]} | {rows[-1][1]:.4f} | {rows[-1][2]:.2f} |", flush=True)
    for fmt, bits, group in [] if args.no_uniform else UNIFORM:
        m = quantize(copy.deepcopy(model), QuantConfig(format=fmt, bits=bits, group_size=group), progress=False)
        label = f"uniform {fmt.upper()}{bits} g{group}"
        print(
            f"| {label} | {model_bits_per_weight(m):.4f} | {perplexity(m, test, progress=False)['ppl']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
