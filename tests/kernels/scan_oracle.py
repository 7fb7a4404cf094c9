"""Float64 sequential oracles for the scan tests, written from kernels.md without importing mambacl's refs.

Also the shared input builders and comparison helpers, so each kernel test module only states its cases.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch

# kernels.md section 6 (mamba-ssm's tests/ops/test_selective_scan.py): (rtol, atol) per input dtype.
TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}


def bc_at(x: torch.Tensor, batch: int, dim: int, t: int) -> torch.Tensor:
    """B/C (or k/q) seen by every channel at step t, ``[b, D, N]``, from any of the three forms."""
    if x.dim() == 2:
        return x.expand(batch, dim, x.shape[1])
    if x.dim() == 3:
        return x[:, None, :, t].expand(batch, dim, x.shape[1])
    group_of_channel = torch.arange(dim) // (dim // x.shape[1])
    return x[:, group_of_channel, :, t]


def _finish(ys, u, D, z):
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * z / (1 + torch.exp(-z))
    return y


def mamba_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Selective scan in float64, one step at a time. Returns (out ``[b, D, L]``, last state ``[b, D, N]``)."""
    u, delta, A, B, C = (x.double() for x in (u, delta, A, B, C))
    D, z, delta_bias = (None if x is None else x.double() for x in (D, z, delta_bias))
    batch, dim, seqlen = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[None, :, None]
    if delta_softplus:
        dt = torch.where(dt > 20, dt, torch.log(1 + torch.exp(dt.clamp(max=20))))
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        step = dt[:, :, t, None]
        h = torch.exp(step * A) * h + step * u[:, :, t, None] * bc_at(B, batch, dim, t)
        ys.append((h * bc_at(C, batch, dim, t)).sum(-1))
    return _finish(ys, u, D, z), h


def longhorn_oracle(u, delta, k, q, D=None, z=None, delta_bias=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Longhorn's diagonal recurrence in float64, one step at a time. Returns (out, last state)."""
    u, delta, k, q = (x.double() for x in (u, delta, k, q))
    D, z, delta_bias = (None if x is None else x.double() for x in (D, z, delta_bias))
    batch, dim, seqlen = u.shape
    raw = delta if delta_bias is None else delta + delta_bias[None, :, None]
    beta = 1 / (1 + torch.exp(-raw))
    h = torch.zeros(batch, dim, k.shape[-1] if k.dim() == 2 else k.shape[-2], dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        k_t = bc_at(k, batch, dim, t)
        eps = beta[:, :, t, None] / (1 + beta[:, :, t, None] * (k_t ** 2).sum(-1, keepdim=True))
        h = (1 - eps * k_t ** 2) * h + eps * k_t * u[:, :, t, None]
        ys.append((h * bc_at(q, batch, dim, t)).sum(-1))
    return _finish(ys, u, D, z), h


@dataclass(frozen=True)
class Case:
    """One scan problem: sizes, B/C forms ('const', 'var' or 'group<G>') and which options are on."""

    batch: int
    dim: int
    seqlen: int
    d_state: int
    b_form: str = "var"
    c_form: str = "var"
    D: bool = False
    z: bool = False
    delta_bias: bool = False
    softplus: bool = False
    last_state: bool = False
    chunk_size: Optional[int] = None  # for the chunk backend; None keeps its default

    def with_(self, **kw) -> "Case":
        return replace(self, **kw)


def _bc(form: str, case: Case, dtype: torch.dtype) -> torch.Tensor:
    if form == "const":
        return torch.randn(case.dim, case.d_state)  # weights stay fp32, as in mamba-ssm
    if form == "var":
        return torch.randn(case.batch, case.d_state, case.seqlen, dtype=dtype)
    groups = int(form[len("group"):])
    return torch.randn(case.batch, groups, case.d_state, case.seqlen, dtype=dtype)


def make_inputs(case: Case, dtype: torch.dtype, op: str) -> Dict[str, Optional[torch.Tensor]]:
    """Fresh random inputs for `op` ('mamba' or 'longhorn'), leaves with requires_grad.

    Data as in mamba-ssm's tests: A = -0.5*rand, delta = 0.5*rand, B/C randn. With softplus, a quarter of the
    delta entries lie in (20, 25) to exercise the threshold. Sequences and variable B/C take `dtype`; A, D,
    delta_bias and constant B/C stay fp32.
    """
    shape = (case.batch, case.dim, case.seqlen)
    delta = 0.5 * torch.rand(shape)
    if case.softplus:
        delta = torch.where(torch.rand(shape) < 0.25, 20 + 5 * torch.rand(shape), delta)
    x = {
        "u": torch.randn(shape, dtype=dtype),
        "delta": delta.to(dtype),
        "B": _bc(case.b_form, case, dtype),
        "C": _bc(case.c_form, case, dtype),
        "D": torch.randn(case.dim) if case.D else None,
        "z": torch.randn(shape, dtype=dtype) if case.z else None,
        "delta_bias": 0.5 * torch.rand(case.dim) - 0.25 if case.delta_bias else None,
    }
    if op == "mamba":
        x["A"] = -0.5 * torch.rand(case.dim, case.d_state)
    for t in x.values():
        if t is not None:
            t.requires_grad_(True)
    return x


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Elementwise |actual - expected| <= atol + rtol*|expected| in float64, with the worst element reported."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    if a.numel() == 0:
        return
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    excess = (a - e).abs() - (atol + rtol * e.abs())
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{name}: max abs err {(a - e).abs().max():.3e}; worst element {worst}: "
                               f"{a.flatten()[worst]:.6g} vs {e.flatten()[worst]:.6g} (rtol {rtol}, atol {atol})")


def check_against_oracle(run: Callable[..., object], oracle: Callable[..., Tuple[torch.Tensor, torch.Tensor]],
                         inputs: Dict[str, Optional[torch.Tensor]], oracle_kwargs: Dict[str, object],
                         last_state: bool, dtype: torch.dtype) -> None:
    """Compare out, last state and the gradient of every input of `run(**inputs)` with the float64 oracle.

    `run` takes the inputs as keywords and returns out or (out, last). The upstream gradient is a fixed random
    tensor; the oracle sees the very same (rounded) input values, promoted to float64.
    """
    rtol, atol = TOLERANCES[dtype]
    result = run(**inputs)
    out, last = result if last_state else (result, None)
    ref_inputs = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    ref_out, ref_last = oracle(**ref_inputs, **oracle_kwargs)
    assert out.dtype == inputs["u"].dtype, f"out dtype {out.dtype} != u dtype {inputs['u'].dtype}"
    assert_close("out", out, ref_out, rtol, atol)
    if last_state:
        assert last.dtype == torch.float32
        assert_close("last_state", last, ref_last, rtol, atol)
    dout = torch.randn(out.shape).to(out.dtype)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(out, [inputs[k] for k in names], dout)
    ref_grads = torch.autograd.grad(ref_out, [ref_inputs[k] for k in names], dout.double())
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == inputs[name].dtype, f"grad of {name}: dtype {g.dtype} != {inputs[name].dtype}"
        assert_close(f"grad of {name}", g, rg, rtol, atol)


# Shapes shared by both ops: L = 1, odd dim, N in {1, 4, 16, 64}, every B/C form (mixed too), L not a multiple
# of the chunk and L over several chunks (small chunk sizes, and L = 130 over the default chunk of 64).
SHAPES = {
    "L1-const": Case(2, 4, 1, 4, "const", "const"),
    "odd-dim-N1-var": Case(2, 5, 7, 1, "var", "var"),
    "const-var-chunk5": Case(2, 4, 12, 16, "const", "var", chunk_size=5),
    "group2-var-chunk8": Case(2, 6, 37, 16, "group2", "var", chunk_size=8),
    "N64-group3-chunk4": Case(1, 6, 19, 64, "group3", "group3", chunk_size=4),
    "L130-var-group3": Case(1, 3, 130, 4, "var", "group3"),
}
# The CPU backends: the public function with each backend name, and the chunk function with the case's chunk size.
BACKENDS = ("reference", "chunk", "chunk-direct", "auto")
BF16_SHAPES = ["odd-dim-N1-var", "group2-var-chunk8", "N64-group3-chunk4"]
OPTIONS = {
    "plain": {},
    "all": dict(D=True, z=True, delta_bias=True, softplus=True, last_state=True),
    "D-softplus-last": dict(D=True, softplus=True, last_state=True),
    "z-bias": dict(z=True, delta_bias=True),
}


# ---- valid call arguments for the bad-input tests: each bad case overrides one of them ----

def mamba_args(**overrides) -> Dict[str, torch.Tensor]:
    """Valid selective_scan keywords (b 2, D 6, L 5, N 4, variable B, grouped C with 3 groups), then overrides."""
    b, d, L, n = 2, 6, 5, 4
    args = dict(u=torch.randn(b, d, L), delta=torch.rand(b, d, L), A=-torch.rand(d, n), B=torch.randn(b, n, L),
                C=torch.randn(b, 3, n, L), D=torch.randn(d), z=torch.randn(b, d, L), delta_bias=torch.randn(d))
    args.update(overrides)
    return args


def longhorn_args(**overrides) -> Dict[str, torch.Tensor]:
    """Valid longhorn_scan keywords: :func:`mamba_args` without A, B as k and C as q, then overrides."""
    args = mamba_args()
    del args["A"]
    args["k"], args["q"] = args.pop("B"), args.pop("C")
    args.update(overrides)
    return args


def with_nan(shape: Tuple[int, ...], index) -> torch.Tensor:
    """A randn tensor with NaN at ``index``."""
    t = torch.randn(shape)
    t[index] = float("nan")
    return t
