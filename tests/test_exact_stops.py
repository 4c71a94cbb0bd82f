"""Every stop is exact: slicing, stop requests and instruction limits never change what the guest computes."""
from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from conftest import asm, ram_digest
from guests_asm import RMW_LOOP
from toyvm import Machine, StopReason
from toyvm.cpu import save_cpu

RAM = 4 << 20


# CPU registers, a RAM digest, the exit code
Fingerprint = tuple[dict[str, Any], str, int | None]


def fingerprint(vm: Machine) -> Fingerprint:
    return (save_cpu(vm.uc)["regs"], ram_digest(vm), vm.exit_code)


def fresh(hooks: str) -> Machine:
    vm = Machine(RAM, hooks=hooks)
    vm.boot(asm(RMW_LOOP))
    return vm


def run_to_end(vm: Machine, **kw: object) -> tuple[int, bytes]:
    slices, out = 0, b""
    while True:
        r = vm.run_slice(**kw)  # type: ignore[arg-type]
        slices += 1
        out += vm.take_serial()
        if r.reason is StopReason.POWER_OFF:
            return slices, out


@pytest.fixture(scope="module")
def reference() -> tuple[Fingerprint, bytes]:
    vm = fresh("python")
    _, out = run_to_end(vm, seconds=60)
    return fingerprint(vm), out


def test_python_and_native_agree(reference: tuple[Fingerprint, bytes]) -> None:
    vm = fresh("native")
    _, out = run_to_end(vm, seconds=60)
    assert (fingerprint(vm), out) == reference


def test_instruction_count_slices_are_exact(hooks: str, reference: tuple[Fingerprint, bytes]) -> None:
    vm = fresh(hooks)
    rng = random.Random(7)
    slices, out = 0, b""
    while not vm.powered_off:
        r = vm.run_slice(seconds=60, max_instructions=rng.choice([1, 7, 1013, 9973, 65537]))
        out += vm.take_serial()
        slices += 1
        assert r.instructions is not None and r.instructions > 0
    assert slices > 50
    assert (fingerprint(vm), out) == reference


def test_short_time_slices_are_exact(hooks: str, reference: tuple[Fingerprint, bytes]) -> None:
    vm = fresh(hooks)
    slices, out = run_to_end(vm, seconds=0.0003)
    assert slices > 20
    assert (fingerprint(vm), out) == reference


def test_stop_requests_from_another_thread_are_exact(hooks: str, reference: tuple[Fingerprint, bytes]) -> None:
    vm = fresh(hooks)
    done = threading.Event()

    def nag() -> None:
        while not done.wait(0.0005):
            vm.request_stop()

    t = threading.Thread(target=nag)
    t.start()
    try:
        reasons = set()
        out = b""
        while not vm.powered_off:
            reasons.add(vm.run_slice(seconds=60).reason)
            out += vm.take_serial()
    finally:
        done.set()
        t.join()
    assert StopReason.STOP_REQUESTED in reasons
    assert (fingerprint(vm), out) == reference


def test_instruction_counts_are_exact() -> None:
    vm = Machine(RAM, hooks="python")
    vm.boot(asm("nop\n" * 10 + "mov eax, 3\nmov dx, 0x500\nout dx, eax\n"))
    r = vm.run_slice(max_instructions=4)
    assert (r.reason, r.instructions, vm.rip()) == (StopReason.INSTRUCTION_LIMIT, 4, 0x100004)
    r = vm.run_slice()
    assert (r.reason, r.instructions, vm.exit_code) == (StopReason.POWER_OFF, 9, 3)


def test_hlt_with_timer_jumps_virtual_time() -> None:
    """hlt with the timer armed and no input: virtual time jumps to the deadline and the guest goes on."""
    vm = Machine(RAM, hooks="python")
    vm.boot(asm("""
      mov dx, 0x520
      mov eax, 5000000
      out dx, eax
      mov dx, 0x524
      xor eax, eax
      out dx, eax
      hlt
      mov dx, 0x510
      in eax, dx
      mov dx, 0x500
      shr eax, 20
      out dx, eax
    """))
    r = vm.run_slice()
    assert r.reason is StopReason.POWER_OFF
    assert vm.exit_code == 5000000 >> 20  # read right after the deadline, before the next I/O costs
    assert vm.clock.state.virtual_ns == 5000000 + 2 * 1000
