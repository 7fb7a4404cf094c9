"""A plain Avalanche script, as a user writes it (no mambacl command, no registry): the packaged pretrained
test_vim, Mamba-CL with the prototype head and the authors' optimizer, against Naive fine-tuning of the same
backbone. Mamba-CL must forget less and end more accurate, and set up this way it must not warn."""
import warnings

import pytest
import timm
import torch
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

import mambacl  # noqa: F401  (registers the models with timm)
from mambacl.benchmarks import split_digits
from mambacl.strategies import ContinualClassifier, MambaCL, mambacl_optimizer


def _run(make_strategy) -> dict:
    torch.manual_seed(0)
    benchmark = split_digits()
    backbone = timm.create_model("test_vim.glyphs", pretrained=True, img_size=8, patch_size=2, in_chans=1)
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), forgetting_metrics(stream=True), loggers=[])
    strategy = make_strategy(backbone, evaluator)
    for i, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        metrics = strategy.eval(benchmark.test_stream[:i + 1])
    return {"acc": metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"],
            "forgetting": metrics["StreamForgetting/eval_phase/test_stream"]}


def _mambacl(backbone, evaluator):
    model = ContinualClassifier(backbone, head="prototype")
    return MambaCL(model=model, optimizer=mambacl_optimizer(model, lr=2e-3), train_mb_size=32, train_epochs=4,
                   eval_mb_size=256, evaluator=evaluator, progress=False)


def _naive(backbone, evaluator):
    model = ContinualClassifier(backbone, head="incremental")
    return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3), train_mb_size=32,
                 train_epochs=4, eval_mb_size=256, evaluator=evaluator)


@pytest.mark.slow
def test_mambacl_with_the_prototype_head_forgets_less_than_naive():
    with warnings.catch_warnings():
        warnings.simplefilter("error", mambacl.strategies.NullSpaceWarning)  # the documented set-up is silent
        ours = _run(_mambacl)
    naive = _run(_naive)
    assert ours["forgetting"] < naive["forgetting"] / 2, (ours, naive)
    assert ours["acc"] > naive["acc"] + 0.3, (ours, naive)
