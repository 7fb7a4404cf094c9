"""Sequence model and every mixer: causality, the attention mixer against a masked softmax, tiny runs that learn."""
import pytest
import torch
import torch.nn.functional as F

from mambacl.backbones import MIXERS, VisionMamba
from mambacl.backbones.seq_lm import SEQ_MIXERS, CausalSelfAttention, SeqLM
from mambacl.benchmarks.mqar import multiquery_ar

MIXER_KWARGS = {"bmojo": dict(window=3, memory_size=2, n_heads=2)}


def make_mixer(name: str, d_model: int = 8):
    if name == "attention":
        return CausalSelfAttention(d_model, n_heads=2)
    return MIXERS[name](d_model, d_state=4, scan_impl="chunk", **MIXER_KWARGS.get(name, {}))


@pytest.mark.parametrize("name", SEQ_MIXERS)
def test_mixer_is_causal(name):
    mixer = make_mixer(name).double()
    hidden = torch.randn(2, 19, 8, dtype=torch.float64)
    changed = hidden.clone()
    changed[:, 11:] = torch.randn(2, 8, 8, dtype=torch.float64)
    out, out_changed = mixer(hidden), mixer(changed)
    torch.testing.assert_close(out[:, :11], out_changed[:, :11], rtol=0, atol=1e-12)
    assert (out[:, 11:] - out_changed[:, 11:]).abs().max() > 1e-3


def test_attention_matches_masked_softmax():
    attn = CausalSelfAttention(8, n_heads=2).double()
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    q, k, v = (h @ w.T for w in attn.qkv.weight.double().chunk(3))
    out = torch.zeros_like(h)
    for head in range(2):
        sl = slice(4 * head, 4 * head + 4)
        logits = (q[..., sl] @ k[..., sl].transpose(1, 2)) / 2.0
        logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        out[..., sl] = logits.softmax(-1) @ v[..., sl]
    torch.testing.assert_close(attn(h), out @ attn.out_proj.weight.double().T)


@pytest.mark.parametrize("name", ["gdssm", "bmojo"])
def test_seq_lm_learns_mqar(name):
    inputs, labels = multiquery_ar(32, 32, 16, seed=0, num_kv_pairs=2)
    model = SeqLM(32, d_model=16, n_layers=2, mixer=name, d_state=4, n_heads=2, scan_impl="chunk",
                  mixer_kwargs=dict(window=4, memory_size=2, n_heads=2) if name == "bmojo" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.parametrize("name", ["gdssm", "bmojo"])
def test_new_mixers_in_vision_mamba(name):
    model = VisionMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=8, d_state=4, num_classes=3,
                        mixer=name)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert model.layers[0].mixer.bwd is not None


def test_seq_lm_errors():
    with pytest.raises(ValueError, match="mixer"):
        SeqLM(10, mixer="rnn")
    with pytest.raises(ValueError, match="tokens"):
        SeqLM(10, d_model=8, mixer="attention", n_heads=2)(torch.randn(1, 3))
