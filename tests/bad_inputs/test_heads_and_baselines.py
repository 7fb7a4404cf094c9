"""Bad input to the heads, optimizers, fitted-head plugin, frozen-backbone baselines and metrics: the exact exception
type with a message naming the argument, plus valid edge cases that give the reference result."""
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset

from mambacl.strategies import (ContinualClassifier, HeadLRPlugin, PretrainedCIL, PrototypeHead, PrototypePlugin,
                                RanPACHead, feature_ncm_accuracy_metrics, make_optimizer)
from mambacl.strategies.heads import ridge_split
from mambacl.strategies.nullspace import NonFiniteFeaturesError
from mambacl.strategies.metrics import FeatureNCM, WithinTaskAccuracy
from mambacl.strategies.registry import TrainSetup, create_strategy


class TinyBackbone(nn.Module):
    """A timm-style feature extractor: [b, 6] -> [b, 4]."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x


def _bench():
    x, y = torch.randn(40, 6), torch.arange(40) % 4
    data = TensorDataset(x, y)
    data.targets = y.tolist()
    return nc_benchmark(data, data, n_experiences=2, task_labels=False, fixed_class_order=[0, 1, 2, 3])


def _quiet():
    return EvaluationPlugin(loggers=[])


BAD_CONSTRUCTION = [
    ("head-name", lambda: ContinualClassifier(TinyBackbone(), head="protoype"), ValueError, "head"),
    ("head-kwarg", lambda: ContinualClassifier(TinyBackbone(), head="prototype", num_projections=8), TypeError,
     "num_projections"),
    ("head-lr-scale-zero", lambda: make_optimizer(nn.Linear(2, 2), "adam", 1e-3, head_lr_scale=0.0), ValueError,
     "head_lr_scale"),
    ("head-lr-scale-nan", lambda: make_optimizer(nn.Linear(2, 2), "adam", 1e-3, head_lr_scale=float("nan")),
     ValueError, "head_lr_scale"),
    ("head-lr-scale-str", lambda: make_optimizer(nn.Linear(2, 2), "adam", 1e-3, head_lr_scale="50"), ValueError,
     "head_lr_scale"),
    ("optimizer-kind", lambda: make_optimizer(nn.Linear(2, 2), "sgd", 1e-3), ValueError, "kind"),
    ("weight-decay", lambda: make_optimizer(nn.Linear(2, 2), "adam", 1e-3, weight_decay=-1.0), ValueError,
     "weight_decay"),
    ("registry-head-lr-scale", lambda: create_strategy("mambacl", TrainSetup(backbone=TinyBackbone()),
                                                       head_lr_scale=-2.0), ValueError, "head_lr_scale"),
    ("ranpac-m-zero", lambda: RanPACHead(4, num_projections=0), ValueError, "num_projections"),
    ("ranpac-m-float", lambda: RanPACHead(4, num_projections=100.5), ValueError, "num_projections"),
    ("ranpac-grid-empty", lambda: RanPACHead(4, num_projections=8, ridge_grid=[]), ValueError, "ridge_grid"),
    ("ranpac-grid-zero", lambda: RanPACHead(4, num_projections=8, ridge_grid=[0.0, 1.0]), ValueError, "ridge_grid"),
    ("ranpac-grid-negative", lambda: RanPACHead(4, num_projections=8, ridge_grid=[-1.0]), ValueError, "ridge_grid"),
    ("ranpac-grid-scalar", lambda: RanPACHead(4, num_projections=8, ridge_grid=1.0), ValueError, "ridge_grid"),
    ("ranpac-val-fraction", lambda: RanPACHead(4, num_projections=8, val_fraction=1.0), ValueError, "val_fraction"),
    ("registry-ranpac-m", lambda: create_strategy("ranpac", TrainSetup(backbone=TinyBackbone()), num_projections=-5),
     ValueError, "num_projections"),
    ("prototype-scale", lambda: PrototypeHead(4, scale=0.0), ValueError, "scale"),
    ("in-features", lambda: PrototypeHead(0), ValueError, "in_features"),
    ("plugin-mb-size", lambda: PrototypePlugin(mb_size=0), ValueError, "mb_size"),
    ("head-lr-plugin-head", lambda: HeadLRPlugin(head=""), ValueError, "head"),
    ("pretrained-no-fitted-head", lambda: PretrainedCIL(model=ContinualClassifier(TinyBackbone(), head="experience")),
     ValueError, "model"),
    ("pretrained-epochs", lambda: PretrainedCIL(model=ContinualClassifier(TinyBackbone(), head="prototype"),
                                                train_epochs=3), TypeError, "train_epochs"),
    ("metric-level", lambda: WithinTaskAccuracy("epoch"), ValueError, "level"),
    ("ncm-feature-module", lambda: FeatureNCM(feature_module=""), ValueError, "feature_module"),
]


@pytest.mark.parametrize("build,error,arg", [c[1:] for c in BAD_CONSTRUCTION], ids=[c[0] for c in BAD_CONSTRUCTION])
def test_bad_construction_names_the_argument(build, error, arg):
    with pytest.raises(error, match=arg):
        build()


def _adapted(head, *classes):
    head.train()
    avalanche_model_adaptation(head, SimpleNamespace(classes_in_this_experience=list(classes)))
    return head


@pytest.mark.parametrize("features,labels,arg", [
    (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), "features"),
    (torch.randn(5, 4), torch.zeros(4, dtype=torch.long), "labels"),
    (torch.randn(2, 4), torch.tensor([0, 7]), "labels"),
], ids=["feature-width", "label-count", "unadapted-class"])
def test_fit_experience_rejects_mismatched_statistics(features, labels, arg):
    with pytest.raises(ValueError, match=arg):
        _adapted(PrototypeHead(4), 0, 1).fit_experience(features, labels)


@pytest.mark.parametrize("head", [lambda: PrototypeHead(4), lambda: RanPACHead(4, num_projections=8)],
                         ids=["prototype", "ranpac"])
def test_non_finite_features_are_refused_and_change_nothing(head):
    head = _adapted(head(), 0, 1)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    features = torch.randn(6, 4)
    features[2, 1] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="NaN/inf"):
        head.fit_experience(features, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())


def test_ranpac_with_too_few_samples_to_choose_lambda_names_the_split():
    head = _adapted(RanPACHead(4, num_projections=8), 0)
    gram = head.gram.clone()
    with pytest.raises(ValueError, match="val_fraction"):
        head.fit_experience(torch.randn(1, 4), torch.tensor([0]))  # int(1 * 0.8) = 0 samples to fit
    assert torch.equal(head.gram, gram) and int(head.fits) == 0  # a refused fit leaves the statistics alone
    fit, val = ridge_split(2, 0.4, torch.Generator().manual_seed(0))  # valid edge: int(2 * 0.6) = 1 fits, 1 validates
    assert sorted(fit.tolist() + val.tolist()) == [0, 1] and len(fit) == len(val) == 1


def test_prototype_head_evaluated_before_its_means_tells_to_add_the_plugin():
    bench = _bench()
    model = ContinualClassifier(TinyBackbone(), head="prototype")
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=8,
                     evaluator=_quiet())
    strategy.train(bench.train_stream[0])
    with pytest.raises(RuntimeError, match="PrototypePlugin"):
        strategy.eval(bench.test_stream[:1])


def test_prototype_plugin_on_a_model_without_fitted_head_names_the_heads():
    bench = _bench()
    model = ContinualClassifier(TinyBackbone(), head="incremental")
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=8,
                     plugins=[PrototypePlugin()], evaluator=_quiet())
    with pytest.raises(ValueError, match="PrototypeHead or RanPACHead"):
        strategy.train(bench.train_stream[0])


def test_untrainable_head_in_training_mode_names_train_epochs():
    head = _adapted(PrototypeHead(4, train_heads=False), 0, 1)
    with pytest.raises(RuntimeError, match="train_epochs"):
        head(torch.randn(2, 4))


def test_feature_ncm_with_a_missing_module_names_feature_module():
    bench = _bench()
    model = ContinualClassifier(TinyBackbone(), head="prototype", train_heads=False)
    strategy = PretrainedCIL(model=model, evaluator=EvaluationPlugin(
        *feature_ncm_accuracy_metrics(feature_module="classifier"), loggers=[]))
    strategy.train(bench.train_stream[0])
    with pytest.raises(ValueError, match="feature_module 'classifier'"):
        strategy.eval(bench.test_stream[:1])


def test_valid_edge_unit_head_lr_scale_is_a_single_group_and_future_classes_are_masked():
    model = ContinualClassifier(TinyBackbone(), head="incremental")
    assert len(make_optimizer(model, "adam", 1e-3, head_lr_scale=1).param_groups) == 1
    head = _adapted(PrototypeHead(4), 0, 1)
    head.fit_experience(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    head.eval()
    avalanche_model_adaptation(head, SimpleNamespace(classes_in_this_experience=[2, 3]))  # never trained
    out = head(torch.randn(3, 4))
    assert out.shape == (3, 4) and (out[:, 2:] == head.mask_value).all()
