"""Named identity modules that expose a mixer's intermediate tensors to forward hooks.

A mixer passes a tensor through a :class:`Tap`; a strategy registers a forward hook on the tap to read
it. Tensors that cost extra work (e.g. the delta-weighted covariance) are computed only when
``tap.active`` is True, so unused taps cost nothing.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

__all__ = ["Tap", "record_taps"]


class Tap(nn.Identity):
    """Identity module whose forward hooks receive a tensor of the owning mixer.

    Examples:
        >>> tap = Tap(); seen = []
        >>> handle = tap.register_forward_hook(lambda m, inp, out: seen.append(out.shape))
        >>> tap.active, tap(torch.zeros(2, 3)).shape, seen
        (True, torch.Size([2, 3]), [torch.Size([2, 3])])
    """

    @property
    def active(self) -> bool:
        """True iff at least one forward hook is registered (global module hooks are ignored)."""
        return bool(self._forward_hooks)


class record_taps:
    """Context manager that stores the tensors passing through the named taps of ``module``.

    Args:
        module: a model or mixer.
        suffixes: tap attribute names to record, e.g. ``("tap_x", "tap_delta")``; matched against the
            last component of each ``named_modules()`` name.
    Yields:
        dict mapping the full module name to a list of the detached tensors seen (one per forward).

    Examples:
        >>> from mambacl.backbones import MambaMixer
        >>> mixer = MambaMixer(8)
        >>> with record_taps(mixer, ("tap_out",)) as rec:
        ...     _ = mixer(torch.randn(1, 5, 8))
        >>> rec["tap_out"][0].shape
        torch.Size([1, 5, 16])
    """

    def __init__(self, module: nn.Module, suffixes: Sequence[str]) -> None:
        self.taps = {name: m for name, m in module.named_modules()
                     if isinstance(m, Tap) and name.rsplit(".", 1)[-1] in suffixes}
        if not self.taps:
            raise ValueError(f"suffixes {suffixes!r} match no Tap in the module")
        self.records: Dict[str, List[torch.Tensor]] = {name: [] for name in self.taps}
        self._handles: list = []

    def __enter__(self) -> Dict[str, List[torch.Tensor]]:
        for name, tap in self.taps.items():
            store = self.records[name]
            self._handles.append(tap.register_forward_hook(lambda m, inp, out, store=store: store.append(out.detach())))
        return self.records

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
