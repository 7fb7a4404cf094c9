"""Mamba's selective scan: one public, mamba-ssm compatible function with automatic backend dispatch."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..utils import (
    MAX_D_STATE,
    _check_same_device,
    _check_tensor,
    check_backend,
    check_bc,
    check_channel_vector,
    check_finite,
    check_sequence,
)
from .chunk import selective_scan_chunk
from .ref import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref", "selective_scan_chunk",
           "check_selective_scan_args"]


def check_selective_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Validate shapes, dtypes, devices and (see :func:`~mambacl.kernels.utils.check_finite`) finiteness;
    raise ValueError/TypeError naming the argument."""
    _check_tensor("u", u, 3)
    batch, dim, seqlen = u.shape
    check_sequence("delta", delta, (batch, dim, seqlen), required=True)
    check_sequence("z", z, (batch, dim, seqlen))
    _check_tensor("A", A, 2)
    if A.shape[0] != dim:
        raise ValueError(f"A has shape {tuple(A.shape)}, expected (dim, d_state) with dim = {dim}")
    d_state = A.shape[1]
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"A: d_state must be in [1, {MAX_D_STATE}], got {d_state}")
    check_bc("B", B, batch, dim, d_state, seqlen)
    check_bc("C", C, batch, dim, d_state, seqlen)
    check_channel_vector("D", D, dim)
    check_channel_vector("delta_bias", delta_bias, dim)
    _check_same_device(u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    check_finite(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def selective_scan(
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
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t + D u_t``, gated by silu(z).

    Same arguments and result as mamba-ssm's ``selective_scan_fn``.

    Args:
        u, delta: ``[b, D, L]`` fp32/fp16/bf16; z: ``[b, D, L]`` or None.
        A: ``[D, N]`` real, N <= 256.
        B, C: constant ``[D, N]``, variable ``[b, N, L]`` or grouped ``[b, G, N, L]`` (G divides D).
        D, delta_bias: ``[D]`` or None.
        delta_softplus: apply softplus (threshold 20) to ``delta + delta_bias``.
        return_last_state: also return the final state ``[b, D, N]`` (fp32, no gradient).
        backend: 'auto' (Triton on CUDA, the chunked PyTorch path elsewhere), 'reference', 'chunk' or 'triton'.
    Returns:
        out ``[b, D, L]`` in u's dtype, or ``(out, last_state)``. An input without elements (b, D or L = 0)
        gives an empty out, the zero initial state as last state and zero gradients.
    Raises:
        TypeError: a non-tensor, integer or complex input. ValueError (naming the argument): a wrong rank or
        shape, groups not dividing dim, N outside [1, 256], inputs on different devices, NaN/inf in any input
        (checked in eager mode, by default on every device but CUDA, where the check's host read would stall
        the launch queue; ``MAMBACL_CHECK_FINITE=1`` turns it on there, ``0`` off everywhere, see
        :func:`~mambacl.kernels.utils.finite_check_enabled`), or an unknown backend.

    Examples:
        >>> u = torch.randn(2, 8, 5); A = -torch.rand(8, 4); B = torch.randn(2, 4, 5)
        >>> selective_scan(u, torch.rand(2, 8, 5), A, B, B).shape
        torch.Size([2, 8, 5])
    """
    check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    resolved = check_backend(backend, u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if resolved == "reference":
        return selective_scan_ref(*args)
    if resolved == "chunk":
        return selective_scan_chunk(*args)
    from .triton import selective_scan_triton

    return selective_scan_triton(*args)


selective_scan_fn = selective_scan
