"""One client cannot stall the others, and memory stays bounded (issue: a client pipelining 200,000 GETs of a
4 KiB value without reading its replies made every other client time out, kept the service dead for 85 s after
it closed, and grew the nodes by tens of megabytes).

Now the gateway keeps at most `credit` bytes of each connection's input in flight past what the guest has taken,
stops reading a client whose unsent replies pass 1 MiB (backpressure on that connection only), and closes it after
`--client-timeout` seconds of reading nothing; so the guest never has more than a little of the slow client's work
queued ahead of anyone else's.
"""
from __future__ import annotations

import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from colo_e2e.helpers import Procs, Resp, wait_for
from conftest import guest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")]

RAM = "32M"
INTERVAL_MS = 20
GETS = 200_000
VALUE = b"v" * 4096


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def flood(address: tuple[str, int], stop: threading.Event) -> socket.socket:
    """A client that pipelines GETs of the big value and never reads a reply."""
    s = socket.create_connection(address, timeout=5)
    s.settimeout(None)
    request = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n"

    def send() -> None:
        try:
            for _lo in range(0, GETS, 1000):
                if stop.is_set():
                    return
                s.sendall(request * 1000)  # blocks once the gateway stops reading us: that is the point
        except OSError:
            return
    threading.Thread(target=send, daemon=True).start()
    return s


def ping_latencies(address: tuple[str, int], seconds: float) -> list[float]:
    r = Resp(address, timeout=10.0)
    out = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t = time.monotonic()
            assert r.call("PING") == "PONG"
            out.append(time.monotonic() - t)
            time.sleep(0.02)
    finally:
        r.close()
    return out


def test_a_client_that_does_not_read_cannot_stall_the_others(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c")
    stop = threading.Event()
    slow: socket.socket | None = None
    try:
        procs.start_gateway("--client-timeout", "6")
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_for(lambda: procs.status()["gateway"]["protected"], 30, "the pair to be protected")
        r = Resp(procs.service, timeout=10.0)
        try:
            assert r.call("SET", "big", VALUE) == "OK"
        finally:
            r.close()
        calm = ping_latencies(procs.service, 1.0)
        pids = {role: procs.procs[role].pid for role in ("gateway", "primary", "secondary")}
        before = {role: rss_kib(pid) for role, pid in pids.items()}

        slow = flood(procs.service, stop)
        first = ping_latencies(procs.service, 2.0)
        middle = {role: rss_kib(pid) for role, pid in pids.items()}
        later = ping_latencies(procs.service, 2.0)  # the flood still connected, held back by its backpressure
        after = {role: rss_kib(pid) for role, pid in pids.items()}

        # Another client is answered all along, about as fast as without the flood (a reply waits for the
        # checkpoint that covers it: up to one interval). Not stalled: before the fix, the other clients timed out
        # (10 s). The first PINGs after the flood starts wait while the guest and the checkpoints work through the
        # flood's first credit of input (16 KiB of GETs: megabytes of replies): 0.14-0.62 s in nine runs on a
        # 2-CPU machine, idle or not, 0.62-0.87 s beside two CPU hogs, so the bound on the worst is loose. Once
        # that is done the p95 says "as fast as calm" (44-53 ms beside the hogs, calm 46-49 ms): over the later
        # two seconds only, since beside the hogs three of the first PINGs once waited, and the p95 of all four
        # seconds was 170 ms.
        worst = max(first + later)
        assert worst < 2.0, f"a PING waited {worst * 1e3:.0f} ms (calm: max {max(calm) * 1e3:.0f} ms)"
        p95 = statistics.quantiles(later, n=20)[-1]
        assert p95 < 0.1, f"PING p95 {p95 * 1e3:.0f} ms under the flood, its first two seconds past"
        # Memory is bounded: a few MiB for the client's backlog, and no growth while the flood goes on.
        for role in pids:
            grew = (after[role] - before[role]) / 1024
            assert grew < 48, f"the {role} grew {grew:.0f} MiB under the flood ({before[role]} -> {after[role]} KiB)"
            assert after[role] - middle[role] < 8 * 1024, f"the {role} keeps growing: {middle[role]} -> {after[role]}"

        # The slow client closes: the service is back for everyone at once.
        stop.set()
        slow.close()
        slow = None
        t = time.monotonic()
        r = Resp(procs.service, timeout=10.0)
        try:
            assert r.call("SET", "after", "1") == "OK" and r.call("GET", "after") == b"1"
        finally:
            r.close()
        # At once: before the fix it stayed dead for 85 s; here 1.07 s was seen with two busy loops on the two CPUs.
        assert time.monotonic() - t < 3.0, f"the service took {time.monotonic() - t:.2f} s to come back"
        for role in pids:
            assert procs.alive(role), procs.stderr(role)[-2000:]
    finally:
        stop.set()
        if slow is not None:
            slow.close()
        procs.stop()


def test_a_client_that_never_reads_is_closed_after_the_timeout(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c")
    stop = threading.Event()
    try:
        procs.start_gateway("--client-timeout", "2")
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_for(lambda: procs.status()["gateway"]["protected"], 30, "the pair to be protected")
        r = Resp(procs.service, timeout=10.0)
        try:
            assert r.call("SET", "big", VALUE) == "OK"
        finally:
            r.close()
        slow = flood(procs.service, stop)
        wait_for(lambda: procs.status()["gateway"]["clients"] == 0, 10, "the gateway to close the slow client")
        slow.settimeout(5)
        try:
            while slow.recv(1 << 20):  # drain what it was sent: then the gateway's close
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        assert closed, "the slow client's connection is still open"
        slow.close()
    finally:
        stop.set()
        procs.stop()
