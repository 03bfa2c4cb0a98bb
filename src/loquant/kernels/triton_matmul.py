"""Fused dequantize-matmul in Triton for loquant's packed layout (2- and 4-bit codes).

y = x · deq(W)ᵀ, x (M x K) bf16/fp16, W (N x K) as stored: codes row-major, 8/bits codes per
byte, lowest bits first (formats/bitpack.py), per-group fp16 scales (and offsets for `int`).
Each program owns a BLOCK_N slice of outputs and walks K: it loads BLOCK_K/CODES bytes per row,
splits them into CODES code planes (plane c holds columns k0 + CODES·j + c), dequantizes each
plane with its group's scale and multiplies it with the matching strided columns of x on the
tensor cores. No float copy of W is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FORMAT_IDS = {"int": 0, "int-sym": 1, "nf": 2}


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (64, 128)
        for bk in (128, 256)
        for w in (4, 8)
        for s in (3,)
    ],
    key=["N", "K", "BLOCK_M", "BITS", "FMT"],
)
@triton.jit
def _dq_matmul(x_ptr, q_ptr, s_ptr, z_ptr, book_ptr, y_ptr, M, N, K, G, NG, stride_xm, stride_ym,
               BITS: tl.constexpr, FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    CODES: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = BLOCK_K // CODES
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BYTES)
    mask_m, mask_n = rm < M, rn < N
    row_bytes = K // CODES
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kj = k0 + rj * CODES  # first column of each byte
        mask_k = kj < K
        packed = tl.load(q_ptr + rn[:, None] * row_bytes + (k0 // CODES + rj)[None, :],
                         mask=mask_n[:, None] & mask_k[None, :], other=0)  # fmt: skip
        g = kj // G
        scale = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        scale = scale.to(tl.float32)
        if FMT == 0:
            offset = tl.load(z_ptr + rn[:, None] * NG + g[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            offset = offset.to(tl.float32)
        for c in tl.static_range(CODES):
            code = (packed >> (BITS * c)) & ((1 << BITS) - 1)
            if FMT == 0:
                w = code.to(tl.float32) * scale + offset
            elif FMT == 1:
                w = (code.to(tl.float32) - (1 << (BITS - 1))) * scale
            else:
                w = tl.load(book_ptr + code.to(tl.int32)) * scale
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + (kj + c)[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)  # fmt: skip
            acc += tl.dot(xs, tl.trans(w.to(xs.dtype)))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


def dq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              book: torch.Tensor | None, fmt: str, bits: int, n: int, k: int, group: int) -> torch.Tensor:  # fmt: skip
    """x (..., K) @ deq(W)ᵀ for 2/4-bit int, int-sym or nf layers; bf16/fp16 in and out."""
    if bits not in (2, 4) or k % (8 // bits) or k % group:
        raise ValueError(f"no Triton kernel for {bits}-bit codes with K={k}, group {group}")
    shape = x.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    dummy = scales
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
    _dq_matmul[grid](x2, qweight, scales, offsets if offsets is not None else dummy,
                     book if book is not None else dummy, y, m, n, k, group, scales.shape[1], x2.stride(0),
                     y.stride(0), BITS=bits, FMT=FORMAT_IDS[fmt], BLOCK_M=block_m)  # fmt: skip
    return y.reshape(*shape[:-1], n)
