"""Pieces of benchmarks/scan_speed.py: the mambapy pscan baseline computes the same scan; the CPU peak meter."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scan_oracle import SHAPES, check_against_oracle, make_inputs, mamba_oracle

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import scan_speed  # noqa: E402


def test_pscan_baseline_matches_oracle():
    pytest.importorskip("mambapy.pscan")
    case = SHAPES["odd-dim-N1-var"].with_(seqlen=11, D=True, z=True, delta_bias=True, softplus=True)
    x = make_inputs(case, torch.float32, "mamba")
    check_against_oracle(lambda **kw: scan_speed.pscan_selective_scan(**kw, delta_softplus=True), mamba_oracle, x,
                         {"delta_softplus": True}, False, torch.float32)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc needed for an exact reading")
def test_cpu_peak_bytes_sees_a_transient_allocation_after_a_larger_one():
    # in a fresh interpreter, as the benchmark runs: in a long test session the allocator may serve the block
    # from memory that is already resident, and then there is no new peak to see
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import scan_speed
big = torch.ones(64 * 2 ** 20 // 4)  # an earlier, larger peak must not hide the measured one
del big
print(scan_speed.cpu_peak_bytes(lambda: torch.ones(32 * 2 ** 20 // 4).sum()))
"""
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[2] / "benchmarks")],
                         capture_output=True, text=True, check=True).stdout
    assert 30 * 2 ** 20 < float(out.split()[-1]) < 48 * 2 ** 20
