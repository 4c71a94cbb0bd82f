"""The command line as an operator uses it: `colo up` starts the three roles, `colo status` and `colo failover` find
them with no arguments (through the run directory, COLO_RUN_DIR), and a forced failover keeps clients working on
their open connections.
"""
from __future__ import annotations

import json
import os
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
from conftest import ROOT, guest

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")


def pid_running(pid: int) -> bool:
    """True if the process exists and is not a zombie (a fenced role stays a zombie until `colo up` reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Up:
    def __init__(self, run_dir: Path, workdir: Path) -> None:
        self.run_dir = run_dir
        self.env = child_env({"COLO_RUN_DIR": str(run_dir)})
        self.env.pop("COLO_KEY", None)
        self.out = open(workdir / "up.out", "wb")
        self.err = open(workdir / "up.err", "wb")
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-m", "colo", "up", str(guest("kvstore")), "--ram", "16M",
                                      "--interval", "30"], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=self.err, start_new_session=True)
        self.info: dict[str, Any] = {}

    def wait_up(self) -> dict[str, Any]:
        path = self.run_dir / "up.json"

        def ready() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"colo up exited with {self.proc.returncode}:\n{self.stderr()}"
            return dict(json.loads(path.read_text())) if path.exists() else None
        self.info = wait_for(ready, 30, "colo up to start")
        return self.info

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "colo", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "--json")
        assert r.returncode == 0, f"colo status --json failed ({r.returncode}): {r.stderr}"
        return dict(json.loads(r.stdout))

    def stderr(self) -> str:
        return (self.workdir / "up.err").read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.info.get("pids", {}).values():  # never leave a role behind, even if `up` was killed
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        self.out.close()
        self.err.close()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path / "run", tmp_path)
    try:
        yield u
    finally:
        u.close()


@pytest.mark.slow
def test_colo_up_status_and_failover_through_the_cli(up: Up) -> None:
    info = up.wait_up()
    pids = info["pids"]
    assert set(pids) == {"gateway", "primary", "secondary"}
    assert (up.run_dir / "key").stat().st_mode & 0o077 == 0, "the run directory's key is readable by others"

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
        wait_for(lambda: min(w.acks_by().values()) >= 3, 20, "the clients to get replies before the failover")
        r = up.cli("failover")
        assert r.returncode == 0, f"colo failover failed ({r.returncode}): {r.stdout} {r.stderr}"
        assert "failover started" in r.stdout, r.stdout

        def promoted() -> dict[str, Any] | None:
            s = up.status()
            return s if events_named(s, "promoted") and s["nodes"]["primary"].get("id") == secondary_id else None
        st = wait_for(promoted, 15, "the secondary to become active")
        since = time.monotonic()
        wait_for(lambda: min(w.acks_by(since).values()) >= 3, 20,
                 f"every client to get replies from the secondary (errors: {w.errors()})")
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

    # Ctrl-C (SIGTERM) stops everything and removes the run file.
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(20) == 0, up.stderr()
    assert not (up.run_dir / "up.json").exists()
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
