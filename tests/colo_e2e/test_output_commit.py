"""Output commit, seen from a client: while protected, a reply reaches the client only once the checkpoint covering
it is complete, so with a long interval every request waits for the next checkpoint; once the secondary is lost
the primary goes on unprotected and replies pass straight through.

(With a deterministic guest the failover tests cannot tell output commit from its absence: the gateway replays the
inputs and the secondary recomputes the same replies. Timing can.)
"""
from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

from colo_e2e.helpers import Procs, Resp, events_named, wait_for
from conftest import guest

INTERVAL_MS = 250.0


def latencies(conn: Resp, n: int, key: str) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        got = conn.call("INCR", key)
        out.append(time.monotonic() - t0)
        assert isinstance(got, int)
    return out


def test_replies_wait_for_the_checkpoint_then_pass_through_unprotected(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "cluster")
    try:
        procs.start_gateway()
        procs.start_secondary()
        procs.start_primary(guest("kvstore"), ram="16M", interval_ms=INTERVAL_MS)

        def protected() -> bool:
            s = procs.status()
            return bool(s["gateway"]["protected"] and s["nodes"]["primary"].get("checkpoints", 0) >= 1)
        wait_for(protected, 30, "the primary to be protected")
        conn = Resp(procs.service, timeout=10)
        try:
            conn.call("PING")  # in step with the checkpoints from here: each reply came right after a commit
            held = latencies(conn, 5, "ctr")
            # Each request is answered at once by the guest, but the reply waits for the end of the epoch.
            assert statistics.median(held) >= 0.6 * INTERVAL_MS / 1000, \
                f"replies came before their checkpoint could complete: {[round(x * 1000) for x in held]} ms"

            procs.procs["secondary"].send_signal(signal.SIGKILL)

            def unprotected() -> bool:
                s = procs.status()
                return bool(not s["gateway"]["protected"] and events_named(s, "unprotected"))
            wait_for(unprotected, 15, "the primary to go on unprotected")
            free = latencies(conn, 5, "ctr")
            assert statistics.median(free) < 0.25 * INTERVAL_MS / 1000, \
                f"unprotected, replies are still held: {[round(x * 1000) for x in free]} ms"
            assert conn.call("GET", "ctr") == b"10"
        finally:
            conn.close()
        assert procs.alive("primary") and procs.alive("gateway")
    finally:
        procs.stop()
