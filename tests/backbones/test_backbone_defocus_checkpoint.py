"""The published De-focus Mamba checkpoint layout (defocus_mamba_large_cls_21k.pth) at tiny sizes: loading and
the loaded model against a float64 forward written from the authors' equations on their own key names."""
import pytest
import timm
import torch
import torch.nn.functional as F
from backbone_refs import causal_conv_direct, group_rms_direct, rope_direct

import mambacl.backbones  # noqa: F401
from mambacl.backbones import load_checkpoint
from mambacl.kernels import selective_scan_ref

DIM, DEPTH, N, D_INNER, R, GROUP, PATCH, CLASSES = 32, 2, 16, 64, 4, 16, 4, 21841 // 100


def official_state_dict() -> dict:
    """Random tensors under the key names and shapes of the authors' modules (mamba-cl utils/mamba_block.py:72-107,
    utils/defocus_attention_network.py:72-127 with OpenGVLab's 22k config: IN22k_cls MLP heads and aux head2)."""
    sd = {"patch_embed.proj.weight": torch.randn(DIM, 3, PATCH, PATCH) / 7, "patch_embed.proj.bias": torch.randn(DIM),
          "cls_token": torch.randn(1, 1, DIM), "norm.weight": torch.rand(DIM) + 0.5, "norm.bias": torch.randn(DIM)}
    for head in ("head", "head2"):
        sd.update({f"{head}.0.weight": torch.randn(3 * DIM, DIM), f"{head}.0.bias": torch.randn(3 * DIM),
                   f"{head}.2.weight": torch.randn(CLASSES, 3 * DIM), f"{head}.2.bias": torch.randn(CLASSES)})
    freq = (100 ** -(torch.arange(1, N + 1) / N) - 0.01) / 0.99
    for i in range(DEPTH):
        p = f"blocks.{i}.mixer."
        sd[f"blocks.{i}.norm.weight"] = torch.rand(DIM) + 0.5
        sd[p + "in_proj.weight"] = torch.randn(2 * D_INNER, DIM) / DIM ** 0.5
        sd[p + "conv1d.weight"] = torch.randn(D_INNER, 1, 4) / 2
        sd[p + "conv1d.bias"] = torch.randn(D_INNER) / 2
        sd[p + "x_proj.weight"] = torch.randn(R + 2 * N, D_INNER) / D_INNER ** 0.5
        sd[p + "dt_proj.weight"] = torch.randn(D_INNER, R) / R ** 0.5
        sd[p + "dt_proj.bias"] = torch.randn(D_INNER) - 3
        sd[p + "A_log"] = torch.log(torch.arange(1, N + 1.0)).repeat(D_INNER, 1) + 0.1 * torch.randn(D_INNER, N)
        sd[p + "D"] = torch.randn(D_INNER)
        sd[p + "out_proj.weight"] = torch.randn(DIM, D_INNER) / D_INNER ** 0.5
        sd[p + "freq"] = freq * (1 + 0.2 * torch.rand(N))
    return sd


def official_forward(sd: dict, images: torch.Tensor, delta_scale: float = 1.0, rope_scale: float = 1.0) -> torch.Tensor:
    """The authors' forward_features before pooling (defocus_attention_network.py:204-226, mamba_block.py:131-264),
    from their state dict, in float64. Returns the final LayerNorm tokens ``[b, patches + 1, DIM]``."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([x, sd["cls_token"].expand(x.shape[0], -1, -1)], dim=1)  # cls appended last, no pos_embed
    for i in range(DEPTH):
        p = f"blocks.{i}.mixer."
        h = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * sd[f"blocks.{i}.norm.weight"]
        u, z = (h @ sd[p + "in_proj.weight"].T).transpose(1, 2).chunk(2, dim=1)
        u = F.silu(causal_conv_direct(u, sd[p + "conv1d.weight"], sd[p + "conv1d.bias"]))
        dt_low, B, C = (u.transpose(1, 2) @ sd[p + "x_proj.weight"].T).split([R, N, N], dim=-1)
        delta = F.softplus(sd[p + "dt_proj.weight"] @ dt_low.transpose(1, 2) + sd[p + "dt_proj.bias"][:, None])
        B, C = (rope_direct(t.transpose(1, 2), sd[p + "freq"], rope_scale) for t in (B, C))
        y = selective_scan_ref(u, delta / delta_scale, -torch.exp(sd[p + "A_log"]), B, C)
        y = (group_rms_direct(y, GROUP) + u * sd[p + "D"][:, None]) * F.silu(z)
        x = x + y.transpose(1, 2) @ sd[p + "out_proj.weight"].T
    return F.layer_norm(x, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def _save(tmp_path, sd, name="defocus_mamba_large_cls_21k.pth"):
    path = tmp_path / name
    torch.save({"model": sd, "model_ema": sd, "epoch": 89}, path)
    return path


def _check_loaded(model, sd):
    for i in range(DEPTH):
        mixer, p = model.layers[i].mixer, f"blocks.{i}.mixer."
        branch = mixer.fwd
        torch.testing.assert_close(branch.x_proj_dt.weight, sd[p + "x_proj.weight"][:R])
        torch.testing.assert_close(branch.x_proj_B.weight, sd[p + "x_proj.weight"][R:R + N])
        torch.testing.assert_close(branch.x_proj_C.weight, sd[p + "x_proj.weight"][R + N:])
        for native, key in ((branch.conv1d.weight, "conv1d.weight"), (branch.dt_proj.bias, "dt_proj.bias"),
                            (branch.A_log, "A_log"), (branch.D, "D"), (branch.freq, "freq"),
                            (mixer.in_proj.weight, "in_proj.weight"), (mixer.out_proj.weight, "out_proj.weight")):
            torch.testing.assert_close(native, sd[p + key])
        torch.testing.assert_close(model.layers[i].norm.weight, sd[f"blocks.{i}.norm.weight"])
    torch.testing.assert_close(model.norm_f.bias, sd["norm.bias"])
    torch.testing.assert_close(model.cls_token, sd["cls_token"])


def test_official_checkpoint_loads_and_computes_the_authors_forward(tmp_path):
    sd = official_state_dict()
    path = _save(tmp_path, sd)
    model = timm.create_model("test_defocus_mamba", num_classes=5, pretrained_file=path).eval()
    _check_loaded(model, sd)
    assert model.pretrained_source == str(path)
    assert model.head.weight.shape == (5, DIM)  # the 21k MLP head does not fit and is replaced
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(images)
        pooled = model.forward_head(feats, pre_logits=True)
    expected = official_forward(sd, images)
    torch.testing.assert_close(feats.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled.double(), expected[:, -1], rtol=1e-4, atol=1e-4)  # cls token pooled
    # the native state dict round-trips through the filter unchanged
    native = model.state_dict()
    again = timm.create_model("test_defocus_mamba", num_classes=5)
    load_checkpoint(again, _save(tmp_path, native, "native.pth"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in native.items())


def test_timm_overlay_file_loads_the_same_weights(tmp_path):
    sd = official_state_dict()
    path = _save(tmp_path, sd)
    direct = timm.create_model("test_defocus_mamba", num_classes=0, pretrained_file=path)
    overlay = timm.create_model("test_defocus_mamba", num_classes=0, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)))
    assert overlay.pretrained_source == str(path) == direct.pretrained_source
    assert overlay.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(overlay.state_dict()[k], v) for k, v in direct.state_dict().items())


def test_other_image_size_and_scale_factors_use_the_same_weights(tmp_path):
    """No position embedding to resample: RoPE runs over the new token count with the checkpoint's freq."""
    sd = official_state_dict()
    model = timm.create_model("test_defocus_mamba", img_size=16, delta_scale_factor=2.0, rope_scale_factor=4.0,
                              pretrained_file=_save(tmp_path, sd)).eval()
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(images)
    assert feats.shape == (1, 17, DIM)
    torch.testing.assert_close(feats.double(), official_forward(sd, images, 2.0, 4.0), rtol=1e-4, atol=1e-4)


def test_mambacl_split_layout_loads(tmp_path):
    """After Mamba-CL's split_parameters() (mamba_block.py:115-123) x_proj is x_proj_step / x_proj_B / x_proj_C."""
    sd = official_state_dict()
    for i in range(DEPTH):
        p = f"blocks.{i}.mixer."
        step, B, C = sd.pop(p + "x_proj.weight").split([R, N, N])
        sd.update({p + "x_proj_step.weight": step, p + "x_proj_B.weight": B, p + "x_proj_C.weight": C})
    model = timm.create_model("test_defocus_mamba", pretrained_file=_save(tmp_path, sd))
    torch.testing.assert_close(model.layers[1].mixer.fwd.x_proj_dt.weight, sd["blocks.1.mixer.x_proj_step.weight"])
    torch.testing.assert_close(model.layers[1].mixer.fwd.x_proj_C.weight, sd["blocks.1.mixer.x_proj_C.weight"])


def test_missing_and_unexpected_keys_raise_when_strict_and_warn_otherwise(tmp_path):
    sd = official_state_dict()
    del sd["blocks.1.mixer.freq"]
    sd["pos_embed"] = torch.zeros(1, 64, DIM)  # the authors' model has none (use_pos_embed False)
    path = _save(tmp_path, sd)
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.mixer\.fwd\.freq'\], unexpected keys "
                                         r"\['pos_embed'\]"):
        timm.create_model("test_defocus_mamba", pretrained_file=path)
    with pytest.warns(UserWarning, match=r"missing keys \['layers\.1\.mixer\.fwd\.freq'\].*\['pos_embed'\]"):
        model = timm.create_model("test_defocus_mamba", pretrained_file=path, pretrained_strict=False)
    fresh = timm.create_model("test_defocus_mamba")
    torch.testing.assert_close(model.layers[1].mixer.fwd.freq, fresh.layers[1].mixer.fwd.freq)  # kept at init
    torch.testing.assert_close(model.layers[0].mixer.fwd.freq, sd["blocks.0.mixer.freq"])
    assert model.pretrained_source == str(path)


def test_wrong_shape_names_the_key(tmp_path):
    sd = official_state_dict()
    sd["blocks.0.mixer.x_proj.weight"] = torch.randn(R + N, D_INNER)
    with pytest.raises(ValueError, match=r"blocks\.0\.mixer\.x_proj\.weight"):
        timm.create_model("test_defocus_mamba", pretrained_file=_save(tmp_path, sd))
    sd = official_state_dict()
    sd["blocks.1.mixer.freq"] = torch.randn(N // 2)
    with pytest.raises(ValueError, match=r"layers\.1\.mixer\.fwd\.freq: checkpoint \(8,\) vs model \(16,\)"):
        timm.create_model("test_defocus_mamba", pretrained_file=_save(tmp_path, sd))
