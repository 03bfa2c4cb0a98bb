"""Triton kernels: y = x · deq(W)ᵀ (+ (x·Aᵀ)·Bᵀ + bias) straight from loquant's packed layout.

No repacking: the flat uint8 `qweight` is read as int32 words. A row of K codes takes K·b/32
words when K·b is a multiple of 32 (rows then start on word boundaries). A *unit* is the
smallest word-aligned run of codes: 8 codes in one word (4 bits), 16 codes in one word
(2 bits), 32 codes in three words (3 bits; two codes straddle words). Code s of a unit sits
at bit b·s of the unit's little-endian integer (formats/bitpack.py).

Every format is written as w = f(c) · P + Q with per-(row, group) P, Q:
  int      f = 1 + c/2^b (the code or-ed into a float's mantissa: no int->float convert),
           P = 2^b · scale, Q = offset - 2^b · scale
  int-sym  same f, P = 2^b · scale, Q = -(2^b + 2^(b-1)) · scale
  nf       f = book[c] (a 2^b-entry table, L1-resident), P = scale, Q = icq shift or 0.
Kernels walk K in units. A unit never straddles a group (group % codes-per-unit == 0).

The other kernels are in Gluon (explicit layouts): gluon_gemv.py (small M, CUDA cores),
gluon_mma.py and gluon_wgmma.py (tensor cores), gluon_dequant.py (deq(W) for cuBLAS).
_gemm_kernel (tensor cores): the (rows x units x codes) tile is decoded in column order,
  W = f·P + Q rounded to x's dtype, and one tl.dot per K step multiplies it with x's tile.
The low-rank correction enters the GEMM epilogue: y += xa · B[n-tile]ᵀ with
xa = x·Aᵀ (M x r) computed before the launch; y is written once.
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_IDS = {"int": 0, "int-sym": 1, "nf": 2}


@triton.jit
def _unit_codes(w0, w1, w2, BITS: tl.constexpr):
    """(BN, J) int32 words of J units -> (BN, J, CPU) raw codes, in column order."""
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    if BITS == 3:
        b = tl.arange(0, CPU)[None, None, :] * 3
        wi = b // 32
        sh = b % 32
        a = tl.where(wi == 0, w0[:, :, None], tl.where(wi == 1, w1[:, :, None], w2[:, :, None]))
        nxt = tl.where(wi == 0, w1[:, :, None], w2[:, :, None])
        lo = (a.to(tl.uint32, bitcast=True) >> sh.to(tl.uint32)).to(tl.int32, bitcast=True)
        hi = tl.where(sh > 29, nxt << ((32 - sh) & 31), 0)
        c = (lo | hi) & 7
    else:
        # halve the shift per level, each join a new in-thread dim: the codes of a word stay in
        # one thread (code index = the joined dims read in order), not one code per thread
        c = w0.to(tl.uint32, bitcast=True)
        SH: tl.constexpr = 16
        c = tl.join(c, c >> SH)
        if BITS <= 4:
            c = tl.join(c, c >> (SH // 2))
        if BITS <= 2:
            c = tl.join(c, c >> (SH // 4))
        c = tl.join(c, c >> BITS)
        c = (tl.reshape(c, (c.shape[0], c.shape[1], CPU)) & ((1 << BITS) - 1)).to(tl.int32, bitcast=True)
    return c


@triton.jit
def _unit_values(w0, w1, w2, book_ptr, BITS: tl.constexpr, FMT: tl.constexpr):
    """(BN, J, CPU) float32 f(code): book[c] for nf, 1 + c/2^BITS otherwise (the code or-ed
    into the mantissa of 1.0: no int->float conversion)."""
    c = _unit_codes(w0, w1, w2, BITS)
    if FMT == 2:
        f = tl.load(book_ptr + c)
    else:
        f = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return f


@triton.jit
def _params(s_ptr, z_ptr, rn, gidx, NG, mask, BITS: tl.constexpr, FMT: tl.constexpr, HAS_Z: tl.constexpr):
    """P, Q of w = f·P + Q for rows rn (dim 0) and groups gidx (dim 1)."""
    off = rn[:, None] * NG + gidx[None, :]
    sc = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
    CS: tl.constexpr = 1 << BITS
    if FMT == 2:
        P = sc
        if HAS_Z:
            Q = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        else:
            Q = tl.zeros_like(sc)
    elif FMT == 1:
        P = sc * CS
        Q = sc * (-(CS + CS // 2))
    else:
        P = sc * CS
        Q = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32) - P
    return P, Q


@triton.jit
def _group_params(s_ptr, z_ptr, rn, unit, NG, mask_n, G: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr,
                  HAS_Z: tl.constexpr):  # fmt: skip
    """P, Q (rows x 1) of the group holding code unit `unit` (a step inside one group)."""
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    gidx = unit * CPU // G + tl.zeros((1,), tl.int32)
    return _params(s_ptr, z_ptr, rn, gidx, NG, mask_n[:, None], BITS, FMT, HAS_Z)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, book_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                 M, N, KU, RW, NG, R, units_per_split, stride_xm, stride_xam, stride_ym, G: tl.constexpr,
                 BITS: tl.constexpr, FMT: tl.constexpr, HAS_Z: tl.constexpr, HAS_CORR: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr,
                 RP: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WPU: tl.constexpr = 3 if BITS == 3 else 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_m = rm < M
    mask_n = rn < N
    rj = tl.arange(0, J)
    rk = tl.arange(0, J * CPU)
    xdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    u_begin = pid_k * units_per_split
    # a step inside one group (its usual case): one scale / offset per row and step, loaded a
    # step ahead instead of one per row and unit
    ONE_GROUP: tl.constexpr = G % (J * CPU) == 0
    if ONE_GROUP:
        P1, Q1 = _group_params(s_ptr, z_ptr, rn, u_begin, NG, mask_n, G, BITS, FMT, HAS_Z)
    for i in range(0, units_per_split, J):
        u = u_begin + i + rj
        mask_u = u < KU
        mask = mask_n[:, None] & mask_u[None, :]
        wp = q_ptr + rn[:, None] * RW + (u * WPU)[None, :]
        w0 = tl.load(wp, mask=mask, other=0)
        if BITS == 3:
            w1 = tl.load(wp + 1, mask=mask, other=0)
            w2 = tl.load(wp + 2, mask=mask, other=0)
        else:
            w1 = w0
            w2 = w0
        if ONE_GROUP:
            P, Q = P1, Q1
            nxt = tl.minimum(u_begin + i + J, KU - 1)
            P1, Q1 = _group_params(s_ptr, z_ptr, rn, nxt, NG, mask_n, G, BITS, FMT, HAS_Z)
        else:
            P, Q = _params(s_ptr, z_ptr, rn, (u * CPU) // G, NG, mask, BITS, FMT, HAS_Z)
        f = _unit_values(w0, w1, w2, book_ptr, BITS, FMT)
        w = tl.reshape((f * P[:, :, None] + Q[:, :, None]).to(xdt), (BN, J * CPU))
        kk = (u_begin + i) * CPU + rk
        xs = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk < KU * CPU)[None, :],
                     other=0.0)  # fmt: skip
        acc = tl.dot(xs, tl.trans(w), acc)
    first = pid_k == 0
    if HAS_CORR:
        rr = tl.arange(0, RP)
        mask_r = rr < R
        xa = tl.load(xa_ptr + rm[:, None] * stride_xam + rr[None, :], mask=mask_m[:, None] & mask_r[None, :] & first,
                     other=0.0)  # fmt: skip
        bt = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(xa.to(xdt), tl.trans(bt.to(xdt)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n & first, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(yp, acc, mask=ymask, sem="relaxed")
