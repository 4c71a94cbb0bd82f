"""Smoke test: benchmarks/delta_cost.py runs kvstore under redis-benchmark with and without --delta through a
real local cluster and reports both (no timing is asserted; bytes are: XOR deltas of pages a SET barely touches
compress to far less than the pages)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "delta_cost.py"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="needs redis-benchmark (redis-tools)")
def test_delta_quick(tmp_path: Path) -> None:
    report = tmp_path / "delta.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--seconds", "2", "--only", "kvstore",
                           "-q", "--json", str(report)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| kvstore SET -d 64 | plain | " in done.stdout and "| kvstore SET -d 64 | delta | " in done.stdout
    runs = {r["delta"]: r for r in json.loads(report.read_text())["runs"]}
    plain, delta = runs[False], runs[True]
    for r in (plain, delta):
        assert r["checkpoints"] >= 5 and r["dirty_median"] > 0 and r["pause_ms"] > 0
    assert delta["bytes_median"] < plain["bytes_median"], (plain, delta)
