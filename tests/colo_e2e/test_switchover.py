"""`colo switchover`: a planned move of the service to the secondary (host maintenance) at a checkpoint
boundary: no acknowledged write lost, no client connection broken, the client-visible stall reported. The old
primary then exits, or with --swap waits as a spare and is copied anew by the new primary (so the service is
protected again, by the old host)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from colo_e2e.helpers import Procs, Workload, child_env, events_named, verify_ledger, wait_for
from conftest import ROOT, guest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")]

RAM = "16M"
INTERVAL_MS = 30


def switchover(procs: Procs, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "colo", "switchover", "--gateway", "%s:%d" % procs.gateway,
                           "--key-file", str(procs.key_file), *extra], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("swap", [False, True], ids=["leave", "swap"])
def test_a_switchover_loses_nothing(tmp_path: Path, swap: bool) -> None:
    procs = Procs(tmp_path / "c")
    w: Workload | None = None
    try:
        procs.start_gateway()
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_for(lambda: procs.status()["gateway"]["protected"], 30, "the pair to be protected")
        old, new = procs.wait_ready("primary")["node"], procs.wait_ready("secondary")["node"]
        w = Workload(procs.service, persistent=3, cli=1).start()
        w.wait_replies(3, "replies before the switchover")
        r = switchover(procs, *(["--swap"] if swap else []))
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "done" in r.stdout and "clients stalled" in r.stdout, r.stdout
        since = time.monotonic()
        w.wait_replies(3, "replies after the switchover", since=since)
        st = procs.status()
        assert st["nodes"]["primary"]["id"] == new and st["gateway"]["generation"] == 2, st["nodes"]
        promoted = events_named(st, "promoted")
        assert promoted and "switchover" in promoted[-1]["reason"] and promoted[-1]["failover_ms"] < 2000, promoted
        if swap:
            def again() -> dict[str, Any] | None:  # the old primary, copied anew, protects the new one
                s = procs.status()
                return s if s["gateway"]["protected"] and s["nodes"]["secondary"].get("id") == old else None
            wait_for(again, 30, "the old primary to protect the new one")
            assert procs.alive("primary")
        else:
            wait_for(lambda: not procs.alive("primary"), 10, "the old primary to leave")
            assert procs.procs["primary"].returncode == 0, procs.stderr("primary")
        w.stop()
        verify_ledger(w, procs.service, allow_cli_failures=True)  # every client kept its one connection
        assert not events_named(procs.status(), "lost") or not swap
    finally:
        if w is not None:
            w.stop()
            w.close()
        procs.stop()


def test_a_switchover_without_a_secondary_is_refused(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c")
    try:
        procs.start_gateway()
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_for(lambda: procs.status()["nodes"]["primary"].get("connected"), 20, "the primary to attach")
        r = switchover(procs)
        assert r.returncode == 1 and "no ready secondary" in r.stderr, (r.stdout, r.stderr)
    finally:
        procs.stop()
