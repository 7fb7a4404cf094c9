"""Collectives over the process group: float64-preserving sums, object broadcast/gather, configuration and
replica checks, evaluation gathering and the keyed running statistics of the null-space and class-mean passes.

Every function is the identity (or a no-op) outside a process group.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, MutableMapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from mambacl.strategies.distributed.process_group import (_comm_device, is_distributed, rank, unwrap_model,
                                                          world_size)

__all__ = ["all_reduce_statistics_", "all_reduce_sum_", "broadcast_object", "check_replicas_in_sync",
           "check_same_config", "gather_eval", "gather_objects", "gather_rows", "reduce_statistics"]


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum tensors in place over all ranks; one flat collective per dtype, so float64 stays float64.

    Every rank must pass tensors of the same shapes and dtypes in the same order. No-op outside a process group.

    Args:
        tensors: tensors of any shape, dtype and device.
    """
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if not is_distributed() or not tensors:
        return
    comm = _comm_device()
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, indexed by rank (``[obj]`` outside a process group)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. tensors or arrays: compare their text
        return repr(a) == repr(b)


def check_same_config(config: Mapping[str, Any]) -> None:
    """Raise on every rank unless all ranks were given the same configuration (call it at start-up).

    Args:
        config: picklable {option: value}, e.g. ``vars(argparse_namespace)``.

    Raises:
        ValueError naming each differing key with every rank's value.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping of option -> value, got {type(config).__name__}")
    configs = gather_objects(dict(config))
    missing = object()
    keys = sorted({k for c in configs for k in c}, key=str)
    differing = [k for k in keys if not all(_same(c.get(k, missing), configs[0].get(k, missing)) for c in configs)]
    if differing:
        detail = "; ".join(f"{k!r}: " + ", ".join(f"rank {r} has {c.get(k, '<missing>')!r}"
                                                  for r, c in enumerate(configs)) for k in differing)
        raise ValueError(f"ranks disagree on the configuration keys {differing}: {detail}")


@torch.no_grad()
def check_replicas_in_sync(model: nn.Module, atol: float = 0.0) -> float:
    """Largest difference between this rank's floating-point state (parameters and buffers) and rank 0's.

    Args:
        model: the (bare or DDP-wrapped) model, with the same state_dict keys and shapes on every rank.
        atol: largest tolerated difference.

    Returns:
        The largest absolute difference over all ranks (0.0 outside a process group). Raises RuntimeError on
        every rank, naming the first differing entries, when it exceeds ``atol``.
    """
    if not is_distributed():
        return 0.0
    comm = _comm_device()
    worst: Dict[str, float] = {}
    for name, value in unwrap_model(model).state_dict().items():
        if value.is_floating_point():
            ref = value.detach().to(comm, copy=True)
            dist.broadcast(ref, src=0)
            worst[name] = float((ref - value.detach().to(comm)).abs().max()) if value.numel() else 0.0
    local = torch.tensor([max(worst.values(), default=0.0)], dtype=torch.float64, device=comm)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    diff = float(local)
    if diff > atol:
        bad = [k for k, v in worst.items() if v > atol][:5]
        raise RuntimeError(f"model replicas diverged across ranks: max |difference| {diff:.3e} > {atol:g}"
                           + (f" (rank {rank()}: {bad})" if bad else ""))
    return diff


def gather_eval(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's chunk of one evaluation batch, in rank order.

    Args:
        tensor: [m, ...] this rank's rows; only the first ``sizes[rank]`` are real (see :class:`EvalShardSampler`).
        sizes: [world] real rows per rank, known to every rank.

    Returns:
        [sum(sizes), ...] on ``tensor``'s device (``tensor[:sizes[0]]`` outside a process group).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if len(sizes) != world_size():
        raise ValueError(f"sizes must have one entry per rank ({world_size()}), got {len(sizes)}")
    own = sizes[rank()]
    if tensor.shape[0] < own:
        raise ValueError(f"tensor has {tensor.shape[0]} rows, fewer than this rank's share {own}")
    if not is_distributed():
        return tensor[:own]
    comm, longest = _comm_device(), max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]), device=comm)
    padded[:own] = tensor[:own]
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(tensor.device)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated on dim 0 in rank order, differentiably (``tensor`` itself outside a
    process group; every rank must pass the same shape).

    For losses that are not means over samples (group norms, group means): each rank computes the loss of the
    global batch from the gathered rows; the backward sums the ranks' gradients into each rank's own rows, so
    after DDP's averaging the parameters get the gradient of that loss on the global batch.
    """
    if not is_distributed():
        return tensor
    return torch.cat(dist_nn.all_gather(tensor.contiguous()))


def all_reduce_statistics_(sums: MutableMapping[str, torch.Tensor], counts: MutableMapping[str, int]) -> None:
    """Sum keyed running statistics and their counts over all ranks, in place (float64 sums stay float64).

    A key that some rank never saw (it got no batch) is created there as zeros, so afterwards every rank holds
    the same keys. No-op outside a process group.

    Args:
        sums: {key: tensor} running sums, e.g. ``NullSpaceEngine.covariances`` ([D, D] float64).
        counts: {key: int} rows/samples behind each sum, e.g. ``NullSpaceEngine.rows``.
    """
    if set(sums) != set(counts):
        raise ValueError(f"sums and counts must have the same keys, got {sorted(sums)} and {sorted(counts)}")
    if not is_distributed():
        return
    layouts: Dict[str, tuple] = {}
    for r, layout in enumerate(gather_objects({k: (tuple(v.shape), v.dtype) for k, v in sums.items()})):
        for key, spec in layout.items():
            if layouts.setdefault(key, spec) != spec:
                raise ValueError(f"statistic {key!r} has shape/dtype {spec} on rank {r} but {layouts[key]} elsewhere")
    device = next((v.device for v in sums.values()), torch.device("cpu"))
    keys = sorted(layouts)
    for key in keys:
        if key not in sums:
            shape, dtype = layouts[key]
            sums[key] = torch.zeros(shape, dtype=dtype, device=device)
            counts[key] = 0
    total = torch.tensor([counts[k] for k in keys], dtype=torch.int64)
    all_reduce_sum_([sums[k] for k in keys] + [total])
    counts.update({k: int(c) for k, c in zip(keys, total.tolist())})


def reduce_statistics(sums: Dict[str, torch.Tensor], counts: Dict[str, int]) -> tuple:
    """:func:`all_reduce_statistics_` returning ``(sums, counts)``: the ``reduce_fn`` of NullSpacePlugin."""
    all_reduce_statistics_(sums, counts)
    return sums, counts
