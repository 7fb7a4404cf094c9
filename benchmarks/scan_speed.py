"""Selective-scan speed: forward and forward+backward time and peak memory of every backend, with mambapy's pscan.

Shapes: Vim-tiny and Vim-small (batch 8, dim 384 / 768, L 197, N 16) and a long sequence (batch 2, dim 384,
L 2048), variable B/C, with D, z, delta_bias and softplus as a Vim mixer calls the scan. Every backend is first
checked against the sequential reference (batch 1, same D/L/N). Each (shape, backend) is then measured in its
own subprocess so the peak memory (RSS high-water mark on the CPU, max_memory_allocated on CUDA) is its own.
On CUDA the Triton forward's achieved bandwidth is compared with a device-to-device copy measured in the same run.

    python benchmarks/scan_speed.py --quick
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, time_call, write_outputs  # noqa: E402

from mambacl.kernels.utils import softplus  # noqa: E402
from mambacl.kernels.workload import available_backends, forward_backward, leaves, max_errors, run_scan  # noqa: E402
from mambacl.kernels.workload import scan_problem  # noqa: E402

CONFIGS = {"vim-tiny": (8, 384, 197, 16), "vim-small": (8, 768, 197, 16), "long-2048": (2, 384, 2048, 16)}
CHECK_TOL = 1e-3  # max |out err| and max relative gradient error accepted against the reference (fp32)


def pscan_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's scan as alxndrTL/mamba.py computes it: (b, L, D, N) decays and inputs, then mambapy's pscan."""
    from mambapy.pscan import pscan

    dt = delta if delta_bias is None else delta + delta_bias[None, :, None]
    dt = (softplus(dt) if delta_softplus else dt).transpose(1, 2)  # (b, L, D)
    x = u.transpose(1, 2)
    decay = torch.exp(dt.unsqueeze(-1) * A)
    inputs = (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    y = (pscan(decay, inputs) @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z.transpose(1, 2))
    return y.transpose(1, 2)


def has_mambapy() -> bool:
    try:
        import mambapy.pscan  # noqa: F401
    except ImportError:
        return False
    return True


def run(op: str, backend: str, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    return pscan_selective_scan(**inputs) if backend == "pscan" else run_scan(op, backend, inputs)


def fwd_bwd(op: str, backend: str, inputs: Dict[str, torch.Tensor]):
    """Out and the gradient of every leaf (upstream gradient of ones), for any backend incl. pscan."""
    if backend != "pscan":
        return forward_backward(op, backend, inputs)
    out = run(op, backend, inputs)
    grads = torch.autograd.grad(out, list(leaves(inputs).values()), torch.ones_like(out))
    return out, dict(zip(leaves(inputs), grads))


def check(op: str, backends: List[str], shape, device: str) -> Dict[str, List[float]]:
    """Errors (out, relative grad) of each backend against the reference at batch 1; raises beyond CHECK_TOL."""
    _, dim, seqlen, d_state = shape
    inputs = scan_problem(op, 1, dim, seqlen, d_state, device=device)
    reference = forward_backward(op, "reference", inputs)
    errors = {}
    for backend in backends:
        if backend == "reference":
            continue
        errors[backend] = list(max_errors(fwd_bwd(op, backend, inputs), reference))
        if max(errors[backend]) > CHECK_TOL:
            raise AssertionError(f"{op} {backend} disagrees with the reference at {shape}: errors {errors[backend]}")
    return errors


def device_seconds(fn: Callable[[], object]) -> Tuple[float, str]:
    """Median device time of fn() on CUDA and how it was taken: replays of a CUDA graph of fn (no launch or
    Python overhead), or CUDA events around each call where fn cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / 1e3, "CUDA graph"
    except Exception:  # noqa: BLE001  (capture refused: fall back to events, which include launch overhead)
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3, "CUDA events"


def copy_bandwidth(device: torch.device, numel: int = 128 * 2 ** 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written) on a ``numel``-float buffer (512 MiB);
    median of CUDA events on a GPU, best of 10 host-timed copies elsewhere."""
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median") / 1e3
    else:
        seconds = min(time_call(lambda: dst.copy_(src), repeat=1, warmup=1) for _ in range(10))
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def cpu_peak_bytes(fn: Callable[[], object]) -> float:
    """Peak resident memory of fn() above the resident memory before it.

    On Linux the high-water mark is reset first (/proc/self/clear_refs), so an earlier peak cannot hide this
    one; elsewhere the ru_maxrss increase is used, which reads 0 when an earlier peak was higher.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        return 1024.0 * (_status_kib("VmHWM") - before)
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return 1024.0 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # KiB on Linux


def measure(op: str, backend: str, shape, device: str, repeat: int, copy_gbs: Optional[float] = None
            ) -> Dict[str, float]:
    """In this process: peak memory of one fwd+bwd above the inputs, then best-of-`repeat` times (seconds).

    For Triton on CUDA also the forward's device time (``kernel_fwd_s``, see :func:`device_seconds`), its
    achieved bandwidth and the copy bandwidth ``copy_gbs`` (measured here unless given).
    """
    dev = torch.device(device)
    inputs = scan_problem(op, *shape, device=device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(op, backend, inputs)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_bytes(lambda: fwd_bwd(op, backend, inputs))

    def forward():
        with torch.no_grad():
            run(op, backend, inputs)

    warmup = 0 if backend == "reference" else 1  # the reference is slow and has nothing to warm up
    result = {"peak_bytes": float(peak),
              "fwd_s": min(time_call(forward, repeat=1, warmup=warmup) for _ in range(repeat)),
              "fwd_bwd_s": min(time_call(lambda: fwd_bwd(op, backend, inputs), repeat=1, warmup=0)
                               for _ in range(repeat))}
    if dev.type == "cuda" and backend == "triton":
        # Forward traffic: read u, delta, z and the variable B/C, write out (parameters are negligible).
        seq_bytes = inputs["u"].numel() * inputs["u"].element_size()
        moved = 4 * seq_bytes + sum(inputs[k].numel() * inputs[k].element_size() for k in ("B", "C", "k", "q")
                                    if k in inputs)
        result["kernel_fwd_s"], result["kernel_timing"] = device_seconds(forward)
        result["bandwidth_gbs"] = moved / result["kernel_fwd_s"] / 1e9
        result["copy_gbs"] = copy_bandwidth(dev) if copy_gbs is None else copy_gbs
    return result


def measure_in_subprocess(op: str, backend: str, shape, device: str, repeat: int) -> Dict[str, float]:
    job = json.dumps({"op": op, "backend": backend, "shape": shape, "device": device, "repeat": repeat,
                      "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {op} {backend} {shape} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(num: Optional[float], den: Optional[float]) -> str:
    return "-" if num is None or den is None else f"{num / den:.1f}x"


def target_notes(records: List[Dict[str, object]]) -> List[str]:
    """Issue 2's CPU targets at Vim-tiny: chunk fwd+bwd >= 3x pscan and >= 20x the reference, less peak memory."""
    at = {r["backend"]: r for r in records if r["op"] == "selective_scan" and r["config"] == "vim-tiny"}
    if "chunk" not in at:
        return []
    chunk, notes = at["chunk"], []
    for other, factor in (("pscan", 3), ("reference", 20)):
        if other in at:
            speedup = at[other]["fwd_bwd_s"] / chunk["fwd_bwd_s"]
            notes.append(f"Target chunk fwd+bwd >= {factor}x {other} at vim-tiny: {speedup:.1f}x "
                         f"({'met' if speedup >= factor else 'missed'}).")
    if "pscan" in at:
        lower = chunk["peak_bytes"] < at["pscan"]["peak_bytes"]
        notes.append(f"Target chunk peak memory below pscan's at vim-tiny: {chunk['peak_bytes'] / 2 ** 20:.0f} vs "
                     f"{at['pscan']['peak_bytes'] / 2 ** 20:.0f} MiB ({'met' if lower else 'missed'}).")
    return notes


SPEED_HEADER = ["op", "config", "b x D x L x N", "backend", "fwd ms", "fwd+bwd ms", "peak MiB", "vs pscan",
                "vs reference", "fwd kernel ms", "GB/s (fwd kernel)"]


def speed_table(records: List[Dict[str, object]]) -> str:
    """The markdown table of :func:`measure` records (each with op, config, shape, backend); the speed-ups are
    fwd+bwd time against pscan and the reference of the same op and config."""
    fwd_bwd = {(r["op"], r["config"], r["backend"]): r["fwd_bwd_s"] for r in records}
    rows = []
    for r in records:
        base = {k: fwd_bwd.get((r["op"], r["config"], k)) for k in ("pscan", "reference")}
        bw = "-"
        if "bandwidth_gbs" in r:
            bw = f"{r['bandwidth_gbs']:.0f} ({100 * r['bandwidth_gbs'] / r['copy_gbs']:.0f}% of copy)"
        kernel = f"{1e3 * r['kernel_fwd_s']:.3f}" if "kernel_fwd_s" in r else "-"
        rows.append([r["op"], r["config"], "x".join(map(str, r["shape"])), r["backend"], f"{1e3 * r['fwd_s']:.2f}",
                     f"{1e3 * r['fwd_bwd_s']:.2f}", f"{r['peak_bytes'] / 2 ** 20:.0f}",
                     ratio(base["pscan"], r["fwd_bwd_s"]), ratio(base["reference"], r["fwd_bwd_s"]), kernel, bw])
    return markdown_table(SPEED_HEADER, rows)


def speed_notes(records: List[Dict[str, object]], repeat: int, threads: int, reference_long: bool,
                pscan_ok: bool, cpu: bool = True) -> List[str]:
    """The notes under the speed table: what was measured and how, skipped rows, the CPU targets (``cpu``)."""
    notes = []
    if not pscan_ok:
        notes.append("mambapy is not installed (pip install -e '.[bench]'): pscan rows skipped.")
    if any(r["shape"][2] > 1024 for r in records) and not reference_long:
        notes.append("The sequential reference is not timed at L 2048 (pass --reference-long); it is still the "
                     "oracle of the correctness check there, at batch 1.")
    notes.append(f"Best of {repeat} repeats (the reference: one call), {threads} torch thread(s). "
                 "Peak memory: the fwd+bwd high-water mark above the inputs (on the CPU the resident set, its "
                 "high-water mark reset before the call; on CUDA max_memory_allocated). Every backend was checked "
                 f"against the reference first (max |out err| and relative grad err <= {CHECK_TOL}, batch 1).")
    if any("kernel_fwd_s" in r for r in records):
        methods = sorted({r["kernel_timing"] for r in records if "kernel_timing" in r})
        notes.append("fwd/fwd+bwd ms: host-timed op calls (Python dispatch included, synchronised). Fwd kernel: "
                     f"median device time of the Triton forward ({' / '.join(methods)}); its bandwidth counts "
                     "reading u, delta, z, B, C and writing out once, against a device-to-device copy measured "
                     "in the same run (read + write).")
    return notes + (target_notes(records) if cpu else [])


def timed_backends(op: str, shape, device: torch.device, pscan_ok: bool, reference_long: bool) -> List[str]:
    """The backends timed for `op` at `shape`: those native to `device`, pscan (Mamba, when installed), and the
    reference only up to L 1024 unless `reference_long`."""
    backends = available_backends(device) + (["pscan"] if pscan_ok and op == "selective_scan" else [])
    return [b for b in backends if b != "reference" or shape[2] <= 1024 or reference_long]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Vim-tiny only, 3 repeats")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--ops", nargs="+", choices=["selective_scan", "longhorn_scan"], default=["selective_scan"])
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--reference-long", action="store_true",
                        help="also time the sequential reference at L 2048 (about a minute per call on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 avoids the "
                        "per-op thread-pool stalls of an oversubscribed machine")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        torch.set_num_threads(job.pop("threads"))
        print(json.dumps(measure(**job)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = ["vim-tiny"] if args.quick else args.configs
    repeat = 3 if args.quick else args.repeat
    pscan_ok = has_mambapy()
    records = []
    for op in args.ops:
        for name in configs:
            shape = CONFIGS[name]
            backends = timed_backends(op, shape, torch.device(args.device), pscan_ok, args.reference_long)
            errors = check(op, backends, shape, args.device)
            for backend in backends:
                m = measure_in_subprocess(op, backend, shape, args.device, 1 if backend == "reference" else repeat)
                records.append({"op": op, "config": name, "shape": shape, "backend": backend,
                                "check_errors": errors.get(backend), **m})
    notes = speed_notes(records, repeat, torch.get_num_threads(), args.reference_long, pscan_ok,
                        cpu=args.device == "cpu")
    write_outputs("scan_speed", {"records": records, "notes": notes}, speed_table(records),
                  "Selective-scan speed (scan_speed.py" + (" --quick)" if args.quick else ")"), "\n".join(notes),
                  record=not args.no_append)


if __name__ == "__main__":
    main()
