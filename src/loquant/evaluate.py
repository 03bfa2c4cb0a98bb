"""Perplexity, one protocol: token level, non-overlapping windows, exp(mean NLL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True) -> dict:
    """exp of the mean next-token NLL over every scored token of every window.

    Each window of L tokens is an independent sequence scoring L - 1 predictions; `tokens` is
    the number of scored predictions.
    """
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += targets.numel()
    mean = total_nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}
