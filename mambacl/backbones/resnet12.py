"""ResNet-12 for few-shot learning (Lee et al., MetaOptNet, arXiv 1904.03758), the FSCIL CIFAR/mini backbone.

Four residual stages, each three 3x3 conv-BN-LeakyReLU(0.1) layers with a 1x1 conv-BN shortcut, followed by
2x2 max pooling; no global pooling, so ``forward_features`` returns the last map (640x2x2 on 32 px input).
Built from timm layers and registered with timm as ``resnet12`` and the CI variant ``test_resnet12``.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn
from timm.layers import ConvNormAct
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["ResNet12"]

_act = partial(nn.LeakyReLU, 0.1)


class _Stage(nn.Module):
    """Three 3x3 conv-BN layers (LeakyReLU after the first two and after the residual add), then max-pool 2."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs, 3, act_layer=_act)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, act_layer=_act)
        self.conv3 = ConvNormAct(out_chs, out_chs, 3, apply_act=False)
        self.shortcut = ConvNormAct(in_chs, out_chs, 1, apply_act=False)
        self.act = _act()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 feature extractor.

    Args:
        widths: output channels of the four stages (64, 160, 320, 640 in the FSCIL papers).
        in_chans: input channels.
        num_classes: size of a linear head on the pooled features; 0 for none.
        img_size: accepted so that runners may pass it to every timm model; the map size follows the input.

    Examples:
        >>> ResNet12(widths=(4, 4, 4, 8)).forward_features(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 8, 2, 2])
    """

    def __init__(self, widths: Sequence[int] = (64, 160, 320, 640), in_chans: int = 3, num_classes: int = 0,
                 img_size: Optional[int] = None) -> None:
        super().__init__()
        if img_size is not None and img_size < 16:
            raise ValueError(f"img_size must be >= 16 (four 2x2 poolings), got {img_size}")
        widths = tuple(widths)
        if len(widths) != 4 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be four positive ints, got {widths!r}")
        chans = (in_chans,) + widths
        self.stages = nn.Sequential(*[_Stage(chans[i], chans[i + 1]) for i in range(4)])
        self.num_features = widths[-1]
        self.feature_info = [dict(num_chs=w, reduction=2 ** (i + 1), module=f"stages.{i}") for i, w in enumerate(widths)]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[b, C, H, W]``. Returns the last map ``[b, widths[-1], H/16, W/16]``."""
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(2, 3)))


default_cfgs = generate_default_cfgs({
    "resnet12": {"num_classes": 0, "input_size": (3, 32, 32), "mean": (0.5071, 0.4865, 0.4409),
                 "std": (0.2673, 0.2564, 0.2762)},
    "test_resnet12": {"num_classes": 0, "input_size": (3, 32, 32)},
})


def _create_resnet12(variant: str, pretrained: bool = False, **kwargs) -> ResNet12:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; pass pretrained=False")
    return build_model_with_cfg(ResNet12, variant, pretrained, **kwargs)


@register_model
def resnet12(pretrained: bool = False, **kwargs) -> ResNet12:
    """ResNet-12 (64-160-320-640); no pretrained weights exist."""
    return _create_resnet12("resnet12", pretrained, **kwargs)


@register_model
def test_resnet12(pretrained: bool = False, **kwargs) -> ResNet12:
    """Tiny CI ResNet-12 (4-4-8-8)."""
    return _create_resnet12("test_resnet12", pretrained, **dict(dict(widths=(4, 4, 8, 8)), **kwargs))
