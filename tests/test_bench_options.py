"""The benchmarks refuse a bad count or duration at once, with argparse's message (not a traceback after minutes
of measuring, nor a silent default), and every one answers --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_benchmark_answers_help(script: str) -> None:
    r = run(script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


@pytest.mark.parametrize("script, args, message", [
    ("checkpoint_cost.py", ["--rounds", "0"], "--checkpoints and --rounds must be at least 1"),
    ("colo_vs_periodic.py", ["--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    ("colo_vs_periodic.py", ["--seconds", "-1"], "argument --seconds: must be a positive number, got -1"),
    ("colo_vs_periodic.py", ["--warmup", "0"], "argument --warmup: must be a positive integer, got 0"),
    ("delta_cost.py", ["--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    ("frame_cost.py", ["--frames", "0"], "argument --frames: must be a positive integer, got 0"),
    ("guest_speed.py", ["--rounds", "0"], "--rounds must be at least 1"),
    ("relay_cost.py", ["--rounds", "0"], "need --clients >= 1"),
    ("reprotect.py", ["--checkpoints", "0"], "argument --checkpoints: must be a positive integer, got 0"),
    ("trace_overhead.py", ["--pages", "-5"], "argument --pages: must be a positive integer, got -5"),
])
def test_a_bad_count_is_refused_before_anything_runs(script: str, args: list[str], message: str) -> None:
    r = run(script, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
