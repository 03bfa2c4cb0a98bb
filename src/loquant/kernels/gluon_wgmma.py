"""Hopper tensor-core kernel in Gluon for large M: y = x · deq(W)ᵀ (+ xa · Bᵀ + bias).

The weight is wgmma's A operand: gluon_mma's `_decode` turns each 128-code step of the packed
layout into a (weight rows x 128) tile, stored into one of two shared-memory buffers (not
passed in registers: the ptxas bundled with triton 3.6 can reuse an asynchronous wgmma's
input registers before it has read them). x is the B operand, brought in by TMA into a ring
of STAGES buffers. wgmma runs asynchronously: the decode of step i + 1 (CUDA cores) overlaps
the wgmma of step i (tensor cores), and `warpgroup_mma_wait(1)` retires step i - 1, freeing
its W buffer and its x buffer (for the TMA load STAGES - 1 steps ahead).

The decode produces K in gluon_mma's permuted order (its docstring), so x is gathered once per
call into that order, step by step (`x_order`): M·K values, against the weight's N·K codes.

WG warpgroups per CTA, 64·RN weight rows each, by BM x rows; the grid walks x tiles fastest,
so the CTAs running together share weight tiles (each weight word is read from DRAM about once).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from loquant.kernels import cdiv, gluon_mma, next_pow2, units
from loquant.kernels.gluon_mma import _book, _decode, _layouts, _load, _weight_index, decode_args, fits

BK = 128  # codes per step: gluon_mma's decode layout (a thread's 32 codes of a row per step)


@functools.cache
def x_order(bits: int, bk: int = BK, device: torch.device | None = None) -> torch.Tensor:
    """For each logical k of a step, the physical code (x column) the decode puts there
    (cached per device: no host copy inside a CUDA graph capture)."""
    cpu = units(bits)[0]
    c = bk // 4
    k = torch.arange(bk)
    t, h, q, e = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
    j = 4 * t + 2 * h  # the thread's pair slot (2t + h) as a code index in its run
    return (q * c + (j // cpu) * cpu + e * (cpu // 2) + (j % cpu) // 2).to(device)


@gluon.jit
def _wgmma_kernel(x_desc, q_ptr, s_ptr, z_ptr, book_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                  M, N, K, RW, NG, R, stride_xam, stride_ym, ONE, NEG,
                  G: gl.constexpr, BITS: gl.constexpr, FMT: gl.constexpr, HAS_Z: gl.constexpr,
                  HAS_CORR: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                  WG: gl.constexpr, RN: gl.constexpr, STAGES: gl.constexpr, RP: gl.constexpr, L4: gl.constexpr,
                  MMA: gl.constexpr, OUT: gl.constexpr, PAIRS: gl.constexpr, DEC: gl.constexpr, PACK: gl.constexpr,
                  MAGV: gl.constexpr):  # fmt: skip
    CPU: gl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per unit
    HALF: gl.constexpr = CPU // 2
    WPU: gl.constexpr = 3 if BITS == 3 else 1  # words per unit
    C: gl.constexpr = BK // 4  # codes per thread and row in one step
    NU: gl.constexpr = C // CPU
    T: gl.constexpr = BK // 16
    BN: gl.constexpr = 64 * WG * RN
    BKW: gl.constexpr = BK // CPU * WPU  # words per row and step
    m0 = gl.program_id(0) * BM
    n0 = gl.program_id(1) * BN
    steps = K // BK
    gl.assume(steps > 0)  # no zero-trip path around the loop: ptxas then keeps the wgmmas asynchronous

    # rows past N read the last row; their results are never stored
    wrow, ow, prow, rq_p, sh = _weight_index(q_ptr, n0, N, RW, NG, BN, NU, WPU, CPU, HALF, PAIRS, L4)
    LA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)

    xs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    # the decoded weight goes through shared memory (two buffers): a wgmma reading its A
    # from registers is not safe with the bundled ptxas, which can reuse those registers
    # before the asynchronous wgmma has read them (fixed in CUDA 13.3's ptxas)
    a_s = gl.allocate_shared_memory(x_desc.dtype, [2, BN, BK], gl.NVMMASharedLayout.get_default_for([BN, BK],
                                    x_desc.dtype))  # fmt: skip
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bar.index(b), count=1)
    for b in gl.static_range(STAGES - 1):
        mbarrier.expect(bar.index(b), x_desc.block_type.nbytes, pred=b < steps)
        tma.async_copy_global_to_shared(x_desc, [m0, b * BK], bar.index(b), xs.index(b), pred=b < steps)

    w0, w1, w2, sc, zz, _ = _load(wrow, ow, prow, rq_p, wrow, ow, 0, 0, 0, s_ptr, z_ptr, G, BITS, HAS_Z, False, BK,
                                  BKW, C)  # fmt: skip
    book = _book(book_ptr, PAIRS, FMT, y_ptr.dtype.element_ty)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    for i in range(steps):
        st = i % STAGES
        wa = a_s.index(i % 2)  # last read by the wgmma of step i - 2, retired a step ago
        wa.store(_decode(w0, w1, w2, sc, zz, sh, book, ONE, NEG, BITS, FMT, HAS_Z, BN, BK, NU, T, HALF, PAIRS,
                         DEC, PACK, L4, y_ptr, MAGV))  # fmt: skip
        w0, w1, w2, sc, zz, _ = _load(wrow, ow, prow, rq_p, wrow, ow, 0, 0, gl.minimum(i + 1, steps - 1), s_ptr,
                                      z_ptr, G, BITS, HAS_Z, False, BK, BKW, C)  # fmt: skip
        fence_async_shared()
        mbarrier.wait(bar.index(st), (i // STAGES) & 1)
        acc = warpgroup_mma(wa, xs.index(st).permute((1, 0)), acc, is_async=True)
        # the wgmma of step i - 1 is done: its A buffer and x buffer are free; the x buffer
        # takes step i + STAGES - 1
        acc = warpgroup_mma_wait(1, deps=[acc])
        j = i + STAGES - 1
        mbarrier.expect(bar.index(j % STAGES), x_desc.block_type.nbytes, pred=j < steps)
        tma.async_copy_global_to_shared(x_desc, [m0, j * BK], bar.index(j % STAGES), xs.index(j % STAGES),
                                        pred=j < steps)  # fmt: skip
    acc = warpgroup_mma_wait(0, deps=[acc])
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bar.index(b))

    if HAS_CORR:  # one more wgmma over the rank: B[rows] (BN x RP, registers) · xaᵀ (RP x BM, shared)
        LXA: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4 * WG, 1], [1, 0])
        xm = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(1, LXA)), 1)
        xr = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, LXA)), 0)
        xat = gl.load(xa_ptr + (m0 + xm) * stride_xam + xr, mask=(m0 + xm < M) & (xr < R), other=0.0)
        xa_s = gl.allocate_shared_memory(xat.dtype, [BM, RP], gl.NVMMASharedLayout.get_default_for([BM, RP], xat.dtype),
                                         xat)  # fmt: skip
        bn_ = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LA)), 1)
        br = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, LA)), 0)
        bt = gl.load(b_ptr + (n0 + bn_) * R + br, mask=(n0 + bn_ < N) & (br < R), other=0.0)
        fence_async_shared()
        acc = warpgroup_mma(bt, xa_s.permute((1, 0)), acc)
    if HAS_BIAS:
        rb = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        acc += gl.expand_dims(gl.load(bias_ptr + n0 + rb, mask=n0 + rb < N, other=0.0).to(gl.float32), 1)
    # y is (x rows x weight rows): through a layout with weight rows along the lanes, for wide stores
    out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), OUT)
    rn_y = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, OUT)), 1)
    rm_y = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, OUT)), 0)
    gl.store(y_ptr + (m0 + rm_y) * stride_ym + n0 + rn_y, out, mask=(m0 + rm_y < M) & (n0 + rn_y < N))


def pair_decode(bits: int, fmt: int) -> bool:
    """gluon_mma.pair_decode, but 3-bit codes go through fp32 here: with the funnel-shift pairs
    the H100 took 76.5 against 67.7 µs at M = 256, 159.9 against 140.2 at M = 768 (11008 x
    4096, BENCHMARKS.md)."""
    return gluon_mma.pair_decode(bits, fmt) and bits != 3


def wgmma_config(m: int, n: int, sms: int) -> dict:
    """x rows per CTA (BM), warpgroups per CTA (WG), 64-row weight slabs per warpgroup (RN),
    x buffers in the TMA ring (STAGES): the best of the H100 sweep at 11008 x 4096
    (BENCHMARKS.md). Every shape here runs one CTA per SM, so for BM = 256 the tile count
    decides: two warpgroups (128 weight rows, half the x traffic) unless one warpgroup's
    64-row tiles fill the last wave clearly better (M = 512 there: 87 % against 65 %)."""
    if m <= 64:
        return {"BM": 64, "WG": 2, "RN": 1, "STAGES": 4}
    if m <= 128:
        return {"BM": 128, "WG": 2, "RN": 1, "STAGES": 3}

    def filled(tiles: int) -> float:
        return tiles / (cdiv(tiles, sms) * sms)

    mt = cdiv(m, 256)
    wg = 2 if filled(mt * cdiv(n, 128)) >= filled(mt * cdiv(n, 64)) - 0.1 else 1
    return {"BM": 256, "WG": wg, "RN": 1, "STAGES": 2}


def fills(m: int, n: int, sms: int) -> bool:
    """Whether the kernel's tiles (no K split) keep the GPU busy. Up to M = 256 at least 0.6
    CTAs per SM: on the H100 at M = 64 it beat the mma kernel (which splits K) with 86 tiles
    (11008 rows: 36 against 62 µs) and lost with 64 or fewer (4096 rows: 28.5 against 23.1).
    Above, against dequantize + cuBLAS, at least 1.5 per SM: with 128 tiles of 4096 rows at M
    = 512 it lost (41.3 against 37.2 µs), with 344 of 11008 rows it won (106.2 against 108.3)."""
    cfg = wgmma_config(m, n, sms)
    tiles = cdiv(m, cfg["BM"]) * cdiv(n, 64 * cfg["WG"] * cfg["RN"])
    return tiles >= (0.6 if m <= 256 else 1.5) * sms


@functools.cache
def supported(device: torch.device) -> bool:
    """wgmma and TMA: Hopper (sm_90) only."""
    return torch.cuda.get_device_capability(device)[0] == 9


@functools.cache
def _wgmma_layouts(bits: int, bm: int, wg: int, rn: int, pairs: bool, dtype: torch.dtype):
    """(x tile's shared layout, code layout, wgmma accumulator layout, output layout); cached,
    since building layouts costs host time on every launch."""
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    xs = gl.NVMMASharedLayout.get_default_for([bm, BK], gdt)
    L4, _, _ = _layouts(bits, bm, BK, 4 * wg, rn, pairs)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * wg, 1], instr_shape=[16, bm, 16])
    return xs, L4, mma, gl.BlockedLayout([8, 1], [16, 2], [1, 4 * wg], [0, 1])


def wgmma(x2, qweight, scales, offsets, book, A, B, bias, bits: int, fmt: int, n: int, k: int, group: int,
          cfg: dict) -> torch.Tensor:  # fmt: skip
    """Launch: x2 (M x k) contiguous; A (r x k) and B (n x r) in x's dtype."""
    if not fits(bits, k, group, BK):
        raise ValueError(f"wgmma kernel: K {k} must be whole steps of {BK} codes and a thread's {BK // 4} codes "
                         f"whole units inside one group of {group}")  # fmt: skip
    m = x2.shape[0]
    bm, wg, rn, stages = cfg["BM"], cfg["WG"], cfg["RN"], cfg["STAGES"]
    bn = 64 * wg * rn
    # x in the decode's K order, one step of BK codes at a time
    xp = x2.view(m, k // BK, BK).index_select(2, x_order(bits, BK, x2.device)).view(m, k)
    dec = decode_args(bits, fmt, x2.dtype, pair_decode(bits, fmt))
    xs, L4, mma, out = _wgmma_layouts(bits, bm, wg, rn, dec["PAIRS"], x2.dtype)
    desc = TensorDescriptor.from_tensor(xp, [bm, BK], xs)
    y = x2.new_empty(m, n)
    xa = F.linear(x2, A) if A is not None else None
    r = B.shape[1] if B is not None else 0
    _wgmma_kernel[(cdiv(m, bm), cdiv(n, bn))](
        desc, qweight.view(torch.int32), scales, offsets if offsets is not None else scales,
        book if book is not None else scales, xa if xa is not None else x2, B if B is not None else x2,
        bias if bias is not None else x2, y, m, n, k, k * bits // 32, scales.shape[1], r,
        xa.stride(0) if xa is not None else 0, y.stride(0), G=group, BITS=bits, FMT=fmt, HAS_Z=offsets is not None,
        HAS_CORR=B is not None, HAS_BIAS=bias is not None, BM=bm, BK=BK, WG=wg, RN=rn, STAGES=stages,
        RP=max(16, next_pow2(max(r, 1))), L4=L4, MMA=mma, OUT=out, num_warps=4 * wg, **dec)  # fmt: skip
    return y
