"""QuantLinear: a packed low-bit weight plus an optional 16-bit low-rank correction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loquant.formats import WeightFormat, dequantize_weight, quantize_weight
from loquant.kernels import kernel_reason, prepare, qlinear, triton_available

CORRECTION_DTYPE = torch.float16


class _PackedMatmul(torch.autograd.Function):
    """x · deq(W)ᵀ that keeps no float W for backward: it dequantizes again instead.

    Plain F.linear would save the dequantized weight of every layer until backward, a full
    float copy of the model during fine-tuning; saving only the layer (its packed buffers)
    keeps training memory near the packed size (as bitsandbytes' 4-bit matmul does).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype) @ ctx.layer.dequantize(ctx.dtype), None, None


class QuantLinear(nn.Module):
    """y = x · deq(W)ᵀ + (x · Aᵀ) · Bᵀ + bias, computed in the input's dtype.

    The packed codes and per-group parameters are buffers (they are state, not trainable);
    A (rank x in) and B (out x rank) are parameters. No float copy of W is kept: the
    reference path dequantizes on every call, so memory holds only the packed form.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: WeightFormat,
        *,
        bias: bool = False,
        rank: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.buffer_names = tuple(fmt.layout(out_features, in_features))
        for name, (shape, buf_dtype) in fmt.layout(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        self.set_correction(
            torch.zeros(rank, in_features, device=device) if rank else None,
            torch.zeros(out_features, rank, device=device) if rank else None,
        )

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat) -> QuantLinear:
        """Quantize a float (out x in) weight into a new layer on the weight's device."""
        return cls.from_tensors(quantize_weight(weight, fmt), fmt, tuple(weight.shape), bias, weight.dtype)

    @classmethod
    def from_record(cls, rec: dict, dtype: torch.dtype = torch.float32, device=None) -> QuantLinear:
        """An empty layer shaped by one entry of quantization_config["layers"]."""
        fmt = WeightFormat.from_record(rec)
        return cls(rec["in_features"], rec["out_features"], fmt, bias=rec["bias"], rank=rec["rank"], dtype=dtype,
                   device=device)  # fmt: skip

    @classmethod
    def from_state(cls, rec: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, device=None) -> QuantLinear:
        """A layer rebuilt from its record and state dict (a resumed or a distributed run)."""
        layer = cls.from_record(rec, dtype)
        layer.load_state_dict(state)
        return layer.to(device)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        fmt: WeightFormat,
        shape: tuple[int, int],
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> QuantLinear:
        """A layer holding already quantized tensors (named as in WeightFormat.layout)."""
        layer = cls(shape[1], shape[0], fmt, bias=bias is not None, dtype=dtype, device=tensors["qweight"].device)
        for name, tensor in tensors.items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    def set_correction(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Install W ≈ deq(W) + B·A, stored in 16 bits; None removes it."""
        if A is None or B is None or A.shape[0] == 0:
            self.A = self.B = None
            return
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"correction shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                f"a {self.out_features}x{self.in_features} layer"
            )
        device = self.qweight.device  # the layer's, wherever the factors were computed
        self.A = nn.Parameter(A.detach().to(device, CORRECTION_DTYPE), requires_grad=False)
        self.B = nn.Parameter(B.detach().to(device, CORRECTION_DTYPE), requires_grad=False)

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.buffer_names}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """deq(W) without the correction, (out x in)."""
        return dequantize_weight(self.packed(), self.fmt, (self.out_features, self.in_features), dtype)

    def _apply(self, fn, recurse=True):
        self._kernel_cache = None  # device / dtype changes rebuild it
        return super()._apply(fn, recurse)

    def _kernel_state(self, dtype: torch.dtype):
        """The Triton kernels' inputs, built once per dtype and reused while the buffers and
        correction are unchanged (same storage, same version). A plain attribute: never in
        state_dict or saved files."""
        cache = getattr(self, "_kernel_cache", None)
        if cache is not None and torch.compiler.is_compiling():
            return cache[1:]  # built by an eager call; dynamo does not trace the key below
        tensors = [*self.packed().values(), *(t for t in (self.A, self.B, self.bias) if t is not None)]
        # inference tensors (made under torch.inference_mode) carry no version counter
        key = (dtype, tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors))
        if cache is None or cache[0] != key:
            state = prepare(self.packed(), self.fmt, (self.out_features, self.in_features))
            extra = [None if t is None else t.detach().to(dtype).contiguous() for t in (self.A, self.B, self.bias)]
            cache = self._kernel_cache = (key, state, *extra)
        return cache[1:]

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs the fused Triton kernel: CUDA, bf16/fp16 input, no autograd
        through x, a supported format and shape, triton installed."""
        return (
            x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and x.requires_grad)
            and kernel_reason(self.fmt, self.out_features, self.in_features) is None
            and triton_available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            state, A, B, bias = self._kernel_state(x.dtype)
            return qlinear(x, state, A, B, bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            # Under autocast, compute in the autocast dtype as F.linear would.
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            y = _PackedMatmul.apply(x, self, dtype)
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            y = F.linear(x, self.dequantize(x.dtype), bias)
        if self.A is not None:
            y = y + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.fmt.describe()}, rank={self.rank}, bias={self.bias is not None}"
        )
