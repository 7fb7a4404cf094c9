"""Run results: summary metrics from the accuracy matrix, and the files written to a run folder.

Files: ``results.json`` (everything), ``results.csv`` (one row per experience), ``accuracy_matrix.png``
(heat map) and ``accuracy.png`` (accuracy after each experience). The CSV is rewritten whole from the
results each time, so a resumed run never truncates earlier rows (Avalanche's CSVLogger would).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from mambacl.experiments.run_folder import atomic_write_text

__all__ = ["accuracy_matrix", "summarize", "write_results", "read_results", "CSV_COLUMNS", "FINAL_METRICS"]

CSV_COLUMNS = ("experience", "classes", "acc_stream", "within_task_acc", "ncm_acc", "acc_task_mean", "forgetting", "bwt",
               "train_s", "eval_s")


def accuracy_matrix(rows: Sequence[Dict[str, Any]], n_experiences: int) -> List[List[Optional[float]]]:
    """Accuracy matrix ``A[i][j]``: accuracy on test experience j after training step i (None if not evaluated).

    Args:
        rows: per-step records with ``acc_per_exp`` (list over the evaluated experiences 0..).
        n_experiences: number of test experiences (matrix width).
    """
    return [[(r["acc_per_exp"][j] if j < len(r["acc_per_exp"]) else None) for j in range(n_experiences)]
            for r in rows]


FINAL_METRICS = ("acc_sample_weighted", "within_task_acc", "ncm_acc", "acc_task_mean", "avg_incremental_acc",
                 "forgetting", "bwt")


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Final metrics of a run.

    Returns:
        ``acc_sample_weighted`` (class-incremental: Top1_Acc_Stream on all seen test data after the last step),
        ``within_task_acc`` (task-incremental: each test sample's argmax restricted to its experience's classes),
        ``ncm_acc`` (cosine nearest-class-mean accuracy of the current features, class means over the training data
        seen), ``acc_task_mean`` (mean of the per-experience accuracies after the last step), ``avg_incremental_acc``
        (mean over steps of the sample-weighted accuracy), ``forgetting`` and ``bwt`` (Avalanche's stream metrics
        after the last step); all sample-weighted over the seen test data unless named otherwise.
    """
    if not rows:
        return {k: None for k in FINAL_METRICS}
    last = rows[-1]
    return {"acc_sample_weighted": last["acc_stream"], "within_task_acc": last["within_task_acc"],
            "ncm_acc": last["ncm_acc"], "acc_task_mean": last["acc_task_mean"],
            "avg_incremental_acc": float(np.mean([r["acc_stream"] for r in rows])),
            "forgetting": last["forgetting"], "bwt": last["bwt"]}


def _plot(results: Dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array([[math.nan if v is None else v for v in row] for row in results["accuracy_matrix"]], float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * matrix.shape[1], 1.0 + 0.5 * matrix.shape[0]))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), value in np.ndenumerate(matrix):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(matrix.shape[1]), [str(j + 1) for j in range(matrix.shape[1])])
    ax.set_yticks(range(matrix.shape[0]), [str(i + 1) for i in range(matrix.shape[0])])
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    ax.set_title(f"{results['config']['strategy']} on {results['config']['benchmark']}")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    _save_png(fig, out / "accuracy_matrix.png")
    plt.close(fig)

    steps = [r["experience"] + 1 for r in results["experiences"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [r["acc_stream"] for r in results["experiences"]], "o-", label="seen classes (sample-weighted)")
    ax.plot(steps, [r["acc_task_mean"] for r in results["experiences"]], "s--", label="mean over experiences")
    ax.set_xticks(steps)
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, out / "accuracy.png")
    plt.close(fig)


def _save_png(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def write_results(results: Dict[str, Any], out: Union[str, Path], plots: bool = True) -> None:
    """Write ``results.json``, ``results.csv`` and (with ``plots``) the two PNGs into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results["experiences"]:
            writer.writerow([" ".join(map(str, r["classes"])) if c == "classes" else r[c] for c in CSV_COLUMNS])
    os.replace(tmp, out / "results.csv")
    if plots and results["experiences"]:
        _plot(results, out)


def read_results(out: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The ``results.json`` of run folder ``out``, or None when there is none (or it is unreadable)."""
    path = Path(out) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return results if isinstance(results, dict) else None
