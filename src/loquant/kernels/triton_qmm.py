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

_gemv_kernel (M <= 2, CUDA cores): 2-D (rows x units) tiles; a static loop over the code
  position s inside a unit decodes f_s for every unit and multiplies it with x[u·CPU + s];
  T = Σ_s f_s·x_s and X = Σ_s x_s per unit, then acc += P·T + Q·X. The next step's words and
  parameters are loaded one step ahead in registers. Optional split-K through fp32 atomics.
_gemm_kernel (tensor cores): the (rows x units x codes) tile is decoded in column order,
  W = f·P + Q rounded to x's dtype, and one tl.dot per K step multiplies it with x's tile.
_dequant_kernel: writes deq(W) in x's dtype (large M: cuBLAS then multiplies).
The low-rank correction enters the GEMV / GEMM epilogue: y += xa · B[n-tile]ᵀ with
xa = x·Aᵀ (M x r) computed before the launch; y is written once.
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_IDS = {"int": 0, "int-sym": 1, "nf": 2}


@triton.jit
def _code3(w0, w1, w2, s: tl.constexpr):
    """Code s (0..31) of a 3-bit unit held in three words (raw integer code)."""
    b: tl.constexpr = 3 * s
    if b + 3 <= 32:
        c = (w0 >> b) & 7
    elif b < 32:
        c = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
    elif b + 3 <= 64:
        c = (w1 >> (b - 32)) & 7
    elif b < 64:
        c = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
    else:
        c = (w2 >> (b - 64)) & 7
    return c


@triton.jit
def _decode(w0, w1, w2, book_ptr, s: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr):
    """f(code s of each unit) as float32: book[c] for nf, 1 + c/2^BITS otherwise."""
    if FMT == 2:
        if BITS == 3:
            c = _code3(w0, w1, w2, s)
        else:
            c = (w0 >> (BITS * s)) & ((1 << BITS) - 1)
        f = tl.load(book_ptr + c)
    else:
        TOP: tl.constexpr = 23 - BITS  # the code's lowest bit lands on mantissa bit TOP
        MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
        if BITS == 3:
            bits = _code3(w0, w1, w2, s) << TOP
        else:
            sh: tl.constexpr = BITS * s
            if sh <= TOP:
                bits = (w0 << (TOP - sh)) & MASK
            else:
                bits = (w0 >> (sh - TOP)) & MASK
        f = (bits | 0x3F800000).to(tl.float32, bitcast=True)
    return f


@triton.jit
def _unit_codes(w0, w1, w2, BITS: tl.constexpr):
    """(BN, J) int32 words of J units -> (BN, J, CPU) raw codes, in column order."""
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    s = tl.arange(0, CPU)[None, None, :]
    if BITS == 3:
        b = s * 3
        wi = b // 32
        sh = b % 32
        a = tl.where(wi == 0, w0[:, :, None], tl.where(wi == 1, w1[:, :, None], w2[:, :, None]))
        nxt = tl.where(wi == 0, w1[:, :, None], w2[:, :, None])
        lo = (a.to(tl.uint32, bitcast=True) >> sh.to(tl.uint32)).to(tl.int32, bitcast=True)
        hi = tl.where(sh > 29, nxt << ((32 - sh) & 31), 0)
        c = (lo | hi) & 7
    else:
        c = (w0[:, :, None] >> (s * BITS)) & ((1 << BITS) - 1)
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
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, book_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                 N, KU, RW, NG, G, R, units_per_split, stride_xm, stride_xam, stride_ym,
                 BITS: tl.constexpr, FMT: tl.constexpr, HAS_Z: tl.constexpr, HAS_CORR: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BN: tl.constexpr, J: tl.constexpr, RP: tl.constexpr,
                 SPLIT_K: tl.constexpr):  # fmt: skip
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per unit
    WPU: tl.constexpr = 3 if BITS == 3 else 1  # words per unit
    NEED_X: tl.constexpr = FMT != 2 or HAS_Z
    m = tl.program_id(0)  # rows of x that share a weight tile run back to back (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_n = rn < N
    rj = tl.arange(0, J)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BN, J), dtype=tl.float32)
    u_begin = pid_k * units_per_split
    # Step i's words and parameters are loaded one step ahead (a register double buffer):
    # Triton does not software-pipeline loads that feed plain arithmetic.
    u = u_begin + rj
    mask = mask_n[:, None] & (u < KU)[None, :]
    wp = q_ptr + rn[:, None] * RW + (u * WPU)[None, :]
    w0 = tl.load(wp, mask=mask, other=0)
    if BITS == 3:
        w1 = tl.load(wp + 1, mask=mask, other=0)
        w2 = tl.load(wp + 2, mask=mask, other=0)
    else:
        w1 = w0
        w2 = w0
    P, Q = _params(s_ptr, z_ptr, rn, (u * CPU) // G, NG, mask, BITS, FMT, HAS_Z)
    for i in range(0, units_per_split, J):
        u = u_begin + i + rj
        mask_u = u < KU
        un = u + J
        mask_nx = mask_n[:, None] & ((un < KU) & (i + J < units_per_split))[None, :]
        wpn = q_ptr + rn[:, None] * RW + (un * WPU)[None, :]
        n0 = tl.load(wpn, mask=mask_nx, other=0)
        if BITS == 3:
            n1 = tl.load(wpn + 1, mask=mask_nx, other=0)
            n2 = tl.load(wpn + 2, mask=mask_nx, other=0)
        else:
            n1 = n0
            n2 = n0
        Pn, Qn = _params(s_ptr, z_ptr, rn, (un * CPU) // G, NG, mask_nx, BITS, FMT, HAS_Z)
        t = tl.zeros((BN, J), dtype=tl.float32)
        xsum = tl.zeros((J,), dtype=tl.float32)
        for s in tl.static_range(CPU):
            f = _decode(w0, w1, w2, book_ptr, s, BITS, FMT)
            xs = tl.load(x_row + u * CPU + s, mask=mask_u, other=0.0).to(tl.float32)
            t += f * xs[None, :]
            if NEED_X:
                xsum += xs
        acc += P * t
        if NEED_X:
            acc += Q * xsum[None, :]
        w0, w1, w2, P, Q = n0, n1, n2, Pn, Qn
    y = tl.sum(acc, axis=1)
    first = pid_k == 0
    if HAS_CORR:
        rr = tl.arange(0, RP)
        mask_r = rr < R
        xa = tl.load(xa_ptr + m * stride_xam + rr, mask=mask_r & first, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        y += tl.sum(bt.to(tl.float32) * xa[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=mask_n & first, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(y_ptr + m * stride_ym + rn, y, mask=mask_n, sem="relaxed")


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, book_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                 M, N, KU, RW, NG, G, R, units_per_split, stride_xm, stride_xam, stride_ym,
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


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, book_ptr, w_ptr, N, K, KU, RW, NG, G,
                    BITS: tl.constexpr, FMT: tl.constexpr, HAS_Z: tl.constexpr, BN: tl.constexpr,
                    J: tl.constexpr):  # fmt: skip
    CPU: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WPU: tl.constexpr = 3 if BITS == 3 else 1
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    u = tl.program_id(1) * J + tl.arange(0, J)
    mask = (rn < N)[:, None] & (u < KU)[None, :]
    wp = q_ptr + rn[:, None] * RW + (u * WPU)[None, :]
    w0 = tl.load(wp, mask=mask, other=0)
    if BITS == 3:
        w1 = tl.load(wp + 1, mask=mask, other=0)
        w2 = tl.load(wp + 2, mask=mask, other=0)
    else:
        w1 = w0
        w2 = w0
    P, Q = _params(s_ptr, z_ptr, rn, (u * CPU) // G, NG, mask, BITS, FMT, HAS_Z)
    f = _unit_values(w0, w1, w2, book_ptr, BITS, FMT)
    w = tl.reshape(f * P[:, :, None] + Q[:, :, None], (BN, J * CPU))
    kk = tl.program_id(1) * J * CPU + tl.arange(0, J * CPU)
    out = w_ptr + rn[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(out, w.to(w_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (kk < K)[None, :])
