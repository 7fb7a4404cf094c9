"""Official Vim checkpoint layout: loading, x_proj split, pos_embed resampling, head replacement, errors."""
import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import mambacl.backbones  # noqa: F401
from mambacl.backbones import checkpoint_filter_fn, load_checkpoint

DIM, DEPTH, N = 32, 2, 16
D_INNER, R = 2 * DIM, math.ceil(DIM / 16)


def official_state_dict(grid: int, num_classes: int = 1000) -> dict:
    """Random tensors under the exact key names and shapes of hustvl/Vim (backbones.md section 2)."""
    sd = {"patch_embed.proj.weight": torch.randn(DIM, 3, 4, 4), "patch_embed.proj.bias": torch.randn(DIM),
          "cls_token": torch.randn(1, 1, DIM), "pos_embed": torch.randn(1, grid * grid + 1, DIM),
          "norm_f.weight": torch.rand(DIM) + 0.5, "head.weight": torch.randn(num_classes, DIM),
          "head.bias": torch.randn(num_classes)}
    for i in range(DEPTH):
        p = f"layers.{i}.mixer."
        sd[p + "in_proj.weight"] = torch.randn(2 * D_INNER, DIM) / DIM ** 0.5
        sd[p + "out_proj.weight"] = torch.randn(DIM, D_INNER) / D_INNER ** 0.5
        for s in ("", "_b"):
            sd[p + f"conv1d{s}.weight"] = torch.randn(D_INNER, 1, 4) / 2
            sd[p + f"conv1d{s}.bias"] = torch.randn(D_INNER) / 2
            sd[p + f"x_proj{s}.weight"] = torch.randn(R + 2 * N, D_INNER) / D_INNER ** 0.5
            sd[p + f"dt_proj{s}.weight"] = torch.randn(D_INNER, R) / R ** 0.5
            sd[p + f"dt_proj{s}.bias"] = torch.randn(D_INNER) - 3
            sd[p + ("A_log" if s == "" else "A_b_log")] = torch.log(torch.arange(1, N + 1.0)).repeat(D_INNER, 1)
            sd[p + f"D{s}"] = torch.randn(D_INNER)
        sd[f"layers.{i}.norm.weight"] = torch.rand(DIM) + 0.5
    return sd


def _save(tmp_path, sd, name="vim.pth", with_args=True):
    path = tmp_path / name
    ckpt = {"model": sd, "epoch": 299}
    if with_args:
        ckpt["args"] = argparse.Namespace(model="vim_tiny", lr=5e-4)
    torch.save(ckpt, path)
    return path


def _check_loaded(model, sd):
    for i in range(DEPTH):
        mixer, p = model.layers[i].mixer, f"layers.{i}.mixer."
        for branch, s, a, d in ((mixer.fwd, "", "A_log", "D"), (mixer.bwd, "_b", "A_b_log", "D_b")):
            x_proj = sd[p + f"x_proj{s}.weight"]
            torch.testing.assert_close(branch.x_proj_dt.weight, x_proj[:R])
            torch.testing.assert_close(branch.x_proj_B.weight, x_proj[R:R + N])
            torch.testing.assert_close(branch.x_proj_C.weight, x_proj[R + N:])
            torch.testing.assert_close(branch.conv1d.weight, sd[p + f"conv1d{s}.weight"])
            torch.testing.assert_close(branch.dt_proj.bias, sd[p + f"dt_proj{s}.bias"])
            torch.testing.assert_close(branch.A_log, sd[p + a])
            torch.testing.assert_close(branch.D, sd[p + d])
        torch.testing.assert_close(mixer.in_proj.weight, sd[p + "in_proj.weight"])
        torch.testing.assert_close(model.layers[i].norm.weight, sd[f"layers.{i}.norm.weight"])


def test_official_checkpoint_round_trip(tmp_path, direct):
    sd = official_state_dict(grid=8)
    path = _save(tmp_path, sd)
    model = timm.create_model("test_vim", pretrained_file=path)
    _check_loaded(model, sd)
    assert model.pretrained_source == str(path)
    assert not hasattr(timm.create_model("test_vim"), "pretrained_source")  # never loaded: no source
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"])
    torch.testing.assert_close(model.head.weight, sd["head.weight"])
    # the loaded mixer computes the official block: check one against the hand-written float64 reference
    hidden = torch.randn(2, 65, DIM)
    expected, _ = direct(model.layers[1].mixer, hidden)
    torch.testing.assert_close(model.layers[1].mixer(hidden).double(), expected, rtol=1e-4, atol=1e-5)
    # native state dicts pass through the filter unchanged
    native = model.state_dict()
    filtered = checkpoint_filter_fn(native, model)
    assert filtered.keys() == native.keys() and all(filtered[k] is native[k] for k in native)


def test_timm_pretrained_cfg_overlay_file(tmp_path):
    sd = official_state_dict(grid=8)
    path = _save(tmp_path, sd, with_args=False)
    model = timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _check_loaded(model, sd)
    assert model.pretrained_source == str(path)


def test_pos_embed_resample_keeps_middle_cls_row(tmp_path):
    sd = official_state_dict(grid=4, num_classes=10)
    model = timm.create_model("test_vim", num_classes=10, pretrained_file=_save(tmp_path, sd))  # 32 px: 8x8 grid
    old = sd["pos_embed"]
    cls_old, patches_old = old[:, 8], torch.cat([old[:, :8], old[:, 9:]], 1)
    grid = patches_old.reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 64, DIM)
    assert model.pos_embed.shape == (1, 65, DIM) and model.cls_index == 32
    torch.testing.assert_close(model.pos_embed[:, 32], cls_old)
    torch.testing.assert_close(torch.cat([model.pos_embed[:, :32], model.pos_embed[:, 33:]], 1), expected)
    _check_loaded(model, sd)


def test_head_of_another_size_is_replaced(tmp_path):
    sd = official_state_dict(grid=8)
    model = timm.create_model("test_vim", num_classes=7, pretrained_file=_save(tmp_path, sd))
    assert model.head.weight.shape == (7, DIM)
    assert not torch.equal(model.head.weight, sd["head.weight"][:7])
    _check_loaded(model, sd)
    headless = timm.create_model("test_vim", num_classes=0, pretrained_file=_save(tmp_path, sd))
    assert headless(torch.randn(1, 3, 32, 32)).shape == (1, DIM)


def test_rgb_checkpoint_into_one_channel_model(tmp_path):
    sd = official_state_dict(grid=8)
    model = timm.create_model("test_vim", in_chans=1, pretrained_file=_save(tmp_path, sd))
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    _check_loaded(model, sd)


def test_wrong_shape_raises_naming_the_key(tmp_path):
    sd = official_state_dict(grid=8)
    sd["layers.1.mixer.x_proj_b.weight"] = torch.randn(R + N, D_INNER)
    with pytest.raises(ValueError, match=r"layers\.1\.mixer\.x_proj_b\.weight"):
        timm.create_model("test_vim", pretrained_file=_save(tmp_path, sd))
    sd = official_state_dict(grid=8)
    sd["layers.0.mixer.A_log"] = torch.randn(D_INNER, 8)
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.fwd\.A_log"):
        timm.create_model("test_vim", pretrained_file=_save(tmp_path, sd))


def test_missing_and_unexpected_keys(tmp_path):
    sd = official_state_dict(grid=8)
    del sd["layers.0.mixer.D_b"]
    sd["layers.0.mixer.extra.weight"] = torch.zeros(3)
    path = _save(tmp_path, sd)
    with pytest.raises(ValueError, match=r"missing keys \['layers\.0\.mixer\.bwd\.D'\].*unexpected keys "
                                         r"\['layers\.0\.mixer\.extra\.weight'\]"):
        timm.create_model("test_vim", pretrained_file=path)
    with pytest.warns(UserWarning, match=r"missing keys \['layers\.0\.mixer\.bwd\.D'\].*unexpected keys "
                                         r"\['layers\.0\.mixer\.extra\.weight'\]"):
        model = timm.create_model("test_vim", pretrained_file=path, pretrained_strict=False)
    torch.testing.assert_close(model.layers[0].mixer.bwd.D, torch.ones(D_INNER))  # kept at init
    torch.testing.assert_close(model.layers[0].mixer.fwd.D, sd["layers.0.mixer.D"])
    assert model.pretrained_source == str(path)


def test_load_checkpoint_into_an_existing_model_records_the_source(tmp_path):
    sd = official_state_dict(grid=8)
    path = _save(tmp_path, sd)
    model = timm.create_model("test_vim")
    assert load_checkpoint(model, path) is model and model.pretrained_source == str(path)
    _check_loaded(model, sd)
