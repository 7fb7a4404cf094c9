"""Strategy registry: names -> factories that build an Avalanche template from a backbone and shared settings.

A factory takes a :class:`TrainSetup` (the backbone and the settings every strategy shares) plus its own
keyword-only, typed hyper-parameters, and returns a ``SupervisedTemplate``. Register one with
:func:`register_strategy`, or from another package through the ``mambacl.strategies`` entry-point group
(the entry point names a module that registers on import, or a factory registered under the entry-point name).

Example:
    >>> @register_strategy("my-naive")  # doctest: +SKIP
    ... def my_naive(setup: TrainSetup, *, momentum: float = 0.9) -> SupervisedTemplate:
    ...     model = setup.classifier("incremental")
    ...     return Naive(model=model, optimizer=SGD(model.parameters(), setup.lr, momentum), **setup.template_kwargs())
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from avalanche.core import BasePlugin
from avalanche.training import EWC, JointTraining, LwF, Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from mambacl.strategies.distributed import check_batch_divisible, world_size
from mambacl.strategies.heads import RIDGE_GRID, ContinualClassifier
from mambacl.strategies.optim import make_optimizer
from mambacl.strategies.storage import IndexedExperienceBalancedBuffer
from mambacl.strategies.wrappers import AdamNSCL, MambaCL, PretrainedCIL

__all__ = ["unknown_name_error", "TrainSetup", "StrategySpec", "register_strategy", "get_strategy", "list_strategies", "create_strategy",
           "strategy_hparams", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "mambacl.strategies"
StrategyFactory = Callable[..., SupervisedTemplate]


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> ValueError:
    """A ValueError for an unknown ``kind`` name that suggests the closest valid one and lists them all."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint}; valid {kind} names: {', '.join(valid)}")


@dataclass
class TrainSetup:
    """Settings shared by every strategy factory.

    Args:
        backbone: timm-style feature extractor (``num_features``, ``forward_features``, ``forward_head``).
        lr: learning rate. weight_decay: weight decay (decoupled for AdamW, L2 for Adam; see :meth:`optimizer`).
        epochs: training epochs per experience.
        train_mb_size, eval_mb_size: mini-batch sizes.
        device: torch device.
        evaluator: Avalanche EvaluationPlugin (metrics + loggers).
        plugins: extra Avalanche plugins (factories append them to a copy).
    """

    backbone: nn.Module
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 1
    train_mb_size: int = 32
    eval_mb_size: int = 256
    device: torch.device = torch.device("cpu")
    evaluator: Optional[EvaluationPlugin] = None
    plugins: List[BasePlugin] = field(default_factory=list)

    def classifier(self, head: str, **head_kwargs: Any) -> ContinualClassifier:
        """The backbone with a continual head ('experience', 'incremental', 'prototype' or 'ranpac'; see
        ContinualClassifier); ``head_kwargs`` go to the head."""
        return ContinualClassifier(self.backbone, head=head, **head_kwargs)

    def optimizer(self, model: nn.Module, kind: str = "adamw", head_lr_scale: float = 1.0) -> torch.optim.Optimizer:
        """The model's optimizer with the setup's lr and weight decay (see ``mambacl.strategies.optim``).

        Args:
            kind: 'adamw' (decoupled weight decay; the baselines) or 'adam' (L2 weight decay inside the gradient,
                as the Mamba-CL authors' ModAdam).
            head_lr_scale: other than 1: heads in a ``name='head'`` group at ``lr * head_lr_scale``.
        """
        return make_optimizer(model, kind, self.lr, self.weight_decay, head_lr_scale)

    def template_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``SupervisedTemplate`` besides model and optimizer."""
        kwargs = dict(criterion=nn.CrossEntropyLoss(), train_mb_size=self.train_mb_size, train_epochs=self.epochs, eval_mb_size=self.eval_mb_size,
                      device=self.device, plugins=list(self.plugins))
        if self.evaluator is not None:
            kwargs["evaluator"] = self.evaluator
        return kwargs


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its factory, whether it trains jointly on the whole stream, and a summary."""

    name: str
    factory: StrategyFactory
    joint: bool = False

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.factory) or "").split("\n")[0]


_REGISTRY: Dict[str, StrategySpec] = {}
_entry_points_loaded = False


def register_strategy(name: str, *, joint: bool = False) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator registering ``factory(setup: TrainSetup, *, hparam=default, ...) -> SupervisedTemplate``.

    Args:
        name: strategy name used by ``mambacl run --strategy``.
        joint: the template trains once on the whole train stream (upper-bound baselines).
    Returns:
        the decorator (the factory is returned unchanged).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(factory: StrategyFactory) -> StrategyFactory:
        if not callable(factory):
            raise TypeError(f"strategy {name!r}: factory must be callable, got {type(factory).__name__}")
        params = list(inspect.signature(factory).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"strategy {name!r}: factory must take the TrainSetup as its first positional argument")
        _REGISTRY[name] = StrategySpec(name, factory, joint)
        return factory
    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if callable(obj) and ep.name not in _REGISTRY:
            register_strategy(ep.name)(obj)


def list_strategies() -> List[str]:
    """Names of all registered strategies (built-ins, decorated and entry points), sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> StrategySpec:
    """The :class:`StrategySpec` registered as ``name``; unknown names raise a ValueError listing valid ones."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise unknown_name_error("strategy", name, _REGISTRY)
    return _REGISTRY[name]


def strategy_hparams(name: str) -> Dict[str, inspect.Parameter]:
    """The hyper-parameters (keyword arguments after the setup) of strategy ``name``, with defaults and types."""
    params = list(inspect.signature(get_strategy(name).factory).parameters.values())[1:]
    return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def create_strategy(name: str, setup: TrainSetup, **hparams: Any) -> SupervisedTemplate:
    """Build strategy ``name`` from ``setup``; unknown hyper-parameters raise a ValueError listing valid ones."""
    valid = strategy_hparams(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"strategy {name!r} has no hyper-parameter(s) {unknown}; valid: {sorted(valid) or 'none'}")
    return get_strategy(name).factory(setup, **hparams)


# -- built-in strategies ---------------------------------------------------------------------------------------
@register_strategy("mambacl")
def mambacl(setup: TrainSetup, *, eta: float = 0.95, selection: str = "auto", projector: str = "soft",
            wb_features: str = "aggregated", protect: str = "ssm", head: str = "experience",
            head_lr_scale: float = 50.0) -> SupervisedTemplate:
    """Mamba-CL: null-space projection of the SSM parameters' updates (see MambaCL / NullSpacePlugin).

    The optimizer is the authors': Adam with L2 weight decay (the setup's lr and weight decay; theirs are 2e-4
    and 5e-5) and the heads at ``lr * head_lr_scale``.

    Args:
        eta: soft-projector mixing weight. selection: null-space rule ('auto', 'knee', 'energy', 'adam_nscl',
            'kernel').
        projector: 'soft' or 'strict'. wb_features: 'aggregated' or 'token'.
        protect: parameters protected ('ssm' or 'layers').
        head: 'experience', 'prototype', 'ranpac' or 'incremental'. head_lr_scale: head lr multiplier.
    """
    model = setup.classifier(head)
    return MambaCL(model=model, optimizer=setup.optimizer(model, kind="adam", head_lr_scale=head_lr_scale), eta=eta,
                   selection=selection, projector=projector, wb_features=wb_features, protect=protect,
                   progress=False, **setup.template_kwargs())


@register_strategy("adam-nscl")
def adam_nscl(setup: TrainSetup, *, a: float = 10.0, projector: str = "strict",
              head: str = "experience") -> SupervisedTemplate:
    """Adam-NSCL: every Linear/Conv update projected into its input covariance's null space (see AdamNSCL).

    Args:
        a: null space = eigenvalues <= a * lambda_min. projector: 'strict' or 'soft'.
        head: 'experience' or 'incremental'.
    """
    model = setup.classifier(head)
    return AdamNSCL(model=model, optimizer=setup.optimizer(model), a=a, projector=projector, progress=False,
                    **setup.template_kwargs())


def _pretrained_cil(setup: TrainSetup, head: str, **head_kwargs: Any) -> SupervisedTemplate:
    kwargs = {k: v for k, v in setup.template_kwargs().items() if k != "train_epochs"}
    return PretrainedCIL(model=setup.classifier(head, train_heads=False, **head_kwargs), **kwargs)


@register_strategy("simplecil")
def simplecil(setup: TrainSetup, *, scale: float = 1.0) -> SupervisedTemplate:
    """SimpleCIL (Zhou et al. 2023): frozen backbone, cosine class-mean head; no training (see PretrainedCIL).

    Args:
        scale: cosine logit scale (1 in the paper; only the evaluation loss depends on it).
    """
    return _pretrained_cil(setup, "prototype", scale=scale)


@register_strategy("ranpac")
def ranpac(setup: TrainSetup, *, num_projections: int = 10000, ridge_grid: Sequence[float] = RIDGE_GRID,
           seed: int = 0) -> SupervisedTemplate:
    """RanPAC (McDonnell et al. 2023): frozen backbone, random projection + ridge-regression head (see RanPACHead).

    Without the paper's optional first-session adaptation; lambda is chosen on each experience's data as in the
    authors' code. No training (see PretrainedCIL).

    Args:
        num_projections: random features M (10000 in the paper; G costs 8 M^2 bytes, use a few hundred to a
            few thousand for small backbones on a CPU). ridge_grid: lambda candidates. seed: W_rand and splits.
    """
    return _pretrained_cil(setup, "ranpac", num_projections=num_projections, ridge_grid=ridge_grid, seed=seed)


@register_strategy("naive")
def naive(setup: TrainSetup) -> SupervisedTemplate:
    """Naive fine-tuning (Avalanche Naive): the lower bound."""
    model = setup.classifier("incremental")
    return Naive(model=model, optimizer=setup.optimizer(model), **setup.template_kwargs())


@register_strategy("ewc")
def ewc(setup: TrainSetup, *, ewc_lambda: float = 100.0, mode: str = "separate",
        decay_factor: Optional[float] = None) -> SupervisedTemplate:
    """Elastic Weight Consolidation (Avalanche EWC).

    Args:
        ewc_lambda: penalty weight. mode: 'separate' or 'online'. decay_factor: online-mode decay.
    """
    model = setup.classifier("incremental")
    return EWC(model=model, optimizer=setup.optimizer(model), ewc_lambda=ewc_lambda, mode=mode,
               decay_factor=decay_factor, **setup.template_kwargs())


@register_strategy("lwf")
def lwf(setup: TrainSetup, *, alpha: float = 1.0, temperature: float = 2.0) -> SupervisedTemplate:
    """Learning without Forgetting (Avalanche LwF).

    Args:
        alpha: distillation weight. temperature: softmax temperature.
    """
    model = setup.classifier("incremental")
    return LwF(model=model, optimizer=setup.optimizer(model), alpha=alpha, temperature=temperature,
               **setup.template_kwargs())


@register_strategy("replay")
def replay(setup: TrainSetup, *, mem_size: int = 200) -> SupervisedTemplate:
    """Experience replay with an experience-balanced buffer (Avalanche's ReplayPlugin on a Naive template): each
    batch is ``batch_size`` current samples plus ``batch_size`` stored ones. The buffer is Avalanche's
    experience-balanced reservoir, indexed so that checkpoints store sample indices (``strategies.storage``).

    Under torchrun Avalanche's replay loader shards both datasets with its own DistributedSampler; each rank
    then draws ``batch_size / world`` of each, so the global batch is the single-process one.

    Args:
        mem_size: total number of stored samples.
    """
    model = setup.classifier("incremental")
    kwargs = setup.template_kwargs()
    replay_plugin = ReplayPlugin(mem_size, storage_policy=IndexedExperienceBalancedBuffer(mem_size))
    kwargs["plugins"].append(replay_plugin)
    strategy = Naive(model=model, optimizer=setup.optimizer(model), **kwargs)
    if world_size() > 1:
        replay_plugin.batch_size = replay_plugin.batch_size_mem = check_batch_divisible(setup.train_mb_size,
                                                                                        name="batch size")
        strategy.shards_own_loader = True  # for DistributedPlugin: keep the replay loader, DDP-wrap the model
    return strategy


@register_strategy("joint", joint=True)
def joint(setup: TrainSetup) -> SupervisedTemplate:
    """Joint training on the whole stream at once (Avalanche JointTraining): the upper bound."""
    model = setup.classifier("incremental")
    return JointTraining(model=model, optimizer=setup.optimizer(model), **setup.template_kwargs())
