"""How the service ends, on purpose or not, and what the witness then says.

- A guest that faults (or powers off) is not a failed host: no failover (the secondary would fault the same way),
  the clients' connections are closed, new clients are refused, the primary exits 125 with toyvm's message.
- A primary killed during the copy to its secondary: nothing can take over; the witness says the service is down
  and refuses new clients at once (it used to accept them and never answer); the secondary waits as a spare.
- A clean stop (what Ctrl-C of `colo up` does) starts no failover and logs no loss.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from colo.cluster import LocalCluster
from colo_e2e.helpers import HOST, Procs, Resp, events_named, wait_for
from conftest import asm, guest

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")

RAM = "16M"
INTERVAL_MS = 30
# Counts down 20 million, then stores outside RAM (16 MiB): runs across several checkpoints first, then faults the
# same way on every run (the secondary's copy would too).
FAULTING = """
    mov rcx, 20000000
1:  dec rcx
    jnz 1b
    mov dx, 0x3f8
    mov al, 'b'
    out dx, al
    mov al, 'y'
    out dx, al
    mov al, 'e'
    out dx, al
    mov al, 10
    out dx, al
    mov rax, 0x40000000
    mov qword ptr [rax], 1
    hlt
"""


def refused_at_once(address: tuple[str, int], timeout: float = 1.0) -> bool:
    """A client that connects is closed by the gateway without a byte (rather than left waiting)."""
    s = socket.create_connection(address, timeout=timeout)
    try:
        s.settimeout(timeout)
        return s.recv(64) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    finally:
        s.close()


@pytest.mark.slow
def test_a_faulting_guest_ends_the_service_without_a_failover(tmp_path: Path) -> None:
    image = tmp_path / "faulting.bin"
    image.write_bytes(asm(FAULTING))
    procs = Procs(tmp_path / "c")
    try:
        procs.start_gateway()
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.start_primary(image, ram=RAM, interval_ms=INTERVAL_MS)
        code = procs.procs["primary"].wait(60)
        assert code == 125, f"the primary exited {code}:\n{procs.stderr('primary')[-2000:]}"
        assert "VM fault: guest write of 8 byte(s) at unmapped address 0x40000000" in procs.stderr("primary")
        # What the guest wrote to its console in the slice that ended it is printed, not lost.
        assert procs.stdout("primary").endswith(b"bye\n"), procs.stdout("primary")[-200:]
        wait_for(lambda: not procs.alive("secondary"), 10, "the secondary to be stopped")
        assert procs.procs["secondary"].returncode == 0, procs.stderr("secondary")
        st = procs.status()
        g = st["gateway"]
        assert g["service_state"] == "ended" and g["ended_code"] == 125 and not g["protected"], g
        ended = events_named(st, "guest-ended")
        assert ended and "unmapped address 0x40000000" in ended[0]["reason"], st["events"]
        assert not events_named(st, "promote") and not events_named(st, "promoted"), st["events"]
        assert refused_at_once(procs.service), "a client connecting after the guest ended was not refused"
        # Nothing took over: the secondary never ran the guest to the same fault.
        assert "VM fault" not in procs.stderr("secondary"), procs.stderr("secondary")
    finally:
        procs.stop()


@pytest.mark.slow
def test_a_primary_killed_during_the_copy_leaves_a_service_that_says_it_is_down(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c", env={"primary": {"COLO_FAULT": "mid-copy@0"}})
    try:
        procs.start_gateway()
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        procs.procs["primary"].wait(30)

        def down() -> dict[str, Any] | None:
            s = procs.status()
            return s if s["gateway"]["service_state"] == "down" else None
        st = wait_for(down, 10, "the gateway to say the service is down")
        assert not st["gateway"]["protected"] and not st["nodes"]["primary"]["connected"], st
        assert [n["role"] for n in st["lost"]] == ["primary"], st["lost"]
        assert events_named(st, "down"), st["events"]
        assert refused_at_once(procs.service), "a client was accepted by a service with no node"
        # The secondary held no complete copy: it did not take over, and waits as a spare for a new primary.
        assert procs.alive("secondary") and not events_named(st, "promote"), st["events"]
        wait_for(lambda: procs.status()["spares"], 5, "the secondary to be a spare again")
    finally:
        procs.stop()


@pytest.mark.slow
def test_a_clean_stop_starts_no_failover_and_logs_no_loss(tmp_path: Path) -> None:
    err = open(tmp_path / "stderr.txt", "wb")
    cluster = LocalCluster(str(guest("kvstore")), ram=RAM, interval_ms=INTERVAL_MS, directory=tmp_path / "c",
                           verbose=True)
    try:
        cluster.start(stderr=err)
        cluster.wait_protected()
        r = Resp(cluster.service_address, timeout=5.0)
        try:
            assert r.call("SET", "k", "v") == "OK"
        finally:
            r.close()
    finally:
        codes = cluster.stop()
        err.close()
    log = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert codes == {"secondary": 0, "primary": 0, "gateway": 0}, (codes, log[-3000:])
    for text in ("promote", "failover", "primary lost", "running unprotected", "lost the gateway", "Traceback"):
        assert text not in log, f"a clean stop logged {text!r}:\n{log[-3000:]}"


@pytest.mark.slow
def test_a_stop_without_its_gateway_stops_the_nodes_at_once(tmp_path: Path) -> None:
    """No gateway can tell the nodes to stop: they are sent SIGTERM at once (a clean stop each), not waited for
    until the deadline (`colo down` took that much longer)."""
    cluster = LocalCluster(str(guest("kvstore")), ram=RAM, interval_ms=INTERVAL_MS, directory=tmp_path / "c")
    try:
        cluster.start(stderr=subprocess.DEVNULL)
        cluster.wait_protected()
        cluster.procs["gateway"].send_signal(signal.SIGKILL)
        cluster.procs["gateway"].wait(10)
    finally:
        t0 = time.monotonic()
        codes = cluster.stop(timeout=60)
        took = time.monotonic() - t0
    assert codes == {"secondary": 0, "primary": 0, "gateway": -signal.SIGKILL}, codes
    assert took < 30, f"stop waited {took:.1f} s for nodes nobody told to stop"  # the deadline was 60 s


def test_refused_at_once_tells_a_refusal_from_a_wait() -> None:
    """The probe above: a server that accepts and says nothing is not a refusal."""
    server = socket.create_server((HOST, 0))
    try:
        assert not refused_at_once(server.getsockname()[:2], timeout=0.3)
    finally:
        server.close()
    time.sleep(0)
