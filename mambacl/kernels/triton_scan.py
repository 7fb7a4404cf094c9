"""Triton forward and backward kernels shared by Mamba's selective scan and the Longhorn scan.

Both ops run ``h_t = a_t * h_{t-1} + b_t``, ``y_t = sum_n C_t[n] h_t[n]``, ``out = (y + D u) * silu(z)`` and differ
only in how the pair ``(a_t, b_t)`` is formed (the constexpr ``MODE``):

- Mamba (0): ``dt = softplus(delta + bias)`` (optional), ``a = exp(dt A)``, ``b = dt B u``;
- Longhorn (1): ``beta = sigmoid(delta + bias)``, ``eps = beta / (1 + beta |k|^2)``, ``a = 1 - eps k^2``,
  ``b = eps k u`` (``B`` plays k, ``C`` plays q).

One program per (batch, block of BLOCK_D channels) holds a ``[BLOCK_D, BLOCK_N]`` fp32 state and walks the
sequence in chunks of T steps: inside a chunk ``tl.associative_scan`` composes the pairs along time, then the
carried state is applied. The forward saves only the state at each chunk end, ``[b, D, n_chunks, N]`` fp32.
The backward walks the chunks in reverse, recomputes a chunk's states from the previous chunk-end state (an
exclusive scan gives ``h_{t-1}`` exactly, without dividing by decays) and runs the reverse scan
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` as a forward scan over time-reversed loads (one ``tl.flip`` brings g back
to time order; ``associative_scan(reverse=True)`` is avoided, see triton-lang/triton#4362).

B/C in any of the three forms share one addressing scheme ``b*sb + (d // gsize)*sg + n*sn + t*st``: constant
``[D, N]`` (gsize 1, sb = st = 0), variable ``[b, N, L]`` (gsize D, sg = 0) and grouped ``[b, G, N, L]``.
Gradients of variable/grouped B/C are added with atomics into an fp32 buffer (summed over the block's channels
first when they all share one B/C row); constant B/C, A, D and delta_bias gradients are per-batch partial sums
reduced with ``torch.sum``. Internals are fp32 whatever the input dtype; decays use exp2 with clamped exponents.
Forward and backward are registered as ``torch.ops.mambacl.triton_scan_fwd`` / ``_bwd`` (opaque to torch.compile).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .utils import bc_state_size

MODES = {"mamba": 0, "longhorn": 1}
LOG2E = tl.constexpr(1.4426950408889634)
# exp2 above 126 is near the fp32 limit: decay exponents are clamped there (reachable only with A > 0 or dt < 0).
MAX_EXP2 = tl.constexpr(126.0)
# Default tiles [BLOCK_D, T, BLOCK_N] (elements) and warps: the backward keeps about three times as many live
# tiles as the forward. Picked from ptxas register reports for sm_90 (no spills), not from timings.
FWD_TILE, FWD_WARPS = 4096, 8
BWD_TILE, BWD_WARPS = 1024, 8


@triton.jit
def _combine(a0, b0, a1, b1):
    """Pair operator: applying (a0, b0) then (a1, b1) is (a1 a0, a1 b0 + b1)."""
    return a1 * a0, a1 * b0 + b1


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with Kahan's log1p correction (no tl.log1p in the interpreter), identity above 20.
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _bc_offsets(pid_b, offs_d, tt, offs_n, sb, sg, sn, st, gsize):
    """Offsets ``[BLOCK_D, T, BLOCK_N]`` of B/C (or of their gradient buffers) in any of the three forms."""
    grp = offs_d // gsize
    return pid_b * sb + grp[:, None, None] * sg + tt[None, :, None] * st + offs_n[None, None, :] * sn


@triton.jit
def _load_bc(ptr, pid_b, offs_d, tt, offs_n, m2, mask_n, sb, sg, sn, st, gsize):
    """B/C ``[BLOCK_D, T, BLOCK_N]`` in fp32, zero where ``m2`` (channel, time) or the state is masked."""
    return tl.load(ptr + _bc_offsets(pid_b, offs_d, tt, offs_n, sb, sg, sn, st, gsize),
                   mask=m2[:, :, None] & mask_n[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _pair(u_ptr, delta_ptr, B_ptr, A_tile, bias, pid_b, offs_d, tt, offs_n, mask_d, mask_n, t_lo, seqlen,
          s_b, s_d, B_sb, B_sg, B_sn, B_st, B_gs,
          MODE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Pairs ``(a, b)`` ``[BLOCK_D, T, BLOCK_N]`` at times ``tt``; identity (1, 0) outside ``[t_lo, seqlen)``.

    Also returns u, the raw delta (+ bias), ``dt`` (Mamba) or ``eps`` (Longhorn) ``[BLOCK_D, T]`` and B.
    """
    valid_t = (tt >= t_lo) & (tt < seqlen)
    m2 = mask_d[:, None] & valid_t[None, :]
    m3 = m2[:, :, None] & mask_n[None, None, :]
    offs = pid_b * s_b + offs_d[:, None] * s_d + tt[None, :]
    u = tl.load(u_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    Bv = _load_bc(B_ptr, pid_b, offs_d, tt, offs_n, m2, mask_n, B_sb, B_sg, B_sn, B_st, B_gs)
    if MODE == 0:
        gated = raw
        if SOFTPLUS:
            gated = _softplus(raw)
        a = tl.exp2(tl.minimum(gated[:, :, None] * A_tile[:, None, :] * LOG2E, MAX_EXP2))
        b = (gated * u)[:, :, None] * Bv
    else:
        beta = tl.sigmoid(raw)
        gated = beta / (1.0 + beta * tl.sum(Bv * Bv, axis=2))
        a = 1.0 - gated[:, :, None] * Bv * Bv
        b = (gated * u)[:, :, None] * Bv
    a = tl.where(m3, a, 1.0)
    b = tl.where(m3, b, 0.0)
    return a, b, u, raw, gated, Bv


@triton.jit
def _load_channel(ptr, offs_d, mask_d, HAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A per-channel vector (D or delta_bias) in fp32, zeros when absent."""
    v = tl.zeros((BLOCK_D,), tl.float32)
    if HAS:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return v


@triton.jit
def _last_in_time(x, T: tl.constexpr):
    """``x[:, T-1, :]`` of a ``[BLOCK_D, T, BLOCK_N]`` tile."""
    return tl.sum(tl.where((tl.arange(0, T) == T - 1)[None, :, None], x, 0.0), axis=1)


@triton.jit
def _program_setup(A_ptr, D_ptr, bias_ptr, dim, d_state, n_chunks, MODE: tl.constexpr, HAS_D: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch, channel/state offsets and masks, per-channel parameters and state offsets."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A_tile = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if MODE == 0:
        A_tile = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = _load_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BLOCK_D)
    Dv = _load_channel(D_ptr, offs_d, mask_d, HAS_D, BLOCK_D)
    state_offs = ((pid_b * dim + offs_d[:, None]) * n_chunks) * d_state + offs_n[None, :]
    return pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A_tile, bias, Dv, state_offs


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    dim, seqlen, d_state, n_chunks, s_b, s_d,
    B_sb, B_sg, B_sn, B_st, B_gs, C_sb, C_sg, C_sn, C_st, C_gs,
    MODE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A_tile, bias, Dv, state_offs = _program_setup(
        A_ptr, D_ptr, bias_ptr, dim, d_state, n_chunks, MODE, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for c in range(0, n_chunks):
        tt = c * T + tl.arange(0, T)
        a, b, u, raw, gated, Bv = _pair(u_ptr, delta_ptr, B_ptr, A_tile, bias, pid_b, offs_d, tt, offs_n, mask_d,
                                        mask_n, 0, seqlen, s_b, s_d, B_sb, B_sg, B_sn, B_st, B_gs,
                                        MODE, SOFTPLUS, HAS_BIAS)
        acum, bcum = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
        hs = acum * h[:, None, :] + bcum
        m2 = mask_d[:, None] & (tt < seqlen)[None, :]
        Cv = _load_bc(C_ptr, pid_b, offs_d, tt, offs_n, m2, mask_n, C_sb, C_sg, C_sn, C_st, C_gs)
        y = tl.sum(hs * Cv, axis=2)
        if HAS_D:
            y += Dv[:, None] * u
        offs = pid_b * s_b + offs_d[:, None] * s_d + tt[None, :]
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m2)
        h = _last_in_time(hs, T)
        tl.store(states_ptr + state_offs + c * d_state, h, mask=mask_dn)


@triton.jit
def _add_bc_grad(ptr, val, pid_b, offs_d, tt, offs_n, mask_d, mask_n, seqlen, sb, sg, sn, st, gsize,
                 SAME_GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Atomically add a ``[BLOCK_D, T, BLOCK_N]`` variable/grouped B/C gradient into its fp32 buffer."""
    mask_tn = (tt < seqlen)[:, None] & mask_n[None, :]
    if SAME_GROUP:
        # every channel of the block reads the same B/C row: reduce over channels before the atomics
        grp = (tl.program_id(1) * BLOCK_D) // gsize
        offs = pid_b * sb + grp * sg + tt[:, None] * st + offs_n[None, :] * sn
        tl.atomic_add(ptr + offs, tl.sum(val, axis=0), mask=mask_tn)
    else:
        offs = _bc_offsets(pid_b, offs_d, tt, offs_n, sb, sg, sn, st, gsize)
        tl.atomic_add(ptr + offs, val, mask=mask_d[:, None, None] & mask_tn[None, :, :])


@triton.jit
def _grad_y(dout_ptr, z_ptr, pid_b, offs_d, tt, mask_d, seqlen, s_b, s_d, HAS_Z: tl.constexpr):
    """Gradient reaching y at times ``tt``: ``dout * silu(z)`` (or dout), zero outside the sequence."""
    m2 = mask_d[:, None] & (tt < seqlen)[None, :]
    offs = pid_b * s_b + offs_d[:, None] * s_d + tt[None, :]
    dy = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        dy = dy * zv * tl.sigmoid(zv)
    return dy


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, seqlen, d_state, n_chunks, s_b, s_d,
    B_sb, B_sg, B_sn, B_st, B_gs, C_sb, C_sg, C_sn, C_st, C_gs,
    dB_sb, dB_sg, dB_sn, dB_st, dC_sb, dC_sg, dC_sn, dC_st,
    MODE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, B_CONST: tl.constexpr, C_CONST: tl.constexpr, B_SAME_GROUP: tl.constexpr,
    C_SAME_GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn, A_tile, bias, Dv, state_offs = _program_setup(
        A_ptr, D_ptr, bias_ptr, dim, d_state, n_chunks, MODE, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    ar = tl.arange(0, T)
    g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dB_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dC_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t0 = c * T
        tt = t0 + ar
        h0 = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        if c > 0:
            h0 = tl.load(states_ptr + state_offs + (c - 1) * d_state, mask=mask_dn, other=0.0)
        # h_{t-1}: exclusive scan (pairs at t-1, identity at the chunk start) applied to the chunk-start state
        ap, bp, _, _, _, _ = _pair(u_ptr, delta_ptr, B_ptr, A_tile, bias, pid_b, offs_d, tt - 1, offs_n, mask_d,
                                   mask_n, t0, seqlen, s_b, s_d, B_sb, B_sg, B_sn, B_st, B_gs,
                                   MODE, SOFTPLUS, HAS_BIAS)
        acum, bcum = tl.associative_scan((ap, bp), axis=1, combine_fn=_combine)
        h_prev = acum * h0[:, None, :] + bcum
        a, b, u, raw, gated, Bv = _pair(u_ptr, delta_ptr, B_ptr, A_tile, bias, pid_b, offs_d, tt, offs_n, mask_d,
                                        mask_n, 0, seqlen, s_b, s_d, B_sb, B_sg, B_sn, B_st, B_gs,
                                        MODE, SOFTPLUS, HAS_BIAS)
        h = a * h_prev + b
        # g in time-reversed order: position j is time t0 + T - 1 - j, its decay a_{t+1} and input C_t dy_t
        tr = t0 + T - 1 - ar
        an, _, _, _, _, _ = _pair(u_ptr, delta_ptr, B_ptr, A_tile, bias, pid_b, offs_d, tr + 1, offs_n, mask_d,
                                  mask_n, 0, seqlen, s_b, s_d, B_sb, B_sg, B_sn, B_st, B_gs,
                                  MODE, SOFTPLUS, HAS_BIAS)
        dy_r = _grad_y(dout_ptr, z_ptr, pid_b, offs_d, tr, mask_d, seqlen, s_b, s_d, HAS_Z)
        C_r = _load_bc(C_ptr, pid_b, offs_d, tr, offs_n, mask_d[:, None] & (tr < seqlen)[None, :], mask_n,
                       C_sb, C_sg, C_sn, C_st, C_gs)
        gcum_a, gcum_b = tl.associative_scan((an, C_r * dy_r[:, :, None]), axis=1, combine_fn=_combine)
        g_r = gcum_a * g_next[:, None, :] + gcum_b
        g_next = _last_in_time(g_r, T)
        g = tl.flip(g_r, 1)

        m2 = mask_d[:, None] & (tt < seqlen)[None, :]
        offs = pid_b * s_b + offs_d[:, None] * s_d + tt[None, :]
        Cv = _load_bc(C_ptr, pid_b, offs_d, tt, offs_n, m2, mask_n, C_sb, C_sg, C_sn, C_st, C_gs)
        dy = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            pre = tl.sum(h * Cv, axis=2) + Dv[:, None] * u  # y + D u, recomputed rather than saved
            tl.store(dz_ptr + offs, (dy * pre * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                     mask=m2)
            dy = dy * zv * sig
        du = tl.zeros((BLOCK_D, T), tl.float32)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
            du = Dv[:, None] * dy
        dCv = h * dy[:, :, None]
        da = g * h_prev  # dL/da_t
        gB = tl.sum(g * Bv, axis=2)
        if MODE == 0:
            da_log = da * a  # dL/d(dt A)
            ddt = tl.sum(da_log * A_tile[:, None, :], axis=2) + gB * u
            du += gB * gated
            dA_acc += tl.sum(da_log * gated[:, :, None], axis=1)
            dBv = g * (gated * u)[:, :, None]
            draw = ddt
            if SOFTPLUS:
                draw = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
        else:
            eps = gated
            ksq = Bv * Bv
            deps = gB * u - tl.sum(da * ksq, axis=2)
            # eps = beta r with r = 1 / (1 + beta |k|^2) = 1 - eps |k|^2; d eps/d beta = r^2, d eps/d|k|^2 = -eps^2
            r = 1.0 - eps * tl.sum(ksq, axis=2)
            dBv = (da * (-2.0 * eps)[:, :, None] - (2.0 * deps * eps * eps)[:, :, None]) * Bv \
                + g * (eps * u)[:, :, None]
            du += gB * eps
            beta = tl.sigmoid(raw)
            draw = deps * r * r * beta * (1.0 - beta)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + offs, draw.to(ddelta_ptr.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            dbias_acc += tl.sum(tl.where(m2, draw, 0.0), axis=1)
        if B_CONST:
            dB_acc += tl.sum(dBv, axis=1)
        else:
            _add_bc_grad(dB_ptr, dBv, pid_b, offs_d, tt, offs_n, mask_d, mask_n, seqlen,
                         dB_sb, dB_sg, dB_sn, dB_st, B_gs, B_SAME_GROUP, BLOCK_D)
        if C_CONST:
            dC_acc += tl.sum(dCv, axis=1)
        else:
            _add_bc_grad(dC_ptr, dCv, pid_b, offs_d, tt, offs_n, mask_d, mask_n, seqlen,
                         dC_sb, dC_sg, dC_sn, dC_st, C_gs, C_SAME_GROUP, BLOCK_D)
    dn_offs = (pid_b * dim + offs_d[:, None]) * d_state + offs_n[None, :]
    if MODE == 0:
        tl.store(dA_ptr + dn_offs, dA_acc, mask=mask_dn)
    if B_CONST:
        tl.store(dB_ptr + dn_offs, dB_acc, mask=mask_dn)
    if C_CONST:
        tl.store(dC_ptr + dn_offs, dC_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


# ---------------------------------------------------------------- host side


def _is_interpreted() -> bool:
    """True when triton.jit ran under TRITON_INTERPRET=1 (kernels then run on the CPU with numpy)."""
    return type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


def check_block_sizes(chunk_size: Optional[int], block_d: Optional[int]) -> None:
    """Raise a ValueError naming ``chunk_size`` or ``block_d`` unless each is None or a positive power of two."""
    for name, value in (("chunk_size", chunk_size), ("block_d", block_d)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def scan_config(d_state: int, seqlen: int, chunk_size: Optional[int] = None, block_d: Optional[int] = None,
                backward: bool = False) -> Tuple[int, int, int]:
    """Block sizes ``(BLOCK_D, BLOCK_N, T)`` with N padded to a power of two.

    The default T depends only on N and L, so the forward and the backward agree on the saved chunks; the
    default BLOCK_D fills a tile of FWD_TILE (or BWD_TILE) elements.

    Args:
        d_state: N; seqlen: L.
        chunk_size, block_d: explicit T / BLOCK_D (powers of two), or None for the defaults.
        backward: pick the default BLOCK_D for the backward kernel.
    """
    check_block_sizes(chunk_size, block_d)
    block_n = triton.next_power_of_2(d_state)
    if chunk_size is None:
        chunk_size = min(triton.next_power_of_2(seqlen), max(8, min(64, 512 // block_n)))
    if block_d is None:
        block_d = min(16, max(1, (BWD_TILE if backward else FWD_TILE) // (chunk_size * block_n)))
    return block_d, block_n, chunk_size


def _bc_strides(t: torch.Tensor, dim: int) -> Tuple[int, int, int, int, int]:
    """``(sb, sg, sn, st, gsize)`` addressing B/C of any form as ``[b, group(d), n, t]``."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1), 0, 1
    if t.dim() == 3:
        return t.stride(0), 0, t.stride(1), t.stride(2), dim
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3), dim // t.shape[1]


class _Launch(NamedTuple):
    batch: int
    dim: int
    seqlen: int
    d_state: int
    block_d: int
    block_n: int
    T: int
    n_chunks: int
    grid: Tuple[int, int]


def _launch(mode: str, u: torch.Tensor, B: torch.Tensor, chunk_size: Optional[int], block_d: Optional[int],
            backward: bool) -> _Launch:
    """Check the mode and the device, and pick the block sizes and the grid of one kernel launch."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if u.device.type != "cuda" and not _is_interpreted():
        raise ValueError(f"the triton backend needs CUDA tensors (CPU ones only under TRITON_INTERPRET=1); "
                         f"u is on {u.device}")
    batch, dim, seqlen = u.shape
    d_state = bc_state_size(B)
    block_d, block_n, T = scan_config(d_state, seqlen, chunk_size, block_d, backward)
    return _Launch(batch, dim, seqlen, d_state, block_d, block_n, T, triton.cdiv(seqlen, T),
                   (batch, triton.cdiv(dim, block_d)))


def _ptr(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """An absent optional tensor is passed as ``fallback``: its constexpr flag is off, so it is never read."""
    return fallback if t is None else t


def scan_fwd(mode: str, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor], B: torch.Tensor,
             C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
             delta_bias: Optional[torch.Tensor], softplus: bool, *, chunk_size: Optional[int] = None,
             block_d: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the scan for ``mode`` ('mamba' or 'longhorn'); inputs must be contiguous.

    Args:
        u, delta, z: ``[b, D, L]``; P: A ``[D, N]`` (Mamba) or None (Longhorn); B, C: ``[D, N]``, ``[b, N, L]``
        or ``[b, G, N, L]``; D, delta_bias: ``[D]`` or None; softplus: Mamba's delta_softplus.
        chunk_size, block_d: time steps per chunk and channels per program (powers of two) or None.
    Returns:
        out ``[b, D, L]`` in u's dtype and the chunk-end states ``[b, D, n_chunks, N]`` fp32 (the last is h_L).
    """
    cfg = _launch(mode, u, B, chunk_size, block_d, backward=False)
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    states = torch.empty((cfg.batch, cfg.dim, cfg.n_chunks, cfg.d_state), dtype=torch.float32, device=u.device)
    _scan_fwd_kernel[cfg.grid](
        u, delta, _ptr(P, u), B, C, _ptr(D, u), _ptr(z, u), _ptr(delta_bias, u), out, states,
        cfg.dim, cfg.seqlen, cfg.d_state, cfg.n_chunks, u.stride(0), u.stride(1),
        *_bc_strides(B, cfg.dim), *_bc_strides(C, cfg.dim),
        MODE=MODES[mode], SOFTPLUS=bool(softplus), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, T=cfg.T, num_warps=FWD_WARPS,
    )
    return out, states


def _bc_grad_buffer(t: torch.Tensor, batch: int, dim: int, d_state: int, block_d: int):
    """fp32 gradient buffer for B/C, its strides and flags (constant: per-batch partial ``[b, D, N]``)."""
    if t.dim() == 2:
        buf = torch.empty((batch, dim, d_state), dtype=torch.float32, device=t.device)
        return buf, (dim * d_state, d_state, 1, 0), True, False
    buf = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
    sb, sg, sn, st, gsize = _bc_strides(buf, dim)
    return buf, (sb, sg, sn, st), False, t.dim() == 3 or gsize % block_d == 0


def scan_bwd(mode: str, dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor],
             B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
             delta_bias: Optional[torch.Tensor], states: torch.Tensor, softplus: bool, *,
             chunk_size: Optional[int] = None, block_d: Optional[int] = None) -> Sequence[Optional[torch.Tensor]]:
    """Backward of :func:`scan_fwd` from its chunk-end states (same chunk_size and block_d).

    Returns:
        gradients of ``(u, delta, P, B, C, D, z, delta_bias)`` in their input dtypes, None for absent inputs.
    """
    cfg = _launch(mode, u, B, chunk_size, block_d, backward=True)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    dz = None if z is None else torch.empty(z.shape, dtype=z.dtype, device=u.device)
    # per-batch partial sums, reduced below (deterministic, no atomics)
    partial = dict(device=u.device, dtype=torch.float32)
    dA = None if P is None else torch.empty((cfg.batch, cfg.dim, cfg.d_state), **partial)
    dD = None if D is None else torch.empty((cfg.batch, cfg.dim), **partial)
    dbias = None if delta_bias is None else torch.empty((cfg.batch, cfg.dim), **partial)
    dB, dB_strides, B_const, B_same = _bc_grad_buffer(B, cfg.batch, cfg.dim, cfg.d_state, cfg.block_d)
    dC, dC_strides, C_const, C_same = _bc_grad_buffer(C, cfg.batch, cfg.dim, cfg.d_state, cfg.block_d)
    _scan_bwd_kernel[cfg.grid](
        u, delta, _ptr(P, u), B, C, _ptr(D, u), _ptr(z, u), _ptr(delta_bias, u), dout, states,
        du, ddelta, _ptr(dz, du), _ptr(dA, du), dB, dC, _ptr(dD, du), _ptr(dbias, du),
        cfg.dim, cfg.seqlen, cfg.d_state, cfg.n_chunks, u.stride(0), u.stride(1),
        *_bc_strides(B, cfg.dim), *_bc_strides(C, cfg.dim), *dB_strides, *dC_strides,
        MODE=MODES[mode], SOFTPLUS=bool(softplus), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, B_CONST=B_const, C_CONST=C_const, B_SAME_GROUP=B_same,
        C_SAME_GROUP=C_same, BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, T=cfg.T, num_warps=BWD_WARPS,
    )
    dB = dB.sum(0) if B_const else dB
    dC = dC.sum(0) if C_const else dC
    return (du, ddelta, None if P is None else dA.sum(0).to(P.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype))


# ---- torch.library registration: opaque ops so torch.compile neither traces the launches nor the interpreter ----

@torch.library.custom_op("mambacl::triton_scan_fwd", mutates_args=())
def _triton_scan_fwd_op(mode: str, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor], B: torch.Tensor,
                        C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                        delta_bias: Optional[torch.Tensor], softplus: bool, chunk_size: Optional[int],
                        block_d: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    return scan_fwd(mode, u, delta, P, B, C, D, z, delta_bias, softplus, chunk_size=chunk_size, block_d=block_d)


@_triton_scan_fwd_op.register_fake
def _(mode, u, delta, P, B, C, D, z, delta_bias, softplus, chunk_size, block_d):
    batch, dim, seqlen = u.shape
    d_state = bc_state_size(B)
    _, _, T = scan_config(d_state, seqlen, chunk_size, block_d)
    return u.new_empty(u.shape), u.new_empty((batch, dim, triton.cdiv(seqlen, T), d_state), dtype=torch.float32)


@torch.library.custom_op("mambacl::triton_scan_bwd", mutates_args=())
def _triton_scan_bwd_op(mode: str, dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor,
                        P: Optional[torch.Tensor], B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                        z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], states: torch.Tensor,
                        softplus: bool, chunk_size: Optional[int], block_d: Optional[int]) -> List[torch.Tensor]:
    grads = scan_bwd(mode, dout, u, delta, P, B, C, D, z, delta_bias, states, softplus,
                     chunk_size=chunk_size, block_d=block_d)
    return [u.new_empty(0) if g is None else g for g in grads]


@_triton_scan_bwd_op.register_fake
def _(mode, dout, u, delta, P, B, C, D, z, delta_bias, states, softplus, chunk_size, block_d):
    return [u.new_empty(0) if x is None else x.new_empty(x.shape) for x in (u, delta, P, B, C, D, z, delta_bias)]


def triton_scan_fwd(mode: str, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor], B: torch.Tensor,
                    C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                    delta_bias: Optional[torch.Tensor], softplus: bool, chunk_size: Optional[int],
                    block_d: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`scan_fwd` through the registered op ``torch.ops.mambacl.triton_scan_fwd`` (block sizes checked)."""
    check_block_sizes(chunk_size, block_d)
    return _triton_scan_fwd_op(mode, u, delta, P, B, C, D, z, delta_bias, softplus, chunk_size, block_d)


def triton_scan_bwd(mode: str, dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor],
                    B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                    delta_bias: Optional[torch.Tensor], states: torch.Tensor, softplus: bool,
                    chunk_size: Optional[int], block_d: Optional[int]) -> Sequence[Optional[torch.Tensor]]:
    """:func:`scan_bwd` through the registered op ``torch.ops.mambacl.triton_scan_bwd`` (None for absent inputs)."""
    grads = _triton_scan_bwd_op(mode, dout, u, delta, P, B, C, D, z, delta_bias, states, softplus, chunk_size,
                                block_d)
    return [None if x is None else g for x, g in zip((u, delta, P, B, C, D, z, delta_bias), grads)]
