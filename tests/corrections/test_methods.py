"""Each correction on a random layer with correlated, outlier-heavy inputs."""

import numpy as np
import pytest
import scipy.linalg
import torch

from loquant import LoquantError, WeightFormat
from loquant.calibration import InputStats
from loquant.corrections import METHODS, correct
from loquant.formats import dequantize_weight

FMT = WeightFormat("int", 3, 32)
RANK = 8


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g, dtype=torch.float64) * 0.1
    W[:, :3] *= 8  # a few large input columns
    mix = torch.randn(96, 96, generator=g, dtype=torch.float64) / 10
    scale = torch.ones(96, dtype=torch.float64)
    scale[torch.randperm(96, generator=g)[:6]] = 20  # outlier channels, as LLM activations have
    X = (torch.randn(4000, 96, generator=g, dtype=torch.float64) @ (torch.eye(96) + mix)) * scale
    stats = InputStats.zeros(96, "cpu")
    for chunk in X.split(1000):
        stats.add(chunk)
    return W, stats


def output_error(W, result, R):
    Q = dequantize_weight(result.tensors, FMT, tuple(W.shape), torch.float64)
    C = result.B @ result.A if result.A is not None else torch.zeros_like(W)
    D = W - Q - C
    return torch.trace(D @ R @ D.T).item()


def weight_error(W, result):
    Q = dequantize_weight(result.tensors, FMT, tuple(W.shape), torch.float64)
    C = result.B @ result.A if result.A is not None else torch.zeros_like(W)
    return (W - Q - C).norm().item()


def test_stats_accumulate_exactly(layer):
    W, stats = layer
    assert stats.count == 4000 and stats.R.shape == (96, 96)
    assert torch.allclose(stats.mean_sq, torch.diagonal(stats.R), rtol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_every_method_beats_none_on_output_error(layer, method):
    W, stats = layer
    base = output_error(W, correct(W, FMT, "none", RANK), stats.R)
    result = correct(W, FMT, method, RANK, stats=stats)
    assert result.A.shape == (RANK, 96) and result.B.shape == (64, RANK)
    assert output_error(W, result, stats.R) < base


def test_qera_exact_attains_the_closed_form_optimum(layer):
    """min over rank-r C of tr((E-C) R (E-C)ᵀ) = the tail energy of E R^½ (Eckart-Young), with
    R^½ from scipy's sqrtm in float64: a route independent of loquant's eigendecomposition."""
    W, stats = layer
    result = correct(W, FMT, "qera-exact", RANK, stats=stats, damping=0.0)
    E = W - dequantize_weight(result.tensors, FMT, tuple(W.shape), torch.float64)
    root = np.real(scipy.linalg.sqrtm(stats.R.numpy()))
    sv = np.linalg.svd(E.numpy() @ root, compute_uv=False)
    optimum = float((sv[RANK:] ** 2).sum())
    assert output_error(W, result, stats.R) == pytest.approx(optimum, rel=1e-8)
    # and no other method of the same base gets below it
    for method in ("svd", "lqer", "qera-approx"):
        assert output_error(W, correct(W, FMT, method, RANK, stats=stats), stats.R) > optimum * 1.0001


def test_svd_is_eckart_young_on_the_weight_error(layer):
    W, _ = layer
    result = correct(W, FMT, "svd", RANK)
    E = W - dequantize_weight(result.tensors, FMT, tuple(W.shape), torch.float64)
    sv = torch.linalg.svdvals(E)
    assert weight_error(W, result) == pytest.approx(sv[RANK:].square().sum().sqrt().item(), rel=1e-10)


def test_qera_approx_is_exact_for_diagonal_r(layer):
    W, _ = layer
    X = torch.randn(3000, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stats = InputStats.zeros(96, "cpu")
    stats.add(X * torch.linspace(0.1, 5, 96, dtype=torch.float64))
    diag = stats.mean_sq
    stats.xtx = torch.diag(diag) * stats.count  # make R exactly diagonal
    approx = correct(W, FMT, "qera-approx", RANK, stats=stats)
    exact = correct(W, FMT, "qera-exact", RANK, stats=stats)
    assert output_error(W, approx, stats.R) == pytest.approx(output_error(W, exact, stats.R), rel=1e-8)


def test_loftq_and_lqlora_improve_the_weight_error(layer):
    W, _ = layer
    svd = weight_error(W, correct(W, FMT, "svd", RANK))
    loftq1 = correct(W, FMT, "loftq", RANK, iters=1)
    assert weight_error(W, loftq1) == pytest.approx(svd, rel=1e-10)  # one iteration is plain SVD
    loftq5 = correct(W, FMT, "loftq", RANK)
    assert loftq5.iterations == 5 and weight_error(W, loftq5) < svd
    lq = correct(W, FMT, "lqlora", RANK)
    assert 1 <= lq.iterations <= 20 and weight_error(W, lq) <= weight_error(W, loftq5) * 1.0001


def test_fisher_weighting_lowers_the_weighted_error(layer):
    W, _ = layer
    g = torch.Generator().manual_seed(2)
    fisher = torch.rand(64, 1, generator=g, dtype=torch.float64) * torch.rand(1, 96, generator=g, dtype=torch.float64)
    fisher[:4] *= 100
    rows, cols = fisher.mean(1).sqrt(), fisher.mean(0).sqrt()

    def weighted(result):
        Q = dequantize_weight(result.tensors, FMT, tuple(W.shape), torch.float64)
        return (rows[:, None] * (W - Q - result.B @ result.A) * cols).norm().item()

    plain = correct(W, FMT, "lqlora", RANK, iters=1)
    assert weighted(correct(W, FMT, "lqlora", RANK, iters=1, fisher=fisher)) < weighted(plain)


def test_bad_input(layer):
    W, stats = layer
    with pytest.raises(LoquantError, match="rank 65"):
        correct(W, FMT, "svd", 65)
    with pytest.raises(LoquantError, match="unknown method"):
        correct(W, FMT, "magic", 4)
    with pytest.raises(LoquantError, match="needs calibration"):
        correct(W, FMT, "lqer", 4)
    few = InputStats.zeros(96, "cpu")
    few.add(torch.randn(50, 96, dtype=torch.float64))
    with pytest.raises(LoquantError, match="50 calibration tokens"):
        correct(W, FMT, "qera-exact", 4, stats=few, damping=0.0)
    assert correct(W, FMT, "qera-exact", 4, stats=few).A is not None  # damping makes it well posed


@pytest.mark.parametrize("method", ["lqer", "qera-approx", "qera-exact"])
def test_alternation_never_raises_the_output_error(layer, method):
    W, stats = layer
    once = correct(W, FMT, method, RANK, stats=stats)
    alt = correct(W, FMT, method, RANK, stats=stats, iters=10)
    assert once.iterations == 1 and 1 <= alt.iterations <= 10
    assert output_error(W, alt, stats.R) <= output_error(W, once, stats.R)
