"""Smoke test: benchmarks/reprotect.py copies a running VM to a new secondary, live and in one stop, through a
real local cluster, and prints a table whose numbers hang together (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "reprotect.py"


@pytest.mark.slow
def test_reprotect_quick(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "N=16", "--checkpoints", "5", "-q",
                           "--json", str(report)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| 64M N=16 word | live | " in done.stdout and "| 64M N=16 word | stop | " in done.stdout
    rows = {r["copy"]: r for r in json.loads(report.read_text())["rows"]}
    live, stop = rows["live"], rows["stop"]
    assert live["live"] is True and live["rounds"] >= 2 and stop["live"] is False and stop["rounds"] == 1
    assert stop["final_pages"] == stop["pages"] > live["final_pages"]  # the live copy's last stop is smaller
    for r in (live, stop):
        assert r["mb"] >= 32  # half of 64 MiB is resident: the copy carried it
        assert 0 < r["seconds"] and 0 < r["stop_ms"] and r["checkpoint_pause_ms"] > 0
        assert r["echoes"] > 10  # the client was answered throughout
