"""MambaFSCIL end to end on generated CIFAR-100-format data (tiny ResNet-12, tiny neck), on the CPU."""
import copy

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torchvision import transforms as T

from mambacl.benchmarks.fscil import FSCILSpec, fscil_cifar100, write_synthetic_cifar100
from mambacl.strategies.fscil.strategy import PROTOCOLS, MambaFSCIL, fscil_summary

SPEC = FSCILSpec(num_classes=8, num_base=4, n_way=2, n_shot=2)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_fscil")
    write_synthetic_cifar100(root, num_classes=8, train_per_class=8, test_per_class=4)
    # Train images get a random flip so that the feature cache must use the eval transform to be exact.
    return fscil_cifar100(root, spec=SPEC, train_transform=T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]),
                          eval_transform=T.ToTensor())


def _strategy(**kwargs) -> MambaFSCIL:
    options = dict(backbone="test_resnet12", img_size=32, num_classes=8, num_base=4, d_state=4, dt_rank=2,
                   overrides=dict(inc_steps=4, base_warmup=0, base_lr=0.1, inc_lr=0.1, copy=2), inc_mb_size=6,
                   train_mb_size=8, train_epochs=6, eval_mb_size=16,
                   evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
    options.update(kwargs)
    return MambaFSCIL(**options)


def _manual_accuracy(strategy: MambaFSCIL, test_exp) -> float:
    model = strategy.model.eval()
    correct = total = 0
    with torch.no_grad():
        for i in range(len(test_exp.dataset)):
            x, y, *_ = test_exp.dataset[i]
            feat = model.neck(model.backbone(x[None])).feat
            logits = torch.nn.functional.normalize(feat, dim=1) @ model.head.weight
            correct += int(logits[0, :model.head.num_seen].argmax()) == int(y)
            total += 1
    return correct / total


def test_fscil_end_to_end(bench):
    strategy = _strategy()
    train, test = list(bench.train_stream), list(bench.test_stream)

    strategy.train(train[0])
    acc0 = strategy.session_accuracy(test[0])
    assert acc0 == pytest.approx(_manual_accuracy(strategy, test[0]))
    assert acc0 > 0.5  # 4 well-separated synthetic classes, chance is 0.25
    after_base = copy.deepcopy(strategy.model.state_dict())

    strategy.train(train[1])
    inc = strategy.model.neck.inc
    assert inc.block.in_proj.weight[inc.block.dim:].abs().sum() > 0  # the gate has left zero
    for name, value in strategy.model.state_dict().items():
        if not name.startswith("neck.inc."):
            assert torch.equal(value, after_base[name]), f"{name} changed in an incremental session"
    assert strategy.model.head.num_seen == 6
    acc1 = strategy.session_accuracy(test[1])
    assert acc1 == pytest.approx(_manual_accuracy(strategy, test[1]))

    # Session 3's training set: 4 shots + earlier novel means x copy (2) + base prototypes x base_copy (1).
    strategy.session, strategy.experience = 2, train[2]
    maps, labels = strategy.incremental_training_set()
    assert sorted(labels.tolist()) == sorted([6, 6, 7, 7] + [4, 4, 5, 5] + [0, 1, 2, 3])
    base_maps = []
    with torch.no_grad():
        strategy.model.eval()
        for i in range(len(train[0].dataset)):
            x, y, *_ = train[0].dataset.eval()[i]
            if int(y) == 2:
                base_maps.append(strategy.model.backbone(x[None])[0].double())
    assert torch.allclose(maps[labels == 2][0].double(), torch.stack(base_maps).mean(0), atol=1e-5)

    strategy.train(train[2])
    assert strategy.model.neck.inc is not inc  # a fresh zero-gated branch per session
    acc2 = strategy.session_accuracy(test[2])
    summary = fscil_summary([acc0, acc1, acc2])
    assert summary["avg"] == pytest.approx((acc0 + acc1 + acc2) / 3)
    assert summary["pd"] == pytest.approx(acc0 - acc2)


def test_fscil_run_reports_sessions_and_continuing_branch(bench):
    strategy = _strategy(train_epochs=2, fresh_branch=False)
    result = strategy.run(bench.train_stream[:2], bench.test_stream[:2])
    inc = strategy.model.neck.inc
    result = fscil_summary(result["sessions"] + [strategy.run(bench.train_stream[2:], bench.test_stream[2:])["avg"]])
    assert strategy.model.neck.inc is inc
    assert len(result["sessions"]) == 3 and all(0.0 <= a <= 1.0 for a in result["sessions"])
    assert result["pd"] == pytest.approx(result["sessions"][0] - result["sessions"][-1])


def test_fscil_summary_matches_paper_row():
    # fscil.md section 5, Mamba-FSCIL on CIFAR-100: Avg 68.14, PD 25.29.
    row = [82.80, 77.85, 73.69, 69.67, 66.89, 63.66, 61.48, 59.74, 57.51]
    summary = fscil_summary(row)
    assert round(summary["avg"], 2) == 68.14 and round(summary["pd"], 2) == 25.29
    with pytest.raises(ValueError, match="accuracies"):
        fscil_summary([])


def test_protocols_carry_published_settings():
    cifar, cub = PROTOCOLS["cifar100"], PROTOCOLS["cub200"]
    assert (cifar.inc_steps, cifar.inc_lr, cifar.mixup_prob, cifar.base_lr_mult) == (200, 0.25, 0.75, 0.0)
    assert (cifar.weights.w_s, cifar.weights.w_sn, cifar.weights.w_sep) == (100.0, 1e-5, 1e-3)
    assert cub.base_copy == (1, 1, 2, 2, 3, 3, 1, 1, 1, 1) and cub.inc_num_layers == 3 and cub.base_lr_mult == 0.2
    # configs/*/..._eval_mambafscil.py step_list / base_copy_list, one value per incremental session
    mini = PROTOCOLS["mini_imagenet"]
    assert [mini.per_session("inc_steps", t) for t in range(1, 9)] == [100, 110, 120, 130, 140, 150, 160, 170]
    assert [mini.per_session("base_copy", t) for t in range(1, 9)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [cub.per_session("inc_steps", t) for t in range(1, 11)] == list(range(200, 291, 10))
    assert cifar.per_session("inc_steps", 5) == 200


def test_per_session_steps_drive_each_incremental_session(bench):
    strategy = _strategy(train_epochs=1, overrides=dict(inc_steps=(2, 3), base_warmup=0, copy=2))
    steps = []
    for exp in bench.train_stream:
        strategy.train(exp)
        steps.append(strategy._updates)
    assert steps == [4, 2, 3]  # base: 4 classes x 8 images / batch 8; then 2 and 3 SGD steps


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(protocol="imagenet"), ValueError, "protocol"),
    (dict(num_base=8), ValueError, "num_base"),
    (dict(overrides=dict(no_such_field=1)), TypeError, "overrides"),
    (dict(inc_mb_size=0), ValueError, "inc_mb_size"),
    (dict(overrides=dict(base_mixing=0.5)), TypeError, "base_mixing"),
    (dict(overrides=dict(base_mixing=dict(mixup_prob=0.5))), ValueError, "mixup_alpha"),
])
def test_fscil_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _strategy(**kwargs)


def test_registry_entry_builds_from_a_timm_backbone():
    import timm

    from mambacl.strategies.registry import TrainSetup, create_strategy, get_strategy

    assert "Mamba-FSCIL" in get_strategy("mamba-fscil").summary
    backbone = timm.create_model("test_resnet12", num_classes=0)
    strategy = create_strategy("mamba-fscil", TrainSetup(backbone=backbone, train_mb_size=4), num_classes=8,
                               num_base=4, d_state=4, dt_rank=2, inc_steps=3, base_lr=0.05)
    assert isinstance(strategy, MambaFSCIL) and strategy.model.backbone.model is backbone
    assert strategy.protocol.inc_steps == 3 and strategy.optimizer.param_groups[0]["lr"] == 0.05
    assert strategy.model.neck.feat_hw == (2, 2) and strategy.model.head.num_seen == 4


def _dot_regression_closed_form(feat: torch.Tensor, labels: torch.Tensor, etf: torch.Tensor) -> float:
    """10 * 0.5 * mean_i (cos(h_i, w_{y_i}) - 1)^2 in float64 (target lengths 1: CIFAR's base session)."""
    total = 0.0
    for h, y in zip(feat.double(), labels.tolist()):
        w = etf[:, y].double()
        total += (float(h @ w) / float(h.norm() * w.norm()) - 1.0) ** 2
    return 10 * 0.5 * total / len(labels)


@pytest.mark.parametrize("mix_loss", ["authors", "convex"])
def test_base_session_loss_on_a_mixed_batch_is_the_closed_form(mix_loss):
    from mambacl.strategies.fscil import BatchMixing, NeckOutput

    mixing = BatchMixing(mixup_alpha=0.8, mixup_prob=0.4, cutmix_alpha=1.0, cutmix_prob=0.4, mix_loss=mix_loss)
    strategy = _strategy(overrides=dict(base_mixing=mixing))
    feat, y_a = torch.randn(6, strategy.model.neck.dim), torch.tensor([0, 1, 2, 3, 1, 0])
    perm, lam = torch.tensor([3, 5, 0, 1, 2, 4]), 0.37
    strategy.mbatch = [torch.zeros(6, 3, 32, 32), y_a, torch.zeros(6, dtype=torch.long)]
    strategy.is_training, strategy.session = True, 0
    strategy._neck_out, strategy._mix = NeckOutput(feat, None, None), (y_a, y_a[perm], lam)
    etf = strategy.model.head.weight
    loss_a, loss_b = _dot_regression_closed_form(feat, y_a, etf), _dot_regression_closed_form(feat, y_a[perm], etf)
    # mmfscil/models/classifier.py forward_train: loss_main = lam L(y_a), loss_aux = (1 - lam) L(y_b), then
    # 'loss' = L(y_a) is set again by the non-mixup branch; _parse_losses sums every key containing 'loss'
    expected = lam * loss_a + (1 - lam) * loss_b + (loss_a if mix_loss == "authors" else 0.0)
    assert float(strategy.criterion()) == pytest.approx(expected, rel=1e-5)
    strategy._mix = None
    assert float(strategy.criterion()) == pytest.approx(loss_a, rel=1e-5)


def test_incremental_feature_mixup_mixes_the_projector_output():
    strategy = _strategy()
    model = strategy.model.eval()
    model.neck.add_incremental_branch()
    with torch.no_grad():
        model.neck.inc.block.in_proj.weight.normal_()  # a non-zero gate, so the incremental branch matters
        maps, perm = torch.randn(5, *model.backbone.out_shape), torch.tensor([4, 2, 3, 0, 1])
        logits, out = model(maps, from_maps=True, mix_perm=perm, return_neck=True)
        plain = model.neck(maps)
    # mmfscil classifier.mixup_feat: lam 0.5 on the neck output; the losses' inputs stay the unmixed batch's
    mixed = 0.5 * plain.feat + 0.5 * plain.feat[perm]
    assert torch.allclose(out.feat, mixed, atol=1e-6)
    etf_seen = model.head.weight[:, :model.head.num_seen]
    assert torch.allclose(logits, torch.nn.functional.normalize(mixed, dim=1) @ etf_seen, atol=1e-6)
    for got, ref in zip([*out.inc.z, out.inc.dt_low, out.inc.B, out.inc.C],
                        [*plain.inc.z, plain.inc.dt_low, plain.inc.B, plain.inc.C]):
        assert torch.equal(got, ref)


def test_base_session_trains_on_mixed_batches(bench):
    from avalanche.core import SupervisedPlugin

    from mambacl.strategies.fscil import PUBLISHED_BASE_MIXING

    class Check(SupervisedPlugin):
        """After each forward: the backbone saw the batch itself, or a mix of it when the strategy mixed."""

        def __init__(self):
            super().__init__()
            self.seen, self.kinds = None, []

        def after_forward(self, strategy, **kwargs):
            if strategy._mix is None:
                assert torch.equal(self.seen, strategy.mb_x)
                self.kinds.append("none")
            else:
                y_a, y_b, lam = strategy._mix
                assert torch.equal(y_a, strategy.mb_y) and sorted(y_b.tolist()) == sorted(y_a.tolist())
                assert 0 <= lam <= 1 and not torch.equal(self.seen, strategy.mb_x)
                self.kinds.append("mixed")

    check = Check()
    strategy = _strategy(overrides=dict(inc_steps=4, base_warmup=0, base_lr=0.1, inc_lr=0.1, copy=2,
                                        base_mixing=PUBLISHED_BASE_MIXING["cifar100"]),
                         train_epochs=4, plugins=[check])
    strategy.model.backbone.register_forward_pre_hook(lambda module, args: setattr(check, "seen", args[0]))
    torch.manual_seed(0)
    strategy.train(bench.train_stream[0])
    assert "mixed" in check.kinds and len(check.kinds) == 4 * 4  # 32 images / batch 8, 4 epochs
    assert 0.0 <= strategy.session_accuracy(bench.test_stream[0]) <= 1.0


def test_registry_base_mixing_arguments():
    import timm

    from mambacl.strategies.fscil import PUBLISHED_BASE_MIXING
    from mambacl.strategies.registry import TrainSetup, create_strategy

    def build(**kwargs):
        backbone = timm.create_model("test_resnet12", num_classes=0)
        return create_strategy("mamba-fscil", TrainSetup(backbone=backbone, train_mb_size=4), num_classes=8,
                               num_base=4, d_state=4, dt_rank=2, **kwargs)

    assert not build().protocol.base_mixing.enabled  # off by default
    published = build(base_mixup_alpha=0.8, base_mixup_prob=0.4, base_cutmix_alpha=1.0, base_cutmix_prob=0.4)
    assert published.protocol.base_mixing == PUBLISHED_BASE_MIXING["cifar100"]
    as_mapping = dict(mixup_alpha=0.8, mixup_prob=0.4, cutmix_alpha=1.0, cutmix_prob=0.4)
    assert _strategy(overrides=dict(base_mixing=as_mapping)).protocol.base_mixing == PUBLISHED_BASE_MIXING["cifar100"]
    for kwargs, match in ((dict(base_mixup_prob=0.4), "^base_mixup_alpha"),
                          (dict(base_cutmix_alpha=1.0, base_cutmix_prob=2.0), "^base_cutmix_prob"),
                          (dict(base_mix_loss="sum"), "^base_mix_loss")):
        with pytest.raises(ValueError, match=match):
            build(**kwargs)
