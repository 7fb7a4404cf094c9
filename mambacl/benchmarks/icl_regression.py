"""In-context linear regression (von Oswald et al. 2023; the GD-SSM paper, arXiv 2410.11687) and its baselines.

A task draws ``w ~ N(0, I_d)``, ``N`` context inputs and a query ``x ~ U(-0.5, 0.5)^d`` and ``y = w . x``
(no noise). The model sees the interleaved tokens ``x_1, y_1, ..., x_N, y_N, x_q`` (length ``2N + 1``) and is
scored by the squared error of its prediction at the query.

Token layout: tokens have ``d + 1`` coordinates, ``x`` tokens are ``[x, 0]`` and ``y`` tokens ``[0, y]``. The
paper zero-pads ``y`` into the same ``d`` coordinates and uses windows of stride 2; giving ``y`` its own
coordinate lets a causal stride-1 window tell the token types apart, which is what a sequence mixer sees.

Baselines (squared error on the query, mean over tasks): the zero predictor, ``k`` steps of gradient descent
from ``W0 = 0`` on ``L(W) = 1/(2N) sum_i (W x_i - y_i)^2`` with the step size tuned on held-out tasks, and
exact least squares.
"""
from __future__ import annotations

from itertools import product
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["icl_regression", "gd_predict", "least_squares_predict", "query_loss", "best_gd_eta", "pair_maps"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def icl_regression(num_tasks: int, d: int = 10, n_pairs: int = 10, generator: Optional[torch.Generator] = None,
                   dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Sample in-context linear-regression tasks.

    Args:
        num_tasks: batch size b.
        d: input dimension.
        n_pairs: context pairs N.
        generator: torch generator for reproducible draws.
        dtype: floating dtype of the outputs.
    Returns:
        dict with ``tokens [b, 2N+1, d+1]``, ``xs [b, N, d]``, ``ys [b, N]``, ``x_query [b, d]``,
        ``y_query [b]`` and ``w [b, d]``.

    Examples:
        >>> icl_regression(3)["tokens"].shape
        torch.Size([3, 21, 11])
    """
    b, d, n = (_check_positive_int(k, v) for k, v in (("num_tasks", num_tasks), ("d", d), ("n_pairs", n_pairs)))
    w = torch.randn(b, d, generator=generator, dtype=dtype)
    x_all = torch.rand(b, n + 1, d, generator=generator, dtype=dtype) - 0.5
    y_all = torch.einsum("bnd,bd->bn", x_all, w)
    tokens = torch.zeros(b, 2 * n + 1, d + 1, dtype=dtype)
    tokens[:, 0::2, :d] = x_all
    tokens[:, 1::2, d] = y_all[:, :n]
    return {"tokens": tokens, "xs": x_all[:, :n], "ys": y_all[:, :n], "x_query": x_all[:, n],
            "y_query": y_all[:, n], "w": w}


def gd_predict(xs: torch.Tensor, ys: torch.Tensor, x_query: torch.Tensor, eta: float, steps: int = 1) -> torch.Tensor:
    """Prediction at the query after ``steps`` GD steps from ``W0 = 0`` on ``1/(2N) sum (W x_i - y_i)^2``.

    Args:
        xs ``[b, N, d]``, ys ``[b, N]``, x_query ``[b, d]``; eta: step size; steps: number of GD steps.
    Returns:
        ``[b]`` predictions; one step gives ``eta / N * sum_i y_i x_i . x_query``.
    """
    _check_positive_int("steps", steps)
    w = torch.zeros_like(x_query)
    for _ in range(steps):
        residual = torch.einsum("bnd,bd->bn", xs, w) - ys
        w = w - eta / xs.shape[1] * torch.einsum("bn,bnd->bd", residual, xs)
    return (w * x_query).sum(-1)


def least_squares_predict(xs: torch.Tensor, ys: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least-squares prediction at the query, ``[b]`` (shapes as in :func:`gd_predict`)."""
    w = torch.linalg.lstsq(xs.double(), ys.double().unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    return (w * x_query.double()).sum(-1).to(x_query.dtype)


def query_loss(pred: torch.Tensor, y_query: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the query (the task's loss)."""
    return (pred - y_query).square().mean()


def best_gd_eta(data: Dict[str, torch.Tensor], steps: int = 1,
                grid: Sequence[float] = tuple(float(v) for v in torch.logspace(-1, 2, 31))) -> float:
    """Step size minimising the query loss of ``steps``-step GD on held-out tasks ``data``.

    One step is linear in eta, so its optimum ``E[g y] / E[g^2]`` (``g`` the prediction at eta = 1) is exact;
    more steps are tuned on ``grid`` and refined around the best point.
    """
    args = (data["xs"].double(), data["ys"].double(), data["x_query"].double())
    y = data["y_query"].double()
    if steps == 1:
        g = gd_predict(*args, eta=1.0)
        return float((g * y).sum() / g.square().sum())

    def loss(eta: float) -> float:
        return float(query_loss(gd_predict(*args, eta=eta, steps=steps), y))

    best = min(grid, key=loss)
    return min((best * f for f in torch.linspace(0.87, 1.13, 27).tolist()), key=loss)


def pair_maps(predict: Callable[[torch.Tensor], torch.Tensor], d: int = 10, n_pairs: int = 10,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The maps ``M_i`` of a predictor that is a cubic polynomial of the tokens: the coefficient of
    ``y_i x_i[j] x_q[k]`` is ``M_i[j, k]``, so its context pairs enter as ``sum_i y_i x_i^T M_i x_q``.

    One GD step from ``W0 = 0`` has ``M_i = eta / N I``; a 1-layer GD-SSM (products of three linear maps of
    the window) is such a cubic, and any reparametrisation of its accumulator leaves every ``M_i`` unchanged.
    Each coefficient is read exactly by inclusion-exclusion over the 8 inputs that set a subset of
    ``(y_i, x_i[j], x_q[k])`` to 1 and everything else to 0 (only the monomial holding all three survives).

    Args:
        predict: ``[b, 2N+1, d+1]`` tokens (layout of :func:`icl_regression`) -> ``[b]`` predictions.
        d, n_pairs: task shape. dtype: dtype of the probe tokens.
    Returns:
        ``[N, d, d]``.
    """
    d, n = _check_positive_int("d", d), _check_positive_int("n_pairs", n_pairs)
    i, j, k = (t.flatten() for t in torch.meshgrid(torch.arange(n), torch.arange(d), torch.arange(d), indexing="ij"))
    subsets = torch.tensor(list(product((0.0, 1.0), repeat=3)), dtype=dtype)  # [8, 3]: y_i, x_i[j], x_q[k]
    probe = torch.arange(len(i))
    tokens = torch.zeros(len(i), 8, 2 * n + 1, d + 1, dtype=dtype)
    tokens[probe, :, 2 * i + 1, d] = subsets[:, 0]
    tokens[probe, :, 2 * i, j] = subsets[:, 1]
    tokens[probe, :, 2 * n, k] = subsets[:, 2]
    signs = (-1.0) ** (3 - subsets.sum(1))
    with torch.no_grad():
        preds = predict(tokens.flatten(0, 1))
    if preds.shape != (8 * len(i),):
        raise ValueError(f"predict must map [b, 2N+1, d+1] tokens to [b] predictions, got {tuple(preds.shape)} "
                         f"for b = {8 * len(i)}")
    preds = preds.view(len(i), 8)
    return (preds * signs).sum(1).view(n, d, d)
