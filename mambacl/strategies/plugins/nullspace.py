"""NullSpacePlugin: Mamba-CL (and Adam-NSCL) null-space projection of the optimizer's actual update."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mambacl.strategies.features import PAPER_TRAINABLE, ProtectionPlan, layer_plan, match_kinds, ssm_plan
from mambacl.strategies.nullspace import NullSpaceEngine, ProjectorKind, Selection

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

PROTECT = ("ssm", "layers")
Statistics = Tuple[Dict[str, torch.Tensor], Dict[str, int]]
ReduceFn = Callable[[Dict[str, torch.Tensor], Dict[str, int]], Statistics]


def _add_rows(engine: NullSpaceEngine, key: str, rows: Union[torch.Tensor, Tuple[torch.Tensor, int]]) -> None:
    features, count = rows if isinstance(rows, tuple) else (rows, None)
    engine.add(key, features, count)


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

    Args:
        protect: 'ssm' (Mamba-CL: SSM branch/mixer taps, see ``features.ssm_plan``) or 'layers' (Adam-NSCL:
            every Linear/Conv layer by its input).
        selection: null-space rule 'knee' | 'adam_nscl' | 'energy' | 'kernel' (see ``nullspace.null_space_size``).
        projector: 'soft' (``eta * P0/||P0||_F + (1 - eta) I``) or 'strict' (``P0``).
        eta: soft-projector weight.
        a: Adam-NSCL multiplier (``lambda <= a * lambda_min``).
        threshold: GPM energy threshold.
        tol: relative eigenvalue tolerance of the 'kernel' rule.
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

    def __init__(self, *, protect: str = "ssm", selection: Selection = "knee", projector: ProjectorKind = "soft",
                 eta: float = 0.95, a: float = 10.0, threshold: float = 0.97, tol: float = 1e-10,
                 wb_features: str = "aggregated", trainable: Optional[Sequence[str]] = PAPER_TRAINABLE,
                 exclude: Sequence[str] = ("head",), collect_mb_size: Optional[int] = None,
                 progress: bool = True, reduce_fn: Optional[ReduceFn] = None) -> None:
        super().__init__()
        if protect not in PROTECT:
            raise ValueError(f"protect must be one of {PROTECT}, got {protect!r}")
        if wb_features not in ("aggregated", "token"):
            raise ValueError(f"wb_features must be 'aggregated' or 'token', got {wb_features!r}")
        if collect_mb_size is not None and collect_mb_size < 1:
            raise ValueError(f"collect_mb_size must be a positive int, got {collect_mb_size}")
        for arg, value in (("trainable", trainable), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"{arg} must be a sequence of names, got the string {value!r}")
        self.engine = NullSpaceEngine(selection, projector, eta, a=a, threshold=threshold, tol=tol)
        self.protect, self.wb_features = protect, wb_features
        self.trainable = None if trainable is None else tuple(trainable)
        self.exclude = tuple(exclude)
        self.collect_mb_size, self.progress, self.reduce_fn = collect_mb_size, progress, reduce_fn
        self.experiences = 0
        self._active: Dict[str, Tuple[torch.nn.Parameter, torch.Tensor, str]] = {}
        self._snapshots: Dict[str, torch.Tensor] = {}

    # -- helpers (no before_/after_ prefix: Avalanche treats those names as callbacks) --------------------
    def plan(self, model: torch.nn.Module) -> ProtectionPlan:
        """Feature sources and protected parameters of ``model`` (see ``features``)."""
        if self.protect == "ssm":
            return ssm_plan(model, self.wb_features, self.exclude)
        return layer_plan(model, self.exclude)

    def configure(self, model: torch.nn.Module) -> None:
        """Validate names, set requires_grad per ``trainable`` and place the projectors next to their parameters."""
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
        self._active = {}
        for name, (key, side) in plan.params.items():
            p, proj = params[name], self.engine.projectors.get(key)
            if proj is None and self.engine.projectors and p.requires_grad:
                # its module never ran forward (e.g. dt_proj applied through F.linear): no features, so freeze
                warnings.warn(f"{name} has no collected features and is frozen to keep old experiences intact")
                p.requires_grad_(False)
            if proj is None or not p.requires_grad:
                continue
            width = p.shape[0] if side == "left" else p[0].numel()
            if width == proj.shape[0]:  # heads that changed shape are skipped
                self._active[name] = (p, proj.to(device=p.device, dtype=p.dtype), side)

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
        """Add the current experience's feature covariances (:meth:`accumulate`) and rebuild the projectors."""
        self.accumulate(strategy)
        self.engine.update_projectors()

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
        try:
            desc = f"null-space features, experience {self.experiences}"
            for mb in tqdm(self.collect_loader(strategy), desc=desc, disable=not self.progress, leave=False):
                avalanche_forward(model, mb[0].to(strategy.device), mb[-1].to(strategy.device))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        keys = sorted(fresh.covariances)
        covariances, rows = self.reduce_statistics({k: fresh.covariances[k] for k in keys},
                                                   {k: fresh.rows[k] for k in keys})
        for key, cov in covariances.items():
            self.engine.add_covariance(key, cov.cpu(), rows[key])

    def state_dict(self) -> dict:
        """Covariances, row counts, projectors and the number of finished experiences (picklable)."""
        return {"engine": self.engine.state_dict(), "experiences": self.experiences}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; training resumes with the next experience."""
        self.engine.load_state_dict(state["engine"])
        self.experiences = int(state["experiences"])

    # -- Avalanche callbacks -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Configure trainable/projected parameters for the adapted model and reset the optimizer state."""
        self.configure(strategy.model)
        strategy.optimizer.state.clear()  # fresh moments: old ones are not in the new null space

    def before_update(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Snapshot the projected parameters before the optimizer step."""
        self._snapshots = {name: p.detach().clone() for name, (p, _, _) in self._active.items()}

    @torch.no_grad()
    def after_update(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Replace each projected parameter's step by ``step @ P`` (``P @ step`` for A_log)."""
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
