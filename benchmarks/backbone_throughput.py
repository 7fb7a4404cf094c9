"""Training-step throughput (images/s) of Vision Mamba tiny next to timm's DeiT-tiny, at 224 px and 32 px.

Each step is forward + cross-entropy + backward + AdamW on random images. Before timing, the Vim model's
loss with the selected scan backend is checked against the sequential reference scan (on a 2-layer copy,
to keep the check cheap).

    python benchmarks/backbone_throughput.py --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

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


def train_step_fn(model: torch.nn.Module, batch: int, img_size: int, device: torch.device):
    """A closure running one optimisation step on a fixed random batch."""
    model.train()
    opt = torch.optim.AdamW(ssm_param_groups(model, 0.05), lr=1e-4)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32], help="image sizes in px")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--scan-impl", default="auto", choices=["auto", "reference", "chunk", "triton"])
    parser.add_argument("--quick", action="store_true", help="batch 2, 2 timed steps")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 2, 2
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    rows, records = [], []
    for device in devices:
        for size in args.sizes:
            err = check_against_reference(size, args.scan_impl, device)
            result: Dict[str, float] = {}
            for name, kwargs in (("vim_tiny_patch16_224", dict(scan_impl=args.scan_impl)),
                                 ("deit_tiny_patch16_224", {})):
                torch.manual_seed(0)
                model = timm.create_model(name, img_size=size, num_classes=100, **kwargs).to(device)
                seconds = time_call(train_step_fn(model, args.batch, size, device), repeat=args.steps, warmup=1)
                result[name] = args.batch / seconds
            vim, deit = result["vim_tiny_patch16_224"], result["deit_tiny_patch16_224"]
            rows.append([device.type, size, args.batch, f"{vim:.3g}", f"{deit:.3g}", f"{vim / deit:.3g}", f"{err:.1e}"])
            records.append(dict(device=device.type, img_size=size, batch=args.batch, steps=args.steps,
                                scan_impl=args.scan_impl, vim_tiny_img_s=vim, deit_tiny_img_s=deit,
                                ref_check_max_err=err))
    table = markdown_table(["device", "px", "batch", "vim_tiny img/s", "deit_tiny img/s", "vim/deit",
                            "ref check err"], rows)
    notes = (f"Training step (fwd + CE + bwd + AdamW), patch 16 for both models, scan_impl={args.scan_impl}, "
             f"median of {args.steps} steps after 1 warm-up. `ref check err`: max |logit| difference of a 2-layer "
             "vim_tiny against the sequential reference scan.")
    write_outputs("backbone_throughput", dict(results=records), table, "Backbone training throughput "
                  "(benchmarks/backbone_throughput.py)", notes=notes, record=not args.no_append)


if __name__ == "__main__":
    main()
