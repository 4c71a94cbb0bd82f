"""Smoke test: benchmarks/guest_speed.py runs end to end in its --quick form and prints its Markdown table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toyvm import native

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "guest_speed.py"


@pytest.mark.slow
def test_guest_speed_quick(tmp_path: Path) -> None:
    if native.load() is None:
        pytest.skip(f"the benchmark compares against native hooks, which are unavailable: {native.error()}")
    report = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--quiet", "--json", str(report)],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| workload | instructions | raw MIPS | toyvm native MIPS | native/raw |" in done.stdout
    assert "\n| compute | " in done.stdout
    doc = json.loads(report.read_text())
    compute = doc["speed"]["compute"]
    assert compute["instructions"] == doc["workloads"]["compute"]["toyvm_python_counts"][0]
    for config in ("raw", "toyvm-native", "toyvm-python"):
        assert compute["configs"][config]["mips"] > 0
