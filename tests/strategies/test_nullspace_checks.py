"""NullSpacePlugin's records and checks: null-space history, set-up warnings, NaN features and the eigh fallback
on a CNN (Adam-NSCL), each against the case that should trigger it and the documented set-up that should not."""
import pickle
import warnings
from types import SimpleNamespace

import pytest
import timm
import torch
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits, tiny_vim
from torch import nn

from mambacl.backbones import VisionMamba
from mambacl.strategies import (AdamNSCL, ContinualClassifier, MambaCL, NonFiniteFeaturesError, NullSpacePlugin,
                                NullSpaceWarning)
from mambacl.strategies.nullspace import null_space_size


@pytest.fixture(scope="module")
def bench():
    return split_digits(n_train=200)


def _adapted(model, exp):
    """Let a ContinualClassifier's head cover ``exp`` (what Avalanche's model adaptation does in training)."""
    model.train()
    model.head.adaptation(exp)
    return model


def _finish_experience(plugin, model, exp):
    """What the plugin does after training ``exp``: collect its features, rebuild the projectors, count it."""
    plugin.after_training_exp(SimpleNamespace(model=model, experience=exp, device="cpu"))


def _pretrained(model):
    model.backbone.pretrained_source = "vim.pt"  # what mambacl's checkpoint loaders set
    return model


def _our_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, NullSpaceWarning)]


def test_null_space_history_records_every_experience_and_survives_state_dict(bench):
    model = _pretrained(tiny_vim())  # d_inner = 64 < 128: 'auto' uses energy 0.99 and the strict projector
    plugin = NullSpacePlugin(progress=False, collect_mb_size=64)
    traces = []
    for exp in bench.train_stream[:2]:
        _finish_experience(plugin, _adapted(model, exp), exp)
        traces.append({k: round(float(p.trace())) for k, p in plugin.engine.projectors.items()})
    history = plugin.null_space_history
    assert len(history) == 2 == plugin.experiences and len(history[0]) == 2 * (2 * 3 + 1)
    for entry, trace in zip(history, traces):
        assert set(entry) == set(plugin.engine.covariances)
        for key, info in entry.items():
            assert info["dim"] == 64 and info["rule"] == "energy" and info["projector"] == "strict"
            assert info["solver"] in ("eigh", "svd") or info["solver"].startswith("eigh+jitter")
            assert info["null"] == trace[key]  # a strict projector's trace is the size of its null space
    eigvals = torch.linalg.eigvalsh(plugin.engine.covariances[key]).flip(0)
    assert history[-1][key]["null"] == null_space_size(eigvals, "energy", threshold=0.99)

    fresh = NullSpacePlugin(progress=False)
    fresh.load_state_dict(pickle.loads(pickle.dumps(plugin.state_dict())))
    assert fresh.null_space_history == history and fresh.null_space_history is not history
    legacy = {k: v for k, v in plugin.state_dict().items() if k != "null_space_history"}
    with pytest.warns(NullSpaceWarning, match="no null_space_history: the sizes of experiences 0-1"):
        fresh.load_state_dict(legacy)
    assert fresh.null_space_history == []


def test_degenerate_knee_selection_warns_once_per_experience_and_auto_does_not(bench):
    model = _pretrained(tiny_vim())
    knee = NullSpacePlugin(selection="knee", progress=False, collect_mb_size=64)
    with pytest.warns(NullSpaceWarning) as caught:
        for exp in bench.train_stream[:2]:
            _finish_experience(knee, _adapted(model, exp), exp)
    degenerate = [m for m in _our_warnings(caught) if m.startswith("degenerate")]
    assert [m.split(":")[0] for m in degenerate] == [f"degenerate null space after experience {i}" for i in (0, 1)]
    assert "14 x 63 of 64 (knee)" in degenerate[0] and "selection='auto'" in degenerate[0]
    assert all(info["null"] == 63 for info in knee.null_space_history[0].values())

    auto = NullSpacePlugin(progress=False, collect_mb_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in bench.train_stream[:2]:
            _finish_experience(auto, _adapted(model, exp), exp)
    assert _our_warnings(caught) == []
    assert max(info["null"] for info in auto.null_space_history[0].values()) < 64


def _timm_vim():
    """A Vision Mamba as timm builds it, with its single 10-class ``head`` Linear."""
    return VisionMamba(img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32, num_classes=10)


class _PrototypeLike(nn.Module):
    """Stands for a prototype head: only the duck-typed contract matters."""

    calibrated_across_experiences = True

    def __init__(self, width):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(width, 2)])


def _classifier_with(head):
    model = _pretrained(tiny_vim(head="incremental" if head == "incremental" else "experience"))
    if head == "prototype-like":
        model.head = _PrototypeLike(32)
    return model


@pytest.mark.parametrize("build, names", [
    (lambda: _timm_vim(), "head.weight, head.bias"),
    (lambda: _classifier_with("incremental"), "head.classifier.weight, head.classifier.bias"),
], ids=["timm-model-as-is", "incremental-classifier"])
def test_unprotected_trainable_classifier_warns(build, names):
    model = build()
    model.pretrained_source = "vim.pt"
    plugin = NullSpacePlugin(progress=False)
    with pytest.warns(NullSpaceWarning, match=f"^{names} train but are excluded from the null-space projection "
                                              r"\(exclude=\('head',\)\)"):
        plugin.configure(model)
    with warnings.catch_warnings(record=True) as caught:  # once per plugin, not at every experience
        warnings.simplefilter("always")
        plugin.configure(model)
    assert caught == []


@pytest.mark.parametrize("head, trainable", [("experience", "paper"), ("prototype-like", "paper"),
                                             ("incremental", "no-head")],
                         ids=["experience-heads", "calibrated-contract", "frozen-head"])
def test_calibrated_or_frozen_heads_do_not_warn(head, trainable):
    model = _classifier_with(head)
    if head == "experience":
        model.head.adaptation(SimpleNamespace(classes_in_this_experience=[0, 1]))
    kinds = ("x_proj_dt", "x_proj_B", "x_proj_C", "A_log", "out_proj") + (("head",) if trainable == "paper" else ())
    plugin = NullSpacePlugin(progress=False, trainable=kinds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin.configure(model)
    assert caught == []
    head_params = [p for n, p in model.named_parameters() if n.startswith("head.")]
    assert head_params and all(p.requires_grad == (trainable == "paper") for p in head_params)


def test_frozen_random_backbone_warns_unless_loaded_or_all_trainable():
    plugin = NullSpacePlugin(progress=False)
    model = tiny_vim()
    with pytest.warns(NullSpaceWarning, match=r"^trainable=\('x_proj_dt', .*\) freezes \d+ of \d+ parameter values "
                                              r"\(\d+%\) of a model that was never loaded from a checkpoint") as caught:
        plugin.configure(model)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert f"freezes {frozen} of {sum(p.numel() for p in model.parameters())}" in str(caught[0].message)
    assert "pretrained_source" in str(caught[0].message) and "trainable=None" in str(caught[0].message)
    for silenced in (NullSpacePlugin(progress=False, trainable=None), NullSpacePlugin(progress=False)):
        model = tiny_vim()
        if silenced.trainable is not None:
            model.backbone.layers[0].pretrained_source = "vim.pt"  # any submodule counts
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silenced.configure(model)
        assert caught == []


def test_documented_set_up_trains_without_warnings_and_a_timm_model_as_is_warns(bench):
    def train(model):
        strategy = MambaCL(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3), train_mb_size=64,
                           eval_mb_size=64, evaluator=EvaluationPlugin(loggers=[]), progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for exp in bench.train_stream[:2]:
                strategy.train(exp)
        return _our_warnings(caught)

    torch.manual_seed(0)
    assert train(_pretrained(tiny_vim())) == []
    raw = _timm_vim()
    raw.pretrained_source = "vim.pt"
    messages = train(raw)
    assert len(messages) == 1 and messages[0].startswith("head.weight, head.bias train but are excluded")


def test_changed_projector_width_warns_and_leaves_the_parameter_unprojected(bench):
    model = _pretrained(tiny_vim())
    plugin = NullSpacePlugin(progress=False, collect_mb_size=64)
    _finish_experience(plugin, _adapted(model, bench.train_stream[0]), bench.train_stream[0])
    key = "backbone.layers.0.mixer.tap_out"
    plugin.engine.projectors[key] = torch.eye(3, dtype=torch.float64)
    with pytest.warns(NullSpaceWarning, match=r"backbone.layers.0.mixer.out_proj.weight changed shape .*"
                                              r"\(width 64, projector 3\)"):
        plugin.configure(model)
    assert "backbone.layers.0.mixer.out_proj.weight" not in plugin._active and len(plugin._active) == 2 * 2 * 4 + 1


def test_nan_features_raise_naming_experience_and_key_and_add_nothing(bench):
    model = _pretrained(tiny_vim())
    plugin = NullSpacePlugin(progress=False, collect_mb_size=16)
    _finish_experience(plugin, _adapted(model, bench.train_stream[0]), bench.train_stream[0])
    before = {k: v.clone() for k, v in plugin.engine.covariances.items()}
    rows, projectors = dict(plugin.engine.rows), {k: v.clone() for k, v in plugin.engine.projectors.items()}
    tap = model.backbone.layers[1].mixer.fwd.tap_x
    calls = []

    def poison(module, args, out):  # runs before the plugin's hooks: the second collection batch diverges
        calls.append(1)
        if len(calls) == 2:
            return out.index_fill(0, torch.tensor([0]), float("nan"))
    handle = tap.register_forward_hook(poison)
    exp = bench.train_stream[1]
    with pytest.raises(NonFiniteFeaturesError, match=r"experience 1, collection batch 1: features for "
                                                     r"'backbone.layers.1.mixer.fwd.tap_x' have \d+ NaN/Inf"):
        _finish_experience(plugin, _adapted(model, exp), exp)
    handle.remove()
    assert plugin.experiences == 1 and len(plugin.null_space_history) == 1 and plugin.engine.rows == rows
    for key, cov in before.items():  # no partial sums, not even of the first, finite batch
        assert torch.equal(plugin.engine.covariances[key], cov) and torch.equal(plugin.engine.projectors[key],
                                                                                 projectors[key])
    assert not any(m._forward_hooks for m in model.modules())  # the plugin's hooks are removed


def _tiny_resnet18():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0, in_chans=1, channels=(8, 16, 32, 64), stem_width=8,
                                 zero_init_last=False)  # frozen zero-init BN gammas would block every residual branch
    backbone.pretrained_source = "resnet18.pt"  # the warning about a random frozen part is not under test here
    return ContinualClassifier(backbone)


def test_adam_nscl_on_a_small_cnn_keeps_every_conv_in_its_null_space():
    """Adam-NSCL on a narrow timm resnet18 over two split-digits experiences. On 8x8 inputs the deep layers see
    1x1 maps, so 8 of 9 im2col columns are exactly zero, plus dead ReLU channels: on this machine float64 eigh
    fails to converge on layer4.1.conv2's covariance (576 dimensions, rank ~40) after experience 1, which
    crashed the run before the fallback (here it is retried with a 1e-12 jitter)."""
    bench = split_digits(n_train=300)
    model = _tiny_resnet18()
    strategy = AdamNSCL(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), train_mb_size=32,
                        eval_mb_size=64, evaluator=EvaluationPlugin(loggers=[]), progress=False)
    plugin = strategy.nullspace
    strategy.train(bench.train_stream[0])
    old = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    covariances = {k: v.clone() for k, v in plugin.engine.covariances.items()}
    strategy.train(bench.train_stream[1])
    assert len(plugin.null_space_history) == 2 and all(len(h) == 21 for h in plugin.null_space_history)
    moved = 0
    for name, (key, _) in plugin.plan(model).params.items():
        step = (model.get_parameter(name).detach().double() - old[name]).reshape(old[name].shape[0], -1)
        moved += int(step.any())
        eigvals = torch.linalg.eigvalsh(covariances[key])
        lam_min, lam_max = max(float(eigvals[0]), 0.0), float(eigvals[-1])
        # old features see the step only through eigen-directions with lambda <= a * lambda_min (fp32 rounding aside)
        seen = torch.trace(step @ covariances[key] @ step.T) / (lam_max * step.square().sum().clamp_min(1e-30))
        assert seen.sqrt() <= (plugin.engine.a * lam_min / lam_max) ** 0.5 + 1e-4, name
    assert moved == 21
