"""CPU side of the kernel dispatch: QuantLinear off CUDA never touches triton."""

import subprocess
import sys

import pytest
import torch

from loquant import QuantLinear, WeightFormat
from loquant.kernels import kernel_reason, prepare, qlinear


def test_cpu_forward_never_imports_triton():
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None  # importing it would raise\n"
        "from loquant import QuantLinear, WeightFormat\n"
        "q = QuantLinear.from_weight(torch.randn(16, 64), None, WeightFormat('int', 4, 32))\n"
        "q.set_correction(torch.randn(2, 64), torch.randn(16, 2))\n"
        "with torch.no_grad():\n"
        "    assert q(torch.randn(3, 64, dtype=torch.bfloat16)).shape == (3, 16)\n"
        "assert not q.uses_kernel(torch.randn(1, 64, dtype=torch.bfloat16))\n"
        "assert 'loquant.kernels.ops' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_reason():
    assert kernel_reason(WeightFormat("int", 4, 128), 10, 4096) is None
    assert kernel_reason(WeightFormat("nf", 3, -1), 10, 96) is None
    assert "8-bit" in kernel_reason(WeightFormat("int", 8, 128), 10, 4096)
    assert "multiple of 32" in kernel_reason(WeightFormat("int", 3, 128), 10, 4100)
    assert "group size 20" in kernel_reason(WeightFormat("int", 4, 20), 10, 4000)


def test_prepare_keeps_fp16_params_and_expands_double_quant():
    w = torch.randn(8, 256)
    q = QuantLinear.from_weight(w, None, WeightFormat("int", 4, 64))
    p = prepare(q.packed(), q.fmt, (8, 256))
    assert p["scales"].data_ptr() == q.scales.data_ptr() and p["qweight"] is q.qweight
    dq = QuantLinear.from_weight(w, None, WeightFormat("nf", 4, 64, double_quant=True, icq=True))
    p = prepare(dq.packed(), dq.fmt, (8, 256))
    assert p["scales"].dtype == torch.float32 and p["offsets"].shape == (8, 4) and p["book"].numel() == 16


def test_kernel_call_refuses_an_input_of_the_wrong_width():
    """The kernels index x by the layer's K; a wrong width is refused before any launch."""

    q = QuantLinear.from_weight(torch.randn(8, 256), None, WeightFormat("int", 4, 64))
    with pytest.raises(ValueError, match="input has 255 features, the layer takes 256"):
        qlinear(torch.randn(3, 255, dtype=torch.bfloat16), prepare(q.packed(), q.fmt, (8, 256)))


def test_through_operator_for_compile_fake_tensors_and_dispatch_modes():
    """Plain eager tensors go to the launcher directly; fake tensors and dispatch modes (which
    must record the call) go through torch.ops.loquant.qmm."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from loquant.kernels import through_operator

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8)
    assert not through_operator(x)
    with Seen():
        assert through_operator(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert through_operator(fake)
    assert through_operator(fake)  # a subclass, with no mode active
