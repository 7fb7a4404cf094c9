"""Continual classification heads and a backbone+head wrapper.

- :class:`ExperienceHeads`: Mamba-CL's per-experience linear heads, concatenated at test time.
- :class:`PrototypeHead`: cosine nearest-class-mean classifier (SimpleCIL, Zhou et al. 2023).
- :class:`RanPACHead`: random projection + ridge regression on the class targets (RanPAC, McDonnell et al.,
  NeurIPS 2023).

The last two are :class:`FittedHead` s: their class statistics come from the training data of each experience
and are computed by :class:`~mambacl.strategies.plugins.PrototypePlugin` after the experience is trained.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.models import DynamicModule, IncrementalClassifier
from torch import nn

from mambacl.strategies.nullspace import NonFiniteFeaturesError

from mambacl.strategies.class_stats import add_class_sums

HEADS = ("experience", "incremental", "prototype", "ranpac")
RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))  # RanPAC's lambda grid (RanPAC.py: 10**np.arange(-8, 9))


class ExperienceHeads(DynamicModule):
    """One Linear head per experience (Mamba-CL), concatenated over all seen classes at test time.

    Training adaptation adds a head for the experience's new classes. In training mode only the newest
    head is computed and every other class is filled with ``mask_value``, so cross-entropy on global labels
    equals cross-entropy on the experience's local labels and old heads get no gradient (not even weight
    decay). In eval mode all heads are concatenated; the output is always indexed by global class id, with
    classes not covered by a head (e.g. future classes seen only in evaluation) masked.

    Args:
        in_features: feature width.
        mask_value: logit given to masked classes.

    Example:
        >>> heads = ExperienceHeads(32)   # adapted by Avalanche's model_adaptation
    """

    # NullSpacePlugin's contract for heads that need no null-space protection (old heads never train again)
    calibrated_across_experiences = True

    def __init__(self, in_features: int, mask_value: float = -1000.0) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features, self.mask_value = in_features, mask_value
        self.heads = nn.ModuleList()
        self.head_classes: List[List[int]] = []
        self.num_classes = 0

    @property
    def _adaptation_device(self) -> torch.device:
        return next(iter(self.heads.parameters()), torch.zeros(())).device

    @torch.no_grad()
    def adaptation(self, experience: CLExperience) -> None:
        """Widen the output to the experience's classes; in training mode add a head for its new classes."""
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        self.num_classes = max(self.num_classes, classes[-1] + 1)
        seen = {c for head in self.head_classes for c in head}
        new = [c for c in classes if c not in seen]
        if self.training and new:
            self.heads.append(nn.Linear(self.in_features, len(new)).to(self._adaptation_device))
            self.head_classes.append(new)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, in_features]. Returns: logits [b, num_classes] indexed by global class id."""
        if not self.heads:
            raise RuntimeError("ExperienceHeads has no head yet: adapt it to an experience before training")
        out = x.new_full((x.shape[0], self.num_classes), self.mask_value)
        active = range(len(self.heads) - 1, len(self.heads)) if self.training else range(len(self.heads))
        for i in active:
            out[:, self.head_classes[i]] = self.heads[i](x).to(out.dtype)  # autocast: heads may run in bf16
        return out


class FittedHead(DynamicModule):
    """Base of heads whose class statistics are fitted from each experience's training features.

    Training mode: with ``train_heads`` the output is that of per-experience linear heads
    (:class:`ExperienceHeads`: cross-entropy on the experience's classes, old heads untouched), which gives the
    trainable backbone parameters a loss; without, there is nothing to train (frozen-backbone baselines: train
    with ``train_epochs=0``). Eval mode: :meth:`class_scores` for every fitted class, ``mask_value`` for the
    others; the linear heads are not used.

    After each training experience, whoever trains calls :meth:`fit_experience` with the features (this head's
    input, eval transform, updated model, no grad) of the experience's training data:
    :class:`~mambacl.strategies.plugins.PrototypePlugin` does it for any Avalanche template and marks the head
    ``fitter_attached``. Evaluating a head with trained but unfitted classes and no fitter attached raises a
    RuntimeError (the plugin is missing); with a fitter attached, classes of the experience being trained are
    masked until it ends (e.g. in periodic evaluation). The statistics are buffers, so the model's state_dict
    holds them; loading resizes them to the saved number of classes.

    Args:
        in_features: feature width D.
        train_heads: train per-experience linear heads in training mode.
        mask_value: logit of masked classes.
    """

    # NullSpacePlugin's contract: every class is scored by one rule, so the head needs no protection
    calibrated_across_experiences = True
    # its statistics are fitted from the same data on every rank: DDP need not broadcast them at every step
    ddp_ignore_buffers = True

    class_dims: Dict[str, int] = {"fitted": 0}  # buffer name -> its class dimension (grown by adaptation)

    def __init__(self, in_features: int, *, train_heads: bool = True, mask_value: float = -1000.0) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features, self.mask_value = in_features, mask_value
        self.linear = ExperienceHeads(in_features, mask_value) if train_heads else None
        self.num_classes = 0
        self.trained_classes: List[int] = []
        self.fitter_attached = False
        self.register_buffer("fitted", torch.zeros(0, dtype=torch.bool))

    @property
    def _adaptation_device(self) -> torch.device:
        return self.fitted.device

    @torch.no_grad()
    def adaptation(self, experience: CLExperience) -> None:
        """Widen the output to the experience's classes; in training mode record them as trained."""
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        self.num_classes = max(self.num_classes, classes[-1] + 1)
        if self.training:
            self.trained_classes = sorted(set(self.trained_classes) | set(classes))
        for name, dim in self.class_dims.items():
            buffer = getattr(self, name)
            missing = self.num_classes - buffer.shape[dim]
            if missing > 0:
                pad = list(buffer.shape)
                pad[dim] = missing
                setattr(self, name, torch.cat([buffer, buffer.new_zeros(pad)], dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in self.class_dims:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.num_classes = max(self.num_classes, self.fitted.numel())

    @torch.no_grad()
    def fit_experience(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one experience's training features to the class statistics.

        Args:
            features: [n, in_features] this head's inputs. labels: [n] class ids, adapted classes only.
        """
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must be [n, {self.in_features}], got {list(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [{features.shape[0]}], got {list(labels.shape)}")
        if len(labels) == 0:
            raise ValueError("fit_experience needs at least one training sample")
        if not torch.isfinite(features).all():
            raise NonFiniteFeaturesError(f"{type(self).__name__}.fit_experience: the features hold NaN/inf values; "
                                         "nothing is added to the class statistics")
        labels = labels.to(self.fitted.device, torch.long)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be adapted class ids in [0, {self.num_classes}); got "
                             f"{labels.min().item()}..{labels.max().item()} (adapt the model to the experience first)")
        self._fit(features.to(self.fitted.device), labels)
        self.fitted[labels.unique()] = True

    def _fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def class_scores(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Scores [b, k] of ``classes`` [k] (fitted) for features x [b, in_features]."""
        raise NotImplementedError

    def check_fitted(self) -> None:
        """RuntimeError if trained classes lack statistics and nothing will fit them (no PrototypePlugin)."""
        fitted = set(self.fitted.nonzero().flatten().tolist())
        missing = [c for c in self.trained_classes if c not in fitted]
        if missing and not self.fitter_attached:
            raise RuntimeError(
                f"{type(self).__name__} was trained on classes {missing[:8]}{'...' if len(missing) > 8 else ''} "
                "but never given their class statistics, which are computed after each training experience: add "
                "mambacl.strategies.plugins.PrototypePlugin() to the strategy's plugins (MambaCL and PretrainedCIL "
                "add it themselves)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, in_features]. Returns: logits [b, num_classes] indexed by global class id."""
        if self.training:
            if self.linear is None:
                raise RuntimeError(f"{type(self).__name__}(train_heads=False) has nothing to train: train with "
                                   "train_epochs=0 (PretrainedCIL) and let PrototypePlugin fit it")
            return self.linear(x)
        self.check_fitted()
        out = x.new_full((x.shape[0], self.num_classes), self.mask_value)
        classes = self.fitted.nonzero().flatten()
        if classes.numel():
            out[:, classes] = self.class_scores(x, classes).to(out.dtype)
        return out


class PrototypeHead(FittedHead):
    """Cosine nearest-class-mean classifier over all seen classes (SimpleCIL, Zhou et al. 2023).

    The class means are running float64 means of the features of every class's training samples, computed
    after each experience with the updated model and the eval transform (see :class:`FittedHead`); no
    exemplar is stored, and all classes are scored by the same rule, so they are calibrated across
    experiences by construction. Eval logits are ``scale * cos(x, mean_c)`` (SimpleCIL's scale is 1).

    Args:
        in_features: feature width D. scale: cosine logit scale.
        train_heads, mask_value: see :class:`FittedHead`.

    Example:
        >>> head = PrototypeHead(32)   # fitted by PrototypePlugin after each experience
    """

    class_dims = {"fitted": 0, "sums": 0, "counts": 0}

    def __init__(self, in_features: int, *, scale: float = 1.0, train_heads: bool = True,
                 mask_value: float = -1000.0) -> None:
        super().__init__(in_features, train_heads=train_heads, mask_value=mask_value)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        self.register_buffer("sums", torch.zeros(0, in_features, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    @property
    def means(self) -> torch.Tensor:
        """[num_classes, D] float64 class means (zero rows for unfitted classes)."""
        return self.sums / self.counts.clamp(min=1).unsqueeze(1)

    def _fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        add_class_sums(sums, counts, features, labels)
        for key, total in sums.items():
            self.sums[int(key)] += total
            self.counts[int(key)] += counts[key]

    def class_scores(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        means = F.normalize(self.means[classes].to(x.dtype), dim=1)
        return self.scale * F.normalize(x, dim=1) @ means.T


def ridge_split(n: int, val_fraction: float, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """RanPAC's validation split of one experience: a random permutation, the first ``int(n * (1 -
    val_fraction))`` rows fit and the rest validate (RanPAC.py uses the first 80% of a shuffled loader).

    Returns:
        (fit indices, validation indices); a ValueError when either part would be empty.
    """
    perm = torch.randperm(n, generator=generator)
    n_fit = int(n * (1 - val_fraction))
    if n_fit < 1 or n_fit >= n:
        raise ValueError(f"choosing RanPAC's ridge lambda splits the experience's {n} training samples with "
                         f"val_fraction={val_fraction} into {n_fit} to fit and {n - n_fit} to validate; both "
                         "must be >= 1 (give more samples, or a single-value ridge_grid)")
    return perm[:n_fit], perm[n_fit:]


def select_ridge(h: torch.Tensor, y: torch.Tensor, grid: Sequence[float], fit: torch.Tensor,
                 val: torch.Tensor) -> float:
    """The grid value with the least validation MSE of ridge regression fitted on the ``fit`` rows (RanPAC).

    For each lambda, ``W = (H_f^T H_f + lambda I)^-1 H_f^T Y_f`` and the loss is ``mean((H_v W - Y_v)^2)``;
    all are evaluated through one thin SVD ``H_f = U S V^T`` (``W = V diag(s / (s^2 + lambda)) U^T Y_f``),
    exact for lambda > 0. Ties go to the smaller lambda, as ``np.argmin`` does.

    Args:
        h: [n, M] float64 projected features. y: [n, C] float64 one-hot targets.
        grid: candidate lambdas (> 0). fit, val: row indices.
    Returns:
        the chosen lambda.
    """
    u, s, vh = torch.linalg.svd(h[fit], full_matrices=False)
    uy = u.T @ y[fit]                  # [k, C]
    hv = h[val] @ vh.T                 # [n_val, k]
    losses = [float(((hv * (s / (s * s + lam))) @ uy - y[val]).pow(2).mean()) for lam in grid]
    return float(grid[min(range(len(grid)), key=losses.__getitem__)])


class RanPACHead(FittedHead):
    """Random projection + ridge-regression class prototypes (RanPAC, McDonnell et al., NeurIPS 2023).

    Features f are projected to ``h = ReLU(f @ W_rand)`` (``W_rand`` [D, M] standard Gaussian, fixed by
    ``seed``). Over all seen training data the head keeps ``G = sum h h^T`` [M, M] and ``C = sum h y^T``
    [M, classes] (y one-hot) in float64, and after each experience solves ``W = (G + lambda I)^-1 C``. lambda
    is chosen as in the authors' code (RanPAC.py, ``optimise_ridge_parameter``): from ``ridge_grid`` by the
    validation MSE on the one-hot targets of a ridge fit on 80% of the current experience's data (its own G
    and C only), the other 20% validating; the split of the k-th fit (k = 0, 1, ...) is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + k))``. Eval logits are ``h W``.
    The paper's optional first-session adaptation of the backbone (PETL) is not part of the head.

    Memory: G takes 8 M^2 bytes (800 MB at the paper's M = 10000) in the state_dict and in checkpoints.

    Args:
        in_features: feature width D.
        num_projections: M (the paper uses 10000).
        ridge_grid: lambda candidates (> 0); a single value skips the selection.
        val_fraction: share of the experience's samples that validates lambda (the authors': 0.2).
        seed: seed of ``W_rand`` and of the validation splits.
        train_heads, mask_value: see :class:`FittedHead`.

    Example:
        >>> head = RanPACHead(32, num_projections=256)   # fitted by PrototypePlugin after each experience
    """

    class_dims = {"fitted": 0, "cross": 1, "weight": 1}

    def __init__(self, in_features: int, *, num_projections: int = 10000, ridge_grid: Sequence[float] = RIDGE_GRID,
                 val_fraction: float = 0.2, seed: int = 0, train_heads: bool = True,
                 mask_value: float = -1000.0) -> None:
        super().__init__(in_features, train_heads=train_heads, mask_value=mask_value)
        if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
            raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
        grid = tuple(ridge_grid) if isinstance(ridge_grid, (list, tuple)) else None
        if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                                for v in grid):
            raise ValueError(f"ridge_grid must be a non-empty list of positive finite lambdas, got {ridge_grid!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.num_projections, self.ridge_grid = num_projections, tuple(float(v) for v in grid)
        self.val_fraction, self.seed = float(val_fraction), seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(in_features, num_projections, generator=gen))
        self.register_buffer("gram", torch.zeros(num_projections, num_projections, dtype=torch.float64))
        self.register_buffer("cross", torch.zeros(num_projections, 0, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(num_projections, 0))
        self.register_buffer("ridge", torch.zeros((), dtype=torch.float64))
        self.register_buffer("fits", torch.zeros((), dtype=torch.long))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """h = ReLU(x @ W_rand): [b, D] -> [b, M] in x's dtype."""
        return torch.relu(x @ self.projection.to(x.dtype))

    def _fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        h = self.project(features.double())
        y = F.one_hot(labels, self.num_classes).double()
        lam = self.ridge_grid[0]
        if len(self.ridge_grid) > 1:  # chosen on this experience's data alone, before any statistic changes
            gen = torch.Generator().manual_seed(self.seed + int(self.fits))
            fit, val = ridge_split(len(h), self.val_fraction, gen)
            lam = select_ridge(h, y, self.ridge_grid, fit.to(h.device), val.to(h.device))
        gram, cross = self.gram + h.T @ h, self.cross + h.T @ y
        eye = torch.eye(self.num_projections, dtype=torch.float64, device=h.device)
        self.weight = torch.linalg.solve(gram + lam * eye, cross).to(self.weight.dtype)
        self.gram, self.cross = gram, cross
        self.ridge.fill_(lam)
        self.fits += 1

    def class_scores(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.project(x) @ self.weight[:, classes].to(x.dtype)


def fitted_heads(model: nn.Module) -> List[FittedHead]:
    """The :class:`FittedHead` modules of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, FittedHead)]


class ContinualClassifier(nn.Module):
    """A timm-style backbone (``forward_features`` + ``forward_head(pre_logits=True)``) with a continual head.

    Args:
        backbone: model with ``num_features``, ``forward_features``, ``forward_head`` (its own classifier is
            removed with ``reset_classifier(0)`` when available).
        head: 'experience' (:class:`ExperienceHeads`, Mamba-CL), 'incremental' (Avalanche's
            ``IncrementalClassifier``), 'prototype' (:class:`PrototypeHead`) or 'ranpac' (:class:`RanPACHead`);
            the last two need :class:`~mambacl.strategies.plugins.PrototypePlugin` (MambaCL and PretrainedCIL
            add it).
        **head_kwargs: passed to the head's constructor after the feature width (e.g. ``train_heads=False``,
            ``num_projections=2000``).

    Example:
        >>> model = ContinualClassifier(timm.create_model("test_vim"), head="prototype")  # doctest: +SKIP
    """

    def __init__(self, backbone: nn.Module, head: str = "experience", **head_kwargs) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        for attr in ("num_features", "forward_features", "forward_head"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone must be timm-style with {attr!r}; got {type(backbone).__name__}")
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        head_cls = {"experience": ExperienceHeads, "incremental": IncrementalClassifier,
                    "prototype": PrototypeHead, "ranpac": RanPACHead}[head]
        self.head = head_cls(int(backbone.num_features), **head_kwargs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, C, H, W] images. Returns: [b, num_features] pre-logits features (the head's input)."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [b, C, H, W] images. Returns: [b, num_classes] logits."""
        return self.head(self.features(x))
