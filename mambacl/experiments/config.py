"""RunConfig: one run of ``mambacl run``, the keys of a YAML/JSON config file, every field type-checked.

YAML files and ``key=value`` options are read with YAML 1.2 number rules (:func:`load_yaml`), so ``1e-4`` is
a float, not the string PyYAML's 1.1 rules make of it. :meth:`RunConfig.fingerprint` identifies a run by every
field that changes its results; ``HARMLESS_KEYS`` (device, output, console) may differ when a run resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import yaml

from mambacl.strategies.registry import unknown_name_error

__all__ = ["RunConfig", "HARMLESS_KEYS", "AUTOCAST", "differing_keys", "load_yaml"]

AUTOCAST = ("bf16", "fp16")
# keys a resumed run may change: where it runs and what it prints, never what it computes
HARMLESS_KEYS = ("device", "out", "progress", "verbose", "num_workers", "tensorboard")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4``, ``1E5`` and ``.5e-3`` as floats (YAML 1.2), like JSON and Python do."""


# appended after PyYAML's own int/float resolvers, so it only catches what they miss (1e-4, 5E3)
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
                                    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 float rules (``1e-4`` -> 0.0001); everything else as ``yaml.safe_load``."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config key {name!r} must be a positive int, got {value!r} ({_type_name(value)})")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config key {name!r} must be an int >= 0, got {value!r} ({_type_name(value)})")


def _seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 32:
        raise ValueError(f"config key {name!r} must be an int in [0, 2**32) (numpy's seed range), got {value!r}")


def _number(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"config key {name!r} must be a finite number {bound}, got {value!r} ({_type_name(value)})")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"config key {name!r} must be true or false, got {value!r} ({_type_name(value)})")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"config key {name!r} must be a non-empty string, got {value!r} ({_type_name(value)})")


def _optional_text(name: str, value: Any) -> None:
    if value is not None:
        _text(name, value)


def _mapping(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"config key {name!r} must be a mapping of names to values, got {_type_name(value)}")


def _device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"config key {name!r} must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        _positive_int(name, value)


def _milestones(name: str, value: Any) -> None:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value) \
            or value != sorted(set(value)):
        raise ValueError(f"config key {name!r} must be an increasing list of epochs >= 1, got {value!r}")


def _autocast(name: str, value: Any) -> None:
    if value is not None and value not in AUTOCAST:
        raise ValueError(f"config key {name!r} must be null or one of {AUTOCAST}, got {value!r}")


_RULES: Dict[str, Callable[[str, Any], None]] = {
    "benchmark": _text, "benchmark_args": _mapping, "strategy": _text, "strategy_args": _mapping,
    "model": _optional_text, "model_args": _mapping, "pretrained": _optional_text,
    "epochs": _positive_int, "lr": lambda n, v: _number(n, v, positive=True),
    "weight_decay": lambda n, v: _number(n, v, positive=False), "batch_size": _positive_int,
    "eval_batch_size": _positive_int, "device": _device, "seed": _seed, "out": _text,
    "tensorboard": _flag, "progress": _flag, "verbose": _flag, "num_workers": _non_negative_int,
    "autocast": _autocast, "max_device_batch": _optional_positive_int, "data_repeat": _positive_int,
    "lr_milestones": _milestones, "lr_gamma": lambda n, v: _number(n, v, positive=True), "recipe": _optional_text,
}


@dataclass
class RunConfig:
    """One run; its fields are the keys of a YAML/JSON config file (``mambacl run --config``).

    Args:
        benchmark, benchmark_args: registered benchmark name and its keyword arguments.
        strategy, strategy_args: registered strategy name and its hyper-parameters.
        model, model_args: timm model name (None: the benchmark's default) and extra ``create_model`` kwargs.
        pretrained: local checkpoint file for the backbone (``pretrained_file``).
        epochs, lr, weight_decay, batch_size, eval_batch_size: training settings shared by all strategies.
        device: 'cpu', 'cuda', 'cuda:N' or 'mps'; it must be available when the run starts.
        seed: seeds python/numpy/torch at the start (int >= 0).
        out: run folder (results, checkpoints, logs); default ``mambacl_runs/<benchmark>_<strategy>_seed<seed>``.
        tensorboard: also write TensorBoard logs.
        progress: progress bars on stdout (one per experience; with ``verbose``, Avalanche's interactive logger).
        verbose: Avalanche's interactive logger (every metric of every evaluation, a bar per epoch).
        num_workers: DataLoader worker processes per rank.
        autocast: None, 'bf16' or 'fp16' mixed-precision forward (for GPUs; see DistributedPlugin).
        max_device_batch: largest batch one process forwards at once; a larger ``batch_size`` is reached by
            gradient accumulation with the same gradients (see DistributedPlugin). None: no accumulation.
        data_repeat: each epoch runs over this many shuffled copies of the experience's data (Mamba-CL: 5).
        lr_milestones, lr_gamma: the learning rate is multiplied by ``lr_gamma`` at these epochs of every
            experience (MultiStepLR, restarted per experience; Mamba-CL: [5, 8], 0.1). Empty: constant.
        recipe: the recipe (``name@version``) the config came from, for the record.

    Under ``torchrun`` the run is data-parallel (see ``mambacl.strategies.distributed``): ``batch_size`` and
    ``eval_batch_size`` are global, every rank must get the same config, and rank 0 alone logs and writes files.
    Every field is checked on construction: wrong types and out-of-range values raise an error naming the key.
    """

    benchmark: str = "split_digits"
    benchmark_args: Dict[str, Any] = field(default_factory=dict)
    strategy: str = "mambacl"
    strategy_args: Dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None
    epochs: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    eval_batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    out: Optional[str] = None
    tensorboard: bool = False
    progress: bool = True
    verbose: bool = False
    num_workers: int = 0
    autocast: Optional[str] = None
    max_device_batch: Optional[int] = None
    data_repeat: int = 1
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    recipe: Optional[str] = None

    def __post_init__(self) -> None:
        if self.out is None:
            self.out = f"mambacl_runs/{self.benchmark}_{self.strategy}_seed{self.seed}"
        for f in dataclasses.fields(self):
            _RULES[f.name](f.name, getattr(self, f.name))
        if isinstance(self.lr, int):
            self.lr = float(self.lr)
        if isinstance(self.weight_decay, int):
            self.weight_decay = float(self.weight_decay)
        if isinstance(self.lr_gamma, int):
            self.lr_gamma = float(self.lr_gamma)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        """Build from a mapping; a key that is not a field (e.g. a misspelling) raises a ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"a run config must be a mapping, got {_type_name(data)}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise unknown_name_error("config key", key, names)
        return cls(**data)

    @classmethod
    def read_file(cls, path: Union[str, Path]) -> Dict[str, Any]:
        """The keys a ``.yaml``/``.yml`` or ``.json`` config file sets (checked: valid keys and values)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                             f"{err}") from err
        cls.from_dict(data or {})
        return dict(data or {})

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "RunConfig":
        """Read a ``.yaml``/``.yml`` or ``.json`` config file (see :meth:`from_dict`)."""
        return cls.from_dict(cls.read_file(path))

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain data (what results.json and checkpoints store)."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of every field that changes the run's results (all but ``HARMLESS_KEYS``)."""
        defining = {k: v for k, v in self.to_dict().items() if k not in HARMLESS_KEYS}
        return hashlib.sha256(json.dumps(defining, sort_keys=True, default=repr).encode()).hexdigest()

    def differing_keys(self, other: "RunConfig") -> Dict[str, tuple]:
        """``{key: (self's value, other's value)}`` for the result-changing keys where the two differ."""
        return differing_keys(self.to_dict(), other.to_dict())


def differing_keys(saved: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, tuple]:
    """``{key: (saved, given)}`` for the result-changing keys (not ``HARMLESS_KEYS``) that ``given`` sets to another
    value than ``saved``. The ``*_args`` mappings compare key by key (giving some of their keys again is no
    change), and values compare as JSON (a tuple equals the list a file holds)."""
    differing = {}
    for key, value in given.items():
        if key in HARMLESS_KEYS:
            continue
        if key.endswith("_args") and isinstance(value, dict) and isinstance(saved.get(key), dict):
            value = {**saved[key], **value}
        if json.dumps(saved.get(key), sort_keys=True, default=repr) != json.dumps(value, sort_keys=True, default=repr):
            differing[key] = (saved.get(key), value)
    return differing
