"""Hybrid (COLO) mode through the command line: the comparer's reasons for checkpoints reach `colo status`.

noisy, no backstop: three TIME requests make three mismatches; a PING answered while the secondary is frozen for
a moment stays unmatched past the 200 ms compare timeout: one "timeout" checkpoint. `colo status --json` (a separate
process, as a user runs it) must count exactly those per trigger, as the primary's checkpoint records do, and the
table view must show them. The gateway's count of released output must include answers whose match was completed
by the secondary's copy.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from colo_e2e.helpers import Resp
from colo_hybrid.cluster import HybridRun, Noisy, colo_cli, wait_for


def test_trigger_counts_reach_colo_status(hybrid: Callable[..., HybridRun]) -> None:
    # A longer heartbeat timeout: the secondary is frozen for 0.6 s on purpose, which must not count as its loss.
    run = hybrid("noisy", backstop_ms=60_000, heartbeat_timeout=2.0, state_logs=False)
    run.start()
    gateway = "%s:%d" % run.cluster.gateway
    c = Noisy(run.service)
    try:
        for _ in range(3):
            c.time()  # the VMs' clocks differ: mismatch
        # Until the secondary has loaded checkpoint 3 (and told the gateway), held output does not time out.
        wait_for(lambda: run.status()["nodes"]["secondary"].get("epoch") == 3, 10, "the secondary to load checkpoint 3")
        time.sleep(0.2)
        run.signal("secondary", signal.SIGSTOP)
        wake = threading.Timer(0.6, run.signal, args=("secondary", signal.SIGCONT))
        wake.start()
        try:
            c.ping()  # the primary's +PONG waits for the secondary's copy: timeout, then the checkpoint releases it
        finally:
            wake.join()
        # and one more mismatch after the secondary is back. Once the timeout checkpoint (4) is done: the guest
        # runs during a checkpoint's request/reply round trip, so a TIME answered while the frozen secondary had
        # not replied yet belongs to checkpoint 4 and is released by its commit, with no mismatch checkpoint.
        wait_for(lambda: run.status()["nodes"]["secondary"].get("epoch") == 4, 10, "the secondary to load checkpoint 4")
        c.time()
        c.nothing_pending()
    finally:
        c.close()
    # The primary writes a checkpoint's record once vmstate-loaded is in, which may be just after the reply it
    # released reached the client.
    wait_for(lambda: dict(run.trigger_counts()) == {"mismatch": 4, "timeout": 1}, 5,
             "the primary's stats to count 4 mismatch and 1 timeout checkpoints")
    assert dict(run.trigger_counts()) == {"mismatch": 4, "timeout": 1}, run.checkpoints()

    def status_json() -> dict[str, Any] | None:
        p = colo_cli("status", "--gateway", gateway, "--key-file", str(run.cluster.key_file), "--json")
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        return info if info["nodes"]["primary"].get("triggers") == {"mismatch": 4, "timeout": 1} else None
    info = wait_for(status_json, 10, "colo status --json to count 4 mismatch and 1 timeout checkpoints")
    prim = info["nodes"]["primary"]
    assert prim["checkpoints"] == 5 and prim["epoch"] == 5 and prim["mode"] == "hybrid", prim
    assert info["gateway"]["mode"] == "hybrid" and info["gateway"]["protected"], info["gateway"]
    asked = [e for e in info["events"] if e["event"] == "checkpoint-asked"]
    assert [e["trigger"] for e in asked] == ["mismatch"] * 3 + ["timeout", "mismatch"], asked
    assert "unmatched" in asked[3]["reason"] and "differs" in asked[0]["reason"], asked

    table = colo_cli("status", "--gateway", gateway, "--key-file", str(run.cluster.key_file))
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("primary"))
    assert line.rstrip().endswith("mismatch 4, timeout 1"), table.stdout
    assert "hybrid mode" in table.stdout, table.stdout


def test_status_counts_output_released_on_the_secondarys_match(hybrid: Callable[..., HybridRun]) -> None:
    """kvstore, no checkpoint during the test: six answers reach the client, the last one released when the
    secondary (frozen for 0.1 s, compare timeout 1 s) produced its copy after the primary's."""
    run = hybrid("kvstore", backstop_ms=60_000, heartbeat_timeout=2.0, state_logs=False,
                 extra={"gateway": ["--compare-timeout", "1000"]})
    run.start()
    r = Resp(run.service, timeout=10.0)
    try:
        for i in range(5):
            assert r.call("SET", f"k{i}", "v") == "OK"
        run.signal("secondary", signal.SIGSTOP)
        r.sock.sendall(Resp.encode("INCR", "n"))
        time.sleep(0.1)
        run.signal("secondary", signal.SIGCONT)
        assert r.read_reply() == 1
        assert not run.checkpoints(), run.checkpoints()
        # (asked while the connection is open: closing it makes one more output event, the guest's close)
        wait_for(lambda: run.status()["gateway"]["released_output_seq"] == 6, 3,
                 f"colo status to count the 6 answers the client got ({run.status()['gateway']})")
    finally:
        r.close()
