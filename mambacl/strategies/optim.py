"""Optimizers with a head learning-rate multiplier, and keeping dynamically added heads in the head group.

Mamba-CL's authors (train_eval.py, utils/mod_adam.py) train with Adam whose weight decay is an L2 term added to
the gradient before the moments (``torch.optim.Adam``, not AdamW's decoupled decay), lr 2e-4 and weight decay
5e-5, and the classification heads at ``lr * 50`` in a second param group. See mambacl.md section 5.

Avalanche's ``update_optimizer`` puts a parameter that appears after the optimizer was built (a head added by
model adaptation) into the group of its nearest named relative; while the head group is still empty (per-
experience heads are created at the first experience) that is the backbone group. :func:`place_head_params`
(run by :class:`~mambacl.strategies.plugins.HeadLRPlugin` before every training experience) moves such
parameters into the group tagged ``name='head'``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

__all__ = ["HEAD_GROUP", "OPTIMIZERS", "check_head_lr_scale", "head_param_groups", "make_optimizer",
           "mambacl_optimizer", "place_head_params"]

HEAD_GROUP = "head"
OPTIMIZERS = ("adam", "adamw")
_OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _is_head(name: str, head: str) -> bool:
    return head in name.split(".")


def check_head_lr_scale(head_lr_scale: float) -> float:
    """``head_lr_scale`` as a float; a ValueError naming it unless it is a positive finite number."""
    if isinstance(head_lr_scale, bool) or not isinstance(head_lr_scale, (int, float)) \
            or not math.isfinite(head_lr_scale) or head_lr_scale <= 0:
        raise ValueError(f"head_lr_scale must be a positive finite number, got {head_lr_scale!r}")
    return float(head_lr_scale)


def head_param_groups(model: nn.Module, lr: float, head_lr_scale: float, head: str = "head") -> List[Dict[str, Any]]:
    """Two param groups over all of ``model``'s parameters (frozen ones too, as Avalanche adds them anyway).

    Args:
        model: the model; parameters with a dotted name component equal to ``head`` form the head group.
        lr: backbone learning rate; the head group gets ``lr * head_lr_scale``.
        head_lr_scale: head learning-rate multiplier (the authors use 50).
        head: name component marking head parameters.

    Returns:
        ``[{"name": "backbone", "params", "lr"}, {"name": "head", "params", "lr"}]`` (either may be empty).
    """
    scale = check_head_lr_scale(head_lr_scale)
    named = list(model.named_parameters())
    return [{"name": "backbone", "params": [p for n, p in named if not _is_head(n, head)], "lr": lr},
            {"name": HEAD_GROUP, "params": [p for n, p in named if _is_head(n, head)], "lr": lr * scale}]


def make_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float = 0.0,
                   head_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam (L2 weight decay inside the gradient) or AdamW (decoupled decay) over ``model``.

    Args:
        kind: 'adam' or 'adamw'.
        lr, weight_decay: learning rate and weight decay (the same in every group).
        head_lr_scale: with a value other than 1 the parameters are split by :func:`head_param_groups`
            (heads at ``lr * head_lr_scale``); add :class:`~mambacl.strategies.plugins.HeadLRPlugin` to the
            strategy so heads added later land in the head group (the mambacl wrappers add it).

    Returns:
        the optimizer.
    """
    if kind not in _OPTIMIZER_CLASSES:
        raise ValueError(f"kind must be one of {OPTIMIZERS}, got {kind!r}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    scale = check_head_lr_scale(head_lr_scale)
    params = model.parameters() if scale == 1.0 else head_param_groups(model, lr, scale)
    return _OPTIMIZER_CLASSES[kind](params, lr=lr, weight_decay=weight_decay)


def mambacl_optimizer(model: nn.Module, lr: float = 2e-4, weight_decay: float = 5e-5,
                      head_lr_scale: float = 50.0) -> torch.optim.Adam:
    """The Mamba-CL authors' optimizer: Adam with L2 weight decay 5e-5, lr 2e-4 and the heads at lr x50.

    Example:
        >>> strategy = MambaCL(model=model, optimizer=mambacl_optimizer(model), ...)  # doctest: +SKIP
    """
    return make_optimizer(model, "adam", lr, weight_decay, head_lr_scale)


def place_head_params(optimizer: torch.optim.Optimizer, model: nn.Module, head: str = "head") -> List[str]:
    """Move every head parameter of ``model`` that is not in the optimizer's head group into it.

    The head group is the param group with ``name == 'head'``; without one nothing changes. Per-parameter
    optimizer state is keyed by the parameter, so moving it between groups keeps it.

    Args:
        optimizer: the strategy's optimizer (after Avalanche's ``make_optimizer``).
        model: the model whose parameters it optimizes.
        head: name component marking head parameters.

    Returns:
        the names of the parameters moved.
    """
    groups = [g for g in optimizer.param_groups if g.get("name") == HEAD_GROUP]
    if not groups:
        return []
    head_ids = {id(p) for p in groups[0]["params"]}
    moved = []
    for name, p in model.named_parameters():
        if not _is_head(name, head) or id(p) in head_ids:
            continue
        for group in optimizer.param_groups:
            group["params"] = [q for q in group["params"] if q is not p]
        groups[0]["params"].append(p)
        head_ids.add(id(p))
        moved.append(name)
    return moved
