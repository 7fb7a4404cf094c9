"""The run loop behind ``mambacl run``: config -> benchmark, model, strategy -> results.

``run_benchmark(config)`` is argparse-free. Its steps are separate functions so other front ends (a DDP
launcher, notebooks) can reuse them: :func:`build_backbone`, :func:`make_evaluator`, :func:`run_benchmark`
(train each experience, evaluate on the test experiences seen so far, record, checkpoint, write results).

A run never loses a finished experience: the checkpoint after experience k is complete (verified manifest)
before the results files are rewritten, a resumed run first rewrites results that are missing or stale, and
an interrupted run (Ctrl-C, a NaN loss, a kill) leaves the last checkpoint intact.
"""
from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import avalanche
import numpy as np
import timm
import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import InteractiveLogger, TensorboardLogger
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

import mambacl
from mambacl.backbones.pretrained import PACKAGED_WEIGHTS, pretrained_file
from mambacl.benchmarks.registry import create_benchmark, get_benchmark
from mambacl.experiments.checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint
from mambacl.experiments.config import RunConfig
from mambacl.experiments.console import ExperienceProgress
from mambacl.experiments.results import accuracy_matrix, read_results, summarize, write_results
from mambacl.experiments.run_folder import on_main_process, prepare_run_folder
from mambacl.experiments.strategy_state import decode_metrics, restore_strategy, rng_state, strategy_state
from mambacl.strategies.distributed import (barrier, check_batch_divisible, check_replicas_in_sync,
                                            check_same_config, gather_objects, init_distributed, is_main_process,
                                            local_device, world_size)
from mambacl.strategies.metrics import FeatureNCMAccuracy, feature_ncm_accuracy_metrics, within_task_accuracy_metrics
from mambacl.strategies.plugins import DistributedPlugin, FiniteLossPlugin, NonFiniteLossError, NullSpacePlugin
from mambacl.strategies.registry import TrainSetup, create_strategy, get_strategy

__all__ = ["RunInterrupted", "build_backbone", "diagnostic_metrics", "history_metrics", "make_evaluator",
           "resolve_device", "resolve_pretrained", "run_benchmark"]

_STREAM = "eval_phase/test_stream"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``out`` and ``done`` (finished experiences, all saved) say where it stopped; ``total`` is
    None when the stream was not built yet."""

    def __init__(self, out: str, done: int, total: Optional[int]) -> None:
        super().__init__(f"interrupted after {done} of {total if total is not None else '?'} experiences")
        self.out, self.done, self.total = out, done, total


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``, which must be available here (this process's GPU under torchrun).

    Raises:
        ValueError naming the device and listing the available ones.
    """
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    if name == "cuda" and torch.cuda.is_available():
        return local_device()
    if name == "cpu" or name in available:
        return torch.device(name)
    raise ValueError(f"device {name!r} is not available here (torch {torch.__version__}, CUDA available: "
                     f"{torch.cuda.is_available()}); available devices: {', '.join(available)}")


def build_backbone(config: RunConfig, input_shape: Sequence[int]) -> nn.Module:
    """Create the timm backbone (no classifier) for inputs of shape ``[C, H, W]``.

    The benchmark's default model and model kwargs apply when ``config.model`` is None; ``img_size`` and
    ``in_chans`` come from the data unless ``model_args`` sets them. ``config.pretrained`` (a local file or a
    packaged checkpoint's name, see :func:`resolve_pretrained`) is loaded by mambacl's own loaders (official Vim /
    De-focus Mamba layouts) or, for other timm models, by timm from the local file; the backbone records it as
    ``pretrained_source``.
    """
    spec = get_benchmark(config.benchmark)
    name = config.model or spec.default_model
    if not timm.list_models(name):
        raise ValueError(f"unknown model {name!r}; see `mambacl list` (any timm model name is accepted)")
    kwargs = {"img_size": int(input_shape[-1]), "in_chans": int(input_shape[0])}
    kwargs.update(spec.default_model_args if config.model is None else {})
    kwargs.update(config.model_args)
    pretrained = resolve_pretrained(config.pretrained)
    if pretrained is not None:
        if timm.models.model_entrypoint(name).__module__.startswith("mambacl."):
            kwargs["pretrained_file"] = pretrained
        else:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": pretrained})
    try:
        backbone = timm.create_model(name, num_classes=0, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error) or "img_size" in config.model_args:
            raise
        kwargs.pop("img_size")  # CNNs (e.g. timm's resnet18) take any input size and have no img_size argument
        backbone = timm.create_model(name, num_classes=0, **kwargs)
    if pretrained is not None:
        backbone.pretrained_source = config.pretrained
    return backbone


def resolve_pretrained(pretrained: Optional[str]) -> Optional[str]:
    """The checkpoint file of ``pretrained``: a local file, or the name of a packaged checkpoint (e.g.
    'test_vim.glyphs', checksum checked); None stays None (from scratch)."""
    if pretrained is None:
        return None
    if Path(pretrained).is_file():
        return pretrained
    if pretrained in PACKAGED_WEIGHTS:
        return str(pretrained_file(pretrained))
    raise FileNotFoundError(f"pretrained file {pretrained} does not exist (and it names none of the packaged "
                            f"checkpoints {sorted(PACKAGED_WEIGHTS)})")


def history_metrics() -> List[Any]:
    """The metrics whose state spans experiences (forgetting and BWT keep each experience's first accuracy):
    experience and stream accuracy, epoch loss, forgetting, BWT. Checkpoints save them."""
    return [*accuracy_metrics(experience=True, stream=True), *loss_metrics(epoch=True),
            *forgetting_metrics(experience=True, stream=True), *bwt_metrics(experience=True, stream=True)]


def diagnostic_metrics() -> List[Any]:
    """Within-task accuracy and the feature nearest-class-mean accuracy, per experience and over the stream; they
    are recomputed at every evaluation (the NCM class means from the training data of the experiences seen)."""
    return [*within_task_accuracy_metrics(), *feature_ncm_accuracy_metrics()]


def make_evaluator(config: RunConfig, metrics: Optional[List[Any]] = None) -> EvaluationPlugin:
    """EvaluationPlugin with ``metrics`` (default :func:`history_metrics` + :func:`diagnostic_metrics`) and the
    loggers: one progress bar per experience (``progress``), Avalanche's InteractiveLogger instead with
    ``verbose``, TensorBoard with ``tensorboard``; rank 0 only.
    """
    loggers: List[Any] = []
    if config.progress and is_main_process():
        loggers.append(InteractiveLogger() if config.verbose else ExperienceProgress(config.strategy))
    if config.tensorboard and is_main_process():
        loggers.append(TensorboardLogger(Path(config.out) / "tensorboard"))
    with warnings.catch_warnings():  # no loggers is what --quiet asks for, not a mistake
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(*(metrics if metrics is not None else [*history_metrics(), *diagnostic_metrics()]),
                                loggers=loggers)


def _versions() -> Dict[str, str]:
    return {"mambacl": mambacl.__version__, "torch": torch.__version__, "avalanche": avalanche.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _step_record(step: int, classes: List[int], metrics: Dict[str, Any], n_seen: int, train_s: float,
                 eval_s: float) -> Dict[str, Any]:
    def per_exp(name: str) -> List[float]:
        return [float(metrics[f"{name}_Exp/{_STREAM}/Task000/Exp{j:03d}"]) for j in range(n_seen)]
    accuracies = per_exp("Top1_Acc")
    return {"experience": step, "classes": classes,
            "acc_stream": float(metrics[f"Top1_Acc_Stream/{_STREAM}/Task000"]),
            "acc_task_mean": float(np.mean(accuracies)), "acc_per_exp": accuracies,
            "within_task_acc": float(metrics[f"Top1_WithinTaskAcc_Stream/{_STREAM}/Task000"]),
            "within_task_acc_per_exp": per_exp("Top1_WithinTaskAcc"),
            "ncm_acc": float(metrics[f"Top1_FeatureNCMAcc_Stream/{_STREAM}/Task000"]),
            "ncm_acc_per_exp": per_exp("Top1_FeatureNCMAcc"),
            "forgetting": float(metrics.get(f"StreamForgetting/{_STREAM}", 0.0)),
            "bwt": float(metrics.get(f"StreamBWT/{_STREAM}", 0.0)),
            "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)}


def run_benchmark(config: RunConfig, resume: bool = False, stop_after: Optional[int] = None,
                  overwrite: bool = False) -> Dict[str, Any]:
    """Train ``config.strategy`` over ``config.benchmark`` and return (and write to ``config.out``) the results.

    After each training step the model is evaluated on the test experiences seen so far; the step's metrics
    are recorded, a verified checkpoint is saved and the result files are rewritten.

    Args:
        config: the run.
        resume: continue after the last finished experience of the run in ``config.out``; its checkpoints must
            have been written with this config (up to ``HARMLESS_KEYS``), else a CheckpointError.
        stop_after: stop once this many experiences are finished (an interrupted run; resume continues it).
        overwrite: replace a run already in ``config.out``; without it (and without ``resume``) such a folder
            is refused with a RunFolderError.
    Returns:
        the contents of ``results.json``: config, versions, device, class order, per-experience records,
        accuracy matrix, final metrics (see :func:`mambacl.experiments.results.summarize`) and timings.
    Raises:
        RunInterrupted on Ctrl-C; NonFiniteLossError on a NaN/inf loss (the last checkpoint stays intact).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    init_distributed()  # torchrun: join the process group; a plain process runs alone
    check_same_config(config.to_dict())
    check_batch_divisible(config.batch_size, name="batch_size")
    device = resolve_device(config.device)
    out = Path(config.out)
    spec = get_strategy(config.strategy)
    if resume:
        _check_results_belong(out, config)
    manifest, state = load_latest_checkpoint(out, config) if resume else (None, None)
    on_main_process(lambda: prepare_run_folder(out, "resume" if resume else "overwrite" if overwrite else "new"))
    barrier()
    # what an interruption reports: the experiences whose checkpoint is complete, and how many there are
    progress: Dict[str, Optional[int]] = {"saved": manifest["done"] if manifest else 0, "total": None}
    try:
        return _train_stream(config, spec, device, out, manifest, state, stop_after, progress)
    except KeyboardInterrupt:
        raise RunInterrupted(str(out), progress["saved"], progress["total"]) from None


def _train_stream(config: RunConfig, spec: Any, device: torch.device, out: Path, manifest: Optional[Dict[str, Any]],
                  state: Optional[Dict[str, Any]], stop_after: Optional[int],
                  progress: Dict[str, Optional[int]]) -> Dict[str, Any]:
    """:func:`run_benchmark` after the checks: build, restore, then train, evaluate and save each experience."""
    RNGManager.set_random_seeds(config.seed)
    bench = create_benchmark(config.benchmark, **config.benchmark_args)
    backbone = build_backbone(config, bench.train_stream[0].dataset[0][0].shape)
    history = decode_metrics(state["metrics"]) if state else history_metrics()
    diagnostics = diagnostic_metrics()
    evaluator = make_evaluator(config, [*history, *diagnostics])
    setup = TrainSetup(backbone=backbone, lr=config.lr, weight_decay=config.weight_decay, epochs=config.epochs,
                       train_mb_size=config.batch_size, eval_mb_size=config.eval_batch_size, device=device,
                       evaluator=evaluator,
                       plugins=[DistributedPlugin(seed=config.seed, autocast=config.autocast,
                                                  num_workers=config.num_workers,
                                                  max_device_batch=config.max_device_batch,
                                                  data_repeat=config.data_repeat), FiniteLossPlugin()])
    strategy = create_strategy(config.strategy, setup, **config.strategy_args)
    if config.lr_milestones:
        if getattr(strategy, "own_lr_schedule", False):
            raise ValueError(f"lr_milestones {config.lr_milestones}: strategy {config.strategy!r} schedules its own "
                             "learning rate; leave lr_milestones empty")
        if max(config.lr_milestones) >= config.epochs:
            warnings.warn(f"lr_milestones {config.lr_milestones} at or beyond epochs {config.epochs} never apply")
        # the strategy built its optimizer: schedule it, restarting at every experience (a fresh optimizer per task)
        strategy.plugins.append(LRSchedulerPlugin(MultiStepLR(strategy.optimizer, config.lr_milestones,
                                                              config.lr_gamma), step_granularity="epoch"))
    # a joint strategy trains once on the whole stream and is evaluated on all of it
    steps = [bench.train_stream] if spec.joint else list(bench.train_stream)
    progress["total"] = len(steps)
    n_test = len(bench.test_stream)
    record = state["record"] if state else {"done": 0, "rows": []}
    if state:
        restore_strategy(strategy, [] if spec.joint else steps[:record["done"]], state)
        for metric in diagnostics:
            if isinstance(metric, FeatureNCMAccuracy) and not spec.joint:
                metric.ncm.set_train_datasets({i: steps[i].dataset for i in range(record["done"])})
        del state
    results = _results(config, bench, record, n_test, device)
    if is_main_process() and manifest is not None:
        write_results(results, out)  # results missing, or behind the checkpoint after a kill: rewrite them
    last = len(steps) if stop_after is None else min(len(steps), stop_after)
    for i in range(record["done"], last):
        start = time.perf_counter()
        strategy.train(steps[i])
        train_s = time.perf_counter() - start
        seen = n_test if spec.joint else i + 1
        metrics = strategy.eval(bench.test_stream[:seen])
        classes = sorted({int(c) for e in bench.train_stream[:seen] for c in e.classes_in_this_experience})
        row = _step_record(i, classes, metrics, seen, train_s, time.perf_counter() - start - train_s)
        row.update(_null_space_sizes(strategy))
        record = {"done": i + 1, "rows": [*record["rows"], row]}
        results = _results(config, bench, record, n_test, device)
        _check_finite_parameters(strategy.model, i)
        rngs = gather_objects(rng_state())  # every rank continues its own random streams after a resume
        if is_main_process():
            print(f"[{config.strategy}] step {i + 1}/{len(steps)}: seen-class acc {row['acc_stream']:.4f} | "
                  f"task-mean acc {row['acc_task_mean']:.4f} | forgetting {row['forgetting']:.4f} | "
                  f"train {train_s:.1f}s eval {row['eval_s']:.1f}s", flush=True)
            save_checkpoint(out, strategy_state(strategy, history, rngs), record, config, _versions())
        progress["saved"] = record["done"]
        if is_main_process():
            write_results(results, out)
        barrier()
    check_replicas_in_sync(strategy.model)
    return results


def _null_space_sizes(strategy: Any) -> Dict[str, Any]:
    """``{"null_space": {feature key: {dim, null, rule, projector, solver}}}`` of the null-space plugins' last
    experience (the sizes protecting the next one), or nothing for strategies without one."""
    sizes: Dict[str, Any] = {}
    for plugin in strategy.plugins:
        if isinstance(plugin, NullSpacePlugin) and plugin.null_space_history:
            sizes.update(plugin.null_space_history[-1])
    return {"null_space": sizes} if sizes else {}


@torch.no_grad()
def _check_finite_parameters(model: nn.Module, experience: int) -> None:
    """No checkpoint of NaN/inf weights (e.g. fp16 gradients that overflowed while the loss stayed finite)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"parameters {bad[:5]}{' ...' if len(bad) > 5 else ''} are not finite after "
                                 f"experience {experience}; its checkpoint is not written (the last one stays)")


def _check_results_belong(out: Path, config: RunConfig) -> None:
    """A results.json left in ``out`` must be this run's (its checkpoints were matched already)."""
    saved = read_results(out)
    if saved is None:
        return
    try:
        differing = RunConfig.from_dict(saved["config"]).differing_keys(config)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{out / 'results.json'} has no valid run config ({err}); it is not this run's") from err
    if differing:
        raise CheckpointError(f"{out / 'results.json'} belongs to another run than the checkpoints in {out}: their "
                              f"configs differ in {sorted(differing)}")


def _results(config: RunConfig, bench: Any, record: Dict[str, Any], n_test: int,
             device: torch.device) -> Dict[str, Any]:
    rows = record["rows"]
    return {"config": config.to_dict(), "fingerprint": config.fingerprint(), "versions": _versions(),
            "seed": config.seed, "device": str(device), "world_size": world_size(),
            "class_order": [int(c) for c in getattr(bench, "class_order", [])],
            "n_experiences": n_test, "finished": record["done"], "experiences": rows,
            "accuracy_matrix": accuracy_matrix(rows, n_test), "final": summarize(rows),
            "timings": {"train_s": round(sum(r["train_s"] for r in rows), 3),
                        "eval_s": round(sum(r["eval_s"] for r in rows), 3)}}




