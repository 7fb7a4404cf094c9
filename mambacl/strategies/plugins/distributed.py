"""DistributedPlugin: runs an Avalanche template data-parallel under torchrun (see mambacl.strategies.distributed)."""
from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import Any, Dict, List, Optional

import torch
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from mambacl.strategies.distributed import (EvalShardSampler, check_batch_divisible, distributed_loader, gather_eval,
                                            is_distributed, micro_batches, reduce_statistics, round_robin_loader,
                                            wrap_ddp)
from mambacl.strategies.plugins.nullspace import NullSpacePlugin

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["AUTOCAST_DTYPES", "DistributedPlugin", "shard_nullspace_collection"]


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

    With ``max_device_batch`` one GPU reproduces a larger global batch: each rank's share of a step arrives as
    micro-batches of at most that size (:func:`micro_batches`); each micro-batch's gradient (penalties of other
    plugins included) is scaled by its share of the step and accumulated, and the optimizer steps once per global
    batch, so the update equals the large batch's. Between micro-batches ``strategy.accumulating_gradients`` is
    True and every gradient is held back (``grad = None``, so the optimizer's step changes nothing, and
    NullSpacePlugin projects only real steps). ``data_repeat`` runs each epoch over that many shuffled copies of
    the experience's data (Mamba-CL's ``expand_times``). Both need the template's loader.

    Args:
        seed: base seed of the training permutations, identical on every rank.
        num_workers: DataLoader workers per rank.
        max_device_batch: largest micro-batch per process (None: no accumulation).
        data_repeat: copies of the training data per epoch.
        autocast: None, 'bf16' or 'fp16': mixed-precision forward (``torch.autocast`` on the strategy's device,
            meant for GPUs; the scans keep fp32 internals), outputs cast back to float32 for the loss.
        find_unused_parameters: passed to DDP.

    Example:
        >>> init_distributed()  # under torchrun  # doctest: +SKIP
        >>> strategy = MambaCL(model=model.to(local_device()), optimizer=opt, train_mb_size=64,
        ...                    plugins=[DistributedPlugin(seed=0)], device=local_device())  # doctest: +SKIP
    """

    def __init__(self, *, seed: int = 0, num_workers: int = 0, autocast: Optional[str] = None,
                 find_unused_parameters: bool = True, max_device_batch: Optional[int] = None,
                 data_repeat: int = 1) -> None:
        super().__init__()
        micro_batches(1, max_device_batch)  # validates it
        if isinstance(data_repeat, bool) or not isinstance(data_repeat, int) or data_repeat < 1:
            raise ValueError(f"data_repeat must be a positive int, got {data_repeat!r}")
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
        self.max_device_batch, self.data_repeat = max_device_batch, data_repeat
        self._micro = 1
        self._step = (0, 0, 0)  # samples of this rank's epoch share seen, in it, per step
        self._held: Dict[nn.Parameter, torch.Tensor] = {}
        self._scale = 1.0
        self._warned_own_loader = False

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
        if self.max_device_batch is not None or self.data_repeat > 1:
            self._check_accumulation(strategy)
        if is_distributed():
            for plugin in strategy.plugins:
                if isinstance(plugin, NullSpacePlugin):
                    shard_nullspace_collection(plugin)

    def _check_accumulation(self, strategy) -> None:
        """Refuse, before anything trains, what max_device_batch / data_repeat cannot do exactly."""
        name = type(strategy).__name__
        if any(isinstance(p, ReplayPlugin) for p in strategy.plugins):
            raise TypeError(f"{name} trains from Avalanche's replay loader from its second experience on; "
                            "max_device_batch and data_repeat need the template's training loader")
        per_rank = check_batch_divisible(strategy.train_mb_size, name="train_mb_size")
        if getattr(strategy, "batch_level_loss", False) and micro_batches(per_rank, self.max_device_batch) > 1:
            raise ValueError(f"max_device_batch {self.max_device_batch}: {name}'s loss depends on the whole batch "
                             "(batch mixing, per-batch class weights), so micro-batches would not give the large "
                             f"batch's gradients; use max_device_batch >= {per_rank} (or more processes)")

    def before_training_exp(self, strategy, **kwargs) -> None:
        check_batch_divisible(strategy.train_mb_size, name="train_mb_size")
        self._ddp, self._template_loader = None, strategy.dataloader

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._step, self._micro = (0, 0, 0), 1
        if self.owns_loader(strategy):
            data = strategy.adapted_dataset
            per_rank = check_batch_divisible(strategy.train_mb_size, name="train_mb_size")
            self._micro = micro_batches(per_rank, self.max_device_batch)
            strategy.dataloader = self._template_loader = distributed_loader(
                data, strategy.train_mb_size, self.seed, self.epoch_seed_offset(strategy),
                collate_fn=getattr(data, "collate_fn", None), num_workers=self.num_workers,
                pin_memory=torch.device(strategy.device).type == "cuda", micro=self._micro, repeat=self.data_repeat)
            self._step = (0, len(strategy.dataloader.sampler), per_rank)
            self._held = {}
            strategy.optimizer_steps_per_epoch = -(-self._step[1] // per_rank)
        elif getattr(strategy, "shards_own_loader", False):
            # the strategy's own global batches (replay under torchrun, Mamba-FSCIL's incremental sessions)
            if (self.max_device_batch is not None or self.data_repeat > 1) and not self._warned_own_loader:
                self._warned_own_loader = True
                warnings.warn(f"{type(strategy).__name__}'s own training loader makes its own batches: "
                              "max_device_batch and data_repeat apply only where it trains from the template's loader")
        elif self.max_device_batch is not None or self.data_repeat > 1:
            raise TypeError(f"{type(strategy).__name__} trains from its own loader "
                            f"({type(strategy.dataloader).__name__}); max_device_batch and data_repeat need the "
                            "template's training loader")
        else:
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

    def before_training_iteration(self, strategy, **kwargs) -> None:
        seen, total, per_rank = self._step
        if not total:  # the strategy's own loader: one step per batch
            strategy.accumulating_gradients = False
            return
        n_step = min(per_rank, total - seen // per_rank * per_rank)
        n = len(strategy.mb_y)
        self._scale = n / n_step
        self._step = (seen + n, total, per_rank)
        strategy.accumulating_gradients = (seen + n) % per_rank != 0 and seen + n < total

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs) -> None:
        """Accumulate the micro-batch's gradient, scaled by its share of the step; release it at the step's end."""
        if self._micro == 1:
            return
        for group in strategy.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    held = self._held.get(p)
                    self._held[p] = p.grad.mul_(self._scale) if held is None else held.add_(p.grad, alpha=self._scale)
                    p.grad = None
        if not strategy.accumulating_gradients:
            for p, grad in self._held.items():
                p.grad = grad
            self._held = {}

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if self._held:
            raise RuntimeError("gradient accumulation ended an epoch with held gradients (a bug: the last "
                               "micro-batch of every epoch steps)")
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
