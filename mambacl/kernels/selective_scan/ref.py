"""Sequential selective scan: the executable specification every other backend is tested against."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..utils import bc_state_size, compute_dtype, empty_scan, expand_bc, softplus


def selective_scan_ref(
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
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Mamba's selective scan as a plain loop over time (mamba-ssm ``selective_scan_ref`` semantics).

    Args:
        u, delta: ``[b, D, L]``; z: ``[b, D, L]`` or None.
        A: ``[D, N]`` real.
        B, C: constant ``[D, N]``, variable ``[b, N, L]`` or grouped ``[b, G, N, L]``.
        D, delta_bias: ``[D]`` or None.
    Returns:
        out ``[b, D, L]`` in u's dtype, and the last state ``[b, D, N]`` (fp32) when requested.
        Computed in fp32 (fp64 when u is fp64); differentiable through autograd. Inputs without elements give
        :func:`~mambacl.kernels.utils.empty_scan` (the zero initial state as last state, zero gradients).
    """
    if u.numel() == 0:
        return empty_scan(u, (delta, A, B, C, D, z, delta_bias), bc_state_size(B), return_last_state)
    dtype_in = u.dtype
    cdt = compute_dtype(dtype_in)
    batch, dim, seqlen = u.shape
    u, delta, A = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta = softplus(delta)
    B_full = expand_bc(B.to(cdt), batch, dim, seqlen)
    C_full = expand_bc(C.to(cdt), batch, dim, seqlen)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B_full[..., t] * u[:, :, t, None]
        ys.append((h * C_full[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.to(cdt)[None, :, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
