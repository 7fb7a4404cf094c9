"""Exactness of the null-space projection on real (tiny) Vision Mamba and De-focus Mamba backbones trained with
AdamW + weight decay.

Experience 1 has 4 images x 5 tokens = 20 feature rows of width d_inner = 32, so every feature covariance is
rank-deficient and the 'kernel' rule with the strict projector gives the exact null space.
"""
from types import SimpleNamespace

import pytest
import timm
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits, tiny_vim

from mambacl.backbones import SSMBranch, SSMMixer, record_taps
from mambacl.strategies import ContinualClassifier, NullSpacePlugin

TAPS = ("tap_x", "tap_delta", "tap_delta_x", "tap_out")
LINEARS = ("x_proj_dt", "x_proj_B", "x_proj_C", "out_proj")
DIRECTIONS = {"mamba": 2, "longhorn": 2, "defocus": 1}  # scan directions per block
BACKBONES = ["mamba", "defocus"]


def _tiny(backbone, head="experience", **kwargs):
    """A 2-block classifier for 8x8 digits: bidirectional Vim ('mamba', 'longhorn') or test_defocus_mamba."""
    if backbone == "defocus":
        model = timm.create_model("test_defocus_mamba", img_size=8, patch_size=4, in_chans=1, embed_dim=16,
                                  num_classes=0, **kwargs)
        return ContinualClassifier(model, head=head)
    return tiny_vim(patch_size=4, embed_dim=16, mixer=backbone, head=head, **kwargs)


def _rows(records, name):
    t = torch.cat(records[name])
    return t.reshape(-1, t.shape[-1]).double()


@torch.no_grad()
def _probe(model, x):
    """Tap tensors and protected-layer outputs of ``model`` on ``x`` (eval mode)."""
    model.eval()
    outs, handles = {}, []
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o.double())))
    with record_taps(model, TAPS) as rec:
        model(x)
    for h in handles:
        h.remove()
    return rec, outs


def _two_experiences(plugin, backbone="mamba", head="experience"):
    torch.manual_seed(0)
    bench = split_digits(per_class=(4, 16))
    model = _tiny(backbone, head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    strategy = Naive(model=model, optimizer=opt, train_mb_size=4, train_epochs=4, eval_mb_size=16,
                     plugins=[plugin] if plugin else None, evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(bench.train_stream[0])
    x_old = torch.stack([bench.train_stream[0].dataset[i][0] for i in range(4)])
    before = _probe(model, x_old)
    w1 = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    strategy.train(bench.train_stream[1])
    w2 = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    return model, before, _probe(model, x_old)[1], w1, w2


def _relative(x, d):
    return ((x @ d).norm() / (x.norm() * d.norm())).item()


@pytest.mark.parametrize("backbone, head", [("mamba", "experience"), ("longhorn", "incremental"),
                                            ("defocus", "experience")])
def test_strict_kernel_projection_keeps_every_constraint(backbone, head):
    plugin = NullSpacePlugin(selection="kernel", projector="strict", progress=False)
    model, (rec, _), _, w1, w2 = _two_experiences(plugin, backbone, head)
    checked = 0
    for name, mod in model.named_modules():
        pre = name + "."
        if isinstance(mod, SSMBranch):
            x, f, delta = _rows(rec, pre + "tap_x"), _rows(rec, pre + "tap_delta_x"), _rows(rec, pre + "tap_delta")
            cases = [(x, pre + "x_proj_dt.weight", "right"), (x, pre + "x_proj_C.weight", "right"),
                     (f, pre + "x_proj_B.weight", "right")]
            if backbone != "longhorn":  # Longhorn has no A
                cases.append((delta, pre + "A_log", "left"))
        elif isinstance(mod, SSMMixer):
            cases = [(_rows(rec, pre + "tap_out"), pre + "out_proj.weight", "right")]
        else:
            continue
        for feats, pname, side in cases:
            d = w2[pname] - w1[pname]
            assert d.norm() > 1e-4 * w1[pname].norm(), f"{pname} did not train"
            assert torch.linalg.matrix_rank(feats, rtol=1e-6) < feats.shape[1]  # a real null space exists
            rel = _relative(feats, d if side == "left" else d.T)
            assert rel < 1e-5, f"{pname}: old features see the update ({rel:.2e})"
            checked += 1
    per_branch = 3 if backbone == "longhorn" else 4
    assert checked == 2 * DIRECTIONS[backbone] * per_branch + 2  # 2 blocks x directions x branch params + 2 out_proj
    frozen = [n for n in w1 if "in_proj" in n or "conv1d" in n or "dt_proj" in n or n.endswith((".D", ".freq"))]
    assert frozen and all(torch.equal(w1[n], w2[n]) for n in frozen)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("plugin", [True, False], ids=["mambacl-token-exact", "fine-tune"])
def test_token_exact_parameters_keep_old_outputs(plugin, backbone):
    nsp = NullSpacePlugin(selection="kernel", projector="strict", wb_features="token", progress=False,
                          trainable=("x_proj_dt", "x_proj_B", "x_proj_C", "out_proj", "head")) if plugin else None
    _, (_, old), new, _, _ = _two_experiences(nsp, backbone)
    assert set(old) == set(new) and len(old) == 2 * (DIRECTIONS[backbone] * 3 + 1)
    change = max(((new[k] - old[k]).norm() / old[k].norm()).item() for k in old)
    if plugin:
        assert change < 1e-4
    else:
        assert change > 1e-2


@pytest.mark.filterwarnings("ignore:.*no collected features")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_adam_nscl_layer_plan_keeps_linear_and_conv_outputs(backbone):
    plugin = NullSpacePlugin(protect="layers", selection="kernel", projector="strict", progress=False,
                             trainable=("protected", "head"))
    torch.manual_seed(0)
    bench = split_digits(per_class=(4, 16))
    model = _tiny(backbone)
    inputs = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and "head" not in name.split("."):
            mod.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, (m, a[0].detach())))
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                     train_mb_size=4, train_epochs=4, plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(bench.train_stream[0])
    model.eval()
    with torch.no_grad():
        model(torch.stack([bench.train_stream[0].dataset[i][0] for i in range(4)]))
    old = {n: (m, x, m.weight.detach().clone()) for n, (m, x) in inputs.items()}
    strategy.train(bench.train_stream[1])
    moved = 0
    for name, (mod, x, w_old) in old.items():
        fn = torch.nn.functional.conv2d if isinstance(mod, torch.nn.Conv2d) else torch.nn.functional.linear
        kw = dict(stride=mod.stride, padding=mod.padding) if isinstance(mod, torch.nn.Conv2d) else {}
        y_old, y_new = fn(x.double(), w_old.double(), **kw), fn(x.double(), mod.weight.detach().double(), **kw)
        assert ((y_new - y_old).norm() / y_old.norm()).item() < 1e-5, name
        moved += int(not torch.equal(w_old, mod.weight.detach()))
    per_block = 2 + 3 * DIRECTIONS[backbone]  # in_proj, out_proj, directions x (x_proj x3)
    assert len(old) == 1 + 2 * per_block and moved >= 2 * 3 * DIRECTIONS[backbone]  # + the patch conv
    # dt_proj runs through F.linear (no forward of its own), so it has no features and must stay frozen
    dt = [p for n, p in model.named_parameters() if n.endswith("dt_proj.weight")]
    assert dt and not any(p.requires_grad for p in dt)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_first_experience_is_unprojected_and_optimizer_state_resets(backbone):
    bench = split_digits(per_class=(4, 16))
    weights, steps = [], []
    for plugin in (None, NullSpacePlugin(trainable=None, progress=False)):
        torch.manual_seed(0)
        model = _tiny(backbone)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        strategy = Naive(model=model, optimizer=opt, train_mb_size=4, train_epochs=2,
                         plugins=[plugin] if plugin else None, evaluator=EvaluationPlugin(loggers=[]))
        strategy.train(bench.train_stream[0])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        strategy.train(bench.train_stream[1])
        steps.append(int(opt.state[model.backbone.layers[0].mixer.fwd.x_proj_C.weight]["step"]))
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])  # experience 1 trains as Naive
    assert steps == [2 * 1 + 2 * 4, 2 * 4]  # Adam's step count restarts with experience 2 (4 batches x 2 epochs)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_covariances_are_collected_on_eval_transformed_data_in_eval_mode(backbone):
    bench = split_digits(per_class=(10, 4), train_transform=lambda x: 1.0 - x)
    torch.manual_seed(0)
    model = _tiny(backbone, drop_path_rate=0.5)  # eval mode matters
    plugin = NullSpacePlugin(progress=False, collect_mb_size=3)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), train_mb_size=5,
                     plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(bench.train_stream[0])
    data = bench.train_stream[0].dataset
    raw = torch.stack([data.eval()[i][0] for i in range(10)])
    assert not torch.equal(raw[0], data.train()[0][0])  # the train transform is really different
    model.eval()
    with torch.no_grad(), record_taps(model, TAPS) as rec:
        for chunk in raw.split(3):  # 3 + 3 + 3 + 1 images
            model(chunk)
    reference = {}
    for name, batches in rec.items():
        rows = [t.reshape(-1, t.shape[-1]).double() for t in batches]
        reference[name] = sum(r.T @ r / r.shape[0] for r in rows)
        assert plugin.engine.rows[name] == sum(r.shape[0] for r in rows)
    assert set(reference) == set(plugin.engine.covariances) and len(reference) == 2 * (DIRECTIONS[backbone] * 3 + 1)
    for name, cov in reference.items():
        torch.testing.assert_close(plugin.engine.covariances[name], cov, rtol=1e-5, atol=1e-7 * cov.abs().max())

    # reduce_fn sees this experience's statistics in sorted key order and its result joins the running sums
    seen = []

    def doubled(covariances, rows):
        seen.append(list(covariances))
        return {k: 2 * v for k, v in covariances.items()}, {k: 2 * n for k, n in rows.items()}
    before, rows_before = dict(plugin.engine.covariances), dict(plugin.engine.rows)
    before = {k: v.clone() for k, v in before.items()}
    plugin.reduce_fn = doubled
    model.train()
    plugin.collect(SimpleNamespace(model=model, experience=bench.train_stream[0], device="cpu"))
    assert model.training and seen == [sorted(before)]
    for name, cov in before.items():
        torch.testing.assert_close(plugin.engine.covariances[name], 3 * cov, rtol=1e-9, atol=1e-12)
        assert plugin.engine.rows[name] == 3 * rows_before[name]
