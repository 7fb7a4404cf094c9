"""The within-task and feature-NCM metrics and the fitted heads under DistributedPlugin on 2 CPU processes (gloo)
equal one process, including an evaluation batch smaller than the world (a placeholder sample on rank 1)."""
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits
from test_distributed import launch

from mambacl.backbones import VisionMamba
from mambacl.strategies import feature_ncm_accuracy_metrics, within_task_accuracy_metrics
from mambacl.strategies.distributed import init_distributed, rank, world_size
from mambacl.strategies.plugins import DistributedPlugin
from mambacl.strategies.registry import TrainSetup, create_strategy


def simplecil_run() -> dict:
    """SimpleCIL + DistributedPlugin over 2 split-digits experiences of 40 samples, evaluated in batches of 13
    (the last global batch has 1 sample); returns the metrics and the class sums of the head."""
    bench = split_digits(per_class=[40, 40])
    torch.manual_seed(0)
    backbone = VisionMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, num_classes=0)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), *within_task_accuracy_metrics(),
                                 *feature_ncm_accuracy_metrics(), loggers=[])
    setup = TrainSetup(backbone=backbone, train_mb_size=16, eval_mb_size=13, evaluator=evaluator,
                       plugins=[DistributedPlugin(seed=0)])
    strategy = create_strategy("simplecil", setup)
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream[:i + 1])
    return {"metrics": {k: v for k, v in metrics.items() if k.startswith("Top1")}, "sums": strategy.model.head.sums}


def worker_metrics(out: str) -> None:
    assert init_distributed() and world_size() == 2
    torch.save(simplecil_run(), Path(out) / f"rank{rank()}.pt")


@pytest.mark.slow
def test_metrics_and_prototype_head_under_distributed_plugin_match_one_process(tmp_path):
    ranks = launch("worker_metrics", tmp_path, module="test_metrics_distributed")
    ref = simplecil_run()
    assert len(ref["metrics"]) == 9  # accuracy, within-task and NCM accuracy: 2 experiences + stream each
    for res in ranks:
        torch.testing.assert_close(res["sums"], ref["sums"], rtol=1e-6, atol=1e-6)
        for key, value in ref["metrics"].items():
            assert res["metrics"][key] == pytest.approx(value, abs=1e-9), key
