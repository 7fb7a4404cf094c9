"""Scan API: mamba-ssm's signature, validation errors naming the argument, torch.compile and opcheck."""
import importlib.util
import inspect

import pytest
import torch
from scan_oracle import SHAPES, assert_close, longhorn_args, make_inputs, mamba_args, with_nan

from mambacl.kernels import longhorn_scan, longhorn_scan_ref, selective_scan, selective_scan_fn, selective_scan_ref
from mambacl.kernels.longhorn_scan import longhorn_scan_chunk
from mambacl.kernels.selective_scan import selective_scan_chunk

# state-spaces/mamba: mamba_ssm/ops/selective_scan_interface.py, selective_scan_fn
MAMBA_SSM_ARGS = [("u", inspect.Parameter.empty), ("delta", inspect.Parameter.empty), ("A", inspect.Parameter.empty),
                  ("B", inspect.Parameter.empty), ("C", inspect.Parameter.empty), ("D", None), ("z", None),
                  ("delta_bias", None), ("delta_softplus", False), ("return_last_state", False)]
LONGHORN_ARGS = [(n if n not in "BC" else {"B": "k", "C": "q"}[n], d) for n, d in MAMBA_SSM_ARGS
                 if n not in ("A", "delta_softplus")]


def _triton(op: str):
    """The Triton function of `op` when its module exists (it is written separately); None otherwise."""
    name = f"mambacl.kernels.{op}.triton"
    if importlib.util.find_spec(name) is None:
        return None
    return getattr(importlib.import_module(name), f"{op}_triton")


def _split(fn):
    """(name, default) of the positional parameters; keyword-only names mapped to their defaults."""
    params = inspect.signature(fn).parameters.values()
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    keyword_only = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params), f"{fn.__name__}: *args/**kwargs"
    return positional, keyword_only


@pytest.mark.parametrize("op,expected,fns", [
    ("selective_scan", MAMBA_SSM_ARGS,
     {"public": selective_scan, "fn alias": selective_scan_fn, "ref": selective_scan_ref,
      "chunk": selective_scan_chunk}),
    ("longhorn_scan", LONGHORN_ARGS,
     {"public": longhorn_scan, "ref": longhorn_scan_ref, "chunk": longhorn_scan_chunk}),
], ids=["selective_scan", "longhorn_scan"])
def test_signatures_follow_mamba_ssm(op, expected, fns):
    """Same positional arguments and defaults everywhere; backends may add keyword-only tuning knobs with
    defaults (the Triton module is checked when present), the public function only `backend`."""
    triton_fn = _triton(op)
    if triton_fn is not None:
        fns = {**fns, "triton": triton_fn}
    for kind, fn in fns.items():
        positional, keyword_only = _split(fn)
        assert positional == expected, f"{op} {kind}: {positional}"
        if kind in ("public", "fn alias"):
            assert keyword_only == {"backend": "auto"}, f"{op} {kind}: keyword-only {keyword_only}"
        else:
            assert inspect.Parameter.empty not in keyword_only.values(), f"{op} {kind}: {keyword_only}"
    assert _split(fns["chunk"])[1] == {"chunk_size": None}


# ---- validation ----

MAMBA_BAD = {
    "u rank": (dict(u=torch.randn(6, 5)), ValueError, r"u must have 3 dimensions"),
    "u int": (dict(u=torch.ones(2, 6, 5, dtype=torch.int64)), TypeError, r"u must be a floating tensor"),
    "u not a tensor": (dict(u=[[0.0]]), TypeError, r"u must be a torch.Tensor"),
    "delta missing": (dict(delta=None), TypeError, r"delta must be a torch.Tensor"),
    "delta shape": (dict(delta=torch.rand(2, 6, 4)), ValueError,
                    r"delta has shape \(2, 6, 4\), expected .*\(2, 6, 5\)"),
    "z shape": (dict(z=torch.rand(1, 6, 5)), ValueError, r"z has shape \(1, 6, 5\)"),
    "A dim": (dict(A=-torch.rand(5, 4)), ValueError, r"A has shape \(5, 4\), expected \(dim, d_state\) with dim = 6"),
    "A rank": (dict(A=-torch.rand(6)), ValueError, r"A must have 2 dimensions"),
    "A complex": (dict(A=-torch.rand(6, 4, dtype=torch.complex64)), TypeError, r"A must be real"),
    "A inf": (dict(A=torch.full((6, 4), -float("inf"))), ValueError, r"^A: non-finite"),
    "N > 256": (dict(A=-torch.rand(6, 257), B=torch.randn(2, 257, 5), C=torch.randn(2, 257, 5)), ValueError,
                r"A: d_state must be in \[1, 256\], got 257"),
    "B length": (dict(B=torch.randn(2, 4, 7)), ValueError, r"B has shape \(2, 4, 7\), expected \(2, 4, 5\)"),
    "B batch": (dict(B=torch.randn(3, 4, 5)), ValueError, r"B has shape \(3, 4, 5\)"),
    "B const N": (dict(B=torch.randn(6, 3)), ValueError, r"B has shape \(6, 3\), expected \(6, 4\)"),
    "B rank 5": (dict(B=torch.randn(2, 1, 1, 4, 5)), ValueError, r"B must be constant \(dim, d_state\), variable"),
    "C groups": (dict(C=torch.randn(2, 4, 4, 5)), ValueError, r"C: dim 6 is not divisible by the number of groups 4"),
    "D length": (dict(D=torch.randn(5)), ValueError, r"D has shape \(5,\), expected \(6,\)"),
    "delta_bias rank": (dict(delta_bias=torch.randn(6, 1)), ValueError, r"delta_bias must have 1 dimensions"),
    "u NaN": (dict(u=with_nan((2, 6, 5), (1, 2, 3))), ValueError, r"^u: non-finite values"),
    "delta NaN": (dict(delta=with_nan((2, 6, 5), (0, 0, 4))), ValueError, r"^delta: non-finite values"),
    "B and z NaN": (dict(B=with_nan((2, 4, 5), (0, 0, 0)), z=with_nan((2, 6, 5), 0)), ValueError, r"^B, z: non-finite"),
    "B on meta": (dict(B=torch.randn(2, 4, 5, device="meta")), ValueError, r"B is on meta but u is on cpu"),
    "D on meta": (dict(D=torch.randn(6, device="meta")), ValueError, r"D is on meta but u is on cpu"),
}


@pytest.mark.parametrize("overrides,error,match", MAMBA_BAD.values(), ids=MAMBA_BAD.keys())
def test_selective_scan_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        selective_scan(**mamba_args(**overrides))


LONGHORN_BAD = {
    "k rank": (dict(k=torch.randn(4)), ValueError, r"k must be constant \(dim, d_state\), variable"),
    "k complex": (dict(k=torch.randn(2, 4, 5, dtype=torch.complex64)), TypeError, r"k must be real"),
    "N > 256": (dict(k=torch.randn(2, 300, 5), q=torch.randn(2, 300, 5)), ValueError,
                r"k: d_state must be in \[1, 256\]"),
    "q N": (dict(q=torch.randn(2, 5, 5)), ValueError, r"q has shape \(2, 5, 5\), expected \(2, 4, 5\)"),
    "q groups": (dict(q=torch.randn(2, 5, 4, 5)), ValueError, r"q: dim 6 is not divisible by the number of groups 5"),
    "delta shape": (dict(delta=torch.rand(2, 6)), ValueError, r"delta must have 3 dimensions"),
    "u NaN": (dict(u=with_nan((2, 6, 5), (1, 5, 0))), ValueError, r"^u: non-finite values"),
    "delta inf": (dict(delta=torch.full((2, 6, 5), float("inf"))), ValueError, r"^delta: non-finite values"),
    "z on meta": (dict(z=torch.randn(2, 6, 5, device="meta")), ValueError, r"z is on meta but u is on cpu"),
}


@pytest.mark.parametrize("overrides,error,match", LONGHORN_BAD.values(), ids=LONGHORN_BAD.keys())
def test_longhorn_scan_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        longhorn_scan(**longhorn_args(**overrides))


def test_backend_and_chunk_size_are_checked():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        selective_scan(**mamba_args(), backend="cuda")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None, got 0"):
        selective_scan_chunk(*mamba_args().values(), chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        longhorn_scan_chunk(*longhorn_args().values(), chunk_size=2.0)


def test_valid_arguments_pass():
    """The baseline arguments of the bad-input tests are valid: each error comes from its one override."""
    assert selective_scan(**mamba_args()).shape == (2, 6, 5)
    assert longhorn_scan(**longhorn_args()).shape == (2, 6, 5)


# ---- torch.compile and the custom ops ----

class TwoScans(torch.nn.Module):
    """A Mamba scan followed by a Longhorn scan on its output, parameters for A, D, delta_bias."""

    def __init__(self, dim: int, d_state: int) -> None:
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.log(0.5 * torch.rand(dim, d_state) + 0.1))
        self.D = torch.nn.Parameter(torch.randn(dim))
        self.delta_bias = torch.nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, u, delta, B, C, z):
        y = selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D, z, self.delta_bias, delta_softplus=True)
        y, last = longhorn_scan(y, delta, B, C, self.D, None, self.delta_bias, return_last_state=True)
        return y * 2 + last.sum(-1, keepdim=True)


def test_torch_compile_matches_eager():
    """fullgraph: the scans are single custom ops for dynamo; forward and every gradient match eager."""
    model = TwoScans(6, 16)
    case = SHAPES["group2-var-chunk8"].with_(seqlen=70, z=True)  # over two default chunks
    x = make_inputs(case, torch.float32, "mamba")
    inputs = [x["u"], x["delta"], x["B"], x["C"], x["z"]]
    leaves = inputs + list(model.parameters())
    eager = model(*inputs)
    compiled = torch.compile(model, fullgraph=True)(*inputs)
    assert_close("compiled out", compiled, eager, 1e-5, 1e-5)
    dout = torch.randn_like(eager)
    for i, (g, ge) in enumerate(zip(torch.autograd.grad(compiled, leaves, dout),
                                    torch.autograd.grad(eager, leaves, dout))):
        assert_close(f"compiled grad {i}", g, ge, 1e-5, 1e-5)


OPCHECK_CASES = {
    "mamba-all": ("mamba", SHAPES["group2-var-chunk8"].with_(D=True, z=True, delta_bias=True, softplus=True), 8),
    "mamba-L1-plain": ("mamba", SHAPES["L1-const"], 64),
    "longhorn-z": ("longhorn", SHAPES["odd-dim-N1-var"].with_(z=True), 3),
}


@pytest.mark.parametrize("form,case,chunk", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck_chunk_scan_ops(form, case, chunk):
    """torch.library.opcheck: schema, fake kernel (shapes and strides), autograd registration, AOT dispatch."""
    x = make_inputs(case, torch.float32, form)
    fwd_args = (form, x["u"], x["delta"], x.get("A"), x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                case.softplus, chunk)
    torch.library.opcheck(torch.ops.mambacl.chunk_scan.default, fwd_args)
    with torch.no_grad():
        out, _, saved, pre = torch.ops.mambacl.chunk_scan(*fwd_args)
        bwd_args = (form, torch.randn_like(out), *(None if t is None else t.detach() for t in fwd_args[1:9]),
                    saved, pre, case.softplus, chunk)
    torch.library.opcheck(torch.ops.mambacl.chunk_scan_bwd.default, bwd_args)
