"""The command line as an operator uses it: `colo up` starts the three roles, `colo status` and `colo failover` find
them with no arguments (through the run root, COLO_RUN_DIR), and a forced failover keeps clients working on
their open connections. More of `colo up` in test_up_*.py.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colo.node import NodeState
from colo_e2e.helpers import Workload, child_env, events_named, verify_ledger, wait_for
from colo_e2e.up import Up, pid_running
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    # No replacement secondary: this test checks what a failover leaves (a second one is refused).
    u = Up(tmp_path / "run", tmp_path, "--no-respawn")
    try:
        yield u
    finally:
        u.close()


@pytest.mark.slow
def test_colo_up_status_and_failover_through_the_cli(up: Up) -> None:
    info = up.wait_up()
    pids = info["pids"]
    assert set(pids) == {"gateway", "primary", "secondary"}
    assert info["name"] == "kvstore" and up.cluster_dir() == up.run_dir / "kvstore", info
    assert (up.run_dir / "kvstore" / "key").stat().st_mode & 0o777 == 0o600, "the cluster's key is not mode 0600"

    def protected() -> dict[str, Any] | None:
        # Each node's own state reaches the gateway with its next heartbeat (every timeout/4): wait for both,
        # not only for the protection the primary reports at once (reading too early was flaky).
        s = up.status()
        p, sec = s["nodes"]["primary"], s["nodes"]["secondary"]
        ok = (s["gateway"]["protected"] and p.get("checkpoints", 0) >= 3 and sec.get("epoch", 0) >= 1
              and p.get("state") == NodeState.PROTECTED.value and sec.get("state") == NodeState.SECONDARY.value)
        return s if ok else None
    st = wait_for(protected, 30, "colo status to show the primary protected with checkpoints")
    g, p, s = st["gateway"], st["nodes"]["primary"], st["nodes"]["secondary"]
    assert g["pid"] == pids["gateway"] and g["service"] == "%s:%d" % tuple(info["service"])
    assert p["pid"] == pids["primary"] and p["connected"] and p["active"]
    assert s["pid"] == pids["secondary"] and s["connected"] and not s["active"]
    assert p["epoch"] >= 3 and s["epoch"] >= 1 and p["triggers"].get("timer", 0) >= 3, st
    assert [e["role"] for e in events_named(st, "attached")] == ["spare", "primary"], st["events"]
    primary_id, secondary_id = p["id"], s["id"]

    text = up.cli("status")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    row = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in ("gateway", "primary", "secondary")}
    assert str(pids["primary"]) in row["primary"] and "[active]" in row["primary"], text.stdout
    assert str(pids["secondary"]) in row["secondary"] and "[active]" not in row["secondary"], text.stdout
    assert str(pids["gateway"]) in row["gateway"], text.stdout

    service = tuple(info["service"])
    w = Workload(service, persistent=2, cli=1).start()
    try:
        w.wait_replies(3, "the clients to get replies before the failover")
        r = up.cli("failover")
        assert r.returncode == 0, f"colo failover failed ({r.returncode}): {r.stdout} {r.stderr}"
        assert "failover started" in r.stdout, r.stdout

        def promoted() -> dict[str, Any] | None:
            s = up.status()
            return s if events_named(s, "promoted") and s["nodes"]["primary"].get("id") == secondary_id else None
        st = wait_for(promoted, 15, "the secondary to become active")
        since = time.monotonic()
        w.wait_replies(3, "every client to get replies from the secondary", since=since)
        # A second failover has nothing to fail over from: refused, with the reason, and nothing changes.
        again = up.cli("failover")
        assert again.returncode == 1 and "no ready secondary" in again.stderr, (again.stdout, again.stderr)
    finally:
        w.stop()
    verify_ledger(w, service)
    w.close()

    st = up.status()
    assert st["nodes"]["primary"]["active"] and st["nodes"]["primary"]["id"] == secondary_id, st
    assert st["gateway"]["generation"] == 2 and not st["nodes"]["secondary"]["connected"], st
    assert any(e.get("node") == primary_id and "manual failover" in e.get("reason", "")
               for e in events_named(st, "fenced")), st["events"]
    assert events_named(st, "promote")[0]["reason"].startswith("manual failover"), st["events"]
    # The fenced primary stopped (a node the gateway fenced must never serve again); the others run on.
    wait_for(lambda: not pid_running(pids["primary"]), 10, "the fenced primary to exit")
    assert pid_running(pids["gateway"]) and pid_running(pids["secondary"])

    # SIGTERM stops everything (exit 128 + 15, as toyvm) and removes the cluster's run directory.
    up.proc.send_signal(signal.SIGTERM)
    assert up.wait(20) == 128 + signal.SIGTERM, up.stderr()
    assert "stopped by SIGTERM" in up.stderr()
    assert not (up.run_dir / "kvstore").exists()
    for role, pid in pids.items():
        wait_for(lambda: not pid_running(pid), 10, f"the {role} to exit")


def test_status_and_failover_without_a_running_up_say_so(tmp_path: Path) -> None:
    env = child_env({"COLO_RUN_DIR": str(tmp_path / "nothing-here")})
    env.pop("COLO_KEY", None)
    for cmd in (["status"], ["status", "--json"], ["failover"]):
        r = subprocess.run([sys.executable, "-m", "colo", *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=20, stdin=subprocess.DEVNULL)
        assert r.returncode == 2, (cmd, r.returncode, r.stdout, r.stderr)
        assert "no `colo up` is running" in r.stderr, (cmd, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
