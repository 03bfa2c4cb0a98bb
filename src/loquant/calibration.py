"""Input statistics of linear layers, gathered with forward hooks in one streaming pass.

Per layer: R = E[x xᵀ] (in x in), E[x²], E|x| and the token count, accumulated in float64
(each batch's XᵀX is formed in float32 over at most a few thousand tokens, then added to the
float64 sum, which keeps the full relative accuracy of float32 per batch and loses nothing
over many batches). Layers that read the same input tensor (q/k/v, gate/up) share one
statistic: a hook that sees the very tensor the previous hook saw joins its group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from loquant.errors import LoquantError


@dataclass
class InputStats:
    xtx: torch.Tensor  # float64 (in x in): sum over tokens of x xᵀ
    sq: torch.Tensor  # float64 (in,): sum of x²
    abs: torch.Tensor  # float64 (in,): sum of |x|
    count: int = 0
    _eig: tuple | None = field(default=None, repr=False)

    @classmethod
    def zeros(cls, dim: int, device) -> InputStats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(dim, dim), z(dim), z(dim))

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double()
        self.sq += x.square().sum(0).double()
        self.abs += x.abs().sum(0).double()
        self.count += x.shape[0]
        self._eig = None

    @property
    def R(self) -> torch.Tensor:
        return self.xtx / self.count

    def eigh(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues ascending, eigenvectors) of R in float64, computed once per group."""
        if self._eig is None or (device is not None and self._eig[0].device != torch.device(device)):
            self._eig = torch.linalg.eigh(self.R.to(device))
        return self._eig

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq / self.count

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs / self.count


@dataclass
class Calibration:
    """Statistics per input group, and which group each layer reads from."""

    stats: dict[str, InputStats] = field(default_factory=dict)  # keyed by the group's first layer
    owner: dict[str, str] = field(default_factory=dict)  # layer -> group key

    def __getitem__(self, layer: str) -> InputStats:
        return self.stats[self.owner[layer]]

    def __contains__(self, layer: str) -> bool:
        return layer in self.owner


class _Collector:
    """Forward hooks that feed a Calibration; input groups are fixed on the first batch."""

    def __init__(self, modules: dict[str, nn.Module], calib: Calibration) -> None:
        self.calib, self.last = calib, None
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            x = args[0]
            if name not in self.calib.owner:
                same = self.last is not None and self.last[0] is x
                self.calib.owner[name] = self.last[1] if same else name
            key = self.calib.owner[name]
            if key == name:
                if key not in self.calib.stats:
                    self.calib.stats[key] = InputStats.zeros(x.shape[-1], x.device)
                self.calib.stats[key].add(x)
            self.last = (x, key)

        return hook

    def end_batch(self) -> None:
        self.last = None  # release the tensor; never match across batches

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect(
    model: nn.Module,
    windows: torch.Tensor,
    layers: dict[str, nn.Module],
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> Calibration:
    """Run the model over calibration windows and gather each layer's input statistics."""
    calib = Calibration()
    collector = _Collector(layers, calib)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in tqdm(windows.split(batch_size), desc="calibrate", disable=not progress, unit="batch"):
                model(input_ids=batch.to(device), use_cache=False)
                collector.end_batch()
    finally:
        collector.remove()
    return calib


class _StopForward(Exception):
    pass


def block_list(model: nn.Module, layers: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks that holds the target layers (e.g. model.layers)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            inside = sum(1 for layer in layers if layer.startswith(f"{name}."))
            if inside and (best is None or inside > best[2]):
                best = (name, module, inside)
    if best is None or best[2] != len(layers):
        raise LoquantError("sequential calibration needs every target layer inside one list of blocks")
    return best[0], best[1]


def capture_inputs(model: nn.Module, windows: torch.Tensor, first_block: nn.Module,
                   batch_size: int = 4) -> Iterator[tuple[tuple, dict]]:  # fmt: skip
    """The (args, kwargs) the first block is called with, yielded batch by batch (a caller may
    move each to disk before the next is made): the model's own forward up to that block, so
    positions, masks and rotary embeddings come from it."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    try:
        for batch in windows.split(batch_size):
            with torch.inference_mode():
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
            yield captured.pop()
    finally:
        handle.remove()


def hidden_of(inputs: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(inputs: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with other hidden states (a block's output feeds the next block)."""
    args, kwargs = inputs
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def block_output(block: nn.Module, inputs: tuple[tuple, dict]) -> torch.Tensor:
    out = block(*inputs[0], **inputs[1])
    return out[0] if isinstance(out, tuple) else out


def block_stats(block: nn.Module, layers: dict[str, nn.Module], inputs,
                on_output: Callable[[int, torch.Tensor], None] | None = None) -> Calibration:  # fmt: skip
    """Input statistics of `layers` (inside `block`) over the cached block inputs, a sequence
    of (args, kwargs); `on_output(j, hidden)` receives each batch's block output as it comes."""
    calib = Calibration()
    collector = _Collector(layers, calib)
    try:
        with torch.inference_mode():
            for j, call in enumerate(inputs):
                out = block_output(block, call)
                collector.end_batch()
                if on_output is not None:
                    on_output(j, out)
    finally:
        collector.remove()
    return calib


def run_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    layers: dict[str, nn.Module],
    process_block: Callable[[int, Calibration], None],
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> None:
    """Calibrate block by block on the outputs of the already processed blocks before it.

    The inputs of the first block are captured once (capture_inputs); each block then gathers
    its statistics, `process_block(i, calib)` quantizes and corrects it, and its new outputs
    feed the next.
    """
    prefix, blocks = block_list(model, list(layers))
    captured = list(capture_inputs(model, windows, blocks[0], batch_size))
    for i in tqdm(range(len(blocks)), desc="sequential", disable=not progress, unit="block"):
        mine = {n: m for n, m in layers.items() if n.startswith(f"{prefix}.{i}.")}
        calib = block_stats(blocks[i], mine, captured)
        process_block(i, calib)
        block = blocks[i]  # process_block may have swapped layers inside it, not the block itself
        with torch.inference_mode():
            captured = [with_hidden(call, block_output(block, call)) for call in captured]


def fisher_diagonal(
    model: nn.Module,
    windows: torch.Tensor,
    weights: dict[str, torch.Tensor],
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of each weight: the sum over windows (one example each) of
    the squared gradient of the language-model loss. `weights` maps names to parameters."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    device = next(model.parameters()).device
    try:
        for window in tqdm(windows, desc="fisher", disable=not progress, unit="window"):
            model.zero_grad(set_to_none=True)
            ids = window[None].to(device)
            with torch.enable_grad():  # callers may be inside no_grad
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for n, w in weights.items():
                fisher[n] += w.grad.float().square()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return fisher
