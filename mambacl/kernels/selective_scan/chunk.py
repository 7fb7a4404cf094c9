"""Chunked PyTorch selective scan (any device): Mamba's (a, b) pair on the shared chunked scan."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..chunk_scan import FORMS, ScanForm, chunk_scan, contract_n, weighted_sum
from ..utils import softplus as _softplus


class MambaForm(ScanForm):
    """``a_t = exp(dt_t A)``, ``b_t = dt_t B_t u_t`` with ``dt = softplus(delta + delta_bias)`` (optional)."""

    def gate(self, raw, softplus):
        return _softplus(raw) if softplus else raw

    def gate_grad(self, raw, gated, grad, softplus):
        if not softplus:
            return grad
        return torch.where(raw > 20.0, grad, grad * torch.sigmoid(raw))

    def pair(self, dt, u, P, Bc):
        a = torch.exp(dt * P)
        return a, (dt * u) * Bc

    def pair_bwd(self, dt, u, P, Bc, a, g, da):
        da.mul_(a)  # d(dt*A)
        gB = contract_n(g, Bc)
        ddt = contract_n(da, P) + gB * u
        return ddt, gB * dt, da * dt, weighted_sum(g, dt * u, Bc.shape)


FORMS["mamba"] = MambaForm()


def selective_scan_chunk(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Selective scan on the chunked PyTorch path (registered as ``torch.ops.mambacl.chunk_scan``).

    Args and Returns as :func:`mambacl.kernels.selective_scan` (no validation of the tensors here), plus
    ``chunk_size``: time steps per chunk (None: :func:`~mambacl.kernels.chunk_scan.chunk_length`). Backward
    recomputes each chunk from its saved start state instead of storing all ``[b, D, L, N]`` states.
    """
    return chunk_scan("mamba", u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)
