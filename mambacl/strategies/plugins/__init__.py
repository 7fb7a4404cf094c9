"""Avalanche plugins of mambacl: the null-space projection and the data-parallel runner."""
from mambacl.strategies.plugins.nullspace import NullSpacePlugin
from mambacl.strategies.plugins.distributed import DistributedPlugin

__all__ = ["DistributedPlugin", "NullSpacePlugin"]
