"""`colo up` keeps the service protected: when a node dies it starts a replacement secondary, the witness pairs it
with the active node, and the service is protected again with no command, as often as the limit allows; a
replacement that keeps dying is retried with back-off; --no-respawn leaves it to the operator.

Real processes and real SIGKILLs; the data written before each kill is read back after it.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from colo.cluster import LocalCluster
from colo.supervise import RespawnPolicy, Supervisor
from colo_e2e.helpers import Resp, child_env, wait_for
from colo_e2e.up import Up, pid_running
from conftest import ROOT, guest

PROTECT_TIMEOUT = 30.0


def kill_primary(up: Up) -> dict[str, Any]:
    """SIGKILL the active node's process; returns the status just before."""
    st = up.status()
    p = st["nodes"]["primary"]
    assert p.get("active") and st["gateway"]["protected"], st["gateway"]
    os.kill(int(p["pid"]), signal.SIGKILL)
    return st


def wait_reprotected(up: Up, generation: int, old: set[str]) -> dict[str, Any]:
    """Until the gateway is at `generation`, protected by a secondary that is none of the `old` nodes."""
    def done() -> dict[str, Any] | None:
        assert up.proc.poll() is None, f"colo up exited with {up.proc.returncode}:\n{up.stderr()}"
        st = up.status()
        g, sec = st["gateway"], st["nodes"]["secondary"]
        ok = g["generation"] == generation and g["protected"] and sec.get("id") and sec["id"] not in old
        return st if ok else None
    return wait_for(done, PROTECT_TIMEOUT, f"protection again at generation {generation}")


@pytest.mark.slow
def test_two_kills_two_replacements_and_the_data_survives(tmp_path: Path) -> None:
    up = Up(tmp_path / "run", tmp_path)
    try:
        info = up.wait_up()
        c = Resp(tuple(info["service"]))  # one connection: the gateway keeps it through both failovers
        assert c.call("SET", "k1", "v1") == "OK"

        before = kill_primary(up)
        t0 = time.monotonic()
        p1, s1 = before["nodes"]["primary"]["id"], before["nodes"]["secondary"]["id"]
        st = wait_reprotected(up, 2, {p1, s1})
        first = time.monotonic() - t0
        assert st["nodes"]["primary"]["id"] == s1, "the secondary did not take over"
        assert c.call("GET", "k1") == b"v1"
        assert c.call("SET", "k2", "v2") == "OK"
        pids = up.read()["pids"]
        assert "secondary-2" in pids and st["nodes"]["secondary"]["pid"] == pids["secondary-2"], (pids, st)
        assert "primary" not in pids  # it was killed

        before = kill_primary(up)  # the process started as "secondary": the primary of generation 2
        assert before["nodes"]["primary"]["pid"] == pids["secondary"]
        t0 = time.monotonic()
        s2 = before["nodes"]["secondary"]["id"]
        st = wait_reprotected(up, 3, {p1, s1, s2})
        second = time.monotonic() - t0
        assert st["nodes"]["primary"]["id"] == s2
        assert [c.call("GET", "k1"), c.call("GET", "k2")] == [b"v1", b"v2"]
        pids = up.read()["pids"]
        assert set(pids) == {"gateway", "secondary-2", "secondary-3"}, pids
        assert st["gateway"]["failovers"] == 2 and len(st["lost"]) == 2, st["gateway"]
        err = up.stderr()
        for text in ("the primary (pid", "was killed by SIGKILL", "starting secondary-2", "starting secondary-3",
                     "protected again after"):
            assert text in err, (text, err)
        print(f"protected again {first:.2f} s and {second:.2f} s after SIGKILL of the primary")
        c.close()
    finally:
        up.close()


@pytest.mark.slow
def test_no_respawn_leaves_it_unprotected_until_a_secondary_is_started_by_hand(tmp_path: Path) -> None:
    up = Up(tmp_path / "run", tmp_path, "--no-respawn")
    manual: subprocess.Popen[bytes] | None = None
    try:
        up.wait_up()
        kill_primary(up)
        wait_for(lambda: up.status()["gateway"]["generation"] == 2, 20, "the failover")
        time.sleep(2.0)
        st = up.status()
        assert st["gateway"]["service_state"] == "unprotected" and not st["spares"], st["gateway"]
        assert not st["nodes"]["secondary"].get("connected")
        assert set(up.read()["pids"]) == {"gateway", "secondary"}
        err = up.stderr()
        assert "the service runs unprotected: respawn is off (--no-respawn)" in err, err
        # The hint names a command that works: a secondary started by hand protects the service again.
        hint = re.search(r"add one with: colo (secondary --gateway \S+ --key-file \S+)", err)
        assert hint, err
        manual = subprocess.Popen([sys.executable, "-m", "colo", *hint.group(1).split()], cwd=ROOT,
                                  env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "manual.err", "wb"), start_new_session=True)
        st = wait_for(lambda: (s := up.status())["gateway"]["protected"] and s, PROTECT_TIMEOUT,
                      "the hand-started secondary to protect the service")
        assert st["nodes"]["secondary"]["pid"] == manual.pid
        # colo up's stop reaches it too, through the gateway (it has no lifeline to colo up).
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(20) == 143
        assert manual.wait(10) == 0, (tmp_path / "manual.err").read_text()
    finally:
        if manual is not None and manual.poll() is None:
            manual.kill()
        up.close()


@pytest.mark.slow
def test_the_respawn_limit(tmp_path: Path) -> None:
    up = Up(tmp_path / "run", tmp_path, "--respawn", "1")
    try:
        up.wait_up()
        before = kill_primary(up)
        st = wait_reprotected(up, 2, {before["nodes"]["primary"]["id"], before["nodes"]["secondary"]["id"]})
        kill_primary(up)
        wait_for(lambda: up.status()["gateway"]["generation"] == 3, 20, "the second failover")
        wait_for(lambda: "the --respawn limit is reached (1 replacement in the last hour)" in up.stderr(), 10,
                 "colo up to say it will not start another")
        time.sleep(1.0)
        st = up.status()
        assert not st["gateway"]["protected"] and not st["spares"], st["gateway"]
        assert set(up.read()["pids"]) == {"gateway", "secondary-2"}
        assert "starting secondary-3" not in up.stderr()
    finally:
        up.close()


class BrokenReplacements(LocalCluster):
    """Every replacement has a bad command line: it exits at once, before it can protect anything."""

    def replacement_args(self) -> list[str]:
        return ["--interval", "0"]


@pytest.mark.slow
def test_a_replacement_that_keeps_dying_is_retried_with_back_off(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    cluster = BrokenReplacements(str(guest("kvstore")), ram="16M", interval_ms=30, directory=tmp_path / "c",
                                 logs=True)
    caplog.set_level(logging.WARNING, logger="colo.up")
    try:
        cluster.start()
        cluster.wait_protected()
        sup = Supervisor(cluster, RespawnPolicy(10))
        assert sup.poll() is None
        cluster.kill("primary")
        names = [f"secondary-{n}" for n in range(2, 6)]
        deadline = time.monotonic() + 40
        while not all(n in sup.exited for n in names):  # each one exited, and colo up noticed
            assert time.monotonic() < deadline, f"replacements so far: {list(cluster.procs)}\n{caplog.text}"
            assert sup.poll() is None, caplog.text
            time.sleep(0.05)
        starts = [cluster.started[n] for n in names]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # 1, 2, 4 s of back-off, plus the time each one took to fail and be noticed
        for gap, backoff in zip(gaps, (1.0, 2.0, 4.0), strict=True):
            assert backoff <= gap < backoff + 2.0, (gaps, caplog.text)
        for n, delay in zip(names, (1, 2, 4, 8), strict=True):
            assert re.search(rf"{n} \(pid \d+\) exited with status 2 before protecting the service "
                             rf"\(\d in a row\): next replacement in {delay} s", caplog.text), caplog.text
        assert all(pid_running(p) for p in (cluster.procs["gateway"].pid, cluster.procs["secondary"].pid))
    finally:
        cluster.stop()
