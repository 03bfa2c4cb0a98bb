"""Quantize a weight matrix to a WeightFormat's packed tensors, and back. Pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loquant.errors import LoquantError
from loquant.formats.bitpack import pack, unpack
from loquant.formats.double_quant import dq_dequantize, dq_quantize
from loquant.formats.icq import search_shift
from loquant.formats.normalfloat import nf_codebook, nf_quantize
from loquant.formats.spec import WeightFormat

FP16_MAX = torch.finfo(torch.float16).max


def _grouped(w: torch.Tensor, group: int, fill: float) -> torch.Tensor:
    """(out, in) -> (out, groups, group), the short last group padded with `fill`."""
    pad = -w.shape[1] % group
    if pad:
        w = F.pad(w, (0, pad), value=fill)
    return w.view(w.shape[0], -1, group)


def _raw_params(w: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """Per-group parameters in float32, before storage rounding."""
    group = fmt.group_len(w.shape[1])
    if fmt.format == "int":
        lo = _grouped(w, group, float("inf")).amin(dim=2)
        hi = _grouped(w, group, float("-inf")).amax(dim=2)
        return {"scales": (hi - lo) / ((1 << fmt.bits) - 1), "offsets": lo}
    absmax = _grouped(w.abs(), group, 0.0).amax(dim=2)
    if fmt.format == "int-sym":
        return {"scales": absmax / ((1 << (fmt.bits - 1)) - 1)}
    return {"scales": absmax}


def _store_params(raw: dict[str, torch.Tensor], fmt: WeightFormat) -> dict[str, torch.Tensor]:
    stored = {}
    for name, value in raw.items():
        if fmt.double_quantized(name):
            for part, t in dq_quantize(value).items():
                stored[f"{name}_{part}"] = t
        else:
            if value.abs().max() > FP16_MAX:
                raise LoquantError(f"{name} exceed the float16 range: use double_quant")
            stored[name] = value.to(torch.float16)
    return stored


def group_params(tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """The per-group parameters as stored (after fp16 or double-quant rounding), float32."""
    return {
        n: dq_dequantize(tensors[f"{n}_q"], tensors[f"{n}_absmax"], tensors[f"{n}_mean"])
        if fmt.double_quantized(n)
        else tensors[n].float()
        for n in fmt.param_names
    }


def _icq_params(w: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """ICQ: the entropy-maximizing shift per group, stored (int8 blocks) first; the scale is
    then absmax(w - τ) for τ as stored, over the group's real weights only."""
    group = fmt.group_len(w.shape[1])
    valid = _grouped(torch.ones_like(w[:1], dtype=torch.bool), group, False)
    shifts = _store_params({"shifts": search_shift(_grouped(w, group, 0.0), fmt.bits, valid)}, fmt)
    tau = dq_dequantize(shifts["shifts_q"], shifts["shifts_absmax"], shifts["shifts_mean"])
    lo = _grouped(w, group, float("inf")).amin(dim=2)
    hi = _grouped(w, group, float("-inf")).amax(dim=2)
    return {**shifts, **_store_params({"scales": torch.maximum(hi - tau, tau - lo)}, fmt)}


def quantize_weight(w: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """Quantize a 2-D weight (out x in) to its stored tensors (see WeightFormat.layout).

    Codes are chosen against the parameters as stored, so dequantization reproduces exactly
    what the codes were fitted to. A zero-range group (all weights equal, e.g. all zero) gets
    scale 0 and dequantizes to its offset (int) or to 0 (with icq: to its shift, and a scale
    of at most the shift's int8 rounding error brings it back to the group's value).
    """
    if w.dim() != 2:
        raise LoquantError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise LoquantError("weight contains NaN or Inf")
    w = w.detach().float()
    out_f, in_f = w.shape
    group = fmt.group_len(in_f)
    tensors = _icq_params(w, fmt) if fmt.icq else _store_params(_raw_params(w, fmt), fmt)
    p = group_params(tensors, fmt)
    safe = torch.where(p["scales"] > 0, p["scales"], torch.ones_like(p["scales"]))[:, :, None]
    wg = _grouped(w, group, 0.0)
    if fmt.format == "int":
        codes = torch.round((wg - p["offsets"][:, :, None]) / safe).clamp(0, (1 << fmt.bits) - 1)
    elif fmt.format == "int-sym":
        half = 1 << (fmt.bits - 1)
        codes = torch.round(wg / safe).clamp(-half, half - 1) + half
    else:
        shifted = wg - p["shifts"][:, :, None] if fmt.icq else wg
        codes = nf_quantize((shifted / safe).clamp(-1, 1), fmt.bits)
    codes = codes.reshape(out_f, -1)[:, :in_f].to(torch.uint8)
    tensors["qweight"] = pack(codes, fmt.bits)
    return tensors


def unpack_codes(tensors: dict[str, torch.Tensor], fmt: WeightFormat, shape: tuple[int, int]):
    return unpack(tensors["qweight"], fmt.bits, shape[0] * shape[1]).view(shape)


def dequantize_weight(
    tensors: dict[str, torch.Tensor],
    fmt: WeightFormat,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the (out x in) weight the stored tensors represent, computed in float32."""
    out_f, in_f = shape
    group = fmt.group_len(in_f)
    codes = _grouped(unpack_codes(tensors, fmt, shape), group, 0)
    p = group_params(tensors, fmt)
    scales = p["scales"][:, :, None]
    if fmt.format == "int":
        w = codes.float() * scales + p["offsets"][:, :, None]
    elif fmt.format == "int-sym":
        w = (codes.float() - (1 << (fmt.bits - 1))) * scales
    else:
        w = nf_codebook(fmt.bits).to(codes.device)[codes.long()] * scales
        if fmt.icq:
            w = w + p["shifts"][:, :, None]
    return w.reshape(out_f, -1)[:, :in_f].to(dtype)


def fake_quantize(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Q(W): quantize then dequantize, in w's dtype."""
    return dequantize_weight(quantize_weight(w, fmt), fmt, tuple(w.shape), w.dtype)
