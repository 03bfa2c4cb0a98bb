"""The small-M GEMV in Gluon (Triton with explicit layouts): y = x · deq(W)ᵀ (+ xa · Bᵀ + bias).

Why Gluon: in plain Triton the compiler gave the weight tile, the x vector and the partial
sums three different layouts and moved data between them through shared memory (with a
barrier) eight times per K step; that, not DRAM, bounded the old GEMV. Here one 5-D layout
(x rows, weight rows, thread columns, words, codes) holds everything a thread needs in its
registers:

  - RPT weight rows x V consecutive words of each (one 16-byte load per row for V = 4),
  - the MR x rows' V·CPU matching values (contiguous: 16-byte loads, shared by the RPT rows),
  - the codes of its words, decoded once in registers and used for all MR x rows.

A thread's V words lie in one quantization group, so its partial sum T = Σ f(c)·x and
X = Σ x take the group's P, Q once: acc += P·T + Q·X (w = f(c)·P + Q, as in triton_qmm).
Threads along K are reduced once, after the loop. The next step's words and parameters are
loaded before the current step is decoded (a register double buffer).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from loquant.kernels import cdiv, lowrank, units
from loquant.kernels.lowrank import wait_primary


@gluon.jit
def _expand(t, a: gl.constexpr, b: gl.constexpr):
    return gl.expand_dims(gl.expand_dims(t, a), b)


@gluon.jit
def _codes(w, sh, BITS: gl.constexpr):
    """(.., 1) words and (.., CPU) code positions -> raw 2- or 4-bit codes (one word per unit;
    3 bits: _codes3)."""
    return (w >> (sh * BITS)) & ((1 << BITS) - 1)


@gluon.jit
def _values(w0, w1, w2, sh, book_ptr, ONE, BITS: gl.constexpr, FMT: gl.constexpr):
    """(.., units) words (w1, w2: the 3-bit unit's next words) and (.., CPU) code positions ->
    f(code) in fp32: book[code] for nf, else 1 + code / 2^BITS (the code or-ed into the
    mantissa of 1.0; ONE, its bits, kept in a register)."""
    if BITS == 3:
        c = _codes3(gl.expand_dims(w0, 3), gl.expand_dims(w1, 3), gl.expand_dims(w2, 3), sh)
    else:
        c = _codes(gl.expand_dims(w0, 3), sh, BITS)
    if FMT == 2:
        return gl.load(book_ptr + c)
    return ((c << (23 - BITS)) | ONE).to(gl.float32, bitcast=True)


@gluon.jit
def _lut_word(book_ptr, J: gl.constexpr, HI: gl.constexpr, xdt: gl.constexpr):
    """Byte HI (0 low, 1 high) of book[J + i] in xdt as byte i of an int32, i < 4."""
    w = (gl.load(book_ptr + J).to(xdt).to(gl.int16, bitcast=True).to(gl.int32) >> (8 * HI)) & 0xFF
    for i in gl.static_range(1, 4):
        b = gl.load(book_ptr + J + i).to(xdt).to(gl.int16, bitcast=True).to(gl.int32)
        w = w | (((b >> (8 * HI)) & 0xFF) << (8 * i))
    return w


@gluon.jit
def nf4_lut(book_ptr, xdt: gl.constexpr):
    """The 16-entry nf4 book in xdt as 8 registers for PRMT lookups (4 codes per PRMT, no
    memory access in the loop): low bytes of entries 0-3, 4-7, 8-11, 12-15, then high bytes."""
    return (_lut_word(book_ptr, 0, 0, xdt), _lut_word(book_ptr, 4, 0, xdt), _lut_word(book_ptr, 8, 0, xdt),
            _lut_word(book_ptr, 12, 0, xdt), _lut_word(book_ptr, 0, 1, xdt), _lut_word(book_ptr, 4, 1, xdt),
            _lut_word(book_ptr, 8, 1, xdt), _lut_word(book_ptr, 12, 1, xdt))  # fmt: skip


# The lookup shared by the nf4 decodes, on 4 codes whose nibbles are the low 16 bits of nr:
# 4 PRMTs look up the 4 codes' low and high bytes in the tables $T0..$T7 (each code's low 3
# bits pick a byte among entries 0-7 and among 8-15) and its bit 3, moved to a byte's sign bit
# (PRMT's sign mode spreads it over the byte), selects between them (LOP3 0xD8: m ? b : a).
# Leaves the low bytes in nl and the high bytes in nh, byte i for nibble i of nr.
_NF4_BYTES = ("and.b32 ns, nr, 0x7777; shl.b32 nu, nr, 4; prmt.b32 nm, nu, nr, 0xD9C8; "
              "prmt.b32 na, $T0, $T1, ns; prmt.b32 nb, $T2, $T3, ns; lop3.b32 nl, na, nb, nm, 0xD8; "
              "prmt.b32 na, $T4, $T5, ns; prmt.b32 nb, $T6, $T7, ns; lop3.b32 nh, na, nb, nm, 0xD8; ")  # fmt: skip


def nf4_asm(body: str, first: int) -> str:
    """A PTX block: body with BYTES replaced by the lookup, the tables at operands first,
    first + 4, ... (pack=4: each 32-bit input is 4 operands)."""
    text = _NF4_BYTES
    for i in range(8):
        text = text.replace(f"$T{i}", f"${first + 4 * i}")
    return "{ .reg .b32 nr, ns, nu, nm, na, nb, nl, nh; " + body.replace("BYTES; ", text) + " }"


# GEMV: 4 consecutive codes (selector 0x10 / 0x32 picks their two bytes of the word) -> 4 fp32
# values (the bf16 value in the high half); outputs $0-$3, word $4, selector $8, tables $12...
_NF4_F32 = gl.constexpr(nf4_asm("prmt.b32 nr, $4, $4, $8; BYTES; prmt.b32 nu, nl, nh, 0x5140; shl.b32 $0, nu, 16; "
                                  "and.b32 $1, nu, 0xFFFF0000; prmt.b32 nu, nl, nh, 0x7362; shl.b32 $2, nu, 16; "
                                  "and.b32 $3, nu, 0xFFFF0000;", 12))  # fmt: skip


@gluon.jit
def _nf4_values(w, sh, lut):
    """(.., units) words and (.., 8) code positions -> fp32 book values of the codes (bf16 book)."""
    v, sel = gl.broadcast(gl.expand_dims(w, 3), 0x10 + (sh >> 2) * 0x22)
    return gl.inline_asm_elementwise(_NF4_F32, "=r,=r,=r,=r" + ",r" * 40,
                                     [v, sel, lut[0], lut[1], lut[2], lut[3], lut[4], lut[5], lut[6], lut[7]],
                                     dtype=gl.float32, is_pure=True, pack=4)  # fmt: skip


@gluon.jit
def _pq(sc, zz, BITS: gl.constexpr, FMT: gl.constexpr, HAS_Z: gl.constexpr):
    """A group's stored scale and offset (icq shift for nf; zz unused without HAS_Z) -> fp32
    P, Q of w = f(code)·P + Q, f as `_values` gives it (module docstring of triton_qmm)."""
    P = sc.to(gl.float32)
    if FMT == 2:
        if HAS_Z:
            Q = zz.to(gl.float32)
        else:
            Q = gl.zeros_like(P)
    else:
        P = P * (1 << BITS)
        if FMT == 1:
            Q = P * (-1.5)
        else:
            Q = zz.to(gl.float32) - P
    return P, Q


@gluon.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, book_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                 M, N, KU, RW, NG, R, stride_xm, stride_xam, stride_ym, ONE,
                 G: gl.constexpr, BITS: gl.constexpr, FMT: gl.constexpr, HAS_Z: gl.constexpr,
                 HAS_CORR: gl.constexpr, HAS_BIAS: gl.constexpr, MR: gl.constexpr, RPT: gl.constexpr,
                 V: gl.constexpr, TJ: gl.constexpr, WR: gl.constexpr, WJ: gl.constexpr, PDL: gl.constexpr):  # fmt: skip
    CPU: gl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per unit
    WPU: gl.constexpr = 3 if BITS == 3 else 1  # words per unit
    TR: gl.constexpr = 32 // TJ
    BN: gl.constexpr = RPT * TR * WR
    J: gl.constexpr = TJ * WJ
    STEP: gl.constexpr = J * V  # units per K step
    # dims: (x rows, weight rows, thread columns, words, codes); a thread owns MR x rows,
    # RPT weight rows, V words of each and all their codes
    L5: gl.constexpr = gl.BlockedLayout([MR, RPT, 1, V, CPU], [1, TR, TJ, 1, 1], [1, WR, WJ, 1, 1], [4, 3, 2, 1, 0])
    LC: gl.constexpr = gl.SliceLayout(0, L5)  # (BN, J, V, CPU) codes
    LW: gl.constexpr = gl.SliceLayout(3, LC)  # (BN, J, V) words
    LX: gl.constexpr = gl.SliceLayout(1, L5)  # (MR, J, V, CPU) x
    LA: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, L5))  # (MR, BN, J) partial sums
    LPN: gl.constexpr = gl.SliceLayout(0, LA)  # (BN, J) group parameters
    LXS: gl.constexpr = gl.SliceLayout(1, LA)  # (MR, J) x sums
    LY: gl.constexpr = gl.SliceLayout(2, LA)  # (MR, BN) outputs

    m0 = gl.program_id(0) * MR
    n0 = gl.program_id(1) * BN
    # words (BN, J, V)
    rn_w = _expand(gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW))), 1, 2)
    rj_w = _expand(gl.arange(0, J, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW))), 0, 2)
    rv_w = _expand(gl.arange(0, V, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW))), 0, 1)
    u_w = rj_w * V + rv_w
    wrow = q_ptr + (n0 + rn_w) * RW
    nmask_w = n0 + rn_w < N
    # group parameters (BN, J): the group of each thread column's first unit
    rn_p = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LPN)), 1)
    rj_p = gl.expand_dims(gl.arange(0, J, layout=gl.SliceLayout(0, LPN)), 0)
    prow = (n0 + rn_p) * NG
    nmask_p = n0 + rn_p < N
    # x (MR, J, V, CPU) and code positions (1, 1, 1, CPU)
    LX3: gl.constexpr = gl.SliceLayout(3, LX)
    rm_x = _expand(gl.expand_dims(gl.arange(0, MR, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX3))), 1), 2, 3)
    rj_x = _expand(gl.expand_dims(gl.arange(0, J, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX3))), 0), 2, 3)
    rv_x = _expand(gl.expand_dims(gl.arange(0, V, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX3))), 0), 1, 3)
    LXC: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX)))
    rs_x = _expand(gl.expand_dims(gl.arange(0, CPU, layout=LXC), 0), 1, 2)
    kx = (rj_x * V + rv_x) * CPU + rs_x
    x_rows = x_ptr + (m0 + rm_x) * stride_xm
    mmask_x = m0 + rm_x < M
    LCC: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LC)))
    sh = _expand(gl.expand_dims(gl.arange(0, CPU, layout=LCC), 0), 1, 2)

    LUT: gl.constexpr = FMT == 2 and BITS == 4
    if LUT:
        lut = nf4_lut(book_ptr, gl.bfloat16)
    acc = gl.zeros([MR, BN, J], gl.float32, layout=LA)
    mask_w = nmask_w & (u_w < KU)
    w0 = gl.load(wrow + u_w * WPU, mask=mask_w, other=0)
    if BITS == 3:
        w1 = gl.load(wrow + u_w * WPU + 1, mask=mask_w, other=0)
        w2 = gl.load(wrow + u_w * WPU + 2, mask=mask_w, other=0)
    mask_p = nmask_p & (rj_p * V < KU)
    sc = gl.load(s_ptr + prow + (rj_p * V * CPU) // G, mask=mask_p, other=0.0)
    zz = sc  # (unused without offsets)
    if HAS_Z:
        zz = gl.load(z_ptr + prow + (rj_p * V * CPU) // G, mask=mask_p, other=0.0)
    if HAS_CORR:  # the first rank chunk of B is loaded now, its latency hidden by the loop
        bt = gl.load(b_ptr + (n0 + rn_p) * R + rj_p, mask=nmask_p & (rj_p < R), other=0.0)
    for k0 in range(0, KU, STEP):
        # the next step's words and parameters are loaded before this step is decoded
        un = k0 + STEP + u_w
        mask_wn = nmask_w & (un < KU)
        nw0 = gl.load(wrow + un * WPU, mask=mask_wn, other=0)
        if BITS == 3:
            nw1 = gl.load(wrow + un * WPU + 1, mask=mask_wn, other=0)
            nw2 = gl.load(wrow + un * WPU + 2, mask=mask_wn, other=0)
        gn = ((k0 + STEP + rj_p * V) * CPU) // G
        mask_pn = nmask_p & (k0 + STEP + rj_p * V < KU)
        scn = gl.load(s_ptr + prow + gn, mask=mask_pn, other=0.0)
        zzn = scn
        if HAS_Z:
            zzn = gl.load(z_ptr + prow + gn, mask=mask_pn, other=0.0)
        xk = k0 * CPU + kx
        xv = gl.load(x_rows + xk, mask=mmask_x & (xk < KU * CPU), other=0.0).to(gl.float32)
        if BITS == 3:
            f = _values(w0, w1, w2, sh, book_ptr, ONE, BITS, FMT)
        elif LUT:
            f = _nf4_values(w0, sh, lut)
        else:
            f = _values(w0, w0, w0, sh, book_ptr, ONE, BITS, FMT)
        t = gl.sum(gl.sum(gl.expand_dims(f, 0) * gl.expand_dims(xv, 1), axis=4), axis=3)
        P, Q = _pq(sc, zz, BITS, FMT, HAS_Z)
        P = gl.expand_dims(P, 0)
        if FMT == 2:  # Q is the icq shift or 0 (then x's sum is not needed)
            acc += P * t
            if HAS_Z:
                xs = gl.convert_layout(gl.sum(gl.sum(xv, axis=3), axis=2), LXS, assert_trivial=True)
                acc += gl.expand_dims(Q, 0) * gl.expand_dims(xs, 1)
        else:
            xs = gl.convert_layout(gl.sum(gl.sum(xv, axis=3), axis=2), LXS, assert_trivial=True)
            acc += P * t + gl.expand_dims(Q, 0) * gl.expand_dims(xs, 1)
        w0 = nw0
        if BITS == 3:
            w1 = nw1
            w2 = nw2
        sc = scn
        zz = zzn
    if HAS_CORR:  # xa · B[rows]ᵀ joins the partial sums before their one reduction, r along the thread columns
        if PDL:
            wait_primary()
        rm_c = gl.expand_dims(gl.arange(0, MR, layout=gl.SliceLayout(1, LXS)), 1)
        rj_c = gl.expand_dims(gl.arange(0, J, layout=gl.SliceLayout(0, LXS)), 0)
        for r0 in range(0, R, J):
            if r0 > 0:
                bt = gl.load(b_ptr + (n0 + rn_p) * R + r0 + rj_p, mask=nmask_p & (r0 + rj_p < R), other=0.0)
            xa = gl.load(xa_ptr + (m0 + rm_c) * stride_xam + r0 + rj_c, mask=(m0 + rm_c < M) & (r0 + rj_c < R),
                         other=0.0)  # fmt: skip
            acc += gl.expand_dims(bt.to(gl.float32), 0) * gl.expand_dims(xa.to(gl.float32), 1)
    y = gl.sum(acc, axis=2)
    rm_y = gl.expand_dims(gl.arange(0, MR, layout=gl.SliceLayout(1, LY)), 1)
    rn_y = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, LY)), 0)
    mask_y = (m0 + rm_y < M) & (n0 + rn_y < N)
    if HAS_BIAS:
        y += gl.load(bias_ptr + n0 + rn_y, mask=n0 + rn_y < N, other=0.0).to(gl.float32)
    gl.store(y_ptr + (m0 + rm_y) * stride_ym + n0 + rn_y, y.to(y_ptr.dtype.element_ty), mask=mask_y)


@gluon.jit
def _codes3(w0, w1, w2, s):
    """3-bit codes s (0..31) of a 96-bit unit (w0 | w1 << 32 | w2 << 64); logical shifts."""
    a = w0.to(gl.uint32, bitcast=True)
    b1 = w1.to(gl.uint32, bitcast=True)
    b2 = w2.to(gl.uint32, bitcast=True)
    b = (s * 3).to(gl.uint32)
    lo = gl.where(b < 32, a >> (b & 31), gl.where(b < 64, b1 >> (b & 31), b2 >> (b & 31)))
    # codes 10 (bits 30-32) and 21 (bits 63-65) take their high bits from the next word
    hi = gl.where(s == 10, b1 << 2, gl.where(s == 21, b2 << 1, 0))
    return ((lo | hi) & 7).to(gl.int32, bitcast=True)


def gemv_config(m: int, bits: int, k: int, group: int) -> dict:
    """x rows per program, then the weight tile: rows per thread, words per thread (a thread's
    words stay in one group), threads along K per warp, warps along rows and along K. The
    best of the H100 sweeps in BENCHMARKS.md (11008 x 4096)."""
    cpu = units(bits)[0]
    if m <= 2 and bits == 2:
        cfg = {"MR": m, "RPT": 8, "V": 2, "TJ": 32, "WR": 1, "WJ": 2}
    elif m <= 2:
        cfg = {"MR": m, "RPT": 4, "V": 4, "TJ": 32, "WR": 3 - m, "WJ": 2}
    elif m <= 4:
        cfg = {"MR": 4, "RPT": 2, "V": 2, "TJ": 32, "WR": 2, "WJ": 2}
    else:
        cfg = {"MR": 4, "RPT": 2, "V": 2, "TJ": 16, "WR": 4, "WJ": 1}
    if bits == 3:
        cfg["V"] = 1
    cfg["V"] = units_in_group(cfg["V"], cpu, k, group)
    return cfg


def units_in_group(v: int, cpu: int, k: int, group: int) -> int:
    """v halved until a thread's v units of cpu codes lie inside one group."""
    while v > 1 and group != k and group % (v * cpu):
        v //= 2
    return v


def gemv(x2, qweight, scales, offsets, book, A, B, bias, bits: int, fmt: int, n: int, k: int, group: int,
         cfg: dict) -> torch.Tensor:  # fmt: skip
    """Launch: x2 (M x k) contiguous; A (r x k) and B (n x r) in x's dtype."""
    m = x2.shape[0]
    cpu = units(bits)[0]
    bn = cfg["RPT"] * (32 // cfg["TJ"]) * cfg["WR"]
    y = x2.new_empty(m, n)
    r = B.shape[1] if B is not None else 0
    xa, pdl = lowrank.xa(x2, A) if A is not None else (None, False)  # launched last before the GEMV
    _gemv_kernel[(cdiv(m, cfg["MR"]), cdiv(n, bn))](
        x2, qweight.view(torch.int32), scales, offsets if offsets is not None else scales,
        book if book is not None else scales, xa if xa is not None else x2, B if B is not None else x2,
        bias if bias is not None else x2, y, m, n, k // cpu, k * bits // 32, scales.shape[1], r, x2.stride(0),
        xa.stride(0) if xa is not None else 0, y.stride(0), _ONE, G=group, BITS=bits, FMT=fmt,
        HAS_Z=offsets is not None, HAS_CORR=B is not None, HAS_BIAS=bias is not None, PDL=pdl, launch_pdl=pdl,
        num_warps=cfg["WR"] * cfg["WJ"], **cfg)  # fmt: skip
    return y


# The bits of 1.0f, passed as an argument so that it stays in a register: one LOP3 then does
# (bits & mask) | ONE, where two immediates would take two.
_ONE = 0x3F800000
