"""Fused dequantize-matmul kernels (Triton, CUDA) for QuantLinear.

Nothing here imports triton at import time: `kernel_reason` and `prepare` are plain torch,
and the Triton launchers (loquant.kernels.ops) load on the first CUDA call.
"""

from __future__ import annotations

import importlib.util

import torch

from loquant.formats.codec import group_params
from loquant.formats.normalfloat import nf_codebook
from loquant.formats.spec import WeightFormat

FMT_IDS = {"int": 0, "int-sym": 1, "nf": 2}


def units(bits: int) -> tuple[int, int]:
    """(codes per unit, int32 words per unit): a unit is the smallest run of codes that starts
    and ends on a 32-bit word (3 bits: 32 codes in 3 words)."""
    return (32, 3) if bits == 3 else (32 // bits, 1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host arithmetic: triton.cdiv is a constexpr function that
    costs 1.5-3 µs of host time a call, and a launch made a dozen such calls."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); triton.next_power_of_2 without its host cost."""
    return 1 << (n - 1).bit_length()


def kernel_reason(fmt: WeightFormat, out_features: int, in_features: int) -> str | None:
    """Why a layer cannot use the Triton kernels (None: it can)."""
    if fmt.bits not in (2, 3, 4):
        return f"{fmt.bits}-bit codes (the kernels read 2, 3 and 4 bits)"
    cpu = units(fmt.bits)[0]
    if in_features % cpu:
        return f"in_features {in_features} is not a multiple of {cpu} (rows must start on a 32-bit word)"
    group = fmt.group_len(in_features)
    if group != in_features and group % cpu:
        return f"group size {group} is not a multiple of {cpu} codes"
    return None


def split_k(programs: int, steps: int, sms: int, per_sm: float, min_steps: int) -> int:
    """How many parts to split K into (a power of two): until about per_sm programs run per SM,
    as long as each part keeps at least min_steps K steps."""
    split = 1
    while programs * split < per_sm * sms and steps // (2 * split) >= min_steps:
        split *= 2
    return split


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def prepare(tensors: dict[str, torch.Tensor], fmt: WeightFormat, shape: tuple[int, int]) -> dict:
    """The kernel's view of a layer's stored tensors: qweight as is, per-group parameters as
    stored (fp16) or, when double-quantized or with icq shifts, expanded to fp32 once here."""
    out_f, in_f = shape
    params = fmt.param_names
    expand = any(fmt.double_quantized(p) for p in params)
    p = group_params(tensors, fmt) if expand else {name: tensors[name] for name in params}
    second = p.get("offsets", p.get("shifts"))
    book = nf_codebook(fmt.bits).to(tensors["qweight"].device) if fmt.format == "nf" else None
    return {
        "qweight": tensors["qweight"],
        "scales": p["scales"].contiguous(),
        "offsets": None if second is None else second.contiguous(),
        "book": book,
        "bits": fmt.bits,
        "fmt": FMT_IDS[fmt.format],
        "n": out_f,
        "k": in_f,
        "group": fmt.group_len(in_f),
    }


def through_operator(x: torch.Tensor) -> bool:
    """Whether a kernel call must go through the registered operator (torch.ops.loquant.qmm):
    under torch.compile, for a tensor subclass (fake tensors) or under a dispatch mode (make_fx,
    FlopCounterMode), which must see the call. Plain eager calls run the launcher directly:
    the operator's dispatch costs host time on every call (BENCHMARKS.md)."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor or torch._C._len_torch_dispatch_stack() > 0


def qlinear(
    x: torch.Tensor,
    prepared: dict,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    path: int = 0,
) -> torch.Tensor:
    """y = x · deq(W)ᵀ + (x · Aᵀ) · Bᵀ + bias on CUDA; A, B, bias already in x's dtype."""
    if x.shape[-1] != prepared["k"]:  # the kernels index x by the layer's K: a mismatch would read out of bounds
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {prepared['k']}")
    from loquant.kernels import ops  # imports triton, registers torch.ops.loquant.qmm

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    p = prepared
    op = torch.ops.loquant.qmm if through_operator(x2) else ops.run
    y = op(x2, p["qweight"], p["scales"], p["offsets"], p["book"], A, B, bias, p["bits"], p["fmt"], p["n"], p["k"],
           p["group"], path)  # fmt: skip
    return y.reshape(*shape[:-1], p["n"])
