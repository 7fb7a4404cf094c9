"""One prepared GPU check for a short device lease: the Triton scans against float64, scan speed, Vim training
throughput next to DeiT, Mamba-CL overhead and a whole ``mambacl`` run under bf16 autocast.

The parts run in order of value, each in a fresh process with its own time budget: a part is skipped with a
message once the total budget is spent, stops taking new items once its own is, and is killed at its limit.
Every item's result goes into ``<out-dir>/gpu_check.json`` as soon as it finishes (``gpu_check.log`` is the log),
so a run stopped at the lease's limit still returns what finished. A failing item is reported loudly and the
other items and parts still run.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out-dir $OUT    # on the GPU; RESULTS.md has the command
    python benchmarks/gpu_check.py --record gpu_check.json               # then here: the CUDA sections of RESULTS.md
    python benchmarks/gpu_check.py --dry-run --out-dir /tmp/check         # without CUDA: the same plan, toy sizes
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # this checkout's mambacl, wherever the script runs

import torch  # noqa: E402

from _common import RESULTS_MD, machine_info, markdown_table, record_results  # noqa: E402

JSON_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"
TOTAL_S = 470  # the whole check ends inside 8 minutes
MIN_PART_S = 15  # a part that would get less is skipped
GRACE_S = 20  # a part may overrun its budget by one item; killed after this much more
START_S = 15  # a part's process start and imports, before its budget starts
TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}  # mamba-ssm's (kernels.md section 6)
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")  # .item()/bool()/.tolist() all end in the first
VERSIONED = ("torch", "triton", "timm", "torchvision", "avalanche-lib", "numpy", "mambapy")


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run of the check: the GPU's, or the dry run's toy ones."""

    budgets: Dict[str, float]
    scan_shapes: Dict[str, Tuple[int, int, int, int]]  # correctness: b, D, L, N per shape class
    speed_configs: Dict[str, Tuple[int, int, int, int]]  # scan speed, keyed like scan_speed.CONFIGS
    speed_repeat: int
    img_size: int  # throughput, overhead and the mambacl run
    batch: int
    steps: int
    warmup: int
    collect: int  # images of the timed covariance pass
    overhead_model: str
    run_model: str
    run_data: Tuple[int, int]  # generated CIFAR-100 images per class: train, test
    recipe_model: str  # the recipe part: the model trained under mambacl-cifar100-10's settings
    recipe_images: int  # generated training images per class of its first experience
    recipe_device_batch: int  # micro-batch for the recipe's global batch of 200
    sync_scan: Tuple[int, int, int, int] = (2, 64, 33, 16)  # host-sync check: one scan's b, D, L, N
    sync_model: Tuple[int, int, int] = (64, 2, 192)  # and a Vim's img_size, depth, embed_dim
    copy_numel: int = 128 * 2 ** 20


GPU_PLAN = Plan(
    budgets={"correctness": 150, "scan_speed": 80, "throughput": 55, "overhead": 45, "run": 40, "recipe": 45},
    scan_shapes={"small": (2, 10, 37, 4), "vim": (2, 384, 197, 16), "long": (1, 384, 2048, 16)},
    speed_configs={"vim-tiny": (8, 384, 197, 16), "vim-small": (8, 768, 197, 16), "long-2048": (2, 384, 2048, 16)},
    speed_repeat=5, img_size=224, batch=64, steps=10, warmup=2, collect=128,
    overhead_model="vim_tiny_patch16_224", run_model="vim_tiny_patch16_224", run_data=(20, 5),
    recipe_model="defocus_mamba_large_patch16_192", recipe_images=40, recipe_device_batch=100)
DRY_PLAN = Plan(
    budgets={"correctness": 8, "scan_speed": 4, "throughput": 4, "overhead": 4, "run": 5, "recipe": 5},
    scan_shapes={"small": (1, 4, 5, 2), "vim": (1, 6, 4, 4), "long": (1, 4, 9, 2)},
    speed_configs={"vim-tiny": (2, 8, 9, 4), "vim-small": (2, 16, 9, 4), "long-2048": (1, 8, 33, 4)},
    speed_repeat=1, img_size=32, batch=2, steps=1, warmup=1, collect=2,
    overhead_model="test_vim", run_model="test_vim", run_data=(1, 1), recipe_model="test_defocus_mamba",
    recipe_images=1, recipe_device_batch=50, sync_scan=(1, 4, 5, 2),
    sync_model=(4, 1, 4), copy_numel=2 ** 20)
PARTS = ("correctness", "scan_speed", "throughput", "overhead", "run", "recipe")
# What each part imports before its budget starts (forking imports them all once, in the parent). setuptools
# comes before Avalanche: GPUtil, which Avalanche imports, needs distutils, on Python 3.12 only setuptools' shim.
PART_MODULES = {"correctness": ("mambacl.kernels.triton_scan", "mambacl.backbones"), "scan_speed": ("scan_speed",),
                "throughput": ("backbone_throughput",), "overhead": ("setuptools", "mambacl_overhead"),
                "run": ("setuptools", "mambacl.experiments", "mambacl.benchmarks.fscil"),
                "recipe": ("setuptools", "mambacl.experiments", "mambacl.benchmarks.fscil")}
FAILED = ("FAILED", "crashed", "killed")  # part statuses that fail the check


# ---------------------------------------------------------------- results file and log


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def read_json(out_dir: Path) -> Dict[str, Any]:
    return json.loads((out_dir / JSON_NAME).read_text())


def write_json(out_dir: Path, payload: Dict[str, Any]) -> None:
    """Replace the results file atomically (a reader never sees half a file)."""
    tmp = out_dir / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(out_dir / JSON_NAME)


def log(out_dir: Path, message: str) -> None:
    """Print a line and append it to the log file."""
    print(message, flush=True)
    with open(out_dir / LOG_NAME, "a") as f:
        f.write(message + "\n")


class PartRun:
    """One part in its own process: runs items while its budget lasts and saves the part after each one."""

    def __init__(self, name: str, budget_s: float, out_dir: Path) -> None:
        self.name, self.out_dir = name, out_dir
        self.deadline = time.monotonic() + budget_s
        self.record: Dict[str, Any] = {"budget_s": budget_s, "items": [], "skipped": []}
        self.save()

    def save(self) -> None:
        payload = read_json(self.out_dir)
        payload["parts"][self.name] = {**payload["parts"].get(self.name, {}), **self.record}
        write_json(self.out_dir, payload)

    def item(self, label: str, fn: Callable[[], Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Run ``fn`` unless the budget is spent and record its result (a dict; ``passed: False`` marks a
        failure), or the exception it raised. Returns the result, None when skipped or failed with an error."""
        if time.monotonic() >= self.deadline:
            if not self.record["skipped"]:
                log(self.out_dir, f"[{self.name}] the part's budget of {self.record['budget_s']:.0f} s is spent: "
                                  f"skipping {label!r} and every later item")
            self.record["skipped"].append(label)
            self.save()
            return None
        start = time.perf_counter()
        try:
            result = fn()
            status = "ok" if result.get("passed", True) else "FAIL"
        except Exception as err:  # noqa: BLE001  (record it precisely, keep running the other items)
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            status = "error"
        seconds = time.perf_counter() - start
        self.record["items"].append({"label": label, "status": status, "seconds": round(seconds, 3), **result})
        summary = result.get("summary") or result.get("error", "")
        log(self.out_dir, f"[{self.name}] {status:<5} {label} ({seconds:.1f} s) {summary}")
        if status == "error":
            log(self.out_dir, result["traceback"])
        self.save()
        return result if status != "error" else None


# ---------------------------------------------------------------- part 1: Triton against float64


@dataclass(frozen=True)
class ScanCase:
    op: str  # 'selective_scan' or 'longhorn_scan'
    shape: str  # a key of Plan.scan_shapes
    forms: Tuple[str, str]  # B/C (k/q) forms
    extras: bool  # D, z, delta_bias, softplus (Mamba; a quarter of delta above its threshold), the last state
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return (f"{self.op} {self.shape} {'/'.join(self.forms)} {'all-options' if self.extras else 'plain'} "
                f"{str(self.dtype).replace('torch.', '')}")


def scan_cases(plan: Plan) -> List[ScanCase]:
    """The correctness cases, most valuable first: Vim-shaped variable B/C with every option (fp32, bf16) and
    L 2048, both ops; then every B/C form with and without the options at the small shape; then the other forms
    at the Vim shape."""
    f32, bf16 = torch.float32, torch.bfloat16
    var, dim_small, dim_vim = ("var", "var"), plan.scan_shapes["small"][1], plan.scan_shapes["vim"][1]
    group_small = f"group{2 if dim_small % 2 == 0 else 1}"
    group_vim = f"group{2 if dim_vim % 4 else 4}"
    forms_small = [var, ("const", "const"), (group_small, group_small), ("const", "var"), ("var", group_small)]
    cases = [ScanCase("selective_scan", "vim", var, True, f32), ScanCase("selective_scan", "vim", var, True, bf16),
             ScanCase("selective_scan", "long", var, True, f32), ScanCase("longhorn_scan", "vim", var, True, f32),
             ScanCase("selective_scan", "long", var, True, bf16), ScanCase("longhorn_scan", "vim", var, True, bf16),
             ScanCase("longhorn_scan", "long", var, True, f32)]
    for op in ("selective_scan", "longhorn_scan"):
        for forms in forms_small:
            for extras in (True, False):
                for dtype in (f32, bf16):
                    cases.append(ScanCase(op, "small", forms, extras, dtype))
    for op in ("selective_scan", "longhorn_scan"):
        for forms in (("const", "const"), (group_vim, group_vim)):
            cases.append(ScanCase(op, "vim", forms, True, f32))
    return cases


def _compare(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Dict[str, Any]:
    """|actual - expected| <= atol + rtol |expected| elementwise (float64), with the worst element."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return {"passed": False, "why": f"shape {tuple(a.shape)} != {tuple(e.shape)}"}
    if a.numel() == 0:
        return {"passed": True, "max_abs_err": 0.0}
    excess = (a - e).abs() - (atol + rtol * e.abs())
    worst = int(excess.argmax())
    finite = bool(torch.isfinite(a).all())
    return {"passed": finite and float(excess.max()) <= 0, "finite": finite, "max_abs_err": float((a - e).abs().max()),
            "worst_index": [int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)],
            "worst": [float(a.flatten()[worst]), float(e.flatten()[worst])], "rtol": rtol, "atol": atol}


def check_scan_case(case: ScanCase, plan: Plan, device: str, seed: int) -> Dict[str, Any]:
    """Triton out, last state and every input gradient against the float64 reference on the same inputs."""
    from mambacl.kernels import longhorn_scan, selective_scan
    from mambacl.kernels.workload import scan_problem

    fn = selective_scan if case.op == "selective_scan" else longhorn_scan
    x = scan_problem(case.op, *plan.scan_shapes[case.shape], device=device, dtype=case.dtype, seed=seed,
                     bc_forms=case.forms, extras=case.extras)
    if case.extras and case.op == "selective_scan":
        with torch.no_grad():  # softplus' identity branch above 20, in the output and the delta gradient
            gen = torch.Generator(device=device).manual_seed(seed)
            high = torch.rand(x["delta"].shape, generator=gen, device=device) < 0.25
            x["delta"].copy_(torch.where(high, 20 + 5 * torch.rand(high.shape, generator=gen, device=device),
                                         x["delta"].float()))
    leaves = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}
    ref = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    out = fn(**x, return_last_state=case.extras, backend="triton")
    ref_out = fn(**ref, return_last_state=case.extras, backend="reference")
    if case.extras:
        (out, last), (ref_out, ref_last) = out, ref_out
    dout = torch.randn(ref_out.shape, generator=torch.Generator(device=device).manual_seed(seed + 1),
                       device=device, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    ref_grads = torch.autograd.grad(ref_out, [ref[k] for k in leaves], dout)
    rtol, atol = TOLERANCES[case.dtype]
    checks = {"out": _compare(out, ref_out, rtol, atol)}
    if case.extras:
        checks["last_state"] = _compare(last, ref_last, rtol, atol)
        checks["last_state"]["dtype_ok"] = last.dtype == torch.float32
    checks["out"]["dtype_ok"] = out.dtype == case.dtype
    for name, g, rg in zip(leaves, grads, ref_grads):
        scale = max(1.0, float(rg.abs().max()))  # sums over batch and time (dA, constant dB) grow with the shape
        checks[f"grad {name}"] = _compare(g, rg, rtol, atol * scale)
        checks[f"grad {name}"]["dtype_ok"] = g.dtype == leaves[name].dtype
    failed = [k for k, c in checks.items() if not c["passed"] or not c.get("dtype_ok", True)]
    worst = max(checks, key=lambda k: checks[k].get("max_abs_err", float("inf")))
    summary = (f"max |out err| {checks['out'].get('max_abs_err', float('nan')):.2e}, worst {worst} "
               f"{checks[worst].get('max_abs_err', float('nan')):.2e}")
    if failed:
        summary = "MISMATCH in " + ", ".join(
            f"{k} (max err {checks[k].get('max_abs_err', float('nan')):.3e} at {checks[k].get('worst_index')}: "
            f"{checks[k].get('worst')} [actual, reference])" for k in failed)
    return {"passed": not failed, "case": {"op": case.op, "shape": list(plan.scan_shapes[case.shape]),
                                           "shape_name": case.shape, "forms": list(case.forms),
                                           "extras": case.extras, "dtype": str(case.dtype)},
            "checks": checks, "failed": failed, "summary": summary}


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int:
    """Device-to-host synchronisations made by fn(): CUDA's sync debug mode on a GPU; elsewhere the profiler's
    host reads (``aten::_local_scalar_dense``, behind every ``.item()``/``bool()``, and ``aten::nonzero``), their
    CPU-side proxy."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return sum("synchroniz" in str(w.message) for w in caught)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in HOST_READS for e in prof.events())


def check_no_host_syncs(plan: Plan, device: str) -> Dict[str, Any]:
    """A Triton scan fwd+bwd and a Vim training step (fwd + CE + bwd) make no host sync with the finiteness
    check at its CUDA default (off); with ``MAMBACL_CHECK_FINITE=1`` a scan makes exactly one and NaN input
    raises, which shows that the counter sees syncs. On the CPU the check is on by default, so there the first
    count is taken with it off, as on CUDA."""
    from mambacl.backbones import VisionMamba
    from mambacl.kernels import selective_scan
    from mambacl.kernels.utils import FINITE_CHECK_ENV
    from mambacl.kernels.workload import scan_problem

    dev = torch.device(device)
    x = scan_problem("selective_scan", *plan.sync_scan, device=device)
    leaves = [v for v in x.values() if isinstance(v, torch.Tensor)]

    def scan_step():
        out = selective_scan(**x, backend="triton")
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    torch.manual_seed(0)
    img_size, depth, width = plan.sync_model
    model = VisionMamba(img_size=img_size, patch_size=16 if img_size >= 16 else 4, depth=depth, embed_dim=width,
                        num_classes=10, scan_impl="triton").to(dev).train()
    images, labels = torch.randn(4, 3, img_size, img_size, device=dev), torch.arange(4, device=dev)

    def model_step():
        torch.nn.functional.cross_entropy(model(images), labels).backward()

    def counted(setting: Optional[str], fn: Callable[[], object]) -> int:
        if setting is None:
            os.environ.pop(FINITE_CHECK_ENV, None)
        else:
            os.environ[FINITE_CHECK_ENV] = setting
        try:
            return count_host_syncs(fn, dev)
        finally:
            os.environ.pop(FINITE_CHECK_ENV, None)

    default = None if dev.type == "cuda" else "0"
    if dev.type == "cuda":
        scan_step(), model_step()  # compile first
    syncs = {"scan": counted(default, scan_step), "vim": counted(default, model_step)}
    checked = counted("1", scan_step)
    x["u"].data[0, 0, 0] = float("nan")
    try:
        counted("1", scan_step)
        nan_raises = False
    except ValueError as err:
        nan_raises = "u: non-finite" in str(err)
    passed = syncs == {"scan": 0, "vim": 0} and checked == 1 and nan_raises
    return {"passed": passed, "syncs_default": syncs, "syncs_with_check": checked, "nan_raises": nan_raises,
            "summary": f"host syncs with the check off (CUDA's default): {syncs}; with {FINITE_CHECK_ENV}=1: "
                       f"{checked} per scan call, NaN raises: {nan_raises}"}


@contextlib.contextmanager
def _poisoned_empty():
    """NaN-fill floating ``torch.empty`` results so an element a kernel leaves unwritten fails its check."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = empty


def part_correctness(run: PartRun, plan: Plan, device: str, scan_impl: str) -> None:
    cases = scan_cases(plan)
    for i, case in enumerate(cases):
        if i == 4:  # after the Vim-shaped cases of both ops, before the poisoning (it would add no syncs, but work)
            run.item("no host syncs on the hot path", lambda: check_no_host_syncs(plan, device))
        with _poisoned_empty():
            run.item(case.label, lambda case=case, i=i: check_scan_case(case, plan, device, seed=1000 + i))


# ---------------------------------------------------------------- part 2: scan speed


def part_scan_speed(run: PartRun, plan: Plan, device: str, scan_impl: str) -> None:
    import scan_speed

    dev = torch.device(device)

    def copy_bandwidth():
        gbs = scan_speed.copy_bandwidth(dev, plan.copy_numel)
        return {"copy_gbs": gbs, "summary": f"{gbs:.0f} GB/s (read + write)"}
    copy = run.item("device copy bandwidth", copy_bandwidth) or {}
    pscan_ok = scan_speed.has_mambapy()
    run.record["pscan"] = pscan_ok
    for op in ("selective_scan", "longhorn_scan"):
        for name, shape in plan.speed_configs.items():
            backends = scan_speed.timed_backends(op, shape, dev, pscan_ok, reference_long=False)
            backends.sort(key=["triton", "chunk", "pscan", "reference"].index)

            def checked(op=op, shape=shape, backends=backends):
                try:
                    errors = scan_speed.check(op, backends, shape, device)
                except AssertionError as err:
                    return {"passed": False, "summary": str(err)}
                return {"errors": errors, "summary": f"errors (out, rel grad) {errors}"}
            errors = (run.item(f"{op} {name} check against the reference", checked) or {}).get("errors", {})
            for backend in backends:
                def timed(op=op, name=name, shape=shape, backend=backend):
                    m = scan_speed.measure(op, backend, shape, device, 1 if backend == "reference" else
                                           plan.speed_repeat, copy_gbs=copy.get("copy_gbs"))
                    rec = {"op": op, "config": name, "shape": list(shape), "backend": backend,
                           "check_errors": errors.get(backend), **m}
                    return {"record": rec, "summary": f"fwd {1e3 * m['fwd_s']:.3f} ms, fwd+bwd "
                                                      f"{1e3 * m['fwd_bwd_s']:.3f} ms" +
                                                      (f", {m['bandwidth_gbs']:.0f} GB/s" if "bandwidth_gbs" in m
                                                       else "")}
                run.item(f"{op} {name} {backend}", timed)


# ---------------------------------------------------------------- parts 3 and 4: throughput, Mamba-CL overhead


def part_throughput(run: PartRun, plan: Plan, device: str, scan_impl: str) -> None:
    import backbone_throughput as bt

    dev = torch.device(device)
    run.record["scan_impl"] = scan_impl

    def reference_check():
        err = bt.check_against_reference(plan.img_size, scan_impl, dev)
        return {"max_err": err, "summary": f"max |logit err| {err:.1e}"}
    check = run.item("vim_tiny (2 layers) against the reference scan", reference_check) or {}
    run.record["ref_check_max_err"] = check.get("max_err", float("nan"))
    for precision in bt.AUTOCAST:
        for name, kwargs in (("vim_tiny_patch16_224", {"scan_impl": scan_impl}), ("deit_tiny_patch16_224", {})):
            def timed(name=name, kwargs=kwargs, precision=precision):
                r = bt.throughput(name, plan.img_size, plan.batch, plan.steps, dev, precision, plan.warmup, **kwargs)
                return {"model": name, "precision": precision, **r,
                        "summary": f"{r['img_s']:.1f} img/s, peak {r['peak_mib']:.0f} MiB"}
            run.item(f"{name} {precision} batch {plan.batch} at {plan.img_size} px", timed)


def part_overhead(run: PartRun, plan: Plan, device: str, scan_impl: str) -> None:
    import mambacl_overhead as mo

    def bench():
        r = mo.bench_size(plan.img_size, plan.batch, plan.steps, plan.collect, 5000, torch.device(device),
                          plan.overhead_model)
        return {"passed": r["max_rel_err"] <= mo.MAX_STEP_ERR, "record": r,
                "summary": f"projection {1e3 * r['projection_s']:.1f} ms/step ({100 * r['projection_overhead']:+.1f}%),"
                           f" boundary / Mamba-CL epoch {100 * r['boundary_over_mambacl_epoch']:.1f}%, step err "
                           f"{r['max_rel_err']:.1e}"}
    run.item(f"{plan.overhead_model} batch {plan.batch} at {plan.img_size} px", bench)


# ---------------------------------------------------------------- part 5: a mambacl run


def mambacl_run(plan: Plan, device: str, scan_impl: str) -> Dict[str, Any]:
    """One experience of Mamba-CL on generated CIFAR-100 files, device ``device``, bf16 autocast."""
    from mambacl.benchmarks.fscil import write_synthetic_cifar100
    from mambacl.experiments import RunConfig, run_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cifar100(Path(tmp) / "cifar", num_classes=100, train_per_class=plan.run_data[0],
                                 test_per_class=plan.run_data[1])
        config = RunConfig(benchmark="split_cifar100", strategy="mambacl", model=plan.run_model,
                           model_args={"scan_impl": scan_impl}, epochs=1, batch_size=plan.batch,
                           eval_batch_size=plan.batch, device=device, autocast="bf16", progress=False,
                           out=str(Path(tmp) / "run"),  # a fresh folder
                           benchmark_args={"root": str(Path(tmp) / "cifar"), "n_experiences": 10,
                                           "img_size": plan.img_size, "class_order": "pycil", "download": False})
        results = run_benchmark(config, stop_after=1)
        files = sorted(p.name for p in (Path(tmp) / "run").iterdir())
    row = results["experiences"][0]
    passed = results["finished"] == 1 and "results.json" in files and 0.0 <= row["acc_stream"] <= 1.0
    return {"passed": passed, "finished": results["finished"], "acc_stream": row["acc_stream"],
            "train_s": row["train_s"], "eval_s": row["eval_s"], "files": files, "model": plan.run_model,
            "img_size": plan.img_size, "batch": plan.batch, "images_per_class": list(plan.run_data),
            "summary": f"experience 1/10: seen-class acc {row['acc_stream']:.3f}, train {row['train_s']:.1f} s, "
                       f"eval {row['eval_s']:.1f} s; files {files}"}


def part_run(run: PartRun, plan: Plan, device: str, scan_impl: str) -> None:
    run.item(f"mambacl run: split_cifar100 (generated), {plan.run_model}, {device}, bf16 autocast",
             lambda: mambacl_run(plan, device, scan_impl))


def recipe_first_experience(plan: Plan, device: str, scan_impl: str) -> Dict[str, Any]:
    """Training of the first experience of mambacl-cifar100-10 at the recipe's width, batch 200 (in micro-batches
    of ``plan.recipe_device_batch``), AutoAugment 192 px, x5 repeated data, on generated CIFAR-100 files, from
    random init (no checkpoint here): images/s over the experience's training steps and peak GPU memory. The
    boundary pass (covariances and their decomposition) is left out: the overhead part measures it."""
    from mambacl.benchmarks.fscil import write_synthetic_cifar100
    from mambacl.experiments import RunConfig
    from mambacl.experiments.recipe import apply_recipe
    from mambacl.experiments import runner
    from mambacl.strategies.plugins import NullSpacePlugin

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cifar100(Path(tmp) / "cifar", num_classes=100, train_per_class=plan.recipe_images,
                                 test_per_class=1)
        config = RunConfig.from_dict(apply_recipe("mambacl-cifar100-10", {
            "pretrained": None, "model": plan.recipe_model, "model_args": {"scan_impl": scan_impl},
            "device": device, "autocast": "bf16", "progress": False, "epochs": 1,
            "max_device_batch": plan.recipe_device_batch, "out": str(Path(tmp) / "run"),
            "benchmark_args": {"root": str(Path(tmp) / "cifar"), "download": False}}))
        original = NullSpacePlugin.after_training_exp
        NullSpacePlugin.after_training_exp = lambda self, strategy, **kwargs: None  # train only
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            results = runner.run_benchmark(config, stop_after=1)
        finally:
            NullSpacePlugin.after_training_exp = original
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else float("nan")
    row = results["experiences"][0]
    images = 10 * plan.recipe_images * config.data_repeat * config.epochs
    return {"model": plan.recipe_model, "images": images, "train_s": row["train_s"],
            "img_s": images / row["train_s"], "peak_mib": peak, "batch": config.batch_size,
            "device_batch": plan.recipe_device_batch,
            "summary": f"{images} images in {row['train_s']:.1f} s: {images / row['train_s']:.1f} img/s, "
                       f"peak {peak:.0f} MiB (batch {config.batch_size} in micro-batches of "
                       f"{plan.recipe_device_batch}, bf16 autocast)"}


def part_recipe(run: PartRun, plan: Plan, device: str, scan_impl: str) -> None:
    run.item(f"mambacl-cifar100-10, first experience, {plan.recipe_model}, {device}",
             lambda: recipe_first_experience(plan, device, scan_impl))


PART_FNS = {"correctness": part_correctness, "scan_speed": part_scan_speed, "throughput": part_throughput,
            "overhead": part_overhead, "run": part_run, "recipe": part_recipe}


# ---------------------------------------------------------------- the parent: plan, processes, summary


def _child(name: str, budget_s: float, out_dir: str, dry_run: bool, scan_impl: str) -> None:
    """Entry point of a part's process."""
    out = Path(out_dir)
    plan = DRY_PLAN if dry_run else GPU_PLAN
    if dry_run:
        torch.set_num_threads(1)
    for module in PART_MODULES[name]:
        importlib.import_module(module)
    run = PartRun(name, budget_s, out)
    try:
        PART_FNS[name](run, plan, "cpu" if dry_run else "cuda", scan_impl)
    except Exception as err:  # noqa: BLE001  (outside any item: record it, then exit non-zero)
        run.record["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"
        run.save()
        log(out, f"[{name}] error outside an item: {run.record['error']}")
        raise
    run.record["done"] = True
    run.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is saved: skip the interpreter's (and Avalanche's loggers') slow shutdown


def _part_status(part: Dict[str, Any], exitcode: Optional[int], killed: bool) -> str:
    items = part.get("items", [])
    if killed and not part.get("done"):
        return "killed at its limit"
    if exitcode != 0 and not part.get("done"):
        return f"crashed (exit code {exitcode})"
    if any(i["status"] != "ok" for i in items):
        return "FAILED"
    return "partial (budget spent)" if part.get("skipped") else "ok"


def source_digest() -> str:
    """sha256 of the package and benchmark sources (ties a result to a commit where git is absent)."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("mambacl/**/*.py"), *ROOT.glob("benchmarks/*.py"), ROOT / "pyproject.toml"]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _versions() -> Dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_plan(out_dir: Path, dry_run: bool, parts: List[str], total_s: float, start_method: Optional[str] = None
             ) -> int:
    """Run ``parts`` in order, each in a process of its own; returns 1 when a part failed, crashed or was
    killed, else 0 (parts cut short by their budget included)."""
    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = DRY_PLAN if dry_run else GPU_PLAN
    if dry_run:  # every part gets its budget: the dry run is there to exercise them all
        total_s = sum(plan.budgets[p] + GRACE_S for p in parts)
    payload = {"schema": 1, "dry_run": dry_run, "started": _now(), "machine": machine_info(), "versions": _versions(),
               "source_digest": source_digest(), "total_budget_s": total_s, "plan": list(parts), "parts": {}}
    write_json(out_dir, payload)
    log(out_dir, f"gpu_check {'dry run (CPU, toy sizes)' if dry_run else 'on ' + payload['machine'].get('gpu', '?')}: "
                 f"parts {', '.join(parts)} in at most {total_s:.0f} s; versions {payload['versions']}")
    # Without CUDA the parts fork this process (no re-import); with CUDA each starts a fresh interpreter, as a
    # forked child cannot use CUDA once the parent touched it.
    context = multiprocessing.get_context(start_method or ("spawn" if torch.cuda.is_available() else "fork"))
    if context.get_start_method() == "fork":
        for name in parts:
            for module in PART_MODULES[name]:
                importlib.import_module(module)
    scan_impl = "auto"
    for name in parts:
        left = total_s - (time.monotonic() - start)
        budget = min(plan.budgets[name], left - GRACE_S)
        if budget < (MIN_PART_S if not dry_run else 1):
            payload = read_json(out_dir)
            payload["parts"][name] = {"status": "skipped: the total budget is spent", "items": [], "skipped": []}
            write_json(out_dir, payload)
            log(out_dir, f"[{name}] SKIPPED: {left:.0f} s of the total {total_s:.0f} s left")
            continue
        log(out_dir, f"[{name}] start, budget {budget:.0f} s, scan_impl {scan_impl}")
        part_start = time.monotonic()
        proc = context.Process(target=_child, args=(name, budget, str(out_dir), dry_run, scan_impl))
        proc.start()
        proc.join(min(budget + GRACE_S + START_S, total_s - (time.monotonic() - start)))
        killed = proc.is_alive()
        if killed:
            proc.kill()
            proc.join()
        payload = read_json(out_dir)
        part = payload["parts"].setdefault(name, {"items": [], "skipped": []})
        part.update(status=_part_status(part, proc.exitcode, killed), wall_s=round(time.monotonic() - part_start, 1),
                    scan_impl=scan_impl)
        write_json(out_dir, payload)
        log(out_dir, f"[{name}] {part['status']} after {part['wall_s']} s")
        if name == "correctness" and part["status"] != "ok" and not dry_run:
            scan_impl = "chunk"  # later parts measure the models on the chunk path rather than a suspect kernel
            log(out_dir, "the Triton check did not pass: the following parts use scan_impl='chunk'")
    payload = read_json(out_dir)
    payload["finished"], payload["wall_s"] = _now(), round(time.monotonic() - start, 1)
    write_json(out_dir, payload)
    log(out_dir, summary_table(payload))
    return 1 if any(payload["parts"][p].get("status", "").startswith(FAILED) for p in parts) else 0


def summary_table(payload: Dict[str, Any]) -> str:
    rows = []
    for name, part in payload["parts"].items():
        items = part.get("items", [])
        failed = [i["label"] for i in items if i["status"] != "ok"]
        rows.append([name, part.get("status", "?"), f"{sum(i['status'] == 'ok' for i in items)}/{len(items)}",
                     len(part.get("skipped", [])), part.get("wall_s", "-"), "; ".join(failed) or "-"])
    return markdown_table(["part", "status", "items ok", "items skipped", "wall s", "failed items"], rows)


# ---------------------------------------------------------------- --record: the CUDA sections of RESULTS.md


def _items(payload: Dict[str, Any], part: str) -> List[Dict[str, Any]]:
    return payload["parts"].get(part, {}).get("items", [])


def _machine_for_record(payload: Dict[str, Any]) -> Dict[str, str]:
    """The device run's machine, with the commit filled in from this checkout where the device had no git and
    the sources are identical."""
    machine = dict(payload["machine"])
    if machine.get("commit", "unknown") == "unknown":
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        same = payload.get("source_digest") == source_digest()
        machine["commit"] = f"{head} (sources identical)" if same and head else "unknown (sources differ from HEAD)"
    return machine


def check_section(payload: Dict[str, Any]) -> Tuple[str, str]:
    """Table and notes of the GPU check's own section: part statuses, the correctness cases, host syncs, the run."""
    tables = [summary_table(payload)]
    rows = []
    for item in _items(payload, "correctness"):
        case = item.get("case")
        if case is None:
            continue
        checks = item.get("checks", {})
        worst = max(checks, key=lambda k: checks[k].get("max_abs_err", 0.0)) if checks else "-"
        rows.append([case["op"], case["shape_name"], "x".join(map(str, case["shape"])), "/".join(case["forms"]),
                     "all" if case["extras"] else "plain", case["dtype"].replace("torch.", ""), item["status"],
                     f"{checks.get('out', {}).get('max_abs_err', float('nan')):.1e}",
                     f"{worst} {checks.get(worst, {}).get('max_abs_err', float('nan')):.1e}" if checks else "-"])
    if rows:
        tables.append(markdown_table(["op", "shape", "b x D x L x N", "B/C", "options", "dtype", "result",
                                      "max abs out err", "largest abs err (tensor)"], rows))
    notes = ["Correctness: Triton forward and backward (out, last state, every input gradient) against the float64 "
             "reference on the same inputs, torch.empty NaN-poisoned; tolerances as mamba-ssm's tests (fp32 rtol 6e-4 "
             "atol 2e-3, bf16 3e-2 / 5e-2; gradient atol scaled by max(1, max |ref grad|)). 'all': D, z, "
             "delta_bias, softplus with a quarter of delta above its threshold 20 (Mamba), the last state; 'plain': "
             "none of them (out alone returned)."]
    for item in _items(payload, "correctness"):
        if item["label"] == "no host syncs on the hot path":
            notes.append(f"Host syncs ({item['status']}): {item.get('summary') or item.get('error')}.")
    for item in _items(payload, "run"):
        notes.append(f"mambacl run ({item['status']}): {item['label']}; {item.get('summary') or item.get('error')}.")
    failures = [f"{p}: {i['label']}: {i.get('summary') or i.get('error')}" for p in payload["parts"]
                for i in _items(payload, p) if i["status"] != "ok"]
    if failures:
        notes.append("Failures:\n" + "\n".join(f"- {f}" for f in failures))
    notes.append(f"Versions: {payload['versions']}. Wall time {payload.get('wall_s', '?')} s of a "
                 f"{payload['total_budget_s']:.0f} s budget.")
    return "\n\n".join(tables), "\n".join(notes)


def record_payload(payload: Dict[str, Any], results: Path = RESULTS_MD) -> List[str]:
    """Write the sections of one check's results into ``results``; returns their titles."""
    import backbone_throughput as bt
    import mambacl_overhead as mo
    import scan_speed

    machine, stamp, titles = _machine_for_record(payload), payload["started"], []

    def put(title: str, table: str, notes: str) -> None:
        record_results(title, table, notes, machine, stamp, results)
        titles.append(title)

    put("GPU check (benchmarks/gpu_check.py)", *check_section(payload))
    speed = [i["record"] for i in _items(payload, "scan_speed") if i["status"] == "ok" and "record" in i]
    if speed:
        repeat = GPU_PLAN.speed_repeat if not payload["dry_run"] else DRY_PLAN.speed_repeat
        notes = scan_speed.speed_notes(speed, repeat, int(machine["torch_threads"]), False,
                                       payload["parts"]["scan_speed"].get("pscan", False), cpu="gpu" not in machine)
        put("Selective-scan speed (scan_speed.py)", scan_speed.speed_table(speed), "\n".join(notes))
    part = payload["parts"].get("throughput", {})
    timed = {(i["model"], i["precision"]): i for i in _items(payload, "throughput") if "img_s" in i}
    rows = []
    for precision in bt.AUTOCAST:
        vim, deit = timed.get(("vim_tiny_patch16_224", precision)), timed.get(("deit_tiny_patch16_224", precision))
        if vim and deit:
            plan = DRY_PLAN if payload["dry_run"] else GPU_PLAN
            rows.append(bt.throughput_row(dict(
                device="cuda" if not payload["dry_run"] else "cpu", img_size=plan.img_size, batch=plan.batch,
                precision=precision, vim_tiny_img_s=vim["img_s"], deit_tiny_img_s=deit["img_s"],
                vim_tiny_peak_mib=vim["peak_mib"], deit_tiny_peak_mib=deit["peak_mib"],
                ref_check_max_err=part.get("ref_check_max_err", float("nan")))))
    if rows:
        plan = DRY_PLAN if payload["dry_run"] else GPU_PLAN
        put("Backbone training throughput (benchmarks/backbone_throughput.py)", markdown_table(bt.HEADER, rows),
            bt.throughput_notes(part.get("scan_impl", "auto"), plan.steps, plan.warmup))
    overhead = [i["record"] for i in _items(payload, "overhead") if "record" in i]
    if overhead:
        put("Mamba-CL overhead (benchmarks/mambacl_overhead.py)", mo.overhead_table(overhead, 5000), mo.NOTES)
    recipe = [i for i in _items(payload, "recipe") if "img_s" in i]
    if recipe:
        header = ["recipe", "model", "global batch", "micro-batch", "images", "train s", "img/s", "peak MiB"]
        rows = [["mambacl-cifar100-10 (first experience)", i["model"], i["batch"], i["device_batch"], i["images"],
                 f"{i['train_s']:.1f}", f"{i['img_s']:.1f}", f"{i['peak_mib']:.0f}"] for i in recipe]
        put("Recipe at full width (gpu_check.py recipe part)", markdown_table(header, rows),
            "Training steps of the first experience under the recipe's settings (Adam + L2, heads x50, AutoAugment "
            "192 px, data x5, bf16 autocast) on generated CIFAR-100 files from random init; the boundary pass is "
            "left out (see the Mamba-CL overhead section).")
    return titles


def record(json_path: Path) -> None:
    """``--record``: the CUDA sections of RESULTS.md from a device run's JSON, kept as benchmarks/gpu_check.json."""
    payload = json.loads(json_path.read_text())
    if payload.get("dry_run"):
        raise SystemExit(f"{json_path} is a dry run (CPU, toy sizes): nothing recorded")
    if "gpu" not in payload["machine"]:
        raise SystemExit(f"{json_path} names no GPU in its machine description: nothing recorded")
    titles = record_payload(payload)
    kept = ROOT / "benchmarks" / JSON_NAME
    if json_path.resolve() != kept.resolve():
        shutil.copyfile(json_path, kept)
    print(f"recorded in {RESULTS_MD}: {'; '.join(titles)}; results kept as {kept}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, help="where gpu_check.json and gpu_check.log go (device: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU at toy sizes "
                        "(Triton in its interpreter)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run, in order")
    parser.add_argument("--total-s", type=float, default=TOTAL_S, help="time budget of the whole check (s)")
    parser.add_argument("--start-method", choices=["spawn", "fork"], help="how the parts' processes start "
                        "(default: spawn with CUDA, fork without)")
    parser.add_argument("--record", type=Path, metavar="JSON", help="write the CUDA sections of RESULTS.md from "
                        "a device run's gpu_check.json instead of running the check")
    args = parser.parse_args(argv)
    if args.record:
        record(args.record)
        return 0
    if args.out_dir is None:
        parser.error("--out-dir is required to run the check")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run for the CPU toy plan")
    parts = [p for p in PARTS if p in args.parts]
    return run_plan(args.out_dir, args.dry_run, parts, args.total_s, args.start_method)


if __name__ == "__main__":
    if "--dry-run" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, in this process and its parts
    sys.exit(main())
