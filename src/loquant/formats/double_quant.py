"""Double quantization (QLoRA): per-group parameters stored as int8 in blocks of 256.

The parameters are centred on their mean (float32), then each block of 256 is scaled by its
float32 absmax to [-127, 127]. Cost per group: 8 bits plus 32/256 bits, plus 32 bits per tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DQ_BLOCK = 256


def dq_num_blocks(numel: int) -> int:
    return -(-numel // DQ_BLOCK)


def dq_quantize(p: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = p.reshape(-1).float()
    mean = flat.mean().reshape(1)
    centred = F.pad(flat - mean, (0, -flat.numel() % DQ_BLOCK)).view(-1, DQ_BLOCK)
    absmax = centred.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.round(centred / safe[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(-1)[: flat.numel()].view(p.shape), "absmax": absmax, "mean": mean}


def dq_dequantize(q: torch.Tensor, absmax: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    flat = q.reshape(-1).float()
    padded = F.pad(flat, (0, -flat.numel() % DQ_BLOCK)).view(-1, DQ_BLOCK)
    values = padded * (absmax.float()[:, None] / 127) + mean.float()
    return values.reshape(-1)[: flat.numel()].view(q.shape)
