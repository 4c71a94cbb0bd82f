"""Losing the witness is not losing the service (DESIGN section 7): a gateway that is paused (SIGSTOP) or killed
and started again loses no acknowledged write, and the pair stays (or becomes again) protected.

While the gateway is stopped, both nodes notice its silence, hold still (the primary pauses its guest: nothing could
reach a client) and keep their pair; when it runs again it does not count the time it was stopped against the
nodes (its own stall), and everything goes on. A gateway killed outright takes its clients' TCP connections with
it: a new gateway on the same address and key learns the cluster from the nodes (roles, generation, the VM's
open connections) and the clients reconnect; every write acknowledged before is still there.
"""
from __future__ import annotations

import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from colo_e2e.helpers import HOST, Blackhole, Procs, Resp, RespError, Workload, events_named, verify_ledger, wait_for
from conftest import guest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")]

RAM = "16M"
INTERVAL_MS = 30


def start(procs: Procs) -> None:
    procs.start_gateway()
    procs.start_secondary(interval_ms=INTERVAL_MS)
    procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
    wait_protected(procs, 30)


def wait_protected(procs: Procs, timeout: float, checkpoints: int = 3) -> dict[str, Any]:
    def protected() -> dict[str, Any] | None:
        s = procs.status()
        ok = s["gateway"]["protected"] and s["nodes"]["primary"].get("checkpoints", 0) >= checkpoints
        return s if ok else None
    return wait_for(protected, timeout, "the pair to be protected")


@pytest.mark.parametrize("mode", ["periodic", "hybrid"])
@pytest.mark.parametrize("seconds", [1.0, 2.0, 5.0])
def test_a_paused_gateway_loses_nothing(tmp_path: Path, seconds: float, mode: str) -> None:
    if mode == "hybrid" and seconds != 2.0:
        pytest.skip("hybrid mode: one pause length is enough")
    procs = Procs(tmp_path / "c", mode=mode)
    w: Workload | None = None
    try:
        start(procs)
        w = Workload(procs.service, persistent=2, cli=1).start()
        w.wait_replies(3, "replies before the pause")
        gateway = procs.procs["gateway"]
        gateway.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        gateway.send_signal(signal.SIGCONT)
        since = time.monotonic()
        w.wait_replies(3, "replies after the pause", since=since)
        w.stop()
        verify_ledger(w, procs.service, allow_cli_failures=True)
        st = wait_protected(procs, 10)
        assert not events_named(st, "promote") and not events_named(st, "lost"), st["events"]
        assert events_named(st, "gateway-stalled"), st["events"]  # it knew it had not run
        for role in ("gateway", "primary", "secondary"):
            assert procs.alive(role), f"the {role} exited:\n{procs.stderr(role)[-2000:]}"
        for role in ("primary", "secondary"):
            assert "Traceback" not in procs.stderr(role), procs.stderr(role)
    finally:
        if w is not None:
            w.stop()
            w.close()
        procs.procs["gateway"].send_signal(signal.SIGCONT)
        procs.stop()


@dataclass
class Writer:
    """A client that reconnects when its connection breaks (it does, with the gateway that held it) and keeps a
    ledger of the writes whose reply arrived."""

    address: tuple[str, int]
    name: str
    acked: dict[str, str] = field(default_factory=dict)
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    acked_at: list[float] = field(default_factory=list)

    def run(self) -> None:
        conn: Resp | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = Resp(self.address, timeout=5.0)
                n += 1
                key, value = f"{self.name}:{n}", uuid.uuid4().hex
                if conn.call("SET", key, value) == "OK":
                    self.acked[key] = value
                    self.acked_at.append(time.monotonic())
            except RespError as e:
                self.errors.append(str(e))
            except OSError:
                if conn is not None:
                    conn.close()
                    self.reconnects += 1
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()


def test_a_killed_gateway_replaced_by_a_new_one_loses_nothing(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c")
    writers = [Writer(("", 0), f"w{i}") for i in range(3)]
    threads: list[threading.Thread] = []
    try:
        start(procs)
        listen, service = procs.gateway, procs.service
        for wr in writers:
            wr.address = service
            threads.append(threading.Thread(target=wr.run, daemon=True))
            threads[-1].start()
        wait_for(lambda: all(len(wr.acked) >= 5 for wr in writers), 20, "writes before the kill")
        old_ids = (procs.status()["nodes"]["primary"]["id"], procs.status()["nodes"]["secondary"]["id"])
        procs.procs["gateway"].send_signal(signal.SIGKILL)
        procs.procs["gateway"].wait(5)
        acked_before = sum(len(wr.acked) for wr in writers)
        time.sleep(1.0)  # the nodes notice, hold still and keep trying to reconnect
        procs.start_gateway(role="gateway-2", listen=listen, service=service)
        assert (procs.gateway, procs.service) == (listen, service)
        st = wait_protected(procs, 20, checkpoints=0)
        # The same pair, the same generation: the new gateway learned it instead of starting anything anew.
        assert (st["nodes"]["primary"]["id"], st["nodes"]["secondary"]["id"]) == old_ids, st["nodes"]
        assert st["gateway"]["generation"] == 1 and not events_named(st, "promote"), st["events"]
        since = time.monotonic()
        wait_for(lambda: all(any(t > since for t in wr.acked_at) for wr in writers), 20,
                 "every client to write again through the new gateway")
        for wr in writers:
            wr.stop.set()
        for t in threads:
            t.join(10)
        assert all(wr.reconnects >= 1 for wr in writers), [wr.reconnects for wr in writers]
        assert sum(len(wr.acked) for wr in writers) > acked_before
        # Every acknowledged write, before and after the gateway's death, reads back as written.
        checker = Resp(service, timeout=20.0)
        try:
            pairs = [(k, v) for wr in writers for k, v in wr.acked.items()]
            got = checker.pipeline([("GET", k) for k, _ in pairs])
        finally:
            checker.close()
        lost = [k for (k, v), g in zip(pairs, got, strict=True) if g != v.encode()]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
        assert procs.alive("primary") and procs.alive("secondary")
    finally:
        for wr in writers:
            wr.stop.set()
        procs.stop()


def test_a_restarted_gateway_with_only_an_orphaned_secondary_promotes_it(tmp_path: Path) -> None:
    """The gateway and the primary both die; a new gateway hears only the secondary, which lost its primary: it
    promotes it (a new generation) once the grace period passes, and the acknowledged writes are there."""
    procs = Procs(tmp_path / "c")
    try:
        start(procs)
        listen, service = procs.gateway, procs.service
        r = Resp(service, timeout=10.0)
        try:
            acked = {f"k{i}": f"v{i}" for i in range(20)}
            for k, v in acked.items():
                assert r.call("SET", k, v) == "OK"
        finally:
            r.close()
        procs.procs["gateway"].send_signal(signal.SIGKILL)
        procs.procs["primary"].send_signal(signal.SIGKILL)
        procs.procs["gateway"].wait(5)
        procs.start_gateway(role="gateway-2", listen=listen, service=service)

        def promoted() -> dict[str, Any] | None:
            s = procs.status()
            return s if events_named(s, "promoted") else None
        st = wait_for(promoted, 20, "the orphaned secondary to be promoted")
        assert st["gateway"]["generation"] == 2, st["gateway"]
        r = Resp(service, timeout=10.0)
        try:
            assert r.pipeline([("GET", k) for k in acked]) == [v.encode() for v in acked.values()]
        finally:
            r.close()
    finally:
        procs.stop()


def test_a_restarted_gateway_does_not_promote_a_secondary_the_primary_went_on_without(tmp_path: Path) -> None:
    """The secondary's link to the gateway is cut (a partition: nothing it is sent arrives, not even its fence):
    the gateway loses it, the primary goes on unprotected and writes are acknowledged that are in no copy the
    secondary holds. Then the primary and the gateway die together and the partition heals; the secondary still
    holds its old copy (it never heard it was dropped). The new gateway reads what the first one persisted
    (--state-file) and must not promote it: that would take back the acknowledged writes. The service is down
    instead (only the lost primary had them), and the node is a spare again."""
    procs = Procs(tmp_path / "c")
    cut: Blackhole | None = None
    try:
        procs.start_gateway()
        listen, service = procs.gateway, procs.service
        cut = Blackhole(listen)
        procs.gateway = cut.address  # the secondary reaches the gateway through the relay
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.gateway = listen
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_protected(procs, 30)
        r = Resp(service, timeout=10.0)
        try:
            assert r.call("SET", "before", "1") == "OK"
            cut.cut()

            def voided() -> dict[str, Any] | None:
                s = procs.status()
                return s if s["gateway"]["voided"] else None
            voided_at = wait_for(voided, 20, "the gateway to void the cut-off secondary's copy")
            assert not voided_at["gateway"]["protected"]
            assert r.call("SET", "after", "2") == "OK"  # acknowledged: in no copy the secondary holds
        finally:
            r.close()
        for role in ("gateway", "primary"):
            procs.procs[role].send_signal(signal.SIGKILL)
            procs.procs[role].wait(5)
        procs.start_gateway(role="gateway-2", listen=listen, service=service)
        cut.heal()

        def heard() -> dict[str, Any] | None:
            s = procs.status()
            return s if s["gateway"]["service_state"] != "learning" and events_named(s, "attached") else None
        wait_for(heard, 30, "the new gateway to hear the secondary and decide")
        time.sleep(3 * procs.heartbeat_timeout)  # and it does not change its mind
        st = procs.status()
        assert st["gateway"]["service_state"] == "down", st["gateway"]
        assert not events_named(st, "promote"), st["events"]
        assert events_named(st, "reset"), st["events"]
        assert [n["id"] for n in st["spares"]] == list(voided_at["gateway"]["voided"]), st["spares"]
        assert procs.alive("secondary"), procs.stderr("secondary")[-2000:]
    finally:
        if cut is not None:
            cut.close()
        procs.stop()


def test_a_node_cut_off_from_the_gateway_holds_still_and_comes_back(tmp_path: Path) -> None:
    """No split brain by waiting: a primary whose gateway is gone serves nothing (nothing could reach a client),
    keeps its VM and its pair, and reconnects when a gateway answers; it never exits on its own."""
    procs = Procs(tmp_path / "c")
    try:
        start(procs)
        listen, service = procs.gateway, procs.service
        procs.procs["gateway"].send_signal(signal.SIGKILL)
        procs.procs["gateway"].wait(5)
        time.sleep(3 * procs.heartbeat_timeout)
        for role in ("primary", "secondary"):
            assert procs.alive(role), f"the {role} gave up:\n{procs.stderr(role)[-2000:]}"
            assert "holding still" in procs.stderr(role), procs.stderr(role)
        procs.start_gateway(role="gateway-2", listen=listen, service=service)
        wait_protected(procs, 20, checkpoints=0)
        r = Resp(service, timeout=10.0)
        try:
            assert r.call("SET", "after", "1") == "OK" and r.call("GET", "after") == b"1"
        finally:
            r.close()
    finally:
        procs.stop()


def test_client_connections_end_with_their_gateway(tmp_path: Path) -> None:
    """The connections a dead gateway held are closed in the guest too (the new gateway tells the VM), so the
    guest does not keep their state forever, and new clients never get an id the VM still has open."""
    procs = Procs(tmp_path / "c")
    try:
        start(procs)
        listen, service = procs.gateway, procs.service
        held = [Resp(service, timeout=5.0) for _ in range(3)]
        for i, c in enumerate(held):
            assert c.call("SET", f"held{i}", "x") == "OK"
        procs.procs["gateway"].send_signal(signal.SIGKILL)
        procs.procs["gateway"].wait(5)
        procs.start_gateway(role="gateway-2", listen=listen, service=service)
        wait_protected(procs, 20, checkpoints=0)
        st = procs.status()
        assert st["gateway"]["input_seq"] >= 3, st["gateway"]  # one CLOSE input for each connection of the old one
        fresh = Resp(service, timeout=5.0)
        try:
            assert fresh.call("GET", "held2") == b"x"
        finally:
            fresh.close()
        for c in held:
            c.close()
    finally:
        procs.stop()


def test_a_gateway_is_reachable_again_on_the_same_port(tmp_path: Path) -> None:
    """The restarted gateway binds the address of the dead one (SO_REUSEADDR): the nodes find it where they knew
    it (a sanity check of the tests above)."""
    procs = Procs(tmp_path / "c")
    try:
        procs.start_gateway()
        listen = procs.gateway
        procs.procs["gateway"].send_signal(signal.SIGKILL)
        procs.procs["gateway"].wait(5)
        procs.start_gateway(role="gateway-2", listen=listen, service=(HOST, 0))
        assert procs.gateway == listen
    finally:
        procs.stop()
