"""Launchers for the Triton kernels and their torch.library registration (CUDA only).

Importing this module imports triton; loquant.kernels imports it only for CUDA inputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from loquant.kernels import cdiv, gluon_dequant, gluon_gemv, gluon_mma, gluon_wgmma, next_pow2, split_k, units
from loquant.kernels.triton_qmm import _gemm_kernel

GEMV, GEMM, DEQUANT, MMA, WGMMA = 1, 2, 3, 4, 5
# Path by M, from the H100 measurements in BENCHMARKS.md: the Gluon GEMV up to GEMV_MAX_M
# rows; on Hopper the Gluon wgmma kernel from WGMMA_MIN_M rows where its tiles fill the GPU
# (gluon_wgmma.fills), up to WGMMA_MAX_M rows for int / int-sym at 2 and 4 bits and nf4 (the
# 16-bit pair decodes, gluon_wgmma.pair_decode) and WGMMA_MAX_M_FP32 for nf2, nf3 and 3 bits
# (decoded through fp32 there): above those, dequantize + cuBLAS won (11008 x 4096: INT4 at M =
# 1024 176 against 193 µs; NF4 at M = 768 128 against 137 since its pair decode); the Gluon
# mma.sync kernel up to MMA_MAX_M (where K is whole 128-code steps; before Hopper it beat
# dequantize + cuBLAS up to M = 64); the plain-Triton fused tensor-core kernel for int /
# int-sym up to GEMM_MAX_M where neither can run; above, the weight is dequantized into a
# temporary 16-bit matrix that cuBLAS multiplies.
GEMV_MAX_M = 2
MMA_MAX_M = gluon_mma.MAX_M
WGMMA_MIN_M = 33
WGMMA_MAX_M = 768
WGMMA_MAX_M_FP32 = 256
GEMV_FALLBACK_M = 8  # where the mma kernel cannot run, the GEMV still beat the fused GEMM to M = 8
GEMM_MAX_M = 16
DEQUANT_CHUNK_ROWS = 2048
DEQUANT_CHUNK_MIN_M = 2048
# For tests and the benchmark: {"gemv": gluon_gemv config keys, "mma": {...}, "wgmma": {...}, "gemm": {...},
# "dequant": {"rows": ..., "min_m": ...}}.
OVERRIDE: dict[str, dict] = {}


@functools.cache
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _units(bits: int, k: int) -> tuple[int, int, int]:
    """(codes per unit, units per row, int32 words per row)."""
    cpu = units(bits)[0]
    return cpu, k // cpu, k * bits // 32


def gemm_config(m: int, bits: int, n: int, k: int) -> dict:
    """Block shapes; BK = codes per K step (J = BK / codes per unit)."""
    if m <= 16:
        cfg = {"BM": 16, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 2}
    elif m <= 64:
        cfg = {"BM": 64 if m > 32 else 32, "BN": 64, "BK": 256, "num_warps": 4, "num_stages": 2}
    else:
        cfg = {"BM": 128, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 2}
    cfg.update(OVERRIDE.get("gemm", {}))
    if "J" not in cfg:
        cfg["J"] = max(1, cfg["BK"] // _units(bits, k)[0])
    cfg.pop("BK", None)
    return cfg


def _common(x2, qweight, scales, offsets, book, bits, fmt, k):
    q = qweight.view(torch.int32)
    cpu, ku, rw = _units(bits, k)
    has_z = offsets is not None
    z = offsets if has_z else scales
    bk = book if book is not None else scales
    return q, z, bk, ku, rw, has_z


def _run_gemv(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group):
    cfg = gluon_gemv.gemv_config(x2.shape[0], bits, k, group) | OVERRIDE.get("gemv", {})
    return gluon_gemv.gemv(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group, cfg)


def _run_gemm(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group):
    m = x2.shape[0]
    q, z, bk, ku, rw, has_z = _common(x2, qweight, scales, offsets, book, bits, fmt, k)
    xa = None if A is None else F.linear(x2, A)
    cfg = dict(gemm_config(m, bits, n, k))
    bm, bn, j = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("J")
    tiles = cdiv(m, bm) * cdiv(n, bn)
    # about 2 programs per SM, at least 4 steps of J units per split
    split = cfg.pop("SPLIT_K", None) or split_k(tiles, ku // j, _num_sms(x2.device.index or 0), 2, 4)
    per_split = cdiv(cdiv(ku, split), j) * j
    split = cdiv(ku, per_split)
    y = torch.zeros(m, n, device=x2.device, dtype=torch.float32) if split > 1 else x2.new_empty(m, n)
    r = B.shape[1] if B is not None else 0
    _gemm_kernel[(tiles, split)](
        x2, q, scales, z, bk, xa if xa is not None else x2, B if B is not None else x2,
        bias if bias is not None else x2, y, m, n, ku, rw, scales.shape[1], r, per_split,
        x2.stride(0), xa.stride(0) if xa is not None else 0, y.stride(0), G=group,
        BITS=bits, FMT=fmt, HAS_Z=has_z, HAS_CORR=B is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn,
        J=j, RP=max(16, next_pow2(max(r, 1))), SPLIT_K=split, GROUP_M=8, **cfg)  # fmt: skip
    return y if split == 1 else y.to(x2.dtype)


def _run_mma(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group):
    cfg = gluon_mma.mma_config(x2.shape[0], bits, n, k, group) | OVERRIDE.get("mma", {})
    return gluon_mma.mma(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group, cfg,
                         _num_sms(x2.device.index or 0))  # fmt: skip


def _run_wgmma(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group):
    if not gluon_wgmma.supported(x2.device):
        raise ValueError("the wgmma kernel needs a Hopper GPU (compute capability 9.x)")
    sms = _num_sms(x2.device.index or 0)
    cfg = gluon_wgmma.wgmma_config(x2.shape[0], n, sms) | OVERRIDE.get("wgmma", {})
    return gluon_wgmma.wgmma(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group, cfg)


def dequant_chunks(m: int, n: int) -> list[tuple[int, int]]:
    """Row ranges of W that _run_dequant dequantizes and multiplies one at a time: about
    DEQUANT_CHUNK_ROWS rows (a multiple of 64) once M >= DEQUANT_CHUNK_MIN_M, else all of W.
    A 2048-row chunk of 16-bit W (16 MB at K = 4096) is read by cuBLAS while still in the
    50 MB L2, so the temporary W is not written to DRAM and read back: 1-5 % faster at M =
    2048 and 4096 on the H100 (BENCHMARKS.md), and the temporary is a chunk, not all of W.
    Below M = 2048 the chunks' GEMMs have too few tiles to fill the GPU."""
    cfg = {"rows": DEQUANT_CHUNK_ROWS, "min_m": DEQUANT_CHUNK_MIN_M} | OVERRIDE.get("dequant", {})
    if m < cfg["min_m"]:
        return [(0, n)]
    parts = max(1, round(n / cfg["rows"]))
    rows = -(-n // parts // 64) * 64
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def _run_dequant(x2, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group):
    """deq(W) into a temporary matrix that cuBLAS multiplies, a chunk of rows at a time
    (dequant_chunks), each chunk's GEMM writing its columns of y in place (cuBLAS takes y's row
    stride as the output's leading dimension). A correction adds xa · B[rows]ᵀ onto the same
    columns right after (beta = 1), while they are still in L2: faster on the H100 than one
    GEMM with K grown by the rank, which had to copy x into [x | x·Aᵀ] (BENCHMARKS.md)."""
    m = x2.shape[0]
    xa = F.linear(x2, A) if B is not None else None
    chunks = dequant_chunks(m, n)
    w = x2.new_empty(max(b - a for a, b in chunks), k)
    y = x2.new_empty(m, n)
    rb = k * bits // 8  # packed bytes per row
    for a, b in chunks:
        wc = w[: b - a]
        z = offsets[a:b] if offsets is not None else None
        gluon_dequant.dequantize(qweight[a * rb : b * rb], scales[a:b], z, book, bits, fmt, b - a, k, group, wc)
        yc = y[:, a:b]
        if bias is None:
            torch.mm(x2, wc.t(), out=yc)
        else:
            torch.addmm(bias[a:b], x2, wc.t(), out=yc)
        if xa is not None:
            yc.addmm_(xa, B[a:b].t())
    return y


def pick_path(m: int, fmt: int, bits: int, k: int, group: int, n: int = 0, wgmma_sms: int = 0) -> int:
    """wgmma_sms: the GPU's SM count where the wgmma kernel can run (Hopper), else 0."""
    if m <= GEMV_MAX_M:
        return GEMV
    fits = gluon_mma.fits(bits, k, group)
    top = WGMMA_MAX_M if gluon_wgmma.pair_decode(bits, fmt) else WGMMA_MAX_M_FP32
    if wgmma_sms and fits and WGMMA_MIN_M <= m <= top and gluon_wgmma.fills(m, n, wgmma_sms):
        return WGMMA
    if m <= MMA_MAX_M and fits:
        return MMA
    if m <= GEMV_FALLBACK_M:
        return GEMV
    return GEMM if m <= GEMM_MAX_M and fmt != 2 else DEQUANT


def run(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    book: torch.Tensor | None,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    fmt: int,
    n: int,
    k: int,
    group: int,
    path: int = 0,
) -> torch.Tensor:
    """x (M x k, bf16/fp16, contiguous) · deq(W)ᵀ (+ (x · Aᵀ) · Bᵀ + bias) -> (M x n) in x's dtype.

    qweight: loquant's packed uint8 codes; scales / offsets (icq shifts for nf): (n x groups)
    fp16 or fp32; book: the nf code book (fp32); the correction's A (r x k) and B (n x r) in
    x's dtype; path 0 picks GEMV / wgmma / mma / fused GEMM / dequantize+cuBLAS from M, the
    shape and the GPU.
    """
    if not path:
        sms = _num_sms(x.device.index or 0) if gluon_wgmma.supported(x.device) else 0
        path = pick_path(x.shape[0], fmt, bits, k, group, n, sms)
    args = (x, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group)
    if path == GEMV:
        return _run_gemv(*args)
    if path == GEMM:
        return _run_gemm(*args)
    if path == MMA:
        return _run_mma(*args)
    if path == WGMMA:
        return _run_wgmma(*args)
    return _run_dequant(*args)


# The same function as an operator with a fake implementation, for torch.compile to trace.
# Plain eager calls skip it (loquant.kernels.through_operator): its dispatch costs host time.
qmm = torch.library.custom_op("loquant::qmm", run, mutates_args=())


@qmm.register_fake
def _(x, qweight, scales, offsets, book, A, B, bias, bits, fmt, n, k, group, path=0):
    return x.new_empty(x.shape[0], n)
