"""RESULTS.md bookkeeping of the benchmark scripts (benchmarks/_common.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _common import record_section  # noqa: E402

CPU = "CPU only (2 cores, 2 torch threads)"
GPU = "NVIDIA H100 80GB HBM3"
DOC = ("# Benchmark results\n\nIntro.\n\n"
       f"## Scan speed\n\nMeasured 2026-01-01 on {CPU}; torch 2, commit a.\n\n| old cpu |\n\nReading: old.\n\n"
       f"## Scan speed\n\nMeasured 2026-01-02 on {GPU}; torch 2, commit a.\n\n| gpu |\n\n"
       f"## Other\n\nMeasured 2026-01-01 on {CPU}; torch 2, commit a.\n\n| other |\n")


def _section(title: str, device: str, table: str) -> str:
    return f"## {title}\n\nMeasured 2026-02-01 on {device}; torch 2, commit b.\n\n{table}\n"


def test_record_section_replaces_the_same_title_and_device_in_place():
    out = record_section(DOC, _section("Scan speed", CPU, "| new cpu |"), CPU)
    assert "| old cpu |" not in out and "Reading: old." not in out
    assert out.index("| new cpu |") < out.index("| gpu |") < out.index("| other |")
    assert out.count("## Scan speed") == 2 and out.startswith("# Benchmark results\n\nIntro.\n\n## Scan speed")


def test_record_section_appends_a_new_title_or_device_and_drops_older_duplicates():
    out = record_section(DOC, _section("Other", GPU, "| other gpu |"), GPU)
    assert out.endswith("| other gpu |\n") and "| other |" in out and out.count("## Other") == 2
    doubled = DOC + "\n" + _section("Other", CPU, "| other again |")
    out = record_section(doubled, _section("Other", CPU, "| newest |"), CPU)
    assert out.count("## Other") == 1 and "| newest |" in out and "| other again |" not in out
