"""Mamba-1 mixer (Gu & Dao, arXiv 2312.00752) and its Vim "bimamba v2" bidirectional form (arXiv 2401.09417).

Structure and initialisation follow state-spaces/mamba ``modules/mamba_simple.py`` and Vim's vendored copy,
with ``x_proj`` split into three named layers (``x_proj_dt``, ``x_proj_B``, ``x_proj_C``) so that a
continual-learning strategy can project each one separately. The scan itself is ``mambacl.kernels``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Set, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.optim import param_groups_weight_decay

from ..kernels import selective_scan
from ..kernels.utils import BACKENDS
from .taps import Tap

__all__ = [
    "SSMBranch", "SSMMixer", "MambaBranch", "MambaMixer", "MIXERS", "register_mixer",
    "no_weight_decay_names", "ssm_param_groups",
]


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """SSM parameters enter the scan in fp32 even in half-precision models (float64 is kept)."""
    return t if t.dtype == torch.float64 else t.float()


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class SSMBranch(nn.Module):
    """One scan direction: causal depthwise conv + SiLU, split x_proj, dt_proj, D and the scan.

    Subclasses define the recurrence through :meth:`step_size` (what ``tap_delta`` shows) and :meth:`scan`.

    Args:
        d_inner: channels D of the branch.
        d_state: state size N.
        dt_rank: rank R of the delta projection.
        d_conv: kernel size of the causal depthwise convolution.
        scan_impl: kernel backend, one of 'auto', 'reference', 'chunk', 'triton'.

    Taps (see :mod:`mambacl.backbones.taps`):
        ``tap_x``: x after conv + SiLU, ``[b, L, D]`` in this branch's token order (input of x_proj_*).
        ``tap_delta``: the per-channel step, ``[b, L, D]`` (only computed when active).
        ``tap_delta_x``: ``F[b, i, :] = sum_t delta[b, t, i] * x[b, t, :]``, ``[b, D, D]`` (only when active).
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1, d_conv: int = 4,
                 scan_impl: str = "auto") -> None:
        super().__init__()
        for name, value in (("d_inner", d_inner), ("d_state", d_state), ("dt_rank", dt_rank), ("d_conv", d_conv)):
            _check_positive_int(name, value)
        if scan_impl not in BACKENDS:
            raise ValueError(f"scan_impl must be one of {BACKENDS}, got {scan_impl!r}")
        self.d_inner, self.d_state, self.dt_rank, self.scan_impl = d_inner, d_state, dt_rank, scan_impl
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj_dt = nn.Linear(d_inner, dt_rank, bias=False)
        self.x_proj_B = nn.Linear(d_inner, d_state, bias=False)
        self.x_proj_C = nn.Linear(d_inner, d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True
        self.tap_x, self.tap_delta, self.tap_delta_x = Tap(), Tap(), Tap()

    def step_size(self, dt: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Effective per-channel step from ``dt = W_dt x_proj_dt(x)`` ``[b, L, D]`` and B ``[b, L, N]``."""
        raise NotImplementedError

    def scan(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        """Run the recurrence on ``[b, D, L]`` x, dt (bias not yet added), z and ``[b, N, L]`` B, C."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Args: x, z ``[b, D, L]`` (pre-conv input and gate, this branch's order). Returns ``[b, D, L]``."""
        seqlen = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :seqlen])
        x_tok = self.tap_x(x.transpose(1, 2))
        dt = F.linear(self.x_proj_dt(x_tok), self.dt_proj.weight)
        B, C = self.x_proj_B(x_tok), self.x_proj_C(x_tok)
        if self.tap_delta.active or self.tap_delta_x.active:
            delta = self.tap_delta(self.step_size(dt, B))
            if self.tap_delta_x.active:
                self.tap_delta_x(torch.einsum("bti,btj->bij", delta, x_tok))
        return self.scan(x_tok.transpose(1, 2), dt.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2), z)


class MambaBranch(SSMBranch):
    """Mamba-1 selective SSM direction with S4D-real ``A_log`` and the inverse-softplus dt bias.

    Args (beyond :class:`SSMBranch`):
        dt_min, dt_max: range of the log-uniform initial step; dt_init_floor: its lower clamp.
        dt_scale: scale of the uniform dt_proj weight init, ``s = dt_rank^-0.5 * dt_scale``.
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1, d_conv: int = 4, scan_impl: str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0) -> None:
        super().__init__(d_inner, d_state, dt_rank, d_conv, scan_impl)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        bound = dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            dt = self.initial_dt(d_inner, dt_min, dt_max).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.A_log._no_weight_decay = True

    @staticmethod
    def initial_dt(d_inner: int, dt_min: float, dt_max: float) -> torch.Tensor:
        """Initial per-channel steps ``[d_inner]``: log-uniform in [dt_min, dt_max] (mamba-ssm)."""
        return torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))

    def step_size(self, dt: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``delta = softplus(dt + dt_proj.bias)``, ``[b, L, D]``."""
        return F.softplus(dt + self.dt_proj.bias)

    def scan(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        return selective_scan(x, dt, -torch.exp(_at_least_fp32(self.A_log)), B, C, _at_least_fp32(self.D), z,
                              _at_least_fp32(self.dt_proj.bias), delta_softplus=True, backend=self.scan_impl)


class SSMMixer(nn.Module):
    """Mamba-style block mixer: shared ``in_proj`` -> one or two :class:`SSMBranch` -> shared ``out_proj``.

    With ``bidirectional=True`` (Vim "bimamba v2", ``if_divide_out``) a second branch ``bwd`` runs on the
    flipped sequence (x and z flipped) and the out_proj input is ``(y_fwd + flip(y_bwd)) / 2``.

    Subclasses set ``branch_cls``. New mixers for :class:`~mambacl.backbones.VisionMamba` only need the
    constructor keywords below and a ``[b, L, d_model] -> [b, L, d_model]`` forward; register them with
    :func:`register_mixer`.

    Args:
        d_model: model width.
        d_state: state size N.
        d_conv: causal conv kernel size.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the delta projection, 'auto' = ``ceil(d_model / 16)``.
        bidirectional: add the backward branch.
        scan_impl: kernel backend, one of 'auto', 'reference', 'chunk', 'triton'.
        **branch_kwargs: extra branch init options (e.g. dt_min, dt_max).

    Taps: ``tap_out`` receives the input of out_proj, ``[b, L, d_inner]``.
    """

    branch_cls: Type[SSMBranch] = SSMBranch

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", bidirectional: bool = False, scan_impl: str = "auto",
                 **branch_kwargs) -> None:
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("expand", expand)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        self.d_model, self.d_inner, self.bidirectional = d_model, expand * d_model, bool(bidirectional)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)

        def make_branch() -> SSMBranch:
            return self.branch_cls(self.d_inner, d_state, dt_rank, d_conv, scan_impl, **branch_kwargs)

        self.fwd = make_branch()
        self.bwd = make_branch() if self.bidirectional else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.tap_out = Tap()

    def branches(self) -> List[SSMBranch]:
        """The scan directions, forward first."""
        return [self.fwd] if self.bwd is None else [self.fwd, self.bwd]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden ``[b, L, d_model]``. Returns ``[b, L, d_model]``."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must have shape (batch, seqlen, {self.d_model}), got {tuple(hidden.shape)}")
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        y = self.fwd(x, z)
        if self.bwd is not None:
            y = (y + self.bwd(x.flip(-1), z.flip(-1)).flip(-1)) / 2
        return self.out_proj(self.tap_out(y.transpose(1, 2)))


class MambaMixer(SSMMixer):
    """Mamba-1 mixer (unidirectional, or Vim bimamba v2 with ``bidirectional=True``); see :class:`SSMMixer`.

    Examples:
        >>> mixer = MambaMixer(16, bidirectional=True)
        >>> mixer(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    branch_cls = MambaBranch


MIXERS: Dict[str, Type[nn.Module]] = {"mamba": MambaMixer}


def register_mixer(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator making a mixer available to ``VisionMamba(mixer=name)``."""
    def wrap(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered to {MIXERS[name].__name__}")
        MIXERS[name] = cls
        return cls
    return wrap


def no_weight_decay_names(module: nn.Module) -> Set[str]:
    """Names of the parameters flagged ``_no_weight_decay`` (A_log, D, dt_proj.bias, ...)."""
    return {name for name, p in module.named_parameters() if getattr(p, "_no_weight_decay", False)}


def ssm_param_groups(model: nn.Module, weight_decay: float = 0.05) -> List[dict]:
    """Optimizer parameter groups with the SSM parameters, biases, norms and ``model.no_weight_decay()`` undecayed.

    Args:
        model: any module; ``model.no_weight_decay()`` is honoured when present.
        weight_decay: decay of the remaining parameters.
    Returns:
        groups in the format of timm's ``param_groups_weight_decay``.
    """
    names = no_weight_decay_names(model)
    if hasattr(model, "no_weight_decay"):
        names |= set(model.no_weight_decay())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=names)
