"""GPTQ against round-to-nearest, a plain float64 reference, and its own block sizes."""

import time

import numpy as np
import pytest
import torch

from loquant.errors import LoquantError
from loquant.formats import WeightFormat, dequantize_weight, nf_codebook, quantize_weight
from loquant.formats.bitpack import unpack
from loquant.quantizers import gptq_quantize

FORMATS = [("int", 3), ("int", 4), ("int-sym", 3), ("int-sym", 4), ("nf", 3), ("nf", 4)]


def correlated(n: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ torch.randn(
        in_f, in_f, generator=g, dtype=torch.float64
    )
    return X.T @ X / n


def output_error(W: torch.Tensor, tensors: dict, fmt: WeightFormat, R: torch.Tensor) -> float:
    E = W.double() - dequantize_weight(tensors, fmt, tuple(W.shape), torch.float64)
    return torch.trace(E @ R @ E.T).item()


def codes(tensors: dict, fmt: WeightFormat, shape: tuple[int, int]) -> torch.Tensor:
    return unpack(tensors["qweight"], fmt.bits, shape[0] * shape[1]).view(shape)


@pytest.mark.parametrize("f,bits", FORMATS)
@pytest.mark.parametrize("group", [8, 7, -1])  # 7: a short last group of 30 = 4·7 + 2
def test_identity_hessian_reproduces_round_to_nearest(f, bits, group):
    W = torch.randn(16, 30, generator=torch.Generator().manual_seed(1))
    W[3, :8] = 0.5  # a zero-range group
    fmt = WeightFormat(f, bits, group)
    got = gptq_quantize(W, fmt, torch.eye(30, dtype=torch.float64), block_size=4)
    want = quantize_weight(W, fmt)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert {n: (tuple(t.shape), t.dtype) for n, t in got.items()} == fmt.layout(16, 30)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [32, -1])
def test_lower_output_error_than_round_to_nearest(bits, group):
    R = correlated(2048, 128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    fmt = WeightFormat("int", bits, group)
    rtn = output_error(W, quantize_weight(W, fmt), fmt, R)
    gptq = output_error(W, gptq_quantize(W, fmt, R), fmt, R)
    assert gptq < 0.8 * rtn


def reference(W: np.ndarray, fmt: WeightFormat, R: np.ndarray, damp: float = 0.01):
    """Plain float64 GPTQ, column by column, params from current weights at each group start."""
    W = W.astype(np.float64).copy()
    out_f, in_f = W.shape
    G = in_f if fmt.group_size == -1 else fmt.group_size
    H = 2 * R
    H[np.diag_indices(in_f)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: Hinv = Uᵀ U
    book = nf_codebook(fmt.bits).double().numpy()
    codes, deq = np.zeros((out_f, in_f), dtype=np.int64), np.zeros((out_f, in_f))
    for i in range(in_f):
        if i % G == 0:
            grp = W[:, i : i + G]
            if fmt.format == "int":
                lo = np.float16(grp.min(1)).astype(np.float64)
                scale = np.float16((grp.max(1) - grp.min(1)) / (2**fmt.bits - 1)).astype(np.float64)
            else:
                div = 2 ** (fmt.bits - 1) - 1 if fmt.format == "int-sym" else 1
                scale = np.float16(np.abs(grp).max(1) / div).astype(np.float64)
            safe = np.where(scale > 0, scale, 1.0)
        w = W[:, i]
        if fmt.format == "int":
            c = np.clip(np.round((w - lo) / safe), 0, 2**fmt.bits - 1)
            q = c * scale + lo
        elif fmt.format == "int-sym":
            half = 2 ** (fmt.bits - 1)
            c = np.clip(np.round(w / safe), -half, half - 1) + half
            q = (c - half) * scale
        else:
            c = np.abs(np.clip(w / safe, -1, 1)[:, None] - book[None, :]).argmin(1)
            q = book[c] * scale
        codes[:, i], deq[:, i] = c, q
        err = (w - q) / U[i, i]
        W[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])
    return codes, deq


@pytest.mark.parametrize("f,bits", FORMATS)
@pytest.mark.parametrize("group", [8, 7, -1])
def test_matches_float64_reference(f, bits, group):
    shape = (8, 24)
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    R = correlated(512, 24, seed=4)
    fmt = WeightFormat(f, bits, group)
    ref_codes, ref_deq = reference(W.numpy(), fmt, R.numpy())
    got = gptq_quantize(W, fmt, R, block_size=5)
    got_codes = codes(got, fmt, shape).long().numpy()
    assert (got_codes == ref_codes).mean() >= 0.99
    same = got_codes == ref_codes
    deq = dequantize_weight(got, fmt, shape, torch.float64).numpy()
    np.testing.assert_allclose(deq[same], ref_deq[same], rtol=0, atol=1e-3)  # fp16 params
    # lazy blocks only change rounding: block sizes 1, 4 and >= in agree
    for bs in (1, 4, 64):
        other = gptq_quantize(W, fmt, R, block_size=bs)
        assert (codes(other, fmt, shape) == codes(got, fmt, shape)).float().mean() >= 0.99
        assert output_error(W, other, fmt, R) == pytest.approx(output_error(W, got, fmt, R), rel=0.02)


@pytest.mark.parametrize("group", [16, -1])
def test_act_order_with_varying_input_scales(group):
    g = torch.Generator().manual_seed(5)
    in_f = 96
    scales = torch.logspace(-2, 1, in_f, dtype=torch.float64)[torch.randperm(in_f, generator=g)]
    X = torch.randn(4096, in_f, generator=g, dtype=torch.float64)
    X = (X + 0.5 * X.roll(1, dims=1)) * scales
    R = X.T @ X / X.shape[0]
    W = torch.randn(48, in_f, generator=g)
    fmt = WeightFormat("int", 3, group)
    plain = gptq_quantize(W, fmt, R)
    ordered = gptq_quantize(W, fmt, R, act_order=True)
    assert {n: (tuple(t.shape), t.dtype) for n, t in ordered.items()} == fmt.layout(48, in_f)
    # over seeds 0-5 act_order gives 0.92-0.95x plain GPTQ's error, 0.80-0.88x round-to-nearest's
    assert output_error(W, ordered, fmt, R) < 0.97 * output_error(W, plain, fmt, R)
    assert output_error(W, ordered, fmt, R) < 0.9 * output_error(W, quantize_weight(W, fmt), fmt, R)
    # static groups: parameters are round-to-nearest's, from the original weights
    rtn = quantize_weight(W, fmt)
    assert torch.equal(ordered["scales"], rtn["scales"]) and torch.equal(ordered["offsets"], rtn["offsets"])


def test_errors():
    W, R = torch.randn(4, 8), torch.eye(8, dtype=torch.float64)
    with pytest.raises(LoquantError, match="drop --double-quant"):
        gptq_quantize(W, WeightFormat("int", 4, 8, double_quant=True), R)
    with pytest.raises(LoquantError, match="icq"):
        gptq_quantize(W, WeightFormat("nf", 4, 8, icq=True), R)
    for bad in (float("nan"), float("inf")):
        W2 = W.clone()
        W2[1, 2] = bad
        with pytest.raises(LoquantError, match="NaN or Inf"):
            gptq_quantize(W2, WeightFormat("int", 4, 8), R)
    with pytest.raises(LoquantError, match="shape"):
        gptq_quantize(W, WeightFormat("int", 4, 8), torch.eye(7, dtype=torch.float64))
    with pytest.raises(LoquantError, match="positive definite"):
        gptq_quantize(W, WeightFormat("int", 4, 8), -torch.eye(8, dtype=torch.float64), damp=0.0)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs(act_order):
    R = correlated(512, 24, seed=6)
    dead = [0, 5, 23]
    R[dead, :] = 0
    R[:, dead] = 0
    W = torch.randn(8, 24, generator=torch.Generator().manual_seed(7))
    fmt = WeightFormat("int", 4, 8)
    got = gptq_quantize(W, fmt, R, act_order=act_order)
    deq = dequantize_weight(got, fmt, (8, 24))
    assert torch.isfinite(deq).all()
    live = [i for i in range(24) if i not in dead]
    # dead inputs are zeroed: their weights quantize near 0 and feed no error to the others
    assert deq[:, dead].abs().max() <= got["scales"].float().max() / 2 + 1e-3
    if not act_order:
        W0 = W.clone()
        W0[:, dead] = 0
        alone = gptq_quantize(W0, fmt, R)
        assert torch.equal(dequantize_weight(alone, fmt, (8, 24))[:, live], deq[:, live])
    assert output_error(W, got, fmt, R) < output_error(W, quantize_weight(W, fmt), fmt, R)


def test_all_zero_weights_and_inputs():
    fmt = WeightFormat("int-sym", 3, 8)
    got = gptq_quantize(torch.zeros(4, 20), fmt, torch.zeros(20, 20, dtype=torch.float64))
    assert torch.equal(dequantize_weight(got, fmt, (4, 20)), torch.zeros(4, 20))


def test_timing_report(capsys):
    """Not asserted: GPTQ time on this machine for SmolLM2-135M-sized layers at int3 g64."""
    fmt = WeightFormat("int", 3, 64)
    for out_f, in_f in [(1536, 576), (576, 1536)]:
        W = torch.randn(out_f, in_f)
        R = correlated(1024, in_f)
        t = time.perf_counter()
        gptq_quantize(W, fmt, R)
        with capsys.disabled():
            print(f"\ngptq {out_f}x{in_f} int3 g64: {time.perf_counter() - t:.3f} s")
