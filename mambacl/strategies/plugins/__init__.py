"""Avalanche plugins of mambacl: the null-space projection, fitted heads, head learning rate, data-parallel runner."""
from mambacl.strategies.plugins.nullspace import NullSpacePlugin
from mambacl.strategies.plugins.distributed import DistributedPlugin
from mambacl.strategies.plugins.head_lr import HeadLRPlugin
from mambacl.strategies.plugins.prototype import PrototypePlugin

__all__ = ["DistributedPlugin", "HeadLRPlugin", "NullSpacePlugin", "PrototypePlugin"]
