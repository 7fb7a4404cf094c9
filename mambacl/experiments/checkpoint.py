"""Resumable runs: save and restore a strategy after a finished experience (model, optimizer, plugins, RNG).

A strategy with state outside its model, optimizer and plugins provides ``checkpoint_state() -> dict`` and
``restore_checkpoint_state(state, finished)``; the latter runs before the model is loaded, so it can rebuild
modules the saved model has (e.g. Mamba-FSCIL's incremental branch).

The checkpoint is written to a temporary file and renamed over ``checkpoint.pt``, so a run killed at any time
leaves the previous complete checkpoint. Optimizer state is keyed by parameter name because Avalanche's
``update_optimizer`` appends new (head) parameters in an order a rebuilt model does not reproduce.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "restore_strategy", "rng_state", "set_rng_state"]

CHECKPOINT = "checkpoint.pt"


def rng_state() -> Dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plugin_states(strategy: SupervisedTemplate) -> List[Any]:
    # plugins with state_dict (NullSpacePlugin) save that; others (Clock, EWC, LwF, Replay) their attributes
    return [p.state_dict() if hasattr(p, "load_state_dict") else dict(vars(p))
            for p in strategy.plugins if not isinstance(p, EvaluationPlugin)]


def save_checkpoint(out: Union[str, Path], strategy: SupervisedTemplate, record: Dict[str, Any],
                    metrics: Sequence[Any]) -> Path:
    """Atomically write ``<out>/checkpoint.pt`` after a finished experience.

    Args:
        out: run folder.
        strategy: the template after ``train`` + ``eval`` of the experience.
        record: the run's results so far (plain data; ``record['done']`` finished experiences).
        metrics: the evaluator's metric objects (forgetting/BWT keep their history in them).
    Returns:
        the checkpoint path.
    """
    path = Path(out) / CHECKPOINT
    named = getattr(strategy, "optimized_param_id", None) or {}
    state = {
        "record": record,
        "model": strategy.model.state_dict(),
        "optimizer": {name: strategy.optimizer.state[p] for name, p in named.items() if p in strategy.optimizer.state},
        "plugins": _plugin_states(strategy),
        "strategy": strategy.checkpoint_state() if hasattr(strategy, "checkpoint_state") else None,
        "metrics": list(metrics),
        "rng": rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out: Union[str, Path]) -> Dict[str, Any]:
    """Read ``<out>/checkpoint.pt`` (a file this package wrote: it holds pickled plugin state)."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_strategy(strategy: SupervisedTemplate, finished: Sequence[Any], state: Dict[str, Any]) -> None:
    """Bring a freshly built ``strategy`` to the state saved in ``state`` after the ``finished`` experiences.

    The model is first adapted to the finished experiences (so dynamic heads have their saved shapes), then
    loaded; the optimizer is rebuilt over the model and given its saved per-parameter state; plugins and
    RNG states are restored last.
    """
    model = strategy.model
    model.train()
    for exp in finished:
        avalanche_model_adaptation(model, exp)
    if hasattr(strategy, "restore_checkpoint_state"):
        strategy.restore_checkpoint_state(state.get("strategy"), finished)
    model.load_state_dict(state["model"])
    model.to(strategy.device)
    strategy.make_optimizer(reset_optimizer_state=True)
    for name, param_state in state["optimizer"].items():
        param = strategy.optimized_param_id[name]
        strategy.optimizer.state[param] = {k: v.to(param.device) if torch.is_tensor(v) and v.dim() else v
                                           for k, v in param_state.items()}
    plugins = [p for p in strategy.plugins if not isinstance(p, EvaluationPlugin)]
    if len(plugins) != len(state["plugins"]):
        raise ValueError(f"checkpoint has {len(state['plugins'])} plugin states but the strategy has "
                         f"{len(plugins)} plugins: it was written by a different strategy")
    for plugin, saved in zip(plugins, state["plugins"]):
        if hasattr(plugin, "load_state_dict"):
            plugin.load_state_dict(saved)
        else:
            vars(plugin).update(saved)
    set_rng_state(state["rng"])
