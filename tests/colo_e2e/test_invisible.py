"""Replication is invisible (DESIGN section 5): a deterministic guest replicated for many checkpoints ends with the
same memory, registers, devices and serial output as the same guest run alone, and at every checkpoint the
secondary holds exactly the primary's state.

The three roles run as separate processes over TCP; COLO_STATE_LOG makes each node log the digest of its VM at
every checkpoint (the primary when it takes one, plus "final" at power-off; the secondary when it applies one).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from colo.node import state_digest
from colo_e2e.helpers import Procs, by_epoch, read_state_log, wait_for
from conftest import guest
from toyvm import Machine, StopReason
from toyvm.ram import parse_size

RAM = "16M"
INTERVAL_MS = 20


def run_solo(image: Path, ram: str, cmdline: str, timeout: float = 60.0) -> tuple[dict[str, str], bytes, int]:
    """The same guest alone, in this process: (state digest at power-off, serial output, exit code)."""
    vm = Machine(parse_size(ram))
    vm.boot(image, cmdline)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        r = vm.run_slice(0.05)
        out += vm.take_serial()
        if r.reason is StopReason.POWER_OFF:
            break
        assert time.monotonic() < deadline, f"the solo run of {image.name} did not power off within {timeout} s"
    return state_digest(vm), bytes(out), vm.exit_code or 0


CASES = [
    pytest.param("hello", "", 0, id="hello"),
    pytest.param("counter", "count=30 interval_ms=10", 0, id="counter-30"),
    # Enough work that the guest runs across many checkpoints on any host: about 1 s alone here, so some 40
    # checkpoints of 20 ms, four times the 10 required (virtual time makes each tick cheap; 3000 ticks, 0.16 s,
    # gave 7 to 12 checkpoints depending on the host's load: the intermittent failure of the last round).
    pytest.param("counter", "count=20000 interval_ms=1", 10, id="counter-20000"),
    pytest.param("memtouch", "pages=64 iters=600000", 10, id="memtouch"),
]


@pytest.mark.parametrize("name, cmdline, min_checkpoints", CASES)
def test_replicated_guest_ends_like_the_solo_run(tmp_path: Path, name: str, cmdline: str,
                                                 min_checkpoints: int) -> None:
    image = guest(name)
    solo_digest, solo_serial, solo_exit = run_solo(image, RAM, cmdline)

    plog, slog = tmp_path / "primary.states", tmp_path / "secondary.states"
    procs = Procs(tmp_path / "cluster", env={"primary": {"COLO_STATE_LOG": str(plog)},
                                              "secondary": {"COLO_STATE_LOG": str(slog)}})
    try:
        procs.start_gateway()
        procs.start_secondary()
        procs.start_primary(image, ram=RAM, cmdline=cmdline, interval_ms=INTERVAL_MS)
        code = procs.procs["primary"].wait(90)
        assert code == solo_exit, f"primary exited {code}, the solo guest {solo_exit}:\n{procs.stderr('primary')}"
        # The secondary logs an applied checkpoint before it answers vmstate-loaded, so its log is complete once
        # the primary is gone. A guest that powers off is not a failure: no failover; the gateway lives on, says
        # the service ended, and stops the secondary (there is nothing to take over) instead of promoting it.
        assert procs.alive("gateway"), procs.stderr("gateway")
        wait_for(lambda: not procs.alive("secondary"), 10, "the secondary to be released")
        assert procs.procs["secondary"].returncode == 0, procs.stderr("secondary")
        assert "the guest has ended" in procs.stderr("secondary"), procs.stderr("secondary")
        status = procs.status()
    finally:
        procs.stop()

    primary = read_state_log(plog)
    secondary = read_state_log(slog)
    p, s = by_epoch(primary), by_epoch(secondary)
    assert "final" in p, f"the primary logged no final state: {primary}"
    final = dict(zip(("ram", "cpu", "devices"), p["final"], strict=True))
    assert final == solo_digest, f"replicated {name} ended in another state than the solo run"

    serial = procs.stdout("primary")
    assert serial == solo_serial, f"serial output differs:\nreplicated: {serial[-300:]!r}\nsolo: {solo_serial[-300:]!r}"

    checkpoints = [e for e in p if isinstance(e, int) and e >= 1]
    assert len(checkpoints) >= min_checkpoints, f"only {len(checkpoints)} checkpoints: {sorted(checkpoints)}"
    assert 0 in s, "the secondary never applied the initial copy"
    # Every checkpoint the primary took was applied by the secondary (the primary waits for vmstate-loaded).
    assert sorted(k for k in s if k != 0) == sorted(checkpoints), (sorted(s), sorted(p, key=str))
    for epoch, digest in s.items():
        assert digest == p[epoch], f"epoch {epoch}: the secondary's state differs from the primary's"
    assert status["gateway"]["service_state"] == "ended" and status["gateway"]["ended_code"] == solo_exit, status
    events = [e["event"] for e in status["events"]]
    assert "guest-ended" in events and "promote" not in events and "lost" not in events, events


def test_digest_sees_every_part_of_the_state() -> None:
    """The comparison above is only as good as the digest: a change to RAM, a register or a device changes it."""
    vm = Machine(parse_size("2M"))
    vm.boot(guest("hello"), "")
    base = state_digest(vm)
    assert state_digest(vm) == base
    vm.ram.view[12345] ^= 1
    assert state_digest(vm)["ram"] != base["ram"]
    vm.ram.view[12345] ^= 1
    st: dict[str, Any] = vm.save_state(include_ram=False)
    st["cpu"]["regs"]["rax"] = 0x1234
    vm.restore_state(st)
    assert state_digest(vm)["cpu"] != base["cpu"]
    vm2 = Machine(parse_size("2M"))
    vm2.boot(guest("hello"), "")
    vm2.net.deliver(1, 7)  # a client connection opened: the device state changes
    assert state_digest(vm2)["devices"] != base["devices"]
    assert state_digest(vm2)["ram"] == base["ram"]
