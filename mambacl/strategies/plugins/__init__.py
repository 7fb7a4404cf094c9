"""Avalanche plugins of mambacl."""
from mambacl.strategies.plugins.nullspace import NullSpacePlugin

__all__ = ["NullSpacePlugin"]
