"""Shared helpers for the benchmark scripts: machine description, timing, JSON and RESULTS.md output."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_MD = Path(__file__).with_name("RESULTS.md")


def machine_info() -> Dict[str, str]:
    """Describe the machine and the code version a figure was measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "commit": commit or "unknown",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def device_name(info: Dict[str, str]) -> str:
    """The device a figure was measured on, as RESULTS.md names it (the GPU, else the CPU and its threads)."""
    return info.get("gpu", f"CPU only ({info['cpu_count']} cores, {info['torch_threads']} torch threads)")


def describe_machine(info: Optional[Dict[str, str]] = None) -> str:
    """One line naming the device, torch, Python and commit of ``info`` (default: this machine)."""
    info = info or machine_info()
    return f"{device_name(info)}; torch {info['torch']}, Python {info['python']}, commit {info['commit']}"


def time_call(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def markdown_table(header: Sequence[str], rows: List[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(name: str, payload: dict, table: str, title: str, notes: str = "", record: bool = True) -> None:
    """Print the table, write ``<name>.json`` next to the scripts and record a section in RESULTS.md (see
    :func:`record_results`)."""
    print(table)
    payload = {"machine": machine_info(), **payload}
    Path(__file__).with_name(f"{name}.json").write_text(json.dumps(payload, indent=2))
    if record:
        record_results(title, table, notes, payload["machine"])


def record_results(title: str, table: str, notes: str, machine: Dict[str, str], stamp: Optional[str] = None,
                   results: Path = RESULTS_MD) -> None:
    """Write the section ``title`` measured on ``machine`` (a :func:`machine_info`) into ``results``: it replaces
    the section of the same title measured on the same device (older figures and notes on it are superseded),
    else it is appended.

    Args:
        stamp: when the figures were measured (default: now, UTC).
    """
    stamp = stamp or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = f"## {title}\n\nMeasured {stamp} on {describe_machine(machine)}.\n\n{table}\n"
    if notes:
        section += f"\n{notes}\n"
    results.write_text(record_section(results.read_text() if results.exists() else "", section, device_name(machine)))


def record_section(document: str, section: str, device: str) -> str:
    """``document`` with ``section`` in place of the sections that have its heading and were measured on
    ``device``, or appended when there is none."""
    parts = re.split(r"(?m)^(?=## )", document)
    heading = section.splitlines()[0]
    stale = [i for i, part in enumerate(parts)
             if part.splitlines()[:1] == [heading] and f" on {device};" in "".join(part.split("\n\n", 2)[1:2])]
    body = [part.rstrip("\n") + "\n\n" for i, part in enumerate(parts) if i not in stale[1:]]
    if stale:
        body[stale[0]] = section + "\n"
    else:
        body.append(section + "\n")
    return "".join(body).rstrip("\n") + "\n"
