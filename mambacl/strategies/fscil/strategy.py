"""The Mamba-FSCIL strategy: base session on images, incremental sessions on cached backbone maps.

Base session: backbone + base branch + fixed ETF head trained end to end with the dot-regression loss, optionally
on batches mixed by mixup / cutmix (``base_mixing``, :mod:`mambacl.strategies.fscil.augment`; off by default,
the CIFAR-100 config's values in :data:`~mambacl.strategies.fscil.augment.PUBLISHED_BASE_MIXING`).
Incremental session t (xiaojieli0903/Mamba-FSCIL ``mmfscil/apis/fscil.py``, without its distributed set-up):
the backbone is frozen and its maps are extracted once with the eval transform; the training set is the
session's shots, plus the mean map of every earlier novel class repeated ``copy`` times, plus the base
class prototypes (mean maps) repeated ``base_copy`` times; a fresh zero-gated incremental branch is trained
for ``inc_steps`` SGD steps with feature mixup (lam 0.5 on the projector output, probability ``mixup_prob``), the
dot-regression,
suppression and separation losses. See ``fscil.md`` for the published protocol.

Data-parallel (a :class:`~mambacl.strategies.plugins.DistributedPlugin` under torchrun): the base session
trains on the plugin's sharded image loader; the base prototypes are summed per class over round-robin shards
of the base set and all-reduced; the few shots are mapped on every rank; each incremental step's global batch,
drawn identically on every rank, is split between the ranks, and the model runs DDP-wrapped in both phases.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from mambacl.strategies import class_stats
from mambacl.strategies.distributed import (ShardedBatchSampler, all_reduce_statistics_, broadcast_object,
                                            check_batch_divisible, gather_rows, round_robin_loader, unwrap_model)
from mambacl.strategies.fscil.augment import BatchMixing, mix_batch
from mambacl.strategies.fscil.backbones import FeatureMapBackbone
from mambacl.strategies.fscil.etf import ETFHead, cosine_regression_loss, dot_regression_loss, length_weights
from mambacl.strategies.fscil.losses import LOSS_WEIGHTS, FSCILLossWeights, separation_loss, suppression_loss
from mambacl.strategies.fscil.neck import MambaNeck, NeckOutput
from mambacl.strategies.registry import TrainSetup, register_strategy

__all__ = ["FSCILProtocol", "PROTOCOLS", "FSCILModel", "MambaFSCIL", "fscil_summary", "mamba_fscil"]


@dataclass(frozen=True)
class FSCILProtocol:
    """Per-dataset architecture and training settings of Mamba-FSCIL (fscil.md sections 1 and 3).

    Attributes:
        dim: neck width D; use_residual_proj: ``r = Linear(C -> D)(GAP(F))``.
        num_layers, inc_num_layers: MLP depth of the base and incremental branches.
        base_lr_mult: lr multiplier of the base branch in incremental sessions (0: frozen and detached).
        base_lr, base_warmup, base_min_lr_ratio: base-session SGD lr, warmup iterations, cosine floor.
        inc_lr, inc_steps, inc_warmup: incremental-session SGD lr, steps (one value or one per incremental
            session) and warmup steps.
        copy: repeats of each earlier novel class mean; base_copy: repeats of the base prototypes, one value
            or one per incremental session.
        mixup_prob: probability of feature mixup (lam 0.5) per incremental step.
        with_len_base: dot-regression target lengths in the base session.
        weights: the incremental-session loss weights.
        base_mixing: base-session batch mixup/cutmix (a :class:`BatchMixing` or a mapping of its fields); off in
            every preset (the published values are :data:`~mambacl.strategies.fscil.augment.PUBLISHED_BASE_MIXING`,
            e.g. ``overrides=dict(base_mixing=PUBLISHED_BASE_MIXING["cifar100"])``).
    """

    dim: int
    use_residual_proj: bool
    num_layers: int
    inc_num_layers: int
    base_lr_mult: float
    base_lr: float
    base_warmup: int
    base_min_lr_ratio: float
    inc_lr: float
    inc_steps: Union[int, Tuple[int, ...]]
    inc_warmup: int
    copy: int
    base_copy: Union[int, Tuple[int, ...]]
    mixup_prob: float
    with_len_base: bool
    weights: FSCILLossWeights
    base_mixing: BatchMixing = BatchMixing()

    def per_session(self, name: str, session: int) -> int:
        """The value of field ``name`` (an int or one int per incremental session) in ``session`` (1-based)."""
        value = getattr(self, name)
        if isinstance(value, int):
            return value
        if not 1 <= session <= len(value):
            raise ValueError(f"{name} has {len(value)} values, one per incremental session; session {session} has "
                             "none (give one value, or one per session)")
        return value[session - 1]


#: Published settings (the *_eval_mambafscil.py configs' step_list, copy_list, base_copy_list per incremental
#: session). CUB's SS2D neck is replaced by the four-scan block.
PROTOCOLS: Dict[str, FSCILProtocol] = {
    "cifar100": FSCILProtocol(640, False, 2, 2, 0.0, 0.25, 100, 0.01, 0.25, 200, 5, 1, 1, 0.75, False,
                              LOSS_WEIGHTS["cifar100"]),
    "mini_imagenet": FSCILProtocol(512, True, 2, 2, 0.0, 0.25, 3000, 0.01, 0.01, tuple(range(100, 171, 10)), 5, 10,
                                   tuple(range(1, 9)), 0.3, True, LOSS_WEIGHTS["mini_imagenet"]),
    "cub200": FSCILProtocol(1024, True, 2, 3, 0.2, 0.2, 0, 0.1, 0.05, tuple(range(200, 291, 10)), 5, 10,
                            (1, 1, 2, 2, 3, 3, 1, 1, 1, 1), 0.5, False, LOSS_WEIGHTS["cub200"]),
}


class FSCILModel(nn.Module):
    """Backbone -> :class:`MambaNeck` -> :class:`ETFHead`; ``forward`` gives the logits of the seen classes.

    Args:
        backbone: a module returning ``[b, C, H, W]`` maps with ``out_shape = (C, H, W)``.
        neck: the projector.
        head: the fixed ETF classifier.
    """

    def __init__(self, backbone: FeatureMapBackbone, neck: MambaNeck, head: ETFHead) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head

    def forward(self, x: torch.Tensor, *, from_maps: bool = False, mix_perm: Optional[torch.Tensor] = None,
                return_neck: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, NeckOutput]]:
        """Cosine logits of the seen classes, ``[b, num_seen]``.

        Args:
            x: ``[b, 3, H, W]`` images, or backbone maps ``[b, C, h, w]`` when ``from_maps``.
            mix_perm: feature mixup with lam 0.5: the projector output becomes ``(f + f[mix_perm]) / 2`` (the
                authors' ``mixup_feat`` on the neck's output, mmfscil/models/classifier.py); the neck's other
                outputs (the suppression and separation inputs) stay those of the unmixed batch.
            return_neck: also return the neck's :class:`NeckOutput` (the losses' inputs, ``feat`` mixed).
        """
        maps = x if from_maps else self.backbone(x)
        neck_out = self.neck(maps)
        if mix_perm is not None:
            neck_out = replace(neck_out, feat=0.5 * neck_out.feat + 0.5 * neck_out.feat[mix_perm])
        logits = self.head(neck_out.feat)
        return (logits, neck_out) if return_neck else logits


def fscil_summary(accuracies: Sequence[float]) -> Dict[str, object]:
    """Per-session accuracies with their average and the performance drop (first - last), as in the papers."""
    accs = [float(a) for a in accuracies]
    if not accs:
        raise ValueError("accuracies must hold at least one session")
    return {"sessions": accs, "avg": sum(accs) / len(accs), "pd": accs[0] - accs[-1]}


class MambaFSCIL(SupervisedTemplate):
    """Mamba-FSCIL (Li et al., arXiv 2407.06136) as an Avalanche template; train one experience per session.

    Keyword-only. ``protocol`` picks the dataset preset of :data:`PROTOCOLS`; ``overrides`` replaces any of
    its fields (e.g. ``dict(inc_steps=10)``); the neck's width defaults to the backbone's channels without a
    residual projection. The base session runs ``train_epochs`` epochs of ``train_mb_size``; incremental
    sessions run ``inc_steps`` steps of ``inc_mb_size`` whatever ``train_epochs`` is.

    Args:
        backbone: timm name ('resnet12', 'resnet18', 'vim_tiny_patch16_224', 'test_resnet12', ...) or a
            :class:`FeatureMapBackbone`.
        img_size: input resolution.
        num_classes: K, all classes of the benchmark (the ETF is built over all of them).
        num_base: number of base classes (labels below it are "base" for the losses).
        protocol: 'cifar100', 'mini_imagenet' or 'cub200'.
        overrides: fields of :class:`FSCILProtocol` to replace.
        d_state, dt_rank, d_conv, scan_impl: SSM options of the neck.
        inc_mb_size: incremental batch size (64 in the paper).
        fresh_branch: build a new zero-gated incremental branch every session (earlier novel classes live on
            as replayed class means), so each session starts from exactly the previous session's features;
            False trains one branch across all sessions.
        optimizer: base-session optimizer; default SGD(base_lr, momentum 0.9, wd 5e-4) on every parameter.
        Other arguments are SupervisedTemplate's.

    Example:
        >>> strategy = MambaFSCIL(backbone="resnet12", img_size=32, num_classes=100, num_base=60,
        ...                       train_mb_size=512, train_epochs=200)  # doctest: +SKIP
        >>> strategy.run(bench.train_stream, bench.test_stream)  # doctest: +SKIP
        {'sessions': [...], 'avg': ..., 'pd': ...}
    """

    # DistributedPlugin / the run layer: the base-session loss mixes and weights across the batch, and the
    # strategy schedules its own learning rate
    batch_level_loss = True
    own_lr_schedule = True

    def __init__(self, *, backbone: Union[str, FeatureMapBackbone] = "resnet12", img_size: int = 32,
                 num_classes: int = 100, num_base: int = 60, protocol: str = "cifar100",
                 overrides: Optional[Dict[str, object]] = None, d_state: int = 256, dt_rank: int = 256,
                 d_conv: int = 4, scan_impl: str = "auto", inc_mb_size: int = 64, fresh_branch: bool = True,
                 optimizer: Optional[torch.optim.Optimizer] = None, train_mb_size: int = 64, train_epochs: int = 1,
                 eval_mb_size: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 plugins: Optional[List[BasePlugin]] = None,
                 evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
                 eval_every: int = -1, **base_kwargs) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        if not 0 < num_base < num_classes:
            raise ValueError(f"num_base must be in (0, num_classes={num_classes}), got {num_base}")
        if inc_mb_size < 1:
            raise ValueError(f"inc_mb_size must be >= 1, got {inc_mb_size}")
        try:
            self.protocol = replace(PROTOCOLS[protocol], **(overrides or {}))
        except TypeError as err:
            raise TypeError(f"overrides must name FSCILProtocol fields: {err}") from None
        if isinstance(self.protocol.base_mixing, dict):
            self.protocol = replace(self.protocol, base_mixing=BatchMixing(**self.protocol.base_mixing))
        if not isinstance(self.protocol.base_mixing, BatchMixing):
            raise TypeError(f"overrides['base_mixing'] must be a BatchMixing or a mapping of its fields, got "
                            f"{type(self.protocol.base_mixing).__name__}")
        if isinstance(backbone, str):
            backbone = FeatureMapBackbone(backbone, img_size)
        chs, height, width = backbone.out_shape
        p = self.protocol
        neck = MambaNeck(chs, p.dim if p.use_residual_proj else chs, (height, width), p.num_layers,
                         p.inc_num_layers, p.use_residual_proj, detach_base=p.base_lr_mult == 0, d_state=d_state,
                         dt_rank=dt_rank, d_conv=d_conv, scan_impl=scan_impl)
        head = ETFHead(neck.dim, num_classes)
        head.num_seen = num_base
        model = FSCILModel(backbone, neck, head)
        if optimizer is None:
            optimizer = torch.optim.SGD(model.parameters(), lr=p.base_lr, momentum=0.9, weight_decay=5e-4)
        self.num_classes, self.num_base, self.inc_mb_size = num_classes, num_base, inc_mb_size
        self.fresh_branch = fresh_branch
        self.session = 0
        self.session_accuracies: List[float] = []
        self._base_dataset = None
        self._prototypes: Dict[int, torch.Tensor] = {}
        self._scheduler: Optional[CosineLRScheduler] = None
        self._updates = 0
        self._mix: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None
        self._neck_out: Optional[NeckOutput] = None
        super().__init__(model=model, optimizer=optimizer, train_mb_size=train_mb_size, train_epochs=train_epochs,
                         eval_mb_size=eval_mb_size, device=device, plugins=plugins, evaluator=evaluator,
                         eval_every=eval_every, **base_kwargs)

    # ----------------------------------------------------------------------------------------- set-up
    @property
    def fscil_model(self) -> FSCILModel:
        """The model without a DDP wrapper."""
        return unwrap_model(self.model)

    @property
    def uses_template_loader(self) -> bool:
        """Base session: the template's image loader, which a DistributedPlugin may shard."""
        return self.session == 0

    @property
    def shards_own_loader(self) -> bool:
        """Incremental sessions: the cached-map loader already gives each rank its share of every batch."""
        return self.session > 0

    def _before_training_exp(self, **kwargs) -> None:
        self.session = self.clock.train_exp_counter
        seen = max(self.experience.classes_in_this_experience) + 1
        self.fscil_model.head.num_seen = max(self.fscil_model.head.num_seen, seen)
        if self.session > 0 and (self.fresh_branch or self.fscil_model.neck.inc is None):
            self.fscil_model.neck.add_incremental_branch()
        super()._before_training_exp(**kwargs)
        p = self.protocol
        if self.session > 0:
            self._scheduler = CosineLRScheduler(self.optimizer, t_initial=p.per_session("inc_steps", self.session),
                                                warmup_t=p.inc_warmup,
                                                warmup_prefix=True, t_in_epochs=False)
        self._updates = 0

    def _before_training_epoch(self, **kwargs) -> None:
        super()._before_training_epoch(**kwargs)
        if self.session == 0 and self.clock.train_exp_epochs == 0:
            # optimizer steps of the whole base session, counted once its loader exists: a DistributedPlugin says
            # how many global steps an epoch takes (repeated data, micro-batches, this rank's share)
            steps = getattr(self, "optimizer_steps_per_epoch", None) or len(self.dataloader)
            p = self.protocol
            self._scheduler = CosineLRScheduler(self.optimizer, t_initial=max(self.train_epochs * steps, 1),
                                                warmup_t=p.base_warmup, lr_min=p.base_lr * p.base_min_lr_ratio,
                                                warmup_prefix=True, t_in_epochs=False)

    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool = True, pin_memory: Optional[bool] = None,
                              persistent_workers: bool = False, drop_last: bool = False, **kwargs) -> None:
        """Images for the base session; cached maps (see :meth:`incremental_training_set`) afterwards."""
        if self.session == 0:
            super().make_train_dataloader(num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
                                          persistent_workers=persistent_workers, drop_last=drop_last, **kwargs)
            return
        maps, labels = self.incremental_training_set()
        data = TensorDataset(maps, labels, torch.zeros_like(labels))
        batch = min(self.inc_mb_size, len(data))
        check_batch_divisible(batch, name="incremental batch min(inc_mb_size, training set size)")
        # inc_steps drop_last batches from back-to-back random permutations of the set, the same on every rank
        generator = torch.Generator().manual_seed(broadcast_object(int(torch.randint(2 ** 62, ()))))
        steps = self.protocol.per_session("inc_steps", self.session)
        sampler = RandomSampler(data, num_samples=steps * batch, generator=generator)
        self.dataloader = DataLoader(data, batch_sampler=ShardedBatchSampler(BatchSampler(sampler, batch, True)))

    def make_optimizer(self, **kwargs) -> None:
        """The caller's optimizer in the base session; afterwards a fresh SGD over the incremental branch (and
        the base branch when ``base_lr_mult > 0``), every other parameter frozen (``requires_grad=False``)."""
        if self.session == 0:
            super().make_optimizer(**kwargs)
            return
        neck, p = self.fscil_model.neck, self.protocol
        groups = [{"params": list(neck.inc.parameters()), "lr": p.inc_lr}]
        if p.base_lr_mult > 0:
            groups.append({"params": neck.base_parameters(), "lr": p.inc_lr * p.base_lr_mult})
        trained = {id(param) for group in groups for param in group["params"]}
        for param in self.fscil_model.parameters():
            param.requires_grad_(id(param) in trained)
        self.optimizer = torch.optim.SGD(groups, lr=p.inc_lr, momentum=0.9, weight_decay=5e-4)

    def _train_exp(self, experience, eval_streams=None, **kwargs) -> None:
        if self.session == 0:
            super()._train_exp(experience, eval_streams, **kwargs)
            return
        self._before_training_epoch(**kwargs)
        self.training_epoch(**kwargs)
        self._after_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs) -> None:
        if self.session == 0:
            self._base_dataset = self.experience.dataset
        super()._after_training_exp(**kwargs)

    # ------------------------------------------------------------------------------------ feature cache
    def _map_batches(self, dataset, sharded: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Backbone maps and labels of ``dataset`` under its eval transform, batch by batch, on the device
        (with ``sharded``, this rank's round-robin share of the batches)."""
        backbone = self.fscil_model.backbone
        was_training = backbone.training
        backbone.eval()
        loader = DataLoader(dataset.eval(), batch_size=self.eval_mb_size or self.train_mb_size)
        try:
            for x, y, *_ in round_robin_loader(loader) if sharded else loader:
                yield backbone(x.to(self.device)), y.to(self.device)
        finally:
            backbone.train(was_training)

    @torch.no_grad()
    def backbone_maps(self, dataset) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone maps of ``dataset`` under its eval transform, ``([n, C, H, W], [n])``, on the device."""
        maps, labels = zip(*self._map_batches(dataset))
        return torch.cat(maps), torch.cat(labels)

    @torch.no_grad()
    def class_means(self, dataset) -> Dict[int, torch.Tensor]:
        """Mean backbone map of every class of ``dataset`` (eval transform), ``{class: [C, H, W]}``.

        Sums are float64; in a process group each rank maps its round-robin share of the batches and the
        per-class sums and counts are all-reduced, so every rank gets the single-process means.
        """
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        for maps, labels in self._map_batches(dataset, sharded=True):
            class_stats.add_class_sums(sums, counts, maps, labels)
        all_reduce_statistics_(sums, counts)
        return class_stats.class_means(sums, counts, next(self.fscil_model.parameters()).dtype)

    def incremental_training_set(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The current session's training maps and labels: shots, earlier novel means, base prototypes.

        Returns:
            maps ``[n, C, H, W]`` and labels ``[n]``; the base prototypes are computed on first use.
        """
        if self._base_dataset is None:
            raise RuntimeError("the base session must be trained before an incremental session")
        if not self._prototypes:
            self._prototypes.update(self.class_means(self._base_dataset))
        shots, shot_labels = self.backbone_maps(self.experience.dataset)
        p = self.protocol
        base_copy = p.per_session("base_copy", self.session)
        means = [(c, m) for c, m in sorted(self._prototypes.items())]
        rep_maps = [m for c, m in means for _ in range(base_copy if c < self.num_base else p.copy)]
        rep_labels = [c for c, _ in means for _ in range(base_copy if c < self.num_base else p.copy)]
        shot_sums: Dict[str, torch.Tensor] = {}
        shot_counts: Dict[str, int] = {}
        class_stats.add_class_sums(shot_sums, shot_counts, shots, shot_labels)
        self._prototypes.update(class_stats.class_means(shot_sums, shot_counts, shots.dtype))
        maps = torch.cat([shots, torch.stack(rep_maps)]) if rep_maps else shots
        labels = torch.cat([shot_labels, torch.tensor(rep_labels, dtype=torch.long, device=shots.device)])
        return maps, labels

    # --------------------------------------------------------------------------------- forward and loss
    def forward(self) -> torch.Tensor:
        """Images -> logits in the base session (mixed by ``base_mixing`` when on) and in eval; cached maps
        (with feature mixup) -> logits in the incremental sessions."""
        from_maps = self.is_training and self.session > 0
        x, perm, self._mix = self.mb_x, None, None
        if self.is_training and self.session == 0 and self.protocol.base_mixing.enabled:
            mixed = mix_batch(self.mb_x, self.mb_y, self.protocol.base_mixing)
            x = mixed.x
            if mixed.y_b is not None:
                self._mix = (mixed.y_a, mixed.y_b, mixed.lam)
        elif from_maps and random.random() < self.protocol.mixup_prob:
            perm = torch.randperm(self.mb_x.shape[0], device=self.mb_x.device)
            self._mix = (self.mb_y, self.mb_y[perm], 0.5)
        logits, self._neck_out = self.model(x, from_maps=from_maps, mix_perm=perm, return_neck=True)
        return logits

    def criterion(self) -> torch.Tensor:
        """Dot-regression loss, plus suppression and separation after the base session.

        A mixed batch (labels y_a, y_b, ratio lam) gives ``lam L(y_a) + (1 - lam) L(y_b)``; in the base session
        with ``base_mixing.mix_loss == 'authors'`` ``L(y_a)`` is added once more, as the authors' classifier
        does. The batch-level terms (target lengths, suppression, separation) are computed on the global batch,
        gathered over the ranks in a process group (:func:`gather_rows`), so data-parallel training follows the
        single-process gradients.
        """
        if not self.is_training:
            # from the logits: in a process group they are gathered over the ranks, the neck output is not
            return cosine_regression_loss(self.mb_output.gather(1, self.mb_y[:, None])[:, 0])
        p, out = self.protocol, self._neck_out
        labels = gather_rows(self.mb_y)
        with_len = p.with_len_base if self.session == 0 else p.weights.with_len
        lengths = length_weights(labels, self.num_classes) if with_len else None
        etf = self.fscil_model.head.weight
        if self._mix is None:
            loss = dot_regression_loss(out.feat, self.mb_y, etf, lengths)
        else:
            y_a, y_b, lam = self._mix
            loss_a = dot_regression_loss(out.feat, y_a, etf, lengths)
            loss = lam * loss_a + (1 - lam) * dot_regression_loss(out.feat, y_b, etf, lengths)
            if self.session == 0 and p.base_mixing.mix_loss == "authors":
                loss = loss + loss_a
        if self.session == 0:
            return loss
        w = p.weights
        loss = loss + suppression_loss([gather_rows(z) for z in out.inc.z], labels, self.num_base, w.w_s, w.w_sn)
        branches = [(out.inc, w.w_sep)] + ([(out.base, w.w_sep_base)] if w.w_sep_base and p.base_lr_mult > 0 else [])
        for branch, weight in branches:
            selective = [gather_rows(t) for t in (branch.dt_low, branch.B, branch.C)]
            loss = loss + separation_loss(selective, labels, self.num_base, weight)
        return loss

    def optimizer_step(self) -> None:
        super().optimizer_step()
        if getattr(self, "accumulating_gradients", False):
            return  # a micro-batch (DistributedPlugin's max_device_batch): no update happened
        self._updates += 1
        self._scheduler.step_update(self._updates)

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> Dict[str, object]:
        """What a resumed run needs besides the model: session, seen classes, class means, session accuracies."""
        return {"session": self.session, "num_seen": self.fscil_model.head.num_seen,
                "has_incremental_branch": self.fscil_model.neck.inc is not None,
                "prototypes": {c: m.cpu() for c, m in self._prototypes.items()},
                "session_accuracies": list(self.session_accuracies)}

    def restore_checkpoint_state(self, state: Optional[Dict[str, object]], finished: Sequence) -> None:
        """Undo :meth:`checkpoint_state` on a fresh strategy (before its model is loaded); ``finished`` are the
        training experiences done, the first being the base session."""
        if state is None:
            raise ValueError("checkpoint has no Mamba-FSCIL state: it was written by a different strategy")
        model = self.fscil_model
        if state["has_incremental_branch"] and model.neck.inc is None:
            model.neck.add_incremental_branch()
        model.head.num_seen = state["num_seen"]
        self.session = state["session"]
        self._prototypes = {c: m.to(self.device) for c, m in state["prototypes"].items()}
        self.session_accuracies = list(state["session_accuracies"])
        self._base_dataset = finished[0].dataset if finished else None

    # ------------------------------------------------------------------------------------------ results
    def _after_eval_exp(self, **kwargs) -> None:
        super()._after_eval_exp(**kwargs)
        # The test experience of the session just trained holds every class seen so far: the session accuracy.
        exp_id = self.experience.current_experience
        trained = self.clock.train_exp_counter - 1
        if exp_id == trained:
            key = next((k for k in self.evaluator.get_last_metrics() if k.startswith("Top1_Acc_Exp/eval_phase/")
                        and k.endswith(f"Exp{exp_id:03d}")), None)
            if key is not None:
                del self.session_accuracies[trained:]
                self.session_accuracies.append(float(self.evaluator.get_last_metrics()[key]))

    def session_accuracy(self, test_experience) -> float:
        """Evaluate one test experience (all classes seen so far) and return its top-1 accuracy."""
        metrics = self.eval([test_experience])
        key = next((k for k in metrics if k.startswith("Top1_Acc_Exp/eval_phase/")
                    and k.endswith(f"Exp{test_experience.current_experience:03d}")), None)
        if key is None:
            raise RuntimeError("the evaluator records no Top1_Acc_Exp metric; add accuracy_metrics(experience=True)")
        return float(metrics[key])

    def summary(self) -> Dict[str, object]:
        """:func:`fscil_summary` of the accuracies recorded when each session's test experience was evaluated."""
        return fscil_summary(self.session_accuracies)

    def run(self, train_stream, test_stream) -> Dict[str, object]:
        """Train every session and evaluate on its test experience. Returns :func:`fscil_summary` (fractions)."""
        for train_exp, test_exp in zip(train_stream, test_stream):
            self.train(train_exp)
            self.session_accuracy(test_exp)
        return self.summary()


@register_strategy("mamba-fscil")
def mamba_fscil(setup: TrainSetup, *, protocol: str = "cifar100", num_classes: int = 100, num_base: int = 60,
                img_size: int = 32, base_lr: Optional[float] = None, inc_steps: Optional[int] = None,
                inc_mb_size: int = 64, d_state: int = 256, dt_rank: int = 256, fresh_branch: bool = True,
                base_mixup_alpha: float = 0.0, base_mixup_prob: float = 0.0, base_cutmix_alpha: float = 0.0,
                base_cutmix_prob: float = 0.0, base_mix_loss: str = "authors") -> MambaFSCIL:
    """Mamba-FSCIL: dual selective SSM projector on the backbone's map, fixed ETF head (see MambaFSCIL).

    SGD at the protocol's learning rates; the run's (AdamW) lr and weight decay do not apply. Use a
    feature-map backbone: 'resnet12' (CIFAR/mini), 'resnet18' (CUB) or a Vim without cls token.

    Args:
        protocol: 'cifar100', 'mini_imagenet' or 'cub200' (published settings, see PROTOCOLS).
        num_classes, num_base: all classes and base classes (CUB: 200, 100).
        img_size: input resolution (CIFAR 32, mini 84, CUB 224).
        base_lr, inc_steps: override the protocol's base-session lr and incremental steps.
        inc_mb_size: incremental batch. d_state, dt_rank: SSM sizes of the neck.
        fresh_branch: a new zero-gated incremental branch every session.
        base_mixup_alpha, base_mixup_prob, base_cutmix_alpha, base_cutmix_prob, base_mix_loss: base-session
            batch mixup/cutmix (:class:`BatchMixing`); off by default. Published (CIFAR-100 only): mixup alpha
            0.8 prob 0.4, cutmix alpha 1.0 prob 0.4, loss 'authors'; miniImageNet and CUB use none.
    """
    try:
        mixing = BatchMixing(base_mixup_alpha, base_mixup_prob, base_cutmix_alpha, base_cutmix_prob, base_mix_loss)
    except ValueError as err:
        raise ValueError(f"base_{err}") from None  # the messages start with the field name
    overrides = {k: v for k, v in (("base_lr", base_lr), ("inc_steps", inc_steps)) if v is not None}
    return MambaFSCIL(backbone=FeatureMapBackbone(setup.backbone, img_size), img_size=img_size,
                      num_classes=num_classes, num_base=num_base, protocol=protocol,
                      overrides={**overrides, "base_mixing": mixing}, d_state=d_state, dt_rank=dt_rank,
                      inc_mb_size=inc_mb_size, fresh_branch=fresh_branch, **setup.template_kwargs())
