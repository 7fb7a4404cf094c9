"""mambacl: continual learning for state-space vision models."""
__version__ = "0.1.0"
