"""Triton selective/Longhorn scan kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest).

Every output and gradient is compared with an independent float64 sequential loop written here. Shapes are tiny
(the interpreter runs the scans element by element) with a small chunk so several chunks, a partial last chunk
and a partial channel block are exercised. Outputs are NaN-poisoned by conftest (torch.empty).
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mambacl.kernels import longhorn_scan, selective_scan  # noqa: E402
from mambacl.kernels import triton_scan  # noqa: E402
from mambacl.kernels.longhorn_scan.triton import longhorn_scan_triton  # noqa: E402
from mambacl.kernels.selective_scan.triton import _selective_scan_fwd, selective_scan_triton  # noqa: E402

# (rtol, atol) per input dtype, as in mamba-ssm's tests (kernels.md section 6)
TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}


class Case(NamedTuple):
    batch: int
    dim: int
    seqlen: int
    d_state: int
    B_form: str  # 'const', 'var' or 'group<G>'
    C_form: str
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    chunk_size: Optional[int] = 4
    block_d: Optional[int] = 4
    dtype: torch.dtype = torch.float32


def _bc(form: str, case: Case, dtype: torch.dtype) -> torch.Tensor:
    if form == "const":
        return torch.randn(case.dim, case.d_state, dtype=dtype)
    if form == "var":
        return torch.randn(case.batch, case.d_state, case.seqlen, dtype=dtype)
    groups = int(form[len("group"):])
    return torch.randn(case.batch, groups, case.d_state, case.seqlen, dtype=dtype)


def _per_channel(t: torch.Tensor, dim: int, batch: int, seqlen: int) -> torch.Tensor:
    """B/C of any form as [b, D, N, L] by indexing channel -> row (independent of the library's expand)."""
    if t.dim() == 2:
        return t[None, :, :, None].expand(batch, dim, t.shape[1], seqlen)
    if t.dim() == 3:
        return t[:, None].expand(batch, dim, t.shape[1], seqlen)
    rows = torch.arange(dim) // (dim // t.shape[1])
    return t[:, rows]


def scan64(mode, u, delta, A, B, C, D, z, bias, softplus):
    """Float64 sequential scan: out [b, D, L] and the last state [b, D, N]."""
    u, delta = u.double(), delta.double()
    batch, dim, seqlen = u.shape
    raw = delta if bias is None else delta + bias.double()[:, None]
    Bf = _per_channel(B.double(), dim, batch, seqlen)
    Cf = _per_channel(C.double(), dim, batch, seqlen)
    h = torch.zeros(batch, dim, Bf.shape[2], dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        r, Bt = raw[:, :, t, None], Bf[..., t]
        if mode == "mamba":
            dt = torch.where(r > 20, r, torch.log1p(torch.exp(r.clamp(max=20)))) if softplus else r
            h = torch.exp(dt * A.double()) * h + dt * u[:, :, t, None] * Bt
        else:
            beta = torch.sigmoid(r)
            eps = beta / (1 + beta * (Bt * Bt).sum(-1, keepdim=True))
            h = (1 - eps * Bt * Bt) * h + eps * Bt * u[:, :, t, None]
        ys.append((h * Cf[..., t]).sum(-1))
    out = torch.stack(ys, -1)
    if D is not None:
        out = out + D.double()[:, None] * u
    if z is not None:
        out = out * F.silu(z.double())
    return out, h


def _inputs(mode: str, case: Case):
    """Leaf tensors (u, delta, A-or-None, B, C, D, z, bias); half dtypes for sequences and variable B/C."""
    b, d, L, N, dt = case.batch, case.dim, case.seqlen, case.d_state, case.dtype
    u = torch.randn(b, d, L, dtype=dt)
    delta = (0.5 * torch.rand(b, d, L) if mode == "mamba" else torch.randn(b, d, L)).to(dt)
    A = -0.5 * torch.rand(d, N) if mode == "mamba" else None
    B = _bc(case.B_form, case, dt if case.B_form != "const" else torch.float32)
    C = _bc(case.C_form, case, dt if case.C_form != "const" else torch.float32)
    D = torch.randn(d) if case.has_D else None
    z = torch.randn(b, d, L, dtype=dt) if case.has_z else None
    bias = torch.randn(d) * 0.5 if case.has_bias else None
    return [None if t is None else t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def _run(mode: str, xs, case: Case):
    u, delta, A, B, C, D, z, bias = xs
    kw = dict(chunk_size=case.chunk_size, block_d=case.block_d)
    if mode == "mamba":
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, case.softplus, True, **kw)
    return longhorn_scan_triton(u, delta, B, C, D, z, bias, True, **kw)


def check_against_float64(mode: str, case: Case) -> None:
    xs = _inputs(mode, case)
    out, last = _run(mode, xs, case)
    ref_out, ref_last = scan64(mode, *xs, softplus=case.softplus and mode == "mamba")
    rtol, atol = TOLERANCES[case.dtype]
    assert out.dtype == case.dtype and last.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), ref_last, rtol=rtol, atol=atol)
    dout = torch.randn_like(ref_out)
    leaves = [x for x in xs if x is not None]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
    names = [n for n, x in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), xs) if x is not None]
    for name, x, g, rg in zip(names, leaves, grads, ref_grads):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        scale = max(1.0, rg.abs().max().item())  # sums over batch/time (dA, constant dB) grow with the shape
        torch.testing.assert_close(g.double(), rg.double(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"grad {name}: {m}")


CASES = {
    "var-all-options": Case(2, 6, 11, 4, "var", "var"),
    "const-bare": Case(2, 6, 9, 1, "const", "const", False, False, False, False),
    "group-straddles-block": Case(2, 6, 10, 4, "group2", "group2", softplus=False),
    "group-aligned-block": Case(1, 8, 7, 4, "group2", "var", has_z=False),
    "const-B-var-C-N5": Case(1, 5, 9, 5, "const", "var", has_D=False, block_d=2),
    "N16": Case(1, 4, 6, 16, "var", "group2", has_bias=False, chunk_size=2),
    "L1": Case(2, 3, 1, 4, "var", "const", chunk_size=1),
    "default-blocks": Case(1, 6, 13, 16, "var", "var", chunk_size=None, block_d=None),  # BLOCK_D 16 fwd, 4 bwd
    "bf16": Case(1, 6, 9, 4, "var", "var", dtype=torch.bfloat16),
}
LONGHORN_CASES = ("var-all-options", "const-bare", "group-straddles-block", "N16", "L1", "bf16")


@pytest.mark.parametrize("name", list(CASES))
def test_selective_scan_triton_matches_float64(name):
    check_against_float64("mamba", CASES[name])


@pytest.mark.parametrize("name", LONGHORN_CASES)
def test_longhorn_scan_triton_matches_float64(name):
    check_against_float64("longhorn", CASES[name])


def test_softplus_threshold_and_large_delta():
    """delta + bias above 20 takes softplus' identity branch, in the output and in the delta gradient."""
    case = Case(1, 4, 6, 4, "var", "var", has_z=False)
    xs = _inputs("mamba", case)
    with torch.no_grad():
        xs[1][:, :2] += 25.0  # channels 0-1 far above the threshold
        xs[2].mul_(0.02)  # keep exp(dt * A) away from 0 so the states stay informative
    out = _run("mamba", xs, case)[0]
    ref = scan64("mamba", *xs, softplus=True)[0]
    torch.testing.assert_close(out.double(), ref, rtol=6e-4, atol=2e-3)
    g, rg = (torch.autograd.grad(o, xs[1], torch.ones_like(o))[0] for o in (out, ref))
    torch.testing.assert_close(g.double(), rg.double(), rtol=6e-4, atol=2e-3)


def test_chunk_end_states_are_saved():
    """The forward keeps only the state at each chunk end, [b, D, n_chunks, N]; the last one is h_L."""
    case = Case(2, 5, 10, 4, "var", "var")
    u, delta, A, B, C, D, z, bias = (x.detach() if x is not None else None for x in _inputs("mamba", case))
    out, states = _selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, chunk_size=4, block_d=4)
    assert states.shape == (2, 5, 3, 4) and states.dtype == torch.float32
    for c, end in enumerate((4, 8, 10)):
        _, h = scan64("mamba", u[..., :end], delta[..., :end], A, B[..., :end], C[..., :end], D, z[..., :end],
                      bias, softplus=True)
        torch.testing.assert_close(states[:, :, c].double(), h, rtol=6e-4, atol=2e-3)


def test_public_dispatch_uses_triton_backend():
    case = Case(1, 4, 5, 4, "var", "var")
    xs = _inputs("mamba", case)
    out = selective_scan(*xs, delta_softplus=True, backend="triton")
    torch.testing.assert_close(out.double(), scan64("mamba", *xs, softplus=True)[0], rtol=6e-4, atol=2e-3)
    u, delta, _, k, q, D, z, bias = xs
    out = longhorn_scan(u, delta, k, q, D, z, bias, backend="triton")
    torch.testing.assert_close(out.double(), scan64("longhorn", *xs, softplus=False)[0], rtol=6e-4, atol=2e-3)


def test_non_contiguous_inputs():
    """Views with a strided last axis (e.g. after a transpose) give the same result as contiguous copies."""
    case = Case(1, 4, 6, 4, "var", "var")
    xs = [x.detach() if x is not None else None for x in _inputs("mamba", case)]
    views = [x if x is None or x.dim() < 3 else x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in xs]
    assert not views[0].is_contiguous() and not views[3].is_contiguous()
    out = selective_scan_triton(*views, True, chunk_size=4, block_d=4)
    torch.testing.assert_close(out.double(), scan64("mamba", *xs, softplus=True)[0], rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("mode", ["mamba", "longhorn"])
def test_torch_compile_sees_one_opaque_op(mode):
    """fullgraph torch.compile (dynamo + AOT autograd on the registered fake kernels) matches float64, with grads."""
    case = Case(1, 4, 6, 4, "var", "group2", has_D=False, has_bias=False)
    xs = _inputs(mode, case)
    compiled = torch.compile(lambda *args: _run(mode, args, case)[0] * 2.0, backend="aot_eager", fullgraph=True)
    out = compiled(*xs)
    ref = scan64(mode, *xs, softplus=mode == "mamba")[0] * 2.0
    torch.testing.assert_close(out.double(), ref, rtol=6e-4, atol=2e-3)
    leaves = [x for x in xs if x is not None]
    for g, rg in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(g.double(), rg.double(), rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("kw", [{"chunk_size": 3}, {"block_d": 0}, {"chunk_size": 2.0}], ids=["T3", "BD0", "float"])
def test_block_sizes_must_be_powers_of_two(kw):
    xs = [x.detach() if x is not None else None for x in _inputs("mamba", Case(1, 4, 5, 4, "var", "var"))]
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        selective_scan_triton(*xs, **kw)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_scan, "_is_interpreted", lambda: False)
    xs = [x.detach() if x is not None else None for x in _inputs("mamba", Case(1, 4, 5, 4, "var", "var"))]
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan_triton(*xs)


# Lowers both kernels for an H100 (sm_90) without a GPU: catches what only the compiler rejects (the interpreter
# runs plain Python). Runs in a fresh process because TRITON_INTERPRET=1 is fixed when triton.jit decorates.
_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mambacl.kernels import triton_scan as ts

HALF = ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "B_ptr", "C_ptr")
for mode in (0, 1):
    for kernel, backward, flags in ((ts._scan_fwd_kernel, False, {}),
                                    (ts._scan_bwd_kernel, True, dict(B_CONST=True, C_CONST=False,
                                                                     B_SAME_GROUP=False, C_SAME_GROUP=True))):
        block_d, block_n, T = ts.scan_config(16, 197, backward=backward)
        const = dict(MODE=mode, SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, BLOCK_D=block_d,
                     BLOCK_N=block_n, T=T, **flags)
        sig = {n: "constexpr" if n in const else ("*bf16" if n in HALF else "*fp32") if n.endswith("_ptr") else "i32"
               for n in kernel.arg_names}
        warps = ts.BWD_WARPS if backward else ts.FWD_WARPS
        compiled = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps))
        assert compiled.asm["cubin"], kernel
print("compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
