"""Data-parallel training with torch.distributed: torchrun set-up, float64-preserving collectives, DDP and
DistributedSampler helpers, evaluation sharded per global batch and gathered back in order, and an Avalanche
plugin that ties them together.

Avalanche 0.6.0's own support is partial (avalanche.md section 6): templates never wrap the model in DDP, its
DistributedSampler is never re-seeded per epoch and evaluation is not sharded. Here every batch size is the
*global* one, so the same configuration trains on the same global batches with 1 or N processes:

- training: epoch ``e`` of experience ``k`` draws the DistributedSampler permutation seeded by
  ``seed + k * train_epochs + e``; rank r takes every W-th sample of it, ``batch / W`` per step, and DDP
  averages the gradients, which equals the gradient of the mean loss over the global batch;
- evaluation: each global batch is split into W contiguous chunks, one per rank, and the outputs/targets are
  all-gathered in rank order, so metrics on every rank see exactly the single-process minibatches;
- null-space statistics: batches of the covariance pass are dealt round-robin to the ranks and the per-key sums
  and row counts are all-reduced (float64) before the decomposition, so every rank builds the same projector.

Everything degrades to a plain single-process run when no process group exists.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from functools import partial
from typing import Any, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mambacl.strategies.plugins.nullspace import NullSpacePlugin

BACKENDS = ("nccl", "gloo")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["DistributedPlugin", "EvalShardSampler", "RoundRobinBatchSampler", "ShardedBatchSampler",
           "all_reduce_statistics_", "all_reduce_sum_", "barrier", "broadcast_object", "check_batch_divisible",
           "check_replicas_in_sync", "check_same_config", "distributed_loader", "eval_shard_sizes", "gather_eval",
           "gather_objects", "gather_rows", "init_distributed", "is_distributed", "is_main_process", "local_device", "rank",
           "reduce_statistics", "round_robin_loader", "shard_nullspace_collection", "unwrap_model", "world_size",
           "wrap_ddp"]


# -- process group ---------------------------------------------------------------------------------------------
def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); with CUDA, also select the GPU ``LOCAL_RANK``.

    Args:
        backend: 'nccl' or 'gloo'; None picks NCCL when CUDA is available, gloo otherwise.
        timeout_s: collective timeout in seconds.

    Returns:
        True when a process group is active (already or now), False outside torchrun (single process).
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPUs")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    return True


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs, plots and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _comm_device() -> torch.device:
    """Where collective buffers must live: the GPU for NCCL, the CPU for gloo."""
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


# -- collectives -----------------------------------------------------------------------------------------------
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


def check_batch_divisible(batch: int, world: Optional[int] = None, name: str = "batch size") -> int:
    """Per-rank share of a global batch.

    Args:
        batch: global batch size.
        world: number of processes (default the current world size).
        name: what ``batch`` is, for the error message.

    Returns:
        ``batch // world``. Raises ValueError when ``world`` does not divide ``batch``.
    """
    world = world_size() if world is None else world
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{name} must be a positive int, got {batch!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    if batch % world:
        raise ValueError(f"{name} {batch} is not divisible by the world size {world}: the global batch is split "
                         f"evenly over the processes; use a multiple of {world}")
    return batch // world


# -- training --------------------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, find_unused_parameters: bool = True, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, ``model`` itself otherwise.

    Args:
        model: the model, already on its device (``local_device()``) with its final ``requires_grad`` flags.
        find_unused_parameters: needed when some trainable parameters get no gradient in a step (e.g. the old
            heads of ``ExperienceHeads`` in training mode).
        ddp_kwargs: further DistributedDataParallel arguments.
    """
    if not is_distributed():
        return model
    device = next(model.parameters(), torch.zeros(())).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed_loader(dataset: Dataset, batch: int, seed: int, epoch: int, *, shuffle: bool = True,
                       drop_last: bool = False, collate_fn: Any = None, num_workers: int = 0,
                       pin_memory: bool = False) -> DataLoader:
    """This rank's loader over a DistributedSampler seeded by ``seed + epoch``.

    With W processes rank r takes samples ``perm[r::W]`` of the permutation, ``batch // W`` per step, so the
    union of step i over the ranks is the single-process global batch ``perm[i*batch:(i+1)*batch]`` (when W
    divides ``len(dataset)``; otherwise DistributedSampler pads with repeated samples).

    Args:
        dataset: map-style dataset.
        batch: global batch size, divisible by the world size.
        seed: base seed, identical on every rank.
        epoch: epoch index; each epoch draws a new permutation.
        shuffle, drop_last, collate_fn, num_workers, pin_memory: as for DataLoader / DistributedSampler.

    Returns:
        A DataLoader whose batches have ``batch // world`` samples (the last one possibly fewer).
    """
    per_rank = check_batch_divisible(batch)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=pin_memory)


def _rank_and_world(own: Optional[int], world: Optional[int]) -> tuple:
    """(rank, world) with the current group's values filling the Nones, validated."""
    world = world_size() if world is None else world
    own = rank() if own is None else own
    if world < 1 or not 0 <= own < world:
        raise ValueError(f"need world >= 1 and rank in [0, world), got rank={own}, world={world}")
    return own, world


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


# -- evaluation ------------------------------------------------------------------------------------------------
def eval_shard_sizes(n: int, batch: int, world: int) -> List[List[int]]:
    """How the global evaluation batches are split: ``sizes[i][r]`` samples of batch i go to rank r.

    Batch i covers samples ``[i*batch, min((i+1)*batch, n))``; it is cut into ``world`` contiguous chunks in rank
    order whose sizes differ by at most one (the first ranks get the extra samples).
    """
    if n < 0 or batch < 1 or world < 1:
        raise ValueError(f"need n >= 0, batch >= 1 and world >= 1, got n={n}, batch={batch}, world={world}")
    sizes = []
    for start in range(0, n, batch):
        q, extra = divmod(min(batch, n - start), world)
        sizes.append([q + (r < extra) for r in range(world)])
    return sizes


class EvalShardSampler(Sampler[List[int]]):
    """Batch sampler yielding rank r's contiguous chunk of every global evaluation batch (see
    :func:`eval_shard_sizes`). A rank whose chunk is empty gets the batch's first sample as a placeholder, so
    every rank runs the same number of forward passes; :func:`gather_eval` drops it.

    Args:
        n: dataset length.
        batch: global evaluation batch size.
        rank, world: this process and the number of processes (default the current group's).
    """

    def __init__(self, n: int, batch: int, rank: Optional[int] = None, world: Optional[int] = None) -> None:
        self.rank, self.world = _rank_and_world(rank, world)
        self.batch = batch
        self.sizes = eval_shard_sizes(n, batch, self.world)

    def __iter__(self) -> Iterator[List[int]]:
        for i, sizes in enumerate(self.sizes):
            start = i * self.batch + sum(sizes[:self.rank])
            yield list(range(start, start + sizes[self.rank])) or [i * self.batch]

    def __len__(self) -> int:
        return len(self.sizes)


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


# -- statistics (null space, class means) ---------------------------------------------------------------------
class RoundRobinBatchSampler(Sampler[List[int]]):
    """Contiguous batches ``[i*batch, (i+1)*batch)`` in order, batch i going to rank ``i % world``.

    The union over ranks is exactly the single-process sequence of batches, so per-batch statistics summed over
    the ranks (e.g. Mamba-CL's ``sum_batches X^T X / rows``) equal the single-process sums. Ranks may get one
    batch more than others; nothing inside the loop may communicate.
    """

    def __init__(self, n: int, batch: int, rank: Optional[int] = None, world: Optional[int] = None) -> None:
        if n < 0 or batch < 1:
            raise ValueError(f"need n >= 0 and batch >= 1, got n={n}, batch={batch}")
        self.rank, self.world = _rank_and_world(rank, world)
        self.n, self.batch = n, batch

    def __iter__(self) -> Iterator[List[int]]:
        for start in range(self.rank * self.batch, self.n, self.world * self.batch):
            yield list(range(start, min(start + self.batch, self.n)))

    def __len__(self) -> int:
        batches = -(-self.n // self.batch)
        return len(range(self.rank, batches, self.world))


class ShardedBatchSampler(Sampler[List[int]]):
    """Rank r's share ``batch[r::W]`` of every global batch of ``batch_sampler``.

    The wrapped sampler must produce the same batches on every rank (seed its generator identically, e.g.
    through :func:`broadcast_object`) and batch sizes divisible by the world size, so every rank takes the same
    number of steps and the ranks' shares of step i together are the single-process batch i.
    """

    def __init__(self, batch_sampler: Sampler[List[int]], rank: Optional[int] = None,
                 world: Optional[int] = None) -> None:
        self.batch_sampler = batch_sampler
        self.rank, self.world = _rank_and_world(rank, world)

    def __iter__(self) -> Iterator[List[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if len(batch) % self.world:
                raise ValueError(f"global batch {i} has {len(batch)} samples, not divisible by the world size "
                                 f"{self.world}")
            yield list(batch)[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.batch_sampler)


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


def round_robin_loader(loader: DataLoader) -> DataLoader:
    """The same batches as a sequential, batched ``loader``, dealt round-robin to the ranks
    (:class:`RoundRobinBatchSampler`), with its dataset, batch size, collate function and workers."""
    if loader.batch_size is None:
        raise ValueError("loader must batch with batch_size (not a custom batch_sampler)")
    sampler = RoundRobinBatchSampler(len(loader.dataset), loader.batch_size)
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _sharded_collect_loader(plugin: NullSpacePlugin, strategy) -> DataLoader:
    return round_robin_loader(type(plugin).collect_loader(plugin, strategy))


def shard_nullspace_collection(plugin: NullSpacePlugin) -> None:
    """Make ``plugin``'s covariance pass data-parallel: each rank forwards every W-th batch of the pass and the
    per-key sums and row counts are all-reduced before the decomposition, so all ranks get the projectors a
    single process would build. Call it on every rank (inside a process group)."""
    if not isinstance(plugin, NullSpacePlugin):
        raise TypeError(f"plugin must be a NullSpacePlugin, got {type(plugin).__name__}")
    plugin.reduce_fn = reduce_statistics
    plugin.collect_loader = partial(_sharded_collect_loader, plugin)


# -- Avalanche -------------------------------------------------------------------------------------------------
class DistributedPlugin(SupervisedPlugin, supports_distributed=True):
    """Runs a SupervisedTemplate data-parallel under torchrun, and identically in a single process.

    ``train_mb_size`` and ``eval_mb_size`` are global batch sizes (the world size must divide
    ``train_mb_size``). Each training epoch replaces the strategy's loader by :func:`distributed_loader` seeded by
    ``seed + experience * train_epochs + epoch`` and, inside a process group, runs the model wrapped in DDP (the
    wrapper is built at the first epoch of each experience, after model adaptation and every plugin's
    ``before_training_exp`` has fixed the trainable parameters, and removed after each epoch so evaluation,
    checkpoints and other plugins see the bare model). Evaluation batches are split by :class:`EvalShardSampler`
    and outputs, targets and task labels are gathered in ``after_eval_forward``, so the evaluation metrics (and
    the loss) on every rank are those of the whole test set in single-process order; ``mb_x`` stays local.
    Training-phase metrics are computed on each rank's own shard. Inside a process group every
    :class:`NullSpacePlugin` of the strategy gets :func:`shard_nullspace_collection`.

    Put it first in the plugin list so later plugins and the EvaluationPlugin see the gathered outputs.
    Strategies with their own training loader say so through two optional attributes: ``uses_template_loader``
    (true while the current loader is the template's over ``adapted_dataset``, which this plugin may replace;
    default: ``make_train_dataloader`` is not overridden) and ``shards_own_loader`` (true while the strategy's
    own loader already gives each rank its part of every global batch: the loader is kept and the model is
    still DDP-wrapped; the ``replay`` registry entry and MambaFSCIL set it). Any other loader is kept in one
    process and refused in a process group, as are multi-task models (Avalanche ``MultiTaskModule``), which
    cannot be DDP-wrapped this way.

    Args:
        seed: base seed of the training permutations, identical on every rank.
        num_workers: DataLoader workers per rank.
        autocast: None, 'bf16' or 'fp16': mixed-precision forward (``torch.autocast`` on the strategy's device,
            meant for GPUs; the scans keep fp32 internals), outputs cast back to float32 for the loss.
        find_unused_parameters: passed to DDP.

    Example:
        >>> init_distributed()  # under torchrun  # doctest: +SKIP
        >>> strategy = MambaCL(model=model.to(local_device()), optimizer=opt, train_mb_size=64,
        ...                    plugins=[DistributedPlugin(seed=0)], device=local_device())  # doctest: +SKIP
    """

    def __init__(self, *, seed: int = 0, num_workers: int = 0, autocast: Optional[str] = None,
                 find_unused_parameters: bool = True) -> None:
        super().__init__()
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {tuple(AUTOCAST_DTYPES)}, got {autocast!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.seed, self.num_workers, self.autocast = seed, num_workers, autocast
        self.find_unused_parameters = find_unused_parameters
        self._ddp: Optional[nn.Module] = None
        self._bare: Optional[nn.Module] = None
        self._eval_sizes: List[List[int]] = []
        self._eval_step = 0
        self._amp: Optional[contextlib.AbstractContextManager] = None
        self._template_loader: Any = None

    def epoch_seed_offset(self, strategy) -> int:
        """Sampler epoch of the current training epoch: unique per (experience, epoch), stable across resumes."""
        return strategy.experience.current_experience * strategy.train_epochs + strategy.clock.train_exp_epochs

    def _enter_autocast(self, strategy) -> None:
        if self.autocast is not None:
            self._amp = torch.autocast(torch.device(strategy.device).type, dtype=AUTOCAST_DTYPES[self.autocast])
            self._amp.__enter__()

    def _exit_autocast(self, strategy) -> None:
        if self._amp is not None:
            self._amp.__exit__(None, None, None)
            self._amp = None
            strategy.mb_output = strategy.mb_output.float()

    def owns_loader(self, strategy) -> bool:
        """True when the current training loader is the template's own, which this plugin may replace."""
        stock = type(strategy).make_train_dataloader is SupervisedTemplate.make_train_dataloader
        loader = strategy.dataloader
        return (getattr(strategy, "uses_template_loader", stock) and loader is self._template_loader
                and type(loader) in (DataLoader, TaskBalancedDataLoader))

    def state_dict(self) -> dict:
        """Nothing to save: the sampling depends only on (seed, experience, epoch)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Counterpart of :meth:`state_dict` (checkpoint restore)."""

    # -- Avalanche callbacks -----------------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs) -> None:
        if is_distributed():
            for plugin in strategy.plugins:
                if isinstance(plugin, NullSpacePlugin):
                    shard_nullspace_collection(plugin)

    def before_training_exp(self, strategy, **kwargs) -> None:
        check_batch_divisible(strategy.train_mb_size, name="train_mb_size")
        self._ddp, self._template_loader = None, strategy.dataloader

    def before_training_epoch(self, strategy, **kwargs) -> None:
        if self.owns_loader(strategy):
            data = strategy.adapted_dataset
            strategy.dataloader = self._template_loader = distributed_loader(
                data, strategy.train_mb_size, self.seed, self.epoch_seed_offset(strategy),
                collate_fn=getattr(data, "collate_fn", None), num_workers=self.num_workers,
                pin_memory=torch.device(strategy.device).type == "cuda")
        elif not getattr(strategy, "shards_own_loader", False):
            if is_distributed():
                raise TypeError(f"{type(strategy).__name__} trains from its own loader "
                                f"({type(strategy.dataloader).__name__}); distributed runs support strategies that "
                                "use the template's training loader (e.g. MambaCL, AdamNSCL, Naive, EWC, LwF) or "
                                "shard their own (MambaFSCIL)")
            return
        if is_distributed():
            if self._ddp is None:
                self._ddp = wrap_ddp(strategy.model, find_unused_parameters=self.find_unused_parameters)
            self._bare, strategy.model = strategy.model, self._ddp

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if self._bare is not None:
            strategy.model, self._bare = self._bare, None

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._ddp = None

    def before_forward(self, strategy, **kwargs) -> None:
        self._enter_autocast(strategy)

    def after_forward(self, strategy, **kwargs) -> None:
        self._exit_autocast(strategy)

    def before_eval_exp(self, strategy, **kwargs) -> None:
        if not is_distributed():
            return
        data = strategy.adapted_dataset
        sampler = EvalShardSampler(len(data), strategy.eval_mb_size)
        strategy.dataloader = DataLoader(data, batch_sampler=sampler, collate_fn=getattr(data, "collate_fn", None),
                                         num_workers=self.num_workers)
        self._eval_sizes, self._eval_step = sampler.sizes, 0

    def before_eval_forward(self, strategy, **kwargs) -> None:
        self._enter_autocast(strategy)

    def after_eval_forward(self, strategy, **kwargs) -> None:
        self._exit_autocast(strategy)
        if not is_distributed():
            return
        sizes = self._eval_sizes[self._eval_step]
        self._eval_step += 1
        strategy.mb_output = gather_eval(strategy.mb_output, sizes)
        strategy.mbatch[1:] = [gather_eval(t, sizes) for t in strategy.mbatch[1:]]
