"""RunConfig: one run of ``mambacl run``, the keys of a YAML/JSON config file."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from mambacl.strategies.registry import unknown_name_error

__all__ = ["RunConfig"]


@dataclass
class RunConfig:
    """One run; its fields are the keys of a YAML/JSON config file (``mambacl run --config``).

    Args:
        benchmark, benchmark_args: registered benchmark name and its keyword arguments.
        strategy, strategy_args: registered strategy name and its hyper-parameters.
        model, model_args: timm model name (None: the benchmark's default) and extra ``create_model`` kwargs.
        pretrained: local checkpoint file for the backbone (``pretrained_file``).
        epochs, lr, weight_decay, batch_size, eval_batch_size: training settings shared by all strategies.
        device: torch device. seed: seeds python/numpy/torch at the start.
        out: run folder (results, checkpoint, logs); default ``mambacl_runs/<benchmark>_<strategy>_seed<seed>``.
        tensorboard: also write TensorBoard logs.
        progress: Avalanche's interactive logger (tqdm bars) on stdout.
        autocast: None, 'bf16' or 'fp16' mixed-precision forward (for GPUs; see DistributedPlugin).

    Under ``torchrun`` the run is data-parallel (see ``mambacl.strategies.distributed``): ``batch_size`` and
    ``eval_batch_size`` are global, every rank must get the same config, and rank 0 alone logs and writes files.
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
    autocast: Optional[str] = None

    def __post_init__(self) -> None:
        if self.out is None:
            self.out = f"mambacl_runs/{self.benchmark}_{self.strategy}_seed{self.seed}"
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("benchmark_args", "strategy_args", "model_args"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        """Build from a mapping; a key that is not a field (e.g. a misspelling) raises a ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"a run config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise unknown_name_error("config key", key, names)
        return cls(**data)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "RunConfig":
        """Read a ``.yaml``/``.yml`` or ``.json`` config file (see :meth:`from_dict`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        return cls.from_dict((json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
