import pytest
import scipy.linalg
import torch

from loquant.adapters.wht import WHTAdapter, ada_alloc, fwht, qwha_init, wht_block
from loquant.errors import LoquantError


def hadamard(n: int, block: int | None = None) -> torch.Tensor:
    """The explicit orthonormal I_K ⊗ H_block (Sylvester order), float64."""
    block = block or n & -n
    H = torch.tensor(scipy.linalg.hadamard(block), dtype=torch.float64) / block**0.5
    return torch.block_diag(*[H] * (n // block))


def correlated_R(dim: int, seed: int = 0) -> torch.Tensor:
    """A full-rank, strongly correlated second moment with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(dim, dtype=torch.float64) + 0.5 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scale = torch.rand(dim, generator=g, dtype=torch.float64) * 4 + 0.1
    X = torch.randn(8 * dim, dim, generator=g, dtype=torch.float64) @ mix * scale
    return X.T @ X / X.shape[0]


def error_matrix(out: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(out, 1, generator=g, dtype=torch.float64) + 0.1  # uneven row norms
    return torch.randn(out, dim, generator=g, dtype=torch.float64) * rows


def delta(out: int, dim: int, rows, cols, values) -> torch.Tensor:
    F = torch.zeros(out, dim, dtype=torch.float64)
    F[rows, cols] = values.double()
    return fwht(F)


def output_error(D: torch.Tensor, R: torch.Tensor | None) -> float:
    return (D.square().sum() if R is None else ((D @ R) * D).sum()).item()


def test_wht_block():
    assert [wht_block(n) for n in (1, 7, 8, 64, 576, 1536, 12)] == [1, 1, 8, 64, 64, 512, 4]


@pytest.mark.parametrize("n", [8, 64, 576, 1536, 7])
def test_fwht_matches_explicit_matrix(n):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    H = hadamard(n)
    torch.testing.assert_close(fwht(x), x @ H, rtol=0, atol=1e-12)
    torch.testing.assert_close(H @ H, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(H, H.T)
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=0, atol=1e-12)  # H·H = I through the fast path


def test_fwht_block_cap_and_bad_block():
    x = torch.randn(4, 64, dtype=torch.float64)
    torch.testing.assert_close(fwht(x, 16), x @ hadamard(64, 16), rtol=0, atol=1e-12)
    for bad in (3, 128, 0):
        with pytest.raises(LoquantError):
            fwht(x, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fwht_low_precision(dtype):
    x = torch.randn(5, 1536, dtype=torch.float64) * 100
    y = fwht(x.to(dtype))
    assert y.dtype == dtype
    ref = x.to(dtype).double() @ hadamard(1536)
    assert (y.double() - ref).norm() / ref.norm() < 3 * torch.finfo(dtype).eps * 9  # log2(512) stages


def test_fwht_is_differentiable():
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 24, dtype=torch.float64)
    (fwht(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ hadamard(24).T)


def adapter(out=12, dim=24, dtype=torch.float64, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(1)
    flat = torch.randperm(out * dim, generator=g)[:40]
    return WHTAdapter(
        dim, out, (flat // dim).to(index_dtype), (flat % dim).to(index_dtype), torch.randn(40, generator=g), dtype=dtype
    )


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_adapter_forward_equals_delta_weight(index_dtype):
    a = adapter(index_dtype=index_dtype)
    assert a.rows.dtype == index_dtype and a.values.dtype == torch.float32 and a.num_params == 40
    F = a.coefficients(torch.float64)
    assert F.count_nonzero() == 40
    torch.testing.assert_close(F[a.rows.long(), a.cols.long()], a.values.double())
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    y = a(x)
    assert y.shape == (3, 5, 12) and y.dtype == torch.float64
    W = a.delta_weight(torch.float64)
    torch.testing.assert_close(y, x @ W.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W, F @ hadamard(24), rtol=1e-12, atol=1e-12)


def test_adapter_dtypes():
    a = adapter(dtype=None)
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    y = a(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ a.delta_weight(torch.float64).T
    assert (y.double() - ref).norm() / ref.norm() < 0.05


def test_gradient_flows_only_to_values():
    a = adapter()
    x = torch.randn(6, 24, dtype=torch.float64)
    a(x).square().sum().backward()
    assert [n for n, p in a.named_parameters()] == ["values"]
    assert a.values.grad is not None and a.values.grad.abs().sum() > 0
    assert set(a.state_dict()) == {"values", "rows", "cols"}
    # the gradient is the one of the dense F at the kept positions
    F = a.coefficients(torch.float64).detach().requires_grad_()
    (fwht(x) @ F.T).square().sum().backward()
    torch.testing.assert_close(a.values.grad, F.grad[a.rows, a.cols].float())


def test_adapter_rejects_bad_positions():
    with pytest.raises(LoquantError):
        WHTAdapter(8, 4, torch.tensor([0, 0]), torch.tensor([1, 1]))
    with pytest.raises(LoquantError):
        WHTAdapter(8, 4, torch.tensor([4]), torch.tensor([1]))


def test_ada_alloc():
    w = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    k = ada_alloc(w, 23, 100)
    assert k.sum() == 23 and k[3] == 0
    assert ((k - 23 * w / w.sum()).abs() < 1).all()
    k = ada_alloc(torch.tensor([100.0, 1.0, 1.0, 0.0]), 20, 8)  # overflow of the big row is redistributed
    assert k.tolist() == [8, 6, 6, 0]
    k = ada_alloc(torch.tensor([5.0, 0.0, 0.0, 1.0]), 30, 8)  # positive rows full: the rest spreads over zero rows
    assert k.sum() == 30 and k[0] == 8 and k[3] == 8 and (k <= 8).all()
    assert ada_alloc(torch.zeros(3), 5, 4).sum() == 5
    with pytest.raises(LoquantError):
        ada_alloc(w, 501, 100)


def test_qwha_budgets_follow_row_norms():
    E, params = error_matrix(32, 64), 500
    rows, cols, values = qwha_init(E, correlated_R(64), params)
    k = torch.bincount(rows, minlength=32)
    assert k.sum() == params == values.numel()
    norms = E.norm(dim=1)
    assert ((k - params * norms / norms.sum()).abs() < 1).all()
    assert rows.dtype == cols.dtype == torch.int64 and values.dtype == torch.float32
    flat = rows * 64 + cols
    assert (flat[1:] > flat[:-1]).all()  # sorted by (row, col), no repeats


@pytest.mark.parametrize("R", [None, "corr"])
def test_full_budget_recovers_error(R):
    E = error_matrix(16, 24)
    R = correlated_R(24) if R else None
    rows, cols, values = qwha_init(E, R, 16 * 24)
    torch.testing.assert_close(delta(16, 24, rows, cols, values), E, rtol=0, atol=1e-5)
    assert output_error(E - delta(16, 24, rows, cols, values), R) < 1e-10 * output_error(E, R)


def test_identity_R_gives_projection_and_monotone_error():
    E = error_matrix(32, 64)
    C = fwht(E)
    last = output_error(E, None)
    for params in (0, 64, 128, 256, 512, 1024, 2048):
        rows, cols, values = qwha_init(E, torch.eye(64, dtype=torch.float64), params)  # the least-squares path
        torch.testing.assert_close(values, C[rows, cols].float(), rtol=1e-5, atol=1e-6)
        plain = qwha_init(E, None, params)
        assert torch.equal(plain[0], rows) and torch.equal(plain[1], cols)
        # the kept coefficients of each row are its largest in magnitude
        for i in range(0, 32, 7):
            kept = C[i, cols[rows == i]].abs()
            dropped = C[i].abs().sort(descending=True).values[kept.numel() :]
            assert kept.numel() == 0 or dropped.numel() == 0 or kept.min() >= dropped.max()
        err = output_error(E - delta(32, 64, rows, cols, values), None)
        assert err <= last * (1 + 1e-6)
        last = err
    assert last == pytest.approx(0, abs=1e-8)


def test_correlated_R_refinement_beats_plain_coefficients():
    out, dim, params = 48, 96, 48 * 20
    E, R = error_matrix(out, dim, seed=2), correlated_R(dim, seed=3)
    C = fwht(E)
    rows, cols, values = qwha_init(E, R, params)
    refined = output_error(E - delta(out, dim, rows, cols, values), R)
    plain_same_support = output_error(E - delta(out, dim, rows, cols, C[rows, cols]), R)
    r0, c0, v0 = qwha_init(E, None, params)
    identity_selection = output_error(E - delta(out, dim, r0, c0, v0), R)
    assert refined < 0.95 * plain_same_support
    assert refined < 0.95 * identity_selection
    assert refined < output_error(E, R)
    # refinement is the least-squares optimum on its support: perturbing any value raises the error
    for j in (0, 17, 400):
        bumped = values.clone()
        bumped[j] += 1e-2
        assert output_error(E - delta(out, dim, rows, cols, bumped), R) > refined


def test_zero_rows_and_singular_R():
    E = error_matrix(8, 16)
    E[[1, 5]] = 0
    R = correlated_R(16)
    R[:, 3] = R[3, :] = 0  # a dead input channel: singular R, handled by the damping
    rows, cols, values = qwha_init(E, R, 40)
    k = torch.bincount(rows, minlength=8)
    assert k.sum() == 40 and k[1] == 0 and k[5] == 0
    assert torch.isfinite(values).all()
    rows, cols, values = qwha_init(torch.zeros(8, 16), R, 40)
    assert values.numel() == 40 and (values == 0).all()
    rows, cols, values = qwha_init(E, R, 0)
    assert rows.numel() == 0
    with pytest.raises(LoquantError):
        qwha_init(E, torch.zeros(16, 16, dtype=torch.float64), 10)


def test_qwha_init_feeds_adapter_on_odd_width():
    E, R = error_matrix(10, 21), correlated_R(21)  # odd width: identity transform, sparse weight-domain update
    rows, cols, values = qwha_init(E, R, 60)
    a = WHTAdapter(21, 10, rows, cols, values)
    assert a.block == 1
    W = a.delta_weight(torch.float64)
    assert W.count_nonzero() == 60
    assert output_error(E - W, R) < output_error(E, R)


def test_selection_weights_by_basis_energy():
    # R = H diag(g) H makes G = H R H = diag(g): the refit is C itself and the best support of
    # each row is exactly its top C_ij²·g_j, which differs from the top |C_ij|.
    out, dim = 16, 32
    E = error_matrix(out, dim, seed=4)
    C, H = fwht(E), hadamard(dim)
    g = torch.logspace(-2, 2, dim, dtype=torch.float64)[torch.randperm(dim, generator=torch.Generator().manual_seed(5))]
    rows, cols, values = qwha_init(E, H @ torch.diag(g) @ H, 128)
    torch.testing.assert_close(values, C[rows, cols].float(), rtol=1e-5, atol=1e-6)
    score = C.square() * g
    for i in range(out):
        kept = cols[rows == i]
        assert set(kept.tolist()) == set(score[i].topk(kept.numel()).indices.tolist())
    assert not torch.equal(cols, qwha_init(E, None, 128)[1])


def test_chunked_solves_match():
    E, R = error_matrix(24, 32, seed=6), correlated_R(32, seed=7)
    one = qwha_init(E, R, 200)
    many = qwha_init(E, R, 200, chunk_elements=50)  # one row per chunk
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b)
