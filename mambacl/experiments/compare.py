"""``mambacl compare``: several strategies with the same seeds on one benchmark, and the comparison table."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mambacl.experiments.config import RunConfig
from mambacl.experiments.runner import run_benchmark
from mambacl.strategies.registry import get_strategy

__all__ = ["compare", "compare_table"]

_TABLE_METRICS = ("acc_sample_weighted", "acc_task_mean", "avg_incremental_acc", "forgetting", "bwt")


def compare(config: RunConfig, strategies: Sequence[str], seeds: Sequence[int],
            strategy_args: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Run each strategy with each seed on ``config.benchmark`` (runs in ``<out>/<strategy>/seed<s>``).

    Args:
        config: shared settings (its ``strategy``, ``strategy_args`` and ``seed`` are replaced per run).
        strategies: registered strategy names. seeds: seeds, the same for every strategy.
        strategy_args: optional per-strategy hyper-parameters, ``{name: {hparam: value}}``.

    Returns:
        ``{"benchmark", "seeds", "runs": {strategy: [final metrics per seed]}, "summary": {strategy:
        {metric: (mean, std)}}}``; also written as ``<out>/compare.json`` and ``<out>/compare.md``.
    """
    if not strategies or not seeds:
        raise ValueError("compare needs at least one strategy and one seed")
    for name in strategies:
        get_strategy(name)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for name in strategies:
        for seed in seeds:
            run = dataclasses.replace(config, strategy=name, seed=int(seed),
                                      strategy_args=(strategy_args or {}).get(name, {}),
                                      out=str(Path(config.out) / name / f"seed{seed}"))
            result = run_benchmark(run)
            runs.setdefault(name, []).append({**result["final"], "time_s": result["timings"]["train_s"]})
    summary = {name: {m: (float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs])))
                      for m in (*_TABLE_METRICS, "time_s")} for name, rs in runs.items()}
    comparison = {"benchmark": config.benchmark, "seeds": [int(s) for s in seeds], "runs": runs, "summary": summary}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(comparison, indent=2))
    (out / "compare.md").write_text(compare_table(comparison) + "\n")
    return comparison



def compare_table(comparison: Dict[str, Any]) -> str:
    """Markdown table of :func:`compare`'s summary (mean ± std over seeds)."""
    header = ["strategy", *_TABLE_METRICS, "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stats in comparison["summary"].items():
        cells = [f"{m:.4f} ± {s:.4f}" if not math.isnan(m) else "n/a"
                 for m, s in (stats[k] for k in _TABLE_METRICS)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {stats['time_s'][0]:.1f} |")
    return "\n".join(lines)
