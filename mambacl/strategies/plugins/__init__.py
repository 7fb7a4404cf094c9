"""Avalanche plugins of mambacl: the null-space projection, fitted heads, the head learning rate, the data-parallel
runner and the finite-loss guard."""
from mambacl.strategies.plugins.nullspace import NullSpacePlugin
from mambacl.strategies.plugins.distributed import DistributedPlugin
from mambacl.strategies.plugins.finite_loss import FiniteLossPlugin, NonFiniteLossError
from mambacl.strategies.plugins.head_lr import HeadLRPlugin
from mambacl.strategies.plugins.prototype import PrototypePlugin

__all__ = ["DistributedPlugin", "FiniteLossPlugin", "HeadLRPlugin", "NonFiniteLossError", "NullSpacePlugin",
           "PrototypePlugin"]
