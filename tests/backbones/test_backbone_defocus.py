"""De-focus Mamba: the authors' architecture facts, the mixer against a float64 hand computation, taps, init, timm."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import mambacl.backbones  # noqa: F401  (registers the models)
from mambacl.backbones import DefocusBranch, DefocusMamba, DefocusMixer, MambaBranch, VisionMamba, record_taps

_REAL_EMPTY = torch.empty  # captured before tests/conftest.py's NaN-poisoning wrapper is installed


@pytest.fixture
def meta(monkeypatch):
    """torch.device('meta') context; the poisoning wrapper of torch.empty escapes the device mode, so undo it."""
    monkeypatch.setattr(torch, "empty", _REAL_EMPTY)
    return torch.device("meta")


def _defocus_param_count(dim: int, depth: int, d_inner: int, dt_rank: int, patches: int, classes: int,
                         n: int = 16, patch: int = 16) -> int:
    """Closed-form count of the authors' modules (mamba_block.py:72-107, defocus_attention_network.py:72-113)."""
    mixer = (dim * 2 * d_inner + d_inner * 4 + d_inner + d_inner * (dt_rank + 2 * n) + dt_rank * d_inner + d_inner
             + d_inner * n + d_inner + d_inner * dim + n)  # in_proj conv x_proj dt_proj A_log D out_proj freq
    stem = 3 * patch * patch * dim + dim + dim  # patch conv + cls token (no pos_embed)
    return depth * (mixer + dim) + stem + 2 * dim + dim * classes + classes


def test_large_matches_the_authors_config(meta):
    with meta:
        model = timm.create_model("defocus_mamba_large_patch16_192")
    assert isinstance(model, DefocusMamba) and isinstance(model, VisionMamba)
    assert len(model.layers) == 48 and model.embed_dim == 1024 and model.patch_embed.grid_size == (12, 12)
    assert model.pos_embed is None and model.cls_index == 144 and model.num_prefix_tokens == 1  # 145 tokens
    assert isinstance(model.norm_f, torch.nn.LayerNorm) and model.norm_f.eps == 1e-6
    assert model.layers[0].norm.eps == 1e-5
    mixer = model.layers[0].mixer
    assert isinstance(mixer, DefocusMixer) and mixer.bwd is None and mixer.d_inner == 2048
    branch = mixer.fwd
    assert (branch.dt_rank, branch.d_state, branch.group_size, branch.conv1d.kernel_size) == (48, 16, 64, (4,))
    assert branch.delta_scale_factor == 1.0 and branch.rope_scale_factor == 1.0
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and branch.conv1d.bias is not None
    assert model.pretrained_cfg["input_size"] == (3, 192, 192)


def test_parameter_count_matches_published(meta):
    with meta:
        model = timm.create_model("defocus_mamba_large_patch16_192")
    count = sum(p.numel() for p in model.parameters())
    assert count == _defocus_param_count(1024, 48, 2048, 48, 144, 1000) == 318_699_240
    # OpenGVLab's README gives 330.1M for the fine-tuned model, whose two heads (head, aux head2) are
    # Linear(1024, 3072)-Tanh-Linear(3072, 1000) (IN22kto1k_cls) instead of our one Linear(1024, 1000).
    mlp_head = 1024 * 3072 + 3072 + 3072 * 1000 + 1000
    published = count - (1024 * 1000 + 1000) + 2 * mlp_head
    assert abs(published - 330.1e6) / 330.1e6 < 2e-4


def test_registered_tiny_variant_forward_backward():
    model = timm.create_model("test_defocus_mamba", num_classes=10, drop_path_rate=0.1)
    assert sum(p.numel() for p in model.parameters()) == _defocus_param_count(32, 2, 64, 4, 64, 10, patch=4)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[0].mixer.fwd.freq.grad.abs().sum() > 0  # RoPE really enters the computation


def _mixer(delta_scale_factor=2.0, rope_scale_factor=4.0, scan_impl="chunk"):
    mixer = DefocusMixer(8, d_state=4, dt_rank=2, group_size=4, delta_scale_factor=delta_scale_factor,
                         rope_scale_factor=rope_scale_factor, scan_impl=scan_impl).double()
    with torch.no_grad():  # move parameters off their structured init so every term matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize("scan_impl", ["chunk", "reference"])
@pytest.mark.parametrize("factors", [(1.0, 1.0), (2.0, 4.0)], ids=["mambacl", "384px-finetune"])
def test_mixer_matches_direct_computation(scan_impl, factors, direct):
    mixer = _mixer(*factors, scan_impl=scan_impl)
    hidden = torch.randn(2, 13, 8, dtype=torch.float64)
    expected, _ = direct(mixer, hidden)
    torch.testing.assert_close(mixer(hidden), expected, rtol=1e-9, atol=1e-10)


def test_taps_show_what_the_authors_tap(direct):
    """tap_x = silu(conv(x)); tap_delta = softplus(dt + b) / delta_scale_factor; tap_out = gated group-normed y."""
    mixer = _mixer()
    hidden = torch.randn(2, 7, 8, dtype=torch.float64)
    _, expected = direct(mixer, hidden)
    with record_taps(mixer, ("tap_x", "tap_delta", "tap_delta_x", "tap_out")) as rec:
        mixer(hidden)
    x, delta = rec["fwd.tap_x"][0], rec["fwd.tap_delta"][0]
    torch.testing.assert_close(x, expected["fwd"]["x"])
    torch.testing.assert_close(delta, expected["fwd"]["delta"])
    plain = F.softplus(x @ mixer.fwd.x_proj_dt.weight.T @ mixer.fwd.dt_proj.weight.T + mixer.fwd.dt_proj.bias)
    torch.testing.assert_close(delta, plain / 2.0)  # the scale factor is applied before the tap
    loop = torch.stack([sum(delta[b, t, :, None] * x[b, t, None, :] for t in range(7)) for b in range(2)])
    torch.testing.assert_close(rec["fwd.tap_delta_x"][0], loop)
    torch.testing.assert_close(rec["tap_out"][0], expected["out"])


def test_rope_rotates_pairs_with_the_authors_frequencies():
    branch = DefocusBranch(8, d_state=6, group_size=4)
    n = torch.arange(1, 7, dtype=torch.float64) / 6
    torch.testing.assert_close(branch.freq.double(), (100 ** -n - 0.01) / 0.99, rtol=1e-6, atol=1e-7)
    assert branch.freq[-1].abs() < 1e-7  # the last frequency is zero: that state dimension is not rotated
    B = torch.randn(2, 6, 9)
    rotated = branch.rope(B)
    torch.testing.assert_close(rotated[:, :, 0], B[:, :, 0])  # position 0: identity
    torch.testing.assert_close(rotated[:, -1], B[:, -1])  # the last (odd) element has angle 0 at every position
    t, k = 5, 2  # one element by hand: out[2k] = B[2k] cos(t f_2k) - B[2k+1] sin(t f_2k)
    a = t * branch.freq[2 * k]
    torch.testing.assert_close(rotated[0, 2 * k, t], B[0, 2 * k, t] * a.cos() - B[0, 2 * k + 1, t] * a.sin())


def test_cls_token_last_and_no_position_embedding():
    model = timm.create_model("test_defocus_mamba", num_classes=3).eval()
    seen = {}
    model.layers[0].norm.register_forward_hook(lambda m, inp, out: seen.setdefault("tokens", inp[0]))
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    expected = torch.cat([model.patch_embed(x), model.cls_token.expand(2, -1, -1)], 1)
    torch.testing.assert_close(seen["tokens"], expected)  # no pos_embed added
    assert feats.shape == (2, 65, 32)
    torch.testing.assert_close(model(x), model.head(feats[:, -1]))


def test_init_follows_the_authors():
    torch.manual_seed(0)
    model = DefocusMamba(img_size=16, patch_size=4, depth=3, embed_dim=64, dt_rank=8, group_size=16, num_classes=5)
    branch = model.layers[1].mixer.fwd
    dt = torch.exp(torch.linspace(math.log(1e-3), math.log(0.1), 128))  # deterministic, log-spaced
    torch.testing.assert_close(F.softplus(branch.dt_proj.bias), dt, rtol=1e-5, atol=1e-8)
    assert branch.dt_proj.weight.abs().max() <= 8 ** -0.5 and branch.dt_proj.weight.std() > 0.25 * 8 ** -0.5
    torch.testing.assert_close(branch.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    torch.testing.assert_close(branch.D, torch.ones(128))
    out_proj = model.layers[2].mixer.out_proj.weight  # trunc-normal 0.02, not divided by sqrt(depth)
    assert abs(out_proj.std().item() - 0.02) < 0.002
    for w in (model.layers[0].mixer.in_proj.weight, branch.x_proj_B.weight, model.head.weight):
        assert abs(w.std().item() - 0.02) < 0.004
    assert torch.equal(model.head.bias, torch.zeros(5))
    torch.testing.assert_close(model.norm_f.weight, torch.ones(64))


def test_dt_init_is_log_spaced_for_defocus_and_random_for_mamba():
    mamba = [MambaBranch(32).dt_proj.bias for _ in range(2)]
    defocus = [DefocusBranch(32, group_size=8).dt_proj.bias for _ in range(2)]
    assert not torch.equal(*mamba) and torch.equal(*defocus)


def test_full_width_block_at_192px_matches_direct_computation(direct):
    """One block at the real sizes (145 tokens, d_inner 2048, 32 groups of 64, dt_rank 48)."""
    model = timm.create_model("defocus_mamba_large_patch16_192", depth=1, num_classes=0).eval()
    mixer, seen = model.layers[0].mixer, {}
    mixer.register_forward_hook(lambda m, inp, out: seen.update(hidden=inp[0], out=out))
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 192, 192))
    assert feats.shape == (1, 145, 1024) and seen["hidden"].shape == (1, 145, 1024)
    expected, _ = direct(mixer, seen["hidden"].double())
    torch.testing.assert_close(seen["out"].double(), expected, rtol=1e-4, atol=1e-5)


def test_rope_keeps_float32_angles_under_bf16_autocast():
    """B and C are rotated by angles l * freq up to L - 1 = 144 at 192 px: in bf16 those angles would be off by up
    to ~0.4 rad; the rotation is computed in float32 and only its result is cast."""
    import timm
    model = timm.create_model("test_defocus_mamba", num_classes=0).eval()
    branch = next(m for m in model.modules() if hasattr(m, "rope"))
    t = torch.randn(2, branch.d_state, 145)
    exact = branch.rope(t.double().float())
    rotated_bf16 = branch.rope(t.to(torch.bfloat16)).float()
    # only the input and output roundings to bf16 remain (relative ~2**-8 each)
    assert ((rotated_bf16 - exact).norm() / exact.norm()) < 1e-2
