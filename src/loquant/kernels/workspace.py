"""One zeroed fp32 workspace per device for the split-K kernels, which leave it zeroed.

The mma kernel splits K over CTAs at small M: each CTA adds its partial sums into a fp32
workspace with atomics, and the last CTA of a tile (a per-tile ticket) reads the sums back.
A fresh workspace per call needs a memset launch: without it a call takes 1.0-1.5 µs less
on the H100 (17-20 µs at M = 3-16 on 11008 x 4096; BENCHMARKS.md). Instead the last CTA
writes zeros back over the sums it read and resets its ticket, so the workspace is zero
again when the call ends, and the next call (any shape) finds it ready.

That holds while calls using it run one after another. Eager calls from a second stream are
ordered after the first stream's (wait_stream). Inside CUDA-graph capture nothing is
allocated or awaited: a graph uses the buffer that exists (a graph's own zeroed one if none
is large enough), so graphs that share the device buffer must not be replayed concurrently
with each other or with eager calls on another stream. Buffers are never freed once a
graph may hold their address: a larger one replaces the buffer, the old one stays alive.
"""

from __future__ import annotations

import torch

_BUF: dict[int, torch.Tensor] = {}
_OLD: list[torch.Tensor] = []  # replaced buffers: a captured graph may still use them
_STREAM: dict[int, torch.cuda.Stream] = {}


def zeroed(numel: int, device: torch.device, reserve: int = 0) -> torch.Tensor:
    """numel fp32 zeros on device, for a kernel that leaves them zero. A new buffer holds at
    least reserve elements (the layer's largest call), so later calls do not grow it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _BUF.get(index)
    if torch.cuda.is_current_stream_capturing():
        if buf is None or buf.numel() < numel:  # the graph zeroes its own on every replay
            return torch.zeros(numel, device=device, dtype=torch.float32)
        return buf[:numel]
    stream = torch.cuda.current_stream(device)
    last = _STREAM.get(index)
    if last is not None and last != stream:
        stream.wait_stream(last)  # the previous stream's calls finish with the buffer first
    _STREAM[index] = stream
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _OLD.append(buf)
        buf = _BUF[index] = torch.zeros(max(numel, reserve), device=device, dtype=torch.float32)
    return buf[:numel]
