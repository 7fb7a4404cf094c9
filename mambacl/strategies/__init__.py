"""Continual-learning strategies for state-space vision models (the first layer that imports Avalanche)."""
from mambacl.strategies.heads import ContinualClassifier, ExperienceHeads
from mambacl.strategies.nullspace import NullSpaceEngine, build_projector, knee_index, null_space_size
from mambacl.strategies.plugins.nullspace import NullSpacePlugin
from mambacl.strategies.wrappers import AdamNSCL, MambaCL
from mambacl.strategies import fscil  # noqa: F401  (registers the 'mamba-fscil' strategy)

__all__ = ["AdamNSCL", "ContinualClassifier", "ExperienceHeads", "MambaCL", "NullSpaceEngine", "NullSpacePlugin",
           "build_projector", "knee_index", "null_space_size"]
