"""Direct (float64, hand-written) computations of the mixers, used as the oracle in the backbone tests."""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from mambacl.backbones import DefocusBranch, LonghornBranch, SSMBranch, SSMMixer
from mambacl.kernels import longhorn_scan_ref, selective_scan_ref


def causal_conv_direct(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution as an explicit sum over the kernel taps: x ``[b, D, L]``, weight ``[D, 1, K]``."""
    w = weight.double()[:, 0]
    k_size, seqlen = w.shape[1], x.shape[-1]
    xp = F.pad(x, (k_size - 1, 0))
    return sum(w[:, k, None] * xp[..., k:k + seqlen] for k in range(k_size)) + bias.double()[:, None]


def rope_direct(t: torch.Tensor, freq: torch.Tensor, scale: float) -> torch.Tensor:
    """De-focus RoPE written out per pair (mamba-cl utils/mamba_block.py:203-220) on ``[b, N, L]``, float64:
    out[2k] = t[2k] cos(a_2k) - t[2k+1] sin(a_2k), out[2k+1] = t[2k+1] cos(a_2k+1) + t[2k] sin(a_2k+1),
    with a_n = (l / scale) * freq[n]."""
    angle = (torch.arange(t.shape[-1], dtype=torch.float64) / scale)[None, :] * freq.double()[:, None]  # [N, L]
    out = torch.empty_like(t)
    for k in range(0, t.shape[1], 2):
        out[:, k] = t[:, k] * angle[k].cos() - t[:, k + 1] * angle[k].sin()
        out[:, k + 1] = t[:, k + 1] * angle[k + 1].cos() + t[:, k] * angle[k + 1].sin()
    return out


def group_rms_direct(y: torch.Tensor, group: int) -> torch.Tensor:
    """``[b, D, L]`` divided by the root mean square over each block of ``group`` channels (eps 1e-6), float64."""
    out = torch.empty_like(y)
    for g in range(0, y.shape[1], group):
        block = y[:, g:g + group]
        out[:, g:g + group] = block / torch.sqrt(block.square().mean(1, keepdim=True) + 1e-6)
    return out


def branch_direct(branch: SSMBranch, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One direction by hand: explicit causal conv sum, matmul projections, the reference scan (float64)."""
    xc = F.silu(causal_conv_direct(x, branch.conv1d.weight, branch.conv1d.bias))
    xt = xc.transpose(1, 2)
    dt = xt @ branch.x_proj_dt.weight.double().T @ branch.dt_proj.weight.double().T
    B = xt @ branch.x_proj_B.weight.double().T
    C = xt @ branch.x_proj_C.weight.double().T
    bias, D = branch.dt_proj.bias.double(), branch.D.double()
    if isinstance(branch, DefocusBranch):
        delta = F.softplus(dt + bias) / branch.delta_scale_factor
        freq, scale = branch.freq, branch.rope_scale_factor
        y = selective_scan_ref(xc, delta.transpose(1, 2), -torch.exp(branch.A_log.double()),
                               rope_direct(B.transpose(1, 2), freq, scale), rope_direct(C.transpose(1, 2), freq, scale))
        y = (group_rms_direct(y, branch.group_size) + D[:, None] * xc) * F.silu(z)
    elif isinstance(branch, LonghornBranch):
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
