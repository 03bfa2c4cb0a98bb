"""Run with TRITON_INTERPRET=1 (tests/kernels/test_interpreter.py does): the plain-Triton
kernels on CPU tensors against the layer's PyTorch path. Prints one line per case:
`<case> <relative error>`.

x is float16 for the fused GEMM: triton 3.6's interpreter multiplies bfloat16 dot operands
wrongly (errors of 1e11 on a kernel that is exact in float16 and on the GPU)."""

import torch
from triton.runtime import interpreter

from loquant import QuantLinear, WeightFormat
from loquant.kernels import lowrank, ops, qlinear

_patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)  # triton 3.6's name


def _patch_index(tensor, scope) -> None:
    """triton 3.6's interpreter holds scalars as one-element arrays and int()s them for
    range(); numpy 2.4 made that an error. Index the element instead."""
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


def _no_device() -> None:
    """Stand-ins for what the launchers ask the GPU, and the interpreter fix. Applied in the
    interpreter's own process only: the test imports this module for its case lists, and on
    a GPU machine the other tests in that process need the real functions."""
    if _patch_lang_tensor is not None:
        interpreter._patch_lang_tensor = _patch_index
    ops._num_sms = lambda device: 132  # the H100's count
    lowrank.pdl_supported = lambda device: False


FORMATS = [WeightFormat("int", 4, 128), WeightFormat("int", 2, 64), WeightFormat("int", 3, 32),
           WeightFormat("int-sym", 4, 32), WeightFormat("int-sym", 2, -1), WeightFormat("nf", 4, 64),
           WeightFormat("nf", 3, 128, icq=True), WeightFormat("int", 4, 64, double_quant=True)]  # fmt: skip
GEMM_TILES = [{"BM": 32, "BN": 32, "BK": 128}, {"BM": 16, "BN": 64, "BK": 64, "SPLIT_K": 2}]


def error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    _no_device()
    for i, fmt in enumerate(FORMATS):
        torch.manual_seed(i)
        n, k = 72, 512
        q = QuantLinear.from_weight(torch.randn(n, k) * 0.05, torch.randn(n), fmt).eval()
        q.set_correction(torch.randn(8, k) * 0.05, torch.randn(n, 8) * 0.05)
        name = fmt.describe().replace(" ", "-")
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(40, k, dtype=dtype)
            ref = x.float() @ q.dequantize(torch.float32).T + (x.float() @ q.A.float().T) @ q.B.float().T
            ref += q.bias.float()
            state, A, B, bias = q._kernel_state(dtype)
            tag = str(dtype).removeprefix("torch.")
            if dtype == torch.float16:
                for j, tile in enumerate(GEMM_TILES):
                    ops.OVERRIDE["gemm"] = dict(tile, num_warps=4, num_stages=1)
                    try:
                        print(f"{name}-gemm{j}-{tag} {error(qlinear(x, state, A, B, bias, path=ops.GEMM), ref)}")
                    finally:
                        ops.OVERRIDE.clear()
            xa, _ = lowrank.xa(x, A)
            print(f"{name}-xa-{tag} {error(xa, x.float() @ A.float().T)}", flush=True)


if __name__ == "__main__":
    main()
