"""benchmarks/gpu_check.py: items are recorded precisely (failures, errors, the budget); the dry run (CPU, toy
sizes) runs every part of the GPU plan, and its results file turns into RESULTS.md sections."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402

from mambacl.kernels.selective_scan import triton as selective_triton  # noqa: E402


def _empty_results(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gpu_check.write_json(out, {"parts": {}})


def test_part_run_records_results_failures_errors_and_the_budget(tmp_path):
    _empty_results(tmp_path)
    run = gpu_check.PartRun("demo", 60, tmp_path)
    assert run.item("fine", lambda: {"value": 1}) == {"value": 1}
    run.item("mismatch", lambda: {"passed": False, "summary": "MISMATCH in out"})
    assert run.item("raises", lambda: 1 / 0) is None
    run.deadline = 0  # budget spent: later items are skipped, not run
    assert run.item("late", lambda: pytest.fail("ran after the budget")) is None
    part = gpu_check.read_json(tmp_path)["parts"]["demo"]
    assert [(i["label"], i["status"]) for i in part["items"]] == [("fine", "ok"), ("mismatch", "FAIL"),
                                                                  ("raises", "error")]
    assert "ZeroDivisionError" in part["items"][2]["error"] and "1 / 0" in part["items"][2]["traceback"]
    assert part["skipped"] == ["late"]
    assert gpu_check._part_status(part, 0, killed=False) == "FAILED"
    assert gpu_check._part_status({"items": part["items"][:1], "skipped": []}, -9, killed=True) == \
        "killed at its limit"
    log = (tmp_path / gpu_check.LOG_NAME).read_text()
    assert "[demo] FAIL  mismatch" in log and "skipping 'late' and every later item" in log


def test_a_wrong_triton_output_is_reported_with_the_tensor_and_the_element(monkeypatch):
    real = selective_triton.selective_scan_triton

    def off_by_one_element(*args, **kwargs):
        out = real(*args, **kwargs)  # the plain case asks for out alone
        return out + torch.nn.functional.one_hot(torch.tensor(7), out.numel()).reshape(out.shape)
    monkeypatch.setattr(selective_triton, "selective_scan_triton", off_by_one_element)
    case = gpu_check.ScanCase("selective_scan", "small", ("var", "var"), False, torch.float32)
    result = gpu_check.check_scan_case(case, gpu_check.DRY_PLAN, "cpu", seed=0)
    assert not result["passed"] and result["failed"] == ["out"]
    assert result["checks"]["out"]["worst_index"] == [0, 1, 2]  # flat index 7 of (1, 4, 5)
    assert result["summary"].startswith("MISMATCH in out") and result["checks"]["grad u"]["passed"]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_records_its_sections(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    payload = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert payload["dry_run"] and list(payload["parts"]) == list(gpu_check.PARTS)
    for name, part in payload["parts"].items():
        assert part["status"] in ("ok", "partial (budget spent)"), (name, part["status"])
        assert part["items"] and all(i["status"] == "ok" for i in part["items"]), name
    correctness = payload["parts"]["correctness"]["items"]
    cases = gpu_check.scan_cases(gpu_check.DRY_PLAN)
    assert [i["label"] for i in correctness[:4]] == [c.label for c in cases[:4]]
    assert correctness[4]["label"] == "no host syncs on the hot path" and correctness[4]["syncs_with_check"] == 1
    assert set(correctness[0]["checks"]) == {"out", "last_state", *(f"grad {n}" for n in
                                             ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))}
    assert payload["parts"]["run"]["items"][0]["finished"] == 1
    assert "| run | ok |" in (out / gpu_check.LOG_NAME).read_text()

    with pytest.raises(SystemExit, match="dry run"):
        gpu_check.main(["--record", str(out / gpu_check.JSON_NAME)])
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    titles = gpu_check.record_payload(payload, results)
    assert titles == ["GPU check (benchmarks/gpu_check.py)", "Selective-scan speed (scan_speed.py)",
                      "Backbone training throughput (benchmarks/backbone_throughput.py)",
                      "Mamba-CL overhead (benchmarks/mambacl_overhead.py)",
                      "Recipe at full width (gpu_check.py recipe part)"]
    recipe = payload["parts"]["recipe"]["items"][0]
    assert recipe["images"] == 10 * 1 * 5 and recipe["batch"] == 200 and recipe["img_s"] > 0
    text = results.read_text()
    assert all(text.count(f"## {t}\n") == 1 for t in titles)
    assert "| selective_scan | vim | 1x6x4x4 | var/var | all | float32 | ok |" in text
    assert "| selective_scan | vim-tiny | 2x8x9x4 | chunk |" in text and "mambacl run (ok)" in text
