"""Small-M path: y = x · deq(W)ᵀ as an FMA reduction (no tensor cores), 4-bit codes.

Each program owns BLOCK_N output rows and a SPLIT_K share of K. Per step it loads BLOCK_K/2
contiguous bytes of each row, splits them into low / high nibbles, interleaves them back into
column order (tl.join + reshape), applies one scale (and offset) per group by broadcasting over
a (groups, group) view, and reduces against x. Partial sums over K are added with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=3)
        for bn in (16, 32)
        for bk in (256, 512)
        for sk in (1, 2, 4)
        for w in (4,)
    ],
    key=["N", "K", "M", "G", "FMT"],
    reset_to_zero=["y_ptr"],
)
@triton.jit
def _gemv4(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G: tl.constexpr, NG, FMT: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // G
    rb = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, GROUPS)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_per = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K
    for k0 in range(pid_k * k_per, tl.minimum((pid_k + 1) * k_per, K), BLOCK_K):
        mb = mask_n[:, None] & ((k0 // 2 + rb) < K // 2)[None, :]
        b = tl.load(q_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rb)[None, :], mask=mb, other=0)
        codes = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
        g = k0 // G + rg
        mg = mask_n[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=mg, other=0.0).to(tl.float32)
        w = tl.reshape(codes, (BLOCK_N, GROUPS, G))
        if FMT == 0:
            z = tl.load(z_ptr + rn[:, None] * NG + g[None, :], mask=mg, other=0.0).to(tl.float32)
            w = w * s[:, :, None] + z[:, :, None]
        else:
            w = (w - 8.0) * s[:, :, None]
        x = tl.load(x_ptr + m * K + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
        acc += tl.sum(tl.reshape(w, (BLOCK_N, BLOCK_K)) * x[None, :], axis=1)
    if SPLIT_K == 1:
        tl.store(y_ptr + m * N + rn, acc, mask=mask_n)
    else:
        tl.atomic_add(y_ptr + m * N + rn, acc, mask=mask_n)


def gemv4(x: torch.Tensor, qweight, scales, offsets, fmt: str, n: int, k: int, group: int) -> torch.Tensor:
    """x (M x K, M small) @ deq(W)ᵀ for 4-bit int / int-sym with K a multiple of 512 and group | 256."""
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)  # noqa: E731
    _gemv4[grid](x2, qweight, scales, offsets if offsets is not None else scales, y, m, n, k, group,
                 scales.shape[1], FMT=0 if fmt == "int" else 1)  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
