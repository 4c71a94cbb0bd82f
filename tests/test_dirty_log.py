"""The dirty log never misses a written page and reports no unwritten one (DESIGN section 5).

Random guest programs are built from store forms that matter to a TLB-based log: plain stores of every width,
read-modify-write instructions, `rep stosb`, `rep movsq`, unaligned stores that cross a page boundary, and
network-device DMA. The expected set of written pages is computed from the program itself; the log must equal
it exactly, and must cover every page a shadow-copy diff finds changed.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toyvm import Machine, StopReason
from toyvm.cpu import reg, set_reg
from toyvm.devices.net import DATA

RAM = 4 << 20
REGION, REGION_PAGES = 0x200000, 48
DESC_BASE = 0x380000
PAGE = 4096


def mov_imm(reg: int, value: int) -> bytes:  # mov r64, imm64 (reg: 0=rax 1=rcx 6=rsi 7=rdi)
    return bytes([0x48, 0xB8 + reg]) + struct.pack("<Q", value)


STORE = {1: b"\x88\x07", 2: b"\x66\x89\x07", 4: b"\x89\x07", 8: b"\x48\x89\x07"}  # mov [rdi], al/ax/eax/rax
RMW = {"add": b"\x48\x01\x07", "inc": b"\x48\xff\x07", "xadd": b"\x48\x0f\xc1\x07"}


def pages_of(addr: int, length: int) -> set[int]:
    return set(range(addr // PAGE, (addr + length - 1) // PAGE + 1)) if length > 0 else set()


addresses = st.one_of(
    st.integers(REGION, REGION + REGION_PAGES * PAGE - 64),
    st.builds(lambda p, o: REGION + p * PAGE + o, st.integers(1, REGION_PAGES - 2), st.integers(-7, 0)))
ops = st.one_of(
    st.tuples(st.just("store"), st.sampled_from([1, 2, 4, 8]), addresses),
    st.tuples(st.just("rmw"), st.sampled_from(sorted(RMW)), addresses),
    st.tuples(st.just("stosb"), addresses, st.integers(1, 3 * PAGE)),
    st.tuples(st.just("movsq"), addresses, st.integers(1, 600)),
    st.tuples(st.just("dma"), addresses, st.integers(1, 2 * PAGE)),
)


def build(program: list[tuple[Any, ...]]) -> tuple[bytes, set[int], list[tuple[int, int]], int]:
    """Machine code for the ops, the pages they write, the DMA descriptors to prepare, instruction count."""
    code, written, ninsns = bytearray(), set[int](), 0
    dmas: list[tuple[int, int]] = []
    region_end = REGION + REGION_PAGES * PAGE
    for i, op in enumerate(program):
        kind = op[0]
        value = 0x0101010101010101 * ((i % 250) + 1)
        if kind == "store":
            _, size, addr = op
            code += mov_imm(7, addr) + mov_imm(0, value) + STORE[size]
            written |= pages_of(addr, size)
            ninsns += 3
        elif kind == "rmw":
            _, form, addr = op
            code += mov_imm(7, addr) + mov_imm(0, value) + RMW[form]
            written |= pages_of(addr, 8)
            ninsns += 3
        elif kind == "stosb":
            _, addr, n = op
            n = min(n, region_end - addr)
            code += mov_imm(7, addr) + mov_imm(1, n) + mov_imm(0, value) + b"\xf3\xaa"
            written |= pages_of(addr, n)
            ninsns += 4
        elif kind == "movsq":
            _, dst, n = op
            n = min(n, (region_end - dst) // 8)
            src = REGION + ((dst - REGION + 5 * PAGE) % (REGION_PAGES * PAGE - 8 * n - 8))
            code += mov_imm(6, src) + mov_imm(7, dst) + mov_imm(1, n) + b"\xf3\x48\xa5"
            written |= pages_of(dst, 8 * n)
            ninsns += 4
        else:
            _, buf, n = op
            n = min(n, region_end - buf)
            desc = DESC_BASE + 32 * len(dmas)
            dmas.append((buf, n))
            code += b"\xb8" + struct.pack("<I", desc) + b"\x66\xba\x44\x05" + b"\xef"  # mov eax, desc; out 0x544
            written |= pages_of(desc, 8) | pages_of(desc + 20, 12) | pages_of(buf, n)
            ninsns += 3
    return bytes(code) + b"\xf4", written, dmas, ninsns + 1


def prepare(hooks: str, program: list[tuple[Any, ...]]) -> tuple[Machine, set[int], int]:
    code, written, dmas, ninsns = build(program)
    vm = Machine(RAM, hooks=hooks)
    vm.boot(code)
    for i, (buf, n) in enumerate(dmas):
        desc = DESC_BASE + 32 * i
        vm.ram.write(desc + 8, struct.pack("<QI", buf, n))
        vm.net.deliver(DATA, 7, bytes([(i % 200) + 1]) * n)
    vm.ram.write(REGION, np.arange(REGION_PAGES * PAGE, dtype=np.uint8).tobytes())  # movsq sources differ
    vm.collect_dirty()
    return vm, written, ninsns


def changed_pages(before: np.ndarray, after: np.ndarray) -> set[int]:
    a = before.reshape(-1, PAGE)
    b = after.reshape(-1, PAGE)
    return set(np.flatnonzero((a != b).any(axis=1)).tolist())


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(program=st.lists(ops, min_size=1, max_size=25), hooks=st.sampled_from(["python", "native"]))
def test_dirty_log_is_exactly_the_written_pages(program: list[tuple[Any, ...]], hooks: str) -> None:
    vm, written, _ = prepare(hooks, program)
    shadow = vm.ram.view.copy()
    r = vm.run_slice(seconds=5.0)
    assert r.reason is StopReason.HALT
    dirty = set(vm.collect_dirty().tolist())
    assert changed_pages(shadow, vm.ram.view) <= dirty, "the log missed a page whose content changed"
    assert dirty == written, f"missed {sorted(written - dirty)}, extra {sorted(dirty - written)}"


@SETTINGS
@given(program=st.lists(ops, min_size=2, max_size=25), hooks=st.sampled_from(["python", "native"]),
       cuts=st.lists(st.integers(1, 20), min_size=1, max_size=8))
def test_dirty_log_over_many_epochs(program: list[tuple[Any, ...]], hooks: str, cuts: list[int]) -> None:
    """Epochs cut at exact instruction counts: each epoch's log covers what changed in it, none is lost."""
    vm, written, _ = prepare(hooks, program)
    seen: set[int] = set()
    i = 0
    while True:
        shadow = vm.ram.view.copy()
        r = vm.run_slice(seconds=5.0, max_instructions=cuts[i % len(cuts)])
        i += 1
        dirty = set(vm.collect_dirty().tolist())
        assert changed_pages(shadow, vm.ram.view) <= dirty
        seen |= dirty
        if r.reason is StopReason.HALT:
            break
        assert r.reason is StopReason.INSTRUCTION_LIMIT
    assert seen == written


def test_host_writes_mark_pages() -> None:
    vm = Machine(RAM, hooks="python")
    vm.collect_dirty()
    vm.ram.write(PAGE * 10 - 3, b"abcdef")
    assert vm.collect_dirty().tolist() == [9, 10]
    assert vm.collect_dirty().tolist() == []


@pytest.mark.parametrize("hooks", ["python", "native"])
def test_host_writes_drop_translated_code(hooks: str) -> None:
    """Code the guest ran, rewritten by the host (as the net device writes a buffer): the next run sees the new
    code, not the block translated before (unicorn keeps it otherwise: lab q2f_smc)."""
    vm = Machine(RAM, hooks=hooks)
    entry = vm.boot(mov_imm(0, 1) + b"\xf4").entry  # mov rax, 1; hlt
    for value in (1, 2, 3):
        if value > 1:
            vm.ram.write(entry, mov_imm(0, value))
            set_reg(vm.uc, "rip", entry)
        vm.run_slice(1.0)
        assert reg(vm.uc, "rax") == value
