"""ICQ, IR-QLoRA's information calibration quantization: a per-group shift τ before NF.

Each group stores w ≈ τ + scale · book[code]. τ starts at the group's median τ0 and moves
along a grid, τ = τ0 + f · absmax(w - τ0) with f ∈ linspace(-λσ, λσ, 2n + 1) (λ = 0.1,
n = 100); for each candidate, w - τ is quantized with NF absmax scaling (scale =
absmax(w - τ)) and the τ whose 2^b codes have the largest Shannon entropy in the group wins
(ties: the one closest to τ0).

σ is a constant, as in the official code (github.com/htqin/IR-QLoRA, utils.py:
`sigma = 1 / norm.ppf(0.9677083)` ≈ 0.5411): the standard deviation of the NF4-normalized
normal distribution, i.e. roughly the group's standard deviation in units of its absmax. f
multiplies the absmax, so it must be unitless; the group's own std in weight units would
make τ scale with the square of the weights. The official code uses the NF4 value at every
width, so do we.
"""

from __future__ import annotations

import math

import torch

from loquant.formats.normalfloat import nf_codebook

ICQ_LAMBDA = 0.1
ICQ_STEPS = 100
ICQ_SIGMA = 1 / float(torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64)))


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of histograms along the last dim (float64; empty -> 0)."""
    counts = counts.double()
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return -torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p)).sum(-1)


def code_entropy(codes: torch.Tensor, bits: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (bits, float64) of the histogram of the 2**bits codes along the last dim.

    codes: (..., group) integers in [0, 2**bits). valid: a bool mask broadcastable to codes;
    masked-out entries (a short group's padding) are not counted. Returns shape codes.shape[:-1].
    """
    k = 1 << bits
    flat = codes.reshape(-1, codes.shape[-1]).long()
    rows = flat.shape[0]
    if valid is None:
        weights = torch.ones(flat.shape, dtype=torch.float64, device=flat.device)
    else:
        weights = valid.expand(codes.shape).reshape(flat.shape).double()
    index = flat + k * torch.arange(rows, device=flat.device)[:, None]
    counts = torch.bincount(index.reshape(-1), weights=weights.reshape(-1), minlength=rows * k)
    return _entropy(counts.view(rows, k)).view(codes.shape[:-1])


def grid_factors(lam: float = ICQ_LAMBDA, steps: int = ICQ_STEPS, sigma: float = ICQ_SIGMA) -> torch.Tensor:
    """The candidate factors f: linspace(-λσ, λσ, 2·steps + 1), float64, ascending, with an
    exact 0 in the middle and exactly symmetric (torch.linspace gives 2.6e-18 there)."""
    return torch.arange(-steps, steps + 1, dtype=torch.float64) * (lam * sigma / steps)


def search_shift(
    w_grouped: torch.Tensor,
    bits: int,
    valid: torch.Tensor | None = None,
    *,
    lam: float = ICQ_LAMBDA,
    steps: int = ICQ_STEPS,
    sigma: float = ICQ_SIGMA,
    chunk: int = 1024,
) -> torch.Tensor:
    """The entropy-maximizing shift τ of each group of w_grouped (..., group): float32, shape (...).

    valid: bool mask broadcastable to w_grouped, False on padding, which then enters neither
    the median, nor the absmax, nor the histogram.

    All 2·steps + 1 candidates of `chunk` groups are scored at once, without quantizing a
    weight per candidate. A weight gets a code above k iff (w - τ)/scale > m_k (m_k: the
    midpoints between NF values, as `nf_quantize` decides), i.e. iff w > t_k = τ + m_k · scale.
    With u = τ - mid-range and h = half the range, scale = absmax(w - τ) = h + |u|, so
    t_k = mid + m_k·h + u·(1 ± m_k): increasing in u, hence in f. Each sorted group is counted
    below each t_k at the first and last candidate (binary search); the few weights in
    between each cross t_k at one candidate, found by inverting t_k, and a cumulative sum over
    those crossings gives #{w ≤ t_k} at every candidate. The histogram, and so the entropy,
    follows (the same counts as quantizing, up to float rounding exactly at a threshold).
    """
    shape = w_grouped.shape
    group = shape[-1]
    x = w_grouped.detach().float().reshape(-1, group)
    if valid is None:
        n_valid = torch.full((x.shape[0],), group, dtype=torch.long, device=x.device)
    else:
        mask = valid.expand(shape).reshape(-1, group)
        x = torch.where(mask, x, torch.full_like(x, math.inf))  # sorts last, below no threshold
        n_valid = mask.sum(-1)
    book = nf_codebook(bits).to(x.device).double()
    mids = (book[1:] + book[:-1]) / 2  # (K - 1,)
    f = grid_factors(lam, steps, sigma).to(x.device)
    delta, n_cand = lam * sigma / steps, f.numel()
    # candidates nearest τ0 first (0, -δ, +δ, -2δ, ...): the first maximum is the nearest one
    order = torch.tensor([steps + d for i in range(1, steps + 1) for d in (-i, i)], device=x.device)
    order = torch.cat([torch.tensor([steps], device=x.device), order])
    # c·log2(c) for every possible count: Σ_k c_k log2 c_k = n·(log2 n - entropy) for a group of
    # n weights, so the smallest sum is the largest entropy (exact float64 terms).
    clogc = torch.arange(group + 1, dtype=torch.float64, device=x.device)
    clogc = clogc * torch.log2(clogc.clamp_min(1))
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        s = x[start : start + chunk].sort(-1).values
        n = n_valid[start : start + chunk].clamp_min(1)
        rows = len(s)
        sd = s.double()
        lo = sd[:, 0]
        hi = sd.gather(1, (n - 1)[:, None]).squeeze(1)
        tau0 = sd.gather(1, ((n - 1) // 2)[:, None]).squeeze(1)  # the lower median, as torch.median
        absmax0 = torch.maximum(hi - tau0, tau0 - lo)
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        base = (mid[:, None] + mids[None] * half[:, None])[:, :, None]  # t_k at u = 0, (rows, K-1, 1)

        # #{w ≤ t_k} at the first and at the last candidate
        u = (tau0 - mid)[:, None, None] + f[[0, -1]] * absmax0[:, None, None]
        t = base + u * (1 + torch.where(u >= 0, 1.0, -1.0) * mids[None, :, None])  # (rows, K-1, 2)
        ends = torch.searchsorted(sd, t.flatten(1), right=True).view(rows, -1, 2)
        first, width = ends[..., 0], ends[..., 1] - ends[..., 0]
        # the weights in between, each crossing t_k at one candidate: the first with w ≤ t_k
        span = int(width.max()) if width.numel() else 0
        j = torch.arange(span, device=x.device)
        inside = j < width[..., None]  # (rows, K-1, span)
        idx = (first[..., None] + j).clamp_max(group - 1)
        w = sd.gather(1, idx.flatten(1)).view(idx.shape)
        r = w - base  # t_k = base + u·(1 ± m_k): solve for u, then for f
        slope = 1 + torch.where(r >= 0, 1.0, -1.0) * mids[None, :, None]
        u_star = r / slope
        f_star = (u_star - (tau0 - mid)[:, None, None]) / absmax0.clamp_min(1e-300)[:, None, None]
        cross = torch.ceil(f_star / delta - 1e-9 + steps).clamp(1, n_cand - 1)  # the first candidate counting w
        cross = torch.where(inside, cross, torch.full_like(cross, n_cand)).long()  # n_cand: not a crossing
        events = torch.zeros(rows, len(mids), n_cand + 1, dtype=torch.int32, device=x.device)
        events.scatter_add_(2, cross, torch.ones_like(cross, dtype=torch.int32))
        below = events.cumsum(2, dtype=torch.int32)[..., :n_cand].add_(first.int()[..., None])  # (rows, K-1, n_cand)
        counts = torch.empty(rows, len(mids) + 1, n_cand, dtype=torch.int32, device=x.device)
        counts[:, 0] = below[:, 0]
        torch.sub(below[:, 1:], below[:, :-1], out=counts[:, 1:-1])
        torch.sub(n[:, None], below[:, -1], out=counts[:, -1])
        cost = clogc.index_select(0, counts.view(-1)).view(counts.shape).sum(1)[:, order]  # (rows, by |f|)
        # the first (nearest τ0) of the candidates within float noise of the lowest cost
        pick = (cost <= cost.min(1, keepdim=True).values + 1e-9).int().argmax(1)
        best_f = f[order[pick]]
        out[start : start + chunk] = (tau0 + best_f * absmax0).float()
    return out.view(shape[:-1])
