"""NullSpacePlugin: Mamba-CL (and Adam-NSCL) null-space projection of the optimizer's actual update."""
from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mambacl.strategies.features import PAPER_TRAINABLE, ProtectionPlan, layer_plan, match_kinds, ssm_plan
from mambacl.strategies.nullspace import (NonFiniteFeaturesError, NullSpaceEngine, ProjectorKind, Selected,
                                          Selection, check_count)

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

PROTECT = ("ssm", "layers")
Statistics = Tuple[Dict[str, torch.Tensor], Dict[str, int]]
ReduceFn = Callable[[Dict[str, torch.Tensor], Dict[str, int]], Statistics]


class NullSpaceWarning(UserWarning):
    """A NullSpacePlugin set-up or selection that leaves parameters unprotected, frozen or barely constrained."""


def _add_rows(engine: NullSpaceEngine, key: str, rows: Union[torch.Tensor, Tuple[torch.Tensor, int]]) -> None:
    features, count = rows if isinstance(rows, tuple) else (rows, None)
    engine.add(key, features, count)


def _names(names: Sequence[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_names(arg: str, value: object) -> Tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{arg} must be a sequence of names, got {type(value).__name__} {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise TypeError(f"{arg} entries must be non-empty strings, got {bad!r}")
    return tuple(value)


def is_calibrated_head(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a head whose classes stay comparable across experiences without null-space
    protection: per-experience heads (:class:`~mambacl.strategies.heads.ExperienceHeads`) or prototype heads.
    The contract is the class attribute ``calibrated_across_experiences = True``."""
    return getattr(module, "calibrated_across_experiences", False) is True


class NullSpacePlugin(SupervisedPlugin, supports_distributed=True):
    """Projects every step of the protected parameters onto the null space of old experiences' features.

    In ``before_update`` the protected parameters are snapshot; in ``after_update`` the optimizer's step
    ``dW = W - W_old`` (weight decay, momentum and Adam scaling included) is replaced by ``dW @ P`` (Linear
    weights) or ``P @ dA`` (A_log), so the constraint is exact for any optimizer. After each experience the
    updated model runs, under no_grad and in eval mode, over the experience's training data with its eval
    transform; feature covariances ``sum X^T X / rows`` (float64) accumulate across experiences and the
    projectors are rebuilt. The first experience trains unprojected. Optimizer state is reset at every
    experience boundary (param groups are kept). Projectors are keyed by parameter name; a parameter whose
    shape no longer matches its projector is skipped.

    Data-parallel safe: DDP replicas are identical, so every rank builds the same projector; DistributedPlugin
    additionally shards the collection pass and all-reduces its statistics (``reduce_fn``).

    After every experience ``null_space_history`` gets one entry ``{feature key: {"dim": D, "null": k, "rule":
    rule, "projector": kind, "solver": solver}}`` (saved by :meth:`state_dict`). Warnings (:class:`NullSpaceWarning`,
    a UserWarning): a
    trainable parameter excluded from protection that is not part of a per-experience or prototype head
    (:func:`is_calibrated_head`); ``trainable`` freezing parameters of a model never loaded from a checkpoint (no
    module has ``pretrained_source``); a degenerate selection (every key keeps at least D-2 of D directions
    null); a strict projector with an empty null space (its parameters can no longer change).

    Args:
        protect: 'ssm' (Mamba-CL: SSM branch/mixer taps, see ``features.ssm_plan``) or 'layers' (Adam-NSCL:
            every Linear/Conv layer by its input).
        selection: 'auto' (default: the knee rule with ``projector`` for features of at least ``auto_min_dim``
            dimensions, the energy rule at ``auto_threshold`` with a strict projector below) or a rule 'knee' |
            'adam_nscl' | 'energy' | 'kernel' (see ``nullspace.null_space_size``).
        projector: 'soft' (``eta * P0/||P0||_F + (1 - eta) I``) or 'strict' (``P0``).
        eta: soft-projector weight in [0, 1].
        a: Adam-NSCL multiplier (``lambda <= a * lambda_min``), >= 1.
        threshold: GPM energy threshold in (0, 1] of ``selection='energy'``.
        tol: relative eigenvalue tolerance of the 'kernel' rule.
        auto_min_dim: narrowest feature width that 'auto' gives the knee rule (default 128).
        auto_threshold: energy threshold of 'auto' below ``auto_min_dim`` (default 0.99).
        wb_features: 'aggregated' (W_B by sum_t delta_t x_t, the paper) or 'token' (W_B by x_t, exact B_t).
        trainable: name components of the parameters that train, e.g. the default
            ``('x_proj_dt', 'x_proj_B', 'x_proj_C', 'A_log', 'out_proj', 'head')``; the entry 'protected'
            stands for every protected parameter; all others are frozen. None leaves requires_grad untouched.
        exclude: module-name components never protected (default the classifier ``head``).
        collect_mb_size: batch size of the covariance pass (default the strategy's eval_mb_size).
        progress: show a tqdm bar while collecting.
        reduce_fn: applied to this experience's statistics ``({key: [D, D] float64 covariance sum},
            {key: rows})`` before they join the running sums, e.g. an all-reduce across data-parallel ranks
            (keys are sorted, so every rank reduces in the same order). Default: identity. See
            :meth:`reduce_statistics` and :meth:`collect_loader`.

    Example:
        >>> plugin = NullSpacePlugin(selection="knee", projector="soft", eta=0.95)
        >>> strategy = Naive(model=model, optimizer=opt, plugins=[plugin])  # doctest: +SKIP
    """

    def __init__(self, *, protect: str = "ssm", selection: Selection = "auto", projector: ProjectorKind = "soft",
                 eta: float = 0.95, a: float = 10.0, threshold: float = 0.97, tol: float = 1e-10,
                 auto_min_dim: int = 128, auto_threshold: float = 0.99, wb_features: str = "aggregated",
                 trainable: Optional[Sequence[str]] = PAPER_TRAINABLE, exclude: Sequence[str] = ("head",),
                 collect_mb_size: Optional[int] = None, progress: bool = True,
                 reduce_fn: Optional[ReduceFn] = None) -> None:
        super().__init__()
        if protect not in PROTECT:
            raise ValueError(f"protect must be one of {PROTECT}, got {protect!r}")
        if wb_features not in ("aggregated", "token"):
            raise ValueError(f"wb_features must be 'aggregated' or 'token', got {wb_features!r}")
        if collect_mb_size is not None:
            check_count("collect_mb_size", collect_mb_size, 1)
        if reduce_fn is not None and not callable(reduce_fn):
            raise TypeError(f"reduce_fn must be callable or None, got {type(reduce_fn).__name__}")
        if trainable is not None and not _check_names("trainable", trainable):
            raise ValueError("trainable must name at least one parameter kind (e.g. ('protected', 'head')), "
                             "or be None to leave requires_grad untouched; () would freeze the whole model")
        self.engine = NullSpaceEngine(selection, projector, eta, a=a, threshold=threshold, tol=tol,
                                      auto_min_dim=auto_min_dim, auto_threshold=auto_threshold)
        self.protect, self.wb_features = protect, wb_features
        self.trainable = None if trainable is None else tuple(trainable)
        self.exclude = _check_names("exclude", exclude)
        self.collect_mb_size, self.progress, self.reduce_fn = collect_mb_size, progress, reduce_fn
        self.experiences = 0
        self.null_space_history: List[Dict[str, Selected]] = []
        self._active: Dict[str, Tuple[torch.nn.Parameter, torch.Tensor, str]] = {}
        self._snapshots: Dict[str, torch.Tensor] = {}
        self._warned: set = set()  # warnings about the set-up are given once per plugin

    # -- helpers (no before_/after_ prefix: Avalanche treats those names as callbacks) --------------------
    def plan(self, model: torch.nn.Module) -> ProtectionPlan:
        """Feature sources and protected parameters of ``model`` (see ``features``)."""
        if self.protect == "ssm":
            return ssm_plan(model, self.wb_features, self.exclude)
        return layer_plan(model, self.exclude)

    def configure(self, model: torch.nn.Module) -> None:
        """Validate names, set requires_grad per ``trainable``, warn about an unprotected classifier or a
        randomly initialised frozen backbone, and place the projectors next to their parameters."""
        plan = self.plan(model)
        params = dict(model.named_parameters())
        unknown = set(plan.params) - set(params)
        if unknown:
            raise ValueError(f"protected parameters not found in the model: {sorted(unknown)}")
        match_kinds([n for n, _ in model.named_modules()], self.exclude, "exclude", extra=("head",))
        if self.trainable is not None:
            # the paper's default names A_log, which e.g. Longhorn lacks; user-given names must all exist
            optional = PAPER_TRAINABLE if self.trainable == PAPER_TRAINABLE else ()
            train = match_kinds(list(params), self.trainable, "trainable", extra=("protected", "head") + optional)
            if "protected" in self.trainable:
                train |= set(plan.params)
            for name, p in params.items():
                p.requires_grad_(name in train)
            self._check_frozen_pretrained(model)
        self._check_unprotected(model)
        self._active = {}
        for name, (key, side) in plan.params.items():
            p, proj = params[name], self.engine.projectors.get(key)
            if proj is None and self.engine.projectors and p.requires_grad:
                # its module never ran forward (e.g. dt_proj applied through F.linear): no features, so freeze
                warnings.warn(f"{name} has no collected features and is frozen to keep old experiences intact",
                              NullSpaceWarning, stacklevel=2)
                p.requires_grad_(False)
            if proj is None or not p.requires_grad:
                continue
            width = p.shape[0] if side == "left" else p[0].numel()
            if width == proj.shape[0]:
                self._active[name] = (p, proj.to(device=p.device, dtype=p.dtype), side)
            else:
                self._warn_once(f"shape:{name}", f"{name} changed shape since its projector was built (width "
                                f"{width}, projector {proj.shape[0]}) and trains unprotected; add its module to "
                                f"exclude, or freeze it")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, NullSpaceWarning, stacklevel=3)

    def _check_unprotected(self, model: torch.nn.Module) -> None:
        """Warn about trainable parameters that ``exclude`` leaves unprotected outside calibrated heads."""
        calibrated = [f"{name}." if name else "" for name, m in model.named_modules() if is_calibrated_head(m)]
        exposed = [name for name, p in model.named_parameters()
                   if p.requires_grad and set(name.split(".")) & set(self.exclude)
                   and not any(name.startswith(prefix) for prefix in calibrated)]
        if exposed:
            self._warn_once("unprotected", (
                f"{_names(exposed)} train but are excluded from the null-space projection (exclude={self.exclude}) "
                f"and are not per-experience or prototype heads: a classifier shared by all experiences trains "
                f"unprotected and forgets old classes. Use ContinualClassifier(backbone, head='experience') (or "
                f"head='prototype'), or leave it out of trainable to freeze it"))

    def _check_frozen_pretrained(self, model: torch.nn.Module) -> None:
        """Warn when ``trainable`` freezes parameters of a model that was never loaded from a checkpoint."""
        if any(getattr(m, "pretrained_source", None) is not None for m in model.modules()):
            return
        sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
        frozen, total = sum(n for n, grad in sizes if not grad), sum(n for n, _ in sizes)
        if frozen:
            self._warn_once("random_init", (
                f"trainable={self.trainable} freezes {frozen} of {total} parameter values "
                f"({100 * frozen / total:.0f}%) of a model that was never loaded from a checkpoint (no module has "
                f"a pretrained_source attribute): they stay at their random initial values, while null-space "
                f"methods assume the frozen parts are pretrained. Load a checkpoint (mambacl's loaders set "
                f"pretrained_source), set model.pretrained_source = '<path>' if you loaded the weights yourself, "
                f"or pass trainable=None to train every parameter"))

    def collect_loader(self, strategy: SupervisedTemplate) -> DataLoader:
        """Loader over the current experience's training data with its eval transform, in a fixed order.

        Override to shard it across data-parallel ranks (then reduce the statistics with ``reduce_fn``).
        """
        dataset = strategy.experience.dataset.eval()
        batch = self.collect_mb_size or strategy.eval_mb_size or strategy.train_mb_size
        return DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=getattr(dataset, "collate_fn", None))

    def reduce_statistics(self, covariances: Dict[str, torch.Tensor], rows: Dict[str, int]) -> Statistics:
        """Combine one experience's covariance sums and row counts before decomposition (``reduce_fn``).

        Args:
            covariances: {feature key: [D, D] float64 sum of per-batch ``X^T X / rows``}, in sorted key order.
            rows: {feature key: number of feature rows}.

        Returns:
            The (covariances, rows) that join the running sums; the identity without ``reduce_fn``.
        """
        return (covariances, rows) if self.reduce_fn is None else self.reduce_fn(covariances, rows)

    def collect(self, strategy: SupervisedTemplate) -> None:
        """Add the current experience's feature covariances (:meth:`accumulate`), rebuild the projectors and
        record the selection in ``null_space_history`` (warning when it is degenerate)."""
        self.accumulate(strategy)
        self.engine.update_projectors()
        selected = {key: dict(info) for key, info in sorted(self.engine.selected.items())}
        self.null_space_history.append(selected)
        self.check_selection(selected)

    def check_selection(self, selected: Dict[str, Selected]) -> None:
        """Warn when every key keeps at least D-2 of its D directions null (the projection barely constrains
        the update) and when a strict projector has an empty null space (its parameters are frozen).

        Args:
            selected: {feature key: {"dim", "null", "rule", "projector", ...}} of one experience.
        """
        if selected and all(info["null"] >= info["dim"] - 2 for info in selected.values()):
            counts = Counter((info["rule"], info["null"], info["dim"]) for info in selected.values())
            spread = ", ".join(f"{n} x {null} of {dim} ({rule})" for (rule, null, dim), n in sorted(counts.items()))
            warnings.warn(
                f"degenerate null space after experience {self.experiences}: every protected key keeps at least "
                f"D-2 of its D directions as null space ({spread}), so the projection barely constrains the "
                f"updates (with the soft projector it is a near-uniform learning-rate cut). Use selection='auto' "
                f"or 'energy', or a backbone with at least 128 feature dimensions", NullSpaceWarning, stacklevel=2)
        closed = [key for key, info in selected.items() if info["projector"] == "strict" and info["null"] == 0]
        if closed:
            warnings.warn(
                f"empty null space after experience {self.experiences} for {_names(closed)} (strict projector): "
                f"every direction carries old features, so the parameters they protect can no longer change. "
                f"Choose a rule that leaves a null space (e.g. a lower threshold/auto_threshold) or "
                f"projector='soft'", NullSpaceWarning, stacklevel=2)

    @torch.no_grad()
    def accumulate(self, strategy: SupervisedTemplate) -> None:
        """Run the model (eval mode, no grad) over the current experience's training data with its eval
        transform and add the feature covariances, reduced by :meth:`reduce_statistics`, to the running sums."""
        model, plan = strategy.model, self.plan(strategy.model)
        fresh = NullSpaceEngine()
        handles = [module.register_forward_hook(hook) for module, hook in plan.aux]
        handles += [module.register_forward_hook(
            lambda m, args, out, key=key, rows=rows: _add_rows(fresh, key, rows(m, args, out)))
            for key, (module, rows) in plan.sources.items()]
        was_training = model.training
        model.eval()
        where = f"experience {self.experiences}"
        try:
            desc = f"null-space features, {where}"
            for batch, mb in enumerate(tqdm(self.collect_loader(strategy), desc=desc, disable=not self.progress,
                                            leave=False)):
                where = f"experience {self.experiences}, collection batch {batch}"
                avalanche_forward(model, mb[0].to(strategy.device), mb[-1].to(strategy.device))
            keys = sorted(fresh.covariances)
            covariances, rows = self.reduce_statistics({k: fresh.covariances[k] for k in keys},
                                                       {k: fresh.rows[k] for k in keys})
            where = f"experience {self.experiences}, reduced statistics"
            self.engine.merge({k: v.cpu() for k, v in covariances.items()}, rows)
        except NonFiniteFeaturesError as err:
            raise NonFiniteFeaturesError(
                f"null-space statistics of {where}: {err}. The model gives NaN/Inf on this experience's data "
                f"(diverged training? lower the learning rate or check the inputs); the running statistics are "
                f"unchanged") from err
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    def state_dict(self) -> dict:
        """Covariances, row counts, projectors, the number of finished experiences and the null-space history
        (picklable)."""
        return {"engine": self.engine.state_dict(), "experiences": self.experiences,
                "null_space_history": [{k: dict(v) for k, v in entry.items()} for entry in self.null_space_history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; training resumes with the next experience."""
        self.engine.load_state_dict(state["engine"])
        self.experiences = int(state["experiences"])
        if "null_space_history" not in state and self.experiences:
            warnings.warn(f"the checkpoint has no null_space_history: the sizes of experiences 0-"
                          f"{self.experiences - 1} are not recorded", NullSpaceWarning, stacklevel=2)
        self.null_space_history = [{k: dict(v) for k, v in entry.items()}
                                   for entry in state.get("null_space_history", [])]

    # -- Avalanche callbacks -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Configure trainable/projected parameters for the adapted model and reset the optimizer state."""
        self.configure(strategy.model)
        strategy.optimizer.state.clear()  # fresh moments: old ones are not in the new null space

    def before_update(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Snapshot the projected parameters before the optimizer step (none while gradients accumulate)."""
        if getattr(strategy, "accumulating_gradients", False):
            return
        self._snapshots = {name: p.detach().clone() for name, (p, _, _) in self._active.items()}

    @torch.no_grad()
    def after_update(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Replace each projected parameter's step by ``step @ P`` (``P @ step`` for A_log)."""
        if getattr(strategy, "accumulating_gradients", False):
            return
        for name, (p, proj, side) in self._active.items():
            old = self._snapshots[name]
            step = (p - old).reshape(p.shape[0], -1)
            step = proj @ step if side == "left" else step @ proj
            p.copy_(old + step.reshape(p.shape))
        self._snapshots = {}

    def after_training_exp(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Collect this experience's features and rebuild the projectors for the next one."""
        self.collect(strategy)
        self.experiences += 1
        self._active = {}
