"""QWHA: a sparse weight update in the Walsh-Hadamard domain, ΔW = F·H.

H is the orthonormal Walsh-Hadamard matrix (in x in; symmetric, H·H = I) and F a sparse
(out x in) coefficient matrix with P nonzeros at fixed positions (rows, cols); only their
values train. The forward is Δy = x·ΔWᵀ = (x·H)·Fᵀ = fwht(x)·Fᵀ, with the fast transform
costing O(in·log in) per token.

Sizes that are not a power of two. H_n exists (in Sylvester form) only for n = 2^m, so for
n = K·2^m, 2^m the largest power of two dividing n, the transform is block-diagonal:
H = I_K ⊗ H_{2^m}, which is still orthonormal and symmetric. E.g. 576 = 9·64 gives nine
independent 64-point transforms, 1536 = 3·512 three 512-point ones. A basis vector then
mixes only the 2^m inputs of its block, so the smaller the power of two in n, the more
local (less "spread out") the adapter's coefficients are; for odd n the transform
degenerates to the identity, i.e. sparse coefficients directly in the weight domain
(a plain sparse adapter). `block` may cap the block size at a smaller power of two.

`qwha_init` initializes (rows, cols, values) from the quantization error E = W - deq(W) and
the input second moment R = E[x xᵀ] (QWHA's AdaAlloc + value refinement):

    adapter = WHTAdapter(in_features, out_features, *qwha_init(E, R, params))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loquant.errors import LoquantError


def wht_block(n: int) -> int:
    """Largest power of two dividing n: the block size of the transform for an n-wide input."""
    if n < 1:
        raise LoquantError(f"the transform size must be positive, got {n}")
    return n & -n


def _check_block(n: int, block: int | None) -> int:
    if block is None:
        return wht_block(n)
    if block < 1 or block & (block - 1) or n % block:
        raise LoquantError(f"the WHT block {block} must be a power of two dividing {n}")
    return block


def fwht(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dim, x·(I_K ⊗ H_block).

    Differentiable, any leading dims, computed in x's dtype. `block` (a power of two dividing
    the size) defaults to the largest possible, wht_block(n); block 1 is the identity and
    returns x itself. The butterflies are unnormalized (exact sums); the 1/sqrt(block) scale
    is applied as an exact x0.5 after every second stage (plus one 1/sqrt 2 at the end for
    an odd number of stages), so bf16/fp16 intermediates stay within 2x of the output's
    range instead of growing by up to sqrt(block).
    """
    n = x.shape[-1]
    block = _check_block(n, block)
    lead = x.shape[:-1]
    h, stage = 1, 0
    while h < block:
        # Pairs (j, j + h) inside groups of 2h: groups never straddle a block since 2h | block.
        v = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        stage += 1
        if stage % 2 == 0:
            x = x * 0.5
        h *= 2
    if stage % 2:
        x = x * (1 / math.sqrt(2))
    return x


class WHTAdapter(nn.Module):
    """Δy = fwht(x)·Fᵀ with F (out x in) sparse: `values` at fixed (`rows`, `cols`).

    rows/cols are buffers (int64 or int32, kept as given), values an fp32 parameter. The
    computation runs in `dtype` if given, else in the autocast dtype under autocast, else in
    x's dtype; the result has x's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rows: torch.Tensor,
        cols: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        block: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = _check_block(in_features, block)
        self.dtype = dtype
        if rows.dtype not in (torch.int32, torch.int64) or cols.dtype not in (torch.int32, torch.int64):
            raise LoquantError(f"rows and cols must be int32 or int64, got {rows.dtype} and {cols.dtype}")
        if rows.dim() != 1 or rows.shape != cols.shape:
            raise LoquantError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must be equal-length vectors")
        if rows.numel():
            if rows.min() < 0 or rows.max() >= out_features or cols.min() < 0 or cols.max() >= in_features:
                raise LoquantError(f"coefficient positions fall outside the {out_features}x{in_features} matrix")
            if torch.unique(rows.long() * in_features + cols.long()).numel() != rows.numel():
                raise LoquantError("coefficient positions repeat")
        if values is None:
            values = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        elif values.shape != rows.shape:
            raise LoquantError(f"values {tuple(values.shape)} do not match the {rows.numel()} positions")
        self.register_buffer("rows", rows.detach().clone())
        self.register_buffer("cols", cols.detach().clone())
        self.values = nn.Parameter(values.detach().to(device=rows.device, dtype=torch.float32).clone())

    @property
    def num_params(self) -> int:
        return self.values.numel()

    def coefficients(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense F (out x in): the values scattered to their positions; differentiable in values."""
        values = self.values if dtype is None else self.values.to(dtype)
        F = values.new_zeros(self.out_features, self.in_features)
        return F.index_put((self.rows.long(), self.cols.long()), values)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = F·H (out x in; fp32 unless `dtype`). H is symmetric: row i of F·H is fwht(F row i)."""
        return fwht(self.coefficients(dtype), self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        if dtype is None:
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        # The dense scatter costs one (out x in) transient per call, as dequantizing the base
        # layer does, and lets the product run as a dense GEMM on tensor cores; a sparse
        # matmul over P ≪ out·in nonzeros would save that memory but not time on GPUs.
        F = self.coefficients(dtype)
        return (fwht(x.to(dtype), self.block) @ F.T).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"params={self.num_params}, block={self.block}"
        )


def ada_alloc(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer budgets k (int64) ∝ weights, summing exactly to `total`, each at most `cap`.

    Water-filling: rows whose proportional share exceeds cap are fixed at cap and the rest
    is shared again among the others. Rows of weight 0 get nothing unless all positive rows
    are full; the remainder is then spread evenly over them. Shares are rounded by largest
    remainder.
    """
    w = weights.detach().double().flatten()
    n = w.numel()
    if (w < 0).any() or not torch.isfinite(w).all():
        raise LoquantError("allocation weights must be finite and non-negative")
    if not 0 <= total <= n * cap:
        raise LoquantError(f"a budget of {total} does not fit {n} rows of at most {cap}")
    share = torch.zeros_like(w)
    remaining = float(total)
    for pool in (w, torch.ones_like(w)):
        active = (pool > 0) & (share == 0)
        while remaining > 0 and active.any():
            s = remaining * pool[active] / pool[active].sum()
            over = s >= cap
            idx = active.nonzero().squeeze(1)
            if not over.any():
                share[idx] = s
                remaining = 0.0
                break
            share[idx[over]] = cap
            active[idx[over]] = False
            remaining -= cap * int(over.sum())
    share = share.clamp(0, cap)
    k = share.floor()
    frac = share - k
    deficit = total - int(k.sum())
    if deficit > 0:
        k[frac.masked_fill(k >= cap, -1.0).topk(deficit).indices] += 1
    elif deficit < 0:  # floating-point excess: take it back from the smallest remainders
        k[frac.masked_fill(k <= 0, 2.0).topk(-deficit, largest=False).indices] -= 1
    return k.long().view(weights.shape)


def _damped(R: torch.Tensor, damping: float) -> torch.Tensor:
    """R with its eigenvalues clamped at damping x the largest (machine eps x the largest for
    damping <= 0), the convention of corrections.methods (qera-exact). The eigenvectors are
    only computed when the clamp changes something."""
    lam = torch.linalg.eigvalsh(R)
    if lam[-1] <= 0:
        raise LoquantError("the layer's calibration inputs are all zero")
    floor = lam[-1] * (damping if damping > 0 else torch.finfo(torch.float64).eps)
    if lam[0] >= floor:
        return R
    lam, V = torch.linalg.eigh(R)
    return (V * lam.clamp_min(floor)) @ V.T


def qwha_init(
    E: torch.Tensor,
    R: torch.Tensor | None,
    params: int,
    damping: float = 1e-8,
    *,
    block: int | None = None,
    chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QWHA's initialization: (rows, cols, values) of F with ΔW = F·H ≈ E = W - deq(W).

    1. C = E·H, the full coefficients (fwht of E's rows).
    2. AdaAlloc: row i gets k_i ∝ ‖C_i‖ (= ‖E_i‖) of the `params` coefficients (ada_alloc).
    3. Row i keeps its k_i columns j of largest C_ij²·G_jj, G = H·R·H: the output energy
       E[(x·h_j)²] the coefficient drives (G = I for R = None).
    4. The kept values are refit by least squares on the output error (e_i - f_S H_S) R (...)ᵀ:
       G_SS f_S = (G·C_iᵀ)_S, with R damped as in qera-exact (eigenvalues clamped at damping x
       the largest). With R = None (plain Frobenius) H is orthonormal and the fit is C itself.

    All in float64 on E's device; the solves run batched (Cholesky) over rows grouped by k,
    padded to the chunk's largest k, in chunks of at most `chunk_elements` matrix entries.
    Returns rows, cols (int64) and values (float32), sorted by (row, col).
    """
    if E.dim() != 2:
        raise LoquantError(f"the error must be a matrix, got shape {tuple(E.shape)}")
    out, dim = E.shape
    if not 0 <= params <= out * dim:
        raise LoquantError(f"{params} coefficients do not fit a {out}x{dim} matrix")
    block = _check_block(dim, block)
    E = E.detach().double()
    C = fwht(E, block)
    k = ada_alloc(C.norm(dim=1), params, dim)
    G = None
    if R is not None:
        if R.shape != (dim, dim):
            raise LoquantError(f"R {tuple(R.shape)} does not match the {dim}-wide input")
        R = _damped(R.detach().to(E.device, torch.float64), damping)
        G = fwht(fwht(R, block).T, block)  # H R H (R symmetric: fwht of rows gives R H)
        G = (G + G.T) / 2
    score = C.square() if G is None else C.square() * G.diagonal()
    order = score.argsort(dim=1, descending=True)
    keep = torch.arange(dim, device=E.device) < k[:, None]
    mask = torch.zeros_like(keep).scatter_(1, order, keep)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: sorted by (row, col)
    if G is None or params == 0:
        return rows, cols, C[rows, cols].float()
    # Row i's kept columns, left-aligned and zero-padded: idx[i, :k_i].
    start = torch.cumsum(k, 0) - k
    pos = torch.arange(rows.numel(), device=E.device) - start[rows]
    idx = torch.zeros(out, int(k.max()), dtype=torch.long, device=E.device)
    idx[rows, pos] = cols
    B = C @ G  # right-hand sides (G C_iᵀ)ᵀ, G symmetric
    fit = torch.zeros(idx.shape, dtype=torch.float64, device=E.device)
    by_k = torch.argsort(k, descending=True)
    by_k = by_k[k[by_k] > 0]
    i = 0
    while i < by_k.numel():
        kmax = int(k[by_k[i]])
        chunk = by_k[i : i + max(1, chunk_elements // (kmax * kmax))]
        i += chunk.numel()
        S = idx[chunk, :kmax]
        m = torch.arange(kmax, device=E.device) < k[chunk, None]
        mm = m[:, :, None] & m[:, None, :]
        eye = torch.eye(kmax, dtype=torch.float64, device=E.device)
        A = torch.where(mm, G[S[:, :, None], S[:, None, :]], eye)  # padding: identity, 0 right side
        b = torch.where(m, B[chunk[:, None], S], 0.0)
        L, info = torch.linalg.cholesky_ex(A)
        if info.any():
            f = torch.linalg.solve(A, b)
        else:
            f = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
        fit[chunk, :kmax] = f
    return rows, cols, fit[rows, pos].float()
