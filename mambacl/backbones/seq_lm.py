"""A small causal sequence model for synthetic tasks (MQAR): embedding, N pre-norm residual blocks, head.

Each block is Zoology's hybrid layout: a short causal depthwise convolution (their BaseConv, kernel 3, which
also gives attention its only positional signal), the sequence mixer and a GELU MLP, each as
``h = h + f(RMSNorm(h))``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import bmojo, gdssm, longhorn  # noqa: F401  (register the 'bmojo', 'gdssm' and 'longhorn' mixers)
from .mamba import MIXERS, _check_positive_int

__all__ = ["CausalSelfAttention", "SeqLM", "SEQ_MIXERS"]

SEQ_MIXERS = ("attention", "mamba", "longhorn", "bmojo", "gdssm")


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention through ``F.scaled_dot_product_attention``.

    Args:
        d_model: token width.
        n_heads: heads (divides d_model).
    """

    def __init__(self, d_model: int, n_heads: int = 4) -> None:
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model, got {n_heads} and {d_model}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden ``[b, L, d_model]``. Returns ``[b, L, d_model]``."""
        b, seqlen, d = hidden.shape
        q, k, v = self.qkv(hidden).view(b, seqlen, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, seqlen, d))


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, ``[b, L, d] -> [b, L, d]``."""

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden.transpose(1, 2))[..., :hidden.shape[1]].transpose(1, 2)


class SeqBlock(nn.Module):
    """``h + conv(norm h)``, ``h + mixer(norm h)``, ``h + mlp(norm h)`` (the conv and MLP optional)."""

    def __init__(self, d_model: int, mixer: nn.Module, conv_size: int, mlp_ratio: int) -> None:
        super().__init__()
        self.conv = ShortConv(d_model, conv_size) if conv_size else None
        self.norm_conv = nn.RMSNorm(d_model) if conv_size else None
        self.norm_mixer, self.mixer = nn.RMSNorm(d_model), mixer
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model)) if mlp_ratio else None
        self.norm_mlp = nn.RMSNorm(d_model) if mlp_ratio else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            h = h + self.conv(self.norm_conv(h))
        h = h + self.mixer(self.norm_mixer(h))
        if self.mlp is not None:
            h = h + self.mlp(self.norm_mlp(h))
        return h


class SeqLM(nn.Module):
    """Causal token model: embedding, ``n_layers`` :class:`SeqBlock`, final RMSNorm and a vocabulary head.

    Args:
        vocab_size: V.
        d_model: width.
        n_layers: number of blocks.
        mixer: one of :data:`SEQ_MIXERS` ('attention', 'mamba', 'longhorn', 'bmojo', 'gdssm').
        d_state, expand: state size and expansion of the SSM mixers (ignored by attention).
        n_heads: heads of the attention mixer (B'MOJO takes ``n_heads`` through ``mixer_kwargs``).
        conv_size: kernel of the short convolution (0: none).
        mlp_ratio: hidden width of the MLP in multiples of d_model (0: none).
        scan_impl: kernel backend of the SSM mixers.
        mixer_kwargs: extra constructor options of the mixer (e.g. ``window``, ``memory_size`` for B'MOJO).

    Examples:
        >>> SeqLM(32, d_model=16, n_layers=2, mixer="gdssm")(torch.randint(32, (2, 9))).shape
        torch.Size([2, 9, 32])
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, mixer: str = "mamba",
                 d_state: int = 16, expand: int = 2, n_heads: int = 4, conv_size: int = 3, mlp_ratio: int = 2,
                 scan_impl: str = "auto", mixer_kwargs: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            _check_positive_int(name, value)
        if mixer not in SEQ_MIXERS:
            raise ValueError(f"mixer must be one of {SEQ_MIXERS}, got {mixer!r}")
        for name, value in (("conv_size", conv_size), ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        kwargs = dict(mixer_kwargs or {})

        def make_mixer() -> nn.Module:
            if mixer == "attention":
                return CausalSelfAttention(d_model, n_heads, **kwargs)
            return MIXERS[mixer](d_model, d_state=d_state, expand=expand, scan_impl=scan_impl, **kwargs)

        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([SeqBlock(d_model, make_mixer(), conv_size, mlp_ratio) for _ in range(n_layers)])
        self.norm_f = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens ``[b, L]`` int64 in ``[0, vocab_size)``. Returns logits ``[b, L, vocab_size]``."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, seqlen), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm_f(h))
