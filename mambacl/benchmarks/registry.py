"""Benchmark registry: names -> functions returning Avalanche benchmarks, with the model they run by default.

Example:
    >>> @register_benchmark("my_split", default_model="test_vim")  # doctest: +SKIP
    ... def my_split(root: str, n_experiences: int = 5) -> CLScenario: ...
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from mambacl.strategies.registry import unknown_name_error

__all__ = ["BenchmarkSpec", "register_benchmark", "get_benchmark", "list_benchmarks", "create_benchmark",
           "benchmark_args"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: its factory and the timm model (and model kwargs) it runs with by default."""

    name: str
    factory: Callable[..., Any]
    default_model: str = "vim_tiny_patch16_224"
    default_model_args: Dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.factory) or "").split("\n")[0]


_REGISTRY: Dict[str, BenchmarkSpec] = {}


def register_benchmark(name: str, *, default_model: str = "vim_tiny_patch16_224",
                       default_model_args: Optional[Dict[str, Any]] = None) -> Callable:
    """Decorator registering a function ``(**kwargs) -> Avalanche benchmark`` under ``name``.

    Args:
        name: benchmark name used by ``mambacl run --benchmark``.
        default_model: timm model name used when the run names none.
        default_model_args: extra ``timm.create_model`` kwargs for the default model (e.g. a patch size).
    Returns:
        the decorator (the function is returned unchanged).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(factory):
            raise TypeError(f"benchmark {name!r}: factory must be callable, got {type(factory).__name__}")
        _REGISTRY[name] = BenchmarkSpec(name, factory, default_model, dict(default_model_args or {}))
        return factory
    return decorator


def list_benchmarks() -> List[str]:
    """Names of the registered benchmarks, sorted."""
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` registered as ``name``; unknown names raise a ValueError listing valid ones."""
    if name not in _REGISTRY:
        raise unknown_name_error("benchmark", name, _REGISTRY)
    return _REGISTRY[name]


def benchmark_args(name: str) -> Dict[str, inspect.Parameter]:
    """The keyword arguments benchmark ``name`` accepts, with their defaults and annotations."""
    return dict(inspect.signature(get_benchmark(name).factory).parameters)


def create_benchmark(name: str, **kwargs: Any) -> Any:
    """Build benchmark ``name``; unknown arguments raise a ValueError listing the valid ones."""
    valid = benchmark_args(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"benchmark {name!r} has no argument(s) {unknown}; valid: {sorted(valid)}")
    return get_benchmark(name).factory(**kwargs)
