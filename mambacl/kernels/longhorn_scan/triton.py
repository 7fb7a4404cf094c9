"""Triton Longhorn scan: Longhorn's pair on the shared kernels of :mod:`mambacl.kernels.triton_scan`."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ..triton_scan import check_block_sizes, triton_scan_bwd, triton_scan_fwd
from ..utils import bc_state_size, empty_scan, input_guard


@input_guard
def _longhorn_scan_fwd(u: torch.Tensor, delta: torch.Tensor, k: torch.Tensor, q: torch.Tensor,
                       D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], *,
                       chunk_size: Optional[int] = None, block_d: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out ``[b, D, L]`` (u's dtype) and the chunk-end states ``[b, D, n_chunks, N]`` fp32."""
    return triton_scan_fwd("longhorn", u, delta, None, k, q, D, z, delta_bias, False, chunk_size, block_d)


@input_guard
def _longhorn_scan_bwd(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, k: torch.Tensor, q: torch.Tensor,
                       D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                       states: torch.Tensor, *, chunk_size: Optional[int] = None, block_d: Optional[int] = None
                       ) -> Sequence[Optional[torch.Tensor]]:
    """Returns the gradients of ``(u, delta, k, q, D, z, delta_bias)`` in their dtypes (None when absent)."""
    du, ddelta, _, dk, dq, dD, dz, dbias = triton_scan_bwd("longhorn", dout, u, delta, None, k, q, D, z, delta_bias,
                                                           states, False, chunk_size, block_d)
    return du, ddelta, dk, dq, dD, dz, dbias


class LonghornScanTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, k, q, D, z, delta_bias, chunk_size, block_d):
        out, states = _longhorn_scan_fwd(u, delta, k, q, D, z, delta_bias, chunk_size=chunk_size, block_d=block_d)
        ctx.save_for_backward(u, delta, k, q, D, z, delta_bias, states)
        ctx.config = (chunk_size, block_d)
        last = states[:, :, -1].contiguous()
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        *inputs, states = ctx.saved_tensors
        chunk_size, block_d = ctx.config
        grads = _longhorn_scan_bwd(dout, *inputs, states, chunk_size=chunk_size, block_d=block_d)
        return (*grads, None, None)


def longhorn_scan_triton(
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
    block_d: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Longhorn scan with the Triton kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args and Returns as :func:`mambacl.kernels.longhorn_scan` (no validation of the tensors here), plus
    ``chunk_size`` and ``block_d`` as in :func:`mambacl.kernels.selective_scan.triton.selective_scan_triton`.
    """
    if u.numel() == 0:
        check_block_sizes(chunk_size, block_d)
        return empty_scan(u, (delta, k, q, D, z, delta_bias), bc_state_size(k), return_last_state)
    out, last = LonghornScanTritonFunction.apply(u, delta, k, q, D, z, delta_bias, chunk_size, block_d)
    return (out, last) if return_last_state else out
