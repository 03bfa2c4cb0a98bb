"""Best rank-r approximations, split into the two 16-bit factors a QuantLinear stores."""

from __future__ import annotations

import torch

from loquant.errors import LoquantError

FP16_MAX = torch.finfo(torch.float16).max
# Above this size (min dimension) and for ranks well below it, a randomized SVD with
# oversampling and power iterations is as accurate as the full one and many times faster.
RANDOMIZED_MIN_DIM = 2048


def svd_r(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B·A = SVD_r(M): B = U√S (out x r), A = √S Vᵀ (r x in).

    Small matrices: the top-r eigenpairs of the smaller Gram matrix in float64 (3-6x faster
    than a full SVD on CPU and GPU, and exact to float64 round-off for the leading directions
    a rank-r correction keeps). Large ones at low rank: a randomized SVD with oversampling and
    power iterations.
    """
    if rank > min(M.shape):
        raise LoquantError(f"rank {rank} exceeds min(out, in) = {min(M.shape)}")
    M = M.double()
    if min(M.shape) >= RANDOMIZED_MIN_DIM and rank <= min(M.shape) // 8:
        with torch.random.fork_rng(devices=[M.device] if M.is_cuda else []):
            torch.manual_seed(0)  # deterministic
            U, S, V = torch.svd_lowrank(M, q=rank + 32, niter=6)
        root = S[:rank].sqrt()
        return U[:, :rank] * root, root[:, None] * V[:, :rank].T
    wide = M.shape[1] > M.shape[0]
    G = M @ M.T if wide else M.T @ M  # (min x min)
    lam, vecs = torch.linalg.eigh(G)
    lam, vecs = lam.flip(0)[:rank].clamp_min(0), vecs.flip(1)[:, :rank]
    sigma = lam.sqrt()
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    other = (M.T @ vecs if wide else M @ vecs) / safe  # the other singular vectors, unit norm
    root = sigma.sqrt()
    if wide:  # vecs are left singular vectors U, other are V
        return vecs * root, (other * root).T
    return other * root, (vecs * root).T


def balance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 term so its two factors have equal norms (same product, safer fp16)."""
    nb, na = B.norm(dim=0), A.norm(dim=1)
    g = torch.where((nb > 0) & (na > 0), (na / nb.clamp_min(1e-300)).sqrt(), torch.ones_like(nb))
    return B * g, A / g[:, None]


def check_fp16(B: torch.Tensor, A: torch.Tensor) -> None:
    peak = max(B.abs().max().item(), A.abs().max().item()) if B.numel() else 0.0
    if not peak < FP16_MAX:
        raise LoquantError(f"the correction's factors reach {peak:.3g}, beyond float16: raise --damping")
