"""The machine: one x86-64 vCPU on Unicorn, guest RAM, the port bus and its devices, and the exact run loop."""
from __future__ import annotations

import ctypes
import enum
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from unicorn import (
    UC_ARCH_X86,
    UC_ERR_EXCEPTION,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_PROT,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_PROT,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_BLOCK,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TB_REMOVE_CACHE, UC_CTL_TLB_FLUSH
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from . import native
from .bus import PortBus
from .contract import DEFAULT_RAM
from .cpu import RegisterFile, reg, set_reg
from .devices.clock import Clock
from .devices.net import NetDevice
from .devices.power import Power
from .devices.rng import Rng
from .devices.serial import Serial
from .errors import ConfigError, GuestFault, HookError, StateError, ToyVMError
from .icount import InstructionCounter
from .loader import LoadInfo, load_file, load_image, write_boot_info
from .ram import GuestRAM
from .state import FORMAT, VERSION, check_payload, decode_pages, encode_pages

# uc_ctl's request word for "remove the translated code in [begin, end)": a write with two arguments.
_REMOVE_CACHE = (UC_CTL_IO_WRITE << 30) | (2 << 26) | UC_CTL_TB_REMOVE_CACHE
log = logging.getLogger("toyvm")

EXIT_ADDR = 0xFFFF_FFFF_FFFF_F000  # never executable (outside RAM): emu_start's `until` is never reached
RX, RWX = UC_PROT_READ | UC_PROT_EXEC, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC
HLT = 0xF4
PYTHON_STOP_LATENCY = 0.01  # seconds


class StopReason(enum.StrEnum):
    """Why a slice ended. Every one of these is an exact stop: the VM can be saved and resumed here."""

    SLICE_END = "slice-end"  # the slice's time budget ran out
    INSTRUCTION_LIMIT = "instruction-limit"  # the caller's instruction budget ran out
    STOP_REQUESTED = "stop-requested"  # request_stop() was called
    HALT = "halt"  # the guest executed hlt with nothing to wake it: it waits for input
    POWER_OFF = "power-off"  # the guest wrote its exit code to the power port


@dataclass(frozen=True)
class SliceResult:
    reason: StopReason
    instructions: int | None  # exact count when the slice ran counted, None when it ran on the native fast path
    seconds: float


def _hook_mode(requested: str | None) -> str:
    mode = (requested or os.environ.get("TOYVM_HOOKS") or "auto").lower()
    if mode not in ("auto", "python", "native"):
        raise ConfigError(f"hooks must be auto, python or native, not {mode!r}")
    if mode == "python":
        return "python"
    if native.load() is None:
        if mode == "native":
            raise ConfigError(f"native hooks unavailable: {native.error()}")
        log.info("native hooks unavailable (%s): using the pure-Python hooks", native.error())
        return "python"
    return "native"


class Machine:
    """A VM. Build it, `boot()` a guest (or `restore_state()`), then call `run_slice()` until it powers off."""

    def __init__(self, ram_size: int = DEFAULT_RAM, *, hooks: str | None = None) -> None:
        self.ram = GuestRAM(ram_size)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map_ptr(0, ram_size, UC_PROT_ALL, self.ram.address)
        self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self.hooks = _hook_mode(hooks)
        self.cmdline = ""
        self.load_info: LoadInfo | None = None
        self.fault: GuestFault | None = None
        self._hook_error: BaseException | None = None
        self._hook_rip: int | None = None
        self._unmapped: tuple[str, int, int] | None = None
        self._power_rip: int | None = None
        self._probe_uc: Uc | None = None
        self._probe_regs: RegisterFile | None = None
        self._power_count = 0
        self._stop_requested = threading.Event()
        self._ips = 50e6  # counted slices: instructions per second, learned as the guest runs

        self.serial = Serial()
        self.power = Power(self._on_power_off)
        self.clock = Clock()
        self.rng = Rng()
        self.net = NetDevice(self.ram)
        self.bus = PortBus()
        for dev in (self.serial, self.power, self.clock, self.rng, self.net):
            self.bus.register(dev)

        from unicorn.unicorn_py3.unicorn import uclib  # the binding's loaded libunicorn
        self._uc_ctl, self._uch = uclib.uc_ctl, self.uc._uch
        self.ram.on_reset = self._flush_tlb
        self.ram.on_host_write = self._invalidate_code
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.counter = InstructionCounter(self.uc)
        self.regs = RegisterFile(self.uc)  # the whole register list in one call (toyvm.cpu)
        self._native_state: native.NativeState | None = None
        if self.hooks == "native":
            self._install_native()
        else:
            self.uc.hook_add(UC_HOOK_TLB_FILL, self._python_tlb_fill())

    # -- hooks --------------------------------------------------------------------------------------------
    def _python_tlb_fill(self) -> Any:
        dirty, npages = self.ram.dirty_bitmap, self.ram.npages

        # A read or fetch fill grants R|X only, so the first store to the page fills again as a WRITE: logged.
        def fill(uc: Uc, vaddr: int, access: int, entry: Any, _ud: Any) -> bool:
            entry.paddr = vaddr
            if access == UC_MEM_WRITE:
                page = vaddr >> 12
                if page < npages:
                    dirty[page] = 1
                entry.perms = RWX
            else:
                entry.perms = RX
            return True
        return fill

    def _install_native(self) -> None:
        from unicorn.unicorn_py3.arch.types import uc_hook_h
        from unicorn.unicorn_py3.unicorn import uclib
        lib = native.load()
        assert lib is not None
        st = native.NativeState(self.ram.dirty_address, self.ram.npages,
                                ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value, 0, 0, 0, 0)
        self._native_state = st
        self._native_handles = []
        for htype, fn in ((UC_HOOK_TLB_FILL, lib.toyvm_tlb_fill), (UC_HOOK_BLOCK, lib.toyvm_block)):
            h = uc_hook_h()
            err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(h), htype, ctypes.cast(fn, ctypes.c_void_p),
                                    ctypes.cast(ctypes.pointer(st), ctypes.c_void_p), ctypes.c_uint64(1),
                                    ctypes.c_uint64(0))
            if err != 0:
                raise ConfigError(f"registering a native hook failed: {UcError(err)}")
            self._native_handles.append(h)

    def _fail(self, err: BaseException) -> None:
        """Called inside a hook: keep the first error, remember where, stop at once."""
        if self._hook_error is None:
            self._hook_error = err
            self._hook_rip = reg(self.uc, "rip")
        self.uc.emu_stop()

    def _on_in(self, uc: Uc, port: int, size: int, _ud: Any) -> int:
        try:
            self.clock.tick_io()
            return self.bus.read(port, size)
        except BaseException as e:  # noqa: BLE001 - must never vanish inside Unicorn
            self._fail(e)
            return 0

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _ud: Any) -> None:
        try:
            self.clock.tick_io()
            self.bus.write(port, size, value)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _on_unmapped(self, uc: Uc, access: int, addr: int, size: int, _value: int, _ud: Any) -> bool:
        kind = {UC_MEM_READ_UNMAPPED: "read", UC_MEM_FETCH_UNMAPPED: "instruction fetch"}.get(access, "write")
        self._unmapped = (kind, addr, size)
        return False

    def _on_interrupt(self, uc: Uc, intno: int, _ud: Any) -> None:
        self._fail(GuestFault(f"guest raised CPU exception or interrupt {intno} (toyvm has no interrupt "
                              f"controller: use the devices' status registers)"))

    def _on_power_off(self, code: int) -> None:
        # emu_stop() in an OUT hook lands at the end of the block, whose remaining instructions may run (and, on
        # counted slices, may not): the VM is dead now anyway, so park RIP right after the OUT in both cases.
        rip = reg(self.uc, "rip")
        insn = self.ram.read(rip, 2) if self.ram.contains(rip, 2) else b""
        self._power_rip = rip + (2 if insn[:1] == b"\x66" else 1) + (1 if insn[-1:] in (b"\xe6", b"\xe7") else 0)
        self._power_count = self.counter.raw()  # the OUT itself is the last instruction that counts
        self.uc.emu_stop()  # inside the OUT hook: an exact stop

    def _flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _invalidate_code(self, addr: int, length: int) -> None:
        # Neither host writes nor mem_write drop translated code (lab: q2f_smc): do it for the range. The call the
        # binding's ctl_remove_cache makes, without its six Python frames (2.2 -> 0.7 us; the net device writes
        # guest RAM several times per packet: a fifth of kvstore's CPU went into the wrapper).
        err = self._uc_ctl(self._uch, _REMOVE_CACHE, ctypes.c_uint64(addr), ctypes.c_uint64(addr + length))
        if err:
            raise UcError(err)

    # -- boot -----------------------------------------------------------------------------------------------
    def boot(self, image: bytes | str | Path, cmdline: str = "", name: str | None = None) -> LoadInfo:
        if isinstance(image, (str, Path)):
            info = load_file(self.ram, image)
        else:
            info = load_image(self.ram, image, name or "guest")
        boot_info = write_boot_info(self.ram, cmdline)
        self.cmdline, self.load_info = cmdline, info
        set_reg(self.uc, "rip", info.entry)
        set_reg(self.uc, "rsp", self.ram.size)
        set_reg(self.uc, "rdi", boot_info)
        set_reg(self.uc, "rflags", 0x2)
        set_reg(self.uc, "mxcsr", 0x1F80)
        set_reg(self.uc, "fpcw", 0x37F)
        return info

    # -- running --------------------------------------------------------------------------------------------
    @property
    def exit_code(self) -> int | None:
        return self.power.state.exit_code

    @property
    def powered_off(self) -> bool:
        return self.exit_code is not None

    @property
    def wakeup_pending(self) -> bool:
        """Something a halted guest waits for has happened: input arrived or output room freed up."""
        return self.net.input_pending or self.serial.input_pending or self.net.tx_unblocked

    def request_stop(self) -> None:
        """Ask the running slice to stop at its next exact point. Safe from any thread."""
        self._stop_requested.set()
        if self._native_state is not None:
            self._native_state.stop_request = 1

    def run_slice(self, seconds: float = 0.01, max_instructions: int | None = None) -> SliceResult:
        """Run until an exact stop: `seconds` elapsed, `max_instructions` executed, power-off, a stop request,
        or `hlt` with nothing to wake the guest (a `hlt` with input pending or the timer armed continues)."""
        if self.fault is not None:
            raise self.fault
        if max_instructions is not None and max_instructions <= 0:
            raise ConfigError("max_instructions must be positive")
        start = time.perf_counter()
        deadline = start + seconds
        executed: int | None = 0
        while True:
            if self.powered_off:
                return SliceResult(StopReason.POWER_OFF, executed, time.perf_counter() - start)
            if self._stop_requested.is_set():
                self._stop_requested.clear()
                if self._native_state is not None:
                    self._native_state.stop_request = 0
                return SliceResult(StopReason.STOP_REQUESTED, executed, time.perf_counter() - start)
            left = deadline - time.perf_counter()
            if left <= 0:
                return SliceResult(StopReason.SLICE_END, executed, time.perf_counter() - start)
            remaining = None if max_instructions is None or executed is None else max_instructions - executed
            reason, n = self._emulate(left, remaining)
            executed = None if executed is None or n is None else executed + n
            if reason is StopReason.HALT:
                if self.wakeup_pending:
                    continue
                if self.clock.timer_armed:
                    self.clock.expire_timer()
                    continue
            if reason is not None:
                return SliceResult(reason, executed, time.perf_counter() - start)

    def _emulate(self, seconds: float, limit: int | None) -> tuple[StopReason | None, int | None]:
        """One emu_start. Returns (reason or None to go on, instructions executed or None if unknown)."""
        count = 0
        if self.hooks == "python":
            # Counted runs are the pure-Python way to stop exactly; at most ~10 ms each, so a stop request
            # from another thread waits no longer than that.
            count = max(1000, int(self._ips * min(seconds, PYTHON_STOP_LATENCY)))
        if limit is not None:
            count = min(count, limit) if count else limit
        st = self._native_state
        if st is not None:
            st.deadline_ns = time.monotonic_ns() + int(seconds * 1e9)
            st.stopped = 0
        self._hook_error = None
        self._unmapped = None
        t0 = time.perf_counter()
        try:
            self.uc.emu_start(reg(self.uc, "rip"), EXIT_ADDR, count=count)
        except UcError as e:
            raise self._raise_fault(e) from None
        if self._hook_error is not None:
            raise self._raise_fault(None)
        dt = time.perf_counter() - t0
        executed = self.counter.executed(count) if count else None
        if self.exit_code is not None:
            if self._power_rip is not None:
                set_reg(self.uc, "rip", self._power_rip)
                executed = min(self._power_count, count) if count else None
            return StopReason.POWER_OFF, executed
        if st is not None and st.stopped:
            return (None if self._stop_requested.is_set() or time.monotonic_ns() < st.deadline_ns
                    else StopReason.SLICE_END), executed
        if count and executed == count and self.counter.exhausted(count):
            if limit is not None and count == limit:
                return StopReason.INSTRUCTION_LIMIT, executed
            if dt > 0.0005:
                self._ips = 0.5 * self._ips + 0.5 * count / dt
            return None, executed
        rip = reg(self.uc, "rip")
        if not self.ram.contains(rip - 1, 1) or self.ram.view[rip - 1] != HLT:
            raise self._record(HookError(f"emulation stopped at RIP={rip:#x} for no known reason"))
        return StopReason.HALT, executed

    def _record(self, err: ToyVMError) -> ToyVMError:
        if isinstance(err, GuestFault):
            self.fault = err
        return err

    def _raise_fault(self, uc_err: UcError | None) -> ToyVMError:
        err = self._hook_error or self.uc._hook_exception
        if err is not None:
            if isinstance(err, GuestFault):
                return self._record(GuestFault(str(err), err.rip if err.rip is not None else self._hook_rip))
            if isinstance(err, ToyVMError):
                return err
            return HookError(f"host error inside a Unicorn hook: {err!r}").with_traceback(err.__traceback__)
        assert uc_err is not None
        rip = reg(self.uc, "rip")
        code = uc_err.errno
        if code in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED) and self._unmapped:
            kind, addr, size = self._unmapped
            msg = f"guest {kind} of {size} byte(s) at unmapped address {addr:#x} (RAM ends at {self.ram.size:#x})"
        elif code in (UC_ERR_READ_PROT, UC_ERR_WRITE_PROT, UC_ERR_FETCH_PROT):
            msg = f"guest memory protection fault ({uc_err})"
        elif code == UC_ERR_INSN_INVALID:
            msg = "guest executed an invalid instruction"
        elif code == UC_ERR_EXCEPTION:
            msg = "guest raised an unhandled CPU exception (e.g. divide error, int, syscall, #GP)"
        else:
            msg = f"guest stopped the CPU: {uc_err}"
        return self._record(GuestFault(msg, rip))

    # -- host access ----------------------------------------------------------------------------------------
    def collect_dirty(self) -> npt.NDArray[np.int64]:
        return self.ram.collect_and_reset()

    def flush_code(self) -> None:
        """Drop all translated code and TLB entries: after the host rewrote guest memory in bulk."""
        self.uc.ctl_flush_tb()
        self._flush_tlb()

    def take_serial(self) -> bytes:
        return self.serial.take_output()

    def rip(self) -> int:
        return reg(self.uc, "rip")

    # -- state ----------------------------------------------------------------------------------------------
    def save_state(self, include_ram: bool = True) -> dict[str, Any]:
        """The whole VM as a plain map (docs/machine.md, "State format"). Valid only at an exact stop."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "machine": {"ram_size": self.ram.size, "cmdline": self.cmdline, "exit_code": self.exit_code},
            "cpu": self.regs.save(),
            "devices": {dev.name: dev.save() for dev in self.bus.devices},
        }
        if include_ram:
            payload["ram"] = encode_pages(self.ram, self.ram.nonzero_pages())
        return payload

    @classmethod
    def from_state(cls, payload: dict[str, Any], *, hooks: str | None = None) -> Machine:
        payload = check_payload(payload)
        try:
            size = int(payload["machine"]["ram_size"])
        except (KeyError, TypeError, ValueError):
            raise StateError("state lacks machine.ram_size") from None
        if "ram" not in payload:
            raise StateError("state has no RAM section: it cannot start a fresh VM")
        try:
            vm = cls(size, hooks=hooks)
        except ConfigError as e:
            raise StateError(f"state describes an impossible machine: {e}") from None
        vm.restore_state(payload)
        return vm

    def check_state(self, payload: dict[str, Any]) -> Any:
        """Check that a state fits this machine and is well formed, changing nothing; returns the decoded RAM
        pages (or None when the state carries no RAM)."""
        payload = check_payload(payload)
        m = payload["machine"]
        if not isinstance(m, dict) or m.get("ram_size") != self.ram.size:
            raise StateError(f"state is for {m.get('ram_size') if isinstance(m, dict) else '?'} bytes of RAM, "
                             f"this VM has {self.ram.size}")
        devices = payload["devices"]
        if not isinstance(devices, dict) or devices.keys() != {d.name for d in self.bus.devices}:
            raise StateError(f"state devices {sorted(devices) if isinstance(devices, dict) else devices!r} do not "
                             f"match this machine's {sorted(d.name for d in self.bus.devices)}")
        pages = decode_pages(payload["ram"], self.ram.size) if "ram" in payload else None
        # Devices and CPU restore into scratch copies first so a bad section leaves this VM untouched.
        for dev in self.bus.devices:
            probe = type(dev).__new__(type(dev))
            probe.__dict__.update(dev.__dict__)
            probe.restore(devices[dev.name])
        if self._probe_regs is None:  # a scratch CPU, kept: a replica checks a state at every checkpoint
            self._probe_uc = Uc(UC_ARCH_X86, UC_MODE_64)
            self._probe_regs = RegisterFile(self._probe_uc)
        self._probe_regs.restore(payload["cpu"])
        return pages

    def restore_state(self, payload: dict[str, Any], *, checked: bool = False) -> None:
        """Apply a saved state (with or without RAM). Everything is checked before anything changes;
        `checked=True` skips the checks for a RAM-less state that already passed check_state()."""
        if checked and "ram" in payload:
            raise ValueError("checked=True is only for states without RAM")
        pages = None if checked else self.check_state(payload)
        m, devices = payload["machine"], payload["devices"]
        if pages is not None:
            idx, data = pages
            self.ram.clear()
            self.ram.pages[idx] = data
        for dev in self.bus.devices:
            dev.restore(devices[dev.name])
        self.regs.restore(payload["cpu"])
        self.cmdline = str(m.get("cmdline") or "")
        self.fault = None
        self.flush_code()
        self.ram.collect_and_reset()
