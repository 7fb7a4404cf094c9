"""Triton selective scan: Mamba's pair on the shared kernels of :mod:`mambacl.kernels.triton_scan`."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ..triton_scan import check_block_sizes, triton_scan_bwd, triton_scan_fwd
from ..utils import bc_state_size, empty_scan, input_guard


@input_guard
def _selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                        delta_softplus: bool, *, chunk_size: Optional[int] = None, block_d: Optional[int] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out ``[b, D, L]`` (u's dtype) and the chunk-end states ``[b, D, n_chunks, N]`` fp32."""
    return triton_scan_fwd("mamba", u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, block_d)


@input_guard
def _selective_scan_bwd(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                        delta_bias: Optional[torch.Tensor], states: torch.Tensor, delta_softplus: bool, *,
                        chunk_size: Optional[int] = None, block_d: Optional[int] = None
                        ) -> Sequence[Optional[torch.Tensor]]:
    """Returns the gradients of ``(u, delta, A, B, C, D, z, delta_bias)`` in their dtypes (None when absent)."""
    return triton_scan_bwd("mamba", dout, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus,
                           chunk_size, block_d)


class SelectiveScanTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, block_d):
        out, states = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          chunk_size=chunk_size, block_d=block_d)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.config = (delta_softplus, chunk_size, block_d)
        last = states[:, :, -1].contiguous()
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        *inputs, states = ctx.saved_tensors
        delta_softplus, chunk_size, block_d = ctx.config
        grads = _selective_scan_bwd(dout, *inputs, states, delta_softplus, chunk_size=chunk_size, block_d=block_d)
        return (*grads, None, None, None)


def selective_scan_triton(
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
    block_d: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Selective scan with the Triton kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args and Returns as :func:`mambacl.kernels.selective_scan` (no validation of the tensors here), plus
    ``chunk_size`` (time steps per chunk) and ``block_d`` (channels per program), powers of two or None for
    defaults picked from N and L. Backward recomputes each chunk from its saved chunk-end state. Inputs without
    elements give :func:`~mambacl.kernels.utils.empty_scan` (no launch).
    """
    if u.numel() == 0:
        check_block_sizes(chunk_size, block_d)
        return empty_scan(u, (delta, A, B, C, D, z, delta_bias), bc_state_size(B), return_last_state)
    out, last = SelectiveScanTritonFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                  chunk_size, block_d)
    return (out, last) if return_last_state else out
