"""Direct (float64, hand-written) computations of the mixers, used as the oracle in the backbone tests."""
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from mambacl.backbones import LonghornBranch, SSMBranch, SSMMixer
from mambacl.kernels import longhorn_scan_ref, selective_scan_ref


def branch_direct(branch: SSMBranch, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One direction by hand: explicit causal conv sum, matmul projections, the reference scan (float64)."""
    w = branch.conv1d.weight.double()[:, 0]
    k_size, seqlen = w.shape[1], x.shape[-1]
    xp = F.pad(x, (k_size - 1, 0))
    conv = sum(w[:, k, None] * xp[..., k:k + seqlen] for k in range(k_size)) + branch.conv1d.bias.double()[:, None]
    xc = F.silu(conv)
    xt = xc.transpose(1, 2)
    dt = xt @ branch.x_proj_dt.weight.double().T @ branch.dt_proj.weight.double().T
    B = xt @ branch.x_proj_B.weight.double().T
    C = xt @ branch.x_proj_C.weight.double().T
    bias, D = branch.dt_proj.bias.double(), branch.D.double()
    if isinstance(branch, LonghornBranch):
        y = longhorn_scan_ref(xc, dt.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2), D, z, bias)
        beta = torch.sigmoid(dt + bias)
        delta = beta / (1 + beta * (B ** 2).sum(-1, keepdim=True))
    else:
        A = -torch.exp(branch.A_log.double())
        y = selective_scan_ref(xc, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z, bias,
                               delta_softplus=True)
        delta = F.softplus(dt + bias)
    return y, {"x": xt, "delta": delta}


def mixer_direct(mixer: SSMMixer, hidden: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
    """The whole mixer by hand; returns the output [b, L, d_model] and the expected tap values."""
    xz = hidden.double() @ mixer.in_proj.weight.double().T
    d_inner = xz.shape[-1] // 2
    x, z = xz[..., :d_inner].transpose(1, 2), xz[..., d_inner:].transpose(1, 2)
    y, taps = branch_direct(mixer.fwd, x, z)
    expected = {"fwd": taps}
    if mixer.bwd is not None:
        y_b, expected["bwd"] = branch_direct(mixer.bwd, x.flip(-1), z.flip(-1))
        y = (y + y_b.flip(-1)) / 2
    expected["out"] = y.transpose(1, 2)
    return expected["out"] @ mixer.out_proj.weight.double().T, expected


@pytest.fixture
def direct():
    return mixer_direct
