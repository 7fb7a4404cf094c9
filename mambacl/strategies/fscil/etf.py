"""Fixed simplex-ETF classifier and dot-regression loss of NC-FSCIL (Yang et al., ICLR 2023), used by Mamba-FSCIL."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["ETFHead", "cosine_regression_loss", "dot_regression_loss", "length_weights"]


class ETFHead(nn.Module):
    """Simplex equiangular tight frame over all K classes: ``W = sqrt(K/(K-1)) U (I_K - 11^T/K)``, a fixed buffer.

    U ``[d, K]`` is the Q factor of a seeded random matrix, so the K columns of W have unit norm and pairwise
    cosine ``-1/(K-1)``. Logits are ``(h/||h||)^T W`` restricted to the classes seen so far.

    Args:
        in_features: feature width d (>= K).
        num_classes: K, all classes of the benchmark.
        seed: seed of the random orthonormal basis.
    """

    def __init__(self, in_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_features < num_classes:
            raise ValueError(f"in_features ({in_features}) must be >= num_classes ({num_classes}) for an ETF")
        gen = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(in_features, num_classes, generator=gen, dtype=torch.float64))
        k = num_classes
        centring = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
        self.register_buffer("weight", ((k / (k - 1)) ** 0.5 * u @ centring).float())
        self.num_classes = num_classes
        self.num_seen = num_classes

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Args: feat ``[b, d]``. Returns cosine logits ``[b, num_seen]``."""
        return nn.functional.normalize(feat, dim=1) @ self.weight[:, :self.num_seen]


def length_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """NC-FSCIL ``with_len`` target lengths ``r_c = sqrt((N / #unique labels) / count_c)`` for a batch.

    Args:
        labels: ``[N]`` int class ids of the batch.
        num_classes: K.
    Returns:
        ``[K]`` float lengths (1 for classes absent from the batch).
    """
    uniq, counts = labels.unique(return_counts=True)
    r = torch.ones(num_classes, device=labels.device)
    r[uniq] = ((labels.numel() / uniq.numel()) / counts.float()).sqrt()
    return r


def dot_regression_loss(feat: torch.Tensor, labels: torch.Tensor, etf: torch.Tensor,
                        lengths: Optional[torch.Tensor] = None, weight: float = 10.0) -> torch.Tensor:
    """Dot-regression loss ``weight * 0.5 * mean_i r_{y_i}^2 (cos(h_i, w_{y_i}) - 1)^2``.

    Args:
        feat: ``[b, d]`` features h.
        labels: ``[b]`` int class ids.
        etf: ``[d, K]`` ETF prototypes (unit columns).
        lengths: ``[K]`` target lengths r (see :func:`length_weights`); None for r = 1.
        weight: loss weight (10 in Mamba-FSCIL).
    Returns:
        scalar loss.
    """
    if feat.dim() != 2 or labels.shape != feat.shape[:1]:
        raise ValueError(f"feat must be [b, d] and labels [b], got {tuple(feat.shape)} and {tuple(labels.shape)}")
    target = etf[:, labels].t()
    dot = (nn.functional.normalize(feat, dim=1) * target).sum(dim=1)
    return cosine_regression_loss(dot, None if lengths is None else lengths[labels].to(dot), weight)


def cosine_regression_loss(cosines: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                           weight: float = 10.0) -> torch.Tensor:
    """:func:`dot_regression_loss` from the cosines ``cos(h_i, w_{y_i})`` (e.g. the label columns of
    :class:`ETFHead`'s logits) and the per-sample target lengths ``r_{y_i}`` (None for 1)."""
    if cosines.dim() != 1 or (lengths is not None and lengths.shape != cosines.shape):
        raise ValueError(f"cosines must be [b] and lengths None or [b], got {tuple(cosines.shape)} and "
                         f"{None if lengths is None else tuple(lengths.shape)}")
    r = torch.ones_like(cosines) if lengths is None else lengths
    return weight * 0.5 * ((cosines * r - r) ** 2).mean()
