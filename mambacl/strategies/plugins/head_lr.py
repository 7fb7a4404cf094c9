"""HeadLRPlugin: heads added by model adaptation train at the head learning rate (see mambacl.strategies.optim)."""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from avalanche.core import SupervisedPlugin

from mambacl.strategies.optim import place_head_params

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate


class HeadLRPlugin(SupervisedPlugin, supports_distributed=True):
    """Before every training experience, moves head parameters into the optimizer's ``name='head'`` group.

    Avalanche's ``make_optimizer`` adds parameters created by model adaptation (e.g. the new per-experience
    head) to the group of their nearest named relative, which is the backbone group while the head group is
    empty. This plugin runs after it (``before_training_exp``) and moves them; it does nothing for an
    optimizer without a head group. The mambacl wrappers add it when the optimizer has one; add it yourself to
    other templates.

    Args:
        head: name component marking head parameters (``ContinualClassifier``'s ``head``).

    Example:
        >>> optimizer = mambacl_optimizer(model)  # doctest: +SKIP
        >>> strategy = Naive(model=model, optimizer=optimizer, plugins=[HeadLRPlugin()])  # doctest: +SKIP
    """

    def __init__(self, head: str = "head") -> None:
        super().__init__()
        if not isinstance(head, str) or not head:
            raise ValueError(f"head must be a non-empty module name component, got {head!r}")
        self.head = head
        self.moved: List[str] = []

    def before_training_exp(self, strategy: SupervisedTemplate, **kwargs) -> None:
        """Move the adapted model's head parameters into the head group (names recorded in ``moved``)."""
        self.moved = place_head_params(strategy.optimizer, strategy.model, self.head)
