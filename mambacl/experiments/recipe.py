"""Recipes: named, versioned run configs shipped in the package (``mambacl run --recipe NAME``).

A recipe is a YAML file in ``mambacl/experiments/recipes/`` that cites its source in comments and holds:
``name``, ``version``, ``summary``, ``source`` (repository@commit and files), ``published`` (the paper's figures
where the sources give them, else the string "not published in the sources"), ``scale_note`` (whether it ever
ran at full scale), ``requires`` ({config key: what the user must provide}, e.g. the pretrained checkpoint and
the data root) and ``config`` (RunConfig keys). Options given on the command line override its keys; the run
records ``recipe: name@version``.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, List, Tuple

from mambacl.experiments.config import RunConfig, load_yaml
from mambacl.strategies.registry import unknown_name_error

__all__ = ["Recipe", "list_recipes", "get_recipe", "apply_recipe"]

_FIELDS = ("name", "version", "summary", "source", "published", "scale_note", "requires", "config")


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe file (see the module docstring)."""

    name: str
    version: int
    summary: str
    source: str
    published: Any
    scale_note: str
    requires: Dict[str, str]
    config: Dict[str, Any]

    @property
    def tag(self) -> str:
        """``name@version``, what a run records."""
        return f"{self.name}@{self.version}"


def _files() -> Dict[str, Any]:
    folder = resources.files("mambacl.experiments") / "recipes"
    return {f.name[:-len(".yaml")]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def list_recipes() -> List[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(_files())


def get_recipe(name: str) -> Recipe:
    """The shipped recipe ``name``; an unknown name raises a ValueError listing the recipes."""
    files = _files()
    if name not in files:
        raise unknown_name_error("recipe", name, files)
    data = load_yaml(files[name].read_text())
    if not isinstance(data, dict) or sorted(data) != sorted(_FIELDS) or data["name"] != name:
        raise ValueError(f"recipe file {name}.yaml must hold exactly the keys {list(_FIELDS)} with name {name!r}")
    RunConfig.from_dict(dict(data["config"]))  # a shipped recipe must be a valid config on its own
    return Recipe(**{k: data[k] for k in _FIELDS})


def _lookup(config: Dict[str, Any], dotted: str) -> Tuple[bool, Any]:
    """(present, value) of a dotted key such as ``benchmark_args.root``."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _option(key: str) -> str:
    """The command-line option that sets a (dotted) config key."""
    if key.startswith(("benchmark_args.", "model_args.", "strategy_args.")):
        section, name = key.split(".", 1)
        return f"--{section[:-len('_args')]}-arg {name}=..."
    if key == "pretrained":
        return "--pretrained FILE (or --pretrained none to start from scratch)"
    return f"--{key.replace('_', '-')} ..."


def apply_recipe(name: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """The recipe's config with ``given`` (options of the command line) on top, checked for what it requires.

    Args:
        name: recipe name.
        given: RunConfig keys set by the user; the ``*_args`` mappings merge key by key.
    Returns:
        the merged RunConfig mapping, with ``recipe`` set to ``name@version``.
    Raises:
        ValueError naming every required key that is neither in the recipe nor given (giving a key, even as
        None, e.g. ``--pretrained none``, counts), with the option that sets it and what it needs.
    """
    recipe = get_recipe(name)
    merged = {**recipe.config, "recipe": recipe.tag}
    for key, value in given.items():
        merged[key] = {**merged.get(key, {}), **value} if key.endswith("_args") and isinstance(value, dict) else value
    missing = [k for k in recipe.requires if _lookup(merged, k)[1] is None and not _lookup(given, k)[0]]
    if missing:
        raise ValueError(f"recipe {name} needs " + "; ".join(f"{_option(k)} ({recipe.requires[k]})" for k in missing))
    return merged
