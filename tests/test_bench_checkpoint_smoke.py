"""Smoke test: benchmarks/checkpoint_cost.py runs a real local cluster end to end in its --quick form and
prints its Markdown tables, with numbers that hang together (not a performance test: no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "checkpoint_cost.py"
MEMTOUCH = ROOT / "guests" / "memtouch.bin"


@pytest.mark.slow
def test_checkpoint_cost_quick(tmp_path: Path) -> None:
    if not MEMTOUCH.exists():
        pytest.skip("guests/memtouch.bin is not built (make guests)")
    report = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--checkpoints", "10", "--quiet",
                           "--json", str(report)], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| RAM | N | fill | dirty pages (median) | pause median (ms) | pause p99 (ms) |" in out
    assert "| RAM | N | fill | suspend | collect | compress | send | received | loaded | resume |" in out
    assert "\n| 64M | 16 | word | " in out and "\n| 64M | 256 | word | " in out
    assert "memtouch" not in out  # the guest's console goes to the log, not into the tables
    doc = json.loads(report.read_text())
    assert set(doc["configs"]) == {"64M N=16 word", "64M N=256 word"}
    for name, n in (("64M N=16 word", 16), ("64M N=256 word", 256)):
        c = doc["configs"][name]
        s = c["summary"]
        assert s["checkpoints"] == len(c["records"]) == 10
        assert [r["trigger"] for r in c["records"]] == ["timer"] * 10
        assert n <= s["dirty_pages_median"] <= n + 64  # N plus the guest's own few pages
        assert 0 < s["pause_median_ms"] <= s["pause_p99_ms"] <= s["pause_max_ms"]
        assert s["bytes_raw_median"] >= n * 4096 and 0 < s["bytes_wire_median"] < s["bytes_raw_median"]
        assert set(s["phases_median_ms"]) == {"suspend", "collect", "compress", "send", "received", "loaded",
                                              "resume"}
        assert s["floor"]["pages"] >= n and s["floor"]["floor_ms"] > 0
    assert {t["target"].split(":")[0] for t in doc["targets"]} == {"64M N=16", "64M N=256"}
