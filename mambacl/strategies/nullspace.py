"""Framework-independent null-space engine: feature covariances, null-space selection rules and projectors.

Follows the Mamba-CL code (mambacl.md sections 3-4): every batch adds ``X^T X / rows`` (uncentred, float64) to
a running sum that is never recomputed for old experiences; at each boundary the sum is eigen-decomposed, a
null space is selected (knee rule, Adam-NSCL ``lambda <= a * lambda_min``, GPM energy threshold, or the exact
numerical kernel) and turned into a projector, soft ``eta * P0 / ||P0||_F + (1 - eta) * I`` or strict ``P0``.
No Avalanche import here.
"""
from __future__ import annotations

import math
from typing import Dict, Literal, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

Selection = Literal["knee", "adam_nscl", "energy", "kernel"]
ProjectorKind = Literal["soft", "strict"]
SELECTIONS = ("knee", "adam_nscl", "energy", "kernel")
PROJECTORS = ("soft", "strict")


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


def null_space_size(eigvals: torch.Tensor, selection: Selection = "knee", *, a: float = 10.0,
                    threshold: float = 0.97, tol: float = 1e-10, sigma: float = 10.0) -> int:
    """Number k of null directions (the k smallest eigenvalues) chosen by a selection rule.

    Args:
        eigvals: [D] eigenvalues of a PSD covariance, sorted descending.
        selection: 'knee' (Mamba-CL), 'adam_nscl' (``lambda <= a * lambda_min``), 'energy' (GPM: keep the
            fewest leading directions holding ``threshold`` of the total energy, the rest is null) or 'kernel'
            (``lambda <= tol * lambda_max``, the numerical kernel).
        a: Adam-NSCL multiplier.
        threshold: GPM energy fraction in (0, 1].
        tol: relative tolerance of the 'kernel' rule.
        sigma: smoothing width of the knee rule.

    Returns:
        k in [0, D].
    """
    lam = eigvals.double().clamp_min(0.0)
    n = lam.numel()
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
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


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
        selection: null-space rule, see :func:`null_space_size`.
        projector: 'soft' or 'strict', see :func:`build_projector`.
        eta: soft-projector weight.
        a: Adam-NSCL multiplier for ``selection='adam_nscl'``.
        threshold: energy fraction for ``selection='energy'``.
        tol: relative eigenvalue tolerance for ``selection='kernel'``.

    Example:
        >>> eng = NullSpaceEngine(selection="kernel", projector="strict")
        >>> eng.add("x", torch.randn(5, 8))
        >>> P = eng.update_projectors()["x"]   # [8, 8], projects onto the 3-dim kernel
    """

    def __init__(self, selection: Selection = "knee", projector: ProjectorKind = "soft", eta: float = 0.95,
                 a: float = 10.0, threshold: float = 0.97, tol: float = 1e-10) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if a < 1.0:
            raise ValueError(f"a must be >= 1, got {a}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if tol < 0.0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.selection, self.projector, self.eta = selection, projector, eta
        self.a, self.threshold, self.tol = a, threshold, tol
        self.covariances: Dict[str, torch.Tensor] = {}
        self.rows: Dict[str, int] = {}
        self.projectors: Dict[str, torch.Tensor] = {}
        self.null_dims: Dict[str, int] = {}

    def add(self, key: str, features: torch.Tensor, rows: Optional[int] = None) -> None:
        """Add ``X^T X / rows`` of one batch of feature rows to the covariance of ``key``.

        Args:
            key: feature name.
            features: [r, D] (or [..., D], flattened to rows) feature rows, any float dtype and device.
            rows: number of feature rows the batch stands for (default r); differs from r when ``features``
                is a compressed factor with the same ``X^T X`` (see ``features.delta_x_rows``).
        """
        if features.ndim < 2:
            raise ValueError(f"features for {key!r} must have shape [rows, D], got {tuple(features.shape)}")
        x = features.detach().reshape(-1, features.shape[-1]).to(torch.float64)
        rows = x.shape[0] if rows is None else rows
        if rows > 0:
            self.add_covariance(key, x.T @ x / rows, rows)

    def add_covariance(self, key: str, cov: torch.Tensor, rows: int) -> None:
        """Add an already-formed [D, D] covariance of ``rows`` feature rows to ``key`` (kept on its device).

        Args:
            key: feature name.
            cov: [D, D] covariance, cast to float64.
            rows: number of feature rows it summarises.
        """
        cov = cov.to(torch.float64)
        if key in self.covariances:
            if self.covariances[key].shape != cov.shape:
                raise ValueError(f"features for {key!r} have width {cov.shape[0]}, "
                                 f"expected {self.covariances[key].shape[0]}")
            self.covariances[key] += cov.to(self.covariances[key].device)
        else:
            self.covariances[key] = cov.clone()
        self.rows[key] = self.rows.get(key, 0) + rows

    def null_basis(self, key: str) -> torch.Tensor:
        """Orthonormal [D, k] basis of the null space of ``key``'s covariance under the selection rule."""
        cov = self.covariances[key]
        if not torch.isfinite(cov).all():
            raise ValueError(f"covariance of {key!r} has non-finite entries (NaN/Inf features)")
        eigvals, eigvecs = torch.linalg.eigh(cov.cpu())
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)  # descending
        k = null_space_size(eigvals, self.selection, a=self.a, threshold=self.threshold, tol=self.tol)
        return eigvecs[:, eigvecs.shape[1] - k:]

    def update_projectors(self, keys: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Re-decompose the covariances (all, or ``keys``) and rebuild their float64 projectors.

        Returns:
            {key: [D, D] float64 projector on the CPU}.
        """
        for key in self.covariances if keys is None else keys:
            basis = self.null_basis(key)
            self.null_dims[key] = basis.shape[1]
            self.projectors[key] = build_projector(basis, self.projector, self.eta)
        return self.projectors

    def state_dict(self) -> dict:
        """Covariances, row counts, projectors and null dimensions (CPU tensors, picklable)."""
        return {"covariances": {k: v.cpu().clone() for k, v in self.covariances.items()},
                "rows": dict(self.rows),
                "projectors": {k: v.cpu().clone() for k, v in self.projectors.items()},
                "null_dims": dict(self.null_dims)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.covariances = {k: v.clone().double() for k, v in state["covariances"].items()}
        self.rows = dict(state["rows"])
        self.projectors = {k: v.clone().double() for k, v in state["projectors"].items()}
        self.null_dims = dict(state["null_dims"])
