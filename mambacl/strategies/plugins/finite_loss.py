"""FiniteLossPlugin: stop training at the first NaN/inf loss, before the optimizer step that would apply it."""
from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from mambacl.strategies.distributed import all_reduce_sum_, is_distributed

__all__ = ["FiniteLossPlugin", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the experience, epoch and iteration."""


class FiniteLossPlugin(SupervisedPlugin, supports_distributed=True):
    """Raises :class:`NonFiniteLossError` when the loss (penalties of other plugins included) is not finite.

    Runs in ``before_update``, after every plugin's ``before_backward`` added its terms and before the
    optimizer step and any null-space projection, so no NaN reaches the parameters, the optimizer state or
    statistics gathered after the experience. One host sync per iteration; inside a process group the flag is
    summed over the ranks, so every rank stops at the same iteration.
    """

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        bad = (~torch.isfinite(strategy.loss.detach())).any().to(torch.float32).reshape(1)
        if is_distributed():
            all_reduce_sum_([bad])
        if bad.item():
            clock = strategy.clock
            raise NonFiniteLossError(
                f"the training loss is {float(strategy.loss.detach().reshape(-1)[0])} (on at least one rank) at "
                f"experience {strategy.experience.current_experience}, epoch {clock.train_exp_epochs + 1}, iteration "
                f"{clock.train_epoch_iterations + 1}; training stopped before this step (lower the learning rate, "
                "or check the data and the autocast setting)")
