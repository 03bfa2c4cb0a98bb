"""GPTQ (Frantar et al. 2022) as a base quantizer: the same stored tensors as round-to-nearest.

Columns (input features) are quantized one at a time, left to right; each column's rounding
error is pushed onto the columns not yet quantized through the inverse Hessian H = 2 E[x xᵀ],
so the layer's output error tr(E R Eᵀ) is what is minimized, not ‖E‖². The output is
`quantize_weight`'s layout (WeightFormat.layout) and `dequantize_weight` reads it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loquant.errors import LoquantError
from loquant.formats.bitpack import pack
from loquant.formats.codec import _raw_params, _store_params
from loquant.formats.normalfloat import nf_codebook, nf_quantize
from loquant.formats.spec import WeightFormat


def _check(W: torch.Tensor, fmt: WeightFormat, R: torch.Tensor, block_size: int, damp: float) -> None:
    if W.dim() != 2:
        raise LoquantError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if fmt.double_quant:
        raise LoquantError("gptq stores fp16 parameters: drop --double-quant")
    if fmt.icq:
        raise LoquantError("gptq does not support icq: drop --icq")
    if tuple(R.shape) != (W.shape[1], W.shape[1]):
        raise LoquantError(f"input second moment has shape {tuple(R.shape)}, expected {(W.shape[1],) * 2}")
    if not torch.isfinite(W).all():
        raise LoquantError("weight contains NaN or Inf")
    if not torch.isfinite(R).all():
        raise LoquantError("input second moment contains NaN or Inf")
    if block_size < 1:
        raise LoquantError(f"gptq block size must be positive, got {block_size}")
    if not damp >= 0:
        raise LoquantError(f"gptq damping must be >= 0, got {damp}")


def _inverse_hessian(R: torch.Tensor, damp: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H⁻¹ in float32, dead-input mask); H = 2R, damped.

    Factorized in float64 on CPU (cheap at these sizes), in float32 elsewhere."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    H = 2 * R.to(device=device, dtype=dtype)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1
    diag += damp * diag.mean()
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise LoquantError(f"gptq: the damped Hessian is not positive definite: raise damp (now {damp})")
    return L.float(), dead


def _fake_column(w: torch.Tensor, p: dict[str, torch.Tensor], fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, dequantized float32) of columns w (out,) or (out, k) against stored params
    `p` (float32, broadcastable to w): the same arithmetic as quantize_weight/dequantize_weight."""
    scales = p["scales"]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    if fmt.format == "int":
        codes = torch.round((w - p["offsets"]) / safe).clamp(0, (1 << fmt.bits) - 1)
        return codes.to(torch.uint8), codes * scales + p["offsets"]
    if fmt.format == "int-sym":
        half = 1 << (fmt.bits - 1)
        codes = torch.round(w / safe).clamp(-half, half - 1) + half
        return codes.to(torch.uint8), (codes - half) * scales
    codes = nf_quantize((w / safe).clamp(-1, 1), fmt.bits)
    return codes, nf_codebook(fmt.bits).to(w.device)[codes.long()] * scales


def _params(w: torch.Tensor, fmt: WeightFormat) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(stored fp16 tensors, the same as float32) of the groups of w (out x k), codec's rule."""
    stored = _store_params(_raw_params(w, fmt), fmt)
    return stored, {n: t.float() for n, t in stored.items()}


def gptq_quantize(
    W: torch.Tensor,
    fmt: WeightFormat,
    R: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize W (out x in) to fmt's stored tensors by GPTQ, against R = E[x xᵀ] (in x in).

    H = 2R; inputs that never fire (H_ii = 0) get H_ii = 1 and zero weights; H is damped by
    `damp` · mean(diag H). Columns go in blocks of `block_size` with lazy updates (the block
    size changes only float rounding). Group parameters use codec's rule (int: min/max,
    int-sym: absmax/(2^(b-1)-1), nf: absmax), rounded to fp16 before codes are chosen:
      - act_order=False: each group's parameters come from its columns' current (error-updated)
        weights when the loop reaches its first column;
      - act_order=True: columns go in order of decreasing H_ii, and every group's parameters
        are computed up front from the original W in the original column order (GPTQ's
        "static groups"), so groups stay contiguous in the stored format.
    With R ∝ I nothing is fed back and the result equals quantize_weight(W, fmt).
    double_quant and icq are not supported. Computed in float32 on W's device.
    """
    _check(W, fmt, R, block_size, damp)
    W = W.detach().float().clone()
    out_f, in_f = W.shape
    G = fmt.group_len(in_f)
    dead = R.diagonal().to(W.device) == 0
    W[:, dead] = 0

    stored: dict[str, torch.Tensor] = {}
    perm = None
    if act_order:
        stored, static = _params(W, fmt)  # (out, groups) each
        perm = torch.argsort(R.diagonal().to(W.device), descending=True, stable=True)  # dead inputs last
        W = W[:, perm]
        U, _ = _inverse_hessian(R[perm][:, perm], damp, W.device)
        col_group = (perm // G).tolist()
    else:
        U, _ = _inverse_hessian(R, damp, W.device)
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in fmt.param_names}

    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    p: dict[str, torch.Tensor] = {}
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                p = {n: t[:, col_group[c]] for n, t in static.items()}
            elif c % G == 0:  # a new group: its current weights (pending block updates applied)
                g1 = min(c + G, in_f)
                cur = W1[:, i : g1 - i1]
                if g1 > i2:
                    rest = W[:, i2:g1] - Err1[:, :i] @ U[i1:c, i2:g1]
                    cur = torch.cat([cur, rest], dim=1)
                group_stored, p = _params(cur, fmt)
                p = {n: t[:, 0] for n, t in p.items()}
                for n, t in group_stored.items():
                    parts[n].append(t)
            w = W1[:, i]
            codes[:, c], q = _fake_column(w, p, fmt)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    else:
        stored = {n: torch.cat(ts, dim=1) for n, ts in parts.items()}
    return {**stored, "qweight": pack(codes, fmt.bits)}


def gptq_quantizer(R: torch.Tensor, **options) -> Callable[[torch.Tensor, WeightFormat], dict[str, torch.Tensor]]:
    """A `Quantizer` (W, fmt) -> tensors running gptq_quantize against R with `options`."""
    return lambda W, fmt: gptq_quantize(W, fmt, R, **options)
