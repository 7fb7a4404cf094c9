"""Longhorn scan: every CPU backend (outputs, last state, gradients incl. dk through eps) against the oracle."""
import pytest
import torch
from scan_oracle import BACKENDS, BF16_SHAPES, OPTIONS, SHAPES, Case, check_against_oracle, longhorn_oracle, make_inputs

from mambacl.kernels import longhorn_scan
from mambacl.kernels.longhorn_scan import longhorn_scan_chunk

# Longhorn has no softplus: its gate is always sigmoid.
LONGHORN_OPTIONS = {name: {k: v for k, v in opts.items() if k != "softplus"} for name, opts in OPTIONS.items()}


def _check(case: Case, backend: str, dtype: torch.dtype) -> None:
    x = make_inputs(case, dtype, "longhorn")
    x["k"], x["q"] = x.pop("B"), x.pop("C")

    def run(**x):
        args = (x["u"], x["delta"], x["k"], x["q"], x["D"], x["z"], x["delta_bias"], case.last_state)
        if backend == "chunk-direct":
            return longhorn_scan_chunk(*args, chunk_size=case.chunk_size)
        return longhorn_scan(*args, backend=backend)

    check_against_oracle(run, longhorn_oracle, x, {}, case.last_state, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", LONGHORN_OPTIONS.values(), ids=LONGHORN_OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_longhorn_scan_fp32(shape: Case, options: dict, backend: str):
    _check(shape.with_(**options), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_longhorn_scan_bf16(shape: str, backend: str):
    _check(SHAPES[shape].with_(**LONGHORN_OPTIONS["all"]), backend, torch.bfloat16)

