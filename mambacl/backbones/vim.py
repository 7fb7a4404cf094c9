"""Vision Mamba (Vim): bidirectional state-space vision backbone, in timm conventions.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
Zhu et al., arXiv 2401.09417. Origin: hustvl/Vim ``vim/models_mamba.py``. The same class serves the
Longhorn mixer (arXiv 2407.14207) and the Mamba-CL layout (cls token appended last).

Official checkpoints (DeiT-style ``{'model': state_dict}``, hub repos ``hustvl/Vim-{tiny,small,base}-midclstok``)
load from a local file with ``timm.create_model(name, pretrained_file=PATH)`` or
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, LayerNorm, PatchEmbed, RmsNorm, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not re-exported by timm.models

from .checkpoint import (build_with_checkpoint, filter_state_dict, load_checkpoint, register_checkpoint_filter,
                         split_x_proj)
from .mamba import MIXERS, SSMBranch, _check_positive_int, no_weight_decay_names
from .pretrained import checked_file, packaged_path
from . import longhorn  # noqa: F401  (registers the 'longhorn' mixer)

__all__ = ["VisionMamba"]

CLS_POSITIONS = ("middle", "last", "none")
POS_EMBEDS = ("learn", "none")
FINAL_NORMS = {"rmsnorm": RmsNorm, "layernorm": LayerNorm}


def _check_img_size(img_size: Union[int, Tuple[int, int]], patch_size: int, stride: int) -> None:
    """img_size must be covered exactly by the patch grid (no pixel silently dropped)."""
    size = to_2tuple(img_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < patch_size or (s - patch_size) % stride
                             for s in size):
        raise ValueError(f"img_size must be an int or (H, W) of ints >= patch_size {patch_size} with (size - patch_size) "
                         f"divisible by the stride {stride}, so that the patch grid covers the image; got {img_size!r}")


class StridedPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with a convolution stride that may be smaller than the patch (Vim's stride-8 models)."""

    def __init__(self, img_size: Union[int, Tuple[int, int]], patch_size: int, stride: int, in_chans: int,
                 embed_dim: int) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        if stride != patch_size:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
            self.grid_size = tuple((s - p) // stride + 1 for s, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]


class Block(nn.Module):
    """Vim residual block ``Add -> RMSNorm -> mixer`` with an fp32 residual stream.

    ``drop_path`` applies to the incoming mixer output of the previous block, as in Vim.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args: hidden, residual ``[b, T, dim]`` (residual None in the first block). Returns both, updated."""
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class VisionMamba(nn.Module):
    """Vision Mamba: patch embedding, absolute position embedding, cls token, residual SSM blocks, head.

    Args:
        img_size: input size (int or (H, W)).
        patch_size: patch (conv kernel) size.
        stride: conv stride, defaults to patch_size (8 for Vim's stride-8 models).
        in_chans: input channels.
        depth: number of blocks.
        embed_dim: width.
        d_state: SSM state size N.
        expand: mixer expansion (``d_inner = expand * embed_dim``).
        mixer: a key of ``mambacl.backbones.MIXERS`` ('mamba', 'longhorn', ...).
        bidirectional: Vim "bimamba v2" (forward + backward branch).
        cls_token_position: 'middle' (Vim, index M//2 of M patches), 'last' (Mamba-CL) or 'none' (mean pool).
        drop_rate: dropout before the head; pos_drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        num_classes: head outputs (0 for no head).
        scan_impl: kernel backend, 'auto', 'reference', 'chunk' or 'triton'.
        norm_eps: RMSNorm epsilon of the blocks.
        pos_embed: 'learn' (absolute position embedding, Vim) or 'none' (De-focus Mamba, positions from RoPE).
        final_norm: 'rmsnorm' (Vim) or 'layernorm' (De-focus Mamba), applied to the residual stream before the head.
        final_norm_eps: its epsilon, defaults to norm_eps.
        mixer_kwargs: extra constructor keywords of the mixer (e.g. dt_rank, group_size).

    Examples:
        >>> model = VisionMamba(img_size=8, patch_size=2, in_chans=1, depth=1, embed_dim=16, num_classes=10)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16,
                 stride: Optional[int] = None, in_chans: int = 3, depth: int = 24, embed_dim: int = 192,
                 d_state: int = 16, expand: int = 2, mixer: str = "mamba", bidirectional: bool = True,
                 cls_token_position: str = "middle", drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_classes: int = 1000, scan_impl: str = "auto",
                 norm_eps: float = 1e-5, pos_embed: str = "learn", final_norm: str = "rmsnorm",
                 final_norm_eps: Optional[float] = None, mixer_kwargs: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
        if cls_token_position not in CLS_POSITIONS:
            raise ValueError(f"cls_token_position must be one of {CLS_POSITIONS}, got {cls_token_position!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {tuple(FINAL_NORMS)}, got {final_norm!r}")
        stride = patch_size if stride is None else stride
        for name, value in (("patch_size", patch_size), ("stride", stride), ("depth", depth),
                            ("embed_dim", embed_dim), ("in_chans", in_chans)):
            _check_positive_int(name, value)
        _check_img_size(img_size, patch_size, stride)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.cls_token_position = cls_token_position
        self.grad_checkpointing = False

        self.patch_embed = StridedPatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_index = {"middle": num_patches // 2, "last": num_patches, "none": None}[cls_token_position]
        self.num_prefix_tokens = 0 if self.cls_index is None else 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.cls_index is not None else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
                          if pos_embed == "learn" else None)
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Vim: block i drops the output of block i-1; the final add uses drop_path_rate.
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            Block(embed_dim, MIXERS[mixer](embed_dim, d_state=d_state, expand=expand, bidirectional=bidirectional,
                                           scan_impl=scan_impl, **(mixer_kwargs or {})), dpr[i], norm_eps)
            for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = FINAL_NORMS[final_norm](embed_dim, eps=norm_eps if final_norm_eps is None else final_norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.proj.stride[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{i}") for i in range(depth)]
        self.init_weights()

    def init_weights(self) -> None:
        """Vim/Mamba init: trunc-normal tokens and head, out_proj scaled by 1/sqrt(depth), mixer inits kept."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            for name, p in self.layers.named_parameters():
                if name.endswith("out_proj.weight"):
                    p.div_(math.sqrt(len(self.layers)))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """pos_embed, cls_token and every parameter flagged ``_no_weight_decay`` (A_log, D, dt_proj.bias)."""
        return {"pos_embed", "cls_token"} | no_weight_decay_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs (0 removes it)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook (packaged cfgs): :func:`load_checkpoint`, checksum checked for packaged files."""
        load_checkpoint(self, checked_file(checkpoint_path))

    def ssm_branches(self) -> List[Tuple[str, SSMBranch]]:
        """``(name, branch)`` for every SSM direction, in layer order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SSMBranch)]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the cls token inserted and the position embedding added, ``[b, T, dim]``."""
        expected = (self.patch_embed.proj.in_channels, *self.patch_embed.img_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be images of shape (batch, {', '.join(map(str, expected))}), got {got}")
        x = self.patch_embed(x)
        if self.cls_token is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :self.cls_index], cls, x[:, self.cls_index:]], dim=1)
        return self.pos_drop(x if self.pos_embed is None else x + self.pos_embed)

    def _block(self, block: Block, hidden: torch.Tensor,
               residual: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(block, hidden, residual, use_reentrant=False)
        return block(hidden, residual)

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        residual = residual + self.drop_path(hidden).float()
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[b, C, H, W]``. Returns the normalised tokens ``[b, T, dim]`` (cls at ``cls_index``)."""
        hidden, residual = self._embed(x), None
        for block in self.layers:
            hidden, residual = self._block(block, hidden, residual)
        return self._final_norm(hidden, residual)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Tokens after selected blocks (the residual stream, ``[b, T, dim]``), timm's feature API.

        Args:
            x: images ``[b, C, H, W]``.
            indices: last n blocks if int, all if None, else the block indices.
            norm: apply norm_f to the intermediates.
            stop_early: skip the blocks after the last requested one.
            output_fmt: only 'NLC' (token sequences; the cls token sits inside the sequence).
            intermediates_only: return only the list.
        Returns:
            ``(final tokens, intermediates)`` or the list of intermediates.
        """
        if output_fmt != "NLC":
            raise ValueError(f"output_fmt must be 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates, hidden, residual = [], self._embed(x), None
        for i, block in enumerate(layers):
            hidden, residual = self._block(block, hidden, residual)
            if i in take_indices:
                feat = residual + hidden.float()
                intermediates.append(self.norm_f(feat.to(self.norm_f.weight.dtype)) if norm else feat)
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual), intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Args: x ``[b, T, dim]`` from forward_features. Returns logits ``[b, classes]`` or features ``[b, dim]``."""
        x = x.mean(dim=1) if self.cls_index is None else x[:, self.cls_index]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_VIM_MIXER_KEYS = {  # official Vim mixer key -> (branch, native key)
    "conv1d": ("fwd", "conv1d"), "conv1d_b": ("bwd", "conv1d"),
    "dt_proj": ("fwd", "dt_proj"), "dt_proj_b": ("bwd", "dt_proj"),
    "dt_head": ("fwd", "dt_proj"), "dt_head_b": ("bwd", "dt_proj"),
    "A_log": ("fwd", "A_log"), "A_b_log": ("bwd", "A_log"), "D": ("fwd", "D"), "D_b": ("bwd", "D"),
}


def _convert_vim_key(key: str, value: torch.Tensor, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map one official Vim entry to native names; split x_proj / x_proj_b into three. Other keys pass."""
    match = re.match(r"^(layers\.\d+\.mixer\.)(.+)$", key)
    if not match:
        return {key: value}
    prefix, sub = match.groups()
    head, _, tail = sub.partition(".")
    if head in ("x_proj", "x_proj_b") and tail == "weight":
        branch_name = "fwd" if head == "x_proj" else "bwd"
        try:
            branch = model.get_submodule(prefix + branch_name)
        except AttributeError:
            return {key: value}  # left for the unexpected-key check
        return split_x_proj(value, branch, f"{prefix}{branch_name}.", key)
    if head in _VIM_MIXER_KEYS:
        branch_name, native = _VIM_MIXER_KEYS[head]
        return {f"{prefix}{branch_name}.{native}" + (f".{tail}" if tail else ""): value}
    return {key: value}


@register_checkpoint_filter(VisionMamba)
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VisionMamba, strict: bool = True) -> Dict[str, torch.Tensor]:
    """Convert an official Vim (or native) state dict for ``model``.

    Unwraps ``{'model': ...}``, splits ``x_proj`` / ``x_proj_b`` into x_proj_dt/B/C, renames the ``*_b``
    backward tensors, then applies the shared rules of :func:`~mambacl.backbones.checkpoint.filter_state_dict`
    (stem in_chans, ``pos_embed`` resampled to the model's grid, head replaced when it does not fit, missing /
    unexpected keys: ValueError when strict, UserWarning otherwise; ValueError for wrong shapes).
    """
    return filter_state_dict(state_dict, model, _convert_vim_key, strict=strict)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", **kwargs,
    }


_CIFAR = dict(input_size=(3, 32, 32), crop_pct=1.0)
default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.in1k": _cfg(paper_ids="arXiv:2401.09417", origin_url="https://huggingface.co/hustvl/Vim-tiny-midclstok"),
    "vim_tiny_patch16_stride8_224.in1k": _cfg(paper_ids="arXiv:2401.09417"),
    "vim_small_patch16_224.in1k": _cfg(paper_ids="arXiv:2401.09417", origin_url="https://huggingface.co/hustvl/Vim-small-midclstok"),
    "vim_small_patch16_stride8_224.in1k": _cfg(paper_ids="arXiv:2401.09417"),
    "vim_base_patch16_224.in1k": _cfg(paper_ids="arXiv:2401.09417", origin_url="https://huggingface.co/hustvl/Vim-base-midclstok"),
    "longhorn_vim_tiny_patch16_224": _cfg(paper_ids="arXiv:2407.14207"),
    "longhorn_vim_small_patch16_224": _cfg(paper_ids="arXiv:2407.14207"),
    "longhorn_vim_base_patch16_224": _cfg(paper_ids="arXiv:2407.14207"),
    "test_vim.glyphs": _cfg(file=str(packaged_path("test_vim.glyphs")), custom_load=True, num_classes=0,
                            input_size=(1, 8, 8), mean=(0.0,), std=(1.0,), crop_pct=1.0, license="mit",
                            description="test_vim (8 px, patch 2) pretrained on procedural stroke glyphs, "
                                        "see mambacl/backbones/weights/README.md"),
    # timm makes the first tag with weights the default unless a later key ending in '*' claims it: test_vim
    # stays the untagged, random-init cfg
    "test_vim.*": _cfg(**_CIFAR),
    "test_longhorn_vim": _cfg(**_CIFAR),
})


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    """Build through timm; ``pretrained_file=PATH`` (and ``pretrained_strict``) loads a local official checkpoint."""
    return build_with_checkpoint(VisionMamba, variant, pretrained, **kwargs)


def _vim(variant: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> VisionMamba:
    return _create_vim(variant, pretrained=pretrained, **dict(defaults, **kwargs))


_TINY = dict(patch_size=16, embed_dim=192, depth=24)
_SMALL = dict(patch_size=16, embed_dim=384, depth=24)
_BASE = dict(patch_size=16, embed_dim=768, depth=24)
_TEST = dict(img_size=32, patch_size=4, embed_dim=32, depth=2)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-tiny (7M): dim 192, depth 24, middle cls token, bimamba v2."""
    return _vim("vim_tiny_patch16_224", pretrained, _TINY, kwargs)


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-tiny+ with an 8-px patch stride (729 patches at 224 px)."""
    return _vim("vim_tiny_patch16_stride8_224", pretrained, dict(_TINY, stride=8), kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-small (26M): dim 384, depth 24."""
    return _vim("vim_small_patch16_224", pretrained, _SMALL, kwargs)


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-small+ with an 8-px patch stride."""
    return _vim("vim_small_patch16_stride8_224", pretrained, dict(_SMALL, stride=8), kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-base (98M): dim 768, depth 24."""
    return _vim("vim_base_patch16_224", pretrained, _BASE, kwargs)


@register_model
def longhorn_vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-tiny layout with bidirectional Longhorn mixers."""
    return _vim("longhorn_vim_tiny_patch16_224", pretrained, dict(_TINY, mixer="longhorn"), kwargs)


@register_model
def longhorn_vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-small layout with bidirectional Longhorn mixers."""
    return _vim("longhorn_vim_small_patch16_224", pretrained, dict(_SMALL, mixer="longhorn"), kwargs)


@register_model
def longhorn_vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-base layout with bidirectional Longhorn mixers."""
    return _vim("longhorn_vim_base_patch16_224", pretrained, dict(_BASE, mixer="longhorn"), kwargs)


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny CI model: 32 px, patch 4, dim 32, depth 2."""
    return _vim("test_vim", pretrained, _TEST, kwargs)


@register_model
def test_longhorn_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny CI model with Longhorn mixers."""
    return _vim("test_longhorn_vim", pretrained, dict(_TEST, mixer="longhorn"), kwargs)
