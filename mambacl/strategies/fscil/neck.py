"""Mamba-FSCIL's dual selective SSM projector (Li et al., arXiv 2407.06136; xiaojieli0903/Mamba-FSCIL ``MambaNeck``).

A backbone map ``F [b, C, H, W]`` goes through a base branch (1x1-conv MLP, position embedding, one Mamba
block without out_proj scanned in four directions with shared weights, token mean) plus a residual
``GAP(F)``; the incremental sessions add a second branch of the same form fed with ``F.detach()``, whose
gate rows of ``in_proj`` start at zero so that ``silu(z) = 0`` and it adds exactly nothing at first.
The scan direction is :class:`mambacl.backbones.MambaBranch` (conv1d, split x_proj, dt_proj, A_log, D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from timm.layers import trunc_normal_

from mambacl.backbones import MambaBranch

__all__ = ["FourScanSSM", "SSMOutput", "ProjectorBranch", "MambaNeck", "NeckOutput"]


@dataclass
class SSMOutput:
    """What one :class:`FourScanSSM` forward returns.

    Attributes:
        y: summed, re-aligned outputs of the four scans ``[b, L, D]`` (row-major token order).
        z: the gate pre-activation of each scan, in that scan's token order, ``4 x [b, D, L]``.
        dt_low, B, C: the h-scan's low-rank dt ``[b, L, R]`` and input-dependent B, C ``[b, L, N]``.
    """

    y: torch.Tensor
    z: List[torch.Tensor]
    dt_low: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor


class FourScanSSM(nn.Module):
    """One Mamba block (expand 1, no out_proj) scanned over an ``H x W`` token grid in four directions.

    The directions are row-major (h), h flipped, column-major (v) and v flipped; each scan's output is put back
    in row-major order and the four are summed. ``in_proj`` and the branch weights are shared.

    Args:
        dim: token width D (= d_inner).
        d_state: state size N (256 in the paper).
        dt_rank: rank of the dt projection (256 in the paper).
        d_conv: causal conv kernel size.
        zero_gate: zero-initialise the z rows of ``in_proj`` (incremental branch).
        scan_impl: kernel backend passed to :class:`MambaBranch`.
    """

    def __init__(self, dim: int, d_state: int = 256, dt_rank: int = 256, d_conv: int = 4, zero_gate: bool = False,
                 scan_impl: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.in_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.ssm = MambaBranch(dim, d_state, dt_rank, d_conv, scan_impl)
        if zero_gate:
            with torch.no_grad():
                self.in_proj.weight[dim:].zero_()

    @staticmethod
    def scan_orders(height: int, width: int, device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """Token permutations (indices into row-major order) for the h, h-flip, v and v-flip scans."""
        h = torch.arange(height * width, device=device)
        v = h.view(height, width).t().reshape(-1)
        return [h, h.flip(0), v, v.flip(0)]

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> SSMOutput:
        """Args: tokens ``[b, L, D]`` in row-major order with ``L = height * width``. Returns :class:`SSMOutput`."""
        if tokens.dim() != 3 or tokens.shape[1] != height * width or tokens.shape[2] != self.dim:
            raise ValueError(f"tokens must have shape (batch, {height * width}, {self.dim}), got {tuple(tokens.shape)}")
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)
        seen: List[torch.Tensor] = []
        y, zs = torch.zeros_like(x), []
        for k, order in enumerate(self.scan_orders(height, width, tokens.device)):
            xk, zk = x[..., order], z[..., order]
            # The h-scan's conv+SiLU output feeds the separation loss (dt_low, B, C are linear in it).
            handle = self.ssm.tap_x.register_forward_hook(lambda m, i, o: seen.append(o)) if k == 0 else None
            try:
                yk = self.ssm(xk, zk)
            finally:
                if handle is not None:
                    handle.remove()
            y = y.index_add(2, order, yk)
            zs.append(zk)
        x_h = seen[0]
        return SSMOutput(y.transpose(1, 2), zs, self.ssm.x_proj_dt(x_h), self.ssm.x_proj_B(x_h), self.ssm.x_proj_C(x_h))


def _mlp(in_chs: int, dim: int, num_layers: int, feat_hw: Tuple[int, int]) -> nn.Sequential:
    """1x1-conv MLP: [Conv(->2C, bias), LayerNorm([2C, H, W]), LeakyReLU(0.1)] x (num_layers - 1), Conv(->D)."""
    hidden, layers, chs = 2 * in_chs, [], in_chs
    for _ in range(num_layers - 1):
        layers += [nn.Conv2d(chs, hidden, 1, bias=True), nn.LayerNorm([hidden, *feat_hw]), nn.LeakyReLU(0.1)]
        chs = hidden
    layers.append(nn.Conv2d(chs, dim, 1, bias=False))
    return nn.Sequential(*layers)


class ProjectorBranch(nn.Module):
    """MLP + position embedding + :class:`FourScanSSM` + token mean, ``[b, C, H, W] -> [b, D]``.

    Args:
        in_chs: backbone channels C.
        dim: output width D.
        feat_hw: backbone map size (H, W).
        num_layers: MLP depth (2 on CIFAR/mini, 3 on CUB's incremental branch).
        zero_gate, d_state, dt_rank, d_conv, scan_impl: see :class:`FourScanSSM`.
    """

    def __init__(self, in_chs: int, dim: int, feat_hw: Tuple[int, int], num_layers: int = 2, zero_gate: bool = False,
                 d_state: int = 256, dt_rank: int = 256, d_conv: int = 4, scan_impl: str = "auto") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.feat_hw = tuple(feat_hw)
        self.mlp = _mlp(in_chs, dim, num_layers, self.feat_hw)
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, feat_hw[0] * feat_hw[1], dim), std=0.02))
        self.block = FourScanSSM(dim, d_state, dt_rank, d_conv, zero_gate, scan_impl)

    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, SSMOutput]:
        """Args: feat ``[b, C, H, W]``. Returns the pooled feature ``[b, D]`` and the block's :class:`SSMOutput`."""
        tokens = self.mlp(feat).flatten(2).transpose(1, 2) + self.pos_embed
        out = self.block(tokens, *self.feat_hw)
        return out.y.mean(dim=1), out


@dataclass
class NeckOutput:
    """Feature and loss inputs of one :class:`MambaNeck` forward.

    Attributes:
        feat: the projected feature ``[b, D]``.
        base: the base branch's :class:`SSMOutput`.
        inc: the incremental branch's :class:`SSMOutput` (None before :meth:`MambaNeck.add_incremental_branch`).
    """

    feat: torch.Tensor
    base: SSMOutput
    inc: Optional[SSMOutput]


class MambaNeck(nn.Module):
    """Dual selective SSM projector: ``f = f_base + r`` (base session), ``+ f_inc`` once the branch exists.

    Args:
        in_chs: backbone channels C.
        dim: output width D (640 on CIFAR, 512 on mini, 1024 on CUB).
        feat_hw: backbone map size (H, W), e.g. (2, 2) for ResNet-12 on 32 px.
        num_layers: MLP depth of the base branch; inc_num_layers: of the incremental branch.
        use_residual_proj: ``r = Linear(C -> D)(GAP(F))`` instead of ``GAP(F)`` (which needs C = D).
        detach_base: in the incremental sessions detach ``f_base + r`` (CIFAR/mini: base branch frozen).
        d_state, dt_rank, d_conv, scan_impl: SSM options, see :class:`FourScanSSM`.

    Examples:
        >>> neck = MambaNeck(8, 8, (2, 2), d_state=4, dt_rank=2)
        >>> neck(torch.randn(3, 8, 2, 2)).feat.shape
        torch.Size([3, 8])
    """

    def __init__(self, in_chs: int, dim: int, feat_hw: Tuple[int, int], num_layers: int = 2, inc_num_layers: int = 2,
                 use_residual_proj: bool = False, detach_base: bool = True, d_state: int = 256, dt_rank: int = 256,
                 d_conv: int = 4, scan_impl: str = "auto") -> None:
        super().__init__()
        if not use_residual_proj and in_chs != dim:
            raise ValueError(f"dim must equal in_chs ({in_chs}) without use_residual_proj, got {dim}")
        self.in_chs, self.dim, self.feat_hw, self.detach_base = in_chs, dim, tuple(feat_hw), detach_base
        self._ssm_kwargs = dict(d_state=d_state, dt_rank=dt_rank, d_conv=d_conv, scan_impl=scan_impl)
        self.inc_num_layers = inc_num_layers
        self.base = ProjectorBranch(in_chs, dim, self.feat_hw, num_layers, **self._ssm_kwargs)
        self.residual_proj = nn.Linear(in_chs, dim, bias=False) if use_residual_proj else nn.Identity()
        self.inc: Optional[ProjectorBranch] = None

    def add_incremental_branch(self) -> ProjectorBranch:
        """Build the incremental branch (gate rows zero, so it adds zero until trained) and return it."""
        self.inc = ProjectorBranch(self.in_chs, self.dim, self.feat_hw, self.inc_num_layers, zero_gate=True,
                                   **self._ssm_kwargs).to(self.base.pos_embed.device)
        return self.inc

    def base_parameters(self) -> List[nn.Parameter]:
        """Parameters of the base branch and residual projection (frozen after the base session on CIFAR/mini)."""
        return list(self.base.parameters()) + list(self.residual_proj.parameters())

    def forward(self, feat: torch.Tensor) -> NeckOutput:
        """Args: feat ``[b, C, H, W]`` backbone map. Returns :class:`NeckOutput` with ``feat [b, D]``."""
        if feat.dim() != 4 or feat.shape[1] != self.in_chs or tuple(feat.shape[2:]) != self.feat_hw:
            raise ValueError(f"feat must have shape (batch, {self.in_chs}, {self.feat_hw[0]}, {self.feat_hw[1]}), "
                             f"got {tuple(feat.shape)}")
        f_base, base_out = self.base(feat)
        out = f_base + self.residual_proj(feat.mean(dim=(2, 3)))
        if self.inc is None:
            return NeckOutput(out, base_out, None)
        if self.detach_base:
            out = out.detach()
        f_inc, inc_out = self.inc(feat.detach())
        return NeckOutput(out + f_inc, base_out, inc_out)
