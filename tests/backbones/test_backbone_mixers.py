"""Mamba / bidirectional Mamba / Longhorn mixers against a hand-written float64 computation, and the taps."""
import pytest
import torch

from mambacl.backbones import (
    LonghornMixer,
    MambaMixer,
    SSMBranch,
    SSMMixer,
    Tap,
    record_taps,
    register_mixer,
    ssm_param_groups,
)

MIXER_CASES = [
    pytest.param(MambaMixer, False, id="mamba"),
    pytest.param(MambaMixer, True, id="bimamba"),
    pytest.param(LonghornMixer, False, id="longhorn"),
    pytest.param(LonghornMixer, True, id="bilonghorn"),
]


def _mixer(cls, bidirectional, scan_impl="chunk"):
    mixer = cls(8, d_state=4, bidirectional=bidirectional, scan_impl=scan_impl).double()
    with torch.no_grad():  # move parameters off their structured init so every term matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize("cls,bidirectional", MIXER_CASES)
@pytest.mark.parametrize("scan_impl", ["chunk", "reference"])
def test_mixer_matches_direct_computation(cls, bidirectional, scan_impl, direct):
    mixer = _mixer(cls, bidirectional, scan_impl)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64)
    expected, _ = direct(mixer, hidden)
    torch.testing.assert_close(mixer(hidden), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [MambaMixer, LonghornMixer], ids=["mamba", "longhorn"])
def test_bidirectional_is_mean_of_two_directions(cls):
    """out_proj((y_f + flip(y_b(flip x))) / 2), with the backward branch copied into a forward-only mixer."""
    bi = _mixer(cls, True)
    uni_f, uni_b = cls(8, d_state=4).double(), cls(8, d_state=4).double()
    for uni, branch in ((uni_f, bi.fwd), (uni_b, bi.bwd)):
        uni.in_proj.load_state_dict(bi.in_proj.state_dict())
        uni.fwd.load_state_dict(branch.state_dict())
    hidden = torch.randn(2, 9, 8, dtype=torch.float64)
    with record_taps(uni_f, ("tap_out",)) as rec_f, record_taps(uni_b, ("tap_out",)) as rec_b:
        uni_f(hidden)
        uni_b(hidden.flip(1))
    y = (rec_f["tap_out"][0] + rec_b["tap_out"][0].flip(1)) / 2
    torch.testing.assert_close(bi(hidden), y @ bi.out_proj.weight.T, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls,bidirectional", MIXER_CASES)
def test_taps_shapes_values_and_no_side_effect(cls, bidirectional, direct):
    mixer = _mixer(cls, bidirectional)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64)
    plain = mixer(hidden)
    _, expected = direct(mixer, hidden)
    with record_taps(mixer, ("tap_x", "tap_delta", "tap_delta_x", "tap_out")) as rec:
        tapped = mixer(hidden)
    torch.testing.assert_close(tapped, plain, rtol=0, atol=0)
    torch.testing.assert_close(rec["tap_out"][0], expected["out"])
    assert rec["tap_out"][0].shape == (2, 7, 16)
    for name in ["fwd", "bwd"] if bidirectional else ["fwd"]:
        x, delta, fx = rec[f"{name}.tap_x"][0], rec[f"{name}.tap_delta"][0], rec[f"{name}.tap_delta_x"][0]
        assert x.shape == delta.shape == (2, 7, 16) and fx.shape == (2, 16, 16)
        torch.testing.assert_close(x, expected[name]["x"])
        torch.testing.assert_close(delta, expected[name]["delta"])
        loop = torch.stack([sum(delta[b, t, :, None] * x[b, t, None, :] for t in range(7)) for b in range(2)])
        torch.testing.assert_close(fx, loop)


def test_inactive_taps_skip_the_extra_work(monkeypatch):
    mixer = _mixer(MambaMixer, True)
    hidden = torch.randn(1, 5, 8, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(type(mixer.fwd), "step_size", lambda self, dt, B: calls.append(1) or dt)
    assert not mixer.fwd.tap_delta.active
    mixer(hidden)
    assert calls == []
    handle = mixer.fwd.tap_delta_x.register_forward_hook(lambda *a: None)
    assert mixer.fwd.tap_delta_x.active
    mixer(hidden)
    assert calls == [1]
    handle.remove()
    assert not mixer.fwd.tap_delta_x.active


def test_structure_and_init():
    mixer = MambaMixer(32, d_state=16, bidirectional=True)
    assert isinstance(mixer, SSMMixer) and all(isinstance(b, SSMBranch) for b in mixer.branches())
    branch = mixer.bwd
    assert branch.x_proj_dt.weight.shape == (2, 64) and branch.x_proj_B.weight.shape == (16, 64)
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and branch.x_proj_C.bias is None
    assert branch.conv1d.weight.shape == (64, 1, 4) and branch.conv1d.bias is not None
    torch.testing.assert_close(branch.A_log.exp(), torch.arange(1, 17.0).repeat(64, 1))
    dt = torch.nn.functional.softplus(branch.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert all(isinstance(getattr(branch, t), Tap) for t in ("tap_x", "tap_delta", "tap_delta_x"))
    assert not hasattr(LonghornMixer(32).fwd, "A_log")


def test_param_groups_keep_ssm_parameters_undecayed():
    mixer = MambaMixer(16, bidirectional=True)
    groups = ssm_param_groups(mixer, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for branch in mixer.branches():
        assert {id(branch.A_log), id(branch.D), id(branch.dt_proj.bias)} <= no_decay
        assert id(branch.x_proj_B.weight) in decay
    assert id(mixer.in_proj.weight) in decay
    assert len(no_decay | decay) == len(list(mixer.parameters()))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="scan_impl"):
        MambaMixer(8, scan_impl="cuda")
    with pytest.raises(ValueError, match="d_model"):
        MambaMixer(0)
    with pytest.raises(ValueError, match="hidden"):
        MambaMixer(8)(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("mamba")(LonghornMixer)
    with pytest.raises(ValueError, match="suffixes"):
        record_taps(MambaMixer(8), ("tap_nothing",))
