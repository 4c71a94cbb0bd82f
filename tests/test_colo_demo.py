"""`colo demo` end to end: three real processes, a SIGKILLed primary, and no acknowledged write lost."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, guest


@pytest.mark.slow
def test_colo_demo_survives_a_killed_primary() -> None:
    guest("kvstore")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "colo", "demo", "--seconds", "6", "--clients", "4"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert re.search(r"killing the primary \(pid \d+\) with SIGKILL", out), out
    flat = " ".join(out.split())  # the narration wraps its lines
    assert re.search(r"failover: the gateway lost the primary .* promoted the secondary, which resumed from "
                     r"checkpoint \d+", flat), out
    assert re.search(r"^\s*failover\s+[\d.]+ ms in the gateway", out, re.MULTILINE), out
    acked = re.search(r"^\s*writes acknowledged\s+(\d+) ", out, re.MULTILINE)
    assert acked and int(acked.group(1)) > 0, out
    assert re.search(r"^\s*writes lost\s+0\b", out, re.MULTILINE), out
    assert re.search(r"^\s*connections broken\s+0\b", out, re.MULTILINE), out
    assert "colo demo: OK" in out, out
