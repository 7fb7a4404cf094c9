"""Continual-learning strategies for state-space vision models (the first layer that imports Avalanche)."""
from mambacl.strategies.heads import ContinualClassifier, ExperienceHeads
from mambacl.strategies.nullspace import (NonFiniteFeaturesError, NullSpaceEngine, auto_rule, build_projector,
                                         descending_eigh, knee_index, null_space_size)
from mambacl.strategies.plugins.nullspace import NullSpacePlugin, NullSpaceWarning
from mambacl.strategies.wrappers import AdamNSCL, MambaCL
from mambacl.strategies import fscil  # noqa: F401  (registers the 'mamba-fscil' strategy)

__all__ = ["AdamNSCL", "ContinualClassifier", "ExperienceHeads", "MambaCL", "NonFiniteFeaturesError", "NullSpaceEngine",
           "NullSpacePlugin", "NullSpaceWarning", "auto_rule", "build_projector", "descending_eigh", "knee_index",
           "null_space_size"]
