"""Bad inputs to the backbone entry points (timm.create_model of vim / longhorn / defocus, forward, checkpoint
files): each raises the exact exception type with a message naming the argument; valid edge cases give the
reference result."""
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F

import mambacl.backbones  # noqa: F401  (registers the models)
from mambacl.backbones import DefocusBranch, DefocusMixer, load_checkpoint


class NotATensor:
    """A pickled object of a class weights-only loading does not allow."""


def _build(name, **kwargs):
    return lambda: timm.create_model(name, **kwargs)


CONSTRUCTION = [
    pytest.param(_build("test_vim", img_size=30), ValueError, "img_size", id="vim-img_size-not-covered-by-patches"),
    pytest.param(_build("test_vim", img_size=2), ValueError, "img_size", id="vim-img_size-below-patch"),
    pytest.param(_build("test_vim", img_size="32"), ValueError, "img_size", id="vim-img_size-string"),
    pytest.param(_build("test_defocus_mamba", img_size=(32, 30)), ValueError, "img_size", id="defocus-img_size-tuple"),
    pytest.param(_build("test_vim", patch_size=0), ValueError, "patch_size", id="vim-patch_size-zero"),
    pytest.param(_build("test_vim", stride=0), ValueError, "stride", id="vim-stride-zero"),
    pytest.param(_build("test_vim", depth=0), ValueError, "depth", id="vim-depth-zero"),
    pytest.param(_build("test_defocus_mamba", depth=1.5), ValueError, "depth", id="defocus-depth-float"),
    pytest.param(_build("test_longhorn_vim", embed_dim=-8), ValueError, "embed_dim", id="longhorn-embed_dim-negative"),
    pytest.param(_build("test_defocus_mamba", embed_dim=True), ValueError, "embed_dim", id="defocus-embed_dim-bool"),
    pytest.param(_build("test_vim", mixer="transformer"), ValueError, "mixer", id="vim-unknown-mixer"),
    pytest.param(_build("test_vim", cls_token_position="first"), ValueError, "cls_token_position",
                 id="vim-cls-position"),
    pytest.param(_build("test_defocus_mamba", cls_token_position="middle"), TypeError, "cls_token_position",
                 id="defocus-cls-position-is-fixed"),
    pytest.param(_build("test_vim", pos_embed="sincos"), ValueError, "pos_embed", id="vim-pos_embed"),
    pytest.param(_build("test_vim", final_norm="batchnorm"), ValueError, "final_norm", id="vim-final_norm"),
    pytest.param(_build("test_vim", scan_impl="cuda"), ValueError, "scan_impl", id="vim-scan_impl"),
    pytest.param(_build("test_longhorn_vim", scan_impl="fast"), ValueError, "scan_impl", id="longhorn-scan_impl"),
    pytest.param(_build("test_defocus_mamba", scan_impl="mamba_ssm"), ValueError, "scan_impl", id="defocus-scan_impl"),
    pytest.param(_build("test_defocus_mamba", group_size=7), ValueError, "group_size", id="defocus-group_size"),
    pytest.param(_build("test_defocus_mamba", d_state=15), ValueError, "d_state", id="defocus-d_state-odd"),
    pytest.param(_build("test_defocus_mamba", delta_scale_factor=0.0), ValueError, "delta_scale_factor",
                 id="defocus-delta_scale_factor-zero"),
    pytest.param(_build("test_defocus_mamba", rope_scale_factor=float("nan")), ValueError, "rope_scale_factor",
                 id="defocus-rope_scale_factor-nan"),
    pytest.param(_build("test_defocus_mamba", dt_rank=0), ValueError, "dt_rank", id="defocus-dt_rank-zero"),
    pytest.param(lambda: DefocusMixer(16, bidirectional=True, group_size=8), ValueError, "bidirectional",
                 id="defocus-mixer-bidirectional"),
    pytest.param(_build("test_vim", pretrained_strict="no"), TypeError, "pretrained_strict",
                 id="vim-pretrained_strict-not-bool"),
    pytest.param(_build("test_defocus_mamba", pretrained=True), RuntimeError, "pretrained",
                 id="defocus-pretrained-without-file"),
]


@pytest.mark.parametrize("build, error, argument", CONSTRUCTION)
def test_bad_model_arguments(build, error, argument):
    with pytest.raises(error, match=argument):
        build()


FORWARD = [
    pytest.param("test_vim", (2, 1, 32, 32), id="vim-wrong-channels"),
    pytest.param("test_vim", (2, 3, 28, 28), id="vim-wrong-size"),
    pytest.param("test_longhorn_vim", (3, 32, 32), id="longhorn-no-batch-dim"),
    pytest.param("test_defocus_mamba", (2, 3, 32, 16), id="defocus-wrong-width"),
    pytest.param("test_defocus_mamba", (2, 3, 32, 32, 1), id="defocus-5d"),
]


@pytest.mark.parametrize("name, shape", FORWARD)
def test_wrong_input_shape_to_forward(name, shape):
    model = timm.create_model(name, num_classes=3)
    with pytest.raises(ValueError, match=r"x must be images of shape \(batch, 3, 32, 32\)"):
        model(torch.randn(*shape))
    with pytest.raises(ValueError, match=r"^x must"):
        model.forward_intermediates(torch.randn(*shape))


def _vim_checkpoint(model):
    """The model's own weights in the official Vim key layout (x_proj fused, *_b backward tensors)."""
    out = {}
    for key, value in model.state_dict().items():
        for native, official in ((".fwd.", "."), (".bwd.conv1d", ".conv1d_b"), (".bwd.dt_proj", ".dt_proj_b"),
                                 (".bwd.A_log", ".A_b_log"), (".bwd.D", ".D_b")):
            key = key.replace(native, official)
        out[key] = value
    for prefix in sorted({k.split("mixer.")[0] for k in out if "mixer." in k}):
        for s in ("", "_b"):
            parts = [out.pop(f"{prefix}mixer.{'bwd.' if s else ''}x_proj_{p}.weight") for p in ("dt", "B", "C")]
            out[f"{prefix}mixer.x_proj{s}.weight"] = torch.cat(parts)
    return out


def _with(model, **entries):
    """The model's state dict with some entries replaced."""
    return dict(model.state_dict(), **entries)


def _file(tmp_path, content, name="ckpt.pth"):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    return str(path)


CHECKPOINTS = [
    pytest.param("test_vim", lambda tmp: str(tmp / "missing.pth"), FileNotFoundError, "pretrained_file.*missing",
                 id="vim-missing-file"),
    pytest.param("test_defocus_mamba", lambda tmp: str(tmp), FileNotFoundError, "pretrained_file",
                 id="defocus-directory-not-file"),
    pytest.param("test_vim", lambda tmp: _file(tmp, [torch.zeros(2)]), TypeError, "pretrained_file.*must hold a dict",
                 id="vim-list-file"),
    pytest.param("test_defocus_mamba", lambda tmp: _file(tmp, "not a checkpoint\n"), ValueError, "pretrained_file",
                 id="defocus-text-file"),
    pytest.param("test_vim", lambda tmp: _file(tmp, {"model": {"x": NotATensor()}}), ValueError,
                 "pretrained_file.*weights-only", id="vim-pickled-object"),
    pytest.param("test_defocus_mamba", lambda tmp: _file(tmp, {"epoch": 3, "lr": 0.1}), TypeError, "'epoch'",
                 id="defocus-dict-without-tensors"),
    pytest.param("test_defocus_mamba", lambda tmp: _file(tmp, _vim_checkpoint(timm.create_model("test_vim"))),
                 ValueError, r"missing keys \[.*layers\.0\.mixer\.fwd\.freq.*unexpected keys \[.*A_b_log",
                 id="defocus-given-a-vim-layout"),
    pytest.param("test_vim", lambda tmp: _file(tmp, {"model": {"pos_embed": torch.zeros(1, 51, 32)}}), ValueError,
                 "pos_embed.*square grid", id="vim-pos_embed-not-square"),
    pytest.param("test_vim", lambda tmp: _file(tmp, {"layers.0.mixer.x_proj.weight": torch.zeros(3, 64)}),
                 ValueError, r"layers\.0\.mixer\.x_proj\.weight has shape \(3, 64\)", id="vim-x_proj-rows"),
    pytest.param("test_defocus_mamba", lambda tmp: _file(tmp, _with(timm.create_model("test_defocus_mamba"),
                                                                    cls_token=torch.zeros(1, 2, 32))),
                 ValueError, r"cls_token: checkpoint \(1, 2, 32\) vs model \(1, 1, 32\)", id="defocus-cls_token-shape"),
]


@pytest.mark.parametrize("name, make_file, error, message", CHECKPOINTS)
def test_bad_checkpoint_files(tmp_path, name, make_file, error, message):
    path = make_file(tmp_path)
    with pytest.raises(error, match=message):
        timm.create_model(name, pretrained_file=path)


def test_pretrained_file_and_pretrained_flag_together(tmp_path):
    path = _file(tmp_path, timm.create_model("test_vim").state_dict())
    with pytest.raises(ValueError, match="pretrained_file"):
        timm.create_model("test_vim", pretrained=True, pretrained_file=path,
                          pretrained_cfg_overlay=dict(file=path))


def test_load_checkpoint_rejects_a_model_without_a_loader(tmp_path):
    path = _file(tmp_path, {"weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="Linear"):
        load_checkpoint(torch.nn.Linear(2, 2), path)


# ---- valid edge cases give the reference result ----

@pytest.mark.parametrize("name", ["test_vim", "test_defocus_mamba"])
def test_rectangular_image_tokens_are_the_patch_convolution(name):
    model = timm.create_model(name, img_size=(32, 16), num_classes=0).eval()
    x = torch.randn(2, 3, 32, 16)
    seen = {}
    model.layers[0].norm.register_forward_hook(lambda m, inp, out: seen.setdefault("tokens", inp[0]))
    assert model(x).shape == (2, 32)
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    assert patches.shape[1] == 8 * 4
    tokens = torch.cat([patches[:, :model.cls_index], model.cls_token.expand(2, -1, -1), patches[:, model.cls_index:]], 1)
    expected = tokens if model.pos_embed is None else tokens + model.pos_embed
    torch.testing.assert_close(seen["tokens"], expected)


def test_single_patch_image_and_batch_of_one():
    model = timm.create_model("test_defocus_mamba", img_size=4, num_classes=5).eval()
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        batch, single = model(x), torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert model.cls_index == 1 and model.forward_features(x).shape == (3, 2, 32)
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)


def test_ddp_prefix_and_non_strict_exact_match_load_silently(tmp_path):
    source = timm.create_model("test_defocus_mamba")
    plain = _file(tmp_path, {"model": source.state_dict()}, "plain.pth")
    ddp = _file(tmp_path, {"model": OrderedDict(("module." + k, v) for k, v in source.state_dict().items())}, "ddp.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact match warns nothing, even when not strict
        a = timm.create_model("test_defocus_mamba", pretrained_file=plain, pretrained_strict=False)
        b = timm.create_model("test_defocus_mamba", pretrained_file=ddp)
    for model in (a, b):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_one_group_spanning_all_channels_normalises_each_token():
    """group_size = d_inner: with D = 0 and a gate of silu(50) = 50, y / 50 has unit mean square per token."""
    branch = DefocusBranch(8, d_state=2, group_size=8).double()
    with torch.no_grad():
        branch.D.zero_()
    x, dt = 100 * torch.randn(1, 8, 5, dtype=torch.float64), torch.randn(1, 8, 5, dtype=torch.float64)  # y >> eps
    B, C = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    y = branch.scan(x, dt, B, C, torch.full((1, 8, 5), 50.0, dtype=torch.float64)) / 50
    torch.testing.assert_close(y.square().mean(1), torch.ones(1, 5, dtype=torch.float64), rtol=1e-4, atol=1e-5)
