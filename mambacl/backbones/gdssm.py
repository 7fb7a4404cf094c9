"""GD-SSM: a layer that does one step of in-context gradient descent (arXiv 2410.11687, "GRIL" in v3).

Follows the construction of Efficient-Scalable-Machine-Learning/gd-ssm ``gd_ssm/gd_ssm.py`` as a causal
sequence mixer. Each position t sees the 3-token window ``w_t = [e_{t-2}, e_{t-1}, e_t]`` (zeros before the
start). Local self-attention over the window gives the factors of an outer product and a readout:

    a_t = P_a w_t   (d_v),    b_t = P_b w_t   (N),    c_t = P_c w_t   (N)

so ``a_t b_t^T = w_t^T (alpha beta^T) w_t`` when the projections act per slot (the paper's ``window^T W_q
window`` with ``W_q = e1 e2^T``). A diagonal linear recurrence accumulates the products and the output is
read multiplicatively:

    S_t = Lambda * S_{t-1} + a_t b_t^T        (d_v x N, Lambda = exp(-|decay|) elementwise)
    o_t = W_o (S_t c_t)

The recurrence is ``mambacl.kernels.selective_scan`` with channels = the d_v rows and state = the N columns:
``u = a``, ``B = b``, ``delta = 1``, ``A = -|decay|``, ``C = c``.

With tokens ``[x, 0]`` / ``[0, y]`` (see :mod:`mambacl.benchmarks.icl_regression`), :meth:`GDSSMLayer.constructed`
sets ``a = y`` of slot 1, ``b = x`` of slot 0, ``c = x`` of slots 1 and 2, ``Lambda = 1`` and
``W_o = -(eta / N) e_y``: at the query the y coordinate receives ``-eta/N sum_i y_i x_i . x_q``, minus the
one-step GD prediction from ``W0 = 0``, and every ``y_j`` token receives ``-W x_j`` (its residual for the
next step), so stacked layers with the residual stream perform further (causal) GD steps.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import selective_scan
from ..kernels.utils import BACKENDS
from .mamba import _at_least_fp32, _check_positive_int, register_mixer

__all__ = ["GDSSMLayer", "GDSSMMixer", "BidirectionalMixer", "local_windows"]

WINDOW = 3


def local_windows(hidden: torch.Tensor, size: int = WINDOW) -> torch.Tensor:
    """Causal windows ``[e_{t-size+1}, ..., e_t]`` concatenated on the last axis (zeros before the start).

    Args:
        hidden: ``[b, L, d]``.
        size: window length.
    Returns:
        ``[b, L, size * d]``, slot 0 the oldest token.
    """
    seqlen = hidden.shape[1]
    padded = F.pad(hidden, (0, 0, size - 1, 0))
    return torch.cat([padded[:, s:s + seqlen] for s in range(size)], dim=-1)


class GDSSMLayer(nn.Module):
    """One causal GD-SSM layer, ``[b, L, d_model] -> [b, L, d_model]``.

    Args:
        d_model: token width.
        d_state: N, columns of the accumulator (the key/readout width).
        expand: ``d_v = expand * d_model`` rows of the accumulator.
        scan_impl: kernel backend, one of 'auto', 'reference', 'chunk', 'triton'.

    Cost: O(L d_model (d_v + N) + L d_v N) time, a ``d_v x N`` state per sequence.

    Examples:
        >>> GDSSMLayer(8, d_state=4)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 1, scan_impl: str = "auto") -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("expand", expand)):
            _check_positive_int(name, value)
        if scan_impl not in BACKENDS:
            raise ValueError(f"scan_impl must be one of {BACKENDS}, got {scan_impl!r}")
        self.d_model, self.d_state, self.d_v, self.scan_impl = d_model, d_state, expand * d_model, scan_impl
        self.a_proj = nn.Linear(WINDOW * d_model, self.d_v, bias=False)
        self.b_proj = nn.Linear(WINDOW * d_model, d_state, bias=False)
        self.c_proj = nn.Linear(WINDOW * d_model, d_state, bias=False)
        # Lambda = exp(-|decay|) starts in (0.9, 1]: a slowly forgetting accumulator.
        self.decay = nn.Parameter(0.1 * torch.rand(self.d_v, d_state))
        self.decay._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_v, d_model, bias=False)

    @classmethod
    def constructed(cls, d: int, eta: float, n_pairs: int, scan_impl: str = "auto",
                    dtype: torch.dtype = torch.float32) -> "GDSSMLayer":
        """The analytic layer: one step of GD with step ``eta`` on ``n_pairs`` pairs of dimension ``d``.

        Tokens are ``[x, 0]`` / ``[0, y]`` (``d_model = d + 1``); the prediction is ``-output[:, -1, d]``.
        ``dtype`` is the parameter dtype (set before writing ``-eta / n_pairs`` so that it is not rounded).
        """
        _check_positive_int("d", d)
        _check_positive_int("n_pairs", n_pairs)
        layer = cls(d + 1, d_state=d, expand=1, scan_impl=scan_impl).to(dtype)
        dm = d + 1
        eye = torch.eye(d, dtype=dtype)
        with torch.no_grad():
            for p in (layer.a_proj.weight, layer.b_proj.weight, layer.c_proj.weight, layer.decay,
                      layer.out_proj.weight):
                p.zero_()
            layer.a_proj.weight[0, dm + d] = 1.0          # a = y of slot 1
            layer.b_proj.weight[:, :d] = eye              # b = x of slot 0
            layer.c_proj.weight[:, dm:dm + d] = eye       # c = x of slot 1 (y tokens) ...
            layer.c_proj.weight[:, 2 * dm:2 * dm + d] = eye  # ... or of slot 2 (x tokens)
            layer.out_proj.weight[d, 0] = -eta / n_pairs
        return layer

    @property
    def log_lambda(self) -> torch.Tensor:
        """``log Lambda = -|decay|``, ``[d_v, N]`` (the scan's A)."""
        return -_at_least_fp32(self.decay).abs()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden ``[b, L, d_model]``. Returns ``[b, L, d_model]``."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must have shape (batch, seqlen, {self.d_model}), got {tuple(hidden.shape)}")
        window = local_windows(hidden)
        a = self.a_proj(window).transpose(1, 2)
        b = self.b_proj(window).transpose(1, 2)
        c = self.c_proj(window).transpose(1, 2)
        y = selective_scan(a, torch.ones_like(a), self.log_lambda, b, c, backend=self.scan_impl)
        return self.out_proj(y.transpose(1, 2))


class BidirectionalMixer(nn.Module):
    """A causal core, or (``bidirectional=True``) the average of a forward core and a core on the flipped sequence.

    Args:
        d_model: token width.
        make_core: builds one ``[b, L, d_model] -> [b, L, d_model]`` causal module.
        bidirectional: add the backward core (for vision; the result is then not causal).
    """

    def __init__(self, d_model: int, make_core: Callable[[], nn.Module], bidirectional: bool = False) -> None:
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.bidirectional = bool(bidirectional)
        self.fwd = make_core()
        self.bwd = make_core() if self.bidirectional else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden ``[b, L, d_model]``. Returns ``[b, L, d_model]``."""
        out = self.fwd(hidden)
        if self.bwd is not None:
            out = (out + self.bwd(hidden.flip(1)).flip(1)) / 2
        return out


@register_mixer("gdssm")
class GDSSMMixer(BidirectionalMixer):
    """GD-SSM as a block mixer (``MIXERS['gdssm']``); see :class:`GDSSMLayer`.

    Examples:
        >>> GDSSMMixer(16, d_state=8)(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 1, bidirectional: bool = False,
                 scan_impl: str = "auto") -> None:
        super().__init__(d_model, lambda: GDSSMLayer(d_model, d_state, expand, scan_impl), bidirectional)
