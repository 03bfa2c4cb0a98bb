"""Each format against an independent float64 reference, group by group."""

import math

import numpy as np
import pytest
import torch

from loquant.errors import LoquantError
from loquant.formats import FORMAT_BITS, WeightFormat, dequantize_weight, nf_codebook, quantize_weight
from loquant.formats.bitpack import unpack

ALL = [(f, b) for f, bits in FORMAT_BITS.items() for b in bits]


def reference(w: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """Straightforward float64 quantize-dequantize, one group at a time, fp16 parameters."""
    out_f, in_f = w.shape
    g = in_f if fmt.group_size == -1 else fmt.group_size
    deq = np.empty_like(w)
    book = nf_codebook(fmt.bits).double().numpy() if fmt.format == "nf" else None
    for r in range(out_f):
        for s in range(0, in_f, g):
            x = w[r, s : s + g]
            if fmt.format == "int":
                scale = np.float64(np.float16((x.max() - x.min()) / (2**fmt.bits - 1)))
                lo = np.float64(np.float16(x.min()))
                q = np.clip(np.round((x - lo) / (scale or 1.0)), 0, 2**fmt.bits - 1)
                deq[r, s : s + g] = q * scale + lo
            elif fmt.format == "int-sym":
                half = 2 ** (fmt.bits - 1)
                scale = np.float64(np.float16(np.abs(x).max() / (half - 1)))
                q = np.clip(np.round(x / (scale or 1.0)), -half, half - 1)
                deq[r, s : s + g] = q * scale
            else:
                scale = np.float64(np.float16(np.abs(x).max()))
                y = np.clip(x / (scale or 1.0), -1, 1)
                deq[r, s : s + g] = book[np.abs(y[:, None] - book[None, :]).argmin(1)] * scale
    return deq


@pytest.mark.parametrize("fmt_name,bits", ALL)
@pytest.mark.parametrize("group", [32, 64, -1])
def test_matches_float64_reference(fmt_name, bits, group):
    torch.manual_seed(bits * 7 + group)
    w = torch.randn(24, 200) * 0.05  # 200 = 3 x 64 + 8: a short last group
    fmt = WeightFormat(fmt_name, bits, group)
    ours = dequantize_weight(quantize_weight(w, fmt), fmt, tuple(w.shape), torch.float64).numpy()
    ref = reference(w.double().numpy(), fmt)
    # float32 vs float64 may round an exact tie differently: allow a handful of one-step flips
    mismatch = ~np.isclose(ours, ref, rtol=0, atol=1e-6)
    assert mismatch.mean() < 1e-3, f"{mismatch.sum()} of {mismatch.size} differ"


@pytest.mark.parametrize("fmt_name,bits", [fb for fb in ALL if fb[0] != "nf"])  # NF steps vary
def test_error_within_half_step(fmt_name, bits):
    w = torch.randn(16, 128)
    fmt = WeightFormat(fmt_name, bits, 64)
    t = quantize_weight(w, fmt)
    err = (dequantize_weight(t, fmt, tuple(w.shape)) - w).abs().view(16, 2, 64).amax(-1)
    scale = t["scales"].float()
    # fp16 rounding of scale and offset adds a little beyond half a step
    assert torch.all(err <= scale * 0.5 * 1.01 + 1e-3 * scale + 1e-4)


def test_short_last_group_has_its_own_parameters():
    w = torch.randn(4, 576)
    w[:, 512:] *= 100  # the last group (64 of 576 with G=128) has a much larger range
    fmt = WeightFormat("int", 4, 128)
    t = quantize_weight(w, fmt)
    assert t["scales"].shape == (4, 5)
    expect = (w[:, 512:].amax(1) - w[:, 512:].amin(1)) / 15
    assert torch.allclose(t["scales"][:, 4].float(), expect, rtol=1e-3)
    assert torch.allclose(t["offsets"][:, 4].float(), w[:, 512:].amin(1), rtol=1e-3)
    # the first groups keep their fine scale
    assert t["scales"][:, 0].float().max() < expect.min() / 10


def test_bits_are_counted_for_the_short_group():
    fmt = WeightFormat("int", 4, 128)
    layout = fmt.layout(576, 576)
    total = sum(math.prod(shape) * dt.itemsize for shape, dt in layout.values())
    assert total * 8 / (576 * 576) == pytest.approx(4 + 2 * 16 * 5 / 576)


@pytest.mark.parametrize("fmt_name,bits", ALL)
def test_zero_group_gives_no_nan(fmt_name, bits):
    w = torch.randn(3, 128)
    w[1, :64] = 0.0
    w[2, 64:] = 0.25  # constant, non-zero group
    for dq in (False, True):
        fmt = WeightFormat(fmt_name, bits, 64, dq)
        deq = dequantize_weight(quantize_weight(w, fmt), fmt, tuple(w.shape))
        assert torch.isfinite(deq).all()
        if dq:  # int8 parameters approximate a zero offset to within a step of their block
            assert deq[1, :64].abs().max() < 0.01 * w.abs().max()
        else:
            assert torch.all(deq[1, :64] == 0)
            assert torch.allclose(deq[2, 64:], torch.full((64,), 0.25), atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_rejected(bad):
    w = torch.randn(4, 64)
    w[2, 3] = bad
    with pytest.raises(LoquantError, match="NaN or Inf"):
        quantize_weight(w, WeightFormat())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=5),
        dict(bits=1),
        dict(format="nf", bits=8),
        dict(format="fp4"),
        dict(group_size=0),
        dict(group_size=-2),
        dict(bits=True),
    ],
)
def test_bad_format_rejected(kwargs):
    with pytest.raises(LoquantError):
        WeightFormat(**kwargs)


def test_stored_tensors_match_layout_and_take_real_bytes():
    w = torch.randn(96, 160)
    for dq in (False, True):
        fmt = WeightFormat("int", 3, 64, dq)
        t = quantize_weight(w, fmt)
        assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
            k: (tuple(s), d) for k, (s, d) in fmt.layout(96, 160).items()
        }
        assert t["qweight"].nbytes == 96 * 160 * 3 // 8


def test_double_quant_nf4_costs_4_127_bits_and_little_accuracy():
    w = torch.randn(1024, 1024) * 0.02
    plain, dq = WeightFormat("nf", 4, 64), WeightFormat("nf", 4, 64, True)
    t = quantize_weight(w, dq)
    bits = sum(v.nbytes for v in t.values()) * 8 / w.numel()
    assert bits == pytest.approx(4.127, abs=0.001)
    err = lambda f: (dequantize_weight(quantize_weight(w, f), f, tuple(w.shape)) - w).norm() / w.norm()  # noqa: E731
    assert err(dq) < err(plain) * 1.02


def test_int_sym_codes_centred_on_zero():
    fmt = WeightFormat("int-sym", 4, 64)
    w = torch.zeros(1, 64)
    w[0, 0] = 1.0
    codes = unpack(quantize_weight(w, fmt)["qweight"], 4, 64)
    assert codes[1:].eq(8).all() and codes[0] == 8 + 7  # zero is stored as 2**(b-1)


def test_works_on_other_devices_and_dtypes():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    fmt = WeightFormat("nf", 4, 64)
    out = dequantize_weight(quantize_weight(w, fmt), fmt, (8, 64), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and ((out.float() - w.float()).norm() / w.float().norm()) < 0.15


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("fmt_name,bits", ALL)
@pytest.mark.parametrize("dq", [False, True])
def test_cuda_matches_cpu(fmt_name, bits, dq):
    w = torch.randn(256, 576, generator=torch.Generator().manual_seed(bits))
    fmt = WeightFormat(fmt_name, bits, 128, dq)
    cpu, gpu = quantize_weight(w, fmt), quantize_weight(w.cuda(), fmt)
    for name in cpu:
        assert gpu[name].is_cuda
        if name == "qweight":  # a code may flip on an exact tie (with dq: a whole group, if its int8 parameter did)
            assert (gpu[name].cpu() != cpu[name]).float().mean() < (1e-2 if dq else 1e-3)
        elif name.endswith("_q"):  # int8 parameters: the GPU's mean may differ in the last bit
            diff = (gpu[name].cpu().int() - cpu[name].int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-2
        else:
            assert torch.allclose(gpu[name].cpu().float(), cpu[name].float(), rtol=1e-5, atol=1e-7)
    d_cpu = dequantize_weight(cpu, fmt, (256, 576))
    d_gpu = dequantize_weight(gpu, fmt, (256, 576))
    # with dq one int8 parameter rounding the other way on a tie moves its whole group
    assert ((d_gpu.cpu() - d_cpu).norm() / d_cpu.norm()) < (1e-2 if dq else 1e-3)
