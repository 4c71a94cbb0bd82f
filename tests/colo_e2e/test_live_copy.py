"""The copy to a new secondary while the guest runs (pre-copy): the guest serves during the rounds, the copy ends
with one stop, and the secondary's VM is the primary's, byte for byte, at that stop.

Each case starts a primary alone (unprotected), lets its guest dirty pages, then starts a spare: the gateway pairs
them, the primary copies its VM while memtouch keeps writing. The state logs (COLO_STATE_LOG) hold both nodes'
digests of the copy's state and of every checkpoint after it.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from colo_e2e.helpers import Procs, by_epoch, events_named, read_state_log, wait_for
from conftest import guest

pytestmark = pytest.mark.slow

RAM = "64M"


def start_alone(tmp_path: Path, cmdline: str, *extra: str, ram: str = RAM, verbose: bool = False,
                image: str = "memtouch", fault: str = "") -> tuple[Procs, Path, Path]:
    """A gateway and a primary, no secondary yet; once the guest printed something."""
    logs = tmp_path / "primary.states", tmp_path / "secondary.states"
    primary_env = {"COLO_STATE_LOG": str(logs[0])} | ({"COLO_FAULT": fault} if fault else {})
    procs = Procs(tmp_path / "c", env={"primary": primary_env, "secondary": {"COLO_STATE_LOG": str(logs[1])}},
                  common=("-v",) if verbose else ())
    procs.start_gateway()
    procs.start_primary(guest(image), ram=ram, cmdline=cmdline, extra=extra)
    procs.wait_ready("primary")
    wait_for(lambda: f"{image}: ".encode() in procs.stdout("primary"), 30, "the guest to run unprotected")
    return procs, *logs


def protected(procs: Procs) -> dict[str, Any] | None:
    s = procs.status()
    p = s["nodes"]["primary"]
    return p if s["gateway"]["protected"] and p.get("last_copy") and p.get("checkpoints", 0) >= 3 else None


def same_states(primary_log: Path, secondary_log: Path, copy_epoch: int) -> None:
    """Every state both nodes logged, the copy's first, has the same digest on both."""
    mine, theirs = by_epoch(read_state_log(primary_log)), by_epoch(read_state_log(secondary_log))
    assert copy_epoch in theirs, f"the secondary logged no state for the copy (epoch {copy_epoch}): {sorted(theirs)}"
    shared = sorted(set(mine) & set(theirs), key=str)
    assert len(shared) >= 3, (sorted(mine, key=str), sorted(theirs, key=str))
    for epoch in shared:
        assert mine[epoch] == theirs[epoch], f"the nodes differ at epoch {epoch}"


@pytest.mark.parametrize("fill", ["word", "random"])
def test_a_live_copy_of_a_guest_that_writes_all_the_time(tmp_path: Path, fill: str) -> None:
    # 2048 pages (8 MiB) written on every iteration: a word per page (fast, compressible) or every byte
    # (incompressible); the rest of RAM is the kernel and zero pages.
    procs, plog, slog = start_alone(tmp_path, f"pages=2048 fill={fill} report=50")
    try:
        procs.start_secondary()
        primary = wait_for(lambda: protected(procs), 120, "the copy to complete and checkpoints to follow")
        copy = primary["last_copy"]
        assert copy["live"] is True and copy["rounds"] >= 2, copy  # at least one round while the guest ran
        # Either it converged (the last stop was short) or it said that it did not; both end protected.
        assert copy["stalled"] or copy["final_pages"] <= max(256, copy["pages"]), copy
        before = read_state_log(plog)
        copy_epoch = min(e["epoch"] for e in before if e["epoch"] != "final")
        same_states(plog, slog, copy_epoch)
        assert "the copy does not converge" in procs.stderr("primary") if copy["stalled"] else True
    finally:
        procs.stop()


def test_a_copy_of_a_quiet_guest_converges(tmp_path: Path) -> None:
    procs, plog, slog = start_alone(tmp_path, "", image="kvstore")
    try:
        procs.start_secondary()
        copy = wait_for(lambda: protected(procs), 60, "the copy to complete")["last_copy"]
        assert copy["live"] is True and not copy["stalled"] and copy["final_pages"] <= 256, copy
        same_states(plog, slog, min(e["epoch"] for e in read_state_log(plog)))
    finally:
        procs.stop()


def test_a_primary_killed_during_a_live_copy_leaves_no_half_copy_in_charge(tmp_path: Path) -> None:
    procs, _, _ = start_alone(tmp_path, "pages=2048 fill=random report=50", fault="mid-copy@0")
    try:
        procs.start_secondary()
        procs.procs["primary"].wait(30)  # killed halfway through the first round
        st = wait_for(lambda: (s := procs.status())["gateway"]["service_state"] == "down" and s, 10,
                      "the gateway to say the service is down")
        assert not events_named(st, "promote") and not events_named(st, "promoted"), st["events"]
        assert procs.alive("secondary")
        wait_for(lambda: procs.status()["spares"], 5, "the secondary to be a spare again")
    finally:
        procs.stop()


def test_a_secondary_killed_during_the_copy_is_replaced_by_the_next(tmp_path: Path) -> None:
    procs, _plog, _ = start_alone(tmp_path, "pages=2048 fill=random report=50")
    procs.env["doomed"] = {"COLO_FAULT": "mid-copy@0"}
    try:
        procs.start_secondary("doomed")
        procs.procs["doomed"].wait(30)  # killed by its first part of the copy
        served = len(procs.stdout("primary"))
        wait_for(lambda: len(procs.stdout("primary")) > served, 10, "the primary to serve on, unprotected")
        st = procs.status()
        assert not st["gateway"]["protected"] and st["gateway"]["service_state"] != "down", st["gateway"]
        procs.start_secondary("secondary")
        copy = wait_for(lambda: protected(procs), 60, "the next secondary to protect the primary")["last_copy"]
        assert copy["live"], copy
        assert procs.alive("primary")
    finally:
        procs.stop()


def test_a_stop_and_copy_when_asked(tmp_path: Path) -> None:
    procs, plog, slog = start_alone(tmp_path, "pages=512 fill=word report=50", "--copy", "stop")
    try:
        procs.start_secondary()
        copy = wait_for(lambda: protected(procs), 60, "the copy to complete")["last_copy"]
        assert copy["live"] is False and copy["rounds"] == 1 and copy["pages"] == copy["final_pages"], copy
        same_states(plog, slog, min(e["epoch"] for e in read_state_log(plog)))
    finally:
        procs.stop()


def test_a_large_vm_in_use_is_copied_in_one_stop_without_starving_the_heartbeats(tmp_path: Path) -> None:
    """640 MiB of incompressible RAM in one stop: the copy goes in bounded records, so neither side's I/O
    thread waits long enough behind the copy to miss the gateway's heartbeat timeout (one 540 MB record did)."""
    procs, plog, slog = start_alone(tmp_path, "pages=16 resident=640", "--copy", "stop", ram="1G")
    try:
        procs.start_secondary()
        copy = wait_for(lambda: protected(procs), 120, "the copy to complete")["last_copy"]
        assert copy["mb"] > 640 and copy["rounds"] == 1, copy
        st = procs.status()
        assert not [e for e in st["events"] if e["event"] in ("lost", "fenced")], st["events"]
        same_states(plog, slog, min(e["epoch"] for e in read_state_log(plog)))
    finally:
        procs.stop()


def logged_at(stderr: str, text: str) -> float:
    """The wall-clock time of the first log line with `text` (the roles log with milliseconds)."""
    for line in stderr.splitlines():
        if text in line:
            stamp = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
            return time.mktime(stamp) + int(line[20:23]) / 1000
    raise AssertionError(f"no log line with {text!r} in:\n{stderr}")


def test_the_guest_serves_while_the_copy_goes_on(tmp_path: Path) -> None:
    """memtouch serve=1 echoes between iterations: a client keeps getting echoes while the rounds go out (a copy
    of about 128 MiB, long enough to see), and none is lost or changed when the copy ends and outputs wait for
    checkpoints from there on."""
    procs, _, _ = start_alone(tmp_path, "pages=32768 fill=word serve=1 report=200", ram="256M", verbose=True)
    sock = socket.create_connection(procs.service, timeout=30)
    answered: list[float] = []
    try:
        procs.start_secondary()
        deadline = time.monotonic() + 120
        n = 0
        while time.monotonic() < deadline and "protected by" not in procs.stderr("primary"):
            n += 1
            echo(sock, b"ping %06d\n" % n)
            answered.append(time.time())
        for k in range(20):  # protected now: the echoes still come, through checkpoints
            echo(sock, b"after %d\n" % k)
        wait_for(lambda: protected(procs), 60, "checkpoints after the copy")
        log = procs.stderr("primary")
        began, ended = logged_at(log, "copying the VM to"), logged_at(log, "protected by")
        during = [t for t in answered if began + 0.01 < t < ended - 0.01]
        assert len(during) >= 3, f"{len(during)} echoes during a copy of {ended - began:.3f} s"
    finally:
        sock.close()
        procs.stop()


def echo(sock: socket.socket, msg: bytes) -> None:
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        more = sock.recv(len(msg) - len(got))
        assert more, f"the service closed the connection after {got!r}"
        got += more
    assert got == msg
