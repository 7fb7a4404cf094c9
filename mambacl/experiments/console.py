"""The default console: one progress bar per training experience (epoch and loss), nothing per metric.

Avalanche's InteractiveLogger prints every metric of every evaluation and a bar per epoch (``--verbose``
brings it back); :class:`ExperienceProgress` instead draws a single tqdm bar over all iterations of an
experience's epochs, showing the epoch and the running loss, and closes it when the experience ends so the
run's one summary line per experience follows.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional

from avalanche.core import SupervisedPlugin
from avalanche.logging import BaseLogger
from tqdm.auto import tqdm

__all__ = ["ExperienceProgress"]


class ExperienceProgress(BaseLogger, SupervisedPlugin):
    """One tqdm bar per training experience: ``[strategy] experience k/n`` with epoch and loss.

    Args:
        label: shown before the experience number (e.g. the strategy name).
        refresh_s: the loss shown is read from the device at most this often (one host sync each time).
    """

    def __init__(self, label: str = "", refresh_s: float = 0.5) -> None:
        super().__init__()
        self.label, self.refresh_s = label, refresh_s
        self._bar: Optional[tqdm] = None
        self._shown = 0.0

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        """Metric values are not printed (the run prints one summary line per experience)."""

    def before_training_epoch(self, strategy: Any, metric_values: List[Any], **kwargs: Any) -> None:
        if self._bar is None:
            exp = strategy.experience
            n = len(getattr(exp, "origin_stream", []) or []) or "?"
            prefix = f"[{self.label}] " if self.label else ""
            self._bar = tqdm(total=strategy.train_epochs * len(strategy.dataloader), leave=False, unit="it",
                             desc=f"{prefix}experience {exp.current_experience + 1}/{n}", dynamic_ncols=True)
            self._shown = 0.0

    def after_training_iteration(self, strategy: Any, metric_values: List[Any], **kwargs: Any) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        if now - self._shown >= self.refresh_s:
            self._shown = now
            self._bar.set_postfix(epoch=f"{strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs}",
                                  loss=f"{float(strategy.loss):.4f}", refresh=False)

    def after_training_exp(self, strategy: Any, metric_values: List[Any], **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
