"""Training-step throughput (images/s) of Vision Mamba tiny next to timm's DeiT-tiny, at 224 px and 32 px.

Each step is forward + cross-entropy + backward + AdamW on random images, in fp32 or under bf16 autocast
(``--autocast bf16``); peak memory is reported on CUDA. Before timing, the Vim model's loss with the selected
scan backend is checked against the sequential reference scan (on a 2-layer copy, to keep the check cheap).

    python benchmarks/backbone_throughput.py --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, time_call, write_outputs  # noqa: E402

import mambacl.backbones  # noqa: E402,F401  (registers the Vim models)
from mambacl.backbones import ssm_param_groups  # noqa: E402


def check_against_reference(img_size: int, scan_impl: str, device: torch.device) -> float:
    """Max |loss(scan_impl) - loss(reference)| for a 2-layer vim_tiny on one batch; raises if not close."""
    torch.manual_seed(0)
    fast = timm.create_model("vim_tiny_patch16_224", img_size=img_size, depth=2, num_classes=10,
                             scan_impl=scan_impl).to(device)
    ref = timm.create_model("vim_tiny_patch16_224", img_size=img_size, depth=2, num_classes=10,
                            scan_impl="reference").to(device)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, img_size, img_size, device=device)
    with torch.no_grad():
        a, b = fast(x), ref(x)
    err = (a - b).abs().max().item()
    if not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
        raise AssertionError(f"{scan_impl} scan disagrees with the reference at {img_size} px: max err {err:.3e}")
    return err


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def train_step_fn(model: torch.nn.Module, batch: int, img_size: int, device: torch.device,
                  amp_dtype: Optional[torch.dtype] = None):
    """A closure running one optimisation step on a fixed random batch (forward and loss under autocast to
    ``amp_dtype`` when given)."""
    model.train()
    opt = torch.optim.AdamW(ssm_param_groups(model, 0.05), lr=1e-4)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def throughput(name: str, img_size: int, batch: int, steps: int, device: torch.device, precision: str = "fp32",
               warmup: int = 1, **model_kwargs) -> Dict[str, float]:
    """Training images/s of timm model ``name`` (median of ``steps`` steps after ``warmup``) and, on CUDA, the
    peak memory of a step in MiB (NaN elsewhere).

    Args:
        precision: 'fp32' or 'bf16' (autocast).
        **model_kwargs: extra ``timm.create_model`` arguments (e.g. ``scan_impl``).
    """
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, num_classes=100, **model_kwargs).to(device)
    step = train_step_fn(model, batch, img_size, device, AUTOCAST[precision])
    seconds = time_call(step, repeat=steps, warmup=warmup)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    return {"img_s": batch / seconds, "peak_mib": peak}


HEADER = ["device", "px", "batch", "precision", "vim_tiny img/s", "deit_tiny img/s", "vim/deit",
          "peak MiB vim / deit", "ref check err"]


def throughput_row(r: Dict[str, object]) -> List[object]:
    """A table row of one record (device, img_size, batch, precision, vim/deit img/s and peak MiB, check err)."""
    return [r["device"], r["img_size"], r["batch"], r.get("precision", "fp32"), f"{r['vim_tiny_img_s']:.3g}",
            f"{r['deit_tiny_img_s']:.3g}", f"{r['vim_tiny_img_s'] / r['deit_tiny_img_s']:.3g}",
            f"{r.get('vim_tiny_peak_mib', float('nan')):.0f} / {r.get('deit_tiny_peak_mib', float('nan')):.0f}",
            f"{r['ref_check_max_err']:.1e}"]


def throughput_notes(scan_impl: str, steps: int, warmup: int) -> str:
    return (f"Training step (fwd + CE + bwd + AdamW), patch 16 for both models, scan_impl={scan_impl}, median of "
            f"{steps} steps after {warmup} warm-up(s); bf16: forward and loss under torch.autocast. Peak memory: "
            "max_memory_allocated of one step (CUDA only). `ref check err`: max |logit| difference of a 2-layer "
            "vim_tiny against the sequential reference scan.")


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32], help="image sizes in px")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--scan-impl", default="auto", choices=["auto", "reference", "chunk", "triton"])
    parser.add_argument("--autocast", nargs="+", choices=list(AUTOCAST), default=["fp32"],
                        help="precisions to time (bf16: torch.autocast)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 2 timed steps")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 2, 2
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    records = []
    for device in devices:
        for size in args.sizes:
            err = check_against_reference(size, args.scan_impl, device)
            for precision in args.autocast:
                vim = throughput("vim_tiny_patch16_224", size, args.batch, args.steps, device, precision,
                                 scan_impl=args.scan_impl)
                deit = throughput("deit_tiny_patch16_224", size, args.batch, args.steps, device, precision)
                records.append(dict(device=device.type, img_size=size, batch=args.batch, steps=args.steps,
                                    precision=precision, scan_impl=args.scan_impl, vim_tiny_img_s=vim["img_s"],
                                    deit_tiny_img_s=deit["img_s"], vim_tiny_peak_mib=vim["peak_mib"],
                                    deit_tiny_peak_mib=deit["peak_mib"], ref_check_max_err=err))
    table = markdown_table(HEADER, [throughput_row(r) for r in records])
    write_outputs("backbone_throughput", dict(results=records), table, "Backbone training throughput "
                  "(benchmarks/backbone_throughput.py)", notes=throughput_notes(args.scan_impl, args.steps, 1),
                  record=not args.no_append)


if __name__ == "__main__":
    main()
