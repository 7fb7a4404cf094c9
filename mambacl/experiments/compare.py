"""``mambacl compare``: several strategies with the same seeds on one benchmark, and the comparison table."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from mambacl.experiments.checkpoint import latest_manifest
from mambacl.experiments.config import HARMLESS_KEYS, RunConfig, differing_keys
from mambacl.experiments.results import FINAL_METRICS
from mambacl.experiments.run_folder import atomic_write_text, on_main_process, prepare_run_folder
from mambacl.experiments.runner import run_benchmark
from mambacl.strategies.distributed import barrier, is_main_process
from mambacl.strategies.registry import get_strategy

__all__ = ["PLAN", "compare", "compare_table", "comparison_plan", "read_plan"]

PLAN = "compare_plan.json"

_LABELS = {"acc_sample_weighted": "final acc (class-incr.)", "within_task_acc": "within-task acc",
           "ncm_acc": "feature NCM acc", "acc_task_mean": "task-mean acc", "avg_incremental_acc": "avg incr. acc",
           "forgetting": "forgetting", "bwt": "BWT"}


def compare(config: RunConfig, strategies: Sequence[str], seeds: Sequence[int],
            strategy_args: Optional[Dict[str, Dict[str, Any]]] = None, resume: bool = False,
            overwrite: bool = False) -> Dict[str, Any]:
    """Run each strategy with each seed on ``config.benchmark`` (runs in ``<out>/<label>/seed<s>``).

    Args:
        config: shared settings (``seed`` and ``strategy`` are replaced per run; ``config.strategy_args``, e.g. from a
            recipe, apply to the labels of ``config.strategy``, under their own).
        strategies: labels ``name`` or ``name@variant`` of registered strategies; a variant is the same strategy
            with its own hyper-parameters (e.g. ``mambacl@prototype`` with ``{"mambacl@prototype": {"head":
            "prototype"}}``). seeds: seeds, the same for every strategy.
        strategy_args: optional hyper-parameters per label, ``{label: {hparam: value}}``.
        resume: continue the comparison in ``config.out``: finished runs are read back, interrupted ones
            resumed, missing ones run; it must be the comparison that was started there (``compare_plan.json``:
            the same shared config but for the harmless keys, labels, seeds and hyper-parameters).
        overwrite: replace a comparison already in ``config.out``. Without either flag a folder holding a
            comparison (or any of its runs) is refused before anything trains.

    Returns:
        ``{"benchmark", "seeds", "runs": {strategy: [final metrics per seed]}, "summary": {strategy:
        {metric: (mean, std)}}}``; also written as ``<out>/compare.json`` and ``<out>/compare.md``.
    """
    if not strategies or not seeds:
        raise ValueError("compare needs at least one strategy and one seed")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the comparison, or replace it")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct labels, got {list(strategies)}")
    for label in strategies:
        get_strategy(label.partition("@")[0])
    unknown = sorted(set(strategy_args or {}) - set(strategies))
    if unknown:
        raise ValueError(f"--strategy-arg names strategies {unknown} that are not compared ({list(strategies)})")
    out = Path(config.out)
    labels = {label: {**(config.strategy_args if label.partition("@")[0] == config.strategy else {}),
                      **(strategy_args or {}).get(label, {})} for label in strategies}
    runs_plan = [(label, dataclasses.replace(config, strategy=label.partition("@")[0], seed=int(seed),
                                             strategy_args=labels[label], out=str(out / label / f"seed{seed}")))
                 for label in strategies for seed in seeds]
    plan = comparison_plan(config, strategies, seeds, labels)
    saved = read_plan(out) if resume else None
    if saved is not None and saved != plan:
        differing = sorted(k for k in plan if k != "config" and plan[k] != saved.get(k))
        differing += sorted(differing_keys(saved["config"], plan["config"]))
        raise ValueError(f"--resume continues the comparison in {out} as it was started; this one differs in "
                         f"{differing}: drop the changed options (or use another --out, or --overwrite)")
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    on_main_process(lambda: prepare_run_folder(out, mode, what="comparison", runs=[Path(r.out) for _, r in runs_plan]))
    if is_main_process():
        atomic_write_text(out / PLAN, json.dumps(plan, indent=2))
    barrier()
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for label, run in runs_plan:
        result = run_benchmark(run, resume=resume and latest_manifest(run.out) is not None)
        runs.setdefault(label, []).append({**result["final"], "time_s": result["timings"]["train_s"]})
    summary = {name: {m: (float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs])))
                      for m in (*FINAL_METRICS, "time_s")} for name, rs in runs.items()}
    comparison = {"benchmark": config.benchmark, "seeds": [int(s) for s in seeds], "runs": runs, "summary": summary}
    if is_main_process():
        atomic_write_text(out / "compare.json", json.dumps(comparison, indent=2))
        atomic_write_text(out / "compare.md", compare_table(comparison) + "\n")
    return comparison


def comparison_plan(config: RunConfig, strategies: Sequence[str], seeds: Sequence[int],
                    strategy_args: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """What a comparison runs, as plain data: the shared config (but the keys a resume may change), the labels,
    the seeds and each label's hyper-parameters."""
    shared = {k: v for k, v in config.to_dict().items() if k not in HARMLESS_KEYS}
    return json.loads(json.dumps({"config": shared, "strategies": list(strategies), "seeds": [int(s) for s in seeds],
                                  "strategy_args": strategy_args}, default=repr))


def read_plan(out: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The plan a comparison in ``out`` was started with (``compare_plan.json``), or None."""
    try:
        return json.loads((Path(out) / PLAN).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def compare_table(comparison: Dict[str, Any]) -> str:
    """Markdown table of :func:`compare`'s summary (mean ± std over seeds; the value alone with one seed)."""
    header = ["strategy", *(_LABELS[m] for m in FINAL_METRICS), "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stats in comparison["summary"].items():
        cells = [_cell(mean, std, len(comparison["seeds"])) for mean, std in (stats[k] for k in FINAL_METRICS)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {stats['time_s'][0]:.1f} |")
    return "\n".join(lines)


def _cell(mean: float, std: float, n_seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if n_seeds == 1 else f"{mean:.4f} ± {std:.4f}"
