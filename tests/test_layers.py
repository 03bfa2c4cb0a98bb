import pytest
import torch
import torch.nn.functional as F

from loquant import QuantLinear, WeightFormat
from loquant.formats import fake_quantize

INT4 = WeightFormat("int", 4, 64)


def make(rank=0, bias=True, fmt=INT4):
    torch.manual_seed(0)
    w, b = torch.randn(48, 160), torch.randn(48)
    layer = QuantLinear.from_weight(w, b if bias else None, fmt)
    if rank:
        layer.set_correction(torch.randn(rank, 160), torch.randn(48, rank))
    return layer, w, b


def test_forward_is_dequantized_matmul_plus_correction_plus_bias():
    layer, w, b = make(rank=4)
    x = torch.randn(3, 5, 160)
    qw = fake_quantize(w, layer.fmt)
    A, B = layer.A.float(), layer.B.float()
    expect = x @ qw.T + (x @ A.T) @ B.T + b
    assert torch.allclose(layer(x), expect, atol=1e-4, rtol=1e-4)


def test_no_float_copy_of_the_weight():
    layer, _, _ = make(bias=False)
    assert [n for n, _ in layer.named_parameters()] == []
    assert {n: t.dtype for n, t in layer.state_dict().items()} == {
        "qweight": torch.uint8,
        "scales": torch.float16,
        "offsets": torch.float16,
    }
    assert sum(t.nbytes for t in layer.state_dict().values()) == 48 * 160 // 2 + 2 * 2 * 48 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_in_input_dtype(dtype):
    layer, w, b = make(rank=2)
    x = torch.randn(2, 160)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert torch.allclose(y.float(), layer(x), rtol=0.05, atol=0.3)


def test_correction_is_16_bit_and_counts():
    layer, _, _ = make(rank=8)
    assert layer.A.dtype == torch.float16 and layer.rank == 8
    assert layer.state_dict()["B"].shape == (48, 8)
    layer.set_correction(None, None)
    assert layer.rank == 0 and "A" not in layer.state_dict()


def test_correction_lands_on_the_layer_device():
    layer, _, _ = make()
    layer.to("meta")
    layer.set_correction(torch.zeros(4, layer.in_features), torch.zeros(layer.out_features, 4))
    assert layer.A.is_meta and layer.B.is_meta  # computed elsewhere, stored with the packed weight


def test_correction_shape_checked():
    layer, _, _ = make()
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_correction(torch.zeros(4, 100), torch.zeros(48, 4))


def test_matches_linear_at_8_bits():
    layer, w, b = make(fmt=WeightFormat("int", 8, 32))
    x = torch.randn(4, 160)
    ref = F.linear(x, w, b)
    assert (layer(x) - ref).norm() / ref.norm() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cuda_forward_matches_cpu_reference(dtype, tol):
    layer, _, _ = make(rank=4)
    x = torch.randn(8, 160)
    ref = layer(x)
    y = layer.cuda()(x.cuda().to(dtype))
    assert y.is_cuda and y.dtype == dtype
    assert ((y.float().cpu() - ref).norm() / ref.norm()) < tol


def test_backward_through_the_packed_weight_matches_the_float_reference():
    layer, _, _ = make(rank=0, bias=True)
    x = torch.randn(5, layer.in_features, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, layer.dequantize(), layer.bias)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
