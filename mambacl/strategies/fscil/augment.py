"""Mamba-FSCIL's base-session batch mixup and cutmix, which keep both labels and the mixing ratio.

xiaojieli0903/Mamba-FSCIL configs/cifar/resnet12_etf_bs512_200e_cifar_mambafscil.py:15-19 (the only config with
base-session batch augments): per batch, BatchMixupTwoLabel (alpha 0.8) with probability 0.4, BatchCutMixTwoLabel
(alpha 1.0) with probability 0.4, the batch unchanged with probability 0.2 (mmcls ``Augments``). Mixup returns
``lam x + (1 - lam) x[perm]``; cutmix pastes ``x[perm]`` into a box of area about ``1 - lam`` (mmcls
``rand_bbox``, margin 0) and corrects lam to the clipped box. Both keep ``(y, y[perm], lam)``, and the
classifier (mmfscil/models/classifier.py:139-176) sums ``lam L(y) + (1 - lam) L(y[perm]) + L(y)``: the
dot-regression loss of the first labels is added a second time.

timm's ``Mixup`` and torchvision's v2 MixUp/CutMix do not give these semantics: they pair the batch with its
flipped/rolled copy instead of a random permutation, return soft targets instead of the two labels, and timm's
box rounds its far edge up ``(cut + 1) // 2`` where mmcls uses ``cut // 2``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["BatchMixing", "MixedBatch", "PUBLISHED_BASE_MIXING", "MIX_LOSSES", "mixup_images", "cutmix_box",
           "cutmix_images", "mix_batch"]

#: How the dot-regression loss treats a mixed batch: 'authors' = lam L(y_a) + (1 - lam) L(y_b) + L(y_a) (their
#: classifier), 'convex' = lam L(y_a) + (1 - lam) L(y_b).
MIX_LOSSES = ("authors", "convex")


@dataclass(frozen=True)
class BatchMixing:
    """Base-session batch augments: mixup with probability ``mixup_prob``, else cutmix with ``cutmix_prob``,
    else none; each lam ~ Beta(alpha, alpha). All zero (the default) is off.

    Attributes:
        mixup_alpha, mixup_prob: Beta parameter and per-batch probability of mixup.
        cutmix_alpha, cutmix_prob: the same for cutmix.
        mix_loss: one of :data:`MIX_LOSSES`.

    Every validation message starts with the offending field's name.
    """

    mixup_alpha: float = 0.0
    mixup_prob: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_prob: float = 0.0
    mix_loss: str = "authors"

    def __post_init__(self) -> None:
        for kind in ("mixup", "cutmix"):
            alpha, prob = getattr(self, f"{kind}_alpha"), getattr(self, f"{kind}_prob")
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{kind}_prob must be in [0, 1], got {prob!r}")
            if prob > 0 and not alpha > 0:
                raise ValueError(f"{kind}_alpha must be > 0 when {kind}_prob > 0, got {alpha!r}")
        if self.mixup_prob + self.cutmix_prob > 1.0 + 1e-9:
            raise ValueError(f"mixup_prob ({self.mixup_prob}) + cutmix_prob ({self.cutmix_prob}) must be <= 1")
        if self.mix_loss not in MIX_LOSSES:
            raise ValueError(f"mix_loss must be one of {MIX_LOSSES}, got {self.mix_loss!r}")

    @property
    def enabled(self) -> bool:
        return self.mixup_prob > 0 or self.cutmix_prob > 0


#: The published base-session settings per dataset (only the CIFAR-100 config sets batch augments).
PUBLISHED_BASE_MIXING: Dict[str, BatchMixing] = {
    "cifar100": BatchMixing(mixup_alpha=0.8, mixup_prob=0.4, cutmix_alpha=1.0, cutmix_prob=0.4),
    "mini_imagenet": BatchMixing(),
    "cub200": BatchMixing(),
}


@dataclass
class MixedBatch:
    """A batch after :func:`mix_batch`: images ``[b, C, H, W]``, first and second labels ``[b]``, lam and the
    pairing permutation ``[b]`` (``y_b = y_a[perm]``).

    ``y_b`` and ``perm`` are None (and ``lam`` 1) when the batch was left unchanged.
    """

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: Optional[torch.Tensor]
    lam: float
    perm: Optional[torch.Tensor] = None


def mixup_images(x: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` for a batch ``x`` ``[b, ...]`` and a permutation ``perm`` ``[b]``."""
    return lam * x + (1 - lam) * x[perm]


def cutmix_box(height: int, width: int, lam: float, center: Tuple[int, int]) -> Tuple[Tuple[int, int, int, int], float]:
    """mmcls ``rand_bbox`` (margin 0) for a given centre, and lam corrected to the clipped box.

    Args:
        height, width: image size.
        lam: the sampled ratio; the box sides are ``int(side * sqrt(1 - lam))``.
        center: ``(cy, cx)``, drawn uniformly from ``[0, height) x [0, width)`` by :func:`mix_batch`.
    Returns:
        ``((y0, y1, x0, x1), 1 - box area / (height * width))``.
    """
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = center
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def cutmix_images(x: torch.Tensor, perm: torch.Tensor, box: Tuple[int, int, int, int]) -> torch.Tensor:
    """A copy of ``x`` ``[b, C, H, W]`` whose ``box`` = (y0, y1, x0, x1) region holds that of ``x[perm]``."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixing: BatchMixing) -> MixedBatch:
    """Apply one of mixup / cutmix / nothing to a batch, drawn with ``mixing``'s probabilities.

    The draws use the global python (choice), numpy (lam, box centre) and torch (permutation) generators, as
    the authors' code does, so a seeded run (and Avalanche's checkpoint RNG state) reproduces them.

    Args:
        x: images ``[b, C, H, W]``.
        y: labels ``[b]``.
        mixing: the probabilities and Beta parameters.
    Returns:
        the :class:`MixedBatch`.
    """
    u = random.random()
    if u >= mixing.mixup_prob + mixing.cutmix_prob:
        return MixedBatch(x, y, None, 1.0)
    perm = torch.randperm(x.shape[0], device=x.device)
    if u < mixing.mixup_prob:
        lam = float(np.random.beta(mixing.mixup_alpha, mixing.mixup_alpha))
        return MixedBatch(mixup_images(x, perm, lam), y, y[perm], lam, perm)
    height, width = x.shape[-2:]
    lam = float(np.random.beta(mixing.cutmix_alpha, mixing.cutmix_alpha))
    box, lam = cutmix_box(height, width, lam, (int(np.random.randint(height)), int(np.random.randint(width))))
    return MixedBatch(cutmix_images(x, perm, box), y, y[perm], lam, perm)
