"""VisionMamba: timm registration, published parameter counts, token layout, training steps, compile."""
import math

import pytest
import timm
import torch

import mambacl.backbones  # noqa: F401  (registers the models)
from mambacl.backbones import LonghornMixer, MambaMixer, SSMBranch, VisionMamba, ssm_param_groups

_REAL_EMPTY = torch.empty  # captured before tests/conftest.py's NaN-poisoning wrapper is installed


@pytest.fixture
def meta(monkeypatch):
    """torch.device('meta') context; the poisoning wrapper of torch.empty escapes the device mode, so undo it."""
    monkeypatch.setattr(torch, "empty", _REAL_EMPTY)
    return torch.device("meta")


VIM_MODELS = sorted(set(timm.list_models(["vim_*", "longhorn_vim_*", "test_vim", "test_longhorn_vim"])))


def _vim_param_count(dim: int, depth: int, patches: int = 196, classes: int = 1000, n: int = 16) -> int:
    """Closed-form Vim parameter count (bimamba v2: conv/x_proj/dt_proj/A/D duplicated)."""
    d_inner, r = 2 * dim, math.ceil(dim / 16)
    branch = d_inner * 4 + d_inner + d_inner * (r + 2 * n) + r * d_inner + d_inner + d_inner * n + d_inner
    layer = dim * 2 * d_inner + d_inner * dim + 2 * branch + dim
    stem = 3 * 16 * 16 * dim + dim + (patches + 1) * dim + dim
    return depth * layer + stem + dim + dim * classes + classes


def test_registered_names():
    assert {"vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224", "vim_tiny_patch16_stride8_224",
            "longhorn_vim_tiny_patch16_224", "test_vim", "test_longhorn_vim"} <= set(VIM_MODELS)


@pytest.mark.parametrize("name", VIM_MODELS)
def test_construct_registered_model(name, meta):
    with meta:
        model = timm.create_model(name, num_classes=5)
    assert isinstance(model, VisionMamba) and model.head.out_features == 5
    assert model.pos_embed.is_meta and model.layers[0].mixer.fwd.dt_proj.bias.is_meta
    branches = [m for m in model.modules() if isinstance(m, SSMBranch)]
    assert len(branches) == 2 * len(model.layers) and [m for _, m in model.ssm_branches()] == branches
    mixer_cls = LonghornMixer if "longhorn" in name else MambaMixer
    assert all(isinstance(layer.mixer, mixer_cls) for layer in model.layers)
    grid = model.patch_embed.grid_size
    assert model.pos_embed.shape == (1, grid[0] * grid[1] + 1, model.embed_dim)


@pytest.mark.parametrize("name,dim,published", [
    ("vim_tiny_patch16_224", 192, 7e6), ("vim_small_patch16_224", 384, 26e6), ("vim_base_patch16_224", 768, 98e6)])
def test_parameter_counts_match_published(name, dim, published, meta):
    with meta:
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == _vim_param_count(dim, 24)
    assert abs(count - published) / published < 0.03


def test_stride8_patch_grid(meta):
    with meta:
        model = timm.create_model("vim_tiny_patch16_stride8_224")
    assert model.patch_embed.grid_size == (27, 27) and model.pos_embed.shape[1] == 27 * 27 + 1


@pytest.mark.parametrize("position,index", [("middle", 8), ("last", 16)])
def test_cls_token_position_and_head(position, index):
    model = VisionMamba(img_size=16, patch_size=4, depth=1, embed_dim=16, cls_token_position=position,
                        num_classes=3).eval()
    seen = {}
    model.layers[0].norm.register_forward_hook(lambda m, inp, out: seen.setdefault("tokens", inp[0]))
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    patches = model.patch_embed(x)
    expected = torch.cat([patches[:, :index], model.cls_token.expand(2, -1, -1), patches[:, index:]], 1)
    torch.testing.assert_close(seen["tokens"], expected + model.pos_embed)
    assert feats.shape == (2, 17, 16) and model.cls_index == index
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, index])
    torch.testing.assert_close(model(x), model.head(feats[:, index]))


def test_digits_size_without_cls_token_uses_mean_pooling():
    model = VisionMamba(img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=16, cls_token_position="none",
                        num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    feats = model.forward_features(x)
    assert feats.shape == (3, 16, 16) and model.cls_token is None
    torch.testing.assert_close(model(x), model.head(feats.mean(1)))


@pytest.mark.parametrize("name", ["test_vim", "test_longhorn_vim"])
def test_forward_backward_32px(name):
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.layers[0].mixer.bwd.x_proj_B.weight.grad.abs().sum() > 0


def test_forward_backward_224px():
    model = timm.create_model("vim_tiny_patch16_224", depth=1, embed_dim=32, num_classes=4)
    out = model(torch.randn(1, 3, 224, 224))
    out.sum().backward()
    assert out.shape == (1, 4) and model.pos_embed.grad.shape == (1, 197, 32)
    assert torch.isfinite(model.patch_embed.proj.weight.grad).all()


def test_grad_checkpointing_matches():
    model = timm.create_model("test_vim", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_forward_intermediates():
    model = timm.create_model("test_vim", depth=3, num_classes=2).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    for block in model.layers:  # each block's input residual is the previous block's residual + output
        block.norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    final, feats = model.forward_intermediates(x, indices=[0, 1])
    assert len(feats) == 2 and feats[0].shape == (2, 65, 32)
    torch.testing.assert_close(feats[0], seen[1])
    torch.testing.assert_close(feats[1], seen[2])
    torch.testing.assert_close(final, model.forward_features(x))
    last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    torch.testing.assert_close(last[0], final)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NCHW")


def test_drop_path_rises_linearly_and_no_weight_decay():
    model = VisionMamba(img_size=16, patch_size=4, depth=3, embed_dim=16, drop_path_rate=0.2, num_classes=2)
    # block i drops block i-1's output: rates [0, 0, 0.1], final add 0.2 (Vim's inter_dpr).
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.1]) and model.drop_path.drop_prob == pytest.approx(0.2)
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "layers.2.mixer.bwd.A_log", "layers.0.mixer.fwd.dt_proj.bias"} <= nwd
    groups = ssm_param_groups(model, 0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.layers[1].mixer.fwd.A_log) in no_decay and id(model.pos_embed) in no_decay


def test_reset_classifier_and_group_matcher():
    model = timm.create_model("test_vim")
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="mixer"):
        VisionMamba(mixer="transformer")
    with pytest.raises(ValueError, match="cls_token_position"):
        VisionMamba(cls_token_position="first")
    with pytest.raises(ValueError, match="depth"):
        VisionMamba(depth=0)
    with pytest.raises(ValueError, match="stride"):
        VisionMamba(stride=0)


def test_torch_compile_matches_eager():
    model = timm.create_model("test_vim", depth=1, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
