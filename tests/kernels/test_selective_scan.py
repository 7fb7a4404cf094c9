"""Selective scan: every CPU backend (outputs, last state, gradients of every input) against the float64 oracle."""
import pytest
import torch
from scan_oracle import BACKENDS, BF16_SHAPES, OPTIONS, SHAPES, Case, check_against_oracle, make_inputs, mamba_oracle

from mambacl.kernels import selective_scan
from mambacl.kernels.selective_scan import selective_scan_chunk


def _runner(backend: str, case: Case):
    def run(**x):
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], case.softplus,
                case.last_state)
        if backend == "chunk-direct":  # the chunk function itself, with the case's chunk size
            return selective_scan_chunk(*args, chunk_size=case.chunk_size)
        return selective_scan(*args, backend=backend)
    return run


def _check(case: Case, backend: str, dtype: torch.dtype) -> None:
    x = make_inputs(case, dtype, "mamba")
    check_against_oracle(_runner(backend, case), mamba_oracle, x, {"delta_softplus": case.softplus},
                         case.last_state, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_selective_scan_fp32(shape: Case, options: dict, backend: str):
    _check(shape.with_(**options), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_selective_scan_bf16(shape: str, backend: str):
    _check(SHAPES[shape].with_(**OPTIONS["all"]), backend, torch.bfloat16)


def test_softplus_threshold_is_identity_above_20():
    """dt = delta exactly when delta + bias > 20: with B = C = 1, N = 1, L = 1, A = 0 the output is dt * u."""
    delta = torch.tensor([[[19.0, 20.5, 30.0]]]).transpose(1, 2).reshape(1, 3, 1)
    u, ones = torch.ones(1, 3, 1), torch.ones(1, 1, 1)
    for backend in ("reference", "chunk"):
        out = selective_scan(u, delta, torch.zeros(3, 1), ones, ones, delta_softplus=True, backend=backend)
        expected = torch.tensor([torch.log1p(torch.exp(torch.tensor(19.0))).item(), 20.5, 30.0])
        torch.testing.assert_close(out.flatten(), expected)
