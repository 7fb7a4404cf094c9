"""Continual-learning strategies for state-space vision models (the first layer that imports Avalanche)."""
from mambacl.strategies.heads import (ContinualClassifier, ExperienceHeads, FittedHead, PrototypeHead, RanPACHead,
                                      fitted_heads)
from mambacl.strategies.metrics import feature_ncm_accuracy_metrics, within_task_accuracy_metrics
from mambacl.strategies.nullspace import (NonFiniteFeaturesError, NullSpaceEngine, auto_rule, build_projector,
                                         descending_eigh, knee_index, null_space_size)
from mambacl.strategies.optim import head_param_groups, make_optimizer, mambacl_optimizer
from mambacl.strategies.plugins.head_lr import HeadLRPlugin
from mambacl.strategies.plugins.nullspace import NullSpacePlugin, NullSpaceWarning
from mambacl.strategies.plugins.prototype import PrototypePlugin
from mambacl.strategies.wrappers import AdamNSCL, MambaCL, PretrainedCIL
from mambacl.strategies import fscil  # noqa: F401  (registers the 'mamba-fscil' strategy)

__all__ = ["AdamNSCL", "ContinualClassifier", "ExperienceHeads", "FittedHead", "HeadLRPlugin", "MambaCL",
           "NonFiniteFeaturesError", "NullSpaceEngine", "NullSpacePlugin", "NullSpaceWarning", "PretrainedCIL",
           "PrototypeHead", "PrototypePlugin", "RanPACHead", "auto_rule", "build_projector", "descending_eigh",
           "feature_ncm_accuracy_metrics", "fitted_heads", "head_param_groups", "knee_index", "make_optimizer",
           "mambacl_optimizer", "null_space_size", "within_task_accuracy_metrics"]
