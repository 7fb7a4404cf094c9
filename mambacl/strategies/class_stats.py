"""Per-class float64 feature sums and means, keyed by class id (shared by FSCIL, the fitted heads and metrics).

The sums are keyed by ``str(class id)`` so that :func:`mambacl.strategies.distributed.all_reduce_statistics_`
can sum them across data-parallel ranks.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Sequence, Tuple, Union

import torch
from avalanche.models.utils import avalanche_forward
from torch import nn

__all__ = ["add_class_sums", "class_means", "module_inputs"]


def add_class_sums(sums: Dict[str, torch.Tensor], counts: Dict[str, int], features: torch.Tensor,
                   labels: torch.Tensor) -> None:
    """Add the float64 per-class sums and counts of ``features`` to keyed running statistics, in place.

    Args:
        sums: {str(class): [...] float64 sum}; counts: {str(class): samples}.
        features: [n, ...] rows. labels: [n] class ids.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features and labels must have the same length, got {features.shape[0]} and "
                         f"{labels.shape[0]}")
    for c in labels.unique().tolist():
        selected = features[labels == c]
        sums[str(c)] = sums.get(str(c), 0) + selected.sum(dim=0, dtype=torch.float64)
        counts[str(c)] = counts.get(str(c), 0) + len(selected)


def class_means(sums: Dict[str, torch.Tensor], counts: Dict[str, int], dtype: torch.dtype) -> Dict[int, torch.Tensor]:
    """{class id: sum / count} in ``dtype``, in increasing class order."""
    return {int(k): (sums[k] / counts[k]).to(dtype) for k in sorted(sums, key=int)}


@torch.no_grad()
def module_inputs(model: nn.Module, modules: Sequence[nn.Module], batches: Iterable[Sequence[torch.Tensor]],
                  device: Union[str, torch.device]) -> Iterator[Tuple[List[torch.Tensor], torch.Tensor]]:
    """Run ``model`` in eval mode under no_grad over ``batches`` and yield what ``modules`` receive.

    Args:
        model: the whole model (called with ``avalanche_forward``, so multi-task models get their task labels).
        modules: submodules whose first positional input is read by forward pre-hooks (e.g. a classifier head,
            whose input is the pre-logits feature).
        batches: Avalanche mini-batches ``(x, y, ..., task_labels)``.
        device: where the model runs.

    Yields:
        ([one [b, ...] input per module], labels [b]) per batch, on ``device``; the model's mode is restored
        and the hooks removed afterwards.
    """
    captured: Dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
               for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        for mb in batches:
            captured.clear()
            avalanche_forward(model, mb[0].to(device), mb[-1].to(device))
            if len(captured) != len(modules):
                raise RuntimeError(f"{len(modules) - len(captured)} of the {len(modules)} module(s) did not run "
                                   "in the model's forward")
            yield [captured[i] for i in range(len(modules))], mb[1].to(device)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
