"""Which allocation objective to use, chosen on sotu-val (the 1990s, 20 x 512 windows, token
level), a split neither calibration nor the sotu-test numbers read.

SmolLM2, all default candidates, no correction, calibration 64 x 512 sotu-calib seed 0:
  relative      tr(D R Dᵀ) / tr(W R Wᵀ) summed over matrices                 (budget 3.0)
  relative_x_n  the same times each matrix's weight count (`--alloc-error activation`)
  fisher        Σ F ⊙ D², F the diagonal Fisher (`--alloc-error fisher`)    (budgets 3.0, 3.25, 3.5)
next to uniform formats at the same bits.

    python bench/allocation_objective.py
"""

import copy

import numpy as np

from loquant import QuantConfig, quantize
from loquant.allocation import default_candidates, error_table, solve, storage_bits
from loquant.calibration import collect, fisher_diagonal
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.model import targets_of
from loquant.sources import load_model
from loquant.storage import model_bits_per_weight


def main() -> None:
    model, tok = load_model("smollm2-135m")
    val = eval_windows(tokenize(tok, load_text("sotu-val")), 512, 20)
    calib = calib_windows(tokenize(tok, load_text("sotu-calib")), 512, 64, seed=0)
    targets = targets_of(model, QuantConfig())
    weights = {n: w for n, _, w, _ in targets}
    modules = {n: m for n, m, _, _ in targets}
    stats = collect(model, calib, modules, progress=False)
    fisher = fisher_diagonal(model, calib, {n: m.weight for n, m in modules.items()}, progress=False)
    cands = default_candidates()
    activation = error_table(weights, cands, kind="activation", stats=stats, progress=False)
    fisher_table = error_table(weights, cands, kind="fisher", fisher=fisher, progress=False)
    nw = np.array([w.numel() for w in weights.values()], dtype=float)
    sizes = np.array([[storage_bits(c, tuple(w.shape), 0, False) for c in cands] for w in weights.values()])

    def measure(label, config):
        m = quantize(copy.deepcopy(model), config, progress=False)
        ppl = perplexity(m, val, progress=False)["ppl"]
        print(f"| {label} | {model_bits_per_weight(m):.4f} | {ppl:.2f} |", flush=True)

    print("| objective / format | bits/weight | sotu-val ppl |\n|---|---|---|")
    runs = [("relative", activation / nw[:, None], 3.0), ("relative_x_n", activation, 3.0)]
    runs += [("fisher", fisher_table, b) for b in (3.0, 3.25, 3.5)]
    for name, table, budget in runs:
        choice = solve(table, sizes, budget * nw.sum())
        overrides = {n: cands[c].to_dict() for n, c in zip(weights, choice, strict=True)}
        measure(f"{name}, budget {budget}", QuantConfig(overrides=overrides))
    for fmt, bits, group in [("int", 2, 32), ("nf", 3, 64), ("nf", 3, 32)]:
        measure(f"uniform {fmt.upper()}{bits} g{group}", QuantConfig(format=fmt, bits=bits, group_size=group))


if __name__ == "__main__":
    main()
