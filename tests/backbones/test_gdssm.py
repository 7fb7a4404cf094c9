"""GD-SSM: the construction equals one-step GD exactly; the layer equals a sequential float64 loop; it trains."""
import pytest
import torch

from mambacl.backbones.gdssm import GDSSMLayer, GDSSMMixer, local_windows
from mambacl.benchmarks.icl_regression import gd_predict, icl_regression, query_loss


def gdssm_loop(layer: GDSSMLayer, hidden: torch.Tensor) -> torch.Tensor:
    """S_t = Lambda * S_{t-1} + a_t b_t^T, o_t = W_o S_t c_t with the window built by hand (float64)."""
    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    lam = torch.exp(-p["decay"].abs())
    b, seqlen, d = hidden.shape
    outs = []
    for n in range(b):
        S = torch.zeros(layer.d_v, layer.d_state, dtype=torch.float64)
        row = []
        for t in range(seqlen):
            win = torch.cat([hidden[n, t - 2 + s] if t - 2 + s >= 0 else torch.zeros(d, dtype=torch.float64)
                             for s in range(3)])
            S = lam * S + torch.outer(p["a_proj.weight"] @ win, p["b_proj.weight"] @ win)
            row.append(p["out_proj.weight"] @ (S @ (p["c_proj.weight"] @ win)))
        outs.append(torch.stack(row))
    return torch.stack(outs)


@pytest.mark.parametrize("scan_impl", ["reference", "chunk"])
def test_constructed_layer_is_one_step_gd(scan_impl):
    data = icl_regression(64, d=10, n_pairs=10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer = GDSSMLayer.constructed(10, eta=2.5, n_pairs=10, scan_impl=scan_impl, dtype=torch.float64)
    pred = -layer(data["tokens"])[:, -1, 10]
    expected = 2.5 / 10 * torch.einsum("bn,bnd,bd->b", data["ys"], data["xs"], data["x_query"])
    torch.testing.assert_close(pred, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred, gd_predict(data["xs"], data["ys"], data["x_query"], 2.5), rtol=1e-12, atol=1e-12)


def test_constructed_stack_writes_the_residuals():
    """Layer 1 leaves y_j - W_{<j} x_j on every y token (W_{<j}: one GD step on the pairs before j)."""
    d, n = 3, 4
    data = icl_regression(2, d=d, n_pairs=n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = GDSSMLayer.constructed(d, eta=0.7, n_pairs=n, dtype=torch.float64)
    h = data["tokens"] + layer(data["tokens"])
    for j in range(n):
        w_prev = 0.7 / n * torch.einsum("bi,bid->bd", data["ys"][:, :j], data["xs"][:, :j])
        torch.testing.assert_close(h[:, 2 * j + 1, d], data["ys"][:, j] - (w_prev * data["xs"][:, j]).sum(-1))


@pytest.mark.parametrize("scan_impl", ["reference", "chunk"])
def test_layer_matches_sequential_loop(scan_impl):
    layer = GDSSMLayer(5, d_state=3, expand=2, scan_impl=scan_impl).double()
    hidden = torch.randn(2, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(hidden), gdssm_loop(layer, hidden), rtol=1e-10, atol=1e-10)


def test_local_windows():
    h = torch.arange(1.0, 5.0).view(1, 4, 1)
    assert local_windows(h).squeeze(0).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_gdssm_trains_from_random_init():
    """A random layer moves towards the one-step-GD predictor on a small task (d = 4, N = 6)."""
    gen = torch.Generator().manual_seed(0)
    layer = GDSSMLayer(5, d_state=4)
    opt = torch.optim.Adam(layer.parameters(), lr=2e-2)
    held = icl_regression(512, d=4, n_pairs=6, generator=gen)

    def held_loss() -> float:
        with torch.no_grad():
            return query_loss(-(held["tokens"] + layer(held["tokens"]))[:, -1, 4], held["y_query"]).item()

    before = held_loss()
    for _ in range(60):
        data = icl_regression(128, d=4, n_pairs=6, generator=gen)
        loss = query_loss(-(data["tokens"] + layer(data["tokens"]))[:, -1, 4], data["y_query"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    zero = held["y_query"].square().mean().item()
    assert held_loss() < 0.9 * min(before, zero)


def test_mixer_bidirectional_and_errors():
    mixer = GDSSMMixer(6, d_state=4, bidirectional=True).double()
    h = torch.randn(1, 5, 6, dtype=torch.float64)
    expected = (mixer.fwd(h) + mixer.bwd(h.flip(1)).flip(1)) / 2
    torch.testing.assert_close(mixer(h), expected)
    with pytest.raises(ValueError, match="hidden"):
        mixer.fwd(torch.randn(1, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_state"):
        GDSSMLayer(4, d_state=0)
    with pytest.raises(ValueError, match="scan_impl"):
        GDSSMLayer(4, scan_impl="cuda")
