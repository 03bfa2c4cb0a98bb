"""NormalFloat code books (QLoRA): quantiles of N(0, 1) normalized to [-1, 1], exact zero."""

from __future__ import annotations

import functools

import torch


@functools.cache
def nf_codebook(bits: int) -> torch.Tensor:
    """The 2**bits NF values in ascending order, float32.

    bitsandbytes' `create_normal_map`, generalized from 4 bits: 2**(b-1) positive quantiles,
    2**(b-1) - 1 negative ones and an exact zero, the outermost probability being the midpoint
    of 1 - 1/(2(2^b - 1)) and 1 - 1/(2 * 2^b) (0.9677083 for NF4). For b = 4 this reproduces
    QLoRA's published 16 values to float32 precision.
    """
    n = 1 << bits
    # bitsandbytes writes this probability rounded to 7 decimals (0.9677083); so do we.
    offset = round(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))), 7)
    half = n // 2
    # bitsandbytes builds the grid in float32 and normalizes in float32: doing the same keeps
    # NF4 bit-exact.
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()


def nf_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest code for values already scaled to [-1, 1]."""
    book = nf_codebook(bits).to(x.device)
    midpoints = (book[1:] + book[:-1]) / 2
    return torch.bucketize(x.float().contiguous(), midpoints).to(torch.uint8)
