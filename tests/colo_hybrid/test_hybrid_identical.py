"""Hybrid (COLO) mode: after every checkpoint the two VMs are identical.

Both VMs run between checkpoints, on the same inputs. At a checkpoint the secondary's VM is replaced by the
primary's: every page either VM dirtied comes from the secondary's cache of the primary's memory, then CPU and
devices. COLO_STATE_LOG makes the primary log the digest of its VM when it takes checkpoint E and the secondary
when it has applied E; the two must be equal for every E: RAM, CPU and devices.

Three guests: kvstore under client writes (deterministic: checkpoints by the backstop timer), noisy under requests
whose answers differ between the VMs (checkpoints on mismatch), memtouch without any network (the VMs dirty
pages at their own pace: only backstop checkpoints). And one case built so that the secondary alone has written
pages (it ran ahead of a briefly frozen primary): the test that fails if the secondary's own dirty pages are not
restored from the cache.
"""
from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable

import pytest

from colo_e2e.helpers import Resp, Workload, verify_ledger
from colo_hybrid.cluster import HybridRun, Noisy, abort_workload, assert_identical_at_checkpoints, wait_for


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")
def test_kvstore_identical_after_every_checkpoint(hybrid: Callable[..., HybridRun]) -> None:
    run = hybrid("kvstore", backstop_ms=150)
    run.start()
    w = Workload(run.service, persistent=3, cli=1).start()
    try:
        wait_for(lambda: (len(run.checkpoints()) >= 12 and w.acks() >= 50) or w.errors(), 30,
                 "12 checkpoints and 50 acknowledged writes")
        w.stop()
        verify_ledger(w, run.service)
    finally:
        abort_workload(w)
    triggers = run.trigger_counts()
    run.close()
    assert_identical_at_checkpoints(run, min_epochs=10)
    assert triggers["timer"] >= 10 and triggers["mismatch"] == 0, f"kvstore is deterministic: {triggers}"


def test_noisy_identical_after_mismatch_checkpoints(hybrid: Callable[..., HybridRun]) -> None:
    run = hybrid("noisy", backstop_ms=60_000)  # no backstop during the test: every checkpoint is asked for
    run.start()
    c = Noisy(run.service)
    try:
        for i in range(6):
            c.time()
            c.random(24)
            c.get(f"k{i}")
            c.ping()
        c.nothing_pending()
    finally:
        c.close()
    triggers = run.trigger_counts()
    run.close()
    assert triggers["mismatch"] >= 12, f"TIME, RANDOM and GET answers differ: expected mismatches, got {triggers}"
    assert_identical_at_checkpoints(run, min_epochs=12)


def test_pages_only_the_secondary_wrote_are_restored(hybrid: Callable[..., HybridRun]) -> None:
    """The secondary runs ahead: the primary is frozen for a moment while clients store large values, so only the
    secondary's VM takes them in (new heap pages); its answers find no match, the comparer asks for a checkpoint
    ("timeout"), and the primary, thawed, takes it before it has looked at that input. The checkpoint must bring
    back every page the secondary alone wrote from the cache of the primary's memory; then both VMs take the input
    in again, and every client gets its answer once."""
    run = hybrid("kvstore", backstop_ms=60_000, heartbeat_timeout=2.5)  # a 0.6 s freeze is not a loss
    run.start()
    # 12 kB each: three fresh pages per value, and small enough that the whole SET fits in the gateway's input
    # credit for its connection (colo.witness), which otherwise holds the rest back until the primary takes it.
    value = {i: (f"{i:02d}" * 6_000).encode() for i in range(6)}
    conns = [Resp(run.service, timeout=15.0) for _ in value]
    try:
        assert all(c.call("PING") == "PONG" for c in conns)
        run.signal("primary", signal.SIGSTOP)
        try:
            for i, c in enumerate(conns):
                c.sock.sendall(Resp.encode("SET", f"big{i}", value[i]))
            time.sleep(0.6)
        finally:
            run.signal("primary", signal.SIGCONT)
        assert [c.read_reply() for c in conns] == ["OK"] * len(conns)
        for i, c in enumerate(conns):
            assert c.call("GET", f"big{i}") == value[i]
            assert c.pending_bytes(0.05) == b""
    finally:
        for c in conns:
            c.close()
    triggers = run.trigger_counts()
    assert triggers["timeout"] >= 1, triggers
    run.close()
    assert_identical_at_checkpoints(run, min_epochs=1)


def test_memtouch_identical_with_backstop_checkpoints_only(hybrid: Callable[..., HybridRun]) -> None:
    """No network: nothing to compare, so only the backstop checkpoints; both VMs dirty the same buffer, each at
    its own pace, and every checkpoint must undo whatever the secondary wrote."""
    run = hybrid("memtouch", cmdline="pages=192 fill=word", backstop_ms=200)
    run.start()
    wait_for(lambda: len(run.checkpoints()) >= 8, 30, "8 backstop checkpoints")
    st = run.status()
    assert st["nodes"]["secondary"]["state"] == "secondary (hybrid: running)", st["nodes"]["secondary"]
    records = run.checkpoints()
    run.close()
    assert {r["trigger"] for r in records} == {"timer"}, [r["trigger"] for r in records]
    # The VM really runs between checkpoints: each one carries the buffer's pages again.
    assert all(r["dirty_pages"] >= 192 for r in records[1:]), [r["dirty_pages"] for r in records]
    assert_identical_at_checkpoints(run, min_epochs=8)
    # And the guest really ran on: the buffer words changed from one checkpoint to the next.
    p, _ = run.states()
    ram = [p[e][0] for e in sorted(e for e in p if isinstance(e, int))]
    assert len(set(ram)) == len(ram), "memtouch did not change its memory between two checkpoints"
