"""xa = x · Aᵀ for the low-rank correction of the GEMV and the mma kernel (CUDA only).

Those kernels add xa · B[rows]ᵀ in their epilogue, so xa must exist before any of their
tiles finishes. A cuBLAS call before the main launch cost about 8.5 µs at M = 1 on the H100
(+59 % on an 11008 x 4096 INT4 layer), and computing xa inside the main launch (atomics and
a spin-wait) was slower still (BENCHMARKS.md). Here xa comes from this small kernel (about
2 µs at M = 1), and on Hopper and later it is the primary of a programmatic dependent launch:
it lets the next kernel start as soon as its own programs run
(griddepcontrol.launch_dependents), and the main kernel waits (griddepcontrol.wait,
`wait_primary`) only before it reads xa. Measured, that hides part of the pair's cost (+22 %
against +33 % launched plainly, INT4 at M = 1): the main kernel's first tiles then wait in
their slots. It is itself launched as a dependent of whatever kernel ran before (which may
still be writing x): it waits for that one before anything else, so its launch overlaps the
other's end. Before Hopper the two kernels run one after the other.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from loquant.kernels import cdiv, next_pow2


@triton.jit
def _xa_kernel(x_ptr, a_ptr, xa_ptr, M, K, stride_xm, stride_am, stride_om, MB: tl.constexpr, BK: tl.constexpr,
               PDL: tl.constexpr):  # fmt: skip
    """One rank row of A per program, MB x rows: xa[rows, r] = Σ_k x[rows, k] · A[r, k]."""
    if PDL:
        # launched as a dependent of the kernel before it (which may still be writing x):
        # wait for it, then let the main kernel (which reads x at once) start
        gdc_wait()
        gdc_launch_dependents()
    r = tl.program_id(0)
    rm = tl.program_id(1) * MB + tl.arange(0, MB)
    rk = tl.arange(0, BK)
    acc = tl.zeros([MB], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                     other=0.0)  # fmt: skip
        av = tl.load(a_ptr + r * stride_am + kk, mask=kk < K, other=0.0)
        acc += tl.sum(xv.to(tl.float32) * av.to(tl.float32)[None, :], axis=1)
    tl.store(xa_ptr + rm * stride_om + r, acc.to(xa_ptr.dtype.element_ty), mask=rm < M)


@gluon.jit
def wait_primary():
    """griddepcontrol.wait: block until the primary grid (the x·Aᵀ kernel) has finished and
    its writes are visible. Only emitted when the kernel was launched with PDL."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@functools.cache
def pdl_supported(device: int) -> bool:
    """Programmatic dependent launch needs sm_90 or later."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def xa(x2: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Launch x2 (M x k) · Aᵀ (A: r x k, x's dtype) -> (xa (M x r), pdl). With pdl true the
    kernel launched next on this stream must be launched with launch_pdl=True and call
    wait_primary before it reads xa (and nothing may be launched in between)."""
    m, k = x2.shape
    r = A.shape[0]
    A = A if A.stride(1) == 1 else A.contiguous()
    out = x2.new_empty(m, r)
    mb = min(next_pow2(m), 2)  # more programs, short ones: the main kernel's CTAs wait for slots
    bk = min(next_pow2(k), 4096 // mb)  # 32 products per thread and step
    pdl = pdl_supported(x2.device.index or 0)
    _xa_kernel[(r, cdiv(m, mb))](x2, A, out, m, k, x2.stride(0), A.stride(0), out.stride(0), MB=mb, BK=bk,
                                 PDL=pdl, launch_pdl=pdl, num_warps=4)  # fmt: skip
    return out, pdl
