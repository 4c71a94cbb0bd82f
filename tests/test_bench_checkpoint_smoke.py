"""Smoke test: benchmarks/checkpoint_cost.py runs real local clusters end to end in its --quick form, in both
checkpoint modes, and prints its Markdown tables, with numbers that hang together (not a performance test: no
timing is asserted)."""
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
                           "--json", str(report)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| RAM | N | fill | dirty pages (median) | pipelined: pause median (ms) | commit median (ms) | " \
           "strict: pause median (ms) | commit median (ms) |" in out
    assert "| RAM | N | fill | variant | request | collect | send | received | loaded | resume | pause p99 |" in out
    assert "\n| 64M | 16 | word | " in out and "\n| 64M | 256 | word | " in out
    assert "memtouch" not in out  # the guest's console goes to the log, not into the tables
    doc = json.loads(report.read_text())
    assert [v["name"] for v in doc["variants"]] == ["pipelined", "strict"]
    assert set(doc["rows"]) == {f"64M N={n} word | {m}" for n in (16, 256) for m in ("pipelined", "strict")}
    for key, row in doc["rows"].items():
        n, mode = int(key.split("=")[1].split()[0]), key.split(" | ")[1]
        s = row["summary"]
        assert s["checkpoints"] == len(row["records"]) == 10 and s["modes"] == [mode]
        assert [r["trigger"] for r in row["records"]] == ["timer"] * 10
        assert n <= s["dirty_pages_median"] <= n + 64  # N plus the guest's own few pages
        assert 0 < s["pause_median_ms"] <= s["pause_p99_ms"] <= s["pause_max_ms"]
        assert 0 < s["commit_median_ms"]
        assert s["bytes_raw_median"] >= n * 4096 and 0 < s["bytes_wire_median"] < s["bytes_raw_median"]
        assert set(s["phases_median_ms"]) == {"request", "collect", "send", "received", "loaded", "resume"}
    for name in ("64M N=16 word", "64M N=256 word"):
        assert doc["floors"][name]["pages"] >= 16 and doc["floors"][name]["floor_ms"] > 0
