"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023), a calibration-free base quantizer.

HQQ keeps round-to-nearest's min/max scale and fits each group's zero point by half-quadratic
splitting of the sparsity-promoting loss ‖W - Q⁻¹(Q(W))‖_p^p, p < 1. In HQQ's notation
(github.com/mobiusml/hqq, hqq/core/optimize.py, `optimize_weights_proximal_legacy`), with
scale s and zero z per group, each iteration runs

    W_q = clamp(round(W/s + z), 0, 2^b - 1)        W_r = (W_q - z)·s
    W_e = shrink_p(W - W_r, β)                      z = mean_group(W_q - (W - W_e)/s)
    β ← κ·β

with the generalized soft threshold shrink_p(x, β) = sign(x)·relu(|x| - |x|^(p-1)/β), and
stops as soon as the mean |W - W_r| over the whole matrix stops decreasing. loquant's `int`
format stores w = code·scale + offset, so offset = -z·s. Defaults are HQQ's: p = 0.7,
β = 10, κ = 1.01, 20 iterations.

Deviation from the legacy solver (as in HQQ's own `optimize_weights_proximal_v2`): the zero
point returned is the one with the lowest error seen, not the one after the step that made
it worse; the last iterate is checked too. Zero-range groups (scale 0) keep round-to-nearest's
offset. The codes are finally chosen against the parameters as stored (fp16, or int8 blocks
with double_quant), exactly as `quantize_weight` does, so iters=0 is round-to-nearest.
"""

from __future__ import annotations

import torch

from loquant.errors import LoquantError
from loquant.formats.bitpack import pack
from loquant.formats.codec import _grouped, _raw_params, _store_params, group_params
from loquant.formats.spec import WeightFormat


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """HQQ's generalized soft threshold, the proximal step of |x|^p (0 at x = 0)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - x.abs().pow(p - 1) / beta)


def _check(W: torch.Tensor, fmt: WeightFormat, iters: int, lp_norm: float, beta: float, kappa: float) -> None:
    if fmt.format != "int":
        why = {
            "int-sym": "its zero point is fixed at the code centre",
            "nf": "its absmax scale has no zero point",
        }.get(fmt.format, "it has no zero point")
        raise LoquantError(
            f"hqq optimizes the zero point of asymmetric integer groups, and format "
            f"{fmt.format!r} has none to optimize ({why}): use --format int"
        )
    if fmt.icq:
        raise LoquantError("hqq does not combine with icq: use --format int")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise LoquantError(f"hqq iters must be a non-negative integer, got {iters!r}")
    if not 0 < lp_norm <= 1:
        raise LoquantError(f"hqq lp_norm must be in (0, 1], got {lp_norm}")
    if not beta > 0:
        raise LoquantError(f"hqq beta must be positive, got {beta}")
    if not kappa >= 1:
        raise LoquantError(f"hqq kappa must be at least 1, got {kappa}")
    if W.dim() != 2:
        raise LoquantError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise LoquantError("weight contains NaN or Inf")


def hqq_quantize(
    W: torch.Tensor,
    fmt: WeightFormat,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> dict[str, torch.Tensor]:
    """Quantize W (out x in) to `fmt`'s stored tensors (fmt.layout) with HQQ's zero points.

    Only `--format int` (asymmetric) has a zero point to optimize: int-sym and nf raise.
    The scale stays (max - min)/(2^b - 1) per group, as in HQQ. The result is the same
    stored format as `quantize_weight(W, fmt)`'s; iters=0 gives exactly its tensors.
    """
    _check(W, fmt, iters, lp_norm, beta, kappa)
    w = W.detach().float()
    out_f, in_f = w.shape
    group = fmt.group_len(in_f)
    qmax = (1 << fmt.bits) - 1

    raw = _raw_params(w, fmt)  # round-to-nearest's scales and offsets (group minima), float32
    s = raw["scales"][:, :, None]
    live = s > 0  # zero-range groups keep their offset: nothing to fit
    s_safe = torch.where(live, s, torch.ones_like(s))
    wg = _grouped(w, group, 0.0)
    valid = _grouped(torch.ones_like(w[:1], dtype=torch.bool), group, False)  # (1, groups, G)
    count = valid.sum(dim=2, keepdim=True).float()
    n_real = float(out_f * in_f)

    offset = raw["offsets"][:, :, None]
    best_offset, best_err = offset, float("inf")
    for i in range(iters + 1):
        z = -offset / s_safe
        w_q = torch.round(wg / s_safe + z).clamp(0, qmax)
        w_r = (w_q - z) * s_safe
        diff = torch.where(valid, wg - w_r, torch.zeros_like(wg))
        err = float(diff.abs().sum()) / n_real  # HQQ's stopping error: mean |W - W_r|
        if not err < best_err:
            break
        best_offset, best_err = offset, err
        if i == iters:
            break
        w_e = _shrink_lp(diff, beta, lp_norm)  # 0 where padded
        terms = torch.where(valid, w_q - (wg - w_e) / s_safe, torch.zeros_like(wg))
        z = terms.sum(dim=2, keepdim=True) / count
        offset = torch.where(live, -z * s_safe, raw["offsets"][:, :, None])
        beta *= kappa

    tensors = _store_params({"scales": raw["scales"], "offsets": best_offset[:, :, 0]}, fmt)
    p = group_params(tensors, fmt)
    safe = torch.where(p["scales"] > 0, p["scales"], torch.ones_like(p["scales"]))[:, :, None]
    codes = torch.round((wg - p["offsets"][:, :, None]) / safe).clamp(0, qmax)
    tensors["qweight"] = pack(codes.reshape(out_f, -1)[:, :in_f].to(torch.uint8), fmt.bits)
    return tensors
