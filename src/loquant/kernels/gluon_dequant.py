"""deq(W) into a 16-bit matrix, in Gluon: the large-M path's first half (cuBLAS multiplies).

Each thread owns RPT weight rows x V units of each (32 codes a row: one 16-byte load at 4
bits) and decodes them in registers with the GEMV's `_values`; a thread's units lie in one
group, so it loads one scale (and offset) per row. The decoded tile then goes through shared
memory once, into a layout where each warp instruction writes whole rows in 16-byte runs.
On the H100 it runs at the copy bandwidth for every format (BENCHMARKS.md); the plain-Triton
kernel it replaces did for int at 2 and 4 bits but took 1.6x as long for NF4 and 2x for INT3.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from loquant.kernels import cdiv, units
from loquant.kernels.gluon_gemv import _ONE, _expand, _pq, _values, units_in_group


@gluon.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, book_ptr, w_ptr, N, KU, RW, NG, LDW, ONE,
                    G: gl.constexpr, BITS: gl.constexpr, FMT: gl.constexpr, HAS_Z: gl.constexpr,
                    RPT: gl.constexpr, V: gl.constexpr, TJ: gl.constexpr, WR: gl.constexpr):  # fmt: skip
    CPU: gl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per unit
    WPU: gl.constexpr = 3 if BITS == 3 else 1  # words per unit
    TR: gl.constexpr = 32 // TJ
    BN: gl.constexpr = RPT * TR * WR
    L4: gl.constexpr = gl.BlockedLayout([RPT, 1, V, CPU], [TR, TJ, 1, 1], [WR, 1, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(3, L4)  # (BN, TJ, V) words
    LP: gl.constexpr = gl.SliceLayout(2, LW)  # (BN, TJ) group parameters
    n0 = gl.program_id(0) * BN
    u0 = gl.program_id(1) * (TJ * V)

    rn = _expand(gl.arange(0, BN, layout=gl.SliceLayout(1, LP)), 1, 2)
    rj = _expand(gl.arange(0, TJ, layout=gl.SliceLayout(0, LP)), 0, 2)
    rv = _expand(gl.arange(0, V, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW))), 0, 1)
    u = u0 + rj * V + rv
    mask = (n0 + rn < N) & (u < KU)
    wp = q_ptr + (n0 + rn) * RW + u * WPU
    w0 = gl.load(wp, mask=mask, other=0)
    w1 = w0
    w2 = w0
    if BITS == 3:
        w1 = gl.load(wp + 1, mask=mask, other=0)
        w2 = gl.load(wp + 2, mask=mask, other=0)

    rn_p = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LP)), 1)
    up = u0 + gl.expand_dims(gl.arange(0, TJ, layout=gl.SliceLayout(0, LP)), 0) * V
    mask_p = (n0 + rn_p < N) & (up < KU)
    pp = (n0 + rn_p) * NG + (up * CPU) // G
    sc = gl.load(s_ptr + pp, mask=mask_p, other=0.0)
    zz = sc
    if HAS_Z:
        zz = gl.load(z_ptr + pp, mask=mask_p, other=0.0)
    P, Q = _pq(sc, zz, BITS, FMT, HAS_Z)

    LS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4)))
    sh = _expand(gl.expand_dims(gl.arange(0, CPU, layout=LS), 0), 1, 2)
    w = _values(w0, w1, w2, sh, book_ptr, ONE, BITS, FMT) * _expand(P, 2, 3) + _expand(Q, 2, 3)
    # stored through shared memory in a layout where each warp instruction writes whole rows
    # of 16-byte runs: the thread-contiguous layout's stores left every 32-byte sector to
    # several instructions and ran at under half the copy bandwidth on the H100
    KC: gl.constexpr = TJ * V * CPU
    TK: gl.constexpr = min(32, KC // 8)  # lanes along K, 8 values (16 bytes) each
    LO: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TK, TK], [WR, 1], [1, 0])
    w = gl.convert_layout(gl.reshape(w.to(w_ptr.dtype.element_ty), [BN, KC]), LO)
    ro = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LO)), 1)
    co = gl.expand_dims(gl.arange(0, KC, layout=gl.SliceLayout(0, LO)), 0)
    mask_o = (n0 + ro < N) & (u0 * CPU + co < KU * CPU)
    gl.store(w_ptr + (n0 + ro).to(gl.int64) * LDW + u0 * CPU + co, w, mask=mask_o)


def dequant_config(bits: int, k: int, group: int) -> dict:
    """Rows per thread, units per thread (32 codes; fewer where a group would split them),
    threads along K per warp, warps along rows."""
    cpu = units(bits)[0]
    return {"RPT": 2, "V": units_in_group(max(1, 32 // cpu), cpu, k, group), "TJ": 8, "WR": 4}


def dequantize(qweight, scales, offsets, book, bits: int, fmt: int, n: int, k: int, group: int,
               out: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:  # fmt: skip
    """Write deq(W) (n x k) into `out` (n x k, unit stride along k, any row stride; its dtype)."""
    if out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"dequantize: out must be {n} x {k} with unit stride along k, got {tuple(out.shape)} "
                         f"with strides {out.stride()}")  # fmt: skip
    cfg = cfg or dequant_config(bits, k, group)
    cpu = units(bits)[0]
    ku = k // cpu
    bn = cfg["RPT"] * (32 // cfg["TJ"]) * cfg["WR"]
    _dequant_kernel[(cdiv(n, bn), cdiv(ku, cfg["TJ"] * cfg["V"]))](
        qweight.view(torch.int32), scales, offsets if offsets is not None else scales,
        book if book is not None else scales, out, n, ku, k * bits // 32, scales.shape[1], out.stride(0), _ONE,
        G=group, BITS=bits, FMT=fmt, HAS_Z=offsets is not None, num_warps=cfg["WR"], **cfg)  # fmt: skip
    return out
