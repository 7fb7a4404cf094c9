"""The run layer: configs, the run loop with checkpoints and resume, results files, comparisons and the CLI.

Sits above the benchmarks (scenario builders) and the strategies; nothing below imports it.
"""
import warnings

# Avalanche imports qpsolvers for one optional strategy; its "no QP solver" notice is not about this run
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
from mambacl.experiments.config import RunConfig  # noqa: E402  (after the filter)
from mambacl.experiments.runner import build_backbone, make_evaluator, run_benchmark  # noqa: E402
from mambacl.experiments.compare import compare, compare_table  # noqa: E402

__all__ = ["RunConfig", "build_backbone", "compare", "compare_table", "make_evaluator", "run_benchmark"]
