"""Bad inputs to the null-space strategy layer (NullSpaceEngine, NullSpacePlugin, MambaCL, AdamNSCL and the
registry's create_strategy): each raises the exact exception type with a message naming the argument; valid edge
cases give the reference result."""
import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from torch import nn
from torch.utils.data import TensorDataset

from mambacl.backbones import VisionMamba
from mambacl.strategies import (AdamNSCL, ContinualClassifier, MambaCL, NonFiniteFeaturesError, NullSpaceEngine,
                                NullSpacePlugin, build_projector, null_space_size)
from mambacl.strategies.registry import TrainSetup, create_strategy


def _vim(**kwargs):
    return VisionMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, num_classes=0, **kwargs)


def _model():
    return ContinualClassifier(_vim())


def _optimizer():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def _engine(**kwargs):
    return lambda: NullSpaceEngine(**kwargs)


def _plugin(**kwargs):
    return lambda: NullSpacePlugin(progress=False, **kwargs)


def _configured(model=_model, **kwargs):
    return lambda: NullSpacePlugin(progress=False, **kwargs).configure(model())


def _added(features, rows=None, key="k"):
    return lambda: NullSpaceEngine().add(key, features, rows)


def _registry(name, **hparams):
    return lambda: create_strategy(name, TrainSetup(backbone=_vim()), **hparams)


CASES = [
    # NullSpaceEngine
    pytest.param(_engine(selection="svd"), ValueError, "selection", id="engine-unknown-selection"),
    pytest.param(_engine(projector="hard"), ValueError, "projector", id="engine-unknown-projector"),
    pytest.param(_engine(eta=1.5), ValueError, r"eta must be in \[0, 1\]", id="engine-eta-above-1"),
    pytest.param(_engine(eta="0.9"), TypeError, "eta must be a real number", id="engine-eta-string"),
    pytest.param(_engine(eta=True), TypeError, "eta must be a real number", id="engine-eta-bool"),
    pytest.param(_engine(eta=math.nan), ValueError, "eta must be in", id="engine-eta-nan"),
    pytest.param(_engine(a=0.5), ValueError, r"^a must be in \[1, inf\)", id="engine-a-below-1"),
    pytest.param(_engine(a=math.nan), ValueError, "^a must be in", id="engine-a-nan"),
    pytest.param(_engine(threshold=0.0), ValueError, r"threshold must be in \(0, 1\]", id="engine-threshold-zero"),
    pytest.param(_engine(tol=-1e-3), ValueError, "tol must be in", id="engine-tol-negative"),
    pytest.param(_engine(tol=None), TypeError, "tol must be a real number", id="engine-tol-none"),
    pytest.param(_engine(auto_min_dim=0), ValueError, "auto_min_dim must be an int >= 1", id="engine-min-dim-zero"),
    pytest.param(_engine(auto_min_dim=64.0), TypeError, "auto_min_dim must be an int", id="engine-min-dim-float"),
    pytest.param(_engine(auto_threshold=1.5), ValueError, "auto_threshold must be in", id="engine-auto-threshold"),
    pytest.param(_added(torch.ones(3)), ValueError, "features for 'k' must have shape", id="engine-1d-features"),
    pytest.param(_added(torch.tensor([[1.0, math.inf]])), NonFiniteFeaturesError, "features for 'k' have 1 NaN/Inf",
                 id="engine-inf-features"),
    pytest.param(_added(torch.ones(2, 3), rows=0), ValueError, "rows must be an int >= 1", id="engine-zero-rows"),
    pytest.param(_added(torch.ones(2, 3), rows=2.0), TypeError, "rows must be an int", id="engine-float-rows"),
    pytest.param(lambda: NullSpaceEngine().add_covariance("k", torch.ones(2, 3), 1), ValueError,
                 "cov for 'k' must be a square", id="engine-non-square-cov"),
    pytest.param(lambda: NullSpaceEngine().add_covariance("k", [[1.0]], 1), TypeError,
                 "cov for 'k' must be a torch.Tensor", id="engine-cov-list"),
    pytest.param(lambda: NullSpaceEngine().merge({"k": torch.eye(2)}, {"j": 1}), ValueError,
                 "rows must have the keys of covariances", id="engine-merge-keys"),
    pytest.param(lambda: NullSpaceEngine().update_projectors(["tap_y"]), ValueError,
                 r"keys \['tap_y'\] have no collected features", id="engine-unknown-key"),
    pytest.param(lambda: null_space_size(torch.ones(4), "auto"), ValueError, "selection must be one of",
                 id="null-space-size-auto"),
    # NullSpacePlugin
    pytest.param(_plugin(protect="all"), ValueError, "protect", id="plugin-unknown-protect"),
    pytest.param(_plugin(wb_features="mean"), ValueError, "wb_features", id="plugin-wb-features"),
    pytest.param(_plugin(trainable="head"), TypeError, "trainable must be a sequence of names",
                 id="plugin-trainable-str"),
    pytest.param(_plugin(trainable=()), ValueError, "trainable must name at least one", id="plugin-trainable-empty"),
    pytest.param(_plugin(trainable=("head", 3)), TypeError, "trainable entries must be non-empty strings",
                 id="plugin-trainable-int-entry"),
    pytest.param(_plugin(exclude="head"), TypeError, "exclude must be a sequence of names", id="plugin-exclude-str"),
    pytest.param(_plugin(collect_mb_size=0), ValueError, "collect_mb_size must be an int >= 1",
                 id="plugin-collect-mb-zero"),
    pytest.param(_plugin(collect_mb_size=2.5), TypeError, "collect_mb_size must be an int",
                 id="plugin-collect-mb-float"),
    pytest.param(_plugin(reduce_fn="sum"), TypeError, "reduce_fn must be callable", id="plugin-reduce-fn-str"),
    pytest.param(_plugin(eta=-0.1), ValueError, "eta must be in", id="plugin-eta-negative"),
    pytest.param(_configured(exclude=("mixr",)), ValueError, "exclude entry 'mixr' matches no name",
                 id="plugin-exclude-names-nothing"),
    pytest.param(_configured(trainable=("x_proj_q",)), ValueError, "trainable entry 'x_proj_q' matches no name",
                 id="plugin-trainable-names-nothing"),
    pytest.param(_configured(model=lambda: nn.Sequential(nn.Linear(4, 4))), ValueError,
                 r"no SSM branch.*protect='ssm'", id="plugin-model-without-ssm-taps"),
    pytest.param(_configured(model=lambda: nn.Sequential(nn.ReLU()), protect="layers"), ValueError,
                 r"no Linear or ungrouped Conv layer.*protect='layers'", id="plugin-layers-without-layers"),
    # wrappers
    pytest.param(lambda: MambaCL(model=_model(), optimizer=_optimizer(), selection="svd"), ValueError, "selection",
                 id="mambacl-unknown-selection"),
    pytest.param(lambda: MambaCL(model=_model(), optimizer=_optimizer(), auto_threshold=0), ValueError,
                 "auto_threshold", id="mambacl-auto-threshold-zero"),
    pytest.param(lambda: MambaCL(model=_model(), optimizer=_optimizer(), trainable="protected"), TypeError,
                 "trainable", id="mambacl-trainable-str"),
    pytest.param(lambda: AdamNSCL(model=_model(), optimizer=_optimizer(), a=0.5), ValueError, "^a must be in",
                 id="adam-nscl-a-below-1"),
    pytest.param(lambda: AdamNSCL(model=_model(), optimizer=_optimizer(), protect="ssm"), TypeError, "protect",
                 id="adam-nscl-protect-is-fixed"),
    # registry
    pytest.param(_registry("mambcl"), ValueError, r"unknown strategy 'mambcl' \(did you mean 'mambacl'\?\)",
                 id="registry-unknown-strategy"),
    pytest.param(_registry("mambacl", etaa=0.9), ValueError, r"no hyper-parameter\(s\) \['etaa'\]",
                 id="registry-unknown-hparam"),
    pytest.param(_registry("mambacl", eta="high"), TypeError, "eta must be a real number", id="registry-eta-string"),
    pytest.param(_registry("mambacl", selection="svd"), ValueError, "selection", id="registry-unknown-selection"),
    pytest.param(_registry("adam-nscl", a=-1.0), ValueError, "^a must be in", id="registry-adam-nscl-a"),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match) as caught:
        call()
    assert type(caught.value) is error


def test_nan_features_in_the_collection_pass_name_experience_and_key():
    x = torch.rand(6, 1, 8, 8)
    x[4] = math.nan  # the second batch of 3 has a NaN image
    data = TensorDataset(x, torch.zeros(6, dtype=torch.long))
    data.targets = [0] * 6
    exp = nc_benchmark(data, data, n_experiences=1, task_labels=False, fixed_class_order=[0]).train_stream[0]
    model = _model()
    model.head.adaptation(exp)
    plugin = NullSpacePlugin(progress=False, collect_mb_size=3)
    with pytest.raises(NonFiniteFeaturesError, match=r"experience 0, collection batch 1: features for "
                                                     r"'backbone.layers.0.mixer.(fwd|bwd).tap_x' have"):
        plugin.collect(SimpleNamespace(model=model, experience=exp, device="cpu"))
    assert plugin.engine.covariances == {} and plugin.null_space_history == []


@pytest.mark.parametrize("eta, expected", [(0.0, "identity"), (1.0, "normalised")], ids=["eta-0", "eta-1"])
def test_eta_at_its_bounds_gives_the_closed_form(eta, expected):
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    basis = q[:, :2]
    eye = torch.eye(5, dtype=torch.float64)
    reference = eye if expected == "identity" else basis @ basis.T / math.sqrt(2)
    torch.testing.assert_close(build_projector(basis, "soft", eta), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim, rule", [(127, "energy"), (128, "knee")], ids=["below-min-dim", "at-min-dim"])
def test_auto_width_boundary(dim, rule):
    eng = NullSpaceEngine()
    eng.add("k", torch.randn(400, dim, dtype=torch.float64))
    eng.update_projectors()
    assert (eng.selected["k"]["rule"], eng.selected["k"]["dim"]) == (rule, dim)
    assert eng.selected["k"]["projector"] == ("strict" if rule == "energy" else "soft")


def test_energy_threshold_one_keeps_everything_and_zero_features_are_all_null():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert null_space_size(lam, "energy", threshold=1.0) == 0  # every direction is needed for 100% energy
    assert null_space_size(torch.zeros(4, dtype=torch.float64), "energy") == 4
    assert null_space_size(lam, "adam_nscl", a=1.0) == 1  # only lambda_min itself
    eng = NullSpaceEngine(selection="kernel", projector="strict")
    eng.add("k", torch.zeros(3, 4))  # finite, zero features: everything is null, P = I
    torch.testing.assert_close(eng.update_projectors()["k"], torch.eye(4, dtype=torch.float64))
    eng = NullSpaceEngine()
    eng.add("k", torch.zeros(0, 4))  # an empty batch adds nothing
    assert eng.covariances == {}
