"""MambaCL / NullSpacePlugin inside Avalanche: heads, split-digits forgetting vs Naive, resume, bad input."""
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.models import IncrementalClassifier
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits, tiny_vim

from mambacl.strategies import AdamNSCL, ContinualClassifier, ExperienceHeads, MambaCL, NullSpacePlugin

FORGETTING = "StreamForgetting/eval_phase/test_stream"
ACCURACY = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


def _evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                            forgetting_metrics(experience=True, stream=True), loggers=[])


def test_experience_heads_train_locally_and_concatenate_at_test():
    heads = ExperienceHeads(6)
    heads.train()
    heads.adaptation(SimpleNamespace(classes_in_this_experience=[1, 0]))
    heads.adaptation(SimpleNamespace(classes_in_this_experience=[3, 2]))
    x, y = torch.randn(5, 6), torch.tensor([2, 3, 3, 2, 2])
    out = heads(x)
    assert out.shape == (5, 4) and (out[:, :2] == heads.mask_value).all()
    loss = F.cross_entropy(out, y)
    torch.testing.assert_close(loss, F.cross_entropy(heads.heads[1](x), y - 2))  # local-label CE
    loss.backward()
    assert heads.heads[0].weight.grad is None  # old head untouched, even by weight decay
    heads.eval()
    heads.adaptation(SimpleNamespace(classes_in_this_experience=[4, 5]))  # future classes: masked, no head
    out = heads(x)
    assert out.shape == (5, 6) and len(heads.heads) == 2 and (out[:, 4:] == heads.mask_value).all()
    torch.testing.assert_close(out[:, :4], torch.cat([heads.heads[0](x), heads.heads[1](x)], 1))


def test_continual_classifier_heads_and_errors():
    assert isinstance(tiny_vim(head="incremental").head, IncrementalClassifier)
    model = tiny_vim()
    assert isinstance(model.head, ExperienceHeads) and model.head.in_features == 32
    with pytest.raises(ValueError, match="head"):
        ContinualClassifier(model.backbone, head="multi")
    with pytest.raises(TypeError, match="timm-style"):
        ContinualClassifier(torch.nn.Linear(3, 3))


def _run(strategy_cls, bench, **kwargs):
    torch.manual_seed(0)
    model = tiny_vim()
    strategy = strategy_cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3), train_mb_size=32,
                            train_epochs=4, eval_mb_size=512, evaluator=_evaluator(), **kwargs)
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream[:i + 1])
    return metrics


@pytest.mark.slow
def test_mambacl_forgets_less_than_naive_on_split_digits():
    bench = split_digits(n_train=700)
    naive = _run(Naive, bench)
    mambacl = _run(MambaCL, bench, progress=False)
    assert mambacl[FORGETTING] < 0.5 * naive[FORGETTING]
    assert mambacl[ACCURACY] > 0.15  # better than chance (0.1) over all 10 classes


def _resumable(bench, stop, via, path):
    """Train MambaCL over the stream; with ``stop``, checkpoint after that experience and resume from the file in
    a fresh strategy: ``via='avalanche'`` uses Avalanche's save_checkpoint/maybe_load_checkpoint (whole strategy),
    ``via='state_dict'`` saves only the model and ``NullSpacePlugin.state_dict()``."""
    def build(model=None):
        torch.manual_seed(0)
        model = model or tiny_vim(patch_size=4)
        return MambaCL(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=2e-3), train_mb_size=32,
                       eval_mb_size=512, evaluator=_evaluator(), progress=False)
    strategy = build()
    for i, exp in enumerate(bench.train_stream):
        torch.manual_seed(100 + i)  # same data order in both runs
        strategy.train(exp)
        if i != stop:
            continue
        if via == "avalanche":
            save_checkpoint(strategy, path)
            strategy, next_exp = maybe_load_checkpoint(build(), path)
            assert next_exp == stop + 1
        else:
            torch.save({"model": strategy.model, "nullspace": strategy.nullspace.state_dict()}, path)
            ckpt = torch.load(path, weights_only=False)
            strategy = build(ckpt["model"])
            strategy.nullspace.load_state_dict(ckpt["nullspace"])
        assert strategy.nullspace.experiences == stop + 1 and strategy.nullspace in strategy.plugins
    return strategy, strategy.eval(bench.test_stream)


@pytest.fixture(scope="module")
def resume_bench():
    bench = split_digits(n_train=400)
    full, metrics = _resumable(bench, None, None, None)
    return bench, full, metrics


@pytest.mark.parametrize("via", ["state_dict", "avalanche"])
def test_resume_after_experience_two_matches_uninterrupted(resume_bench, via, tmp_path, monkeypatch):
    # dill (Avalanche's pickler) looks classes up as module attributes, and torch >= 2.5 deletes the attribute
    # torch.optim.optimizer after import: without it no torch optimizer can be checkpointed by Avalanche.
    monkeypatch.setattr(torch.optim, "optimizer", sys.modules["torch.optim.optimizer"], raising=False)
    if via == "avalanche" and "torch._dynamo" in sys.modules and "MAMBACL_FRESH_PROCESS" not in os.environ:
        # Once torch.compile has run in a process, dynamo's optimizer wrappers reference its config module, which
        # dill cannot pickle: Avalanche's whole-strategy checkpoint is checked in a fresh interpreter instead.
        node = f"{__file__}::test_resume_after_experience_two_matches_uninterrupted[avalanche]"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                              env={**os.environ, "MAMBACL_FRESH_PROCESS": "1"}, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        return
    bench, full, full_metrics = resume_bench
    resumed, resumed_metrics = _resumable(bench, 1, via, tmp_path / "ckpt.pt")
    accuracies = [k for k in full_metrics if k.startswith("Top1_Acc")]
    assert len(accuracies) == 6
    for key in accuracies:
        assert resumed_metrics[key] == pytest.approx(full_metrics[key], abs=1e-6), key
    a, b = full.nullspace.state_dict(), resumed.nullspace.state_dict()
    assert a["experiences"] == b["experiences"] == 5
    for key, p in a["engine"]["projectors"].items():
        torch.testing.assert_close(b["engine"]["projectors"][key], p, rtol=1e-6, atol=1e-9)


def test_plugin_state_dict_restores_projection():
    bench = split_digits(n_train=200)
    model = tiny_vim()
    plugin = NullSpacePlugin(progress=False)
    Naive(model=model, optimizer=torch.optim.Adam(model.parameters()), train_mb_size=64, plugins=[plugin],
          evaluator=EvaluationPlugin(loggers=[])).train(bench.train_stream[0])
    assert plugin.experiences == 1 and len(plugin.engine.projectors) == 2 * (2 * 3 + 1)
    fresh = NullSpacePlugin(progress=False)
    fresh.load_state_dict(pickle.loads(pickle.dumps(plugin.state_dict())))
    fresh.configure(model)
    plugin.configure(model)
    assert fresh.experiences == 1 and set(fresh._active) == set(plugin._active) and len(fresh._active) == 2 * 2 * 4 + 2
    for name, (_, proj, _) in plugin._active.items():
        torch.testing.assert_close(fresh._active[name][1], proj, rtol=0, atol=0)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="no SSM branch"):
        NullSpacePlugin().configure(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="trainable entry 'x_proj_q'"):
        NullSpacePlugin(trainable=("x_proj_q",)).configure(tiny_vim())
    with pytest.raises(ValueError, match="exclude entry 'mixr'"):
        NullSpacePlugin(exclude=("mixr",)).configure(tiny_vim())
    with pytest.raises(TypeError, match="trainable"):
        NullSpacePlugin(trainable="head")
    with pytest.raises(ValueError, match="protect"):
        NullSpacePlugin(protect="all")
    with pytest.raises(ValueError, match="wb_features"):
        MambaCL(model=tiny_vim(), optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1),
                wb_features="mean")
    with pytest.raises(ValueError, match="no Linear"):
        NullSpacePlugin(protect="layers").configure(torch.nn.Sequential(torch.nn.ReLU()))


def test_adam_nscl_wrapper_runs_and_keeps_caller_plugins():
    bench = split_digits(n_train=200)
    model, plugins = tiny_vim(), []
    strategy = AdamNSCL(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), train_mb_size=64,
                        plugins=plugins, evaluator=EvaluationPlugin(loggers=[]), progress=False)
    assert plugins == [] and strategy.nullspace in strategy.plugins
    with pytest.warns(UserWarning, match="dt_proj"):
        for exp in bench.train_stream[:2]:
            strategy.train(exp)
    assert strategy.nullspace.engine.selection == "adam_nscl" and strategy.nullspace.experiences == 2
    assert all(k >= 1 for k in strategy.nullspace.engine.null_dims.values())  # lambda_min always qualifies
    frozen = [p for n, p in model.named_parameters() if n.startswith("backbone.") and ("norm" in n or "bias" in n)]
    assert frozen and not any(p.requires_grad for p in frozen)
