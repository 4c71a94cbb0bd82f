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
