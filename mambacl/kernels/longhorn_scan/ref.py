"""Sequential Longhorn scan: the executable specification of the Longhorn recurrence."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..utils import bc_state_size, compute_dtype, empty_scan, expand_bc


def longhorn_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Longhorn's diagonal online-learning recurrence as a plain loop over time.

    ``beta = sigmoid(delta + delta_bias)``, ``eps = beta / (1 + beta * sum_n k_n^2)``,
    ``h_t = (1 - eps*k^2) * h_{t-1} + eps*k*u_t``, ``y_t = sum_n q_n h_t + D*u_t``, gated by silu(z).

    Args:
        u, delta: ``[b, D, L]``; z: ``[b, D, L]`` or None.
        k, q: constant ``[D, N]``, variable ``[b, N, L]`` or grouped ``[b, G, N, L]``.
        D, delta_bias: ``[D]`` or None.
    Returns:
        out ``[b, D, L]`` in u's dtype, and the last state ``[b, D, N]`` when requested. Inputs without elements
        give :func:`~mambacl.kernels.utils.empty_scan`.
    """
    if u.numel() == 0:
        return empty_scan(u, (delta, k, q, D, z, delta_bias), bc_state_size(k), return_last_state)
    dtype_in = u.dtype
    cdt = compute_dtype(dtype_in)
    batch, dim, seqlen = u.shape
    u, delta = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]
    beta = torch.sigmoid(delta)
    k_full = expand_bc(k.to(cdt), batch, dim, seqlen)
    q_full = expand_bc(q.to(cdt), batch, dim, seqlen)
    h = u.new_zeros(batch, dim, k_full.shape[2])
    ys = []
    for t in range(seqlen):
        k_t = k_full[..., t]
        eps = (beta[:, :, t] / (1 + beta[:, :, t] * (k_t * k_t).sum(-1)))[..., None]
        h = (1 - eps * k_t * k_t) * h + eps * k_t * u[:, :, t, None]
        ys.append((h * q_full[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.to(cdt)[None, :, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
