"""How to sum per-matrix output errors in the allocation objective, chosen on sotu-val.

Builds the raw activation error table tr(D R Dᵀ) once (SmolLM2, all default candidates, no
correction, calibration 64 x 512 sotu-calib seed 0), then solves budget 3.0 with two
normalizations and measures perplexity on sotu-val (the 1990s speeches, 20 x 512 windows,
token level), a split neither calibration nor the sotu-test numbers read:
  relative      tr(D R Dᵀ) / tr(W R Wᵀ)
  relative_x_n  the same times the matrix's weight count (loquant's `activation`)
next to uniform INT2 g32 at the same 3.0 bits.

    python bench/allocation_objective.py
"""

import copy
import time

import numpy as np

from loquant import QuantConfig, quantize
from loquant.allocation import default_candidates, error_table, solve, storage_bits
from loquant.calibration import collect
from loquant.cli import model_bits_per_weight
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.model import _targets
from loquant.sources import load_model


def main() -> None:
    model, tok = load_model("smollm2-135m")
    val = eval_windows(tokenize(tok, load_text("sotu-val")), 512, 20)
    calib = calib_windows(tokenize(tok, load_text("sotu-calib")), 512, 64, seed=0)
    targets = _targets(model, QuantConfig())
    weights = {n: w for n, _, w, _ in targets}
    stats = collect(model, calib, {n: m for n, m, _, _ in targets}, progress=False)
    cands = default_candidates()
    t = time.perf_counter()
    relative_x_n = error_table(weights, cands, kind="activation", stats=stats, progress=False)
    print(f"table {time.perf_counter() - t:.0f} s")
    nw = np.array([w.numel() for w in weights.values()], dtype=float)
    sizes = np.array([[storage_bits(c, tuple(w.shape), 0, False) for c in cands] for w in weights.values()])
    for name, table in {"relative": relative_x_n / nw[:, None], "relative_x_n": relative_x_n}.items():
        choice = solve(table, sizes, 3.0 * nw.sum())
        overrides = {n: cands[c].to_dict() for n, c in zip(weights, choice, strict=True)}
        m = quantize(copy.deepcopy(model), QuantConfig(overrides=overrides), progress=False)
        ppl = perplexity(m, val, progress=False)["ppl"]
        print(f"budget 3.0 {name}: {model_bits_per_weight(m):.4f} bits, sotu-val ppl {ppl:.2f}")
    m = quantize(copy.deepcopy(model), QuantConfig(bits=2, group_size=32), progress=False)
    ppl = perplexity(m, val, progress=False)["ppl"]
    print(f"uniform INT2 g32: {model_bits_per_weight(m):.4f} bits, sotu-val ppl {ppl:.2f}")


if __name__ == "__main__":
    main()
