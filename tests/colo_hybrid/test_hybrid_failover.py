"""Failover in hybrid (COLO) mode: whenever the primary dies, clients lose nothing and see nothing twice.

Both VMs run. If the primary dies between checkpoints, the secondary goes on from its own running state and the
gateway releases what the secondary produced and the comparer still held; if it dies during a checkpoint whose
state arrived complete, the secondary loads that state first (rollback) and the gateway replays the input that
came after it; a partial state is discarded. Either way clients keep their TCP connections to the same gateway
address, every acknowledged write survives, every reply comes exactly once (INCR replies on one connection go up
by exactly one) and is well formed, and the secondary only ever applied the primary's checkpoints.

kvstore runs under a write workload with a ledger (persistent RESP connections and redis-cli processes, from the
periodic-mode e2e helpers). The primary is
  - SIGKILLed after a random delay (between checkpoints, mostly);
  - SIGKILLed at each phase of the checkpoint handshake (COLO_FAULT=PHASE@EPOCH), with a 200 ms backstop so
    checkpoints come often;
  - frozen (SIGSTOP, tests/colo_hybrid/freeze.py) at each phase: a hung host. Its sockets stay open, so the others
    notice only its silence, after the heartbeat timeout, and meanwhile the secondary's VM runs on. A new client
    connects during that window: it must be answered once the secondary has taken over.
noisy runs the same SIGKILLs with every checkpoint caused by a mismatch (no backstop), so the primary dies while
the two VMs' answers differ.
"""
from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from colo.faults import PRIMARY_PHASES
from colo_e2e.helpers import Resp, Workload, verify_ledger
from colo_hybrid.cluster import HybridRun, NoisyLoop, abort_workload, events_named, probe, wait_for, wait_gone

needs_redis_cli = pytest.mark.skipif(shutil.which("redis-cli") is None,
                                     reason="needs redis-cli (Debian redis-tools)")

BACKSTOP_MS = 200
FAULT_EPOCH = 8  # over a second of client writes before the fault
AFTER_FAILOVER_ACKS = 5  # replies every client must get from the survivor
BEFORE_COMPLETE = ("before-request", "after-request", "after-reply", "mid-send")
# Killed at every phase in both checkpoint modes; the freeze tests (slower) run in the default mode only.
CHECKPOINT_MODES = ("pipelined", "strict")


def expected_resume(phase: str, n: int) -> set[int]:
    """The checkpoint the secondary's VM holds (continue) or loads (rollback) when the primary dies at phase@n."""
    if phase in BEFORE_COMPLETE:
        return {n - 1}  # checkpoint n never arrived whole: discarded, the secondary goes on from its own state
    if phase == "after-size":
        return {n - 1, n}  # all of n was sent; whether the secondary verified it before the loss is a race
    return {n}  # complete: the secondary loaded it (it may have before the loss, or does it first at take-over)


def wait_survivor_serves(w: Workload, since: float, run: HybridRun, timeout: float = 20.0) -> None:
    w.wait_replies(AFTER_FAILOVER_ACKS, f"every client to get {AFTER_FAILOVER_ACKS} replies after the failover",
                   since=since, timeout=timeout,
                   context=lambda: f"status {run.status()['gateway']}; {events_named(run.status(), 'promoted')}")


def check_promoted(run: HybridRun, gateway_pid: int) -> dict[str, Any]:
    """The secondary is the active node, behind the same gateway; exactly one promotion was recorded."""
    st = run.status()
    assert st["gateway"]["pid"] == gateway_pid, "the gateway was replaced"
    survivor, old = run.cluster.node_id("secondary"), run.cluster.node_id("primary")
    act = st["nodes"]["primary"]  # the promoted node is the primary now, of a new generation
    assert act["connected"] and act["active"] and act["id"] == survivor and act["generation"] == 2, st["nodes"]
    assert not st["nodes"]["secondary"]["connected"], st["nodes"]
    promoted = events_named(st, "promoted")
    assert len(promoted) == 1 and promoted[0]["node"] == survivor, st["events"]
    assert any(e.get("node") == old for e in events_named(st, "lost") + events_named(st, "fenced")), st["events"]
    assert run.alive("secondary") and run.alive("gateway"), run.stderr()[-3000:]
    return st


def check_states(run: HybridRun, resumed: int, allowed: set[int]) -> None:
    """The secondary applied only the primary's checkpoints, and resumed from (went on from) one in `allowed`."""
    p, s = run.states()
    applied = sorted(e for e in s if isinstance(e, int))
    assert resumed in allowed, f"resumed from checkpoint {resumed}, expected one of {sorted(allowed)}"
    assert applied and applied[-1] == resumed, f"the secondary applied {applied} but says it resumed from {resumed}"
    for epoch in applied:
        assert s[epoch] == p[epoch], f"checkpoint {epoch}: the secondary applied another state than the primary's"


def kvstore_failover(run: HybridRun, *, allowed: Callable[[set[int]], set[int]], kill_after: float | None = None,
                     frozen: bool = False) -> None:
    """Run the write workload until the primary fails (SIGKILL after `kill_after` s, or its own COLO_FAULT), then
    check the survivor: the ledger, the status, the states the secondary applied."""
    run.start()
    gateway_pid = run.status()["gateway"]["pid"]
    w = Workload(run.service, persistent=2, cli=2).start()
    try:
        if kill_after is not None:
            time.sleep(kill_after)
            acked_before = w.acks()
            run.signal("primary", signal.SIGKILL)
            run.procs["primary"].wait(5)
        else:
            acked_before = wait_gone(run, "primary", w.acks, frozen=frozen)
        assert acked_before >= 1, "no write was acknowledged before the primary failed: the test proves nothing"
        if frozen:
            # A client arrives while the primary hangs: the gateway still mirrors its input to the secondary.
            problem = probe(run.service, "while-hung", timeout=5.0)
            assert problem is None, f"a client that came while the primary hung: {problem}; " \
                                    f"{events_named(run.status(), 'promoted')}"
        else:
            assert run.procs["primary"].returncode == -signal.SIGKILL, run.stderr()[-3000:]
        wait_for(lambda: events_named(run.status(), "promoted"), 15, "the gateway to report the secondary promoted",
                 context=lambda: run.stderr()[-4000:])
        wait_survivor_serves(w, time.monotonic(), run, timeout=10.0)
        w.stop()
        counts = verify_ledger(w, run.service)
        assert counts["incrs"] > acked_before
    finally:
        abort_workload(w)
    st = check_promoted(run, gateway_pid)
    p, _ = run.states()
    check_states(run, events_named(st, "promoted")[0]["epoch"], allowed({e for e in p if isinstance(e, int)}))


@pytest.mark.redis
@needs_redis_cli
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_primary_at_a_random_moment(hybrid: Callable[..., HybridRun], seed: int) -> None:
    run = hybrid("kvstore", backstop_ms=300)
    kvstore_failover(run, allowed=lambda taken: taken, kill_after=random.Random(seed).uniform(0.4, 1.6))


@pytest.mark.redis
@needs_redis_cli
@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("phase", PRIMARY_PHASES)
def test_kill_primary_at_checkpoint_phase(hybrid: Callable[..., HybridRun], phase: str, mode: str) -> None:
    run = hybrid("kvstore", backstop_ms=BACKSTOP_MS, env={"primary": {"COLO_FAULT": f"{phase}@{FAULT_EPOCH}"}},
                 checkpoint_mode=mode)
    kvstore_failover(run, allowed=lambda _: expected_resume(phase, FAULT_EPOCH))


# Under the workload the secondary's VM has often consumed input beyond the checkpoint; after loading it, it waits
# for the gateway to replay that input, which happens only once the primary's commit came: then it answers nothing
# before the promotion and loses nothing. So this path is taken only some of the time here, every time below.
@pytest.mark.slow
@pytest.mark.redis
@needs_redis_cli
@pytest.mark.parametrize("phase", [
    pytest.param(p)
    if p in ("after-size", "after-received") else p for p in PRIMARY_PHASES])
def test_primary_hangs_at_checkpoint_phase(hybrid: Callable[..., HybridRun], phase: str) -> None:
    run = hybrid("kvstore", backstop_ms=BACKSTOP_MS, freeze=("primary",),
                 env={"primary": {"COLO_FAULT": f"{phase}@{FAULT_EPOCH}"}})
    kvstore_failover(run, allowed=lambda _: expected_resume(phase, FAULT_EPOCH), frozen=True)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["after-size", "after-received"])
def test_primary_hangs_after_state_sent_idle_guest(hybrid: Callable[..., HybridRun], phase: str) -> None:
    """The same hang with an idle guest: both VMs have consumed all input at the checkpoint, so the secondary runs
    on at once, and what it answers in the window before its promotion must reach the clients."""
    run = hybrid("kvstore", backstop_ms=BACKSTOP_MS, freeze=("primary",), env={"primary": {"COLO_FAULT": f"{phase}@4"}})
    run.start()
    r = Resp(run.service, timeout=8.0)
    try:
        assert r.call("SET", "before", "1") == "OK"
        assert r.call("INCR", "n") == 1
        wait_gone(run, "primary", lambda: 0, frozen=True)
        problem = probe(run.service, "while-hung", timeout=5.0)  # a new client, while the primary hangs
        assert problem is None, f"a client that came while the primary hung: {problem}; " \
                                f"{events_named(run.status(), 'promoted')}"
        assert r.call("INCR", "n") == 2  # the old connection, after the promotion
        assert r.call("GET", "before") == b"1"
    finally:
        r.close()
    st = run.status()
    assert st["nodes"]["primary"]["id"] == run.cluster.node_id("secondary"), st
    assert len(events_named(st, "promoted")) == 1, st


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("phase", PRIMARY_PHASES)
def test_noisy_kill_primary_during_mismatch_checkpoint(hybrid: Callable[..., HybridRun], phase: str,
                                                       mode: str) -> None:
    """Checkpoints come only from mismatches (no backstop): the primary dies inside the 4th, while the two VMs'
    answers differ. Every client still gets exactly one well-formed answer per request and keeps its connection."""
    run = hybrid("noisy", backstop_ms=60_000, env={"primary": {"COLO_FAULT": f"{phase}@4"}}, checkpoint_mode=mode)
    run.start()
    loop = NoisyLoop(run.service, clients=2).start()
    try:
        wait_gone(run, "primary", lambda: sum(loop.rounds))
        assert run.procs["primary"].returncode == -signal.SIGKILL, run.stderr()[-3000:]
        wait_for(lambda: events_named(run.status(), "promoted"), 15, "the secondary promoted",
                 context=lambda: run.stderr()[-4000:])
        since = time.monotonic()
        wait_for(lambda: all(n >= 3 for n in loop.rounds_since(since)) or loop.errors, 10,
                 f"every client to get 3 more rounds (errors {loop.errors})")
        loop.stop()
        assert not loop.errors, loop.errors
        for c in loop.conns:
            c.nothing_pending()
            c.ping()
    finally:
        loop.abort()
    st = run.status()
    assert st["nodes"]["primary"]["id"] == run.cluster.node_id("secondary"), st["nodes"]
    assert st["nodes"]["primary"]["active"] and not st["nodes"]["secondary"]["connected"], st["nodes"]
    check_states(run, events_named(st, "promoted")[0]["epoch"], expected_resume(phase, 4))
