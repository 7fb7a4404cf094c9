"""Synthetic mixer benchmarks: MQAR recall per mixer and in-context regression with GD-SSM vs GD baselines.

MQAR (Zoology generator): 2-layer :class:`~mambacl.backbones.SeqLM` per mixer (attention, mamba, longhorn,
bmojo, gdssm) at d_model 64, vocabulary 512; the SSM mixers have the same state (d_inner 128 x N 16 per layer;
B'MOJO adds an 8-token window and an 8-token eidetic memory). Trained on one (L, K) per setting, tested on
several K; the lr is swept in the first setting. Regression (d = 10, N = 10): 1- and 2-layer GD-SSM stacks
trained from random init against the zero predictor, tuned 1/2-step GD and least squares; the trained 1-layer
model is compared with the construction through its pair maps ``M_i`` (:func:`pair_maps`), which the
reparametrisations of the accumulator leave unchanged; the construction has ``M_i = eta/N I``.

Before training, the constructed layer is checked against one-step GD (the reference).

    python benchmarks/synthetic_mixers.py --quick      # under a minute (too short to learn MQAR)
    python benchmarks/synthetic_mixers.py              # the default grid, about 1 h on 2 quiet cores
    python benchmarks/synthetic_mixers.py --tasks regression   # one part only
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from _common import markdown_table, write_outputs
from mambacl.backbones import GDSSMLayer, SeqLM
from mambacl.backbones.seq_lm import SEQ_MIXERS
from mambacl.benchmarks.icl_regression import (
    best_gd_eta, gd_predict, icl_regression, least_squares_predict, pair_maps, query_loss,
)
from mambacl.benchmarks.mqar import IGNORE_INDEX, multiquery_ar

VOCAB, D_MODEL = 512, 64
MIXER_KWARGS = {"bmojo": dict(window=8, memory_size=8, n_heads=4)}


def mqar_accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Accuracy over query positions only."""
    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            pred = model(inputs[i:i + batch]).argmax(-1)
            mask = labels[i:i + batch] != IGNORE_INDEX
            correct += (pred[mask] == labels[i:i + batch][mask]).sum().item()
            total += mask.sum().item()
    return correct / total


def train_mqar(mixer: str, seqlen: int, train_k: int, test_ks: Sequence[int], lr: float, steps: int,
               batch: int, n_train: int, n_test: int) -> Dict[str, object]:
    """Train one 2-layer SeqLM with AdamW (wd 0.1, cosine); return the accuracy on validation data at the
    training K (``val``, for choosing the lr) and on test data per K (``acc``)."""
    torch.manual_seed(0)
    inputs, labels = multiquery_ar(VOCAB, n_train, seqlen, seed=0, num_kv_pairs=train_k)
    model = SeqLM(VOCAB, D_MODEL, 2, mixer, mixer_kwargs=MIXER_KWARGS.get(mixer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(n_train, (batch,), generator=gen)
        loss = F.cross_entropy(model(inputs[idx]).flatten(0, 1), labels[idx].flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    val = mqar_accuracy(model, *multiquery_ar(VOCAB, n_test, seqlen, seed=50, num_kv_pairs=train_k), batch=128)
    return {"val": val, "acc": {f"K={k}": mqar_accuracy(model, *multiquery_ar(VOCAB, n_test, seqlen, seed=100 + k,
                                                                               num_kv_pairs=k), batch=128)
                                for k in test_ks}}


def gdssm_predict(layers: torch.nn.ModuleList, tokens: torch.Tensor) -> torch.Tensor:
    """Residual stack; the prediction is minus the y coordinate of the query token."""
    h = tokens
    for layer in layers:
        h = h + layer(h)
    return -h[:, -1, -1]


def stack_loss(layers: torch.nn.ModuleList, data: Dict[str, torch.Tensor]) -> float:
    """Query MSE of a GD-SSM stack on a fixed set of tasks."""
    with torch.no_grad():
        return query_loss(gdssm_predict(layers, data["tokens"]), data["y_query"]).item()


def train_gdssm(n_layers: int, steps: int, lr: float, batch: int) -> Dict[str, object]:
    """Train a GD-SSM stack from random init on fresh tasks (Adam, cosine); return the layers and loss curve."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([GDSSMLayer(11, d_state=10) for _ in range(n_layers)])
    opt = torch.optim.Adam(layers.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen, curve = torch.Generator().manual_seed(2), []
    for _ in range(steps):
        data = icl_regression(batch, generator=gen)
        loss = query_loss(gdssm_predict(layers, data["tokens"]), data["y_query"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
    return {"curve": curve, "layers": layers}


def construction_match(layer: GDSSMLayer, eta: float, n_pairs: int) -> Dict[str, float]:
    """Trained layer vs the construction through its pair maps (:func:`pair_maps`, invariant to the
    reparametrisations of the accumulator): ``M_i = s_i I + E_i`` with ``s_i`` the mean diagonal; reports the
    scales of the oldest and the newest pair against ``eta / N`` and the largest ``|E_i| / |M_i|``."""
    probe = torch.nn.ModuleList([copy.deepcopy(layer).double()])
    maps = pair_maps(lambda tokens: gdssm_predict(probe, tokens), layer.d_state, n_pairs).float()
    scales = maps.diagonal(dim1=1, dim2=2).mean(-1)
    off = maps - scales[:, None, None] * torch.eye(maps.shape[-1])
    rel = (off.flatten(1).norm(dim=1) / maps.flatten(1).norm(dim=1)).max().item()
    return {"scale_oldest": scales[0].item(), "scale_newest": scales[-1].item(), "eta_over_N": eta / n_pairs,
            "rel_off_identity": rel}


def regression(args: argparse.Namespace) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(7)
    held, test = icl_regression(args.eval_tasks, generator=gen), icl_regression(args.eval_tasks, generator=gen)
    xyq = (test["xs"], test["ys"], test["x_query"])
    eta = {k: best_gd_eta(held, steps=k) for k in (1, 2)}
    ref = GDSSMLayer.constructed(10, eta[1], 10, dtype=torch.float64)
    got = -ref(test["tokens"].double())[:, -1, 10]
    err = (got - gd_predict(*(t.double() for t in xyq), eta=eta[1])).abs().max().item()
    assert err < 1e-10, f"constructed GD-SSM differs from one-step GD by {err}"
    rows = {"zero predictor": test["y_query"].square().mean().item(),
            "1-step GD (best eta)": query_loss(gd_predict(*xyq, eta=eta[1]), test["y_query"]).item(),
            "2-step GD (best eta)": query_loss(gd_predict(*xyq, eta=eta[2], steps=2), test["y_query"]).item(),
            "least squares": query_loss(least_squares_predict(*xyq), test["y_query"]).item()}
    curves, match = {}, None
    for n_layers in (1, 2):
        # the learning rate is picked on the held-out tasks, the loss reported on the test tasks
        best = min((train_gdssm(n_layers, args.reg_steps, lr, args.reg_batch) for lr in args.reg_lrs),
                   key=lambda r: stack_loss(r["layers"], held))
        rows[f"GD-SSM {n_layers} layer(s), trained"] = stack_loss(best["layers"], test)
        curves[n_layers] = best["curve"]
        if n_layers == 1:
            match = construction_match(best["layers"][0], eta[1], 10)
    return {"losses": rows, "eta": eta, "construction_match": match, "curves": curves}


def plot(path: Path, mqar: List[dict], reg: Dict[str, object]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if mqar:
        _plot_mqar(ax1, mqar)
    if reg:
        _plot_regression(ax2, reg)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_mqar(ax1, mqar: List[dict]) -> None:
    labels = sorted({k for r in mqar for k in r["acc"]}, key=lambda s: int(s[2:]))
    settings = sorted({r["L"] for r in mqar})
    width = 0.8 / len(SEQ_MIXERS)
    for i, mixer in enumerate(SEQ_MIXERS):
        xs, ys = [], []
        for j, (L, lab) in enumerate((L, lab) for L in settings for lab in labels):
            r = next((r for r in mqar if r["mixer"] == mixer and r["L"] == L and lab in r["acc"]), None)
            if r is not None:
                xs.append(j + i * width)
                ys.append(r["acc"][lab])
        ax1.bar(xs, ys, width, label=mixer)
    ticks = [f"L={L} {lab}" for L in settings for lab in labels]
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(ticks))], ticks, rotation=30, fontsize=7)
    ax1.set_ylabel("MQAR accuracy (queries)")
    ax1.legend(fontsize=7)


def _plot_regression(ax2, reg: Dict[str, object]) -> None:
    for n, curve in reg["curves"].items():
        ax2.plot(curve, label=f"GD-SSM {n} layer(s)", alpha=0.7)
    for name in ("zero predictor", "1-step GD (best eta)", "2-step GD (best eta)"):
        ax2.axhline(reg["losses"][name], ls="--", lw=1, label=name, color="k" if "zero" in name else None)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("query MSE (train batch)")
    ax2.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one MQAR setting, short runs")
    parser.add_argument("--mixers", nargs="+", default=list(SEQ_MIXERS), choices=SEQ_MIXERS)
    parser.add_argument("--tasks", nargs="+", default=["regression", "mqar"], choices=["regression", "mqar"])
    parser.add_argument("--reg-steps", dest="reg_steps_override", type=int, default=None, help="override the regression training steps")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    args = parser.parse_args()
    # MQAR settings: (L, train K, test Ks, steps); the lrs are swept on the first, the later ones reuse each
    # mixer's best lr
    if args.quick:
        settings = [(64, 4, (4, 8), 40)]
        args.lrs, args.batch, args.n_train, args.n_test = (3e-3,), 16, 2000, 256
        args.reg_steps, args.reg_batch, args.reg_lrs, args.eval_tasks = 300, 64, (1e-2,), 2000
    else:
        settings = [(64, 4, (4, 8, 16), 1200), (128, 8, (8, 16), 800)]
        args.lrs, args.batch, args.n_train, args.n_test = (3e-3, 1e-2), 64, 20000, 500
        args.reg_steps, args.reg_batch, args.reg_lrs, args.eval_tasks = 5000, 256, (3e-3, 1e-2), 10000
    if args.reg_steps_override is not None:
        args.reg_steps = args.reg_steps_override
    start = time.perf_counter()
    reg = regression(args) if "regression" in args.tasks else None
    mqar, best_lr = [], {}
    for i, (seqlen, train_k, test_ks, steps) in enumerate(settings if "mqar" in args.tasks else []):
        for mixer in args.mixers:
            lrs = args.lrs if i == 0 else (best_lr[mixer],)
            runs = [(lr, train_mqar(mixer, seqlen, train_k, test_ks, lr, steps, args.batch, args.n_train,
                                    args.n_test)) for lr in lrs]
            lr, run = max(runs, key=lambda r: r[1]["val"])
            best_lr.setdefault(mixer, lr)
            mqar.append({"mixer": mixer, "L": seqlen, "train_K": train_k, "steps": steps, "lr": lr, **run})
            print(mqar[-1], flush=True)
    elapsed = time.perf_counter() - start

    tables, notes = [], [f"Mode: {'quick' if args.quick else 'default'}; wall time {elapsed:.0f} s."]
    if mqar:
        test_cols = sorted({k for r in mqar for k in r["acc"]}, key=lambda s: int(s[2:]))
        tables.append(markdown_table(
            ["mixer", "L", "train K", "steps", "lr"] + [f"acc {k}" for k in test_cols],
            [[r["mixer"], r["L"], r["train_K"], r["steps"], f"{r['lr']:g}"]
             + [f"{r['acc'][k]:.3f}" if k in r["acc"] else "-" for k in test_cols] for r in mqar]))
        notes.append(f"MQAR: batch {args.batch}, AdamW (wd 0.1, cosine), V = {VOCAB}, d_model {D_MODEL}, 2 layers "
                     f"(short conv, mixer, MLP), {args.n_train} training sequences; lr chosen from "
                     f"{list(args.lrs)} by accuracy on validation sequences at the training K in the first "
                     "setting and reused in the others; accuracy over query positions of fresh test sequences.")
    if reg:
        tables.append(markdown_table(["in-context regression (d=10, N=10)", "query MSE"],
                                     [[k, f"{v:.4f}"] for k, v in reg["losses"].items()]))
        m = reg["construction_match"]
        notes.append(
            f"Regression: {args.reg_steps} steps (batch {args.reg_batch}, Adam, cosine, lrs {list(args.reg_lrs)}); best GD step sizes "
            f"{reg['eta'][1]:.3f} (1 step), {reg['eta'][2]:.3f} (2 steps). Trained 1-layer GD-SSM vs the "
            f"construction, through the map M_i of each context pair (the coefficients of y_i x_i^T M_i x_q in "
            f"the prediction, invariant to the accumulator's reparametrisations): M_i = s_i I + E_i with s = "
            f"{m['scale_oldest']:.4f} for the oldest and {m['scale_newest']:.4f} for the newest pair and "
            f"max |E_i|/|M_i| = {m['rel_off_identity']:.3f}; the construction has s_i = eta/N = "
            f"{m['eta_over_N']:.4f} and E_i = 0.")
    name = "synthetic_mixers" + ("" if len(set(args.tasks)) == 2 else f"_{args.tasks[0]}")
    plot(Path(__file__).with_name(f"{name}.png"), mqar, reg)
    payload = {"mqar": mqar, "regression": reg and {k: v for k, v in reg.items() if k != "curves"},
               "quick": args.quick, "elapsed_s": elapsed}
    write_outputs(name, payload, "\n\n".join(tables),
                  "Synthetic mixers: MQAR recall and in-context regression", " ".join(notes + [f"Plot: {name}.png."]),
                  record=not args.no_append)


if __name__ == "__main__":
    main()
