"""PrototypeHead and RanPACHead against closed forms (float64 hand means, numpy ridge solves), PrototypePlugin in a
plain Avalanche template, and the frozen-backbone baselines (SimpleCIL, RanPAC) end to end."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training import JointTraining, Naive
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits, tiny_vim
from torch.utils.data import DataLoader

from mambacl.backbones import VisionMamba
from mambacl.strategies import (ExperienceHeads, PretrainedCIL, PrototypeHead, PrototypePlugin, RanPACHead,
                                feature_ncm_accuracy_metrics)
from mambacl.strategies.heads import ridge_split
from mambacl.strategies.registry import TrainSetup, create_strategy

STREAM = "eval_phase/test_stream/Task000"


@torch.no_grad()
def hand_features(model, dataset):
    """Pre-logits features (eval mode, eval transform) of ``dataset`` as float64, and its labels."""
    model.eval()
    feats, labels = [], []
    for x, y, *_ in DataLoader(dataset.eval(), batch_size=512):
        feats.append(model.features(x).double())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _experience(*classes):
    return SimpleNamespace(classes_in_this_experience=list(classes))


def test_prototype_head_in_naive_equals_hand_class_means_and_ncm():
    bench = split_digits(n_train=240)
    model = tiny_vim(head="prototype")
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), train_mb_size=32,
                     eval_mb_size=64, plugins=[PrototypePlugin()], evaluator=EvaluationPlugin(loggers=[]))
    hand_means = {}
    for exp in bench.train_stream[:2]:
        before = [p.detach().clone() for p in model.backbone.parameters()]
        strategy.train(exp)
        assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters()))  # backbone trains
        feats, labels = hand_features(model, exp.dataset)  # the updated model, after this experience
        hand_means.update({int(c): feats[labels == c].mean(0) for c in labels.unique()})
    head = model.head
    assert head.fitted.tolist() == [True] * 4 and len(head.linear.heads) == 2
    # float64 sums of float32 features, whose last bits depend on the batch size
    torch.testing.assert_close(head.means, torch.stack([hand_means[c] for c in range(4)]), rtol=1e-6, atol=1e-7)
    x = torch.cat([e.dataset.eval()[i][0].unsqueeze(0) for e in bench.test_stream[:2] for i in range(len(e.dataset))])
    feats = model.features(x).double()
    hand_means_t = torch.stack([hand_means[c] for c in range(4)])
    hand_cos = F.normalize(feats, dim=1) @ F.normalize(hand_means_t, dim=1).T
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits.double(), hand_cos, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), hand_cos.argmax(1))


def test_joint_training_fits_every_experience_and_feature_ncm_records_them():
    bench = split_digits(n_train=160)
    model = tiny_vim(head="prototype")
    metrics = feature_ncm_accuracy_metrics()
    strategy = JointTraining(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                             criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32,
                             plugins=[PrototypePlugin()], evaluator=EvaluationPlugin(*metrics, loggers=[]))
    strategy.train(bench.train_stream[:2])
    assert metrics[0].ncm.recorded == [0, 1] and model.head.fitted.tolist() == [True] * 4
    feats, labels = zip(*[hand_features(model, e.dataset) for e in bench.train_stream[:2]])
    feats, labels = torch.cat(feats), torch.cat(labels)
    hand = torch.stack([feats[labels == c].mean(0) for c in range(4)])
    torch.testing.assert_close(model.head.means, hand, rtol=1e-6, atol=1e-7)


def test_prototype_head_trains_with_experience_heads_and_masks_pending_classes():
    head = PrototypeHead(6, scale=4.0)
    head.train()
    avalanche_model_adaptation(head, _experience(1, 0))
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 1, 0, 1])
    reference = ExperienceHeads(6)
    reference.train()
    reference.adaptation(_experience(1, 0))
    reference.load_state_dict(head.linear.state_dict())
    torch.testing.assert_close(head(x), reference(x))  # training mode: the per-experience linear head
    head.fitter_attached = True
    head.eval()
    assert (head(x) == head.mask_value).all()  # trained, not yet fitted, plugin attached: masked
    head.fit_experience(x, y)
    head.train()
    avalanche_model_adaptation(head, _experience(2, 3))
    head.eval()
    avalanche_model_adaptation(head, _experience(4, 5))  # a future experience seen in evaluation only
    out = head(x)
    assert out.shape == (5, 6) and (out[:, 2:] == head.mask_value).all()
    means = torch.stack([x[y == c].double().mean(0) for c in (0, 1)])
    torch.testing.assert_close(out[:, :2], 4.0 * F.normalize(x, dim=1) @ F.normalize(means, dim=1).T.float())


def test_fitted_head_state_dict_resizes_on_load():
    head = PrototypeHead(3)
    head.train()
    avalanche_model_adaptation(head, _experience(0, 1))
    head.fit_experience(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    head.eval()
    avalanche_model_adaptation(head, _experience(2, 3, 4))  # evaluation on future classes grew the buffers to 5 classes
    fresh = PrototypeHead(3)
    fresh.train()
    avalanche_model_adaptation(fresh, _experience(0, 1))  # a restored run adapts to the finished experiences only
    fresh.load_state_dict(head.state_dict())
    fresh.eval()
    x = torch.randn(2, 3)
    assert fresh.num_classes == 5
    torch.testing.assert_close(fresh(x), head(x), rtol=0, atol=0)


def _ranpac_reference(h, y, grid, fit, val):
    """numpy float64: the lambda with the least validation MSE, each from its own solve (RanPAC.py)."""
    hf, yf, hv, yv = h[fit], y[fit], h[val], y[val]
    losses = [np.mean((hv @ np.linalg.solve(hf.T @ hf + lam * np.eye(h.shape[1]), hf.T @ yf) - yv) ** 2)
              for lam in grid]
    return grid[int(np.argmin(losses))]


def _fit_ranpac(head, features, labels):
    head.train()
    avalanche_model_adaptation(head, _experience(*sorted(set(labels.tolist()))))
    head.fit_experience(features, labels)


def test_ranpac_head_equals_numpy_ridge_closed_form_and_accumulates():
    gen = torch.Generator().manual_seed(1)
    d, m, seed, grid = 5, 12, 3, (1e-3, 1e-1, 1.0, 10.0, 100.0)
    head = RanPACHead(d, num_projections=m, ridge_grid=grid, seed=seed)
    torch.testing.assert_close(head.projection, torch.randn(d, m, generator=torch.Generator().manual_seed(seed)))
    w_rand = head.projection.double().numpy()
    parts = [(torch.randn(20, d, generator=gen) + 1.0, torch.arange(20) % 2),
             (torch.randn(15, d, generator=gen) - 0.5, 2 + torch.arange(15) % 3)]
    h_all, y_all = [], []
    for k, (feats, labels) in enumerate(parts):
        _fit_ranpac(head, feats, labels)
        h = np.maximum(feats.double().numpy() @ w_rand, 0)
        y = np.eye(head.num_classes)[labels.numpy()]
        fit, val = ridge_split(len(h), 0.2, torch.Generator().manual_seed(seed + k))  # the documented split
        assert (len(fit), len(val)) == (int(len(h) * 0.8), len(h) - int(len(h) * 0.8))
        lam = _ranpac_reference(h, y, grid, fit.numpy(), val.numpy())
        assert float(head.ridge) == lam
        h_all.append(h)
        y_all.append(y)
    h = np.concatenate(h_all)
    y = np.concatenate([np.pad(t, ((0, 0), (0, head.num_classes - t.shape[1]))) for t in y_all])
    np.testing.assert_allclose(head.gram.numpy(), h.T @ h, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(head.cross.numpy(), h.T @ y, rtol=1e-12, atol=1e-10)
    one_shot = np.linalg.solve(h.T @ h + float(head.ridge) * np.eye(m), h.T @ y)  # all data at once
    np.testing.assert_allclose(head.weight.double().numpy(), one_shot, rtol=1e-5, atol=1e-6)
    head.eval()
    x = torch.randn(4, d, generator=gen)
    expected = np.maximum(x.double().numpy() @ w_rand, 0) @ one_shot
    np.testing.assert_allclose(head(x).double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ranpac_single_lambda_needs_no_validation_split():
    head = RanPACHead(3, num_projections=4, ridge_grid=[0.5], seed=0)
    feats, labels = torch.randn(1, 3), torch.tensor([0])
    _fit_ranpac(head, feats, labels)  # one sample: nothing to split, the given lambda is used
    h = np.maximum(feats.double().numpy() @ head.projection.double().numpy(), 0)
    np.testing.assert_allclose(head.weight.double().numpy(), np.linalg.solve(h.T @ h + 0.5 * np.eye(4), h.T),
                               rtol=1e-5, atol=1e-7)


def _setup(**kwargs):
    torch.manual_seed(0)
    backbone = VisionMamba(img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32, num_classes=0)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), *feature_ncm_accuracy_metrics(),
                                 loggers=[])
    return TrainSetup(backbone=backbone, train_mb_size=32, eval_mb_size=128, evaluator=evaluator, epochs=3, **kwargs)


@pytest.mark.parametrize("name,hparams,head_cls", [("simplecil", {}, PrototypeHead),
                                                    ("ranpac", {"num_projections": 256}, RanPACHead)])
def test_pretrained_baselines_only_run_feature_passes(name, hparams, head_cls):
    bench = split_digits(n_train=300)
    strategy = create_strategy(name, _setup(), **hparams)
    assert isinstance(strategy, PretrainedCIL) and isinstance(strategy.model.head, head_cls)
    assert strategy.train_epochs == 0 and not any(p.requires_grad for p in strategy.model.parameters())
    backbone = strategy.model.backbone
    before = [p.detach().clone() for p in backbone.parameters()]
    seen = []
    hook = backbone.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for i, exp in enumerate(bench.train_stream[:3]):
        seen.clear()
        strategy.train(exp)
        assert sum(seen) == len(exp.dataset)  # one pass over the experience's training data, nothing else
        metrics = strategy.eval(bench.test_stream[:i + 1])
    hook.remove()
    assert all(torch.equal(a, p) for a, p in zip(before, backbone.parameters()))
    accuracy = metrics[f"Top1_Acc_Stream/{STREAM}"]
    assert accuracy > 0.5  # 6 classes: chance is 1/6
    if name == "simplecil":  # frozen features: the cosine NCM metric is the SimpleCIL classifier itself
        assert metrics[f"Top1_FeatureNCMAcc_Stream/{STREAM}"] == pytest.approx(accuracy, abs=1e-12)
