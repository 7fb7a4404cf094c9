"""Fitted heads survive the run layer's checkpoints: class means are model buffers, restored into a fresh strategy."""
import sys
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from mambacl.backbones import VisionMamba
from mambacl.experiments.strategy_state import restore_strategy, strategy_state
from mambacl.strategies.registry import TrainSetup, create_strategy

sys.path.insert(0, str(Path(__file__).parents[1] / "strategies"))
from mambacl_helpers import split_digits  # noqa: E402


def _strategy(name, hparams):
    torch.manual_seed(0)
    backbone = VisionMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, num_classes=0)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    setup = TrainSetup(backbone=backbone, lr=2e-3, train_mb_size=32, eval_mb_size=256, evaluator=evaluator)
    return create_strategy(name, setup, **hparams)


@pytest.mark.parametrize("name,hparams,buffer", [("mambacl", {"head": "prototype"}, "sums"),
                                                 ("ranpac", {"num_projections": 64}, "weight")],
                         ids=["mambacl-prototype", "ranpac"])
def test_fitted_head_run_resumed_from_checkpoint_matches_uninterrupted(tmp_path, name, hparams, buffer):
    bench = split_digits(n_train=200)
    full = _strategy(name, hparams)
    for i in range(2):
        full.train(bench.train_stream[i])
    torch.save(strategy_state(full, full.evaluator.metrics), tmp_path / "state.pt")
    full.train(bench.train_stream[2])
    expected = full.eval(bench.test_stream[:3])

    resumed = _strategy(name, hparams)
    restore_strategy(resumed, bench.train_stream[:2], torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.model.head.fitted.tolist() == [True] * 4
    resumed.train(bench.train_stream[2])
    metrics = resumed.eval(bench.test_stream[:3])
    torch.testing.assert_close(getattr(resumed.model.head, buffer), getattr(full.model.head, buffer),
                               rtol=1e-6, atol=1e-6)
    for key in [k for k in expected if k.startswith("Top1_Acc")]:
        assert abs(metrics[key] - expected[key]) < 1e-6, key
