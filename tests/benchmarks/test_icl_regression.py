"""In-context regression data and baselines against explicit float64 loops and closed forms."""
import pytest
import torch

from mambacl.backbones import GDSSMLayer
from mambacl.benchmarks.icl_regression import (
    best_gd_eta, gd_predict, icl_regression, least_squares_predict, pair_maps, query_loss,
)


def gd_loop(xs, ys, xq, eta, steps):
    """GD from W0 = 0 on 1/(2N) sum (w.x - y)^2, one pair at a time (float64)."""
    out = []
    for x, y, q in zip(xs.double(), ys.double(), xq.double()):
        w = torch.zeros(x.shape[1], dtype=torch.float64)
        for _ in range(steps):
            grad = sum((w @ x[i] - y[i]) * x[i] for i in range(len(y))) / len(y)
            w = w - eta * grad
        out.append(w @ q)
    return torch.stack(out)


def test_icl_regression_layout():
    data = icl_regression(5, d=4, n_pairs=3, generator=torch.Generator().manual_seed(0))
    tok = data["tokens"]
    assert tok.shape == (5, 7, 5)
    assert torch.equal(tok[:, 0:6:2, :4], data["xs"]) and torch.equal(tok[:, 6, :4], data["x_query"])
    assert torch.all(tok[:, 0::2, 4] == 0) and torch.all(tok[:, 1::2, :4] == 0)
    assert torch.equal(tok[:, 1::2, 4], data["ys"])
    torch.testing.assert_close(data["ys"], torch.einsum("bnd,bd->bn", data["xs"], data["w"]))
    torch.testing.assert_close(data["y_query"], (data["x_query"] * data["w"]).sum(-1))
    x = icl_regression(4000, generator=torch.Generator().manual_seed(1))["xs"]
    assert x.min() >= -0.5 and x.max() < 0.5 and abs(x.var().item() - 1 / 12) < 2e-3


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_gd_predict_matches_loop(steps):
    data = icl_regression(6, d=3, n_pairs=4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = gd_predict(data["xs"], data["ys"], data["x_query"], eta=1.7, steps=steps)
    torch.testing.assert_close(got, gd_loop(data["xs"], data["ys"], data["x_query"], 1.7, steps))
    if steps == 1:  # closed form eta/N sum_i y_i x_i . x_q
        closed = 1.7 / 4 * torch.einsum("bn,bnd,bd->b", data["ys"], data["xs"], data["x_query"])
        torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)


def test_baselines_order_and_best_eta():
    gen = torch.Generator().manual_seed(3)
    held, test = icl_regression(2000, generator=gen), icl_regression(2000, generator=gen)
    args = (test["xs"], test["ys"], test["x_query"])
    eta1 = best_gd_eta(held, steps=1)
    loss = {k: query_loss(gd_predict(*args, eta=best_gd_eta(held, k), steps=k), test["y_query"]).item()
            for k in (1, 2)}
    for f in (0.8, 1.25):  # the closed-form optimum beats nearby step sizes on the tasks it was fitted on
        h = (held["xs"], held["ys"], held["x_query"])
        assert (query_loss(gd_predict(*h, eta=eta1), held["y_query"])
                <= query_loss(gd_predict(*h, eta=eta1 * f), held["y_query"]))
    zero = test["y_query"].square().mean().item()
    assert abs(zero - 10 / 12) < 0.06  # E[(w.x)^2] = d Var(x)
    assert query_loss(least_squares_predict(*args), test["y_query"]) < 1e-5  # N = d, no noise: exact recovery
    assert zero > loss[1] > loss[2] > 0


def test_bad_input():
    with pytest.raises(ValueError, match="n_pairs"):
        icl_regression(2, n_pairs=0)
    with pytest.raises(ValueError, match="steps"):
        gd_predict(torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.zeros(1, 3), 1.0, steps=0)
    with pytest.raises(ValueError, match=r"predict must map .* to \[b\] predictions, got \(8, 1\)"):
        pair_maps(lambda tokens: tokens[:, -1, :1], d=1, n_pairs=1)


def test_pair_maps_read_the_pair_coefficients_of_a_cubic():
    d, n = 3, 4
    maps = torch.randn(n, d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def predict(tokens):
        xs, ys, xq = tokens[:, 0:2 * n:2, :d], tokens[:, 1::2, d], tokens[:, 2 * n, :d]
        pairs = torch.einsum("bi,bij,ijk,bk->b", ys, xs, maps, xq)
        # other monomials of degree <= 3 that share variables with the pairs, which must not leak in
        distractors = ys.square().sum(1) * xq.sum(1) + xs.square().sum((1, 2)) * xq[:, 0] + ys[:, 0] * ys[:, 1] \
            + 2.0 * xq.sum(1) + xs[:, 0, 0] * xs[:, 1, 1] * xq[:, 2]
        return pairs + distractors

    torch.testing.assert_close(pair_maps(predict, d, n), maps, rtol=0, atol=1e-12)


def test_pair_maps_of_one_gd_step_and_of_the_constructed_gdssm_layer():
    d, n, eta = 5, 6, 2.5
    expected = (eta / n * torch.eye(d, dtype=torch.float64)).expand(n, d, d)

    def one_step(tokens):
        return gd_predict(tokens[:, 0:2 * n:2, :d], tokens[:, 1::2, d], tokens[:, 2 * n, :d], eta=eta)

    torch.testing.assert_close(pair_maps(one_step, d, n), expected, rtol=0, atol=1e-12)
    layer = GDSSMLayer.constructed(d, eta, n, dtype=torch.float64)
    torch.testing.assert_close(pair_maps(lambda t: -(t + layer(t))[:, -1, d], d, n), expected, rtol=0, atol=1e-12)
