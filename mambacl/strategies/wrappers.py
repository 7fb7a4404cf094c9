"""Avalanche-style strategy wrappers: MambaCL and the AdamNSCL baseline (see NullSpacePlugin), and PretrainedCIL,
the frozen-backbone baselines SimpleCIL and RanPAC (see PrototypePlugin).

The wrappers add the plugins their model and optimizer need to a copy of the caller's list
(:func:`companion_plugins`): PrototypePlugin when the model has a PrototypeHead/RanPACHead, HeadLRPlugin when
the optimizer has a ``name='head'`` param group.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from mambacl.strategies.features import PAPER_TRAINABLE
from mambacl.strategies.heads import fitted_heads
from mambacl.strategies.nullspace import ProjectorKind, Selection
from mambacl.strategies.optim import HEAD_GROUP
from mambacl.strategies.plugins.head_lr import HeadLRPlugin
from mambacl.strategies.plugins.nullspace import NullSpacePlugin
from mambacl.strategies.plugins.prototype import PrototypePlugin


def companion_plugins(model: Module, optimizer: Optimizer, plugins: Optional[List[BasePlugin]]) -> List[BasePlugin]:
    """A copy of ``plugins`` plus the plugins ``model`` and ``optimizer`` need, unless already present:
    :class:`PrototypePlugin` if the model has a fitted head, :class:`HeadLRPlugin` if the optimizer has a
    ``name='head'`` param group."""
    plugins = list(plugins or [])
    if fitted_heads(model) and not any(isinstance(p, PrototypePlugin) for p in plugins):
        plugins.append(PrototypePlugin())
    if any(g.get("name") == HEAD_GROUP for g in optimizer.param_groups) \
            and not any(isinstance(p, HeadLRPlugin) for p in plugins):
        plugins.append(HeadLRPlugin())
    return plugins


class MambaCL(SupervisedTemplate):
    """Mamba-CL: null-space projection of the SSM parameters' updates (arXiv 2411.15469).

    Keyword-only, like Avalanche's own wrappers. Builds a :class:`NullSpacePlugin` (see it for every
    null-space argument: protect, selection, projector, eta, a, threshold, tol, auto_min_dim, auto_threshold,
    wb_features, trainable, exclude, collect_mb_size, progress) and appends it, and the :func:`companion_plugins`,
    to a copy of ``plugins``. The plugin is ``self.nullspace``. Other arguments are SupervisedTemplate's. The
    authors' optimizer is :func:`~mambacl.strategies.optim.mambacl_optimizer` (Adam, L2 weight decay, heads at
    lr x50).

    Example:
        >>> strategy = MambaCL(model=ContinualClassifier(backbone), optimizer=mambacl_optimizer(model),
        ...                    train_mb_size=200, train_epochs=10, device="cuda")  # doctest: +SKIP
        >>> for exp in benchmark.train_stream:  # doctest: +SKIP
        ...     strategy.train(exp); strategy.eval(benchmark.test_stream)
    """

    def __init__(self, *, model: Module, optimizer: Optimizer, criterion: Module = CrossEntropyLoss(),
                 train_mb_size: int = 1, train_epochs: int = 1, eval_mb_size: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", plugins: Optional[List[BasePlugin]] = None,
                 evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
                 eval_every: int = -1, protect: str = "ssm", selection: Selection = "auto",
                 projector: ProjectorKind = "soft", eta: float = 0.95, a: float = 10.0, threshold: float = 0.97,
                 tol: float = 1e-10, auto_min_dim: int = 128, auto_threshold: float = 0.99,
                 wb_features: str = "aggregated",
                 trainable: Optional[Sequence[str]] = PAPER_TRAINABLE, exclude: Sequence[str] = ("head",),
                 collect_mb_size: Optional[int] = None, progress: bool = True, **base_kwargs) -> None:
        self.nullspace = NullSpacePlugin(
            protect=protect, selection=selection, projector=projector, eta=eta, a=a, threshold=threshold, tol=tol,
            auto_min_dim=auto_min_dim, auto_threshold=auto_threshold, wb_features=wb_features, trainable=trainable,
            exclude=exclude, collect_mb_size=collect_mb_size, progress=progress)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=companion_plugins(model, optimizer, [*(plugins or []), self.nullspace]),
                         evaluator=evaluator, eval_every=eval_every, **base_kwargs)


class AdamNSCL(MambaCL):
    """Adam-NSCL baseline (CVPR 2021): every Linear/Conv weight's update projected by its input covariance.

    Same arguments as :class:`MambaCL` with Adam-NSCL defaults: ``protect='layers'``,
    ``selection='adam_nscl'`` (``lambda <= a * lambda_min``, a = 10), ``projector='strict'`` and
    ``trainable=('protected', 'head')`` (protected weights and the head train; biases, norms, tokens and
    depthwise convolutions stay frozen).
    """

    def __init__(self, *, model: Module, optimizer: Optimizer, selection: Selection = "adam_nscl",
                 projector: ProjectorKind = "strict", a: float = 10.0,
                 trainable: Optional[Sequence[str]] = ("protected", "head"), **kwargs) -> None:
        super().__init__(model=model, optimizer=optimizer, protect="layers", selection=selection,
                         projector=projector, a=a, trainable=trainable, **kwargs)


class PretrainedCIL(SupervisedTemplate):
    """Class-incremental learning on a frozen pretrained backbone with a fitted head: SimpleCIL (Zhou et al.
    2023) with a :class:`~mambacl.strategies.heads.PrototypeHead`, RanPAC (McDonnell et al., NeurIPS 2023,
    without its optional first-session adaptation) with a :class:`~mambacl.strategies.heads.RanPACHead`.

    Nothing is trained: every parameter is frozen and ``train_epochs`` is 0, so training an experience costs
    the head's adaptation and :class:`PrototypePlugin`'s one forward pass over the experience's training data.
    Avalanche needs an optimizer; it is an SGD with lr 0 that never steps. Keyword-only; the plugins are added
    to a copy of ``plugins``; other arguments are SupervisedTemplate's.

    Example:
        >>> model = ContinualClassifier(backbone, head="prototype", train_heads=False)  # doctest: +SKIP
        >>> strategy = PretrainedCIL(model=model, eval_mb_size=256, device="cuda")  # doctest: +SKIP
    """

    def __init__(self, *, model: Module, criterion: Module = CrossEntropyLoss(), eval_mb_size: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", plugins: Optional[List[BasePlugin]] = None,
                 evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
                 eval_every: int = -1, **base_kwargs) -> None:
        for key in ("optimizer", "train_epochs"):
            if key in base_kwargs:
                raise TypeError(f"PretrainedCIL trains nothing and takes no {key!r} (it has 0 epochs)")
        if not fitted_heads(model):
            raise ValueError("model must have a PrototypeHead or RanPACHead (e.g. ContinualClassifier(backbone, "
                             f"head='prototype', train_heads=False)); {type(model).__name__} has none")
        model.requires_grad_(False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_epochs=0,
                         eval_mb_size=eval_mb_size, device=device,
                         plugins=companion_plugins(model, optimizer, plugins), evaluator=evaluator,
                         eval_every=eval_every, **base_kwargs)
