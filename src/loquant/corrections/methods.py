"""Every published way to compute the correction C = B·A of W - Q(W) (see METHODS.md).

All work in float64 on the weight's device. Notation: W (out x in), Q the dequantized
quantizer output, E = W - Q, R = E[x xᵀ] of the layer inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loquant.calibration import InputStats
from loquant.corrections.lowrank import balance, check_fp16, svd_r
from loquant.errors import LoquantError
from loquant.formats import WeightFormat, dequantize_weight, quantize_weight

METHODS = ("none", "svd", "loftq", "lqlora", "lqer", "qera-approx", "qera-exact")
NEEDS_STATS = ("lqer", "qera-approx", "qera-exact")
# loftq runs exactly T; lqlora and the activation-aware methods alternate up to T and keep the
# best iterate (by weight error, resp. output error tr(D R Dᵀ)); 1 = quantize once, correct once.
DEFAULT_ITERS = {"loftq": 5, "lqlora": 20, "lqer": 1, "qera-approx": 1, "qera-exact": 1}


@dataclass
class Corrected:
    tensors: dict[str, torch.Tensor]  # the quantized base, as WeightFormat.layout
    B: torch.Tensor | None  # out x r
    A: torch.Tensor | None  # r x in
    iterations: int = 1


Quantizer = Callable[[torch.Tensor, WeightFormat], dict[str, torch.Tensor]]


def _qdq(W: torch.Tensor, fmt: WeightFormat, quantizer: Quantizer) -> tuple[dict, torch.Tensor]:
    tensors = quantizer(W, fmt)
    return tensors, dequantize_weight(tensors, fmt, tuple(W.shape), torch.float64)


def _scaled(E: torch.Tensor, s: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C = SVD_r(E diag(s)) diag(s)⁻¹ (LQER, QERA-approx)."""
    s = s.clamp_min(s.max() * 1e-8) if s.max() > 0 else torch.ones_like(s)
    B, A = svd_r(E * s, rank)
    return B, A / s


def _qera_exact(E: torch.Tensor, stats: InputStats, rank: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C = SVD_r(E R^½) R^-½, through the eigendecomposition R = V Λ Vᵀ.

    With M = E V Λ^½ = E R^½ V, SVD_r(M) = SVD_r(E R^½) V, so C = SVD_r(M) Λ^-½ Vᵀ: one
    symmetric eigendecomposition and one SVD, no matrix square root. Eigenvalues are clamped
    at `damping` x the largest.
    """
    dim = E.shape[1]
    if damping <= 0 and stats.count < dim:
        raise LoquantError(
            f"{stats.count} calibration tokens for a {dim}-wide input: R is singular; "
            "use more calibration data or a positive --damping"
        )
    lam, V = stats.eigh(E.device)
    floor = lam.max() * damping if damping > 0 else lam.max() * torch.finfo(torch.float64).eps
    if lam.max() <= 0:
        raise LoquantError("the layer's calibration inputs are all zero")
    root = lam.clamp_min(floor).sqrt()
    B, A = svd_r((E @ V) * root, rank)
    return B, (A / root) @ V.T


def _fisher_weights(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LQ-LoRA's row and column weights from the diagonal Fisher (out x in)."""
    f = fisher.double()
    rows, cols = f.mean(1).sqrt(), f.mean(0).sqrt()
    return rows.clamp_min(rows.max() * 1e-6 + 1e-300), cols.clamp_min(cols.max() * 1e-6 + 1e-300)


def correct(
    W: torch.Tensor,
    fmt: WeightFormat,
    method: str,
    rank: int,
    *,
    stats: InputStats | None = None,
    fisher: torch.Tensor | None = None,
    iters: int | None = None,
    damping: float = 1e-8,
    quantizer: Quantizer = quantize_weight,
) -> Corrected:
    """Quantize W and compute its rank-r correction by `method`."""
    if method not in METHODS:
        raise LoquantError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if rank < 0 or rank > min(W.shape):
        raise LoquantError(f"rank {rank} must be between 0 and min(out, in) = {min(W.shape)}")
    if method in NEEDS_STATS and rank > 0 and stats is None:
        raise LoquantError(f"method {method} needs calibration statistics")
    W = W.detach().double()
    if method == "none" or rank == 0:
        return Corrected(quantizer(W, fmt), None, None)
    iters = iters or DEFAULT_ITERS.get(method, 1)
    if iters < 1:
        raise LoquantError(f"--iters must be at least 1, got {iters}")
    if method in ("loftq", "lqlora"):
        result = _alternate(W, fmt, method, rank, fisher, iters, quantizer)
    elif method in NEEDS_STATS:
        result = _alternate_activation(W, fmt, method, rank, stats, iters, damping, quantizer)
    else:
        tensors, Q = _qdq(W, fmt, quantizer)
        B, A = svd_r(W - Q, rank)
        result = Corrected(tensors, B, A)
    result.B, result.A = balance(result.B, result.A)
    check_fp16(result.B, result.A)
    return result


def _activation_aware(E, method, stats, rank, damping) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "lqer":
        return _scaled(E, stats.mean_abs.to(E.device), rank)
    if method == "qera-approx":
        return _scaled(E, stats.mean_sq.to(E.device).sqrt(), rank)
    return _qera_exact(E, stats, rank, damping)


def _alternate_activation(W, fmt, method, rank, stats, iters, damping, quantizer) -> Corrected:
    """Q_t = Q(W - C_{t-1}), C_t = method(W - Q_t), keeping the iterate of least output error
    tr(D R Dᵀ), D = W - Q_t - C_t; stops when it rises. iters = 1 is the published method."""
    R = stats.R.to(W.device) if iters > 1 else None
    C = torch.zeros_like(W)
    best = None
    for t in range(1, iters + 1):
        tensors, Q = _qdq(W - C, fmt, quantizer)
        B, A = _activation_aware(W - Q, method, stats, rank, damping)
        if iters == 1:
            return Corrected(tensors, B, A)
        C = B @ A
        D = W - Q - C
        err = ((D @ R) * D).sum().item()
        if best is not None and err >= best[0]:
            break
        best = (err, Corrected(tensors, B, A, iterations=t))
    return best[1]


def _alternate(W, fmt, method, rank, fisher, iters, quantizer) -> Corrected:
    """LoftQ (fixed T) and LQ-LoRA (until the error rises; the best iterate is kept):
    Q_t = Q(W - C_{t-1}), C_t = SVD_r(W - Q_t), optionally Fisher-weighted."""
    rows, cols = _fisher_weights(fisher.to(W.device)) if fisher is not None else (None, None)
    C = torch.zeros_like(W)
    best = None
    for t in range(1, iters + 1):
        tensors, Q = _qdq(W - C, fmt, quantizer)
        E = W - Q
        if rows is None:
            B, A = svd_r(E, rank)
        else:
            B, A = svd_r(rows[:, None] * E * cols, rank)
            B, A = B / rows[:, None], A / cols
        C = B @ A
        residual = W - Q - C
        err = (residual if rows is None else rows[:, None] * residual * cols).norm().item()
        if method == "lqlora" and best is not None and err >= best[0]:
            break
        best = (err, Corrected(tensors, B, A, iterations=t))
    return best[1]
