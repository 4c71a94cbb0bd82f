"""Continuous protection: the service stays protected through any number of failures, with no command.

A secondary that registers with the gateway at any time becomes the protection of the active node whenever it is
unprotected; further ones wait as spares. After a failover the promoted node, now the primary of a new
generation, takes the next spare. Here: ten failovers in a row under load, killing whichever node is the primary
each time and starting a fresh spare, with a ledger of acknowledged writes and the digests of both nodes compared
at every checkpoint of every generation (COLO_STATE_LOG).
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from colo_e2e.helpers import Procs, Workload, events_named, read_state_log, verify_ledger, wait_for
from conftest import guest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")]

RAM = "16M"
INTERVAL_MS = 30
FAILOVERS = 10


def digests_by_generation(logs: list[Path]) -> dict[tuple[int, Any], set[tuple[str, str, str]]]:
    """(generation, epoch) -> every digest any node logged for it."""
    out: dict[tuple[int, Any], set[tuple[str, str, str]]] = {}
    for path in logs:
        for e in read_state_log(path):
            out.setdefault((e.get("generation", 0), e["epoch"]), set()).add((e["ram"], e["cpu"], e["devices"]))
    return out


@pytest.mark.parametrize("mode", ["periodic", "hybrid"])
def test_ten_failovers_in_a_row_lose_nothing(tmp_path: Path, mode: str) -> None:
    logs: list[Path] = []

    def env_for(name: str) -> dict[str, str]:
        path = tmp_path / f"{name}.states"
        logs.append(path)
        return {"COLO_STATE_LOG": str(path)}

    procs = Procs(tmp_path / "c", mode=mode, env={"primary": env_for("primary"), "secondary-0": env_for("s0")},
                  common=("-v",))
    w: Workload | None = None
    try:
        procs.start_gateway()
        procs.start_secondary("secondary-0", interval_ms=INTERVAL_MS)
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        names = {procs.wait_ready("primary")["node"]: "primary", procs.wait_ready("secondary-0")["node"]: "secondary-0"}

        def protected(generation: int) -> dict[str, Any] | None:
            s = procs.status()
            ok = (s["gateway"]["protected"] and s["gateway"]["generation"] == generation
                  and s["nodes"]["primary"].get("checkpoints", 0) >= 2)
            return s if ok else None

        st = wait_for(lambda: protected(1), 30, "the first pair to be protected")
        w = Workload(procs.service, persistent=2, cli=1).start()
        for n in range(1, FAILOVERS + 1):
            # A fresh spare waits; then the primary dies; the secondary takes over and the spare protects it.
            spare = f"secondary-{n}"
            procs.env[spare] = env_for(f"s{n}")
            procs.start_secondary(spare, interval_ms=INTERVAL_MS)
            names[procs.wait_ready(spare)["node"]] = spare
            w.wait_replies(3 * n, f"replies before failover {n}", timeout=30)
            victim = names[st["nodes"]["primary"]["id"]]
            procs.procs[victim].send_signal(signal.SIGKILL)
            st = wait_for(lambda: protected(n + 1), 40, f"protection again after failover {n}")
            assert events_named(st, "promoted"), st["events"]
        since = time.monotonic()
        w.wait_replies(3, "replies after the last failover", since=since)
        w.stop()
        counts = verify_ledger(w, procs.service, allow_cli_failures=True)
        assert counts["incrs"] > 0
        st = procs.status()
        assert st["gateway"]["generation"] == FAILOVERS + 1 and st["gateway"]["failovers"] == FAILOVERS, st["gateway"]
        # Every persistent client kept its one TCP connection through all ten failovers (verify_ledger checked
        # that their counters went up by exactly one each time, with nothing lost or repeated).
        assert not w.errors(), w.errors()
    finally:
        if w is not None:
            w.stop()
            w.close()
        procs.stop()
    # Whenever two nodes logged the same (generation, epoch), they held the same VM: each secondary, at every
    # checkpoint, held exactly its primary's state, in every generation.
    for key, digests in digests_by_generation(logs).items():
        assert len(digests) == 1, f"generation {key[0]}, epoch {key[1]}: the nodes' states differ"
    generations = {g for g, _ in digests_by_generation(logs)}
    assert set(range(1, FAILOVERS + 2)) <= generations, sorted(generations)


def test_a_secondary_for_another_guest_or_ram_is_not_used(tmp_path: Path) -> None:
    """A spare started for another guest image or RAM size is refused with the reason, and nothing changes on the
    primary (it serves on, unprotected); a fitting spare then protects it."""
    procs = Procs(tmp_path / "c")
    try:
        procs.start_gateway()
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=INTERVAL_MS)
        wait_for(lambda: procs.status()["nodes"]["primary"].get("connected"), 20, "the primary to attach")
        procs.start_secondary("for-noisy", interval_ms=INTERVAL_MS, extra=("--guest", str(guest("noisy"))))
        procs.start_secondary("for-32m", interval_ms=INTERVAL_MS, extra=("--ram", "32M"))

        def refused() -> list[dict[str, Any]] | None:
            got = events_named(procs.status(), "incompatible")
            return got if len(got) >= 2 else None
        why = " / ".join(e["reason"] for e in wait_for(refused, 20, "both spares to be refused"))
        assert "noisy.bin" in why and "33554432 bytes of RAM" in why, why
        st = procs.status()
        assert st["gateway"]["service_state"] == "unprotected" and not events_named(st, "protect"), st["events"]
        procs.start_secondary("fits", interval_ms=INTERVAL_MS, extra=("--guest", str(guest("kvstore")),
                                                                      "--ram", RAM))
        wait_for(lambda: procs.status()["gateway"]["protected"], 30, "the fitting spare to protect the primary")
        assert procs.status()["nodes"]["secondary"]["id"] == procs.wait_ready("fits")["node"]
    finally:
        procs.stop()
