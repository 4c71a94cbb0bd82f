"""Two `colo up` clusters of one user on one host: each has its own name, run directory, key and processes; every
control command reaches only the cluster it names, and with no name refuses and lists them."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from colo_e2e.helpers import wait_for
from colo_e2e.up import Up, pid_running, wait_gone


@pytest.mark.slow
def test_two_clusters_side_by_side(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Started at the same moment, with the same default name: the claim is atomic, one gets kvstore-2.
    a, b = Up(run, tmp_path, tag="a"), Up(run, tmp_path, tag="b")
    try:
        ia, ib = a.wait_up(), b.wait_up()
        assert {ia["name"], ib["name"]} == {"kvstore", "kvstore-2"}, (ia, ib)
        if ia["name"] != "kvstore":
            a, b, ia, ib = b, a, ib, ia
        ka, kb = (run / "kvstore" / "key").read_bytes(), (run / "kvstore-2" / "key").read_bytes()
        assert ka != kb and ia["gateway"] != ib["gateway"] and ia["service"] != ib["service"]
        assert not set(ia["pids"].values()) & set(ib["pids"].values())

        # No name: refused, and both are listed (name, guest, service address, pids).
        for cmd in (["status"], ["failover"], ["down"]):
            r = a.cli(*cmd)
            assert r.returncode == 2 and "2 clusters are running on this host" in r.stderr, (cmd, r.stderr)
            for info in (ia, ib):
                assert info["name"] in r.stderr and "%s:%d" % tuple(info["service"]) in r.stderr, r.stderr
                assert f"gateway {info['pids']['gateway']}" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        r = a.cli("status")
        assert "kvstore.bin" in r.stderr and "--name" in r.stderr

        # --name reaches only that one.
        sa, sb = a.status("--name", "kvstore"), a.status("--name", "kvstore-2")
        assert sa["gateway"]["pid"] == ia["pids"]["gateway"] and sb["gateway"]["pid"] == ib["pids"]["gateway"]
        assert sa["nodes"]["primary"]["pid"] == ia["pids"]["primary"]
        assert sb["nodes"]["primary"]["pid"] == ib["pids"]["primary"]

        r = a.cli("failover", "--name", "kvstore-2")
        assert r.returncode == 0 and "failover started" in r.stdout, (r.stdout, r.stderr)
        wait_for(lambda: a.status("--name", "kvstore-2")["gateway"]["generation"] == 2, 20,
                 "kvstore-2 to fail over")
        sa = a.status("--name", "kvstore")
        assert sa["gateway"]["generation"] == 1 and sa["gateway"]["failovers"] == 0, sa["gateway"]
        assert sa["nodes"]["primary"]["pid"] == ia["pids"]["primary"] and sa["gateway"]["protected"]

        # down NAME stops that one, whole; the other runs on and is now the only one.
        r = a.cli("down", "kvstore")
        assert r.returncode == 0 and "stopped kvstore" in r.stdout, (r.stdout, r.stderr)
        assert a.wait(10) == 0, a.stderr()
        a_pids = {**ia["pids"], "up": a.proc.pid}
        assert not [n for n, p in a_pids.items() if pid_running(p)], "colo down returned before its processes went"
        assert not (run / "kvstore").exists()
        assert b.proc.poll() is None and all(pid_running(p) for n, p in ib["pids"].items() if n != "primary")
        sb = b.status()
        assert sb["gateway"]["pid"] == ib["pids"]["gateway"]

        b.read()  # what it runs now: a replacement secondary came after the failover
        r = b.cli("down")
        assert r.returncode == 0 and "stopped kvstore-2" in r.stdout, (r.stdout, r.stderr)
        assert b.wait(10) == 0, b.stderr()
        wait_gone({n: int(p["pid"]) for n, p in b.seen.items()}, 1, "kvstore-2 after colo down")
        for u in (a, b):
            assert "Traceback" not in u.stderr() and "already attached" not in u.stderr(), u.stderr()
    finally:
        for u in (a, b):
            if u.proc.poll() is None:
                u.proc.send_signal(signal.SIGTERM)
            u.close()


@pytest.mark.slow
def test_an_explicit_name_that_runs_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    a = Up(run, tmp_path, "--name", "svc", tag="a")
    try:
        a.wait_up()
        b = Up(run, tmp_path, "--name", "svc", tag="b")
        try:
            assert b.wait(20) == 2
            assert "a cluster named 'svc' is already running" in b.stderr() and "colo down svc" in b.stderr()
            assert a.proc.poll() is None and a.status()["gateway"]["protected"]
        finally:
            b.close()
    finally:
        a.close()
