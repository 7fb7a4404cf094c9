"""mambacl: continual learning for state-space vision models.

Importing the package registers the Vision Mamba models with timm (``timm.create_model("vim_tiny_patch16_224")``).
Avalanche is imported only by ``mambacl.strategies``, ``mambacl.benchmarks`` and the CLI.
"""
from . import backbones  # noqa: F401  (registers the timm models)

__version__ = "0.1.0"
