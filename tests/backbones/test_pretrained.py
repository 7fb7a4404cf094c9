"""The packaged test_vim.glyphs checkpoint: checksum, loading through timm and by path, and the errors."""
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

import mambacl.backbones  # noqa: F401  (registers test_vim and its glyphs tag)
from mambacl.backbones import pretrained
from mambacl.backbones.pretrained import PACKAGED_WEIGHTS, packaged_path, pretrained_file, sha256_file

TAG = "test_vim.glyphs"
SHAPE = dict(img_size=8, patch_size=2, in_chans=1)


def test_packaged_file_has_its_recorded_checksum_and_is_small():
    path = pretrained_file(TAG)
    assert path == packaged_path(TAG) and sha256_file(path) == PACKAGED_WEIGHTS[TAG][1]
    assert path.stat().st_size < 1_000_000


@pytest.mark.parametrize("route", ["timm-tag", "pretrained-file"])
def test_every_tensor_of_the_file_is_loaded(route):
    stored = load_file(str(pretrained_file(TAG)))
    if route == "timm-tag":
        model = timm.create_model(TAG, pretrained=True, **SHAPE)
    else:
        model = timm.create_model("test_vim", num_classes=0, pretrained_file=pretrained_file(TAG), **SHAPE)
    state = model.state_dict()
    assert sorted(state) == sorted(stored) and model.num_classes == 0
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 32)


def test_a_head_is_added_at_its_init_and_the_backbone_loaded():
    stored = load_file(str(pretrained_file(TAG)))
    model = timm.create_model(TAG, pretrained=True, num_classes=10, **SHAPE)
    assert model.head.weight.shape == (10, 32) and torch.all(model.head.bias == 0)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in stored.items())


def test_the_checkpoint_is_not_an_initialisation():
    stored = load_file(str(pretrained_file(TAG)))
    init = timm.create_model("test_vim", num_classes=0, **SHAPE).state_dict()
    # Mamba's deterministic inits (A_log = log 1..N, D = 1) must have moved in training
    for name in ("layers.0.mixer.fwd.A_log", "layers.1.mixer.bwd.D", "layers.0.mixer.out_proj.weight"):
        assert (stored[name] - init[name]).abs().max() > 1e-3, name


def test_modified_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / PACKAGED_WEIGHTS[TAG][0]
    shutil.copy(packaged_path(TAG), copy)
    with open(copy, "r+b") as f:  # flip one byte of the last tensor
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        pretrained_file(TAG)
    with pytest.raises(ValueError, match="sha256"):  # so does the timm route (the tag's custom_load loader)
        timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(copy), custom_load=True),
                          **SHAPE)


def test_missing_file_and_unknown_name(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="name"):
        pretrained_file("test_vim.imagenet")
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="reinstall"):
        pretrained_file(TAG)


def test_plain_test_vim_keeps_its_untagged_random_init_cfg():
    model = timm.create_model("test_vim")  # the glyphs tag has weights but must not become the default
    assert model.num_classes == 1000 and model.patch_embed.proj.in_channels == 3
    assert not model.pretrained_cfg.get("file") and model.pretrained_cfg["input_size"] == (3, 32, 32)
