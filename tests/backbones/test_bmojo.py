"""B'MOJO: forward against a per-query float64 oracle that lists each query's keys, memory bound and selection."""
import pytest
import torch

from mambacl.backbones.bmojo import BMojoLayer, BMojoMixer, band


def bmojo_oracle(layer: BMojoLayer, hidden: torch.Tensor) -> torch.Tensor:
    """Query i attends to top-m innovation tokens at p < (i//w - 1) w, SSM outputs [i-2w+1, i-w], inputs [i-w+1, i]."""
    w, m, heads = layer.window, layer.memory_size, layer.n_heads
    fading = layer.ssm(hidden)
    wq, wk, wv, wo = (getattr(layer, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    b, seqlen, d = hidden.shape
    dh = d // heads
    out = torch.zeros(b, seqlen, d, dtype=torch.float64)
    for n in range(b):
        k, v, ks, vs, q = hidden[n] @ wk.T, hidden[n] @ wv.T, fading[n] @ wk.T, fading[n] @ wv.T, hidden[n] @ wq.T
        score = [float(((k[t] - (ks[t - 1] if t else 0)) ** 2).sum()) for t in range(seqlen)]
        for i in range(seqlen):
            eligible = list(range(max(i // w - 1, 0) * w))
            memory = sorted(eligible, key=lambda p: -score[p])[:m]
            keys = [k[p] for p in memory] + [ks[j] for j in range(i - 2 * w + 1, i - w + 1) if j >= 0] \
                + [k[j] for j in range(i - w + 1, i + 1) if j >= 0]
            vals = [v[p] for p in memory] + [vs[j] for j in range(i - 2 * w + 1, i - w + 1) if j >= 0] \
                + [v[j] for j in range(i - w + 1, i + 1) if j >= 0]
            assert len(keys) <= 2 * w + m
            K, V = torch.stack(keys), torch.stack(vals)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                att = torch.softmax(K[:, sl] @ q[i, sl] / dh ** 0.5, 0)
                out[n, i, sl] = att @ V[:, sl]
    return out @ wo.T


@pytest.mark.parametrize("window,memory_size", [(3, 2), (4, 0), (2, 5)], ids=["bmojo", "bmojo-f", "small-window"])
def test_bmojo_matches_oracle(window, memory_size):
    layer = BMojoLayer(8, d_state=4, window=window, memory_size=memory_size, n_heads=2).double()
    hidden = torch.randn(2, 17, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(hidden), bmojo_oracle(layer, hidden), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seqlen", [7, 64, 301])
def test_memory_is_bounded_causal_top_m(seqlen):
    layer = BMojoLayer(8, d_state=4, window=8, memory_size=5, n_heads=2)
    scores = torch.rand(3, seqlen)
    pos, valid = layer.memory(scores)
    n_chunks = -(-seqlen // 8)
    assert pos.shape == valid.shape == (3, n_chunks, 5)
    for c in range(n_chunks):
        limit = max(c - 1, 0) * 8
        for n in range(3):
            chosen = pos[n, c][valid[n, c]]
            assert torch.all(chosen < limit)
            expected = torch.topk(scores[n, :limit], min(5, limit)).indices if limit else torch.zeros(0)
            assert set(chosen.tolist()) == set(expected.tolist())


def test_band():
    t = torch.arange(1.0, 6.0).view(1, 5)
    vals, ok = band(t, -3, 2)
    assert vals[0].tolist() == [[0, 0], [0, 0], [0, 1], [1, 2], [2, 3]]
    assert ok.tolist() == [[False, False], [False, False], [False, True], [True, True], [True, True]]


def test_bmojo_errors():
    with pytest.raises(ValueError, match="n_heads"):
        BMojoLayer(10, n_heads=3)
    with pytest.raises(ValueError, match="memory_size"):
        BMojoLayer(8, memory_size=-1, n_heads=2)
    with pytest.raises(ValueError, match="hidden"):
        BMojoMixer(8, n_heads=2)(torch.randn(1, 4, 6))
