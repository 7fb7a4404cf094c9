"""PrototypePlugin: fits the model's PrototypeHead / RanPACHead after each training experience."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import JointTraining
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mambacl.strategies.class_stats import module_inputs
from mambacl.strategies.heads import FittedHead, fitted_heads

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate


def trained_experiences(strategy: SupervisedTemplate) -> List[Any]:
    """The experiences whose training just finished (in ``after_training_exp``): the current one, or every
    experience for Avalanche's JointTraining, which trains on all at once under the first one's name."""
    if isinstance(strategy, JointTraining):
        return list(strategy._experiences)
    return [strategy.experience]


class PrototypePlugin(SupervisedPlugin, supports_distributed=True):
    """Fits every :class:`~mambacl.strategies.heads.FittedHead` of the model after each training experience.

    In ``after_training_exp`` the updated model runs in eval mode under no_grad over the experience's training
    data (every experience's for JointTraining) with its eval transform, in dataset order; the input of each
    fitted head (its features) is collected and passed to ``head.fit_experience``. This is the only cost of the
    frozen-backbone baselines (SimpleCIL, RanPAC): one forward pass over each experience's training data. In
    ``before_training`` it marks the heads as attached, so they mask, instead of refusing, classes of an
    experience still being trained. It has no state of its own: the statistics are model buffers
    (``state_dict``).

    Data-parallel: every rank runs the whole pass (no sampler), so all ranks fit identical heads.

    Args:
        mb_size: batch size of the pass (default the strategy's eval_mb_size).
        progress: show a tqdm bar.

    Example:
        >>> model = ContinualClassifier(backbone, head="prototype")  # doctest: +SKIP
        >>> strategy = Naive(model=model, optimizer=opt, plugins=[PrototypePlugin()])  # doctest: +SKIP
    """

    def __init__(self, *, mb_size: Optional[int] = None, progress: bool = False) -> None:
        super().__init__()
        if mb_size is not None and (isinstance(mb_size, bool) or not isinstance(mb_size, int) or mb_size < 1):
            raise ValueError(f"mb_size must be None or a positive int, got {mb_size!r}")
        self.mb_size, self.progress = mb_size, progress

    def heads(self, model: torch.nn.Module) -> List[FittedHead]:
        """The fitted heads of ``model``; a ValueError if it has none."""
        heads = fitted_heads(model)
        if not heads:
            raise ValueError(f"PrototypePlugin needs a model with a PrototypeHead or RanPACHead (e.g. "
                             f"ContinualClassifier(backbone, head='prototype')); {type(model).__name__} has none")
        return heads

    @torch.no_grad()
    def fit(self, strategy: SupervisedTemplate, experience: Any) -> None:
        """Fit every fitted head on ``experience``'s training features."""
        heads = self.heads(strategy.model)
        dataset = experience.dataset.eval()
        loader = DataLoader(dataset, batch_size=self.mb_size or strategy.eval_mb_size or strategy.train_mb_size,
                            shuffle=False, collate_fn=getattr(dataset, "collate_fn", None))
        bar = tqdm(loader, desc="class statistics", disable=not self.progress, leave=False)
        batches = list(module_inputs(strategy.model, heads, bar, strategy.device))
        labels = torch.cat([y for _, y in batches])
        for i, head in enumerate(heads):
            head.fit_experience(torch.cat([inputs[i] for inputs, _ in batches]), labels)

    # -- Avalanche callbacks -----------------------------------------------------------------------------------
    def before_training(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Mark the model's fitted heads as attached to this plugin."""
        for head in self.heads(strategy.model):
            head.fitter_attached = True

    def after_training_exp(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Fit the heads on the experience(s) just trained."""
        for experience in trained_experiences(strategy):
            self.fit(strategy, experience)
