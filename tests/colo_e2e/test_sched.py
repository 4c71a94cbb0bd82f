"""The roles' scheduling policy (`--sched`, colo/sched.py): every thread of every role runs with the one asked for,
SCHED_BATCH unless told otherwise, and a policy the system refuses is a warning, not a failed start."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from colo import sched
from colo.cli import build_parser
from colo.cluster import LocalCluster
from conftest import guest


def _thread_policies(pid: int) -> set[int]:
    policies = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies.add(os.sched_getscheduler(int(tid)))
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that just ended
    return policies


@pytest.mark.parametrize("policy, number", [("batch", os.SCHED_BATCH), ("normal", os.SCHED_OTHER)])
def test_every_thread_of_every_role_runs_with_the_policy_asked_for(tmp_path: Path, policy: str, number: int) -> None:
    c = LocalCluster(str(guest("kvstore")), ram="16M", directory=tmp_path, logs=True)  # the default: batch
    if policy != sched.DEFAULT:
        c.sched = policy
    try:
        c.start()
        c.wait_protected(timeout=60)
        for role, proc in c.procs.items():
            assert _thread_policies(proc.pid) == {number}, role  # I/O, sender and lifeline threads included
    finally:
        c.stop()


def test_apply_sets_every_thread_and_the_threads_started_after() -> None:
    seen: dict[str, str] = {}
    go = threading.Event()
    before = threading.Thread(target=lambda: (go.wait(), seen.setdefault("before", sched.current())))
    before.start()
    was = sched.current()
    try:
        assert sched.apply("batch") is None
        seen["self"] = sched.current()
        after = threading.Thread(target=lambda: seen.setdefault("after", sched.current()))
        after.start()
        after.join()
    finally:
        go.set()
        before.join()
        assert sched.apply(was if was in sched.POLICIES else "normal") is None  # the test process as it was
    assert seen == {"before": "batch", "self": "batch", "after": "batch"}


def test_a_refused_policy_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert sched.apply("batch") == "cannot set the scheduling policy batch: Operation not permitted"
    with pytest.raises(ValueError, match="one of batch, normal"):
        sched.apply("fifo")


def test_the_roles_and_colo_up_take_sched() -> None:
    p = build_parser()
    for cmd in (["gateway"], ["primary", "kvstore", "--gateway", "127.0.0.1:1"],
                ["secondary", "--gateway", "127.0.0.1:1"], ["up", "kvstore"]):
        assert p.parse_args(cmd).sched == "batch"
        assert p.parse_args([*cmd, "--sched", "normal"]).sched == "normal"


def _thread_cpus(pid: int) -> set[frozenset[int]]:
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add(frozenset(os.sched_getaffinity(int(tid))))
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that just ended
    return found


@pytest.mark.skipif(len(sched.allowed_cpus()) < 2, reason="pinning the nodes needs 2 CPUs or more")
def test_each_node_of_a_hybrid_cluster_runs_on_its_own_cpus(tmp_path: Path) -> None:
    everywhere = frozenset(sched.allowed_cpus())
    c = LocalCluster(str(guest("kvstore")), ram="16M", directory=tmp_path, logs=True, mode="hybrid")
    try:
        c.start()
        c.wait_protected(timeout=60)
        primary, secondary = _thread_cpus(c.procs["primary"].pid), _thread_cpus(c.procs["secondary"].pid)
        assert len(primary) == 1 and len(secondary) == 1, (primary, secondary)  # every thread alike
        (p,), (s,) = primary, secondary
        assert p and s and not p & s and len(p) == len(s) and p | s <= everywhere, (p, s)
        assert [sorted(p), sorted(s)] == [c.node_cpus["primary"], c.node_cpus["secondary"]]
        assert _thread_cpus(c.procs["gateway"].pid) == {everywhere}  # the gateway serves both: anywhere
        status = c.status()  # and `colo status` says so
        assert status["nodes"]["primary"]["cpus"] == sched.format_cpus(p)
        assert status["nodes"]["secondary"]["cpus"] == sched.format_cpus(s)
        assert status["gateway"]["cpus"] == sched.format_cpus(everywhere)
    finally:
        c.stop()
