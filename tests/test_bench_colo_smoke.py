"""Smoke test: benchmarks/colo_vs_periodic.py runs kvstore and noisy alone, under periodic checkpointing and in
hybrid mode end to end in its --quick form and prints its Markdown table (not a performance test: no timing is
asserted)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "colo_vs_periodic.py"
GUESTS = [ROOT / "guests" / "kvstore.bin", ROOT / "guests" / "noisy.bin"]
CONFIGS = ["alone", "periodic 20 ms", "periodic 50 ms", "periodic 100 ms", "hybrid", "hybrid pin=off",
           "hybrid sched=normal"]


@pytest.mark.slow
@pytest.mark.redis
def test_colo_vs_periodic_quick(tmp_path: Path) -> None:
    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark is not installed (Debian: redis-tools)")
    for g in GUESTS:
        if not g.exists():
            pytest.skip(f"{g} is not built (make guests)")
    report = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--quiet", "--json", str(report)]
    png = tmp_path / "plot.png"
    if importlib.util.find_spec("matplotlib") is not None:
        cmd += ["--plot", str(png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| guest | configuration | SET ops/s | GET ops/s | SET p50 / p99 (ms) | GET p50 / p99 (ms) |" in out
    for guest in ("kvstore", "noisy"):
        for cfg in CONFIGS:
            assert f"\n| {guest} | {cfg} | **" in out, f"no row for {guest} {cfg}"
    assert "kvstore: ready" not in out and "noisy: ready" not in out  # guest consoles go to the logs
    assert "Hybrid throughput against the guest alone, medians of this run: kvstore hybrid SET " in out, out
    assert "; kvstore hybrid sched=normal SET " in out, out
    assert "CPU time per request, by process" in out and "\n| kvstore | hybrid | gateway " in out, out
    assert "\n- kvstore hybrid SET: " in out and " CPUs kept busy at today's cost" in out, out
    if "--plot" in cmd:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(report.read_text())
    for guest in ("kvstore", "noisy"):
        for cfg in CONFIGS:
            s = doc["summary"][f"{guest}/{cfg}"]
            for test in ("set", "get"):
                assert s[test]["rounds"] == 1 and s[test]["ops_s"] > 0 and s[test]["p99_ms"] > 0
                roles = set(s[test]["cpu_us_per_request"])
                assert roles == ({"toyvm"} if cfg == "alone" else {"gateway", "primary", "secondary"}), roles
                assert all(v >= 0 for v in s[test]["cpu_us_per_request"].values())
                if cfg in ("alone", "hybrid"):  # thousands of requests even in a quick run: some CPU, surely
                    assert all(v > 0 for v in s[test]["cpu_us_per_request"].values()), s[test]
                    assert s[test]["client_cpu_us_per_request"] > 0 and s[test]["machine_busy_cpus"] > 0, s[test]
                if cfg == "alone":
                    assert s[test]["checkpoints_per_s"] == 0
                elif cfg.startswith("periodic"):
                    assert set(s[test]["by_trigger"]) == {"timer"}  # nothing but the interval
