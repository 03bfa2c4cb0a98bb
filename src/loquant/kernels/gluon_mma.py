"""Tensor-core kernel in Gluon for 3 <= M <= 64: y = x · deq(W)ᵀ (+ xa · Bᵀ + bias).

The weight is the *left* operand of mma.sync m16n8k16 (weight rows fill the 16-row side, x
rows the 8-wide side), so the decoded weight never leaves registers: each thread decodes
exactly the elements of its A fragments, and the loop uses no shared memory.

What makes that possible straight from loquant's packed layout is that a dot product does
not care in which order it visits K. Within a step of BK codes, thread q (of the 4 threads
that share a fragment row) is given the physical codes [q·BK/4, (q+1)·BK/4) of its two rows:
one contiguous run of words (a 16-byte load at 4 bits, BK = 128). Codes s and s + CPU/2 of a
unit fill one 16-bit register pair, in the slot pair (2q + 16t + 8h, +1) of MMA t, pair index
2t + h running over the thread's units. For int formats one shift (at 3 bits: two funnel
shifts and a PRMT) and one LOP3 turn a word into such a pair of (magic + code) values, and two
HFMA2 scale it; for nf4, PRMTs look 4 codes up at once in the book held in 8 registers
(gluon_gemv.nf4_lut) and one HFMA2 scales a pair. nf2 and nf3 decode through fp32. x's B
fragments take the same permutation: x is read as int32 words (contiguous, 16-byte loads)
and each B register is one PRMT of two of them. The reshapes and permutes below only rename
registers: the layouts are built so that they agree with mma.sync's operand layouts lane for
lane and warp for warp.

A CTA holds 16·WN·RN weight rows (WN warps) and BM x rows; K is split over CTAs when the
tiles alone would not fill the GPU (SPLIT > 1): partial sums go to an fp32 workspace with
atomics, and the last CTA of a tile (a per-tile ticket) adds the correction and bias,
writes y and leaves the workspace and ticket zeroed for the next call (kernels/workspace.py).
Each step's words, group parameters and x words are loaded a step ahead, into two register
buffers used in turn.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from loquant.kernels import cdiv, lowrank, next_pow2, split_k, units, workspace
from loquant.kernels.gluon_gemv import _ONE, _expand, _pq, _values, nf4_asm, nf4_lut
from loquant.kernels.lowrank import wait_primary

MAX_M = 64  # the most x rows the dispatcher gives this kernel (ops.MMA_MAX_M)


def _log2(v: int) -> int:
    return v.bit_length() - 1


@functools.cache
def _layouts(bits: int, BM: int, BK: int, WN: int, RN: int, pairs: bool):
    """(code layout (BN, 4, NU, CPU or CPU/2 pairs), x layout (BM, 4, C), mma layout) as linear
    layouts whose lanes and warps match mma.sync's A and B fragments after the K permutation.
    Cached: building them took about 45 µs of host time, on every launch."""
    cpu = units(bits)[0]
    c = BK // 4
    nu = c // cpu
    cpu = cpu // 2 if pairs else cpu
    bn = 16 * WN * RN
    lanes_w = [[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    codes = gl.DistributedLinearLayout(
        [[0, 0, 0, 1 << i] for i in range(_log2(cpu))]
        + [[0, 0, 1 << i, 0] for i in range(_log2(nu))]
        + [[8, 0, 0, 0]]
        + [[(16 * WN) << i, 0, 0, 0] for i in range(_log2(RN))],
        lanes_w,
        [[16 << i, 0, 0, 0] for i in range(_log2(WN))],
        [],
        [bn, 4, nu, cpu],
    )
    xl = gl.DistributedLinearLayout(
        [[0, 0, 1 << i] for i in range(_log2(c // 2))] + [[8 << i, 0, 0] for i in range(_log2(BM // 8))],
        [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        [[0, 0, 0]] * _log2(WN),
        [],
        [BM, 4, c // 2],
    )
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WN, 1], instr_shape=[16, 8])
    return codes, xl, mma


@gluon.jit
def _finish(acc, xa_ptr, b_ptr, bias_ptr, y_ptr, n0, m0, M, N, R, stride_xam, stride_ym,
            HAS_CORR: gl.constexpr, HAS_BIAS: gl.constexpr, RP: gl.constexpr, WN: gl.constexpr,
            MMA: gl.constexpr, PDL: gl.constexpr):  # fmt: skip
    """acc (BN weight rows x BM x rows) + B[rows] · xaᵀ + bias -> y (x rows x weight rows)."""
    BN: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    rn = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)), 1)
    rm = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, MMA)), 0)
    if HAS_CORR:  # one more MMA over the rank: B[rows] (BN x RP) · xaᵀ (RP x BM)
        if PDL:
            wait_primary()
        # B and xa are loaded straight into the mma operand layouts (no trip through shared memory)
        LBA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        LXB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
        bn_ = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LBA)), 1)
        br = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, LBA)), 0)
        bt = gl.load(b_ptr + (n0 + bn_) * R + br, mask=(n0 + bn_ < N) & (br < R), other=0.0)
        xr = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(1, LXB)), 1)
        xm = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, LXB)), 0)
        xat = gl.load(xa_ptr + (m0 + xm) * stride_xam + xr, mask=(m0 + xm < M) & (xr < R), other=0.0)
        acc = mma_v2(bt, xat, acc)
    if HAS_BIAS:
        acc += gl.load(bias_ptr + n0 + rn, mask=n0 + rn < N, other=0.0).to(gl.float32)
    gl.store(y_ptr + (m0 + rm) * stride_ym + n0 + rn, acc.to(y_ptr.dtype.element_ty),
             mask=(m0 + rm < M) & (n0 + rn < N))  # fmt: skip


@gluon.jit
def _weight_index(q_ptr, n0, N, RW, NG, BN: gl.constexpr, NU: gl.constexpr, WPU: gl.constexpr,
                  CPU: gl.constexpr, HALF: gl.constexpr, PAIRS: gl.constexpr, L4: gl.constexpr):  # fmt: skip
    """The code layout's indices for weight rows n0.. (rows past N read row N - 1): row
    pointers and each thread's first word (wrow + ow, contiguous in the unit dim: vector
    loads), group-parameter row offsets and the thread's quarter (prow, rq_p), and the code
    positions of a word (sh: pair slots with PAIRS)."""
    LW: gl.constexpr = gl.SliceLayout(3, L4)  # (BN, 4, NU) words
    LP: gl.constexpr = gl.SliceLayout(2, LW)  # (BN, 4) group parameters
    rn = _expand(gl.arange(0, BN, layout=gl.SliceLayout(1, LP)), 1, 2)
    rq = _expand(gl.arange(0, 4, layout=gl.SliceLayout(0, LP)), 0, 2)
    ru = _expand(gl.arange(0, NU, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW))), 0, 1)
    ow = (rq * NU + ru) * WPU
    wrow = q_ptr + gl.minimum(n0 + rn, N - 1) * RW
    rn_p = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LP)), 1)
    rq_p = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LP)), 0)
    prow = gl.minimum(n0 + rn_p, N - 1) * NG
    LS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4)))
    sh = _expand(gl.expand_dims(gl.arange(0, HALF if PAIRS else CPU, layout=LS), 0), 1, 2)
    return wrow, ow, prow, rq_p, sh


@gluon.jit
def _load(wrow, ow, prow, rq_p, xrow, kx, kb, wb, i, s_ptr, z_ptr, G: gl.constexpr, BITS: gl.constexpr,
          HAS_Z: gl.constexpr, XPRE: gl.constexpr, BK: gl.constexpr, BKW: gl.constexpr, C: gl.constexpr):  # fmt: skip
    """Step i's words, group parameters and (XPRE) x words."""
    wp = wrow + (wb + i * BKW) + ow
    w0 = gl.load(wp)
    w1 = w0
    w2 = w0
    if BITS == 3:
        w1 = gl.load(wp + 1)
        w2 = gl.load(wp + 2)
    gi = (kb + i * BK + rq_p * C) // G
    sc = gl.load(s_ptr + prow + gi)
    zz = sc
    if HAS_Z:
        zz = gl.load(z_ptr + prow + gi)
    xv = w0
    if XPRE:
        xv = gl.load(xrow + (kb + i * BK) // 2 + kx)
    return w0, w1, w2, sc, zz, xv


@gluon.jit
def _book(book_ptr, PAIRS: gl.constexpr, FMT: gl.constexpr, xdt: gl.constexpr):
    """What `_decode` takes as book: nf4_lut's registers for nf4 pairs, else the pointer."""
    if PAIRS and FMT == 2:
        book = nf4_lut(book_ptr, xdt)
    else:
        book = book_ptr
    return book


@gluon.jit
def _decode(w0, w1, w2, sc, zz, sh, book, ONE, NEG, BITS: gl.constexpr, FMT: gl.constexpr,
            HAS_Z: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NU: gl.constexpr, T: gl.constexpr,
            HALF: gl.constexpr, PAIRS: gl.constexpr, DEC: gl.constexpr, PACK: gl.constexpr,
            L4: gl.constexpr, dt_ptr, MAGV: gl.constexpr):  # fmt: skip
    """One step's words and group parameters -> the (BN, BK) weight tile in dt_ptr's dtype,
    logical K order (module docstring), laid out as the mma A fragments. book: the nf book's
    pointer, or for nf4 (PAIRS) its registers from `nf4_lut`."""
    xdt: gl.constexpr = dt_ptr.dtype.element_ty
    if PAIRS:  # codes s and s + CPU/2 of a unit -> one 16-bit pair, scaled by HFMA2 (P2, Q2: pair constants)
        P2 = gl.inline_asm_elementwise(PACK, "=r,h", [sc.to(xdt)], dtype=gl.int32, is_pure=True, pack=1)
        if FMT == 2:  # nf4: book is nf4_lut's registers; DEC looks up 4 codes at once, one HFMA2 a pair
            if HAS_Z:
                Q2 = gl.inline_asm_elementwise(PACK, "=r,h", [zz.to(xdt)], dtype=gl.int32, is_pure=True, pack=1)
            else:
                Q2 = gl.zeros_like(P2)
            # the selector picks the word's bytes with codes s, s + 1, s + 4, s + 5 (s = 0, 2)
            v, sel = gl.broadcast(gl.expand_dims(w0, 3), 0x20 + (sh >> 1) * 0x11)
        else:  # int: shift, mask, two HFMA2; w = (v - n) · s + r with v = MAGIC + code, v - n exact in 16 bits
            if BITS == 3:  # codes s and s + 16 of the unit's 96 bits: a funnel shift each (the words by s, constant)
                o = sh * 3
                e0 = gl.expand_dims(w0, 3)
                e1 = gl.expand_dims(w1, 3)
                e2 = gl.expand_dims(w2, 3)
                v = gl.where(o < 32, e0, e1)  # code s: bits o .. o + 2 of (hi:lo) = v, ha
                ha = gl.where(o < 32, e1, e2)
                lb = gl.where(o < 16, e1, e2)  # code s + 16: bits o + 48 .. of (e2:lb)
                hb, ra = gl.broadcast(e2, o & 31)
                _, rb = gl.broadcast(e2, (o + 16) & 31)
            else:
                v, shp = gl.broadcast(gl.expand_dims(w0, 3), sh * BITS)
            one = gl.full(v.shape, 0, gl.int32, layout=L4) + ONE
            if FMT == 1:  # n = MAGIC + 2^(BITS-1), r = 0
                Q2 = gl.zeros_like(P2)
                neg = gl.full(v.shape, 0, gl.int32, layout=L4) + NEG
            else:
                # offset = r - z·s with z the nearest integer: n = MAGIC + z keeps |v - n| <= 2^BITS
                # and |r| <= s/2, so the 16-bit pair math rounds about as the reference does (the
                # offset itself, up to 2^BITS·s, rounded to bf16 cost about 1 % of output accuracy)
                s32 = sc.to(gl.float32)
                o32 = zz.to(gl.float32)
                z = gl.where(s32 != 0.0, gl.floor(0.5 - o32 / s32), 0.0)
                Q2 = gl.inline_asm_elementwise(PACK, "=r,h", [(o32 + z * s32).to(xdt)], dtype=gl.int32,
                                               is_pure=True, pack=1)  # fmt: skip
                N2 = gl.inline_asm_elementwise(PACK, "=r,h", [(-(MAGV + z)).to(xdt)], dtype=gl.int32, is_pure=True,
                                               pack=1)  # fmt: skip
                neg, _ = gl.broadcast(_expand(N2, 2, 3), v)
        p2, _ = gl.broadcast(_expand(P2, 2, 3), v)
        q2, _ = gl.broadcast(_expand(Q2, 2, 3), v)
        # over a trailing pair dim (join): each 32-bit asm result is both halves of a pair, in place
        if FMT == 2:
            w = gl.inline_asm_elementwise(DEC, "=r,=r" + ",r" * 48, [gl.join(v, v), gl.join(sel, sel),
                                          gl.join(p2, p2), gl.join(q2, q2), book[0], book[1], book[2], book[3],
                                          book[4], book[5], book[6], book[7]], dtype=dt_ptr.dtype.element_ty,
                                          is_pure=True, pack=4)  # fmt: skip
        elif BITS == 3:
            w = gl.inline_asm_elementwise(DEC, "=r" + ",r" * 20, [gl.join(v, v), gl.join(ha, ha), gl.join(lb, lb),
                                          gl.join(hb, hb), gl.join(ra, ra), gl.join(rb, rb), gl.join(p2, p2),
                                          gl.join(q2, q2), gl.join(one, one), gl.join(neg, neg)],
                                          dtype=dt_ptr.dtype.element_ty, is_pure=True, pack=2)  # fmt: skip
        else:
            w = gl.inline_asm_elementwise(DEC, "=r" + ",r" * 12, [gl.join(v, v), gl.join(shp, shp), gl.join(p2, p2),
                                          gl.join(q2, q2), gl.join(one, one), gl.join(neg, neg)],
                                          dtype=dt_ptr.dtype.element_ty, is_pure=True, pack=2)  # fmt: skip
    else:
        f = _values(w0, w1, w2, sh, book, ONE, BITS, FMT)
        P, Q = _pq(sc, zz, BITS, FMT, HAS_Z)
        w = (f * _expand(P, 2, 3) + _expand(Q, 2, 3)).to(xdt)
        w = gl.permute(gl.reshape(w, [BN, 4, NU, 2, HALF]), [0, 1, 2, 4, 3])
    # (row, q, pair, e) with pair = 2t + h -> logical K = 16t + 8h + 2q + e
    return gl.reshape(gl.permute(gl.reshape(w, [BN, 4, T, 2, 2]), [0, 2, 3, 1, 4]), [BN, BK])


@gluon.jit
def _step(acc, w0, w1, w2, sc, zz, xv, xrow, kx, k, sh, book, ONE, NEG, BITS: gl.constexpr, FMT: gl.constexpr,
          HAS_Z: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, NU: gl.constexpr,
          T: gl.constexpr, HALF: gl.constexpr, XPRE: gl.constexpr, PAIRS: gl.constexpr,
          DEC: gl.constexpr, PACK: gl.constexpr, L4: gl.constexpr, LA: gl.constexpr, LB: gl.constexpr,
          x_ptr, MAGV: gl.constexpr):  # fmt: skip
    """Decode one step's codes into A fragments, x into B fragments, and accumulate (x_ptr
    gives x's dtype)."""
    if not XPRE:
        xv = gl.load(xrow + k // 2 + kx)
    a = _decode(w0, w1, w2, sc, zz, sh, book, ONE, NEG, BITS, FMT, HAS_Z, BN, BK, NU, T, HALF, PAIRS, DEC,
                PACK, L4, x_ptr, MAGV)  # fmt: skip
    # x words (unit u, half e, word j) hold values 2j, 2j+1 of half e; B pairs are
    # (value s of half 0, value s of half 1): PRMT 0x5410 (low halves), 0x7632 (high)
    xa_, xb_ = gl.split(gl.permute(gl.reshape(xv, [BM, 4, NU, 2, HALF // 2]), [0, 1, 2, 4, 3]))
    lo_ = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [xa_, xb_], dtype=gl.int32,
                                    is_pure=True, pack=1)  # fmt: skip
    hi_ = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [xa_, xb_], dtype=gl.int32,
                                    is_pure=True, pack=1)  # fmt: skip
    xp = gl.join(lo_, hi_)
    xp = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [gl.join(xp, xp)], dtype=x_ptr.dtype.element_ty,
                                   is_pure=True, pack=2)  # fmt: skip
    b = gl.reshape(gl.permute(gl.reshape(xp, [BM, 4, T, 2, 2]), [2, 3, 1, 4, 0]), [BK, BM])
    acc = mma_v2(gl.convert_layout(a, LA), gl.convert_layout(b, LB), acc)
    return acc


@gluon.jit
def _mma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, book_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, RW, NG, R, k_split, w_split, stride_xm, stride_xam, stride_ym, ONE, NEG,
                G: gl.constexpr, BITS: gl.constexpr, FMT: gl.constexpr, HAS_Z: gl.constexpr,
                HAS_CORR: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                WN: gl.constexpr, RN: gl.constexpr, SPLIT: gl.constexpr, RP: gl.constexpr,
                L4: gl.constexpr, LX3: gl.constexpr, MMA: gl.constexpr, PAIRS: gl.constexpr,
                DEC: gl.constexpr, PACK: gl.constexpr, XPRE: gl.constexpr, MAGV: gl.constexpr,
                PDL: gl.constexpr):  # fmt: skip
    CPU: gl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per unit
    HALF: gl.constexpr = CPU // 2
    WPU: gl.constexpr = 3 if BITS == 3 else 1  # words per unit
    C: gl.constexpr = BK // 4  # codes per thread and row in one step
    NU: gl.constexpr = C // CPU
    T: gl.constexpr = BK // 16  # MMAs per step
    BN: gl.constexpr = 16 * WN * RN
    BKW: gl.constexpr = BK // CPU * WPU  # words per row and step
    n0 = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BM
    kb = gl.program_id(2) * k_split  # first code of this CTA's K range
    wb = gl.program_id(2) * w_split  # its first word in a row (w_split: aligned, for vector loads)
    steps = (gl.minimum(K, kb + k_split) - kb) // BK

    # rows past N and x rows past M read the last row instead (no masks, no zero fills in the
    # loop); their results are never stored
    wrow, ow, prow, rq_p, sh = _weight_index(q_ptr, n0, N, RW, NG, BN, NU, WPU, CPU, HALF, PAIRS, L4)
    rm_x = _expand(gl.arange(0, BM, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX3))), 1, 2)
    rq_x = _expand(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX3))), 0, 2)
    ri_x = _expand(gl.arange(0, C // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX3))), 0, 1)
    kx = rq_x * (C // 2) + ri_x
    # x is read as int32 words (two values each): the B fragments are built from them with one
    # PRMT per register, and the loop carries whole words
    xrow = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + gl.minimum(m0 + rm_x, M - 1) * (stride_xm // 2)
    LA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    LB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)

    book = _book(book_ptr, PAIRS, FMT, x_ptr.dtype.element_ty)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    # K % BK == 0 and every split has a step. Two steps per iteration with two register
    # buffers: each is refilled right after its step is decoded and used a step later, so
    # the loop carries loaded registers without copies.
    wa0, wa1, wa2, sa, za, xa_ = _load(wrow, ow, prow, rq_p, xrow, kx, kb, wb, 0, s_ptr, z_ptr, G, BITS, HAS_Z, XPRE,
                                       BK, BKW, C)  # fmt: skip
    for i in range(0, steps, 2):
        wb0, wb1, wb2, sb, zb, xb_ = _load(wrow, ow, prow, rq_p, xrow, kx, kb, wb, gl.minimum(i + 1, steps - 1), s_ptr,
                                           z_ptr, G, BITS, HAS_Z, XPRE, BK, BKW, C)  # fmt: skip
        acc = _step(acc, wa0, wa1, wa2, sa, za, xa_, xrow, kx, kb + i * BK, sh, book, ONE, NEG, BITS, FMT, HAS_Z,
                    BN, BM, BK, NU, T, HALF, XPRE, PAIRS, DEC, PACK, L4, LA, LB, x_ptr, MAGV)  # fmt: skip
        wa0, wa1, wa2, sa, za, xa_ = _load(wrow, ow, prow, rq_p, xrow, kx, kb, wb, gl.minimum(i + 2, steps - 1), s_ptr,
                                           z_ptr, G, BITS, HAS_Z, XPRE, BK, BKW, C)  # fmt: skip
        if i + 1 < steps:
            kn = kb + (i + 1) * BK
            acc = _step(acc, wb0, wb1, wb2, sb, zb, xb_, xrow, kx, kn, sh, book, ONE, NEG, BITS, FMT, HAS_Z, BN,
                        BM, BK, NU, T, HALF, XPRE, PAIRS, DEC, PACK, L4, LA, LB, x_ptr, MAGV)  # fmt: skip
    if SPLIT == 1:
        _finish(acc, xa_ptr, b_ptr, bias_ptr, y_ptr, n0, m0, M, N, R, stride_xam, stride_ym,
                HAS_CORR, HAS_BIAS, RP, WN, MMA, PDL)  # fmt: skip
    else:
        rn_y = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)), 1)
        rm_y = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, MMA)), 0)
        ymask = (m0 + rm_y < M) & (n0 + rn_y < N)
        wsp = ws_ptr + (m0 + rm_y) * N + n0 + rn_y
        gl.atomic_add(wsp, acc, mask=ymask, sem="relaxed")
        gl.thread_barrier()
        tile = gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
        ticket = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT - 1:  # the last CTA of this tile: every partial sum is in ws
            acc = gl.load(wsp, mask=ymask, other=0.0, cache_modifier=".cg")
            # ws and the ticket back to zero for the next call (workspace.zeroed)
            gl.store(wsp, gl.zeros_like(acc), mask=ymask)
            gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
            _finish(acc, xa_ptr, b_ptr, bias_ptr, y_ptr, n0, m0, M, N, R, stride_xam, stride_ym,
                    HAS_CORR, HAS_BIAS, RP, WN, MMA, PDL)  # fmt: skip


def _pair(value: float, dtype: torch.dtype) -> int:
    """Two copies of value in dtype, as the bits of an int32."""
    bits = torch.tensor([value], dtype=dtype).view(torch.int16).item() & 0xFFFF
    v = bits * 0x10001
    return v - (1 << 32) if v >= 1 << 31 else v


def pair_decode(bits: int, fmt: int) -> bool:
    """Whether codes decode as 16-bit pairs (int / int-sym: a shift, or two funnel shifts and
    a PRMT at 3 bits, then a LOP3 and two HFMA2; nf4: PRMT lookups in registers, an HFMA2)
    rather than through fp32 (nf at 2 and 3 bits: a table in memory)."""
    return fmt != 2 or bits == 4


@functools.cache
def decode_args(bits: int, fmt: int, dtype: torch.dtype, pairs: bool | None = None) -> dict:
    """The runtime and constexpr arguments of `_decode` for codes of bits / fmt and x's dtype:
    ONE and NEG (pair constants), PAIRS (default: pair_decode), the DEC and PACK asm, MAGV.
    Cached (every launch asks; callers only read it)."""
    pairs = pair_decode(bits, fmt) if pairs is None else pairs
    half = "bf16x2" if dtype == torch.bfloat16 else "f16x2"
    magic = 128.0 if dtype == torch.bfloat16 else 1024.0  # its ulp is 1: magic + code is exact
    neg = -(magic + (2 ** (bits - 1) if fmt == 1 else 0))
    pmask, magic2 = ((1 << bits) - 1) * 0x10001, _pair(magic, dtype) & 0xFFFFFFFF  # (v & pmask) | magic2: 0xea
    if pairs and fmt == 2:  # nf4, pack=4: out $0 $1 (pairs s, s + 1), word $2, selector $6, P $10, Q $14, tables $18..
        dec = nf4_asm(f"prmt.b32 nr, $2, $2, $6; BYTES; prmt.b32 nu, nl, nh, 0x6240; fma.rn.{half} $0, nu, $10, $14; "
                      f"prmt.b32 nu, nl, nh, 0x7351; fma.rn.{half} $1, nu, $10, $14;", 18)  # fmt: skip
    elif bits == 3:  # pack=2: out $0; words $1 $3 (code s), $5 $7 (code s + 16), shifts $9 $11, P $13, Q $15, ...
        dec = (f"{{ .reg .b32 a, b, t; shf.r.clamp.b32 a, $1, $3, $9; shf.r.clamp.b32 b, $5, $7, $11; "
               f"prmt.b32 t, a, b, 0x5410; lop3.b32 t, t, {pmask}, {magic2}, 0xea; "
               f"fma.rn.{half} t, t, $17, $19; fma.rn.{half} $0, t, $13, $15; }}")  # fmt: skip
    else:  # pack=2: output $0, word $1, shift $3, P $5, Q $7, ONE $9, NEG $11
        dec = (f"{{ .reg .b32 t; shr.u32 t, $1, $3; lop3.b32 t, t, {pmask}, {magic2}, 0xea; "
               f"fma.rn.{half} t, t, $9, $11; fma.rn.{half} $0, t, $5, $7; }}")  # fmt: skip
    return {
        "ONE": _pair(1.0, dtype) if pairs else _ONE,
        "NEG": _pair(neg, dtype),
        "PAIRS": pairs,
        "DEC": dec,
        "PACK": "mov.b32 $0, {$1, $1};",
        "MAGV": magic,
    }


def mma_config(m: int, bits: int, n: int, k: int, group: int) -> dict:
    """x rows per CTA, codes per K step, warps (16 weight rows each), 16-row slabs per warp,
    K splits (0: chosen at launch). The best of the H100 sweeps at 11008 x 4096, M = 16 and 64
    (BENCHMARKS.md); BK = 256 and one slab per warp were slower there."""
    return {"BM": max(16, next_pow2(min(m, 64))), "BK": 128, "WN": 4, "RN": 2, "SPLIT": 0}


def fits(bits: int, k: int, group: int, bk: int = 128) -> bool:
    """Whether K is whole steps of bk codes and a thread's bk/4 codes are whole units inside
    one group."""
    cpu = units(bits)[0]
    c = bk // 4
    return k % bk == 0 and c % cpu == 0 and (group == k or group % c == 0)


def _check(cfg: dict, bits: int, k: int, group: int) -> None:
    if not fits(bits, k, group, cfg["BK"]):
        raise ValueError(f"mma config {cfg}: K {k} must be whole steps and a thread's {cfg['BK'] // 4} codes "
                         f"whole units inside one group of {group}")  # fmt: skip


def mma(x2, qweight, scales, offsets, book, A, B, bias, bits: int, fmt: int, n: int, k: int, group: int,
        cfg: dict, sms: int) -> torch.Tensor:  # fmt: skip
    """Launch: x2 (M x k) contiguous; A (r x k) and B (n x r) in x's dtype."""
    _check(cfg, bits, k, group)
    if x2.data_ptr() % 16:  # x is read as aligned int32 words (a view can start anywhere)
        x2 = x2.clone()
    m = x2.shape[0]
    bm, bk, wn, rn = cfg["BM"], cfg["BK"], cfg["WN"], cfg["RN"]
    bn = 16 * wn * rn
    tiles = cdiv(n, bn) * cdiv(m, bm)
    # the smallest split with about 1.6 CTAs per SM, 2+ steps each: the best split on the H100
    # for every Llama-2-7B / Llama-3-8B shape at M = 4, 16 and 64 (BENCHMARKS.md)
    split = cfg.get("SPLIT") or split_k(tiles, k // bk, sms, 1.6, 2)
    k_split = cdiv(cdiv(k, split), bk) * bk
    split = cdiv(k, k_split)
    y = x2.new_empty(m, n)
    if split > 1:  # partial sums and per-tile tickets; the kernel leaves them zeroed
        reserve = max(m, MAX_M) * n + tiles  # the layer's largest call on this path
        ws = workspace.zeroed(m * n + tiles, x2.device, reserve)
        cnt = ws[m * n :].view(torch.int32)
    else:
        ws = cnt = y
    r = B.shape[1] if B is not None else 0
    dec = decode_args(bits, fmt, x2.dtype)
    pairs = dec["PAIRS"]
    L4, LX3, MMA = _layouts(bits, bm, bk, wn, rn, pairs)
    # asymmetric int at 2 and 4 bits: ptxas takes ~186 registers, 2 CTAs per SM; capped at 168
    # (3 CTAs, no spills in the sm_90 compile) it runs faster (BENCHMARKS.md)
    maxnreg = cfg.get("MAXNREG", 168 if pairs and fmt == 0 and bm <= 16 and wn == 4 else None)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    grid = (cdiv(n, bn), cdiv(m, bm), split)
    xa, pdl = lowrank.xa(x2, A) if A is not None else (None, False)  # launched last before the kernel
    _mma_kernel[grid](
        x2, qweight.view(torch.int32), scales, offsets if offsets is not None else scales,
        book if book is not None else scales, xa if xa is not None else x2, B if B is not None else x2,
        bias if bias is not None else x2, y, ws, cnt, m, n, k, k * bits // 32, scales.shape[1], r, k_split,
        k_split // units(bits)[0] * units(bits)[1],
        x2.stride(0), xa.stride(0) if xa is not None else 0, y.stride(0), G=group, BITS=bits, FMT=fmt,
        HAS_Z=offsets is not None, HAS_CORR=B is not None, HAS_BIAS=bias is not None, BM=bm, BK=bk, WN=wn,
        RN=rn, SPLIT=split, RP=max(16, next_pow2(max(r, 1))), L4=L4, LX3=LX3, MMA=MMA,
        XPRE=cfg.get("XPRE", bm <= 32), PDL=pdl, launch_pdl=pdl, num_warps=wn, **dec, **extra)  # fmt: skip
    return y
