"""Cluster names and run directories (colo.rundir): valid names, unique defaults, live and dead clusters, selection."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colo import rundir
from colo.errors import ColoError


def me() -> dict[str, Any]:
    return {"pid": os.getpid(), "start": rundir.proc_start(os.getpid())}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("name", ["kvstore", "a", "A-b_c.9", "x" * 64, "..a"])
def test_good_names(name: str) -> None:
    assert rundir.check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "a b", ".", "..", "é", "a\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="bad cluster name"):
        rundir.check_name(name)


def test_default_name_is_the_guest_stem() -> None:
    assert rundir.default_name("/x/guests/kvstore.bin") == "kvstore"
    assert rundir.default_name("my guest!.elf") == "my_guest_"
    assert rundir.default_name(".hidden.bin") == "hidden"
    assert rundir.default_name("...") == "colo"


def test_run_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COLO_RUN_DIR", str(tmp_path / "r"))
    assert rundir.run_root() == tmp_path / "r"
    monkeypatch.delenv("COLO_RUN_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert rundir.run_root() == tmp_path / f"colo-{os.getuid()}"


def test_a_recycled_pid_is_not_alive() -> None:
    start = rundir.proc_start(os.getpid())
    assert rundir.proc_alive(os.getpid(), start)
    assert not rundir.proc_alive(os.getpid(), "1")  # same pid, another start time: a different process
    assert not rundir.proc_alive(dead_pid())


def test_claims_are_unique_among_live_clusters(tmp_path: Path) -> None:
    a = rundir.claim("guests/kvstore.bin", None, {"procs": {"up": me()}}, tmp_path)
    b = rundir.claim("guests/kvstore.bin", None, {"procs": {"up": me()}}, tmp_path)
    c = rundir.claim("guests/kvstore.bin", "mine", {"procs": {"up": me()}}, tmp_path)
    assert (a.name, b.name, c.name) == ("kvstore", "kvstore-2", "mine")
    assert (tmp_path / "kvstore-2" / "up.json").exists() and (tmp_path / "kvstore").stat().st_mode & 0o777 == 0o700
    with pytest.raises(ColoError, match="a cluster named 'mine' is already running"):
        rundir.claim("guests/kvstore.bin", "mine", {"procs": {"up": me()}}, tmp_path)


def test_dead_clusters_are_cleaned_and_their_names_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = {"procs": {"up": {"pid": dead_pid(), "start": None}}}
    old = rundir.claim("kvstore.bin", None, dead, tmp_path)
    (old.dir / "gateway.log").write_text("from the dead run\n")
    (tmp_path / "junk").mkdir()  # no up.json at all: a claim that never finished
    caplog.set_level("INFO", logger="colo.rundir")
    assert rundir.live_clusters(tmp_path) == []
    assert not old.dir.exists() and not (tmp_path / "junk").exists()
    assert "the cluster 'kvstore' is dead" in caplog.text
    again = rundir.claim("kvstore.bin", None, {"procs": {"up": me()}}, tmp_path)
    assert again.name == "kvstore" and not (again.dir / "gateway.log").exists()


def test_select_names_the_one_running_or_refuses_and_lists(tmp_path: Path) -> None:
    with pytest.raises(ColoError, match="no `colo up` is running"):
        rundir.select(None, tmp_path)
    a = rundir.claim("kvstore.bin", None, {"guest": "/g/kvstore.bin", "procs": {"up": me()},
                                           "service": ["127.0.0.1", 6001]}, tmp_path)
    assert rundir.select(None, tmp_path).name == a.name
    rundir.claim("counter.bin", None, {"guest": "/g/counter.bin", "procs": {"up": me()}}, tmp_path)
    with pytest.raises(ColoError) as e:
        rundir.select(None, tmp_path)
    text = str(e.value)
    assert "2 clusters are running" in text and "--name" in text
    assert "kvstore  kvstore.bin  127.0.0.1:6001" in text and "counter  counter.bin  (starting)" in text
    assert f"up {os.getpid()}" in text
    assert rundir.select("counter", tmp_path).name == "counter"
    with pytest.raises(ColoError, match=r"no cluster named 'nope' is running .*running: counter, kvstore"):
        rundir.select("nope", tmp_path)
