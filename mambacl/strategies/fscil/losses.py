"""Mamba-FSCIL's suppression and class-sensitive separation losses on the incremental branch, and their weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

__all__ = ["FSCILLossWeights", "LOSS_WEIGHTS", "suppression_loss", "separation_loss"]


@dataclass(frozen=True)
class FSCILLossWeights:
    """Weights of the incremental-session losses (all zero in the base session).

    Attributes:
        w_s: suppression of the new branch's gate on base samples.
        w_sn: (negative) suppression weight on novel samples.
        w_sep: separation of base/novel mean dt_low, B, C in the new branch.
        w_sep_base: the same on the base branch (CUB only).
        with_len: dot-regression target lengths in the incremental sessions.
    """

    w_s: float
    w_sn: float
    w_sep: float
    w_sep_base: float = 0.0
    with_len: bool = True


#: Published weights (Mamba-FSCIL configs; fscil.md section 2).
LOSS_WEIGHTS: Dict[str, FSCILLossWeights] = {
    "cifar100": FSCILLossWeights(w_s=100.0, w_sn=1e-5, w_sep=1e-3, with_len=True),
    "mini_imagenet": FSCILLossWeights(w_s=100.0, w_sn=0.0, w_sep=0.5, with_len=True),
    "cub200": FSCILLossWeights(w_s=100.0, w_sn=10.0, w_sep=1e-3, w_sep_base=1e-3, with_len=False),
}


def suppression_loss(zs: Sequence[torch.Tensor], labels: torch.Tensor, num_base: int, w_s: float,
                     w_sn: float) -> torch.Tensor:
    """``sum_k w_s ||z_k[base]||_F / numel(z_k[base]) - w_sn ||z_k[novel]||_F / numel(z_k[novel])``.

    Args:
        zs: the gate pre-activations of each scan, ``[b, ...]`` with the batch first.
        labels: ``[b]`` int class ids; base samples are those with ``label < num_base``.
        num_base: number of base classes.
        w_s, w_sn: weights of the base and novel terms.
    Returns:
        scalar loss (a term is 0 when the batch has no sample of its group).
    """
    is_base = labels < num_base
    total = zs[0].new_zeros(())
    for z in zs:
        for mask, w in ((is_base, w_s), (~is_base, -w_sn)):
            if w != 0 and mask.any():
                part = z[mask]
                total = total + w * part.norm() / part.numel()
    return total


def separation_loss(params: Sequence[torch.Tensor], labels: torch.Tensor, num_base: int, weight: float) -> torch.Tensor:
    """``weight * sum_p mean|I_2 - S_p| = weight * sum_p |cos(m_b, m_n)| / 2``.

    m_b and m_n are the means of p over the base and the novel samples and their tokens; S_p is their 2x2
    cosine-similarity matrix.

    Args:
        params: selective parameters (e.g. dt_low, B, C), each ``[b, L, P]``.
        labels: ``[b]`` int class ids.
        num_base: number of base classes.
        weight: w_sep.
    Returns:
        scalar loss (0 when the batch lacks base or novel samples).
    """
    is_base = labels < num_base
    total = params[0].new_zeros(())
    if weight == 0 or is_base.all() or not is_base.any():
        return total
    for p in params:
        m_b, m_n = p[is_base].mean(dim=(0, 1)), p[~is_base].mean(dim=(0, 1))
        total = total + weight * F.cosine_similarity(m_b, m_n, dim=0).abs() / 2
    return total
