"""Avalanche-style strategy wrappers: MambaCL and the AdamNSCL baseline. See NullSpacePlugin for the mechanism."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from mambacl.strategies.features import PAPER_TRAINABLE
from mambacl.strategies.nullspace import ProjectorKind, Selection
from mambacl.strategies.plugins.nullspace import NullSpacePlugin


class MambaCL(SupervisedTemplate):
    """Mamba-CL: null-space projection of the SSM parameters' updates (arXiv 2411.15469).

    Keyword-only, like Avalanche's own wrappers. Builds a :class:`NullSpacePlugin` (see it for every
    null-space argument: protect, selection, projector, eta, a, threshold, tol, auto_min_dim, auto_threshold,
    wb_features, trainable, exclude, collect_mb_size, progress) and appends it to a copy of ``plugins``. The
    plugin is ``self.nullspace``. Other arguments are SupervisedTemplate's.

    Example:
        >>> strategy = MambaCL(model=ContinualClassifier(backbone), optimizer=Adam(params, 2e-4),
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
                         plugins=[*(plugins or []), self.nullspace], evaluator=evaluator, eval_every=eval_every,
                         **base_kwargs)


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
