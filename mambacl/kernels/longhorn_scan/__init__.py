"""Longhorn's online-learning recurrence on the scan machinery: one public function with dispatch."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..utils import (
    _check_same_device,
    _check_tensor,
    MAX_D_STATE,
    bc_d_state,
    check_backend,
    check_bc,
    check_channel_vector,
    check_finite,
    check_sequence,
)
from .chunk import longhorn_scan_chunk
from .ref import longhorn_scan_ref

__all__ = ["longhorn_scan", "longhorn_scan_ref", "longhorn_scan_chunk", "check_longhorn_scan_args"]


def check_longhorn_scan_args(u, delta, k, q, D=None, z=None, delta_bias=None) -> None:
    """Validate shapes, dtypes, devices and (see :func:`~mambacl.kernels.utils.check_finite`) finiteness;
    raise ValueError/TypeError naming the argument."""
    _check_tensor("u", u, 3)
    batch, dim, seqlen = u.shape
    check_sequence("delta", delta, (batch, dim, seqlen), required=True)
    check_sequence("z", z, (batch, dim, seqlen))
    d_state = bc_d_state("k", k)
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"k: d_state must be in [1, {MAX_D_STATE}], got {d_state}")
    check_bc("k", k, batch, dim, d_state, seqlen)
    check_bc("q", q, batch, dim, d_state, seqlen)
    check_channel_vector("D", D, dim)
    check_channel_vector("delta_bias", delta_bias, dim)
    _check_same_device(u, delta=delta, k=k, q=q, D=D, z=z, delta_bias=delta_bias)
    check_finite(u=u, delta=delta, k=k, q=q, D=D, z=z, delta_bias=delta_bias)


def longhorn_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Longhorn scan: ``beta = sigmoid(delta + delta_bias)``, ``eps = beta / (1 + beta * |k|^2)``,
    ``h_t = (1 - eps k^2) h_{t-1} + eps k u_t``, ``y_t = q_t h_t + D u_t``, gated by silu(z).

    Args:
        u, delta: ``[b, D, L]``; z: ``[b, D, L]`` or None.
        k, q: constant ``[D, N]``, variable ``[b, N, L]`` or grouped ``[b, G, N, L]``.
        D, delta_bias: ``[D]`` or None.
        return_last_state: also return the final state ``[b, D, N]`` (no gradient).
        backend: 'auto', 'reference', 'chunk' or 'triton'.
    Returns:
        out ``[b, D, L]`` in u's dtype, or ``(out, last_state)``. An input without elements (b, D or L = 0)
        gives an empty out, the zero initial state as last state and zero gradients.
    Raises:
        TypeError: a non-tensor, integer or complex input. ValueError (naming the argument): a wrong rank or
        shape, groups not dividing dim, N outside [1, 256], inputs on different devices, NaN/inf in any input
        (checked in eager mode, by default on every device but CUDA, where the check's host read would stall
        the launch queue; ``MAMBACL_CHECK_FINITE=1`` turns it on there, ``0`` off everywhere, see
        :func:`~mambacl.kernels.utils.finite_check_enabled`), or an unknown backend.
    """
    check_longhorn_scan_args(u, delta, k, q, D, z, delta_bias)
    resolved = check_backend(backend, u.device)
    args = (u, delta, k, q, D, z, delta_bias, return_last_state)
    if resolved == "reference":
        return longhorn_scan_ref(*args)
    if resolved == "chunk":
        return longhorn_scan_chunk(*args)
    from .triton import longhorn_scan_triton

    return longhorn_scan_triton(*args)
