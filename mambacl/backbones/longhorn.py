"""Longhorn mixer (Liu et al., arXiv 2407.14207): the Mamba block with the online-learning recurrence.

Follows Cranial-XIX/Longhorn ``models/longhorn.py``: x_proj gives the dt input, the key k (``x_proj_B``)
and the query q (``x_proj_C``); ``dt_proj`` (the authors' ``dt_head``) gives the per-channel dt whose bias
enters ``beta = sigmoid(dt + bias)``. There is no A. The bias starts at zero as in the authors' init.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import longhorn_scan
from .mamba import SSMBranch, SSMMixer, _at_least_fp32, register_mixer

__all__ = ["LonghornBranch", "LonghornMixer"]


class LonghornBranch(SSMBranch):
    """Longhorn direction; ``tap_delta`` shows the effective step ``eps = beta / (1 + beta * |k|^2)``."""

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1, d_conv: int = 4,
                 scan_impl: str = "auto") -> None:
        super().__init__(d_inner, d_state, dt_rank, d_conv, scan_impl)
        nn.init.zeros_(self.dt_proj.bias)

    def step_size(self, dt: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``eps = beta / (1 + beta * sum_n k_n^2)``, ``beta = sigmoid(dt + bias)``, ``[b, L, D]``."""
        beta = torch.sigmoid(dt + self.dt_proj.bias)
        return beta / (1 + beta * B.square().sum(-1, keepdim=True))

    def scan(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        return longhorn_scan(x, dt, B, C, _at_least_fp32(self.D), z, _at_least_fp32(self.dt_proj.bias),
                             backend=self.scan_impl)


@register_mixer("longhorn")
class LonghornMixer(SSMMixer):
    """Longhorn mixer, bidirectional for vision with ``bidirectional=True``; see :class:`SSMMixer`.

    Examples:
        >>> LonghornMixer(16, bidirectional=True)(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    branch_cls = LonghornBranch
