"""Strategy registry: built-ins, hyper-parameter passing and validation, extension by decorator and entry point."""
from types import SimpleNamespace

import pytest
import torch
from avalanche.training import JointTraining, Naive
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.templates import SupervisedTemplate

import mambacl.strategies.registry as registry
from mambacl.backbones import VisionMamba
from mambacl.strategies import AdamNSCL, ExperienceHeads, MambaCL
from mambacl.strategies.registry import (TrainSetup, create_strategy, get_strategy, list_strategies,
                                         register_strategy, strategy_hparams)


def _setup(**kwargs) -> TrainSetup:
    backbone = VisionMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, num_classes=0)
    return TrainSetup(backbone=backbone, **kwargs)


def test_builtins_build_their_templates_with_the_given_hyperparameters():
    assert {"mambacl", "adam-nscl", "naive", "ewc", "lwf", "replay", "joint", "simplecil", "ranpac"} \
        <= set(list_strategies())
    setup = _setup(lr=0.01, weight_decay=0.1, epochs=3, train_mb_size=7, eval_mb_size=9)
    strategy = create_strategy("mambacl", setup, eta=0.5, projector="strict")
    assert isinstance(strategy, MambaCL) and isinstance(strategy.model.head, ExperienceHeads)
    assert strategy.nullspace.engine.projector == "strict" and strategy.nullspace.engine.eta == 0.5
    assert (strategy.train_epochs, strategy.train_mb_size, strategy.eval_mb_size) == (3, 7, 9)
    groups = [(g["name"], g["lr"], g["weight_decay"]) for g in strategy.optimizer.param_groups]
    assert type(strategy.optimizer) is torch.optim.Adam and groups == [("backbone", 0.01, 0.1), ("head", 0.5, 0.1)]
    naive = create_strategy("naive", _setup(lr=0.01, weight_decay=0.1)).optimizer  # the baselines keep AdamW
    assert isinstance(naive, torch.optim.AdamW) and len(naive.param_groups) == 1
    assert (naive.param_groups[0]["lr"], naive.param_groups[0]["weight_decay"]) == (0.01, 0.1)
    assert isinstance(create_strategy("adam-nscl", _setup(), a=5.0), AdamNSCL)
    ewc = create_strategy("ewc", _setup(), ewc_lambda=7.0)
    assert [p.ewc_lambda for p in ewc.plugins if isinstance(p, EWCPlugin)] == [7.0]
    lwf = create_strategy("lwf", _setup(), alpha=0.3, temperature=4.0)
    assert [(p.lwf.alpha, p.lwf.temperature) for p in lwf.plugins if isinstance(p, LwFPlugin)] == [(0.3, 4.0)]
    replay = create_strategy("replay", _setup(), mem_size=11)
    assert [p.mem_size for p in replay.plugins if isinstance(p, ReplayPlugin)] == [11]
    assert isinstance(create_strategy("naive", _setup()), Naive)
    assert create_strategy("ranpac", _setup(), num_projections=64, seed=3).model.head.projection.shape == (16, 64)
    assert create_strategy("simplecil", _setup(), scale=2.0).model.head.scale == 2.0
    assert isinstance(create_strategy("joint", _setup()), JointTraining) and get_strategy("joint").joint
    assert list(strategy_hparams("replay")) == ["mem_size"] and strategy_hparams("replay")["mem_size"].annotation


def test_unknown_names_and_hyperparameters_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown strategy 'mambcl' \\(did you mean 'mambacl'\\?\\).*naive"):
        get_strategy("mambcl")
    with pytest.raises(ValueError, match="no hyper-parameter.*'lamda'.*ewc_lambda"):
        create_strategy("ewc", _setup(), lamda=1.0)
    with pytest.raises(TypeError, match="TrainSetup as its first positional"):
        register_strategy("bad")(lambda *, setup: None)


def test_register_strategy_from_a_test_module_is_usable_by_name():
    @register_strategy("test-sgd-naive")
    def sgd_naive(setup: TrainSetup, *, momentum: float = 0.0) -> SupervisedTemplate:
        """Naive with SGD (registered by a test)."""
        model = setup.classifier("incremental")
        return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), setup.lr, momentum=momentum),
                     **setup.template_kwargs())
    try:
        strategy = create_strategy("test-sgd-naive", _setup(lr=0.5), momentum=0.9)
        assert strategy.optimizer.param_groups[0]["momentum"] == 0.9 and strategy.optimizer.param_groups[0]["lr"] == 0.5
        assert get_strategy("test-sgd-naive").summary == "Naive with SGD (registered by a test)."
    finally:
        registry._REGISTRY.pop("test-sgd-naive")


def test_entry_point_group_registers_third_party_factories(monkeypatch):
    def third_party(setup: TrainSetup) -> SupervisedTemplate:
        """A third-party strategy."""
        model = setup.classifier("incremental")
        return Naive(model=model, optimizer=setup.optimizer(model), **setup.template_kwargs())
    seen_groups = []

    def fake_entry_points(group):
        seen_groups.append(group)
        return [SimpleNamespace(name="third-party", load=lambda: third_party)]
    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "third-party" in list_strategies() and seen_groups == ["mambacl.strategies"]
        assert get_strategy("third-party").factory is third_party
        assert isinstance(create_strategy("third-party", _setup()), Naive)
    finally:
        registry._REGISTRY.pop("third-party", None)
