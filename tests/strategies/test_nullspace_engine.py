"""Null-space engine: covariance accumulation, selection rules and projector algebra against closed forms."""
import math

import pytest
import scipy.linalg
import torch

from mambacl.strategies.features import delta_x_rows
from mambacl.strategies.nullspace import NullSpaceEngine, build_projector, knee_index, null_space_size


def _rank_deficient(rows=12, dim=20, rank=7):
    return torch.randn(rows, rank, dtype=torch.float64) @ torch.randn(rank, dim, dtype=torch.float64)


def test_covariance_over_batches_equals_one_shot():
    x = torch.randn(60, 9)
    eng = NullSpaceEngine()
    for chunk in x.split(15):
        eng.add("k", chunk)
    x64 = x.double()
    torch.testing.assert_close(eng.covariances["k"], x64.T @ x64 / 15, rtol=1e-12, atol=1e-12)
    assert eng.covariances["k"].dtype == torch.float64 and eng.rows["k"] == 60


def test_covariance_sums_across_experiences():
    a, b = torch.randn(10, 5), torch.randn(4, 5)
    eng = NullSpaceEngine()
    eng.add("k", a)
    eng.add("k", b)
    a64, b64 = a.double(), b.double()
    torch.testing.assert_close(eng.covariances["k"], a64.T @ a64 / 10 + b64.T @ b64 / 4)
    with pytest.raises(ValueError, match="width"):
        eng.add("k", torch.randn(3, 6))


@pytest.mark.parametrize("kind", ["strict", "soft"])
def test_kernel_projector_matches_scipy_null_space(kind):
    x = _rank_deficient()
    eng = NullSpaceEngine(selection="kernel", projector=kind, eta=0.9)
    eng.add("k", x)
    p = eng.update_projectors()["k"]
    basis = torch.from_numpy(scipy.linalg.null_space(x.numpy()))  # independent reference, [20, 13]
    p0 = basis @ basis.T
    k = basis.shape[1]
    assert eng.null_dims["k"] == k == 13
    expected = p0 if kind == "strict" else 0.9 * p0 / math.sqrt(k) + 0.1 * torch.eye(20, dtype=torch.float64)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(p, p.T, rtol=0, atol=0)
    if kind == "strict":
        torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-10)
        assert (x @ p).abs().max() < 1e-10 * x.abs().max()


def test_soft_projector_formula_and_empty_null_space():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v = q[:, :2]
    p = build_projector(v, "soft", eta=0.95)
    torch.testing.assert_close(torch.linalg.matrix_norm(v @ v.T), torch.tensor(math.sqrt(2), dtype=torch.float64))
    # null directions get eta/sqrt(k) + (1 - eta), range directions (1 - eta)
    torch.testing.assert_close(p @ v, v * (0.95 / math.sqrt(2) + 0.05))
    torch.testing.assert_close(p @ q[:, 2:], q[:, 2:] * 0.05)
    torch.testing.assert_close(build_projector(v[:, :0], "soft", 0.95), 0.05 * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(build_projector(v[:, :0], "strict"), torch.zeros(6, 6, dtype=torch.float64))


def test_knee_on_piecewise_linear_spectrum_is_the_kink():
    # Gaussian smoothing of a kink gives a second difference peaked exactly at the kink.
    idx = torch.arange(300, dtype=torch.float64)
    s = torch.where(idx < 120, 500 - 3 * idx, 500 - 3 * 120 - 0.2 * (idx - 120))
    assert knee_index(s) == 120
    assert null_space_size(s, "knee") == 180


def test_knee_on_rank_deficient_spectrum_selects_only_kernel_directions():
    s = torch.cat([torch.linspace(10, 1, 70, dtype=torch.float64), torch.zeros(130, dtype=torch.float64)])
    k0 = knee_index(s)
    assert 70 <= k0 <= 70 + 3 * 10  # the null space lies inside the true kernel, within 3 sigma of it


def test_knee_on_flat_spectrum_gives_no_null_space():
    s = torch.full((100,), 3.0, dtype=torch.float64)
    assert knee_index(s) == 100 and null_space_size(s, "knee") == 0


def test_adam_nscl_and_energy_rules():
    lam = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.05], dtype=torch.float64)
    assert null_space_size(lam, "adam_nscl", a=10.0) == 2  # 0.5 and 0.05 <= 10 * 0.05
    assert null_space_size(lam, "adam_nscl", a=1.0) == 1
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert null_space_size(lam, "energy", threshold=0.65) == 2  # top-2 hold 70% >= 65%
    assert null_space_size(lam, "energy", threshold=0.3) == 3
    assert null_space_size(lam, "kernel") == 0


def test_non_finite_covariance_and_bad_arguments_raise():
    eng = NullSpaceEngine()
    eng.add("k", torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        eng.update_projectors()
    with pytest.raises(ValueError, match="selection"):
        NullSpaceEngine(selection="svd")
    with pytest.raises(ValueError, match="projector"):
        NullSpaceEngine(projector="hard")
    with pytest.raises(ValueError, match="eta"):
        NullSpaceEngine(eta=1.5)
    with pytest.raises(ValueError, match="features"):
        eng.add("k", torch.ones(3))


def test_state_dict_round_trip():
    eng = NullSpaceEngine(selection="kernel", projector="strict")
    eng.add("k", _rank_deficient())
    eng.update_projectors()
    other = NullSpaceEngine(selection="kernel", projector="strict")
    other.load_state_dict(eng.state_dict())
    torch.testing.assert_close(other.projectors["k"], eng.projectors["k"], rtol=0, atol=0)
    torch.testing.assert_close(other.covariances["k"], eng.covariances["k"], rtol=0, atol=0)
    assert other.rows == eng.rows and other.null_dims == eng.null_dims


def test_knee_on_short_spectrum_uses_the_raw_second_difference():
    # Below 128 values the authors' rule does not smooth: a kink near the start is found exactly.
    idx = torch.arange(40, dtype=torch.float64)
    s = torch.where(idx < 3, 100 - 20 * idx, 100 - 60 - 0.5 * (idx - 3))
    assert knee_index(s) == 3
    assert knee_index(s, min_smooth=3) != 3  # smoothed with sigma = 10 the kink moves


def test_knee_margin_ignores_the_ends_of_long_spectra():
    # 1.5% of 200 = 3 indices are ignored at each end: a kink at index 2 is skipped in favour of the one at 100.
    idx = torch.arange(200, dtype=torch.float64)
    s = 1e4 - 1000 * idx.clamp(max=2) - 10 * (idx - 2).clamp(min=0).clamp(max=98) - 0.1 * (idx - 100).clamp(min=0)
    assert knee_index(s, sigma=0.3) == 100  # a narrow kernel keeps the kink at 2 inside the ignored margin
    with pytest.raises(ValueError, match="margin"):
        knee_index(s, margin=0.6)


@pytest.mark.parametrize("length", [3, 12], ids=["L<D", "L>=D"])
def test_delta_x_rows_have_the_gram_matrix_of_f(length):
    b, width = 4, 8
    delta, x = torch.rand(b, length, width), torch.randn(b, length, width)
    f = torch.zeros(b, width, width, dtype=torch.float64)  # F[b, i, :] = sum_t delta[b, t, i] x[b, t, :]
    for t in range(length):
        f += delta[:, t, :, None].double() * x[:, t, None, :].double()
    reference = NullSpaceEngine()
    reference.add("k", f.reshape(-1, width))
    compressed = NullSpaceEngine()
    stash = {"x": x}
    rows, count = delta_x_rows(stash, None, (delta,), delta)
    compressed.add("k", rows, count)
    assert count == b * width and rows.shape[0] == b * min(length, width) and not stash
    torch.testing.assert_close(compressed.covariances["k"], reference.covariances["k"], rtol=1e-10, atol=1e-12)
    assert compressed.rows == reference.rows
