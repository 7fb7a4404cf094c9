"""Avalanche plugins of mambacl: the null-space projection, the data-parallel runner and the finite-loss guard."""
from mambacl.strategies.plugins.nullspace import NullSpacePlugin
from mambacl.strategies.plugins.distributed import DistributedPlugin
from mambacl.strategies.plugins.finite_loss import FiniteLossPlugin, NonFiniteLossError

__all__ = ["DistributedPlugin", "FiniteLossPlugin", "NonFiniteLossError", "NullSpacePlugin"]
