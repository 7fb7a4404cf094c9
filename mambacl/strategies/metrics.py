"""Avalanche metrics that separate what a class-incremental model knows from how its heads are calibrated.

- Within-task accuracy (task-incremental accuracy): for each test sample of experience j, the argmax of the
  model's output restricted to the classes of experience j. High within-task and low class-incremental accuracy
  means the heads of different experiences are not calibrated against each other.
- Feature NCM accuracy: class means of the current model's features (the head's input, pre-logits) over the
  training data (eval transform) of every experience trained so far, and the cosine nearest-class-mean accuracy
  of the test samples with them. It measures the features independently of the head.

Both come per evaluated experience and sample-weighted over the evaluated stream; add them to your own
``EvaluationPlugin(*within_task_accuracy_metrics(), *feature_ncm_accuracy_metrics(), ...)``. Names in
``get_last_metrics()``: ``Top1_WithinTaskAcc_Exp/eval_phase/test_stream/Task000/Exp003``,
``Top1_WithinTaskAcc_Stream/eval_phase/test_stream/Task000``, and the same with ``Top1_FeatureNCMAcc``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from avalanche.evaluation import GenericPluginMetric, Metric, PluginMetric
from avalanche.evaluation.metrics import Accuracy
from torch.utils.data import DataLoader

from mambacl.strategies.class_stats import add_class_sums, module_inputs
from mambacl.strategies.distributed import all_reduce_statistics_, all_reduce_sum_, rank, round_robin_loader
from mambacl.strategies.plugins.prototype import trained_experiences

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = ["FeatureNCM", "FeatureNCMAccuracy", "WithinTaskAccuracy", "feature_ncm_accuracy_metrics",
           "ncm_predict", "restricted_predictions", "within_task_accuracy_metrics"]

_RESET_EMIT = {"experience": ("experience", "Exp"), "stream": ("stream", "Stream")}


def restricted_predictions(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Argmax of ``logits`` [b, C] over the columns ``classes`` only (ties: the smallest class id).

    Returns:
        [b] predicted class ids; -1 when none of ``classes`` is a column of ``logits``.
    """
    cols = torch.tensor(sorted(int(c) for c in classes if 0 <= int(c) < logits.shape[1]), dtype=torch.long,
                        device=logits.device)
    if cols.numel() == 0:
        return torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    return cols[logits[:, cols].argmax(dim=1)]


def ncm_predict(features: torch.Tensor, classes: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Cosine nearest-class-mean predictions.

    Args:
        features: [b, D]. classes: [k] class ids of ``means`` [k, D].
    Returns:
        [b] class ids (-1 for every sample when k = 0).
    """
    if classes.numel() == 0:
        return torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
    sims = F.normalize(features.double(), dim=1) @ F.normalize(means.double(), dim=1).T
    return classes.to(features.device)[sims.argmax(dim=1)]


def _check_granularity(level: str) -> Tuple[str, str]:
    if level not in _RESET_EMIT:
        raise ValueError(f"level must be 'experience' or 'stream', got {level!r}")
    return _RESET_EMIT[level]


class WithinTaskAccuracy(GenericPluginMetric[float, Accuracy]):
    """Accuracy of the argmax restricted to the evaluated experience's classes (eval phase).

    Args:
        level: 'experience' (reset and emitted per evaluated experience: ``Top1_WithinTaskAcc_Exp``) or 'stream'
            (sample-weighted over the evaluated stream: ``Top1_WithinTaskAcc_Stream``).
    """

    def __init__(self, level: str = "experience") -> None:
        at, self._suffix = _check_granularity(level)
        super().__init__(Accuracy(), reset_at=at, emit_at=at, mode="eval")

    def update(self, strategy: SupervisedTemplate) -> None:
        classes = strategy.experience.classes_in_this_experience
        self._metric.update(restricted_predictions(strategy.mb_output, classes), strategy.mb_y)

    def __str__(self) -> str:
        return f"Top1_WithinTaskAcc_{self._suffix}"


class _Counts(Metric[float]):
    """Running accuracy from (correct, total) counts."""

    def __init__(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, correct: int, total: int) -> None:
        self.correct += correct
        self.total += total

    def result(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def reset(self) -> None:
        self.correct, self.total = 0, 0


class FeatureNCM:
    """Shared state of the feature-NCM metrics: the training datasets seen, the class means, the feature hook.

    The means are recomputed at the start of an evaluation when the model may have changed since the last
    ones (the strategy's clock moved or a dataset was added): one pass of the current model (eval mode, no
    grad) over the training data of every experience trained so far, with the eval transform. In a process
    group each rank takes every W-th batch of that pass and the float64 sums are all-reduced; the per-batch
    counts of the test samples are all-reduced too, so every rank reports the single-process value.

    Pickling (checkpoints) keeps the number of recorded experiences but drops the datasets (they can be whole
    image sets): after restoring, call :meth:`set_train_datasets` before the next evaluation.

    Args:
        feature_module: dotted name of the module whose input is the feature (``ContinualClassifier``: 'head').
        mb_size: batch size of the means pass (default the strategy's eval_mb_size).
    """

    def __init__(self, feature_module: str = "head", mb_size: Optional[int] = None) -> None:
        if not isinstance(feature_module, str) or not feature_module:
            raise ValueError(f"feature_module must be a non-empty module name, got {feature_module!r}")
        if mb_size is not None and (isinstance(mb_size, bool) or not isinstance(mb_size, int) or mb_size < 1):
            raise ValueError(f"mb_size must be None or a positive int, got {mb_size!r}")
        self.feature_module, self.mb_size = feature_module, mb_size
        self.datasets: Dict[int, Any] = {}   # experience id -> its training dataset
        self.recorded: List[int] = []
        self.classes = torch.zeros(0, dtype=torch.long)
        self.means = torch.zeros(0, 0, dtype=torch.float64)
        self._key: Optional[tuple] = None
        self._handle: Any = None
        self._labels: Optional[torch.Tensor] = None
        self._batch: Optional[Tuple[int, torch.Tensor]] = None   # (batch index, local features)
        self._counted: Optional[Tuple[int, int, int]] = None     # (batch index, correct, total)
        self._batches = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(datasets={}, _key=None, _handle=None, _labels=None, _batch=None, _counted=None)
        return state

    def record(self, experience: Any) -> None:
        """Remember a trained experience's training dataset."""
        exp_id = int(experience.current_experience)
        self.datasets[exp_id] = experience.dataset
        if exp_id not in self.recorded:
            self.recorded.append(exp_id)

    def set_train_datasets(self, datasets: Dict[int, Any]) -> None:
        """Give back the training datasets ``{experience id: dataset}`` after unpickling (see the class doc)."""
        self.datasets.update({int(k): v for k, v in datasets.items()})
        for k in datasets:
            if int(k) not in self.recorded:
                self.recorded.append(int(k))
        self._key = None

    def module(self, strategy: SupervisedTemplate) -> torch.nn.Module:
        try:
            return strategy.model.get_submodule(self.feature_module)
        except AttributeError:
            raise ValueError(f"feature_module {self.feature_module!r} is not a submodule of the strategy's model "
                             f"({type(strategy.model).__name__})") from None

    @torch.no_grad()
    def refresh(self, strategy: SupervisedTemplate) -> None:
        """Recompute the class means if the model or the recorded experiences changed since the last ones."""
        missing = [e for e in self.recorded if e not in self.datasets]
        if missing:
            raise RuntimeError(f"FeatureNCM has no training dataset for experience(s) {missing} (dropped when it was "
                               "pickled into a checkpoint): call set_train_datasets({id: train_stream[id].dataset}) "
                               "after restoring")
        key = (strategy.clock.train_iterations, strategy.clock.train_exp_counter, tuple(self.recorded))
        if key == self._key:
            return
        module = self.module(strategy)
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        for exp_id in self.recorded:
            dataset = self.datasets[exp_id].eval()
            loader = DataLoader(dataset, batch_size=self.mb_size or strategy.eval_mb_size or strategy.train_mb_size,
                                shuffle=False, collate_fn=getattr(dataset, "collate_fn", None))
            for (features,), labels in module_inputs(strategy.model, [module], round_robin_loader(loader),
                                                     strategy.device):
                add_class_sums(sums, counts, features, labels)
        all_reduce_statistics_(sums, counts)
        ids = sorted(sums, key=int)
        self.classes = torch.tensor([int(k) for k in ids], dtype=torch.long)
        self.means = torch.stack([sums[k] / counts[k] for k in ids]) if ids else torch.zeros(0, 0, dtype=torch.float64)
        self._key = key

    # -- evaluation hooks, driven by the metrics -----------------------------------------------------------------
    def start(self, strategy: SupervisedTemplate) -> None:
        """Refresh the means and read the feature module's input on every evaluation forward."""
        self.refresh(strategy)
        if self._handle is None:
            self._handle = self.module(strategy).register_forward_pre_hook(self._read)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _read(self, module: torch.nn.Module, args: tuple) -> None:
        self._batches += 1
        self._batch = (self._batches, args[0].detach())

    def set_labels(self, labels: torch.Tensor) -> None:
        """This rank's labels of the coming evaluation batch (before a data-parallel gather)."""
        self._labels = labels

    def batch_counts(self, n_global: int) -> Tuple[int, int]:
        """(correct, total) NCM predictions of the last evaluation batch, summed over ranks.

        Args:
            n_global: samples in the (gathered) batch. A rank index >= it means this rank's chunk was empty and
                it ran a placeholder sample (``EvalShardSampler``), which is not counted.
        """
        if self._batch is None or self._labels is None:
            raise RuntimeError("FeatureNCM saw no feature-module input in this evaluation batch")
        index, features = self._batch
        if self._counted is None or self._counted[0] != index:
            real = rank() < n_global
            preds = ncm_predict(features, self.classes, self.means.to(features.device))
            counts = torch.tensor([int((preds == self._labels.to(preds.device)).sum()) if real else 0,
                                   len(preds) if real else 0], dtype=torch.int64)
            all_reduce_sum_([counts])
            self._counted = (index, int(counts[0]), int(counts[1]))
        return self._counted[1], self._counted[2]


class FeatureNCMAccuracy(GenericPluginMetric[float, _Counts]):
    """Cosine nearest-class-mean accuracy of the current features (see :class:`FeatureNCM`; eval phase).

    Args:
        level: 'experience' (``Top1_FeatureNCMAcc_Exp``) or 'stream' (``Top1_FeatureNCMAcc_Stream``).
        ncm: the shared state (one pass for several metrics); a new :class:`FeatureNCM` when None.
    """

    def __init__(self, level: str = "experience", ncm: Optional[FeatureNCM] = None) -> None:
        at, self._suffix = _check_granularity(level)
        super().__init__(_Counts(), reset_at=at, emit_at=at, mode="eval")
        self.ncm = ncm if ncm is not None else FeatureNCM()

    def update(self, strategy: SupervisedTemplate) -> None:
        self._metric.update(*self.ncm.batch_counts(len(strategy.mb_y)))

    def after_training_exp(self, strategy: SupervisedTemplate):
        for experience in trained_experiences(strategy):
            self.ncm.record(experience)
        return super().after_training_exp(strategy)

    def before_eval(self, strategy: SupervisedTemplate):
        self.ncm.start(strategy)
        return super().before_eval(strategy)

    def before_eval_forward(self, strategy: SupervisedTemplate):
        self.ncm.set_labels(strategy.mb_y)
        return super().before_eval_forward(strategy)

    def after_eval(self, strategy: SupervisedTemplate):
        out = super().after_eval(strategy)
        self.ncm.stop()
        return out

    def __str__(self) -> str:
        return f"Top1_FeatureNCMAcc_{self._suffix}"


def within_task_accuracy_metrics(*, experience: bool = True, stream: bool = True) -> List[PluginMetric]:
    """Within-task accuracy per evaluated experience and/or over the evaluated stream."""
    return [WithinTaskAccuracy(level) for level, on in (("experience", experience), ("stream", stream)) if on]


def feature_ncm_accuracy_metrics(*, experience: bool = True, stream: bool = True, feature_module: str = "head",
                                 mb_size: Optional[int] = None) -> List[PluginMetric]:
    """Feature-NCM accuracy per evaluated experience and/or over the stream, sharing one means pass.

    Args:
        feature_module: module whose input is the feature (see :class:`FeatureNCM`). mb_size: its batch size.
    """
    ncm = FeatureNCM(feature_module, mb_size)
    return [FeatureNCMAccuracy(level, ncm) for level, on in (("experience", experience), ("stream", stream)) if on]
