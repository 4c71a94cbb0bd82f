"""Failures that are not a clean crash: a frozen primary (detected by heartbeat silence, not by a closed socket)
and a cut replication link. In every case exactly one node serves (no split brain) and clients keep every
acknowledged write. (Losing the gateway itself is tests/colo_e2e/test_gateway_loss.py.)
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from colo_e2e.helpers import Blackhole, Procs, Workload, events_named, verify_ledger, wait_for
from conftest import guest

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")

RAM = "16M"
INTERVAL_MS = 30


def start(procs: Procs) -> None:
    procs.start_gateway()
    procs.start_secondary(interval_ms=INTERVAL_MS)
    procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)

    def protected() -> bool:
        s = procs.status()
        return bool(s["gateway"]["protected"] and s["nodes"]["primary"].get("checkpoints", 0) >= 3)
    wait_for(protected, 30, "the primary to be protected")


def wait_exit(procs: Procs, role: str, timeout: float = 10.0) -> int:
    try:
        return procs.procs[role].wait(timeout)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: say what it was doing
        procs.procs[role].send_signal(signal.SIGUSR1)  # its threads' stacks (colo.cli), to see where it waits
        time.sleep(0.5)
        raise AssertionError(f"the {role} did not stop within {timeout} s:\n{procs.stderr(role)[-6000:]}") from None


@pytest.mark.slow
def test_a_frozen_primary_is_replaced_and_stops_when_it_wakes(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c")
    w: Workload | None = None
    try:
        start(procs)
        w = Workload(procs.service, persistent=2, cli=1).start()
        w.wait_replies(3, "replies before the freeze")
        primary = procs.procs["primary"]
        primary.send_signal(signal.SIGSTOP)  # alive, sockets open, silent: only heartbeats can tell
        try:
            wait_for(lambda: events_named(procs.status(), "promoted"), 15, "the secondary to be promoted")
            since = time.monotonic()
            w.wait_replies(3, "replies from the secondary", since=since)
        finally:
            primary.send_signal(signal.SIGCONT)
        # The old primary wakes up fenced (a newer generation exists): it must stop, never serve again.
        code = wait_exit(procs, "primary")
        assert code == 4, f"the woken primary exited with {code}:\n{procs.stderr('primary')[-2000:]}"
        since = time.monotonic()
        w.wait_replies(3, "replies after the old primary woke", since=since)
        w.stop()
        verify_ledger(w, procs.service)
        st = procs.status()
        survivor = procs.wait_ready("secondary")["node"]
        assert st["nodes"]["primary"]["active"] and st["nodes"]["primary"]["id"] == survivor, st
        assert st["gateway"]["generation"] == 2, st["gateway"]
        lost = [e for e in events_named(st, "lost") if e.get("role") == "primary"]
        assert lost and "silent" in lost[0]["reason"], st["events"]
    finally:
        if w is not None:
            w.stop()
            w.close()
        if procs.procs.get("primary") is not None and procs.alive("primary"):
            procs.procs["primary"].send_signal(signal.SIGCONT)
        procs.stop()


@pytest.mark.slow
def test_a_cut_replication_link_leaves_one_active_node(tmp_path: Path) -> None:
    """Primary and secondary lose each other but both still reach the gateway: the primary goes on unprotected;
    the secondary asks to be promoted, but the gateway still hears the primary, so it does not promote it: it resets
    it (its copy no longer covers what clients see), and the secondary waits as a spare to be copied anew."""
    procs = Procs(tmp_path / "c")
    hole: Blackhole | None = None
    w: Workload | None = None
    try:
        procs.start_gateway()
        # The secondary tells the gateway to send primaries to the relay in front of it.
        hole = Blackhole(("127.0.0.1", 0))
        procs.start_secondary(interval_ms=INTERVAL_MS, extra=("--advertise", "%s:%d" % hole.address))
        hole.upstream = procs.secondary
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)

        def protected() -> bool:
            s = procs.status()
            return bool(s["gateway"]["protected"] and s["nodes"]["primary"].get("checkpoints", 0) >= 3)
        wait_for(protected, 30, "the primary to be protected through the relay")
        w = Workload(procs.service, persistent=2, cli=1).start()
        w.wait_replies(3, "replies before the partition")
        hole.cut()
        secondary = procs.wait_ready("secondary")["node"]

        def settled() -> dict[str, Any] | None:
            s = procs.status()
            done = not s["gateway"]["protected"] and events_named(s, "reset")
            return s if done else None
        st = wait_for(settled, 20, "the primary to go on alone and the secondary to be reset")
        assert st["nodes"]["primary"]["active"], st
        assert not events_named(st, "promote") and not events_named(st, "promoted"), st["events"]
        assert [e["node"] for e in events_named(st, "reset")][:1] == [secondary], st["events"]
        assert procs.alive("secondary"), f"the reset secondary exited:\n{procs.stderr('secondary')[-2000:]}"
        wait_for(lambda: "discarding the copy" in procs.stderr("secondary"), 5, "the secondary to discard its copy")
        since = time.monotonic()
        w.wait_replies(3, "replies after the partition", since=since)
        w.stop()
        verify_ledger(w, procs.service)
        assert procs.alive("primary") and procs.alive("gateway")
    finally:
        if w is not None:
            w.stop()
            w.close()
        procs.stop()
        if hole is not None:
            hole.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["periodic", "hybrid"])
def test_a_silent_secondary_is_noticed_within_a_heartbeat_timeout(tmp_path: Path, mode: str) -> None:
    """A secondary that stops (SIGSTOP: its sockets stay open, a frame may be cut off mid-way) is noticed by the
    primary from the silence, within about one heartbeat timeout (0.8 s), not only by a checkpoint's reply timeout
    (3.2 s, before); in hybrid mode too, where the secondary's VM runs between checkpoints."""
    procs = Procs(tmp_path / "c", mode=mode)
    try:
        start(procs)
        secondary = procs.procs["secondary"]
        t0 = time.monotonic()
        secondary.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: events_named(procs.status(), "unprotected"), 10, "the primary to go on unprotected")
            took = time.monotonic() - t0
        finally:
            secondary.send_signal(signal.SIGCONT)
        assert took < procs.heartbeat_timeout + 0.7, f"the silence was noticed after {took:.2f} s"
        st = procs.status()
        assert st["nodes"]["primary"]["active"] and not events_named(st, "promote"), st["events"]
    finally:
        procs.procs["secondary"].send_signal(signal.SIGCONT)
        procs.stop()
