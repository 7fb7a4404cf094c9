"""Kernel demo: ``python -m mambacl.kernels`` runs both scans on every available backend at a small Vim-like
shape and prints, per backend, the error against the sequential reference and a forward+backward time."""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch

from .workload import OPS, available_backends, forward_backward, max_errors, scan_problem


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mambacl.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=192, help="channels D (Vim-tiny's d_inner is 384)")
    parser.add_argument("--seqlen", type=int, default=197, help="L (197 tokens at 224 px, patch 16)")
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"b={args.batch} D={args.dim} L={args.seqlen} N={args.d_state} on {device}, fp32, variable B/C, "
          f"D, z, delta_bias" + ("" if device.type == "cuda" else " (no CUDA: Triton skipped)"))
    print(f"{'op':<16}{'backend':<11}{'max |out err|':>14}{'max rel grad err':>18}{'fwd+bwd ms':>12}")
    for op in OPS:
        inputs = scan_problem(op, args.batch, args.dim, args.seqlen, args.d_state, device=args.device)
        reference = forward_backward(op, "reference", inputs)
        for backend in available_backends(device):
            forward_backward(op, backend, inputs)  # warm-up (Triton compiles here)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = forward_backward(op, backend, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = 1e3 * (time.perf_counter() - start)
            out_err, grad_err = max_errors(result, reference)
            print(f"{op:<16}{backend:<11}{out_err:>14.2e}{grad_err:>18.2e}{elapsed:>12.1f}")


if __name__ == "__main__":
    main()
