"""The Gluon dequantize kernel: its config and argument checks (CPU), and its output against
the layer's own dequantize, written into a strided NaN-poisoned buffer (CUDA)."""

import pytest
import torch

pytest.importorskip("triton")

from loquant import QuantLinear, WeightFormat  # noqa: E402
from loquant.kernels import gluon_dequant, prepare, units  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, 256, 4096])
def test_a_thread_never_straddles_a_group(bits, group):
    cfg = gluon_dequant.dequant_config(bits, 4096, group)
    span = cfg["V"] * units(bits)[0]  # codes a thread decodes per row
    assert span <= 32 or bits == 3
    assert group % span == 0


def test_out_of_the_wrong_shape_is_refused_before_any_launch():
    q = QuantLinear.from_weight(torch.randn(8, 64), None, WeightFormat("int", 4, 32))
    p = prepare(q.packed(), q.fmt, (8, 64))
    args = (p["qweight"], p["scales"], p["offsets"], p["book"], p["bits"], p["fmt"], 8, 64, p["group"])
    with pytest.raises(ValueError, match="8 x 64"):
        gluon_dequant.dequantize(*args, out=torch.empty(8, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unit stride"):
        gluon_dequant.dequantize(*args, out=torch.empty(64, 8, dtype=torch.bfloat16).t())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FORMATS = [WeightFormat(f, b, g) for f in ("int", "int-sym", "nf") for b in (2, 3, 4) for g in (32, 128, -1)]
# group 48: fewer units per thread (dequant_config halves V until a thread stays in one group)
FORMATS += [
    WeightFormat("nf", 4, 64, double_quant=True, icq=True),
    WeightFormat("int", 4, 64, double_quant=True),
    WeightFormat("int", 4, 48),
    WeightFormat("int-sym", 2, 48),
]


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe().replace(" ", "-"))
def test_matches_the_layer_and_writes_only_its_columns(fmt, dtype):
    n, k, pad = 200, 1056, 24  # rows not a whole tile, K not a whole CTA span
    torch.manual_seed(0)
    q = QuantLinear.from_weight(torch.randn(n, k, device="cuda") * 0.05, None, fmt).eval()
    state, _, _, _ = q._kernel_state(dtype)
    buf = torch.full((n, k + pad), float("nan"), device="cuda", dtype=dtype)
    p = state
    out = gluon_dequant.dequantize(p["qweight"], p["scales"], p["offsets"], p["book"], p["bits"], p["fmt"], n, k,
                                   p["group"], buf[:, :k])  # fmt: skip
    ref = q.dequantize(torch.float32)
    assert torch.isfinite(out).all(), "unwritten elements"
    assert torch.isnan(buf[:, k:]).all(), "wrote past its columns"
    # the reference rounded once to dtype: at most one rounding step of dtype apart
    torch.testing.assert_close(out.float(), ref, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=1e-6)
