"""Framework-independent null-space engine: feature covariances, null-space selection rules and projectors.

Follows the Mamba-CL code (mambacl.md sections 3-4): every batch adds ``X^T X / rows`` (uncentred, float64) to
a running sum that is never recomputed for old experiences; at each boundary the sum is eigen-decomposed, a
null space is selected (knee rule, Adam-NSCL ``lambda <= a * lambda_min``, GPM energy threshold, or the exact
numerical kernel) and turned into a projector, soft ``eta * P0 / ||P0||_F + (1 - eta) * I`` or strict ``P0``.
The default rule 'auto' picks per feature width: the knee rule degenerates below about 128 dimensions (it keeps
D-1 of D directions null, so the soft projector is a near-uniform learning-rate cut), so narrower features get
the energy rule with a strict projector (:func:`auto_rule`). No Avalanche import here.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

Selection = Literal["auto", "knee", "adam_nscl", "energy", "kernel"]
Rule = Literal["knee", "adam_nscl", "energy", "kernel"]
ProjectorKind = Literal["soft", "strict"]
RULES = ("knee", "adam_nscl", "energy", "kernel")
SELECTIONS = ("auto",) + RULES
PROJECTORS = ("soft", "strict")
EIGH_JITTERS = (1e-12, 1e-10, 1e-8)  # relative to the largest diagonal entry; tried when eigh fails
# per key and experience: {"dim": D, "null": k, "rule": Rule, "projector": ProjectorKind, "solver": str}
Selected = Dict[str, Any]


class NonFiniteFeaturesError(ValueError):
    """NaN or Inf in the features (or a covariance) of a null-space key; nothing of that batch was added."""


def check_real(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False) -> float:
    """``value`` as a float, or a TypeError (not a real number, or a bool) / ValueError (NaN or out of range).

    Args:
        name: argument name used in the messages.
        low, high: bounds of the interval; ``low_open`` / ``high_open`` exclude them.

    Returns:
        float(value).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open or math.isinf(high) else number <= high
    if not (above and below):  # NaN fails both
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_count(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``; else a TypeError (not an int, or a bool) or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def auto_rule(dim: int, projector: ProjectorKind = "soft", min_dim: int = 128) -> Tuple[Rule, ProjectorKind]:
    """The (rule, projector) that ``selection='auto'`` uses for a feature of width ``dim``.

    Args:
        dim: feature width D.
        projector: the configured projector, used with the knee rule.
        min_dim: narrowest width given the knee rule.

    Returns:
        ``('knee', projector)`` if ``dim >= min_dim``, else ``('energy', 'strict')``.
    """
    return ("knee", projector) if dim >= min_dim else ("energy", "strict")


def descending_eigh(cov: torch.Tensor,
                    jitters: Sequence[float] = EIGH_JITTERS) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """Eigen-decomposition of a symmetric PSD matrix in float64, sorted descending, that does not crash.

    ``torch.linalg.eigh`` fails to converge on some rank-deficient covariances (many exactly repeated zero
    eigenvalues, e.g. the im2col inputs of a CNN layer with dead ReLU channels). It is then retried on
    ``cov + j * max(diag) * I`` for each relative jitter ``j`` (the shift is subtracted from the eigenvalues;
    the eigenvectors are those of ``cov``), and finally replaced by the SVD (for a PSD matrix the singular
    values are the eigenvalues and the right singular vectors the eigenvectors).

    Args:
        cov: [D, D] symmetric PSD matrix (any float dtype, any device; computed on the CPU).
        jitters: relative shifts tried in order after a plain eigh fails.

    Returns:
        (eigvals [D] descending, eigvecs [D, D] with matching columns, solver) where solver is 'eigh',
        'eigh+jitter=<j>' or 'svd'.
    """
    cov = cov.detach().cpu().to(torch.float64)
    scale = float(cov.diagonal().abs().max()) if cov.numel() else 0.0
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    for jitter in (0.0, *jitters):
        shift = jitter * scale
        try:
            eigvals, eigvecs = torch.linalg.eigh(cov + shift * eye if shift else cov)
        except torch.linalg.LinAlgError:
            continue
        solver = "eigh" if not shift else f"eigh+jitter={jitter:g}"
        return (eigvals - shift).flip(0), eigvecs.flip(1), solver
    _, singular, vh = torch.linalg.svd(cov)
    return singular, vh.T, "svd"


def knee_index(values: torch.Tensor, sigma: float = 10.0, margin: float = 0.015, min_smooth: int = 128) -> int:
    """Knee of a descending spectrum, as in the Mamba-CL code (``adaptive_threshold`` in train_eval.py).

    For ``D >= min_smooth`` values the spectrum is smoothed with a Gaussian of width ``sigma`` and
    ``int(D * margin)`` indices are ignored at each end of its second difference; shorter spectra use the raw
    second difference. The knee is the index after the argmax of the second difference. Deviation: a spectrum
    without any convex bend (flat or concave) has no knee and gives ``D`` (empty null space), where the
    authors' code keeps at least one null direction.

    Args:
        values: [D] singular values (or covariance eigenvalues), sorted descending.
        sigma: Gaussian smoothing width in indices.
        margin: fraction of indices ignored at each end of the smoothed second difference.
        min_smooth: shortest spectrum that is smoothed.

    Returns:
        k0 in [1, D]: indices ``k0, ..., D-1`` are the null directions.
    """
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-D spectrum, got shape {tuple(values.shape)}")
    n = values.numel()
    if n < 3:
        return n
    points = values.detach().double().cpu().numpy()
    smooth = gaussian_filter1d(points, sigma=sigma) if n >= min_smooth else points
    second = np.diff(smooth, n=2)  # second[i] = f[i] - 2 f[i+1] + f[i+2], centred on index i + 1
    skip = int(n * margin) if n >= min_smooth else 0
    if second.size <= 2 * skip:
        raise ValueError(f"margin must leave part of the spectrum, got {margin} for {n} values")
    window = second[skip:second.size - skip]
    best = int(np.argmax(window))
    if window[best] <= 1e-12 * float(np.abs(smooth).max()):
        return n
    return best + skip + 1


def null_space_size(eigvals: torch.Tensor, selection: Rule = "knee", *, a: float = 10.0,
                    threshold: float = 0.97, tol: float = 1e-10, sigma: float = 10.0) -> int:
    """Number k of null directions (the k smallest eigenvalues) chosen by a selection rule.

    Eigenvalues below the numerical floor ``D * eps * lambda_max`` count as zero: a rank-deficient covariance
    has its zero eigenvalues as rounding noise of either sign, so Adam-NSCL's ``lambda_min`` is 0 and its null
    space is the whole numerical kernel (not the part that happened to round below zero).

    Args:
        eigvals: [D] eigenvalues of a PSD covariance, sorted descending.
        selection: 'knee' (Mamba-CL), 'adam_nscl' (``lambda <= a * lambda_min``), 'energy' (GPM: keep the
            fewest leading directions holding ``threshold`` of the total energy, the rest is null) or 'kernel'
            (``lambda <= tol * lambda_max``, the numerical kernel). 'auto' is resolved per width by
            :func:`auto_rule` first.
        a: Adam-NSCL multiplier.
        threshold: GPM energy fraction in (0, 1].
        tol: relative tolerance of the 'kernel' rule.
        sigma: smoothing width of the knee rule.

    Returns:
        k in [0, D].
    """
    lam = eigvals.double().clamp_min(0.0)
    n = lam.numel()
    if n:
        lam = torch.where(lam > n * torch.finfo(lam.dtype).eps * lam.max(), lam, torch.zeros_like(lam))
    if selection == "knee":
        return n - knee_index(lam, sigma=sigma)
    if selection == "adam_nscl":
        return int((lam <= a * lam[-1]).sum())
    if selection == "energy":
        total = lam.sum()
        if total == 0:
            return n
        kept = int(torch.searchsorted(torch.cumsum(lam, 0) / total, torch.tensor(threshold, dtype=lam.dtype)))
        return n - min(kept + 1, n)
    if selection == "kernel":
        return int((lam <= tol * lam[0]).sum())
    raise ValueError(f"selection must be one of {RULES} here ('auto' is resolved per width by auto_rule), "
                     f"got {selection!r}")


def build_projector(null_basis: torch.Tensor, kind: ProjectorKind = "soft", eta: float = 0.95) -> torch.Tensor:
    """Projector onto (or leaning towards) the span of the null basis.

    Args:
        null_basis: [D, k] orthonormal columns spanning the null space (k may be 0).
        kind: 'strict' gives ``P0 = V V^T``; 'soft' gives ``eta * P0 / ||P0||_F + (1 - eta) * I`` with
            ``||P0||_F = sqrt(k)`` (``(1 - eta) * I`` when k = 0).
        eta: soft-projector weight in [0, 1].

    Returns:
        [D, D] symmetric projector in the dtype of ``null_basis``.
    """
    if kind not in PROJECTORS:
        raise ValueError(f"kind must be one of {PROJECTORS}, got {kind!r}")
    p0 = null_basis @ null_basis.T
    p0 = (p0 + p0.T) / 2  # exactly symmetric despite rounding
    if kind == "strict":
        return p0
    k = null_basis.shape[1]
    eye = torch.eye(null_basis.shape[0], dtype=null_basis.dtype, device=null_basis.device)
    scaled = p0 / math.sqrt(k) if k > 0 else p0
    return eta * scaled + (1.0 - eta) * eye


class NullSpaceEngine:
    """Running float64 covariances per feature key, and the projectors derived from them.

    Args:
        selection: 'auto' or a null-space rule of :func:`null_space_size`. 'auto' resolves per key by its width
            D (:func:`auto_rule`): the knee rule with ``projector`` if ``D >= auto_min_dim``, else the energy rule
            at ``auto_threshold`` with a strict projector.
        projector: 'soft' or 'strict', see :func:`build_projector`.
        eta: soft-projector weight in [0, 1].
        a: Adam-NSCL multiplier (>= 1) for ``selection='adam_nscl'``.
        threshold: energy fraction in (0, 1] for ``selection='energy'``.
        tol: relative eigenvalue tolerance (>= 0) for ``selection='kernel'``.
        auto_min_dim: narrowest feature width that 'auto' gives the knee rule.
        auto_threshold: energy fraction in (0, 1] that 'auto' uses below ``auto_min_dim``.

    Attributes:
        covariances: {key: [D, D] float64 running sum of ``X^T X / rows``}.
        rows: {key: number of feature rows added}.
        projectors: {key: [D, D] float64 projector} of the last :meth:`update_projectors`.
        selected: {key: {"dim": D, "null": k, "rule": rule, "projector": kind, "solver": solver}} of the last
            :meth:`update_projectors` (solver: see :func:`descending_eigh`).

    Example:
        >>> eng = NullSpaceEngine(selection="kernel", projector="strict")
        >>> eng.add("x", torch.randn(5, 8))
        >>> P = eng.update_projectors()["x"]   # [8, 8], projects onto the 3-dim kernel
        >>> eng.selected["x"]["null"]
        3
    """

    def __init__(self, selection: Selection = "auto", projector: ProjectorKind = "soft", eta: float = 0.95,
                 a: float = 10.0, threshold: float = 0.97, tol: float = 1e-10, auto_min_dim: int = 128,
                 auto_threshold: float = 0.99) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        self.selection, self.projector = selection, projector
        self.eta = check_real("eta", eta, 0.0, 1.0)
        self.a = check_real("a", a, 1.0)
        self.threshold = check_real("threshold", threshold, 0.0, 1.0, low_open=True)
        self.tol = check_real("tol", tol, 0.0)
        self.auto_min_dim = check_count("auto_min_dim", auto_min_dim, 1)
        self.auto_threshold = check_real("auto_threshold", auto_threshold, 0.0, 1.0, low_open=True)
        self.covariances: Dict[str, torch.Tensor] = {}
        self.rows: Dict[str, int] = {}
        self.projectors: Dict[str, torch.Tensor] = {}
        self.selected: Dict[str, Selected] = {}

    @property
    def null_dims(self) -> Dict[str, int]:
        """{key: number of null directions} of the last :meth:`update_projectors`."""
        return {key: info["null"] for key, info in self.selected.items()}

    def rule_for(self, dim: int) -> Tuple[Rule, ProjectorKind]:
        """The (rule, projector kind) used for a key of width ``dim``."""
        if self.selection == "auto":
            return auto_rule(dim, self.projector, self.auto_min_dim)
        return self.selection, self.projector

    def add(self, key: str, features: torch.Tensor, rows: Optional[int] = None) -> None:
        """Add ``X^T X / rows`` of one batch of feature rows to the covariance of ``key``.

        Args:
            key: feature name.
            features: [r, D] (or [..., D], flattened to rows) feature rows, any float dtype and device.
            rows: number of feature rows the batch stands for (default r); differs from r when ``features``
                is a compressed factor with the same ``X^T X`` (see ``features.delta_x_rows``).

        Raises:
            NonFiniteFeaturesError: the batch has NaN/Inf entries (nothing is added).
        """
        if features.ndim < 2:
            raise ValueError(f"features for {key!r} must have shape [rows, D], got {tuple(features.shape)}")
        x = features.detach().reshape(-1, features.shape[-1]).to(torch.float64)
        if x.shape[0] == 0:
            return
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise NonFiniteFeaturesError(f"features for {key!r} have {bad} NaN/Inf entries of {x.numel()}; "
                                         f"the batch was not added")
        rows = x.shape[0] if rows is None else check_count("rows", rows, 1)
        self.add_covariance(key, x.T @ x / rows, rows)

    def add_covariance(self, key: str, cov: torch.Tensor, rows: int) -> None:
        """Add an already-formed [D, D] covariance of ``rows`` feature rows to ``key`` (kept on its device).

        Args:
            key: feature name.
            cov: [D, D] covariance, cast to float64.
            rows: number of feature rows it summarises (>= 1).
        """
        self.merge({key: cov}, {key: rows})

    def merge(self, covariances: Dict[str, torch.Tensor], rows: Dict[str, int]) -> None:
        """Add several keys' covariances at once: all of them are checked before any is added.

        Args:
            covariances: {key: [D, D] covariance sum}, cast to float64.
            rows: {key: number of feature rows it summarises (>= 1)}, the same keys.
        """
        if set(rows) != set(covariances):
            raise ValueError(f"rows must have the keys of covariances, got {sorted(rows)} for {sorted(covariances)}")
        for key, cov in covariances.items():
            if not isinstance(cov, torch.Tensor):
                raise TypeError(f"cov for {key!r} must be a torch.Tensor, got {type(cov).__name__}")
            if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
                raise ValueError(f"cov for {key!r} must be a square [D, D] matrix, got {tuple(cov.shape)}")
            check_count("rows", rows[key], 1)
            if key in self.covariances and self.covariances[key].shape != cov.shape:
                raise ValueError(f"features for {key!r} have width {cov.shape[0]}, "
                                 f"expected {self.covariances[key].shape[0]}")
            if not torch.isfinite(cov).all():
                raise NonFiniteFeaturesError(f"cov for {key!r} has NaN/Inf entries; nothing was added")
        for key, cov in covariances.items():
            cov = cov.to(torch.float64)
            if key in self.covariances:
                self.covariances[key] += cov.to(self.covariances[key].device)
            else:
                self.covariances[key] = cov.clone()
            self.rows[key] = self.rows.get(key, 0) + int(rows[key])

    def select(self, key: str) -> Tuple[torch.Tensor, Selected]:
        """Null space of ``key``'s covariance under its rule.

        Returns:
            (basis [D, k] orthonormal float64 columns on the CPU, {"dim", "null", "rule", "projector", "solver"}).
        """
        cov = self.covariances[key]
        if not torch.isfinite(cov).all():
            raise NonFiniteFeaturesError(f"covariance of {key!r} has non-finite entries (NaN/Inf features)")
        try:
            eigvals, eigvecs, solver = descending_eigh(cov)
        except torch.linalg.LinAlgError as err:
            raise torch.linalg.LinAlgError(f"covariance of {key!r}: eigh (with jitter) and the SVD all failed: "
                                           f"{err}") from err
        dim = cov.shape[0]
        rule, projector = self.rule_for(dim)
        threshold = self.auto_threshold if self.selection == "auto" else self.threshold
        k = null_space_size(eigvals, rule, a=self.a, threshold=threshold, tol=self.tol)
        return eigvecs[:, dim - k:], {"dim": dim, "null": k, "rule": rule, "projector": projector, "solver": solver}

    def update_projectors(self, keys: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Re-decompose the covariances (all, or ``keys``) and rebuild their float64 projectors and ``selected``.

        Returns:
            {key: [D, D] float64 projector on the CPU}.
        """
        keys = list(self.covariances if keys is None else keys)
        unknown = [k for k in keys if k not in self.covariances]
        if unknown:
            raise ValueError(f"keys {unknown} have no collected features; known keys: {sorted(self.covariances)}")
        for key in keys:
            basis, info = self.select(key)
            self.selected[key] = info
            self.projectors[key] = build_projector(basis, info["projector"], self.eta)
        return self.projectors

    def state_dict(self) -> dict:
        """Covariances, row counts, projectors, selections and null dimensions (CPU tensors, picklable)."""
        return {"covariances": {k: v.cpu().clone() for k, v in self.covariances.items()},
                "rows": dict(self.rows),
                "projectors": {k: v.cpu().clone() for k, v in self.projectors.items()},
                "selected": {k: dict(v) for k, v in self.selected.items()},
                "null_dims": self.null_dims}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (states saved before ``selected`` existed keep only the
        null dimensions and widths)."""
        self.covariances = {k: v.clone().double() for k, v in state["covariances"].items()}
        self.rows = dict(state["rows"])
        self.projectors = {k: v.clone().double() for k, v in state["projectors"].items()}
        legacy = {k: {"dim": self.projectors[k].shape[0], "null": n, "rule": None, "projector": None, "solver": None}
                  for k, n in state["null_dims"].items()}
        self.selected = {k: dict(v) for k, v in state.get("selected", legacy).items()}
