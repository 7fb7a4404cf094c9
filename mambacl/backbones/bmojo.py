"""B'MOJO (Zancato et al., arXiv 2407.06324): attention over eidetic and fading memory.

Query ``i`` (chunk ``c = i // w``) attends under one joint softmax to

- the short eidetic memory: input tokens ``[i-w+1, i]`` (sliding window);
- the fading memory: outputs of a Mamba mixer run on the input at positions ``[i-2w+1, i-w]`` (as in the
  public B'MOJO-F, awslabs/hybrid-model-factory ``bmojo_f``: an effective window of 2w);
- the long eidetic memory: at most ``memory_size`` input tokens from positions ``< (c-1) w`` chosen by an
  innovation test, refreshed once per chunk of w queries.

Innovation (the papers do not publish their predictor; this is ours): the SSM output ``s_{t-1}``, which
summarises tokens ``< t``, predicts the key of token t through the shared key projection,
``k_hat_t = W_k s_{t-1}``; the innovation is ``||W_k x_t - W_k s_{t-1}||^2`` (``s_{-1} = 0``). Tokens the fading
memory predicts worst are kept verbatim. The memory is a running top-``memory_size`` over chunks: before
chunk c it absorbs the positions of chunk ``c-2`` (those that have left every later window), so it only holds
strictly earlier tokens and never more than ``memory_size``. Selection is not differentiable; the keys and
values of the selected tokens are.

``memory_size=0`` is the B'MOJO-F configuration. Keys and values are tied across the input and SSM paths.

Complexity for a sequence of length L, width d, H heads: O(L (2w + m) d) attention time plus the Mamba scan
and O(L (m + w) log m) for the selection; per query at most ``2 w + m`` keys, so inference keeps a bounded
state (the SSM state, the last 2w inputs/outputs and m memory tokens) for any L.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .gdssm import BidirectionalMixer
from .mamba import MambaMixer, _check_positive_int, register_mixer

__all__ = ["BMojoLayer", "BMojoMixer", "band"]


def band(t: torch.Tensor, start: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every position i, the entries ``t[:, i + start + k]``, ``k < size`` (zero where the index is < 0).

    Args:
        t: ``[b, L, ...]``.
        start: offset of the first entry, ``start <= 1 - size`` so the band never reaches past i.
        size: band length.
    Returns:
        ``[b, L, size, ...]`` gathered entries and a ``[L, size]`` bool mask of the valid (index >= 0) ones.
    """
    pad = -start
    seqlen = t.shape[1]
    flat = t.reshape(t.shape[0], seqlen, -1)
    padded = F.pad(flat, (0, 0, pad, 0))
    windows = padded.unfold(1, size, 1)[:, :seqlen]             # [b, L, features, size]
    out = windows.movedim(-1, 2).reshape(t.shape[0], seqlen, size, *t.shape[2:])
    index = torch.arange(seqlen, device=t.device)[:, None] + start + torch.arange(size, device=t.device)
    return out, index >= 0


class BMojoLayer(nn.Module):
    """One causal B'MOJO layer, ``[b, L, d_model] -> [b, L, d_model]`` (see the module docstring).

    Args:
        d_model: token width.
        d_state, expand, scan_impl: options of the fading-memory :class:`MambaMixer`.
        window: w, the sliding-window length and the chunk length of the memory updates.
        memory_size: m, capacity of the long eidetic memory (0: B'MOJO-F).
        n_heads: attention heads (divides d_model).

    Examples:
        >>> BMojoLayer(16, window=4, memory_size=2)(torch.randn(2, 11, 16)).shape
        torch.Size([2, 11, 16])
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, scan_impl: str = "auto", window: int = 16,
                 memory_size: int = 16, n_heads: int = 4) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("window", window), ("n_heads", n_heads)):
            _check_positive_int(name, value)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size must be an int >= 0, got {memory_size!r}")
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model, got {n_heads} and {d_model}")
        self.d_model, self.window, self.memory_size, self.n_heads = d_model, window, memory_size, n_heads
        self.ssm = MambaMixer(d_model, d_state=d_state, expand=expand, scan_impl=scan_impl)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def innovation(self, keys: torch.Tensor, ssm_keys: torch.Tensor) -> torch.Tensor:
        """``||k_t - k_hat_t||^2`` with ``k_hat_t`` the SSM key at ``t - 1`` (zero at t = 0); ``[b, L]``."""
        predicted = F.pad(ssm_keys[:, :-1], (0, 0, 1, 0))
        return (keys - predicted).square().sum(-1)

    def memory(self, scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Long eidetic memory of every chunk: running top-m of ``scores`` over positions ``< (c-1) w``.

        Args:
            scores: innovation ``[b, L]``.
        Returns:
            positions ``[b, n_chunks, m]`` (int64) and a validity mask of the same shape (False while the
            memory is not yet full), ``n_chunks = ceil(L / w)``.
        """
        batch, seqlen = scores.shape
        w, m = self.window, self.memory_size
        n_chunks = -(-seqlen // w)
        mem_score = scores.new_full((batch, m), float("-inf"))
        mem_pos = torch.zeros(batch, m, dtype=torch.long, device=scores.device)
        positions, valid = [], []
        for c in range(n_chunks):  # a loop over chunks, with an O(m + w) state
            positions.append(mem_pos)
            valid.append(torch.isfinite(mem_score))
            lo, hi = max(c - 1, 0) * w, min(c * w, seqlen)  # chunk c-1 becomes eligible for chunk c+1
            if c == 0 or lo >= hi:
                continue
            cand_score = torch.cat([mem_score, scores[:, lo:hi]], dim=1)
            cand_pos = torch.cat([mem_pos, torch.arange(lo, hi, device=scores.device).expand(batch, -1)], dim=1)
            mem_score, top = cand_score.topk(m, dim=1)
            mem_pos = cand_pos.gather(1, top)
        return torch.stack(positions, 1), torch.stack(valid, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden ``[b, L, d_model]``. Returns ``[b, L, d_model]``."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must have shape (batch, seqlen, {self.d_model}), got {tuple(hidden.shape)}")
        batch, seqlen, _ = hidden.shape
        w, heads = self.window, self.n_heads
        split = (batch, seqlen, heads, self.d_model // heads)
        fading = self.ssm(hidden)
        q = self.q_proj(hidden).view(split)
        k, v = self.k_proj(hidden), self.v_proj(hidden)
        k_s, v_s = self.k_proj(fading), self.v_proj(fading)

        win_k, win_ok = band(k.view(split), 1 - w, w)
        win_v, _ = band(v.view(split), 1 - w, w)
        fade_k, fade_ok = band(k_s.view(split), 1 - 2 * w, w)
        fade_v, _ = band(v_s.view(split), 1 - 2 * w, w)
        keys, values = [fade_k, win_k], [fade_v, win_v]
        ok = [fade_ok.expand(batch, -1, -1), win_ok.expand(batch, -1, -1)]
        if self.memory_size:
            with torch.no_grad():
                pos, valid = self.memory(self.innovation(k, k_s).float())
            chunk = torch.arange(seqlen, device=hidden.device) // w
            pos, valid = pos[:, chunk], valid[:, chunk]                     # [b, L, m]
            flat = pos.reshape(batch, -1, 1)
            keys.insert(0, k.gather(1, flat.expand(-1, -1, self.d_model)).view(batch, seqlen, -1, *split[2:]))
            values.insert(0, v.gather(1, flat.expand(-1, -1, self.d_model)).view(batch, seqlen, -1, *split[2:]))
            ok.insert(0, valid)
        keys, values, ok = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(ok, 2)  # [b, L, n_keys, H, dh]
        logits = torch.einsum("blhd,blkhd->blhk", q, keys) / math.sqrt(split[-1])
        logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
        out = torch.einsum("blhk,blkhd->blhd", logits.softmax(-1), values)
        return self.out_proj(out.reshape(batch, seqlen, self.d_model))


@register_mixer("bmojo")
class BMojoMixer(BidirectionalMixer):
    """B'MOJO as a block mixer (``MIXERS['bmojo']``); ``memory_size=0`` gives B'MOJO-F. See :class:`BMojoLayer`.

    Examples:
        >>> BMojoMixer(16, window=4, memory_size=2, n_heads=2)(torch.randn(2, 9, 16)).shape
        torch.Size([2, 9, 16])
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, bidirectional: bool = False,
                 scan_impl: str = "auto", window: int = 16, memory_size: int = 16, n_heads: int = 4) -> None:
        super().__init__(d_model, lambda: BMojoLayer(d_model, d_state, expand, scan_impl, window, memory_size,
                                                     n_heads), bidirectional)
