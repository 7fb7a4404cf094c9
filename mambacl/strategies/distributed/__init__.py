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

Modules: ``process_group`` (torchrun set-up, rank/world/device, DDP wrapper), ``collectives`` (sums, gathers,
checks), ``samplers`` (global batches split over ranks); the Avalanche plugin is
:class:`mambacl.strategies.plugins.DistributedPlugin`.
"""
from mambacl.strategies.distributed.process_group import (BACKENDS, barrier, check_batch_divisible, init_distributed,
                                                          is_distributed, is_main_process, local_device, rank,
                                                          unwrap_model, world_size, wrap_ddp)
from mambacl.strategies.distributed.collectives import (all_reduce_statistics_, all_reduce_sum_, broadcast_object,
                                                        check_replicas_in_sync, check_same_config, gather_eval,
                                                        gather_objects, gather_rows, reduce_statistics)
from mambacl.strategies.distributed.samplers import (EvalShardSampler, RoundRobinBatchSampler, ShardedBatchSampler,
                                                     distributed_loader, eval_shard_sizes, micro_batches,
                                                     round_robin_loader)

__all__ = ["BACKENDS", "EvalShardSampler", "RoundRobinBatchSampler", "ShardedBatchSampler", "all_reduce_statistics_",
           "all_reduce_sum_", "barrier", "broadcast_object", "check_batch_divisible", "check_replicas_in_sync",
           "check_same_config", "distributed_loader", "eval_shard_sizes", "gather_eval", "gather_objects",
           "gather_rows", "init_distributed", "is_distributed", "is_main_process", "local_device", "micro_batches",
           "rank", "reduce_statistics", "round_robin_loader", "unwrap_model", "world_size", "wrap_ddp"]
