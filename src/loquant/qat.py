"""Quantization-aware fine-tuning that ends in a plain quantized model: PEQA, L4Q, LR-QAT.

Every mode trains through the quantizer of the layer's own format and merges back to
integer codes and fp16 group parameters, with no adapter left (`merge`):

- `peqa`: the codes stay fixed; only the per-group scales train.
- `l4q`: Ŵ = s·clamp(round((W + B·A - z)/s)) with the float W (from the source model), LoRA
  B·A inside the quantizer and LSQ's learned step size s (and, for `int`, the offset z).
- `lr-qat`: Ŵ = s·clamp(round(Φ0 + B·A)) + z with Φ0 = (W - z0)/s0 frozen in int8 fixed
  point (8 - bits fraction bits; or bf16), B·A in grid units, s (and z) learned.
- `full` (Python only, the memory baseline): every weight trains, Ŵ = s·clamp(round((W - z)/s)).

Rounding is straight-through. s and z pass through an fp16 rounding (also straight-through)
so the training forward computes exactly the weight that the merged model stores. Each
layer's weight is rebuilt from its parameters in backward instead of being saved: the
"checkpointing of the rounding step" that keeps memory near the packed size. Formats: `int`
and `int-sym` at any group size, per channel included. NF works with peqa and l4q (rounding
to the nearest code word); lr-qat's fixed-point Φ0 lives on an integer grid, so it refuses NF.
Double-quantized parameters and ICQ shifts are refused: they are stored jointly or searched
after the codes, so there is no step size to learn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loquant.errors import LoquantError
from loquant.formats import nf_codebook, pack
from loquant.formats.codec import group_params, unpack_codes
from loquant.formats.normalfloat import nf_quantize
from loquant.layers import QuantLinear

MODES = ("peqa", "l4q", "lr-qat")
FLOAT_MODES = ("l4q", "lr-qat", "full")  # start from the float weights
PHI_DTYPES = ("int8", "bf16")


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` forward, identity gradient to x."""
    return x + (value - x).detach()


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, torch.round(x))


def _ste_fp16(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, x.half().float())


def _expand(p: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """(out, groups) -> (out, in): each group's value over its columns."""
    return p.repeat_interleave(group, dim=1)[:, :in_features]


class _RecomputedLinear(torch.autograd.Function):
    """x · Ŵᵀ where Ŵ = layer.build_weight(*params) is rebuilt in backward rather than saved, so at
    most one layer's float weight and its gradient exist at a time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QATLinear, dtype: torch.dtype, *params: torch.Tensor):
        ctx.layer, ctx.dtype = layer, dtype
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return F.linear(x.to(dtype), layer.build_weight(*params).to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            W = ctx.layer.build_weight(*leaves)
            grad_x = grad.to(ctx.dtype) @ W.detach().to(ctx.dtype) if ctx.needs_input_grad[0] else None
            grad_W = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            found = iter(torch.autograd.grad(W, wanted, grad_W, allow_unused=True))
        grads = [next(found) if leaf.requires_grad else None for leaf in leaves]
        return grad_x, None, None, *grads


class QATLinear(nn.Module):
    """A QuantLinear in training: its weight is a function of trainable parameters (see module doc).

    base: the layer whose codes (peqa) or group parameters (the start of s and z) are used.
    weight: the float (out x in) weight, for the modes that start from it.
    """

    def __init__(self, base: QuantLinear, mode: str, weight: torch.Tensor | None = None, *, rank: int = 16,
                 alpha: float | None = None, phi_dtype: str = "int8", weight_dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        fmt = base.fmt
        if mode not in (*MODES, "full"):
            raise LoquantError(f"unknown QAT mode {mode!r}: choose one of {', '.join(MODES)}")
        if fmt.double_quant or fmt.icq:
            raise LoquantError("QAT learns fp16 group parameters: quantize without --double-quant and --icq")
        if mode == "lr-qat" and fmt.format == "nf":
            raise LoquantError("lr-qat keeps W/s0 on an integer grid: use --format int or int-sym (nf: peqa, l4q)")
        if phi_dtype not in PHI_DTYPES:
            raise LoquantError(f"unknown --phi-dtype {phi_dtype!r}: choose int8 or bf16")
        if mode == "lr-qat" and phi_dtype == "int8" and fmt.bits > 4:
            raise LoquantError(f"int8 fixed point leaves {8 - fmt.bits} fraction bits at {fmt.bits} bits: use bf16")
        if base.rank:
            raise LoquantError("QAT trains a plain quantized base: quantize without --rank")
        if mode in FLOAT_MODES and (weight is None or tuple(weight.shape) != (base.out_features, base.in_features)):
            raise LoquantError(f"{mode} starts from the float weights of the layer")
        self.fmt, self.mode = fmt, mode
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group = fmt.group_len(base.in_features)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)  # the bias stays as the base has it
        device = base.qweight.device
        params = group_params(base.packed(), fmt)
        self.scales = nn.Parameter(params["scales"].clone())
        self.offsets = nn.Parameter(params["offsets"].clone()) if fmt.format == "int" else None
        if self.offsets is not None and mode == "peqa":
            self.offsets.requires_grad_(False)  # PEQA trains the scales only
        shape = (base.out_features, base.in_features)
        self.rank, self.scaling = 0, 1.0
        if mode == "peqa":
            self.register_buffer("codes", unpack_codes(base.packed(), fmt, shape).clone())
        elif mode == "full":
            self.W = nn.Parameter(weight.detach().float().clone())
        elif mode == "l4q":
            self.register_buffer("W0", weight.detach().to(device, weight_dtype).clone())
        else:
            self._store_phi(weight.detach().float().to(device), phi_dtype)
        if mode in ("l4q", "lr-qat"):
            self.rank, self.scaling = rank, (rank if alpha is None else alpha) / rank
            gen = torch.Generator().manual_seed(seed)
            bound = 1 / math.sqrt(self.in_features)  # PEFT's LoRA start: A ~ U(±1/√in), B = 0
            self.A = nn.Parameter((torch.rand(rank, self.in_features, generator=gen) * 2 - 1).mul(bound).to(device))
            self.B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def _store_phi(self, W: torch.Tensor, phi_dtype: str) -> None:
        s0, z0 = self._params(self.scales.detach(), None if self.offsets is None else self.offsets.detach())
        phi = (W - (z0 if z0 is not None else 0)) / torch.where(s0 > 0, s0, torch.ones_like(s0))
        self.frac_bits = 8 - self.fmt.bits
        if phi_dtype == "bf16":
            self.register_buffer("phi", phi.to(torch.bfloat16))
        elif self.fmt.format == "int":  # codes 0 .. 2^b - 1: unsigned fixed point
            self.register_buffer("phi", torch.round(phi * 2**self.frac_bits).clamp(0, 255).to(torch.uint8))
        else:
            self.register_buffer("phi", torch.round(phi * 2**self.frac_bits).clamp(-128, 127).to(torch.int8))

    def _params(self, scales: torch.Tensor, offsets: torch.Tensor | None):
        s = _expand(_ste_fp16(scales), self.group, self.in_features)
        z = None if offsets is None else _expand(_ste_fp16(offsets), self.group, self.in_features)
        return s, z

    def trainables(self) -> list[torch.Tensor]:
        """The tensors `build_weight` is a function of, in its argument order."""
        names = {"peqa": ["scales"], "full": ["W", "scales"]}.get(self.mode, ["A", "B", "scales"])
        if self.offsets is not None and self.mode != "peqa":
            names = [*names, "offsets"]
        return [getattr(self, n) for n in names]

    def build_weight(self, *params: torch.Tensor) -> torch.Tensor:
        """Ŵ (out x in, float32) from the trainables (default: the layer's own)."""
        return self._weight_and_codes(*(params or self.trainables()))[0]

    def _weight_and_codes(self, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt, half = self.fmt, 1 << (self.fmt.bits - 1)
        qmax = (1 << fmt.bits) - 1
        if self.mode == "peqa":
            (scales,) = params
            s, z = self._params(scales, self.offsets)  # the offsets stay frozen
            return self._decode(self.codes.long(), s, z), self.codes
        if self.mode in ("l4q", "lr-qat"):
            A, B, scales, *rest = params
            delta = (B @ A) * self.scaling
        else:
            W, scales, *rest = params
        s, z = self._params(scales, rest[0] if rest else None)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        if self.mode == "lr-qat":
            phi = self.phi.float() if self.phi.dtype == torch.bfloat16 else self.phi.float() / 2**self.frac_bits
            v = phi + delta
        else:
            v = ((W if self.mode == "full" else self.W0.float() + delta) - (z if z is not None else 0)) / safe
            if fmt.format == "nf":
                u = v.clamp(-1, 1)
                idx = nf_quantize(u.detach(), fmt.bits)
                book = nf_codebook(fmt.bits).to(u.device)
                return _ste(u, book[idx.long()]) * s, idx
        if fmt.format == "int":
            c = _ste_round(v).clamp(0, qmax)
            codes = c.detach().to(torch.uint8)
        else:
            c = _ste_round(v).clamp(-half, half - 1)
            codes = (c.detach() + half).to(torch.uint8)
        return self._decode_grid(c, s, z), codes

    def _decode(self, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if self.fmt.format == "int":
            return codes.float() * s + z
        if self.fmt.format == "int-sym":
            return (codes.float() - (1 << (self.fmt.bits - 1))) * s
        return nf_codebook(self.fmt.bits).to(codes.device)[codes] * s

    @staticmethod
    def _decode_grid(c: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return c * s + z if z is not None else c * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = _RecomputedLinear.apply(x, self, dtype, *self.trainables())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The merged layer: integer codes and fp16 group parameters, no correction."""
        _, codes = self._weight_and_codes(*self.trainables())
        tensors = {"qweight": pack(codes.to(torch.uint8), self.fmt.bits), "scales": self.scales.half()}
        if self.offsets is not None:
            tensors["offsets"] = self.offsets.half()
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return QuantLinear.from_tensors(tensors, self.fmt, (self.out_features, self.in_features), self.bias, dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, format={self.fmt.describe()}, rank={self.rank}"


def attach(model: nn.Module, mode: str, float_weights: dict[str, torch.Tensor] | None = None, *, rank: int = 16,
           alpha: float | None = None, phi_dtype: str = "int8", weight_dtype: torch.dtype = torch.float32,
           seed: int = 0) -> nn.Module:  # fmt: skip
    """Replace every QuantLinear by a QATLinear in place and freeze everything else; returns model."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LoquantError("the model has no quantized layer")
    for p in model.parameters():
        p.requires_grad_(False)
    if mode in FLOAT_MODES:
        missing = sorted(set(layers) - set(float_weights or {}))
        if missing:
            raise LoquantError(f"{mode} needs the float weights of every quantized layer (missing e.g. {missing[:3]})")
    built = {}
    for i, (name, layer) in enumerate(sorted(layers.items())):
        weight = float_weights[name] if mode in FLOAT_MODES else None
        try:
            built[name] = QATLinear(layer, mode, weight, rank=rank, alpha=alpha, phi_dtype=phi_dtype,
                                    weight_dtype=weight_dtype, seed=seed * 100_003 + i)  # fmt: skip
        except LoquantError as err:
            raise LoquantError(f"layer {name}: {err}") from None
    for name, layer in built.items():  # all built first: bad input leaves the model as it was
        model.set_submodule(name, layer)
    return model


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def merge(model: nn.Module) -> nn.Module:
    """Swap every QATLinear for its merged QuantLinear, in place; returns the model."""
    for name, layer in qat_layers(model).items():
        model.set_submodule(name, layer.to_quant_linear())
    return model


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable step sizes and offsets: they get their own (smaller) learning rate."""
    layers = qat_layers(model).values()
    return [p for layer in layers for p in (layer.scales, layer.offsets) if p is not None and p.requires_grad]
