"""Chunked PyTorch Longhorn scan (any device): Longhorn's (a, b) pair on the shared chunked scan."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..chunk_scan import FORMS, ScanForm, chunk_scan, contract_n


class LonghornForm(ScanForm):
    """``a_t = 1 - eps k^2``, ``b_t = eps k u_t`` with ``eps = beta / (1 + beta |k|^2)``, ``beta = sigmoid(raw)``."""

    def gate(self, raw, softplus):
        return torch.sigmoid(raw)

    def gate_grad(self, raw, gated, grad, softplus):
        return grad * gated * (1 - gated)

    @staticmethod
    def _eps(beta: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r = 1 / (1 + beta * (k * k).sum(-1, keepdim=True))
        return beta * r, r

    def pair(self, dt, u, P, Bc):
        eps, _ = self._eps(dt, Bc)
        return 1 - eps * Bc * Bc, (eps * u) * Bc

    def pair_bwd(self, dt, u, P, Bc, a, g, da):
        eps, r = self._eps(dt, Bc)
        # d eps = sum_n (-da k^2 + g k u); eps also enters through |k|^2: d eps / d|k|^2 = -eps^2
        gk = contract_n(g, Bc)
        deps = gk * u - contract_n(da, Bc * Bc)
        dk = (da * (-2 * eps) - 2 * deps * eps * eps) * Bc + g * (eps * u)
        return deps * r * r, gk * eps, None, dk


FORMS["longhorn"] = LonghornForm()


def longhorn_scan_chunk(
    u: torch.Tensor,
    delta: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
    *,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Longhorn scan on the chunked PyTorch path (registered as ``torch.ops.mambacl.chunk_scan``).

    Args and Returns as :func:`mambacl.kernels.longhorn_scan` (no validation of the tensors here), plus
    ``chunk_size``: time steps per chunk
    (None: :func:`~mambacl.kernels.chunk_scan.chunk_length`).
    """
    return chunk_scan("longhorn", u, delta, None, k, q, D, z, delta_bias, False, return_last_state, chunk_size)
