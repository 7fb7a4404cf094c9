"""Replay storage that can be checkpointed: Avalanche's experience-balanced reservoir buffer, remembering indices.

Avalanche's buffers hold dataset objects (subsets with their transforms), which a weights-only checkpoint cannot
store. These subclasses draw exactly the same samples (same ``torch.rand`` calls, same sort) and also keep, per
experience, the indices of the stored samples in that experience's dataset, so a checkpoint stores tensors and
a restored run rebuilds the buffer from the benchmark's experiences.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer

__all__ = ["IndexedReservoirBuffer", "IndexedExperienceBalancedBuffer"]


class IndexedReservoirBuffer(ReservoirSamplingBuffer):
    """Reservoir sampling over one dataset that remembers which of its samples it holds (``indices``).

    Args:
        max_size: capacity.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.indices = torch.zeros(0, dtype=torch.long)

    def update_from_dataset(self, new_data: AvalancheDataset) -> None:
        """Fill the (empty) buffer from ``new_data``: the ``max_size`` samples with the largest random weights."""
        if len(self.buffer):
            raise ValueError("IndexedReservoirBuffer samples from a single dataset; it already holds samples")
        weights, order = torch.rand(len(new_data)).sort(descending=True)
        self.indices, self._buffer_weights = order[:self.max_size], weights[:self.max_size]
        self.buffer = new_data.subset(self.indices)

    def resize(self, strategy: Any, new_size: int) -> None:
        """Shrink to the ``new_size`` highest-weighted samples."""
        super().resize(strategy, new_size)
        self.indices = self.indices[:self.max_size]


class IndexedExperienceBalancedBuffer(ExperienceBalancedBuffer):
    """``ExperienceBalancedBuffer`` (memory split equally over the experiences seen) with indexed groups.

    Args:
        max_size: total number of stored samples.
        adaptive_size, num_experiences: as in ``ExperienceBalancedBuffer``.
    """

    def post_adapt(self, agent: Any, exp: Any) -> None:
        """Add a group for ``exp`` and shrink the others to their new share (Avalanche's procedure)."""
        self._num_exps += 1
        lengths = self.get_group_lengths(self._num_exps)
        group = IndexedReservoirBuffer(lengths[-1])
        group.update_from_dataset(exp.dataset)
        self.buffer_groups[self._num_exps - 1] = group
        for length, buffer in zip(lengths, self.buffer_groups.values()):
            buffer.resize(agent, length)

    def state_dict(self) -> Dict[str, Any]:
        """Per group: capacity, sample indices into its experience's dataset and reservoir weights."""
        return {"num_experiences_seen": self._num_exps,
                "groups": {int(g): {"max_size": b.max_size, "indices": b.indices.clone(),
                                    "weights": b._buffer_weights.clone()} for g, b in self.buffer_groups.items()}}

    def load_state_dict(self, state: Dict[str, Any], datasets: Sequence[AvalancheDataset]) -> None:
        """Rebuild the groups from :meth:`state_dict` and the experiences' training datasets (group g <- datasets[g])."""
        self._num_exps = int(state["num_experiences_seen"])
        self.buffer_groups = {}
        for group, saved in state["groups"].items():
            if group >= len(datasets):
                raise ValueError(f"buffer group {group} needs the dataset of experience {group}, but only "
                                 f"{len(datasets)} finished experiences were given")
            buffer = IndexedReservoirBuffer(int(saved["max_size"]))
            buffer.indices, buffer._buffer_weights = saved["indices"].long(), saved["weights"]
            buffer.buffer = datasets[group].subset(buffer.indices)
            self.buffer_groups[group] = buffer
