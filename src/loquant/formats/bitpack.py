"""Dense bit packing of integer codes: b bits per code, no padding between codes.

Layout (the contract for kernels and files): the codes are taken in row-major order, split
into runs of 8 codes, and each run is stored as `b` bytes holding the little-endian integer
`sum(code_i << (b * i))`. The last run is padded with zero codes, so a tensor of N codes takes
`ceil(N / 8) * b` bytes: exactly N*b/8 whenever N is a multiple of 8 (every real layer).
"""

from __future__ import annotations

import torch

from loquant.errors import LoquantError


def packed_nbytes(numel: int, bits: int) -> int:
    return numel if bits == 8 else -(-numel // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise LoquantError(f"cannot pack {bits}-bit codes: bits must be in 1..8")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise LoquantError(f"codes out of range for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    pad = -flat.numel() % 8
    runs = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (runs << shifts).sum(dim=1, keepdim=True)  # at most 56 bits: fits int64
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes as a flat uint8 tensor."""
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise LoquantError(f"packed tensor has {packed.numel()} bytes, {numel} {bits}-bit codes need {expected}")
    if bits == 8:
        return packed.reshape(-1)
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 2 and 4 bits: codes never straddle a byte, shift bytes directly
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.view(-1, 1) >> shifts) & mask
        return codes.reshape(-1)[:numel]
    runs = packed.view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (runs << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((word >> shifts) & mask).to(torch.uint8).reshape(-1)[:numel]
