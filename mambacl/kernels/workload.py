"""Vim-like scan problems and forward/backward runners, shared by the kernel demo and the speed benchmark."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .longhorn_scan import longhorn_scan
from .selective_scan import selective_scan

OPS = ("selective_scan", "longhorn_scan")


def available_backends(device: torch.device) -> List[str]:
    """Backends that run natively on `device`: the reference and chunk paths, Triton on CUDA."""
    return ["reference", "chunk"] + (["triton"] if device.type == "cuda" else [])


def _bc_shape(form: str, batch: int, dim: int, seqlen: int, d_state: int) -> Tuple[int, ...]:
    if form == "const":
        return (dim, d_state)
    if form == "var":
        return (batch, d_state, seqlen)
    if form.startswith("group") and form[len("group"):].isdigit():
        return (batch, int(form[len("group"):]), d_state, seqlen)
    raise ValueError(f"B/C form must be 'const', 'var' or 'group<G>', got {form!r}")


def scan_problem(op: str, batch: int, dim: int, seqlen: int, d_state: int, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, bc_forms: Tuple[str, str] = ("var", "var"),
                 extras: bool = True) -> Dict[str, torch.Tensor]:
    """Random inputs shaped like one direction of a Vim mixer: variable B/C (or k/q), D, z and delta_bias.

    A follows Mamba's S4D-real init ``A[d, n] = -(n + 1)``; delta is pre-softplus, as the mixer passes it.

    Args:
        op: 'selective_scan' or 'longhorn_scan'.
        batch, dim, seqlen, d_state: b, D, L, N.
        bc_forms: forms of (B, C) (or (k, q)): 'const' ``[D, N]`` (fp32, a weight), 'var' ``[b, N, L]`` or
            'group<G>' ``[b, G, N, L]`` (in ``dtype``).
        extras: with D, z, delta_bias (and softplus for Mamba); without, none of them and a positive delta.
    Returns:
        keyword arguments of `op` (tensors on `device`, sequences and B/C in `dtype`), leaves requiring grad.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dt).requires_grad_()

    seq = (batch, dim, seqlen)
    B, C = (rand(*_bc_shape(form, batch, dim, seqlen, d_state), dt=torch.float32 if form == "const" else dtype)
            for form in bc_forms)
    x = {"u": rand(*seq), "B": B, "C": C}
    if op == "selective_scan" and not extras:
        x["delta"] = (0.5 * torch.rand(*seq, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    else:
        x["delta"] = rand(*seq, scale=0.5, shift=-3.0)
    if extras:
        x.update(D=rand(dim, dt=torch.float32), z=rand(*seq), delta_bias=rand(dim, scale=0.1, dt=torch.float32))
    if op == "longhorn_scan":
        x["k"], x["q"] = x.pop("B"), x.pop("C")
        return x
    x["A"] = -torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(dim, 1).requires_grad_()
    x["delta_softplus"] = extras
    return x


def run_scan(op: str, backend: str, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Call the public function of `op` on `inputs` with `backend`; returns out ``[b, D, L]``."""
    fn = selective_scan if op == "selective_scan" else longhorn_scan
    return fn(**inputs, backend=backend)


def leaves(inputs: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """The inputs that take a gradient."""
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def forward_backward(op: str, backend: str, inputs: Dict[str, torch.Tensor],
                     dout: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One forward and backward pass; returns out and the gradient of every leaf (dout defaults to ones)."""
    out = run_scan(op, backend, inputs)
    grads = torch.autograd.grad(out, list(leaves(inputs).values()), torch.ones_like(out) if dout is None else dout)
    return out, dict(zip(leaves(inputs), grads))


def max_errors(result: Tuple[torch.Tensor, Dict[str, torch.Tensor]],
               reference: Tuple[torch.Tensor, Dict[str, torch.Tensor]]) -> Tuple[float, float]:
    """(max |out - ref|, max over inputs of max |grad - ref| / max |ref grad|) between two forward_backward results."""
    out_err = (result[0].float() - reference[0].float()).abs().max().item()
    grad_err = max(((g.float() - reference[1][k].float()).abs().max() / reference[1][k].float().abs().max()
                    .clamp_min(1e-12)).item() for k, g in result[1].items())
    return out_err, grad_err
