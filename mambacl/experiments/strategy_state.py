"""A strategy's state after a finished experience, as plain data a weights-only checkpoint can hold, and back.

The state is the model's state_dict, the optimizer's per-parameter state (keyed by parameter name, because
Avalanche's ``update_optimizer`` appends new head parameters in an order a rebuilt model does not reproduce),
each plugin's state, the strategy's own extra state and every rank's RNG states. Only tensors, numbers, strings, None,
lists, tuples and dicts may appear, so ``torch.load(weights_only=True)`` reads it back without unpickling
arbitrary objects; the evaluator's Avalanche metric objects (forgetting and BWT keep their history in them) are
encoded as plain data by :func:`encode_metrics`, whose decoder builds only the classes in ``METRIC_CLASSES``.

Plugin state, by the first rule that applies:
- ``checkpoint_state()`` / ``restore_checkpoint_state(state, finished)``: state that refers to the stream
  (``finished`` are the finished training experiences); the same protocol serves strategies (e.g. Mamba-FSCIL);
- ``state_dict()`` / ``load_state_dict(state)`` (NullSpacePlugin, DistributedPlugin);
- Avalanche's EWC, LwF, Replay and LR-scheduler plugins, converted here (their parameter copies become tensors,
  LwF's teacher is the restored model itself, the replay buffer becomes sample indices: see
  ``mambacl.strategies.storage``; the scheduler keeps its epoch counter and learning rates);
- otherwise the plugin's attributes, which must then be plain data.
"""
from __future__ import annotations

import collections
import copy
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy as _accuracy
from avalanche.evaluation.metrics import forgetting_bwt as _forgetting
from avalanche.evaluation.metrics import loss as _loss
from avalanche.evaluation.metrics import mean as _mean
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, LRSchedulerPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import ParamData

from mambacl.strategies.distributed import rank

__all__ = ["METRIC_CLASSES", "strategy_state", "restore_strategy", "check_storable", "encode_metrics",
           "decode_metrics", "rng_state", "set_rng_state"]

# the Avalanche metric classes of the run's evaluator (and what they hold), by qualified name
METRIC_CLASSES: Dict[str, type] = {f"{c.__module__}.{c.__qualname__}": c for c in (
    _accuracy.Accuracy, _accuracy.ExperienceAccuracy, _accuracy.StreamAccuracy, _accuracy.TaskAwareAccuracy,
    _forgetting.Forgetting, _forgetting.ExperienceForgetting, _forgetting.StreamForgetting,
    _forgetting.ExperienceBWT, _forgetting.StreamBWT, _loss.EpochLoss, _loss.LossMetric, _mean.Mean)}
_FACTORIES: Dict[str, Any] = {**METRIC_CLASSES, "dict": dict, "list": list, "set": set, "float": float, "int": int}
_LEAVES = (torch.Tensor, int, float, str, bool, type(None), torch.Size, torch.dtype, torch.device)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__


def _encode(obj: Any) -> Any:
    if isinstance(obj, _LEAVES):
        return obj
    if isinstance(obj, collections.defaultdict):
        factory = _class_name(obj.default_factory) if obj.default_factory is not None else None
        if factory is not None and factory not in _FACTORIES:
            raise TypeError(f"cannot encode a defaultdict of {factory}")
        return {"__defaultdict__": factory, "items": {k: _encode(v) for k, v in obj.items()}}
    if type(obj) in (dict, collections.OrderedDict):
        return {k: _encode(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_encode(v) for v in obj)
    if _class_name(type(obj)) in METRIC_CLASSES:
        return {"__object__": _class_name(type(obj)), "state": {k: _encode(v) for k, v in vars(obj).items()}}
    raise TypeError(f"cannot encode a {_class_name(type(obj))} in the metric state; add its class to METRIC_CLASSES")


def _decode(data: Any) -> Any:
    if isinstance(data, dict) and "__defaultdict__" in data:
        factory = data["__defaultdict__"]
        return collections.defaultdict(None if factory is None else _FACTORIES[factory],
                                       {k: _decode(v) for k, v in data["items"].items()})
    if isinstance(data, dict) and "__object__" in data:
        obj = METRIC_CLASSES[data["__object__"]].__new__(METRIC_CLASSES[data["__object__"]])
        vars(obj).update({k: _decode(v) for k, v in data["state"].items()})
        return obj
    if isinstance(data, dict):
        return {k: _decode(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_decode(v) for v in data)
    return data


def encode_metrics(metrics: Sequence[Any]) -> List[Any]:
    """The evaluator's metric objects as plain data (see :func:`decode_metrics`)."""
    return [_encode(m) for m in metrics]


def decode_metrics(data: Sequence[Any]) -> List[Any]:
    """Rebuild the metric objects of :func:`encode_metrics`; only ``METRIC_CLASSES`` are instantiated."""
    return [_decode(d) for d in data]


def check_storable(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of ``obj`` that a weights-only checkpoint could not load."""
    if isinstance(obj, _LEAVES):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            check_storable(key, f"{where} key")
            check_storable(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_storable(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a weights-only "
                    "checkpoint cannot hold; give its plugin state_dict()/load_state_dict() returning tensors and "
                    "plain data")


def rng_state() -> Dict[str, Any]:
    """This process's python, numpy and torch RNG states (CPU, and its current CUDA device), as plain data."""
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                                "pos": int(numpy_state["state"]["pos"])}}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state` (into the current CUDA device)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _param_tensors(params: Dict[int, Dict[str, ParamData]]) -> Dict[int, Dict[str, torch.Tensor]]:
    return {int(exp): {name: p.data.detach().cpu().clone() for name, p in group.items()}
            for exp, group in params.items()}


def _param_data(tensors: Dict[int, Dict[str, torch.Tensor]], device: torch.device) -> Dict[int, Dict[str, ParamData]]:
    out: Dict[int, Dict[str, ParamData]] = collections.defaultdict(dict)
    for exp, group in tensors.items():
        out[exp] = {name: ParamData(name, init_tensor=t.to(device), device=device) for name, t in group.items()}
    return out


def _plugin_state(plugin: Any) -> Any:
    if hasattr(plugin, "checkpoint_state"):
        return plugin.checkpoint_state()
    if hasattr(plugin, "state_dict") and hasattr(plugin, "load_state_dict"):
        return plugin.state_dict()
    if isinstance(plugin, EWCPlugin):
        return {"saved_params": _param_tensors(plugin.saved_params), "importances": _param_tensors(plugin.importances)}
    if isinstance(plugin, LwFPlugin):
        return {"expcount": plugin.lwf.expcount, "has_teacher": plugin.lwf.prev_model is not None,
                "prev_classes_by_task": {int(t): sorted(int(c) for c in cs)
                                         for t, cs in plugin.lwf.prev_classes_by_task.items()}}
    if isinstance(plugin, LRSchedulerPlugin):
        scheduler = plugin.scheduler  # the optimizer's current rates: reset to the base ones after an experience
        return {"last_epoch": scheduler.last_epoch, "base_lrs": list(scheduler.base_lrs),
                "lrs": [group["lr"] for group in scheduler.optimizer.param_groups]}
    if isinstance(plugin, ReplayPlugin):
        if not hasattr(plugin.storage_policy, "state_dict"):
            raise TypeError(f"ReplayPlugin's storage policy {type(plugin.storage_policy).__name__} holds datasets a "
                            "checkpoint cannot store; use mambacl.strategies.storage.IndexedExperienceBalancedBuffer")
        return {"storage": plugin.storage_policy.state_dict()}
    return dict(vars(plugin))


def _restore_plugin(plugin: Any, saved: Any, strategy: SupervisedTemplate, finished: Sequence[Any]) -> None:
    if hasattr(plugin, "restore_checkpoint_state"):
        plugin.restore_checkpoint_state(saved, finished)
    elif hasattr(plugin, "state_dict") and hasattr(plugin, "load_state_dict"):
        plugin.load_state_dict(saved)
    elif isinstance(plugin, EWCPlugin):
        device = torch.device(strategy.device)
        plugin.saved_params = _param_data(saved["saved_params"], device)
        plugin.importances = _param_data(saved["importances"], device)
    elif isinstance(plugin, LwFPlugin):
        plugin.lwf.expcount = saved["expcount"]
        # the teacher is the model as it was after the last finished experience: the model just restored
        plugin.lwf.prev_model = copy.deepcopy(strategy.model) if saved["has_teacher"] else None
        plugin.lwf.prev_classes_by_task = collections.defaultdict(
            set, {t: set(cs) for t, cs in saved["prev_classes_by_task"].items()})
    elif isinstance(plugin, LRSchedulerPlugin):
        scheduler = plugin.scheduler
        scheduler.last_epoch, scheduler.base_lrs, scheduler._last_lr = (saved["last_epoch"], list(saved["base_lrs"]),
                                                                         list(saved["lrs"]))
        for group, lr in zip(scheduler.optimizer.param_groups, saved["lrs"]):
            group["lr"] = lr
    elif isinstance(plugin, ReplayPlugin):
        plugin.storage_policy.load_state_dict(saved["storage"], [exp.dataset for exp in finished])
    else:
        vars(plugin).update(saved)


def _plugins(strategy: SupervisedTemplate) -> List[Any]:
    return [p for p in strategy.plugins if not isinstance(p, EvaluationPlugin)]


def _optimized(strategy: SupervisedTemplate) -> Dict[str, torch.nn.Parameter]:
    """The optimizer's parameters by their name in the model (whatever built the optimizer)."""
    in_optimizer = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    return {name: p for name, p in strategy.model.named_parameters() if id(p) in in_optimizer}


def strategy_state(strategy: SupervisedTemplate, metrics: Sequence[Any],
                   rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Everything needed to continue ``strategy`` after a finished experience (see the module docstring).

    Args:
        strategy: the template after ``train`` + ``eval`` of the experience.
        metrics: the evaluator's metric objects.
        rng: every rank's :func:`rng_state`, indexed by rank (default: this process's only).
    Returns:
        the state; raises TypeError naming any entry a weights-only checkpoint could not hold.
    """
    state = {
        "model": dict(strategy.model.state_dict()),
        "optimizer": {name: strategy.optimizer.state[p] for name, p in _optimized(strategy).items()
                      if p in strategy.optimizer.state},
        "plugins": [{"class": type(p).__qualname__, "state": _plugin_state(p)} for p in _plugins(strategy)],
        "strategy": strategy.checkpoint_state() if hasattr(strategy, "checkpoint_state") else None,
        "metrics": encode_metrics(metrics),
        "rng": rng if rng is not None else [rng_state()],
    }
    check_storable(state, "strategy state")
    return state


def restore_strategy(strategy: SupervisedTemplate, finished: Sequence[Any], state: Dict[str, Any]) -> None:
    """Bring a freshly built ``strategy`` to ``state`` (from :func:`strategy_state`) after the ``finished`` experiences.

    The model is first adapted to the finished experiences (so dynamic heads have their saved shapes), then
    loaded; the optimizer is rebuilt over the model and given its saved per-parameter state; plugins and RNG
    states are restored last. A state written by another strategy (other plugins) raises a ValueError.
    """
    plugins = _plugins(strategy)
    saved_classes = [p["class"] for p in state["plugins"]]
    if saved_classes != [type(p).__qualname__ for p in plugins]:
        raise ValueError(f"the checkpoint holds the state of plugins {saved_classes} but the strategy has "
                         f"{[type(p).__qualname__ for p in plugins]}: it was written by a different strategy")
    model = strategy.model
    model.train()
    for exp in finished:
        avalanche_model_adaptation(model, exp)
    if hasattr(strategy, "restore_checkpoint_state"):
        strategy.restore_checkpoint_state(state.get("strategy"), finished)
    model.load_state_dict(state["model"])
    model.to(strategy.device)
    strategy.make_optimizer(reset_optimizer_state=True)
    optimized = _optimized(strategy)
    for name, param_state in state["optimizer"].items():
        if name not in optimized:
            raise ValueError(f"the checkpoint has optimizer state for {name}, which the rebuilt optimizer does not "
                             "hold: it was written by a different strategy or model")
        param = optimized[name]
        strategy.optimizer.state[param] = {k: v.to(param.device) if torch.is_tensor(v) and v.dim() else v
                                           for k, v in param_state.items()}
    for plugin, saved in zip(plugins, state["plugins"]):
        _restore_plugin(plugin, saved["state"], strategy, finished)
    rngs = state["rng"]
    set_rng_state(rngs[rank()] if rank() < len(rngs) else rngs[0])  # another world size: rank 0's streams
