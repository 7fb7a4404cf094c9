"""Argument validation and small helpers shared by every scan backend."""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

MAX_D_STATE = 256
SOFTPLUS_THRESHOLD = 20.0
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("auto", "reference", "chunk", "triton")
FINITE_CHECK_ENV = "MAMBACL_CHECK_FINITE"


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


def bc_state_size(t: torch.Tensor) -> int:
    """N of an already validated B/C (or k/q) in any of its three forms."""
    return t.shape[-1] if t.dim() == 2 else t.shape[-2]


def bc_d_state(name: str, t: torch.Tensor) -> int:
    """The state size N of one of B/C (or k/q) in any of its three forms; raise on a wrong type or rank."""
    _check_tensor(name, t)
    if t.dim() not in (2, 3, 4):
        raise ValueError(
            f"{name} must be constant (dim, d_state), variable (batch, d_state, L) or grouped (batch, G, d_state, L); "
            f"got shape {tuple(t.shape)}"
        )
    return bc_state_size(t)


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


def finite_check_enabled(device: torch.device) -> bool:
    """Whether :func:`check_finite` runs for inputs on ``device``.

    ``MAMBACL_CHECK_FINITE=1`` turns the check on for every device, ``0`` off; unset (or empty), it runs on
    every device but CUDA. On CUDA the check reads a device flag back to the host, one synchronisation per scan
    call (48 per Vim-tiny forward) that stalls the launch queue, so it is opt-in there.
    """
    value = os.environ.get(FINITE_CHECK_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{FINITE_CHECK_ENV} must be '0', '1' or unset, got {value!r}")
    return value == "1" if value else device.type != "cuda"


def check_finite(**tensors: Optional[torch.Tensor]) -> None:
    """Raise a ValueError naming every input that holds NaN or inf.

    One ``aminmax`` pass per tensor (NaN propagates to both, an inf shows in one) and one host read for all
    inputs together. Skipped where :func:`finite_check_enabled` says so (by default on CUDA), while
    torch.compile traces (the check is data-dependent) and for tensors without data (meta device) or elements.
    """
    present = {n: t for n, t in tensors.items() if t is not None and t.device.type != "meta" and t.numel()}
    if not present or torch.compiler.is_compiling():
        return
    if not finite_check_enabled(next(iter(present.values())).device):
        return
    ok = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all() for t in present.values()])
    if not bool(ok.all()):
        bad = [name for name, fine in zip(present, ok.tolist()) if not fine]
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


class _EmptyScan(torch.autograd.Function):
    """The scan of inputs without elements: an empty out, the zero initial state, zero gradients."""

    @staticmethod
    def forward(ctx, d_state: int, u: torch.Tensor, *others: Optional[torch.Tensor]):
        ctx.specs = [None if t is None else (t.shape, t.dtype, t.device) for t in (u, *others)]
        batch, dim, _ = u.shape
        last = torch.zeros(batch, dim, d_state, dtype=compute_dtype(u.dtype), device=u.device)
        ctx.mark_non_differentiable(last)
        return u.new_empty(u.shape), last

    @staticmethod
    def backward(ctx, dout, dlast):
        zeros = [None if s is None else torch.zeros(s[0], dtype=s[1], device=s[2]) for s in ctx.specs]
        return (None, *zeros)


def empty_scan(u: torch.Tensor, others: Sequence[Optional[torch.Tensor]], d_state: int,
               return_last_state: bool) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """What every backend returns when ``u`` ``[b, D, L]`` has no elements (b, D or L is 0).

    Args:
        u: the empty input; others: the op's other tensor inputs (None when absent), which get zero gradients.
        d_state: N. return_last_state: also return the last state.
    Returns:
        out ``[b, D, L]`` (empty, u's dtype), and the last state ``[b, D, N]``: the zero initial state
        (fp32, fp64 for fp64 u), as no step ran.
    """
    out, last = _EmptyScan.apply(d_state, u, *others)
    return (out, last) if return_last_state else out


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
