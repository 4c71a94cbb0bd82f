"""A man in the middle (tests/mitm.py) on a real cluster: between primary and secondary, and between the primary
and the gateway. It flips a byte in a page, flips a header byte, drops a frame, replays one, reorders two. Every
one is detected and refused (the connection dropped, the log naming what failed); the secondary's state is still
the last complete checkpoint; the service goes on; and after a failover every acknowledged write is there.

The roles run with --no-encrypt here, so that the proxy can find the frames that carry pages (in integrity-only
mode the payload is readable; encrypted, only sizes show): the seals are the same either way.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from mitm import C2S, Frame, Mitm

from colo_e2e.helpers import Procs, Workload, events_named, read_state_log, verify_ledger, wait_for
from conftest import guest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")]

RAM = "16M"
INTERVAL_MS = 30
PLAIN = ("--no-encrypt",)


def carries_pages(f: Frame) -> bool:
    return b"vmstate-chunk" in f.body[:40] and len(f.body) > 4096


def a_checkpoint_message(f: Frame) -> bool:
    return b"vmstate" in f.body[:40] or b"checkpoint" in f.body[:40]


TAMPER: dict[str, tuple[str, dict[str, Any], str]] = {
    # action: (Mitm method, its options, what the secondary's log names)
    "flip-a-page-byte": ("flip_body", {"offset": 2000, "match": carries_pages}, "fails its MAC"),
    "flip-a-header-byte": ("flip_header", {"offset": 6, "match": a_checkpoint_message}, "fails its MAC"),
    "drop-a-frame": ("drop", {"match": a_checkpoint_message}, "is missing"),
    "replay-a-frame": ("replay", {"match": a_checkpoint_message}, "is a replay"),
    "reorder-two-frames": ("reorder", {"match": a_checkpoint_message}, "frame"),
}


def protected(procs: Procs, checkpoints: int = 3) -> dict[str, Any] | None:
    s = procs.status()
    ok = s["gateway"]["protected"] and s["nodes"]["primary"].get("checkpoints", 0) >= checkpoints
    return s if ok else None


@pytest.mark.parametrize("action", list(TAMPER))
def test_tampering_on_the_replication_link_is_refused(tmp_path: Path, action: str) -> None:
    slog = tmp_path / "secondary.states"
    procs = Procs(tmp_path / "c", common=PLAIN, env={"secondary": {"COLO_STATE_LOG": str(slog)},
                                                     "primary": {"COLO_STATE_LOG": str(tmp_path / "primary.states")}})
    mitm: Mitm | None = None
    w: Workload | None = None
    try:
        procs.start_gateway()
        mitm = Mitm(("127.0.0.1", 1))  # the target is known once the secondary listens
        procs.start_secondary(interval_ms=INTERVAL_MS, extra=("--advertise", "%s:%d" % mitm.address))
        mitm.target = procs.secondary
        mitm.start()
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_for(lambda: protected(procs), 30, "the pair to be protected through the proxy")
        w = Workload(procs.service, persistent=2, cli=1).start()
        w.wait_replies(3, "replies before the attack")

        method, options, text = TAMPER[action]
        rule = getattr(mitm, method)(direction=C2S, **options)
        assert rule.fired.wait(20), f"{action}: the proxy never saw a frame to tamper with"
        wait_for(lambda: text in procs.stderr("secondary"), 10, f"the secondary to refuse the frame ({text!r})")
        refused_at = len(read_state_log(slog))
        # Refused: the connection dropped, the secondary applied nothing more (its last state is a checkpoint the
        # primary took), the primary goes on, and the gateway resets the secondary to be copied anew.
        time.sleep(0.3)
        log = read_state_log(slog)
        assert len(log) == refused_at, f"{action}: the secondary applied something after the refusal"
        primary_states = read_state_log(tmp_path / "primary.states")
        last = {k: log[-1][k] for k in ("ram", "cpu", "devices")}
        assert any({k: p[k] for k in ("ram", "cpu", "devices")} == last for p in primary_states
                   if p["epoch"] == log[-1]["epoch"]), \
            f"{action}: the secondary's state is not a checkpoint of the primary"
        assert "Traceback" not in procs.stderr("secondary"), procs.stderr("secondary")

        # The pair heals (a fresh copy through the proxy, whose rule has fired), then the primary dies: every
        # acknowledged write survives the failover.
        wait_for(lambda: protected(procs, checkpoints=1) and events_named(procs.status(), "reset"), 30,
                 "the pair to be protected again")
        procs.procs["primary"].send_signal(signal.SIGKILL)
        wait_for(lambda: events_named(procs.status(), "promoted"), 15, "the failover")
        since = time.monotonic()
        w.wait_replies(3, "replies after the failover", since=since)
        w.stop()
        verify_ledger(w, procs.service, allow_cli_failures=True)
    finally:
        if w is not None:
            w.stop()
            w.close()
        if mitm is not None:
            mitm.close()
        procs.stop()


@pytest.mark.parametrize("action", ["flip-body", "replay", "drop"])
def test_tampering_between_the_primary_and_the_gateway_is_refused(tmp_path: Path, action: str) -> None:
    """The gateway refuses the frame and drops the primary's link: for the witness that is losing the primary, so
    the secondary takes over; no forged or replayed output reaches a client, and no acknowledged write is lost."""
    procs = Procs(tmp_path / "c", common=PLAIN)
    mitm: Mitm | None = None
    w: Workload | None = None
    try:
        procs.start_gateway()
        mitm = Mitm(procs.gateway).start()
        procs.start_secondary(interval_ms=INTERVAL_MS)
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS, gateway=mitm.address)
        wait_for(lambda: protected(procs), 30, "the pair to be protected")
        w = Workload(procs.service, persistent=2, cli=1).start()
        w.wait_replies(3, "replies before the attack")
        outputs = lambda f: b"output" in f.body[:20]  # noqa: E731 - the primary's replies to clients
        rule = {"flip-body": lambda: mitm.flip_body(direction=C2S, offset=12, match=outputs),
                "replay": lambda: mitm.replay(direction=C2S, match=outputs),
                "drop": lambda: mitm.drop(direction=C2S, match=outputs)}[action]()
        assert rule.fired.wait(20), "the proxy never saw an output to tamper with"
        wait_for(lambda: "bad input from primary" in procs.stderr("gateway"), 10, "the gateway to refuse the frame")
        wait_for(lambda: events_named(procs.status(), "promoted"), 15, "the secondary to take over")
        since = time.monotonic()
        w.wait_replies(3, "replies after the failover", since=since)
        w.stop()
        verify_ledger(w, procs.service, allow_cli_failures=True)  # checks also that no reply came twice
    finally:
        if w is not None:
            w.stop()
            w.close()
        if mitm is not None:
            mitm.close()
        procs.stop()
