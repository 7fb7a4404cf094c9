"""Class-incremental accuracy on split digits: `mambacl compare` for naive, EWC, LwF, replay, Adam-NSCL and
Mamba-CL on a small Vision Mamba (test_vim at 8 px, patch 2), over several seeds.

Reports mean ± std over seeds of the final seen-class accuracy (sample-weighted), the task-mean accuracy,
forgetting and training time. Every run's final metrics are checked against a recomputation from its
accuracy matrix (the evaluation protocol), and the script reports whether Mamba-CL forgets less than
naive, EWC and LwF. There is nothing to warm up: each figure is a full training run.

Usage: python benchmarks/cl_accuracy.py [--quick] [--seeds 0,1,2] [--epochs 4] [--device cpu] [--no-append]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_outputs  # noqa: E402

from mambacl.experiments import RunConfig, compare  # noqa: E402

STRATEGIES = "naive,ewc,lwf,replay,adam-nscl,mambacl"
METRICS = ("acc_sample_weighted", "acc_task_mean", "forgetting")


def _check_run(results: dict) -> None:
    """The run's final metrics must follow from its accuracy matrix."""
    matrix, last = results["accuracy_matrix"], len(results["experiences"]) - 1
    task_mean = float(np.mean(matrix[last][:last + 1]))
    forgetting = float(np.mean([matrix[j][j] - matrix[last][j] for j in range(last)])) if last else 0.0
    final = results["final"]
    if abs(final["acc_task_mean"] - task_mean) > 1e-9 or abs(final["forgetting"] - forgetting) > 1e-9:
        raise AssertionError(f"{results['config']['strategy']}: final metrics {final} disagree with the accuracy "
                             f"matrix (task-mean {task_mean}, forgetting {forgetting})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 20 images per class (a smoke run)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out or tempfile.mkdtemp(prefix="cl_accuracy_")
    config = RunConfig(benchmark="split_digits", epochs=1 if args.quick else args.epochs, device=args.device,
                       progress=False, out=out,
                       benchmark_args={"max_per_class": 20} if args.quick else {})
    comparison = compare(config, strategies, seeds)
    for name in strategies:
        for seed in seeds:
            _check_run(json.loads((Path(out) / name / f"seed{seed}" / "results.json").read_text()))
    summary = comparison["summary"]
    rows = [[name, *(f"{summary[name][m][0]:.3f} ± {summary[name][m][1]:.3f}" for m in METRICS),
             f"{summary[name]['time_s'][0]:.1f}"] for name in strategies]
    table = markdown_table(["strategy", "final acc (seen classes)", "final acc (task mean)", "forgetting",
                            "train time per run (s)"], rows)
    notes = (f"split_digits, 5 experiences x 2 classes, test_vim (8 px, patch 2, dim 32, depth 2), AdamW lr "
             f"{config.lr}, batch {config.batch_size}, {config.epochs} epoch(s), seeds {seeds}"
             f"{', quick: 20 images per class' if args.quick else ''}.")
    baselines = [b for b in ("naive", "ewc", "lwf") if b in summary]
    if "mambacl" in summary and baselines:
        less = all(summary["mambacl"]["forgetting"][0] < summary[b]["forgetting"][0] for b in baselines)
        notes += f" Mamba-CL forgets less than {', '.join(baselines)}: {'yes' if less else 'no'}."
    write_outputs("cl_accuracy", {"config": config.to_dict(), "comparison": comparison}, table,
                  "Class-incremental accuracy on split digits (mambacl compare)", notes, record=not args.no_append)


if __name__ == "__main__":
    main()
