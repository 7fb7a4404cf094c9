"""Samplers and loaders that split global batches over the ranks: seeded training shards, contiguous
evaluation chunks, round-robin statistic batches and shares of a strategy's own batches.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional

from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from mambacl.strategies.distributed.process_group import _rank_and_world, check_batch_divisible, rank, world_size

__all__ = ["EvalShardSampler", "RoundRobinBatchSampler", "ShardedBatchSampler", "distributed_loader",
           "eval_shard_sizes", "micro_batches", "round_robin_loader"]


def micro_batches(per_rank: int, max_device_batch: Optional[int]) -> int:
    """Micro-batches per step: the fewest ``k`` dividing ``per_rank`` with ``per_rank / k <= max_device_batch``.

    Args:
        per_rank: this rank's share of the global batch.
        max_device_batch: the largest batch one forward/backward may hold (None: the whole share).
    """
    if max_device_batch is None:
        return 1
    if isinstance(max_device_batch, bool) or not isinstance(max_device_batch, int) or max_device_batch < 1:
        raise ValueError(f"max_device_batch must be None or a positive int, got {max_device_batch!r}")
    return next(k for k in range(-(-per_rank // max_device_batch), per_rank + 1) if per_rank % k == 0)


def distributed_loader(dataset: Dataset, batch: int, seed: int, epoch: int, *, shuffle: bool = True,
                       drop_last: bool = False, collate_fn: Any = None, num_workers: int = 0,
                       pin_memory: bool = False, micro: int = 1, repeat: int = 1) -> DataLoader:
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
        micro: each step's share is delivered as ``micro`` consecutive micro-batches (gradient accumulation);
            must divide ``batch // W``.
        repeat: the epoch runs over ``repeat`` copies of the dataset, shuffled together (Mamba-CL's
            ``expand_times``).

    Returns:
        A DataLoader whose batches have ``batch // (W * micro)`` samples (the last ones possibly fewer).
    """
    per_rank = check_batch_divisible(batch)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    for name, value in (("micro", micro), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if per_rank % micro:
        raise ValueError(f"micro {micro} must divide this rank's batch {per_rank}")
    if repeat > 1:
        dataset = ConcatDataset([dataset] * repeat)
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=per_rank // micro, sampler=sampler, drop_last=drop_last,
                      collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory)


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


def round_robin_loader(loader: DataLoader) -> DataLoader:
    """The same batches as a sequential, batched ``loader``, dealt round-robin to the ranks
    (:class:`RoundRobinBatchSampler`), with its dataset, batch size, collate function and workers."""
    if loader.batch_size is None:
        raise ValueError("loader must batch with batch_size (not a custom batch_sampler)")
    sampler = RoundRobinBatchSampler(len(loader.dataset), loader.batch_size)
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)
