"""Continual classification heads: Mamba-CL's per-experience heads and a backbone+head wrapper."""
from __future__ import annotations

from typing import List

import torch
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.models import DynamicModule, IncrementalClassifier
from torch import nn

HEADS = ("experience", "incremental")


class ExperienceHeads(DynamicModule):
    """One Linear head per experience (Mamba-CL), concatenated over all seen classes at test time.

    Training adaptation adds a head for the experience's new classes. In training mode only the newest
    head is computed and every other class is filled with ``mask_value``, so cross-entropy on global labels
    equals cross-entropy on the experience's local labels and old heads get no gradient (not even weight
    decay). In eval mode all heads are concatenated; the output is always indexed by global class id, with
    classes not covered by a head (e.g. future classes seen only in evaluation) masked.

    Args:
        in_features: feature width.
        mask_value: logit given to masked classes.

    Example:
        >>> heads = ExperienceHeads(32)   # adapted by Avalanche's model_adaptation
    """

    # NullSpacePlugin's contract for heads that need no null-space protection (old heads never train again)
    calibrated_across_experiences = True

    def __init__(self, in_features: int, mask_value: float = -1000.0) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features, self.mask_value = in_features, mask_value
        self.heads = nn.ModuleList()
        self.head_classes: List[List[int]] = []
        self.num_classes = 0

    @property
    def _adaptation_device(self) -> torch.device:
        return next(iter(self.heads.parameters()), torch.zeros(())).device

    @torch.no_grad()
    def adaptation(self, experience: CLExperience) -> None:
        """Widen the output to the experience's classes; in training mode add a head for its new classes."""
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        self.num_classes = max(self.num_classes, classes[-1] + 1)
        seen = {c for head in self.head_classes for c in head}
        new = [c for c in classes if c not in seen]
        if self.training and new:
            self.heads.append(nn.Linear(self.in_features, len(new)).to(self._adaptation_device))
            self.head_classes.append(new)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, in_features]. Returns: logits [b, num_classes] indexed by global class id."""
        if not self.heads:
            raise RuntimeError("ExperienceHeads has no head yet: adapt it to an experience before training")
        out = x.new_full((x.shape[0], self.num_classes), self.mask_value)
        active = range(len(self.heads) - 1, len(self.heads)) if self.training else range(len(self.heads))
        for i in active:
            out[:, self.head_classes[i]] = self.heads[i](x).to(out.dtype)  # autocast: heads may run in bf16
        return out


class ContinualClassifier(nn.Module):
    """A timm-style backbone (``forward_features`` + ``forward_head(pre_logits=True)``) with a continual head.

    Args:
        backbone: model with ``num_features``, ``forward_features``, ``forward_head`` (its own classifier is
            removed with ``reset_classifier(0)`` when available).
        head: 'experience' (:class:`ExperienceHeads`, Mamba-CL) or 'incremental' (Avalanche's
            ``IncrementalClassifier``).

    Example:
        >>> model = ContinualClassifier(timm.create_model("test_vim"), head="experience")  # doctest: +SKIP
    """

    def __init__(self, backbone: nn.Module, head: str = "experience") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        for attr in ("num_features", "forward_features", "forward_head"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone must be timm-style with {attr!r}; got {type(backbone).__name__}")
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        width = int(backbone.num_features)
        self.head = ExperienceHeads(width) if head == "experience" else IncrementalClassifier(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, C, H, W] images. Returns: [b, num_classes] logits."""
        feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.head(feats)
