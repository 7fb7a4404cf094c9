"""Argument validation and small helpers shared by every scan backend."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

MAX_D_STATE = 256
SOFTPLUS_THRESHOLD = 20.0
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("auto", "reference", "chunk", "triton")


def softplus(x: torch.Tensor) -> torch.Tensor:
    """Softplus with the CUDA kernel's threshold: log1p(exp(x)) for x <= 20, identity above."""
    return F.softplus(x, beta=1.0, threshold=SOFTPLUS_THRESHOLD)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Internal dtype: fp32 for half types and fp32, fp64 kept (used by float64 references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, t: torch.Tensor, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real; complex tensors are not supported")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16 or fp64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_same_device(ref: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but u is on {ref.device}; all inputs must share a device")


def bc_d_state(name: str, t: torch.Tensor) -> int:
    """The state size N of one of B/C (or k/q) in any of its three forms; raise on a wrong type or rank."""
    _check_tensor(name, t)
    if t.dim() not in (2, 3, 4):
        raise ValueError(
            f"{name} must be constant (dim, d_state), variable (batch, d_state, L) or grouped (batch, G, d_state, L); "
            f"got shape {tuple(t.shape)}"
        )
    return t.shape[-1] if t.dim() == 2 else t.shape[-2]


def check_bc(name: str, t: torch.Tensor, batch: int, dim: int, d_state: int, seqlen: int) -> None:
    """Validate one of B/C (or k/q): constant (D, N), variable (b, N, L) or grouped (b, G, N, L)."""
    bc_d_state(name, t)
    if t.dim() == 2:
        expected = (dim, d_state)
    elif t.dim() == 3:
        expected = (batch, d_state, seqlen)
    elif t.dim() == 4:
        groups = t.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(
                f"{name}: dim {dim} is not divisible by the number of groups {groups} (shape {tuple(t.shape)})")
        expected = (batch, groups, d_state, seqlen)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected}")


def check_channel_vector(name: str, t: Optional[torch.Tensor], dim: int) -> None:
    if t is None:
        return
    _check_tensor(name, t, 1)
    if t.shape[0] != dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({dim},)")


def check_sequence(name: str, t: Optional[torch.Tensor], shape: tuple, required: bool = False) -> None:
    """Validate a ``(batch, dim, L)`` input; None passes unless `required`."""
    if t is None and not required:
        return
    _check_tensor(name, t, 3)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (batch, dim, L) = {shape}")


def check_finite(**tensors: Optional[torch.Tensor]) -> None:
    """Raise a ValueError naming every input that holds NaN or inf.

    One reduction and one host sync for all inputs together. Skipped while torch.compile traces (the check is
    data-dependent) and for tensors without data (meta device).
    """
    present = {n: t for n, t in tensors.items() if t is not None and t.device.type != "meta"}
    if not present or torch.compiler.is_compiling():
        return
    flags = torch.stack([torch.isfinite(t).all() for t in present.values()])
    if not bool(flags.all()):
        bad = [name for name, ok in zip(present, flags.tolist()) if not ok]
        raise ValueError(f"{', '.join(bad)}: non-finite values (NaN or inf) in the scan inputs")


def check_backend(backend: str, device: torch.device) -> str:
    """Resolve 'auto' to a concrete backend and validate an explicit one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunk"
    return backend


def expand_bc(t: torch.Tensor, batch: int, dim: int, seqlen: int) -> torch.Tensor:
    """Return B/C as a (batch, dim, N, L) view (broadcast, no copy) in any of the three forms."""
    if t.dim() == 2:
        return t[None, :, :, None].expand(batch, dim, t.shape[1], seqlen)
    if t.dim() == 3:
        return t[:, None].expand(batch, dim, t.shape[1], seqlen)
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)


def reduce_bc_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a (batch, dim, N, L) gradient back to the shape of the B/C form `like`."""
    if like.dim() == 2:
        return grad.sum(dim=(0, 3))
    if like.dim() == 3:
        return grad.sum(dim=1)
    batch, groups, d_state, seqlen = like.shape
    return grad.reshape(batch, groups, -1, d_state, seqlen).sum(dim=2)


def input_guard(fn: Callable) -> Callable:
    """Make tensor arguments contiguous and run on their device (the fla convention)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
