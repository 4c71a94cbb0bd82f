"""Hybrid (COLO) mode: when the secondary is lost, the primary goes on serving, unprotected.

The gateway then has no second VM to compare with: it must release whatever the comparer holds of the primary's
output, pass the rest straight through and keep the primary as the active node. Two parties notice the loss, each
on its own: the gateway (the secondary's link closes, or stays silent past the gateway's heartbeat timeout) and the
primary (the replication link, past the primary's heartbeat timeout), which then tells the gateway
protection(unprotected). Both orders must work.

  - SIGKILL at phases of the checkpoint handshake under the kvstore write workload (with its ledger);
  - hangs (SIGSTOP, tests/colo_hybrid/freeze.py), with heartbeat timeouts set so that a chosen party notices first:
    the primary first (it says unprotected while the gateway still mirrors), the gateway first (it drops the
    secondary while the comparer holds primary output), between checkpoints and inside a checkpoint that a noisy
    mismatch asked for (the primary's answer is held until then).
"""
from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from colo.faults import SECONDARY_PHASES
from colo.node import NodeState
from colo_e2e.helpers import Resp, Workload, verify_ledger
from colo_hybrid.cluster import HybridRun, Noisy, abort_workload, events_named, probe, wait_for, wait_gone

needs_redis_cli = pytest.mark.skipif(shutil.which("redis-cli") is None,
                                     reason="needs redis-cli (Debian redis-tools)")

BACKSTOP_MS = 200
FAULT_EPOCH = 8  # over a second of client writes before the fault
# The gateway notices a hung secondary after its 0.8 s; the primary, given 1.4 s, only later (it still sends its
# status every 0.35 s, well within the gateway's 0.8 s).
PRIMARY_NOTICES_LATER = {"primary": ["--heartbeat-timeout", "1.4"]}

def check_unprotected(run: HybridRun) -> dict[str, Any]:
    st = run.status()
    prim = st["nodes"]["primary"]
    assert prim["connected"] and prim["active"] and prim["protected"] is False, st["nodes"]
    assert not st["nodes"]["secondary"]["connected"], st["nodes"]
    assert not events_named(st, "promoted") and not events_named(st, "promote"), st["events"]
    assert st["gateway"]["compare_held_bytes"] == 0, st["gateway"]
    assert run.alive("primary") and run.alive("gateway"), run.stderr()[-3000:]
    return st


@pytest.mark.slow
@pytest.mark.redis
@needs_redis_cli
@pytest.mark.parametrize("phase", ["after-request", "mid-receive", "after-received", "after-loaded"])
def test_kill_secondary_at_checkpoint_phase(hybrid: Callable[..., HybridRun], phase: str) -> None:
    assert phase in SECONDARY_PHASES
    run = hybrid("kvstore", backstop_ms=BACKSTOP_MS, env={"secondary": {"COLO_FAULT": f"{phase}@{FAULT_EPOCH}"}})
    run.start()
    w = Workload(run.service, persistent=2, cli=2).start()
    try:
        acked_before = wait_gone(run, "secondary", w.acks)
        assert acked_before >= 1, "no write was acknowledged before the secondary died"
        assert run.procs["secondary"].returncode == -signal.SIGKILL, run.stderr()[-3000:]

        def unprotected() -> dict[str, Any] | None:
            st = run.status()
            return st if events_named(st, "unprotected") and not st["gateway"]["protected"] else None
        wait_for(unprotected, 15, "the primary to go on unprotected")
        since = time.monotonic()
        w.wait_replies(5, "every client to get replies from the unprotected primary", since=since, timeout=6,
                       context=lambda: f"gateway {run.status()['gateway']}")
        w.stop()
        verify_ledger(w, run.service)
    finally:
        abort_workload(w)
    check_unprotected(run)


def test_primary_gives_up_on_a_hung_secondary_first(hybrid: Callable[..., HybridRun]) -> None:
    """The secondary hangs (SIGSTOP). The primary (0.8 s heartbeat timeout) gives up on it and reports unprotected
    while the gateway (2 s) still mirrors to the secondary: the primary keeps serving. (Until 974a31c the gateway
    crashed on that report: comparer.checkpoint_committed(1 << 62) raised ValueError and the primary was dropped.)"""
    run = hybrid("kvstore", backstop_ms=BACKSTOP_MS, extra={"gateway": ["--heartbeat-timeout", "2"]})
    run.start()
    r = Resp(run.service, timeout=8.0)
    try:
        assert r.call("SET", "before", "1") == "OK"
        run.signal("secondary", signal.SIGSTOP)
        wait_for(lambda: not run.alive("primary") or run.status()["nodes"]["primary"].get("state")
                 == NodeState.UNPROTECTED.value,
                 10, "the primary to give up on the hung secondary")
        # The primary's report came first (the gateway's own 2 s had not passed): then the gateway dropped the
        # secondary because the primary had.
        st = run.status()
        silent = [e for e in st["events"] if e["event"] == "silent"]
        unprotected = events_named(st, "unprotected")
        assert unprotected and "silent" in unprotected[0]["reason"] and not silent, \
            f"the gateway noticed first: the test proves nothing ({st['events']})"
        time.sleep(0.3)
        assert run.alive("primary"), f"the primary exited:\n{run.stderr()[-2500:]}"
        for i in range(20):
            assert r.call("INCR", "after") == i + 1
        assert r.call("GET", "before") == b"1"
        assert probe(run.service, "after", timeout=5.0) is None
    finally:
        r.close()
        run.signal("secondary", signal.SIGKILL)
    wait_for(lambda: not run.status()["nodes"]["secondary"]["connected"], 5, "the secondary gone")
    check_unprotected(run)


@pytest.mark.slow
def test_gateway_notices_a_hung_secondary_first(hybrid: Callable[..., HybridRun]) -> None:
    """The secondary hangs right after it loaded a checkpoint, while the primary runs on and answers: the comparer
    holds those answers, waiting for the secondary's copy. The gateway notices the silence first and drops the
    secondary; then the primary reports unprotected. A client that connected during the hang, and the clients
    already connected, must get their answers."""
    run = hybrid("kvstore", backstop_ms=BACKSTOP_MS, freeze=("secondary",), extra=PRIMARY_NOTICES_LATER,
                 env={"secondary": {"COLO_FAULT": f"after-loaded@{FAULT_EPOCH}"}})
    run.start()
    w = Workload(run.service, persistent=2, cli=0).start()
    try:
        wait_gone(run, "secondary", w.acks, frozen=True)
        problem = probe(run.service, "while-hung", timeout=6.0)
        assert problem is None, f"a client that came while the secondary hung: {problem}; " \
                                f"gateway {run.status()['gateway']}"
        since = time.monotonic()
        w.wait_replies(5, "every client to get replies", since=since, timeout=6)
        w.stop()
        verify_ledger(w, run.service)
    finally:
        abort_workload(w)
        run.signal("secondary", signal.SIGKILL)
    wait_for(lambda: not run.status()["nodes"]["secondary"]["connected"], 5, "the secondary gone")
    check_unprotected(run)


@pytest.mark.slow
def test_secondary_hangs_inside_a_mismatch_checkpoint(hybrid: Callable[..., HybridRun]) -> None:
    """noisy, no backstop: the TIME answers differ, so the primary's is held until the checkpoint the mismatch asks
    for; the secondary hangs inside that checkpoint (after checkpoint-reply), the gateway notices first. The
    primary goes on alone: the held answer must reach the client."""
    run = hybrid("noisy", backstop_ms=60_000, freeze=("secondary",), extra=PRIMARY_NOTICES_LATER,
                 env={"secondary": {"COLO_FAULT": "after-reply@2"}})
    run.start()
    c = Noisy(run.service, timeout=6.0)
    try:
        c.time()  # checkpoint 1
        try:
            c.time()  # checkpoint 2: the secondary hangs in it
        except TimeoutError:
            pytest.fail(f"the TIME answer held for the mismatch never came after the secondary was lost "
                        f"(gateway {run.status()['gateway']})")
        c.ping()
        c.nothing_pending()
    finally:
        c.close()
        run.signal("secondary", signal.SIGKILL)
    wait_for(lambda: not run.status()["nodes"]["secondary"]["connected"], 5, "the secondary gone")
    check_unprotected(run)
