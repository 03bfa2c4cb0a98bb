"""Best rank-r approximations, split into the two 16-bit factors a QuantLinear stores."""

from __future__ import annotations

import torch

from loquant.errors import LoquantError

FP16_MAX = torch.finfo(torch.float16).max
# Above this size (min dimension) and for ranks well below it, a randomized SVD with
# oversampling and power iterations is as accurate as the full one and many times faster.
RANDOMIZED_MIN_DIM = 2048


def svd_r(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B·A = SVD_r(M): B = U√S (out x r), A = √S Vᵀ (r x in)."""
    if rank > min(M.shape):
        raise LoquantError(f"rank {rank} exceeds min(out, in) = {min(M.shape)}")
    if min(M.shape) >= RANDOMIZED_MIN_DIM and rank <= min(M.shape) // 8:
        with torch.random.fork_rng(devices=[M.device] if M.is_cuda else []):
            torch.manual_seed(0)  # deterministic
            U, S, V = torch.svd_lowrank(M, q=rank + 32, niter=6)
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def balance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 term so its two factors have equal norms (same product, safer fp16)."""
    nb, na = B.norm(dim=0), A.norm(dim=1)
    g = torch.where((nb > 0) & (na > 0), (na / nb.clamp_min(1e-300)).sqrt(), torch.ones_like(nb))
    return B * g, A / g[:, None]


def check_fp16(B: torch.Tensor, A: torch.Tensor) -> None:
    peak = max(B.abs().max().item(), A.abs().max().item()) if B.numel() else 0.0
    if not peak < FP16_MAX:
        raise LoquantError(f"the correction's factors reach {peak:.3g}, beyond float16: raise --damping")
