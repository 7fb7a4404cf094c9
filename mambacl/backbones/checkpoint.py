"""Checkpoint loading shared by the mambacl timm models (Vim, De-focus Mamba).

A model file supplies only a key converter for its official layout (one checkpoint entry -> native entries)
and registers its ``checkpoint_filter_fn`` with :func:`register_checkpoint_filter`. Everything else is done
here, the same way for every model:

- reading a local file (weights only, ``argparse.Namespace`` allowed for DeiT-style training dicts);
- unwrapping ``{'model': state_dict}`` and the ``module.`` prefix of DDP saves;
- adapting the patch-embedding stem to the model's ``in_chans`` and resampling ``pos_embed`` to its grid;
- replacing a classifier head that does not fit the model by the model's own (freshly initialised) head;
- missing / unexpected keys: ValueError when strict, a UserWarning naming them when not; ValueError for
  tensors whose shape cannot match;
- ``model.pretrained_source = str(path)`` on every model loaded from a file (the strategies warn when a frozen
  backbone never was).
"""
from __future__ import annotations

import argparse
import math
import pickle
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type, Union

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv, build_model_with_cfg

__all__ = [
    "read_checkpoint", "unwrap_state_dict", "split_x_proj", "filter_state_dict", "register_checkpoint_filter",
    "checkpoint_filter_for", "load_checkpoint", "build_with_checkpoint",
]

KeyConverter = Callable[[str, torch.Tensor, nn.Module], Dict[str, torch.Tensor]]
FilterFn = Callable[..., Dict[str, torch.Tensor]]
_FILTERS: Dict[type, FilterFn] = {}


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a local checkpoint file as a dict, unpickling only tensors and plain containers (``.safetensors``
    files hold a state dict).

    Args:
        path: the file (``pretrained_file``).
    Returns:
        the dict stored in the file (a state dict or a training dict such as ``{'model': ..., 'epoch': ...}``).
    Raises:
        FileNotFoundError: no such file. ValueError: not a weights-only torch file (e.g. it pickles other
        objects, or is not a torch file). TypeError: the file holds something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return load_safetensors(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"pretrained_file {str(path)!r} cannot be read as a weights-only torch checkpoint "
                         f"(objects other than tensors are not unpickled; re-save just the state dict, e.g. "
                         f"torch.save({{'model': ckpt['model']}}, new_path)): {error}") from error
    if not isinstance(checkpoint, dict):
        raise TypeError(f"pretrained_file {str(path)!r} must hold a dict (a state dict or {{'model': state_dict}}), "
                        f"got {type(checkpoint).__name__}")
    return checkpoint


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint dict: ``checkpoint['model']`` if it is a dict, with ``module.`` stripped.

    Raises:
        TypeError: an entry that is not a tensor (naming it), i.e. the dict is neither a state dict nor
        ``{'model': state_dict, ...}``.
    """
    state_dict = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: expected a state "
                            f"dict at the top level or under 'model'")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def split_x_proj(value: torch.Tensor, branch: nn.Module, native_prefix: str, key: str) -> Dict[str, torch.Tensor]:
    """Split a fused ``x_proj.weight`` ``[dt_rank + 2N, d_inner]`` into the branch's x_proj_dt / x_proj_B / x_proj_C.

    Args:
        value: the checkpoint tensor.
        branch: the :class:`~mambacl.backbones.SSMBranch` receiving it (gives dt_rank and d_state).
        native_prefix: the branch's module name plus '.', e.g. ``'layers.3.mixer.fwd.'``.
        key: the checkpoint key (for the error message).
    Returns:
        ``{native_prefix + 'x_proj_{dt,B,C}.weight': rows}``.
    """
    sizes = [branch.dt_rank, branch.d_state, branch.d_state]
    if value.dim() != 2 or value.shape[0] != sum(sizes):
        raise ValueError(f"checkpoint {key} has shape {tuple(value.shape)}, expected "
                         f"({sum(sizes)}, d_inner) = dt_rank {sizes[0]} + 2 * d_state {sizes[1]} rows")
    parts = value.split(sizes, dim=0)
    return {f"{native_prefix}x_proj_{s}.weight": p for s, p in zip(("dt", "B", "C"), parts)}


def _resample_pos_embed(posemb: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Interpolate a checkpoint pos_embed to the model's grid, keeping the cls row at its layout position."""
    n_old = posemb.shape[1] - model.num_prefix_tokens
    side = math.isqrt(n_old)
    if side * side != n_old or posemb.shape[-1] != model.embed_dim:
        raise ValueError(f"checkpoint pos_embed has shape {tuple(posemb.shape)}, which is not a square grid of "
                         f"{model.embed_dim}-dim rows plus {model.num_prefix_tokens} cls row(s)")
    grid = list(model.patch_embed.grid_size)
    if model.cls_index is None:
        return resample_abs_pos_embed(posemb, grid, [side, side], num_prefix_tokens=0)
    old_index = n_old // 2 if model.cls_token_position == "middle" else n_old
    cls_row = posemb[:, old_index:old_index + 1]
    patches = torch.cat([posemb[:, :old_index], posemb[:, old_index + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, grid, [side, side], num_prefix_tokens=0)
    return torch.cat([patches[:, :model.cls_index], cls_row, patches[:, model.cls_index:]], dim=1)


def _fit_head(out: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> None:
    """Replace the checkpoint's ``head.*`` entries by the model's own when their names or shapes differ, and keep
    the model's own head for a head-less (backbone) checkpoint."""
    theirs = {k: tuple(v.shape) for k, v in out.items() if k.split(".")[0] == "head"}
    ours = {k: tuple(v.shape) for k, v in own.items() if k.split(".")[0] == "head"}
    if theirs != ours:
        for k in theirs:
            del out[k]
        out.update({k: own[k] for k in ours})


def filter_state_dict(checkpoint: Dict[str, Any], model: nn.Module, convert: KeyConverter,
                      strict: bool = True) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint dict for ``model`` (a :class:`~mambacl.backbones.VisionMamba`) with a model's key converter.

    Args:
        checkpoint: a state dict or ``{'model': state_dict, ...}`` in an official or the native layout.
        model: the model to load into.
        convert: ``convert(key, tensor, model) -> {native key: tensor}`` for one (unwrapped) entry; an empty
            dict drops the entry.
        strict: raise on missing or unexpected keys (otherwise warn, keep missing ones at their init and drop
            unexpected ones).
    Returns:
        the state dict to pass to ``model.load_state_dict``.
    Raises:
        ValueError: missing or unexpected keys when strict (listing them), or tensors whose shape cannot match.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in unwrap_state_dict(checkpoint).items():
        out.update(convert(key, value, model))

    own = model.state_dict()
    stem = out.get("patch_embed.proj.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[1] != own["patch_embed.proj.weight"].shape[1]:
        out["patch_embed.proj.weight"] = adapt_input_conv(own["patch_embed.proj.weight"].shape[1], stem, stem.shape[1])
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        out["pos_embed"] = _resample_pos_embed(out["pos_embed"], model)
    _fit_head(out, own)

    missing = sorted(set(own) - set(out))
    unexpected = sorted(set(out) - set(own))
    if missing or unexpected:
        message = f"checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        if strict:
            raise ValueError(message)
        warnings.warn(f"{message} (pretrained_strict=False: missing keys keep their init, unexpected keys are "
                      f"ignored)", UserWarning, stacklevel=2)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in out.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError("checkpoint tensors with wrong shapes: " + "; ".join(bad))
    return {k: v for k, v in out.items() if k in own}


def register_checkpoint_filter(model_cls: type) -> Callable[[FilterFn], FilterFn]:
    """Decorator registering ``fn(checkpoint, model, strict=True)`` as the checkpoint filter of ``model_cls``."""
    def wrap(fn: FilterFn) -> FilterFn:
        _FILTERS[model_cls] = fn
        return fn
    return wrap


def checkpoint_filter_for(model_cls: type) -> FilterFn:
    """The checkpoint filter registered for ``model_cls`` or its nearest base class."""
    for cls in model_cls.__mro__:
        if cls in _FILTERS:
            return _FILTERS[cls]
    raise TypeError(f"no checkpoint filter is registered for {model_cls.__name__}")


def _load_into(model: nn.Module, checkpoint: Dict[str, Any], path: Union[str, Path], strict: bool) -> nn.Module:
    state_dict = checkpoint_filter_for(type(model))(checkpoint, model, strict=strict)
    model.load_state_dict(state_dict, strict=strict)
    model.pretrained_source = str(path)
    return model


def load_checkpoint(model: nn.Module, path: Union[str, Path], strict: bool = True) -> nn.Module:
    """Load an official (or native) checkpoint file into a mambacl model through its registered filter.

    Args:
        model: a :class:`~mambacl.backbones.VisionMamba` or :class:`~mambacl.backbones.DefocusMamba`.
        path: the checkpoint file; see :func:`read_checkpoint`.
        strict: see :func:`filter_state_dict`.
    Returns:
        ``model``, with ``model.pretrained_source = str(path)``.
    """
    return _load_into(model, read_checkpoint(path), path, strict)


def build_with_checkpoint(model_cls: Type[nn.Module], variant: str, pretrained: bool = False,
                          **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` for a mambacl model, loading a local checkpoint through its registered filter.

    Args:
        model_cls: the model class (its filter must be registered).
        variant: the registered model name.
        pretrained: timm's flag; weights then come from ``pretrained_cfg_overlay=dict(file=PATH)`` (no download
            URL is configured).
        **kwargs: model arguments, plus ``pretrained_file=PATH`` (a local file in an official or the native
            layout) and ``pretrained_strict`` (bool, default True).
    Returns:
        the model; ``model.pretrained_source`` names the file when weights were loaded.
    """
    pretrained_file: Optional[Union[str, Path]] = kwargs.pop("pretrained_file", None)
    strict = kwargs.pop("pretrained_strict", True)
    if not isinstance(strict, bool):
        raise TypeError(f"pretrained_strict must be a bool, got {strict!r}")
    if pretrained and pretrained_file is not None:
        raise ValueError("pass either pretrained_file=PATH or pretrained=True with "
                         "pretrained_cfg_overlay=dict(file=PATH), not both")
    checkpoint = None if pretrained_file is None else read_checkpoint(pretrained_file)  # fail before building
    model = build_model_with_cfg(model_cls, variant, pretrained,
                                 pretrained_filter_fn=partial(checkpoint_filter_for(model_cls), strict=strict),
                                 pretrained_strict=strict, **kwargs)
    if checkpoint is not None:
        _load_into(model, checkpoint, pretrained_file, strict)
    elif pretrained:
        model.pretrained_source = str(model.pretrained_cfg["file"])
    return model
