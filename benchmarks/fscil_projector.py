"""Mamba-FSCIL projector cost per session type at the CIFAR-100 map size (640x2x2, D 640, d_state 256).

Base session: the base branch (MLP, pos embed, four-scan SSM) forward + backward on a 512-map batch.
Incremental session: base branch detached, the zero-gated incremental branch forward + backward on a
64-map batch (cached maps), x the 200 steps of a CIFAR session. Before timing, the projector's output and
input gradient with the selected scan backend are checked against the sequential reference scan. Memory is
the peak CUDA allocation on a GPU and, everywhere, the bytes autograd saves for backward (distinct storages).
With ``--accuracy-run`` a small FSCIL run on generated CIFAR-format data is reported next to the paper's
per-session accuracies (fscil.md section 5); the two are not comparable (different data and scale).

    python benchmarks/fscil_projector.py --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, time_call, write_outputs  # noqa: E402

from mambacl.strategies.fscil import MambaNeck  # noqa: E402

#: fscil.md section 5 (Mamba-FSCIL README / logs), CIFAR-100, % per session.
PAPER_CIFAR = [82.80, 77.85, 73.69, 69.67, 66.89, 63.66, 61.48, 59.74, 57.51]
PAPER_NC_FSCIL_CIFAR = [82.52, 76.82, 73.34, 69.68, 66.19, 62.85, 60.96, 59.02, 56.11]


def make_neck(scan_impl: str, d_state: int, device: torch.device, incremental: bool) -> MambaNeck:
    torch.manual_seed(0)
    neck = MambaNeck(640, 640, (2, 2), d_state=d_state, dt_rank=256, scan_impl=scan_impl).to(device)
    if incremental:
        neck.add_incremental_branch()
        with torch.no_grad():  # leave the zero init so the timed branch is not a no-op numerically
            neck.inc.block.in_proj.weight.normal_(0, 0.02)
    return neck


def check_against_reference(scan_impl: str, d_state: int, device: torch.device) -> float:
    """Max abs difference of output and input gradient between scan_impl and the reference; raises if large."""
    feat = torch.randn(4, 640, 2, 2, device=device)
    results = []
    for impl in (scan_impl, "reference"):
        neck = make_neck(impl, d_state, device, incremental=True)
        x = feat.clone().requires_grad_(True)
        out = neck(x).feat
        neck.inc.block.in_proj.weight.grad = None
        grad_w, = torch.autograd.grad(out.square().sum(), [neck.inc.block.in_proj.weight])
        results.append((out.detach(), grad_w))
    err = max((a - b).abs().max().item() for a, b in zip(*results))
    scale = max(t.abs().max().item() for t in results[1])
    if err > 1e-3 * max(scale, 1.0):
        raise AssertionError(f"{scan_impl} projector disagrees with the reference scan: max err {err:.3e}")
    return err


def step_fn(neck: MambaNeck, batch: int, device: torch.device) -> Callable[[], None]:
    feat = torch.randn(batch, 640, 2, 2, device=device)

    def step() -> None:
        neck.zero_grad(set_to_none=True)
        neck(feat).feat.square().mean().backward()
    return step


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn()."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure(session: str, batch: int, args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    neck = make_neck(args.scan_impl, args.d_state, device, incremental=session == "incremental")
    step = step_fn(neck, batch, device)
    feat = torch.randn(batch, 640, 2, 2, device=device)
    act = saved_bytes(lambda: neck(feat).feat)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    seconds = time_call(step, repeat=args.repeat, warmup=1)
    trained = neck.inc.parameters() if session == "incremental" else neck.parameters()
    return dict(seconds=seconds, saved_mib=act / 2 ** 20, peak_mib=peak,
                trained_params=sum(p.numel() for p in trained))


def accuracy_run(quick: bool) -> Tuple[List[float], str]:
    """Small FSCIL run on generated CIFAR-format data; returns per-session accuracy (%) and a description."""
    from torchvision import transforms as T

    from mambacl.benchmarks.fscil import FSCILSpec, fscil_cifar100, write_synthetic_cifar100
    from mambacl.strategies.fscil import LOSS_WEIGHTS, FeatureMapBackbone, MambaFSCIL
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    spec = FSCILSpec(num_classes=20, num_base=10, n_way=5, n_shot=5)
    per_class, epochs = (20, 4) if quick else (50, 12)
    # The published w_s = 100 is calibrated for D = 640 maps and batch 64; at D = 64 / batch 16 it diverges.
    weights = dataclasses.replace(LOSS_WEIGHTS["cifar100"], w_s=1.0)
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_cifar100(root, num_classes=20, train_per_class=per_class, test_per_class=20, seed=1)
        bench = fscil_cifar100(root, spec=spec, train_transform=T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]),
                               eval_transform=T.ToTensor())
        torch.manual_seed(0)
        strategy = MambaFSCIL(backbone=FeatureMapBackbone("resnet12", 32, widths=(16, 32, 64, 64)), img_size=32,
                              num_classes=20, num_base=10, d_state=16, dt_rank=16,
                              overrides=dict(inc_steps=50, base_warmup=10, base_lr=0.05, inc_lr=0.05,
                                             weights=weights),
                              train_mb_size=32, train_epochs=epochs, eval_mb_size=64, inc_mb_size=16,
                              evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
        result = strategy.run(bench.train_stream, bench.test_stream)
    data = (f"generated CIFAR-format data (write_synthetic_cifar100, seed 1): 20 classes = 10 base x {per_class} "
            f"images + 2 sessions of 5-way 5-shot, 20 test images per class; ResNet-12 widths 16-32-64-64, "
            f"D 64, d_state 16, dt_rank 16, {epochs} base epochs at lr 0.05 (batch 32), 50 incremental steps at lr 0.05 "
            "(batch 16), w_s 1 (other CIFAR loss weights as published)")
    return [100 * a for a in result["sessions"]], data


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-batch", type=int, default=64, help="base-session batch (paper: 8 GPUs x 64)")
    parser.add_argument("--inc-batch", type=int, default=64, help="incremental-session batch (paper: 8 x 8)")
    parser.add_argument("--inc-steps", type=int, default=200, help="steps of an incremental session (CIFAR: 200)")
    parser.add_argument("--d-state", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--scan-impl", default="auto", choices=["auto", "reference", "chunk", "triton"])
    parser.add_argument("--accuracy-run", action="store_true", help="also run a small FSCIL run on generated data")
    parser.add_argument("--quick", action="store_true", help="batches 16, 1 timed step, smaller accuracy run")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.base_batch, args.inc_batch, args.repeat = 16, 16, 1
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    rows, records = [], []
    for device in devices:
        err = check_against_reference(args.scan_impl, args.d_state, device)
        for session, batch, steps in (("base", args.base_batch, 1), ("incremental", args.inc_batch, args.inc_steps)):
            m = measure(session, batch, args, device)
            session_s = m["seconds"] * steps if session == "incremental" else float("nan")
            rows.append([device.type, session, batch, f"{1e3 * m['seconds']:.3g}", f"{session_s:.3g}",
                         f"{m['saved_mib']:.3g}", f"{m['peak_mib']:.3g}", m["trained_params"], f"{err:.1e}"])
            records.append(dict(device=device.type, session=session, batch=batch, scan_impl=args.scan_impl,
                                d_state=args.d_state, step_s=m["seconds"], session_s=session_s,
                                saved_mib=m["saved_mib"], peak_cuda_mib=m["peak_mib"],
                                trained_params=m["trained_params"], ref_check_max_err=err))
    table = markdown_table(["device", "session", "batch", "fwd+bwd ms", f"session s ({args.inc_steps} steps)",
                            "autograd-saved MiB", "peak CUDA MiB", "trained params", "ref check err"], rows)
    notes = (f"Projector only (MambaNeck 640x2x2 -> 640, dt_rank 256, d_state {args.d_state}, "
             f"scan_impl={args.scan_impl}); loss = mean square of the feature; median of {args.repeat} steps "
             "after 1 warm-up. `ref check err`: max difference of output and in_proj gradient against the "
             "sequential reference scan (batch 4).")
    payload: Dict[str, object] = dict(results=records, paper_cifar100=PAPER_CIFAR)
    if args.accuracy_run:
        start = time.perf_counter()
        accs, data = accuracy_run(args.quick)
        payload["accuracy_run"] = dict(sessions=accs, data=data, seconds=time.perf_counter() - start)
        acc_rows = [["Mamba-FSCIL, paper (CIFAR-100, 60+8x5)", *[f"{a:.2f}" for a in PAPER_CIFAR]],
                    ["NC-FSCIL, paper (CIFAR-100)", *[f"{a:.2f}" for a in PAPER_NC_FSCIL_CIFAR]],
                    ["mambacl, generated data (see below)", *[f"{a:.2f}" for a in accs],
                     *[""] * (len(PAPER_CIFAR) - len(accs))]]
        table += "\n\n" + markdown_table(["run", *[f"s{i + 1}" for i in range(len(PAPER_CIFAR))]], acc_rows)
        notes += f"\n\nAccuracy run (%, not comparable to the paper rows): {data}."
    write_outputs("fscil_projector", payload, table, "Mamba-FSCIL projector cost per session "
                  "(benchmarks/fscil_projector.py)", notes=notes, record=not args.no_append)


if __name__ == "__main__":
    main()
