"""Null-space engine: covariance accumulation, selection rules and projector algebra against closed forms."""
import math

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter1d
import torch

from mambacl.strategies.features import delta_x_rows
from mambacl.strategies.nullspace import (NonFiniteFeaturesError, NullSpaceEngine, auto_rule, build_projector,
                                         descending_eigh, knee_index, null_space_size)


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


def test_non_finite_features_never_reach_the_covariance_and_bad_arguments_raise():
    eng = NullSpaceEngine()
    eng.add("k", torch.eye(2))
    with pytest.raises(NonFiniteFeaturesError, match="'k' have 1 NaN/Inf"):
        eng.add("k", torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    torch.testing.assert_close(eng.covariances["k"], torch.eye(2, dtype=torch.float64) / 2)  # batch not added
    assert eng.rows["k"] == 2
    eng.covariances["k"][0, 0] = float("inf")  # a corrupted state still cannot produce a projector
    with pytest.raises(NonFiniteFeaturesError, match="non-finite"):
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
    assert other.rows == eng.rows and other.null_dims == eng.null_dims == {"k": 13}
    assert other.selected == eng.selected and other.selected["k"]["rule"] == "kernel"
    legacy = {k: v for k, v in eng.state_dict().items() if k != "selected"}  # saved before `selected` existed
    other.load_state_dict(legacy)
    assert other.selected == {"k": {"dim": 20, "null": 13, "rule": None, "projector": None, "solver": None}}


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


def _spectrum_features(rows, scales):
    """[rows, D] features whose covariance has (about) the squared ``scales`` as eigenvalues, in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(len(scales), len(scales), dtype=torch.float64))
    return torch.randn(rows, len(scales), dtype=torch.float64) * torch.as_tensor(scales) @ q.T


def _reference_projector(x, rule, kind, eta=0.95, **kwargs):
    """Projector from numpy's eigh of X^T X / rows and the rule called directly."""
    vals, vecs = np.linalg.eigh((x.T @ x / x.shape[0]).numpy())
    vals, vecs = torch.from_numpy(vals[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())
    k = null_space_size(vals, rule, **kwargs)
    return build_projector(vecs[:, vecs.shape[1] - k:], kind, eta), k


def test_auto_selects_by_width_like_the_two_rules_called_directly():
    small = _spectrum_features(400, torch.logspace(1, -2, 64))  # D = 64 < 128: energy 0.99 + strict
    idx = torch.arange(256, dtype=torch.float64)  # D = 256: knee (a kink at 100) + the soft projector
    big = _spectrum_features(2000, torch.where(idx < 100, 20 - 0.15 * idx, 5 - 0.01 * (idx - 100)))
    eng = NullSpaceEngine(projector="soft", eta=0.9)
    assert eng.selection == "auto" and eng.auto_min_dim == 128 and eng.auto_threshold == 0.99
    eng.add("small", small)
    eng.add("big", big)
    eng.update_projectors()
    p_small, k_small = _reference_projector(small, "energy", "strict", threshold=0.99)
    p_big, k_big = _reference_projector(big, "knee", "soft", eta=0.9)
    assert 0 < k_small < 64 and 0 < k_big < 256
    assert eng.selected["small"] == {"dim": 64, "null": k_small, "rule": "energy", "projector": "strict",
                                     "solver": "eigh"}
    assert eng.selected["big"] == {"dim": 256, "null": k_big, "rule": "knee", "projector": "soft", "solver": "eigh"}
    torch.testing.assert_close(eng.projectors["small"], p_small, rtol=0, atol=1e-8)
    torch.testing.assert_close(eng.projectors["big"], p_big, rtol=0, atol=1e-8)
    # the same as engines configured with each rule explicitly
    for key, explicit in (("small", NullSpaceEngine("energy", "strict", threshold=0.99)),
                          ("big", NullSpaceEngine("knee", "soft", eta=0.9))):
        explicit.add(key, small if key == "small" else big)
        torch.testing.assert_close(explicit.update_projectors()[key], eng.projectors[key], rtol=0, atol=1e-10)
    # the knee rule alone degenerates on the narrow key: it keeps almost every direction null
    assert NullSpaceEngine("knee").rule_for(64) == ("knee", "soft")
    knee_small = NullSpaceEngine("knee")
    knee_small.add("small", small)
    knee_small.update_projectors()
    assert knee_small.null_dims["small"] >= 62 > k_small


def test_auto_width_threshold_and_energy_are_parameters():
    assert auto_rule(127) == ("energy", "strict") and auto_rule(128) == ("knee", "soft")
    assert auto_rule(128, "strict") == ("knee", "strict") and auto_rule(64, min_dim=64) == ("knee", "soft")
    x = _spectrum_features(400, torch.logspace(1, -2, 64))
    eng = NullSpaceEngine(auto_min_dim=32, auto_threshold=0.5)
    eng.add("k", x)
    eng.update_projectors()
    assert eng.selected["k"]["rule"] == "knee"  # 64 >= 32
    eng = NullSpaceEngine(auto_threshold=0.5)
    eng.add("k", x)
    eng.update_projectors()
    assert eng.selected["k"]["null"] == _reference_projector(x, "energy", "strict", threshold=0.5)[1]


def test_adam_nscl_rule_takes_the_whole_numerical_kernel():
    # lambda_min of a rank-deficient covariance is 0; its kernel eigenvalues are rounding noise of both signs
    x = _rank_deficient()
    eigvals = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0)
    kernel = scipy.linalg.null_space(x.numpy()).shape[1]
    assert kernel == 13 and null_space_size(eigvals, "adam_nscl", a=10.0) == kernel


def _failing_eigh(monkeypatch, failures):
    """Make torch.linalg.eigh raise on its first ``failures`` calls."""
    original, calls = torch.linalg.eigh, []

    def eigh(a, *args, **kwargs):
        calls.append(a.clone())
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (forced)")
        return original(a, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


@pytest.mark.parametrize("failures, solver", [(1, "eigh+jitter=1e-12"), (2, "eigh+jitter=1e-10"), (99, "svd")],
                         ids=["jitter", "more-jitter", "svd"])
def test_eigh_failure_falls_back_to_jitter_then_svd(monkeypatch, failures, solver):
    x = _rank_deficient()
    reference = torch.from_numpy(scipy.linalg.null_space(x.numpy()))  # [20, 13]
    cov = x.T @ x / x.shape[0]
    calls = _failing_eigh(monkeypatch, failures)
    eigvals, eigvecs, used = descending_eigh(cov)
    assert used == solver
    if solver != "svd":  # the retry ran on cov + j * max(diag) * I, and its eigenvalues are shifted back
        jitter = float(solver.split("=")[1])
        torch.testing.assert_close(calls[-1], cov + jitter * cov.diagonal().max() * torch.eye(20, dtype=cov.dtype))
    torch.testing.assert_close(eigvals, torch.linalg.svdvals(cov), rtol=0, atol=1e-9 * float(eigvals[0]))
    torch.testing.assert_close(eigvecs @ torch.diag(eigvals) @ eigvecs.T, cov, rtol=0, atol=1e-9)

    calls.clear()  # the engine gets the same fallback and the null space of the reference
    eng = NullSpaceEngine(selection="kernel", projector="strict")
    eng.add("k", x)
    p = eng.update_projectors()["k"]
    assert eng.selected["k"]["solver"] == solver and eng.null_dims["k"] == 13
    torch.testing.assert_close(p, reference @ reference.T, rtol=0, atol=1e-9)


def _authors_adaptive_threshold(svals: np.ndarray) -> int:
    """zugexiaodui/mamba-cl train_eval.py ``adaptive_threshold`` (offset 0), ported: the number of null directions."""
    points = svals
    if len(points) >= 128:
        smooth = gaussian_filter1d(points, sigma=10)
        diff_o1 = smooth[:-1] - smooth[1:]
        diff_o2 = diff_o1[:-1] - diff_o1[1:]
        drop = int(len(points) * 0.03 / 2)
        valid = diff_o2[drop:-drop]
        thres = points[np.argmax(valid) + int((len(points) - len(valid)) / 2)]
    else:
        diff_o1 = points[:-1] - points[1:]
        diff_o2 = diff_o1[:-1] - diff_o1[1:]
        thres = points[np.argmax(diff_o2) + int((len(points) - len(diff_o2)) / 2)]
    i_thres = np.arange(len(points))[points >= thres].max()
    return len(points) - i_thres


@pytest.mark.parametrize("dim", [64, 100, 128, 300, 768])
def test_knee_equals_the_authors_rule_on_rank_deficient_covariances(dim):
    """The knee rule against an independent port of the authors' code, on covariances of fewer feature rows than
    dimensions (the case the null space exists for), 8 draws per width."""
    rng = np.random.default_rng(dim)
    for _ in range(8):
        rows = int(rng.integers(dim // 4, 3 * dim // 4))
        x = rng.standard_normal((rows, dim)) * rng.uniform(0.2, 3.0, dim)
        cov = torch.tensor(x.T @ x / rows) + 1e-9 * torch.eye(dim, dtype=torch.float64)
        svals = torch.linalg.svdvals(cov)
        assert null_space_size(svals, "knee") == _authors_adaptive_threshold(svals.numpy()), (dim, rows)
