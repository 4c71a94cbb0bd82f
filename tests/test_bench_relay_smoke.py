"""Smoke test: benchmarks/relay_cost.py drives a hybrid witness and the relay's frames in one process and reports
both rows (no timing is asserted; what a round must do is: every request sent to both nodes, every reply
released once both VMs gave it, which the script checks itself and refuses to time otherwise)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "relay_cost.py"


def test_relay_cost_quick(tmp_path: Path) -> None:
    report = tmp_path / "relay.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--clients", "4", "--requests", "400", "--rounds", "1",
                           "--json", str(report)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "witness" in done.stdout and "frames" in done.stdout
    rows = json.loads(report.read_text())["rows"]
    for name in ("witness", "frames"):
        assert rows[name]["us_per_request"] > 0 and rows[name]["calls_per_request"] > 10, rows


def test_relay_cost_refuses_bad_arguments() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--clients", "0"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "--clients >= 1" in done.stderr
