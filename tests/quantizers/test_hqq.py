import functools

import pytest
import torch

from loquant.errors import LoquantError
from loquant.formats import WeightFormat, dequantize_weight, quantize_weight
from loquant.formats.codec import _grouped, group_params, unpack_codes
from loquant.quantizers import hqq_quantize


@functools.cache
def _heavy_tailed(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((out_f, in_f)) * 0.02


def heavy_tailed(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return _heavy_tailed(out_f, in_f, seed).clone()


def rel_err(W: torch.Tensor, tensors: dict, fmt: WeightFormat) -> float:
    return float((W - dequantize_weight(tensors, fmt, tuple(W.shape))).norm() / W.norm())


def codes_from_stored(W: torch.Tensor, tensors: dict, fmt: WeightFormat) -> torch.Tensor:
    """What codec picks against the stored (rounded) parameters."""
    group = fmt.group_len(W.shape[1])
    p = group_params(tensors, fmt)
    safe = torch.where(p["scales"] > 0, p["scales"], torch.ones_like(p["scales"]))[:, :, None]
    codes = torch.round((_grouped(W, group, 0.0) - p["offsets"][:, :, None]) / safe).clamp(0, (1 << fmt.bits) - 1)
    return codes.reshape(W.shape[0], -1)[:, : W.shape[1]].to(torch.uint8)


LAYOUTS = [
    (WeightFormat("int", 3, 64), 128),
    (WeightFormat("int", 4, 64), 96),  # short last group of 32
    (WeightFormat("int", 2, -1), 96),
    (WeightFormat("int", 3, 64, double_quant=True), 96),
]


@pytest.mark.parametrize(("fmt", "in_f"), LAYOUTS, ids=lambda x: x.describe() if isinstance(x, WeightFormat) else x)
def test_layout_and_codes_fit_stored_params(fmt, in_f):
    W = heavy_tailed(48, in_f)
    t = hqq_quantize(W, fmt)
    layout = fmt.layout(*W.shape)
    assert list(t) == list(quantize_weight(W, fmt))
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == layout
    deq = dequantize_weight(t, fmt, tuple(W.shape))
    assert deq.shape == W.shape and torch.isfinite(deq).all()
    # codes are round-to-nearest against the parameters as stored (fp16 / int8 blocks)
    assert torch.equal(unpack_codes(t, fmt, tuple(W.shape)), codes_from_stored(W, t, fmt))
    # and HQQ moved the offsets away from the group minima
    name = "offsets_q" if fmt.double_quant else "offsets"
    assert not torch.equal(t[name], quantize_weight(W, fmt)[name])
    assert rel_err(W, t, fmt) < rel_err(W, quantize_weight(W, fmt), fmt)


def test_short_last_group_padding_is_masked():
    """A 32-wide last group of a g64 layout gives the same parameters as that group written
    out twice as a full 64-wide group (same min, max, mean): padding counts for nothing."""
    fmt = WeightFormat("int", 3, 64)
    W = heavy_tailed(40, 96)
    doubled = torch.cat([W, W[:, 64:]], dim=1)
    p_short = group_params(hqq_quantize(W, fmt, iters=3), fmt)
    p_full = group_params(hqq_quantize(doubled, fmt, iters=3), fmt)
    for name in ("scales", "offsets"):
        torch.testing.assert_close(p_short[name], p_full[name], rtol=1e-3, atol=1e-6)


def _hqq_reference(W: torch.Tensor, bits: int, iters: int, p=0.7, beta=10.0, kappa=1.01):
    """HQQ's loop in its own notation (inverse scale, per row), best zero kept."""
    lo, hi = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    inv = ((1 << bits) - 1) / (hi - lo)
    zero = -lo * inv
    best, best_err = zero, float("inf")
    for i in range(iters + 1):
        W_q = torch.round(W * inv + zero).clamp(0, (1 << bits) - 1)
        W_r = (W_q - zero) / inv
        err = float((W - W_r).abs().mean())
        if not err < best_err:
            break
        best, best_err = zero, err
        if i == iters:
            break
        x = W - W_r
        W_e = torch.sign(x) * torch.relu(x.abs() - x.abs().pow(p - 1) / beta)
        zero = torch.mean(W_q - (W - W_e) * inv, dim=1, keepdim=True)
        beta *= kappa
    return (-best / inv)[:, 0]  # loquant's offset


def test_matches_hqq_notation_reference():
    # Unit-scale weights: at LLM scale (|W - W_r| ~ 1e-2) HQQ's shrinkage with beta = 10 zeroes
    # every residual and the update is plain least squares; here the lp prox is active.
    W = heavy_tailed(64, 256) / 0.02
    fmt = WeightFormat("int", 3, -1)
    offsets = hqq_quantize(W, fmt)["offsets"][:, 0].float()
    expected = _hqq_reference(W, 3, 20).half().float()
    scale = ((W.amax(1) - W.amin(1)) / 7).half().float()
    assert ((offsets - expected).abs() <= 1e-3 * scale + 1e-6).all()
    assert not torch.allclose(offsets, W.amin(1).half().float())


@pytest.mark.parametrize(("bits", "margin"), [(2, 0.85), (3, 0.95)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_lower_error_than_rtn_on_heavy_tailed_weights(bits, margin, double_quant):
    # Measured (256 x 512, StudentT(3), g64): RTN 0.670 -> HQQ 0.515 at 2 bits, 0.286 -> 0.258 at 3.
    W = heavy_tailed(256, 512)
    fmt = WeightFormat("int", bits, 64, double_quant)
    rtn = rel_err(W, quantize_weight(W, fmt), fmt)
    hqq = rel_err(W, hqq_quantize(W, fmt), fmt)
    assert hqq < margin * rtn, (hqq, rtn)


def test_early_stop_keeps_the_best_zero():
    """2-bit g64: the error stops improving before 20 iterations, so more iterations change
    nothing (without the early stop, 6 offsets differ between 20 and 60 iterations)."""
    W = heavy_tailed(256, 512)
    fmt = WeightFormat("int", 2, 64)
    a, b = hqq_quantize(W, fmt), hqq_quantize(W, fmt, iters=60)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("fmt", "in_f"), LAYOUTS, ids=lambda x: x.describe() if isinstance(x, WeightFormat) else x)
def test_zero_iterations_is_round_to_nearest(fmt, in_f):
    W = heavy_tailed(48, in_f, seed=1)
    got, want = hqq_quantize(W, fmt, iters=0), quantize_weight(W, fmt)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("fmt", [WeightFormat("int-sym", 4, 64), WeightFormat("nf", 4, 64)], ids=str)
def test_formats_without_zero_point_are_refused(fmt):
    with pytest.raises(LoquantError, match="--format int"):
        hqq_quantize(heavy_tailed(8, 64), fmt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    W = heavy_tailed(8, 64)
    W[3, 5] = bad
    with pytest.raises(LoquantError, match="NaN or Inf"):
        hqq_quantize(W, WeightFormat("int", 4, 64))


def test_bad_hyperparameters_are_refused():
    W, fmt = heavy_tailed(8, 64), WeightFormat("int", 4, 64)
    for kwargs in ({"iters": -1}, {"lp_norm": 0.0}, {"lp_norm": 2.0}, {"beta": 0.0}, {"kappa": 0.5}):
        with pytest.raises(LoquantError):
            hqq_quantize(W, fmt, **kwargs)


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_range_groups(double_quant):
    fmt = WeightFormat("int", 3, 32, double_quant)
    W = heavy_tailed(6, 96)
    W[0, :32] = 0.0
    W[1, 32:64] = 0.5
    W[2] = -0.25
    t = hqq_quantize(W, fmt)
    deq = dequantize_weight(t, fmt, tuple(W.shape))
    assert torch.isfinite(deq).all()
    p = group_params(t, fmt)
    if not double_quant:  # fp16 keeps these values exactly
        assert p["scales"][0, 0] == 0 and p["scales"][1, 1] == 0 and (p["scales"][2] == 0).all()
        assert (deq[0, :32] == 0).all() and (deq[1, 32:64] == 0.5).all() and (deq[2] == -0.25).all()
    else:
        assert (deq[0, :32] - 0).abs().max() < 0.02 and (deq[1, 32:64] - 0.5).abs().max() < 0.02
