"""Chunked PyTorch scan shared by Mamba's selective scan and Longhorn (any device, hand-written backward).

Both ops run the diagonal recurrence ``h_t = a_t * h_{t-1} + b_t``, ``y_t = sum_n C_t h_t`` and differ only in how
the pair ``(a_t, b_t)`` is formed from their inputs (a :class:`ScanForm`). Everything else lives here once:
the time-major layout, the chunk loop (forward saves only the state at each chunk start; backward recomputes a
chunk from it and runs the reverse scan for ``g_t = dL/dh_t``), the D skip, the silu(z) gate and the op
registration with ``torch.library`` so ``torch.compile`` treats the scan as one opaque op with its own backward.

Layout: channels are split as ``(G, Dg)`` with G the number of B/C groups, so every tensor broadcasts against
the state ``[T, b, G, Dg, N]``: sequences ``[T, b, G, Dg, 1]``, variable/grouped B/C ``[T, b, G|1, 1, N]``,
constant B/C and A ``[1, 1, G, Dg, N]``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .utils import bc_state_size, compute_dtype, empty_scan

CHUNK_ELEMENTS = 2 ** 19  # one chunk's [T, b, D, N] fp32 temporary stays near 2 MiB, in cache
MIN_CHUNK, MAX_CHUNK = 8, 64

Pair = Tuple[torch.Tensor, torch.Tensor]


class ScanForm:
    """How an op forms ``(a_t, b_t)`` from ``xs = (dt, u, P, Bc)`` in the time-major layout, and its VJP.

    ``dt`` is the gated delta (softplus for Mamba, sigmoid for Longhorn), ``P`` a per-(channel, state)
    parameter or None, ``Bc`` the input projection (B for Mamba, k for Longhorn).
    """

    def gate(self, raw: torch.Tensor, softplus: bool) -> torch.Tensor:
        raise NotImplementedError

    def gate_grad(self, raw: torch.Tensor, gated: torch.Tensor, grad: torch.Tensor, softplus: bool) -> torch.Tensor:
        raise NotImplementedError

    def pair(self, dt: torch.Tensor, u: torch.Tensor, P: Optional[torch.Tensor], Bc: torch.Tensor) -> Pair:
        raise NotImplementedError

    def pair_bwd(self, dt: torch.Tensor, u: torch.Tensor, P: Optional[torch.Tensor], Bc: torch.Tensor,
                 a: torch.Tensor, g: torch.Tensor, da: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        """Gradients of ``(dt, u, P, Bc)`` in broadcast shape, given ``g = dL/db_t`` and ``da = g h_{t-1} = dL/da_t``
        (a fresh tensor the form may overwrite)."""
        raise NotImplementedError


FORMS: Dict[str, ScanForm] = {}


def contract_n(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_n x[..., n] * c[..., n]`` keeping the last axis: a batched matmul when c is shared over channels."""
    if c.shape[-2] == 1 and x.shape[-2] > 1:
        return torch.matmul(x, c.transpose(-1, -2))
    return (x * c).sum(-1, keepdim=True)


def weighted_sum(x: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(x * w)`` summed down to ``shape`` (a B/C chunk shape); a matmul over channels where possible."""
    if shape[-2] == 1 and x.shape[-2] > 1 and shape[0] == x.shape[0]:
        return torch.matmul(w.transpose(-1, -2), x).sum_to_size(shape)
    return (x * w).sum_to_size(shape)


def _groups(dim: int, B: torch.Tensor, C: torch.Tensor) -> int:
    counts = {t.shape[1] for t in (B, C) if t.dim() == 4}
    if not counts:
        return 1
    return counts.pop() if len(counts) == 1 else dim


def _seq_tm(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, dim, seqlen = x.shape
    return x.permute(2, 0, 1).reshape(seqlen, batch, groups, dim // groups, 1).contiguous()


def _seq_from_tm(x: torch.Tensor, batch: int, dim: int, seqlen: int) -> torch.Tensor:
    return x.reshape(seqlen, batch, dim).permute(1, 2, 0)


def _bc_tm(t: torch.Tensor, dim: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    if t.dim() == 2:
        return t.reshape(1, 1, groups, dim // groups, t.shape[1])
    if t.dim() == 3:
        batch, d_state, seqlen = t.shape
        return t.permute(2, 0, 1).reshape(seqlen, batch, 1, 1, d_state).contiguous()
    if t.shape[1] != groups:
        t = t.repeat_interleave(groups // t.shape[1], dim=1)
    return t.permute(3, 0, 1, 2).unsqueeze(3).contiguous()


def _bc_from_tm(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return grad.reshape(like.shape)
    if like.dim() == 3:
        return grad.reshape(grad.shape[0], grad.shape[1], -1).permute(1, 2, 0)
    seqlen, batch, groups, _, d_state = grad.shape
    grad = grad.reshape(seqlen, batch, like.shape[1], groups // like.shape[1], d_state).sum(3)
    return grad.permute(1, 2, 3, 0)


def _chunk(x: Optional[torch.Tensor], t0: int, t1: int) -> Optional[torch.Tensor]:
    return x if x is None or x.shape[0] == 1 else x[t0:t1]


def _scan_chunk(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """In place: turn the inputs ``h = b_t`` of one chunk into its states, starting from ``h0``."""
    h[0].addcmul_(a[0], h0)
    for t in range(1, h.shape[0]):
        h[t].addcmul_(a[t], h[t - 1])
    return h


class _Prepared:
    """Inputs of one call in the time-major layout, with the gated delta."""

    def __init__(self, form: ScanForm, u, delta, P, B, C, delta_bias, softplus: bool) -> None:
        self.cdt = compute_dtype(u.dtype)
        self.batch, self.dim, self.seqlen = u.shape
        self.groups = _groups(self.dim, B, C)
        raw = delta.to(self.cdt)
        if delta_bias is not None:
            raw = raw + delta_bias.to(self.cdt)[None, :, None]
        self.raw = _seq_tm(raw, self.groups)
        self.dt = form.gate(self.raw, softplus)
        self.u = _seq_tm(u.to(self.cdt), self.groups)
        self.P = None if P is None else P.to(self.cdt).reshape(1, 1, self.groups, self.dim // self.groups, -1)
        self.B = _bc_tm(B, self.dim, self.groups, self.cdt)
        self.C = _bc_tm(C, self.dim, self.groups, self.cdt)
        self.d_state = self.B.shape[-1]

    def xs(self, t0: int, t1: int) -> Tuple[Optional[torch.Tensor], ...]:
        return tuple(_chunk(x, t0, t1) for x in (self.dt, self.u, self.P, self.B))

    def state_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.groups, self.dim // self.groups, self.d_state)


def _gate_out(pre: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
    return pre if z is None else pre * F.silu(z.to(pre.dtype))


def chunk_scan_fwd(form_name: str, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor],
                   B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                   delta_bias: Optional[torch.Tensor], softplus: bool, chunk: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the chunked scan.

    Returns:
        out ``[b, D, L]`` (u's dtype), last state ``[b, D, N]``, chunk-start states ``[n_chunks, b, D, N]`` and
        the ungated output ``y + D u`` ``[b, D, L]`` (empty without z), both saved for backward; internals in
        fp32/fp64.
    """
    form = FORMS[form_name]
    p = _Prepared(form, u, delta, P, B, C, delta_bias, softplus)
    starts = range(0, p.seqlen, chunk)
    h0 = torch.zeros(p.state_shape(), dtype=p.cdt, device=u.device)
    saved = torch.empty((len(starts),) + p.state_shape(), dtype=p.cdt, device=u.device)
    y = torch.empty(p.seqlen, p.batch, p.groups, p.dim // p.groups, 1, dtype=p.cdt, device=u.device)
    for i, t0 in enumerate(starts):
        t1 = min(t0 + chunk, p.seqlen)
        saved[i] = h0
        a, h = form.pair(*p.xs(t0, t1))
        h = _scan_chunk(a, h, h0)
        y[t0:t1] = contract_n(h, _chunk(p.C, t0, t1))
        h0 = h[-1].clone()
    pre = _seq_from_tm(y, p.batch, p.dim, p.seqlen)
    if D is not None:
        pre = pre + D.to(p.cdt)[None, :, None] * u.to(p.cdt)
    out = _gate_out(pre, z).to(u.dtype).contiguous()
    # Backward needs the ungated output only for dz; without z it would alias out, which custom ops forbid.
    pre = pre.contiguous() if z is not None else pre.new_empty(0)
    return out, h0.reshape(p.batch, p.dim, p.d_state), saved.reshape(len(starts), p.batch, p.dim, p.d_state), pre


def chunk_scan_bwd(form_name: str, dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor,
                   P: Optional[torch.Tensor], B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                   z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], saved: torch.Tensor,
                   pre: torch.Tensor, softplus: bool, chunk: int) -> Sequence[Optional[torch.Tensor]]:
    """Backward of :func:`chunk_scan_fwd` from the chunk-start states: each chunk is recomputed, then the
    reverse scan ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` runs with the carry ``a g`` from the next chunk.

    Returns:
        gradients of (u, delta, P, B, C, D, z, delta_bias) in their input dtypes, None for absent inputs.
    """
    form = FORMS[form_name]
    p = _Prepared(form, u, delta, P, B, C, delta_bias, softplus)
    dpre = dout.to(p.cdt)
    dz = None
    if z is not None:
        zc = z.to(p.cdt)
        sig = torch.sigmoid(zc)
        dz = (dout.to(p.cdt) * pre * sig * (1 + zc * (1 - sig))).to(z.dtype)
        dpre = dpre * zc * sig
    dD = None if D is None else (dpre * u.to(p.cdt)).sum((0, 2)).to(D.dtype)
    dy = _seq_tm(dpre, p.groups)
    saved = saved.reshape((-1,) + p.state_shape())
    xs_full = (p.dt, p.u, p.P, p.B, p.C)
    grads = [None if x is None else torch.zeros_like(x) for x in xs_full]
    carry = torch.zeros(p.state_shape(), dtype=p.cdt, device=u.device)
    starts = list(range(0, p.seqlen, chunk))
    for i in reversed(range(len(starts))):
        t0, t1 = starts[i], min(starts[i] + chunk, p.seqlen)
        xs = p.xs(t0, t1)
        a, h = form.pair(*xs)
        h = _scan_chunk(a, h, saved[i])
        dy_c, C_c = dy[t0:t1], _chunk(p.C, t0, t1)
        g = dy_c * C_c
        g[-1] += carry
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        carry = a[0] * g[0]
        da = torch.empty_like(g)  # g_t * h_{t-1}, without concatenating saved and h
        torch.mul(g[0], saved[i], out=da[0])
        torch.mul(g[1:], h[:-1], out=da[1:])
        chunk_grads = form.pair_bwd(*xs, a=a, g=g, da=da) + (weighted_sum(h, dy_c, C_c.shape),)
        for full, x, gx in zip(grads, xs + (C_c,), chunk_grads):
            if full is None:
                continue
            if x.shape[0] == 1 and p.seqlen > 1:
                full += gx.sum_to_size(x.shape)
            else:
                full[t0:t1] = gx.sum_to_size(x.shape)
    g_dt, g_u, g_P, g_B, g_C = grads
    g_raw = form.gate_grad(p.raw, p.dt, g_dt, softplus)
    ddelta = _seq_from_tm(g_raw, p.batch, p.dim, p.seqlen)
    du = _seq_from_tm(g_u, p.batch, p.dim, p.seqlen)
    if D is not None:
        du = du + dpre * D.to(p.cdt)[None, :, None]
    dbias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)
    dP = None if P is None else g_P.reshape(P.shape).to(P.dtype)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dP, _bc_from_tm(g_B, B).to(B.dtype),
            _bc_from_tm(g_C, C).to(C.dtype), dD, dz, dbias)


# ---- torch.library registration: one opaque forward op and one opaque backward op for both forms ----

@torch.library.custom_op("mambacl::chunk_scan", mutates_args=())
def _chunk_scan_op(form: str, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor], B: torch.Tensor,
                   C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                   delta_bias: Optional[torch.Tensor], softplus: bool, chunk: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return chunk_scan_fwd(form, u, delta, P, B, C, D, z, delta_bias, softplus, chunk)


@_chunk_scan_op.register_fake
def _(form, u, delta, P, B, C, D, z, delta_bias, softplus, chunk):
    batch, dim, seqlen = u.shape
    d_state = bc_state_size(B)
    cdt = compute_dtype(u.dtype)
    n_chunks = -(-seqlen // chunk)
    return (u.new_empty(u.shape), u.new_empty((batch, dim, d_state), dtype=cdt),
            u.new_empty((n_chunks, batch, dim, d_state), dtype=cdt),
            u.new_empty(u.shape if z is not None else (0,), dtype=cdt))


@torch.library.custom_op("mambacl::chunk_scan_bwd", mutates_args=())
def _chunk_scan_bwd_op(form: str, dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor,
                       P: Optional[torch.Tensor], B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                       z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], saved: torch.Tensor,
                       pre: torch.Tensor, softplus: bool, chunk: int) -> List[torch.Tensor]:
    grads = chunk_scan_bwd(form, dout, u, delta, P, B, C, D, z, delta_bias, saved, pre, softplus, chunk)
    return [u.new_empty(0) if g is None else g.contiguous() for g in grads]  # the fake kernel's strides


@_chunk_scan_bwd_op.register_fake
def _(form, dout, u, delta, P, B, C, D, z, delta_bias, saved, pre, softplus, chunk):
    return [u.new_empty(0) if x is None else x.new_empty(x.shape) for x in (u, delta, P, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, output) -> None:
    form, u, delta, P, B, C, D, z, delta_bias, softplus, chunk = inputs
    _, last, saved, pre = output
    ctx.form, ctx.softplus, ctx.chunk = form, softplus, chunk
    ctx.save_for_backward(u, delta, P, B, C, D, z, delta_bias, saved, pre)
    ctx.mark_non_differentiable(last, saved, pre)


def _backward(ctx, dout, _dlast, _dsaved, _dpre):
    u, delta, P, B, C, D, z, delta_bias, saved, pre = ctx.saved_tensors
    grads = torch.ops.mambacl.chunk_scan_bwd(ctx.form, dout.contiguous(), u, delta, P, B, C, D, z, delta_bias,
                                              saved, pre, ctx.softplus, ctx.chunk)
    grads = [None if x is None else g for x, g in zip((u, delta, P, B, C, D, z, delta_bias), grads)]
    return (None, *grads, None, None)


_chunk_scan_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_length(batch: int, dim: int, d_state: int) -> int:
    """Default chunk length: one chunk's ``[T, b, D, N]`` temporaries stay cache-sized (T in [8, 64]).

    Smaller chunks mean more Python-level ops per call, larger ones spill the per-chunk temporaries out of cache;
    at b 8, D 384, N 16 on a 2-core CPU, T = 8-16 ran fwd+bwd about 1.5x faster than T = 64.
    """
    return min(MAX_CHUNK, max(MIN_CHUNK, CHUNK_ELEMENTS // (batch * dim * d_state)))


def chunk_scan(form: str, u: torch.Tensor, delta: torch.Tensor, P: Optional[torch.Tensor], B: torch.Tensor,
               C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
               delta_bias: Optional[torch.Tensor], softplus: bool, return_last_state: bool,
               chunk: Optional[int] = None):
    """Run the registered op for ``form`` ('mamba' or 'longhorn'); see the ops' public functions for shapes.

    ``chunk`` (time steps per chunk) defaults to :func:`chunk_length` of the problem; inputs without elements
    give :func:`~mambacl.kernels.utils.empty_scan`.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk!r}")
    if u.numel() == 0:
        return empty_scan(u, (delta, P, B, C, D, z, delta_bias), bc_state_size(B), return_last_state)
    if chunk is None:
        chunk = chunk_length(u.shape[0], u.shape[1], bc_state_size(B))
    args = [None if x is None else x.contiguous() for x in (u, delta, P, B, C, D, z, delta_bias)]
    out, last, _, _ = torch.ops.mambacl.chunk_scan(form, *args, softplus, chunk)
    return (out, last) if return_last_state else out
