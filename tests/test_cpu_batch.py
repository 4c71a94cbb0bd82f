"""The batched register path (one uc_reg_read_batch / uc_reg_write_batch on preallocated buffers) reads and writes
exactly what the binding's per-register calls do, and refuses the same malformed states."""
from __future__ import annotations

import random

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from conftest import guest
from toyvm import Machine
from toyvm.cpu import MSRS, RegisterFile, restore_cpu_each, save_cpu_each
from toyvm.errors import StateError


@pytest.fixture(scope="module")
def vm() -> Machine:
    vm = Machine(4 << 20)
    vm.boot(guest("memtouch"), "pages=8 iters=1000")
    vm.run_slice(0.01)
    return vm


def test_a_batch_read_is_the_per_register_read(vm: Machine) -> None:
    assert vm.regs.save() == save_cpu_each(vm.uc)


def test_a_batch_write_is_the_per_register_write(vm: Machine) -> None:
    rng = random.Random(7)
    state = vm.regs.save()
    for name in ("rax", "rbx", "r15", "rsi"):
        state["regs"][name] = rng.getrandbits(64)
    state["regs"]["xmm3"] = bytes(range(16))
    state["regs"]["fp2"] = [0x8000000000001234, 0x3FFF]
    state["regs"]["gdtr"] = [0, 0x1000, 0xFFF, 0]
    for name in MSRS:
        if name != "efer":
            state["msrs"][name] = rng.getrandbits(47)
    a, b = Uc(UC_ARCH_X86, UC_MODE_64), Uc(UC_ARCH_X86, UC_MODE_64)
    RegisterFile(a).restore(state)
    restore_cpu_each(b, state)
    assert save_cpu_each(a) == save_cpu_each(b) == RegisterFile(a).save()
    assert save_cpu_each(a)["msrs"] == state["msrs"]


@pytest.mark.parametrize("where, value, text", [
    (("regs", "rax"), None, "malformed"),
    (("regs", "rax"), -1, "malformed"),
    (("regs", "rax"), 2**64, "malformed"),
    (("regs", "rax"), True, "bool"),
    (("regs", "xmm0"), b"x" * 15, "xmm0 must be 16 bytes"),
    (("regs", "gdtr"), [1, 2, 3], "gdtr must be a list of 4"),
    (("msrs", "star"), "x", "malformed"),
])
def test_malformed_states_are_refused(vm: Machine, where: tuple[str, str], value: object, text: str) -> None:
    state = vm.regs.save()
    state[where[0]][where[1]] = value
    with pytest.raises(StateError, match=text):
        RegisterFile(Uc(UC_ARCH_X86, UC_MODE_64)).restore(state)


def test_a_value_the_cpu_refuses_is_named(vm: Machine) -> None:
    state = vm.regs.save()
    state["regs"]["cr0"] = 0  # leaving long mode with paging off: unicorn refuses it
    probe = Uc(UC_ARCH_X86, UC_MODE_64)
    try:
        restore_cpu_each(Uc(UC_ARCH_X86, UC_MODE_64), state)
    except StateError as e:
        with pytest.raises(StateError, match="cr0"):
            RegisterFile(probe).restore(state)
        assert "cr0" in str(e)
    else:
        RegisterFile(probe).restore(state)  # this unicorn takes it: then both paths must
