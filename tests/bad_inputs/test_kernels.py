"""Bad inputs to the kernel entry points (selective_scan, longhorn_scan and their reference, chunk and Triton
backends): each raises the exact exception type with a message naming the argument; valid edge cases (empty
batch, empty sequence, no channels, L = 1, the finiteness check switched off) give the reference result."""
import sys
from pathlib import Path

import pytest
import torch

from mambacl.kernels import longhorn_scan, selective_scan
from mambacl.kernels import triton_scan
from mambacl.kernels.longhorn_scan import longhorn_scan_chunk
from mambacl.kernels.longhorn_scan.triton import longhorn_scan_triton
from mambacl.kernels.selective_scan import selective_scan_chunk
from mambacl.kernels.selective_scan.triton import selective_scan_triton

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
from scan_oracle import (  # noqa: E402
    Case, check_against_oracle, longhorn_args, longhorn_oracle, make_inputs, mamba_args, mamba_oracle, with_nan)

b, d, L, n = 2, 6, 5, 4  # the sizes of scan_oracle.mamba_args


def _longhorn(**overrides):
    """Variable k and constant q (the shared builder has them the other way round)."""
    return longhorn_args(**{"k": torch.randn(b, n, L), "q": torch.randn(d, n), **overrides})


BAD_CALLS = [
    pytest.param(selective_scan, mamba_args(u=torch.randn(d, L)), ValueError, r"^u must have 3 dimensions",
                 id="selective_scan-u-rank-2"),
    pytest.param(selective_scan, mamba_args(delta=torch.rand(b, d, L + 1)), ValueError, r"^delta has shape \(2, 6, 6\)",
                 id="selective_scan-delta-longer-than-u"),
    pytest.param(selective_scan, mamba_args(A=-torch.ones(d, n, dtype=torch.int32)), TypeError,
                 r"^A must be a floating tensor", id="selective_scan-A-int"),
    pytest.param(selective_scan, mamba_args(A=-torch.rand(d, 0), B=torch.randn(b, 0, L), C=torch.randn(d, 0)),
                 ValueError, r"^A: d_state must be in \[1, 256\], got 0", id="selective_scan-d_state-0"),
    pytest.param(selective_scan, mamba_args(B=torch.randn(b, 4, n, L)), ValueError,
                 r"^B: dim 6 is not divisible by the number of groups 4", id="selective_scan-B-groups"),
    pytest.param(selective_scan, mamba_args(C=torch.randn(b, n, L)[..., :-1]), ValueError, r"^C has shape \(2, 4, 4\)",
                 id="selective_scan-C-shorter-than-u"),
    pytest.param(selective_scan, mamba_args(delta_bias=torch.randn(d + 1)), ValueError, r"^delta_bias has shape \(7,\)",
                 id="selective_scan-delta_bias-length"),
    pytest.param(selective_scan, mamba_args(z=torch.randn(b, d, L, dtype=torch.complex64)), TypeError,
                 r"^z must be real", id="selective_scan-z-complex"),
    pytest.param(selective_scan, {**mamba_args(), "backend": "cuda"}, ValueError, r"^backend must be one of",
                 id="selective_scan-unknown-backend"),
    pytest.param(selective_scan, mamba_args(z=with_nan((b, d, L), (1, 2, 3))), ValueError, r"^z: non-finite",
                 id="selective_scan-z-NaN-on-cpu"),
    pytest.param(selective_scan, mamba_args(delta_bias=torch.full((d,), float("inf"))), ValueError,
                 r"^delta_bias: non-finite", id="selective_scan-delta_bias-inf-on-cpu"),
    pytest.param(selective_scan, mamba_args(u=with_nan((b, d, L), 0).bfloat16(), B=with_nan((b, n, L), (1, 3, 0))),
                 ValueError, r"^u, B: non-finite", id="selective_scan-u-bf16-and-B-NaN"),
    pytest.param(longhorn_scan, _longhorn(k=torch.randn(n)), ValueError, r"^k must be constant \(dim, d_state\)",
                 id="longhorn_scan-k-rank-1"),
    pytest.param(longhorn_scan, _longhorn(q=torch.randn(d, n + 1)), ValueError, r"^q has shape \(6, 5\), expected",
                 id="longhorn_scan-q-state-size"),
    pytest.param(longhorn_scan, _longhorn(D=torch.randn(d, device="meta")), ValueError, r"^D is on meta but u",
                 id="longhorn_scan-D-other-device"),
    pytest.param(longhorn_scan, _longhorn(u=with_nan((b, d, L), (0, 5, 4))), ValueError, r"^u: non-finite",
                 id="longhorn_scan-u-NaN-on-cpu"),
    pytest.param(longhorn_scan, {**_longhorn(), "backend": "mamba_ssm"}, ValueError, r"^backend must be one of",
                 id="longhorn_scan-unknown-backend"),
    pytest.param(selective_scan_chunk, {**mamba_args(), "chunk_size": 0}, ValueError,
                 r"^chunk_size must be a positive int",
                 id="selective_scan_chunk-chunk_size-0"),
    pytest.param(longhorn_scan_chunk, {**_longhorn(), "chunk_size": True}, ValueError, r"^chunk_size must be",
                 id="longhorn_scan_chunk-chunk_size-bool"),
    pytest.param(selective_scan_chunk, {**mamba_args(u=torch.randn(0, d, L), delta=torch.rand(0, d, L),
                                                 B=torch.randn(0, n, L), C=torch.randn(d, n), z=None),
                                        "chunk_size": -1},
                 ValueError, r"^chunk_size must be", id="selective_scan_chunk-empty-batch-chunk_size-negative"),
    pytest.param(selective_scan_triton, {**mamba_args(), "chunk_size": 3}, ValueError,
                 r"^chunk_size must be a positive power of two, got 3", id="selective_scan_triton-chunk_size-3"),
    pytest.param(longhorn_scan_triton, {**_longhorn(), "block_d": 0}, ValueError,
                 r"^block_d must be a positive power of two, got 0", id="longhorn_scan_triton-block_d-0"),
    pytest.param(longhorn_scan_triton, {**_longhorn(u=torch.randn(b, d, 0), delta=torch.randn(b, d, 0),
                                                    k=torch.randn(d, n), z=None), "chunk_size": 2.0},
                 ValueError, r"^chunk_size must be a positive power of two",
                 id="longhorn_scan_triton-empty-float-chunk"),
]


@pytest.mark.parametrize("fn,kwargs,error,match", BAD_CALLS)
def test_bad_call_raises_naming_the_argument(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(**kwargs)


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_scan, "_is_interpreted", lambda: False)
    with pytest.raises(ValueError, match=r"the triton backend needs CUDA tensors .*; u is on cpu"):
        selective_scan(**mamba_args(), backend="triton")


def test_unknown_finite_check_setting_is_named(monkeypatch):
    monkeypatch.setenv("MAMBACL_CHECK_FINITE", "yes")
    with pytest.raises(ValueError, match=r"^MAMBACL_CHECK_FINITE must be '0', '1' or unset, got 'yes'"):
        selective_scan(**mamba_args())


# ---- valid edge cases against the float64 oracle (tests/kernels/scan_oracle.py) ----

BACKENDS = ["reference", "chunk", "triton", "auto"]
OPS = {"mamba": (selective_scan, mamba_oracle), "longhorn": (longhorn_scan, longhorn_oracle)}
EDGE_CASES = [
    pytest.param(Case(0, 6, 5, 4, "var", "group3", D=True, z=True, delta_bias=True, softplus=True, last_state=True),
                 id="empty-batch"),
    pytest.param(Case(0, 4, 3, 2, "const", "const", last_state=True), id="empty-batch-constant-BC"),
    pytest.param(Case(2, 0, 5, 4, "var", "var", D=True, last_state=True), id="no-channels"),
    pytest.param(Case(2, 6, 1, 4, "group2", "var", D=True, z=True, delta_bias=True, softplus=True, last_state=True),
                 id="L1"),
    pytest.param(Case(1, 5, 1, 1, "const", "var", last_state=True), id="L1-N1"),
]


def _inputs(case: Case, dtype: torch.dtype, op: str):
    x = make_inputs(case, dtype, op)
    if op == "longhorn":
        x["k"], x["q"] = x.pop("B"), x.pop("C")
    return x


def _call(op: str, backend: str, case: Case):
    fn, _ = OPS[op]

    def run(**x):
        if op == "mamba":
            return fn(**x, delta_softplus=case.softplus, return_last_state=case.last_state, backend=backend)
        return fn(**x, return_last_state=case.last_state, backend=backend)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_case_matches_the_oracle(case: Case, op: str, backend: str):
    x = _inputs(case, torch.float32, op)
    oracle_kwargs = {"delta_softplus": case.softplus} if op == "mamba" else {}
    check_against_oracle(_call(op, backend, case), OPS[op][1], x, oracle_kwargs, case.last_state, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_empty_sequence_returns_the_initial_state_and_zero_gradients(op: str, backend: str):
    """L = 0: no step runs, so out is ``[b, D, 0]``, the last state is h_0 = 0 and every gradient is zero (the
    oracle's loop has no step to stack, so this is the closed form)."""
    case = Case(3, 6, 0, 4, "var", "group2", D=True, z=True, delta_bias=True, softplus=True, last_state=True)
    x = _inputs(case, torch.bfloat16, op)
    out, last = _call(op, backend, case)(**x)
    assert out.shape == (3, 6, 0) and out.dtype == torch.bfloat16
    assert last.dtype == torch.float32 and torch.equal(last, torch.zeros(3, 6, 4))
    leaves = [t for t in x.values() if t is not None]
    for t, g in zip(leaves, torch.autograd.grad(out, leaves, torch.ones_like(out))):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


def test_finite_check_switched_off_lets_nan_through(monkeypatch):
    """MAMBACL_CHECK_FINITE=0 skips the check on the CPU too: NaN reaches the output instead of an error."""
    monkeypatch.setenv("MAMBACL_CHECK_FINITE", "0")
    out = selective_scan(**mamba_args(u=with_nan((b, d, L), (0, 1, 0))))
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[1]).all()
