"""Backbones for Mamba-FSCIL, selected by timm name, exposing their last feature map ``[b, C, H, W]``."""
from __future__ import annotations

from typing import Tuple, Union

import timm
import torch
from torch import nn

import mambacl.backbones.resnet12  # noqa: F401  (registers resnet12 / test_resnet12 with timm)
from mambacl.backbones import VisionMamba

__all__ = ["FeatureMapBackbone"]


class FeatureMapBackbone(nn.Module):
    """A timm model cut before pooling: CNNs give their last map; Vim models their patch tokens as an ``h x w`` map.

    Args:
        name: timm model name, e.g. 'resnet12' (CIFAR/mini), 'resnet18' (CUB), 'vim_tiny_patch16_224', 'test_vim';
            or an already built timm model with ``forward_features`` (a VisionMamba without a cls token).
        img_size: input resolution, used to infer the map shape.
        in_chans: input channels.
        **kwargs: passed to ``timm.create_model`` (e.g. ``pretrained=True`` with weights in the local cache).

    Attributes:
        out_shape: ``(C, H, W)`` of the map for ``img_size`` inputs.

    Examples:
        >>> FeatureMapBackbone("test_resnet12", img_size=32).out_shape
        (8, 2, 2)
    """

    def __init__(self, name: Union[str, nn.Module], img_size: int, in_chans: int = 3, **kwargs) -> None:
        super().__init__()
        if isinstance(name, nn.Module):
            if not hasattr(name, "forward_features"):
                raise TypeError(f"backbone module must have forward_features, got {type(name).__name__}")
            self.model = name
        elif name not in timm.list_models():
            raise ValueError(f"backbone must be a timm model name (e.g. 'resnet12', 'resnet18', 'test_vim'), got {name!r}")
        else:
            if name.startswith(("vim", "longhorn_vim", "test_vim", "test_longhorn_vim")):
                kwargs.setdefault("img_size", img_size)
                kwargs.setdefault("cls_token_position", "none")
            self.model = timm.create_model(name, num_classes=0, in_chans=in_chans, **kwargs)
        self.is_vim = isinstance(self.model, VisionMamba)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            self.out_shape: Tuple[int, int, int] = tuple(self(torch.zeros(1, in_chans, img_size, img_size)).shape[1:])
        self.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[b, in_chans, img_size, img_size]``. Returns ``[b, C, H, W]``."""
        if not self.is_vim:
            return self.model.forward_features(x)
        tokens = self.model.forward_features(x)
        if self.model.cls_index is not None:
            tokens = torch.cat([tokens[:, :self.model.cls_index], tokens[:, self.model.cls_index + 1:]], dim=1)
        h, w = self.model.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
