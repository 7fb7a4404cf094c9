"""Mamba-FSCIL building blocks against hand computations: ETF geometry, losses, the four-scan neck."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mambacl.strategies.fscil import (
    ETFHead,
    FeatureMapBackbone,
    FourScanSSM,
    MambaNeck,
    cosine_regression_loss,
    dot_regression_loss,
    length_weights,
    separation_loss,
    suppression_loss,
)


@pytest.mark.parametrize("d,k", [(8, 5), (16, 16), (640, 100)], ids=["d8k5", "d16k16", "d640k100"])
def test_etf_prototypes_are_equiangular(d, k):
    w = ETFHead(d, k).weight.double()
    gram = w.T @ w
    assert torch.allclose(gram.diagonal(), torch.ones(k, dtype=torch.float64), atol=1e-5)
    off = gram[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-5)
    assert torch.allclose(w.sum(dim=1), torch.zeros(d, dtype=torch.float64), atol=1e-5)  # centred simplex


def test_etf_logits_are_cosines_restricted_to_seen_classes():
    head = ETFHead(6, 4)
    head.num_seen = 3
    feat = torch.randn(5, 6)
    logits = head(feat)
    assert logits.shape == (5, 3)
    for i, c in itertools.product(range(5), range(3)):
        cos = float(feat[i] @ head.weight[:, c]) / float(feat[i].norm() * head.weight[:, c].norm())
        assert logits[i, c].item() == pytest.approx(cos, abs=1e-6)


@pytest.mark.parametrize("kwargs,match", [(dict(in_features=4, num_classes=5), "in_features"),
                                          (dict(in_features=4, num_classes=1), "num_classes")])
def test_etf_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ETFHead(**kwargs)


def test_length_weights_hand_computed():
    labels = torch.tensor([0, 0, 1, 3, 3, 3])
    r = length_weights(labels, 5)
    # N = 6 samples over 3 unique labels: r_c = sqrt(2 / count_c); absent classes keep 1.
    expected = torch.tensor([math.sqrt(2 / 2), math.sqrt(2 / 1), 1.0, math.sqrt(2 / 3), 1.0])
    assert torch.allclose(r, expected)


@pytest.mark.parametrize("with_len", [False, True], ids=["r1", "with_len"])
def test_dot_regression_loss_hand_computed(with_len):
    etf = ETFHead(6, 4).weight
    feat = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 3, 0])
    lengths = length_weights(labels, 4).double() if with_len else None
    loss = dot_regression_loss(feat, labels, etf.double(), lengths)
    terms = []
    for i in range(5):
        w = etf[:, labels[i]].double()
        cos = float(feat[i] @ w / (feat[i].norm() * w.norm()))
        r = float(lengths[labels[i]]) if with_len else 1.0
        terms.append(r * r * (cos - 1) ** 2)
    assert loss.item() == pytest.approx(5.0 * sum(terms) / 5, rel=1e-9)


def test_dot_regression_loss_bad_shapes():
    with pytest.raises(ValueError, match="feat"):
        dot_regression_loss(torch.randn(3, 4), torch.zeros(2, dtype=torch.long), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"lengths None or \[b\], got \(3,\) and \(5,\)"):
        cosine_regression_loss(torch.ones(3), torch.ones(5))


def test_suppression_loss_hand_computed():
    zs = [torch.randn(4, 3, 5, dtype=torch.float64) for _ in range(4)]
    labels = torch.tensor([0, 7, 1, 9])  # base classes < 5: samples 0 and 2
    loss = suppression_loss(zs, labels, num_base=5, w_s=100.0, w_sn=1e-2)
    expected = 0.0
    for z in zs:
        base = [float(v) for i in (0, 2) for v in z[i].flatten()]
        novel = [float(v) for i in (1, 3) for v in z[i].flatten()]
        expected += 100.0 * math.sqrt(sum(v * v for v in base)) / len(base)
        expected -= 1e-2 * math.sqrt(sum(v * v for v in novel)) / len(novel)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    only_novel = suppression_loss(zs, torch.tensor([5, 6, 7, 8]), num_base=5, w_s=100.0, w_sn=0.0)
    assert only_novel.item() == 0.0


def test_separation_loss_matches_cosine_matrix():
    params = [torch.randn(5, 3, d, dtype=torch.float64) for d in (2, 4, 4)]
    labels = torch.tensor([0, 1, 6, 0, 8])
    loss = separation_loss(params, labels, num_base=5, weight=0.5)
    expected = 0.0
    for p in params:
        m_b = (p[0] + p[1] + p[3]).sum(0) / 9
        m_n = (p[2] + p[4]).sum(0) / 6
        feats = torch.stack([m_b / m_b.norm(), m_n / m_n.norm()])
        sim = feats @ feats.T
        expected += 0.5 * float((torch.eye(2, dtype=torch.float64) - sim).abs().mean())
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert separation_loss(params, torch.tensor([0, 1, 2, 3, 4]), 5, 0.5).item() == 0.0


def _grid_scans(height: int, width: int):
    """The four scan orders as 2-D grid operations on a [b, D, H, W] map (independent of scan_orders)."""
    return [
        (lambda g: g.flatten(2), lambda s: s.unflatten(2, (height, width))),
        (lambda g: g.flatten(2).flip(-1), lambda s: s.flip(-1).unflatten(2, (height, width))),
        (lambda g: g.transpose(2, 3).flatten(2), lambda s: s.unflatten(2, (width, height)).transpose(2, 3)),
        (lambda g: g.transpose(2, 3).flatten(2).flip(-1),
         lambda s: s.flip(-1).unflatten(2, (width, height)).transpose(2, 3)),
    ]


def test_four_scan_ssm_matches_grid_reference():
    height, width, dim = 3, 2, 6
    block = FourScanSSM(dim, d_state=4, dt_rank=3, scan_impl="reference").double()
    tokens = torch.randn(2, height * width, dim, dtype=torch.float64)
    out = block(tokens, height, width)
    x, z = (tokens @ block.in_proj.weight.T).transpose(1, 2).chunk(2, dim=1)
    xg, zg = x.unflatten(2, (height, width)), z.unflatten(2, (height, width))
    expected = torch.zeros_like(xg)
    for to_seq, to_grid in _grid_scans(height, width):
        expected = expected + to_grid(block.ssm(to_seq(xg), to_seq(zg)))
    assert torch.allclose(out.y, expected.flatten(2).transpose(1, 2), atol=1e-12)
    for zk, (to_seq, _) in zip(out.z, _grid_scans(height, width)):
        assert torch.equal(zk, to_seq(zg))
    # dt_low, B, C of the h-scan are the split x_proj of its conv+SiLU output.
    xc = F.silu(block.ssm.conv1d(x)[..., :height * width]).transpose(1, 2)
    assert torch.allclose(out.dt_low, xc @ block.ssm.x_proj_dt.weight.T, atol=1e-12)
    assert torch.allclose(out.B, xc @ block.ssm.x_proj_B.weight.T, atol=1e-12)
    assert torch.allclose(out.C, xc @ block.ssm.x_proj_C.weight.T, atol=1e-12)


def _neck(**kwargs) -> MambaNeck:
    return MambaNeck(8, 8, (2, 3), d_state=4, dt_rank=2, scan_impl="reference", **kwargs)


def test_incremental_branch_adds_exactly_zero_at_init():
    neck = _neck()
    feat = torch.randn(4, 8, 2, 3)
    before = neck(feat).feat
    inc = neck.add_incremental_branch()
    assert torch.count_nonzero(inc.block.in_proj.weight[8:]) == 0
    out = neck(feat)
    assert torch.equal(out.feat, before)
    assert out.inc is not None and all(torch.count_nonzero(z) == 0 for z in out.inc.z)
    # Gradients still reach the gate rows (silu'(0) = 1/2), so the branch can learn.
    out.feat.pow(2).sum().backward()
    assert inc.block.in_proj.weight.grad[8:].abs().sum() > 0


def test_base_output_is_gap_residual_plus_token_mean():
    neck = _neck()
    feat = torch.randn(3, 8, 2, 3)
    tokens = neck.base.mlp(feat).flatten(2).transpose(1, 2) + neck.base.pos_embed
    expected = neck.base.block(tokens, 2, 3).y.mean(1) + feat.mean(dim=(2, 3))
    assert torch.allclose(neck(feat).feat, expected, atol=1e-6)


@pytest.mark.parametrize("detach_base", [True, False], ids=["detached", "trained"])
def test_detached_base_gets_no_gradient(detach_base):
    neck = _neck(detach_base=detach_base)
    neck.add_incremental_branch()
    with torch.no_grad():
        neck.inc.block.in_proj.weight.normal_()
    neck(torch.randn(2, 8, 2, 3)).feat.sum().backward()
    base_grads = [p.grad for p in neck.base_parameters()]
    if detach_base:
        assert all(g is None for g in base_grads)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in base_grads)
    assert all(p.grad is not None for p in neck.inc.parameters())


def test_residual_projection_allows_other_width():
    neck = MambaNeck(8, 12, (2, 2), d_state=4, dt_rank=2, use_residual_proj=True)
    assert neck(torch.randn(2, 8, 2, 2)).feat.shape == (2, 12)


@pytest.mark.parametrize("make,match", [
    (lambda: MambaNeck(8, 12, (2, 2)), "dim"),
    (lambda: _neck()(torch.randn(2, 8, 3, 3)), "feat"),
    (lambda: FourScanSSM(4, d_state=2, dt_rank=1)(torch.randn(1, 5, 4), 2, 2), "tokens"),
    (lambda: MambaNeck(8, 8, (2, 2), num_layers=0), "num_layers"),
])
def test_neck_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name,shape", [("test_resnet12", (8, 2, 2)), ("test_vim", None)])
def test_feature_map_backbone_shapes(name, shape):
    backbone = FeatureMapBackbone(name, img_size=32)
    out = backbone(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape[1:]) == backbone.out_shape
    if shape is not None:
        assert backbone.out_shape == shape
    else:
        grid = backbone.model.patch_embed.grid_size
        assert backbone.out_shape[1:] == tuple(grid)


def test_feature_map_backbone_unknown_name():
    with pytest.raises(ValueError, match="backbone"):
        FeatureMapBackbone("no_such_net", img_size=32)


def test_resnet12_paper_map_and_parameter_count():
    model = FeatureMapBackbone("resnet12", img_size=32).model
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 640, 2, 2)
    # Per stage: three 3x3 convs and a 1x1 shortcut (no bias) with BN (2 params per channel each).
    expected, cin = 0, 3
    for w in (64, 160, 320, 640):
        expected += 9 * cin * w + 9 * w * w * 2 + cin * w + 4 * 2 * w
        cin = w
    assert sum(p.numel() for p in model.parameters()) == expected


def test_resnet12_bad_args():
    from mambacl.backbones.resnet12 import ResNet12
    with pytest.raises(ValueError, match="widths"):
        ResNet12(widths=(4, 4, 4))
    with pytest.raises(ValueError, match="pretrained"):
        FeatureMapBackbone("resnet12", img_size=32, pretrained=True)
