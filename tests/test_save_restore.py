"""A guest stopped at a random exact point, saved, and restored in a fresh process finishes exactly as an
uninterrupted run: same memory, registers, devices and serial output."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from conftest import asm, guest, toyvm_cli
from guests_asm import RMW_LOOP
from toyvm import Machine, StopReason
from toyvm import state as state_file

CASES = {  # name: (guest, command line, exit code)
    "hello": ("hello", "greeting=yes", 0),
    "counter": ("counter", "count=4 interval_ms=20", 0),
    "memtouch": ("memtouch", "pages=24 iters=200 report=50", 0),
    "rmw-asm": (None, "", 126),
}


def image_for(case: str, tmp: Path) -> Path:
    name = CASES[case][0]
    if name is not None:
        return guest(name)
    path = tmp / "rmw.bin"
    path.write_bytes(asm(RMW_LOOP))
    return path


def total_instructions(image: Path, cmdline: str) -> int:
    vm = Machine(16 << 20, hooks="python")
    vm.boot(image, cmdline)
    total = 0
    while True:
        r = vm.run_slice(seconds=30)
        assert r.instructions is not None
        total += r.instructions
        if r.reason is StopReason.POWER_OFF:
            return total


def comparable(path: Path) -> dict[str, Any]:
    s = state_file.read_file(path)
    return {"cpu": s["cpu"], "devices": s["devices"], "ram": s["ram"], "exit": s["machine"]["exit_code"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stop_save_restore_in_fresh_process(case: str, tmp_path: Path) -> None:
    image = image_for(case, tmp_path)
    _, cmdline, exit_code = CASES[case]
    ref = toyvm_cli("run", str(image), "--ram", "16M", "--cmdline", cmdline, "--save", str(tmp_path / "ref.state"))
    assert ref.returncode == exit_code, ref.stderr
    total = total_instructions(image, cmdline)
    rng = random.Random(f"{case}-points")
    points = sorted({rng.randrange(1, total) for _ in range(3)})
    for k in points:
        a, b = tmp_path / f"a{k}.state", tmp_path / f"b{k}.state"
        # Stop counted on the pure-Python path, resume on the default (native when a compiler exists).
        first = toyvm_cli("run", str(image), "--ram", "16M", "--cmdline", cmdline, "--max-instructions", str(k),
                          "--save", str(a), "--hooks", "python")
        assert first.returncode == 124, first.stderr
        assert b"state saved" in first.stderr
        second = toyvm_cli("resume", str(a), "--save", str(b))
        assert second.returncode == ref.returncode, second.stderr
        assert first.stdout + second.stdout == ref.stdout, f"serial output differs after a stop at {k}"
        assert comparable(b) == comparable(tmp_path / "ref.state"), f"final state differs after a stop at {k}"


def test_saved_state_round_trips_in_process(tmp_path: Path) -> None:
    vm = Machine(8 << 20)
    vm.boot(guest("memtouch"), "pages=8 iters=50")
    vm.run_slice(max_instructions=5000)
    vm.take_serial()  # serial output already taken by the host is not VM state
    path = tmp_path / "s.state"
    state_file.write_file(path, vm.save_state())
    clone = Machine.from_state(state_file.read_file(path))
    assert clone.save_state() == vm.save_state()
    for m in (vm, clone):
        while not m.powered_off:
            m.run_slice()
    assert clone.save_state() == vm.save_state()
    assert clone.take_serial() == vm.take_serial()


def test_inspect_describes_a_state(tmp_path: Path) -> None:
    path = tmp_path / "h.state"
    r = toyvm_cli("run", str(guest("hello")), "--save", str(path))
    assert r.returncode == 0
    out = toyvm_cli("inspect", str(path))
    assert out.returncode == 0 and b"non-zero pages" in out.stdout and b"exit code 0" in out.stdout
