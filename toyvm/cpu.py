"""CPU state as an explicit, named register list (never a pickled UcContext: that is a raw struct that is
only valid between identical libunicorn builds).

Saving and restoring go through one `uc_reg_read_batch` / `uc_reg_write_batch` call on preallocated buffers
(`RegisterFile`): the binding's per-register `reg_read` builds ctypes objects for every call, and a state has 71
registers and MSRs, read or written several times per checkpoint. The per-register functions stay as the
reference the batch path is tested against, and to name the register the CPU refuses when a batch write fails.
"""
from __future__ import annotations

import ctypes
import struct
from typing import Any

from unicorn import Uc, UcError
from unicorn import x86_const as x

from .errors import StateError

GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
SELECTORS = ["cs", "ss", "ds", "es", "fs", "gs"]
BASES = ["fs_base", "gs_base"]
CONTROL = ["cr0", "cr2", "cr3", "cr4", "cr8"]
TABLES = ["gdtr", "idtr", "ldtr", "tr"]  # (selector, base, limit, flags) tuples
XMMS = [f"xmm{i}" for i in range(16)]  # 128-bit: stored as 16 little-endian bytes
FPRS = [f"fp{i}" for i in range(8)]  # (mantissa, exponent) pairs
FPU_MISC = ["fpsw", "fpcw", "fptag", "mxcsr", "fip", "fdp", "fop"]
FLOW = ["rflags", "rip"]
MSRS = {"efer": 0xC0000080, "star": 0xC0000081, "lstar": 0xC0000082, "fmask": 0xC0000084,
        "kernel_gs_base": 0xC0000102}

# Restore order matters: MSRs and control registers first, selectors before FS/GS bases (writing a selector
# reloads the hidden base), RIP last.
RESTORE_ORDER = CONTROL + TABLES + SELECTORS + BASES + GPRS + XMMS + FPRS + FPU_MISC + FLOW
ALL_REGISTERS = frozenset(RESTORE_ORDER)


def _uc_id(name: str) -> int:
    return int(getattr(x, "UC_X86_REG_" + name.upper()))


_IDS = {name: _uc_id(name) for name in RESTORE_ORDER}


# -- the reference path: one binding call per register ------------------------------------------------------
def save_cpu_each(uc: Uc) -> dict[str, Any]:
    regs: dict[str, Any] = {}
    for name in RESTORE_ORDER:
        value = uc.reg_read(_IDS[name])
        if name in XMMS:
            regs[name] = int(value).to_bytes(16, "little")
        elif isinstance(value, tuple):
            regs[name] = [int(v) for v in value]
        else:
            regs[name] = int(value)
    return {"regs": regs, "msrs": {name: uc.msr_read(num) for name, num in MSRS.items()}}


def _check_names(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    regs, msrs = state["regs"], state["msrs"]
    missing = (ALL_REGISTERS - regs.keys()) | (MSRS.keys() - msrs.keys())
    unknown = (regs.keys() - ALL_REGISTERS) | (msrs.keys() - MSRS.keys())
    if missing or unknown:
        raise StateError(f"CPU state: missing registers {sorted(missing)}, unknown {sorted(unknown)}")
    return regs, msrs


def restore_cpu_each(uc: Uc, state: dict[str, Any]) -> None:
    name = "?"
    try:
        regs, msrs = _check_names(state)
        for name, num in MSRS.items():
            uc.msr_write(num, int(msrs[name]))
        for name in RESTORE_ORDER:
            value = regs[name]
            if name in XMMS:
                if not isinstance(value, bytes) or len(value) != 16:
                    raise StateError(f"CPU state: {name} must be 16 bytes")
                uc.reg_write(_IDS[name], int.from_bytes(value, "little"))
            elif isinstance(value, list):
                uc.reg_write(_IDS[name], tuple(int(v) for v in value))
            else:
                uc.reg_write(_IDS[name], int(value))
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        raise StateError(f"CPU state is malformed: {e!r}") from None
    except UcError as e:  # e.g. a control register value the CPU refuses (found by fuzzing vmstate.decode)
        raise StateError(f"CPU state: the CPU refuses the value of {name}: {e}") from None


# -- the batch path ---------------------------------------------------------------------------------------------
# Every register gets a 32-byte slot (the largest value, an XMM register, takes 16; the binding's structs are
# laid out as C lays them out, so the padding below matches them). Unicorn writes only the bytes a register
# has (a selector: 2), so the slots are zeroed before every read.
_SLOT = 32
_SCALAR, _TABLE, _FPR, _XMM, _MSR = "Q24x", "H6xQII8x", "QH22x", "16s16x", "I4xQ16x"
_KIND = {**{n: _TABLE for n in TABLES}, **{n: _FPR for n in FPRS}, **{n: _XMM for n in XMMS}}
_BATCH: list[tuple[str, int, str]] = (  # (name, unicorn id, slot layout), in restore order: MSRs first
    [(name, int(x.UC_X86_REG_MSR), _MSR) for name in MSRS]
    + [(name, _IDS[name], _KIND.get(name, _SCALAR)) for name in RESTORE_ORDER])
_LAYOUT = struct.Struct("<" + "".join(kind for _, _, kind in _BATCH))
_WIDTH = {_SCALAR: 1, _TABLE: 4, _FPR: 2, _XMM: 1, _MSR: 2}  # values each slot unpacks to
_MSR_RIDS = [(i * _SLOT, num) for i, num in enumerate(MSRS.values())]
assert _LAYOUT.size == _SLOT * len(_BATCH)


class RegisterFile:
    """Preallocated buffers for reading or writing the whole register list of one `Uc` in one call."""

    def __init__(self, uc: Uc) -> None:
        from unicorn.unicorn_py3.unicorn import uclib  # the binding's loaded libunicorn
        self._uc = uc
        self._lib = uclib
        n = len(_BATCH)
        self._n = ctypes.c_int(n)
        self._ids = (ctypes.c_int * n)(*(rid for _, rid, _ in _BATCH))
        self._buf = ctypes.create_string_buffer(_LAYOUT.size)
        base = ctypes.addressof(self._buf)
        self._ptrs = (ctypes.c_void_p * n)(*(base + i * _SLOT for i in range(n)))
        self._view = memoryview(self._buf).cast("B")

    def _prime(self) -> None:
        ctypes.memset(self._buf, 0, _LAYOUT.size)
        for off, num in _MSR_RIDS:  # an MSR slot says which MSR it is for
            struct.pack_into("<I", self._view, off, num)

    def save(self) -> dict[str, Any]:
        self._prime()
        err = self._lib.uc_reg_read_batch(self._uc._uch, self._ids, self._ptrs, self._n)
        if err:
            raise UcError(err)
        flat = _LAYOUT.unpack_from(self._view)
        regs: dict[str, Any] = {}
        msrs: dict[str, Any] = {}
        at = 0
        for name, _, kind in _BATCH:
            w = _WIDTH[kind]
            if kind is _MSR:
                msrs[name] = flat[at + 1]
            elif w == 1:
                regs[name] = flat[at]
            else:
                regs[name] = list(flat[at:at + w])
            at += w
        return {"regs": regs, "msrs": msrs}

    def restore(self, state: dict[str, Any]) -> None:
        """Write a whole CPU state; StateError (with the register's name) when it is malformed or refused.
        On a refusal the registers before the refused one have been written (as with the reference path)."""
        try:
            regs, msrs = _check_names(state)
            flat: list[Any] = []
            for name, _, kind in _BATCH:
                if kind is _MSR:
                    flat += (MSRS[name], msrs[name])
                    continue
                value = regs[name]
                if kind is _XMM:
                    if type(value) is not bytes or len(value) != 16:
                        raise StateError(f"CPU state: {name} must be 16 bytes")
                    flat.append(value)
                elif kind is _SCALAR:
                    flat.append(value)
                else:
                    if type(value) is not list or len(value) != _WIDTH[kind]:
                        raise StateError(f"CPU state: {name} must be a list of {_WIDTH[kind]} integers")
                    flat += value
            if any(type(v) is bool for v in flat):
                raise StateError("CPU state: a register value is a bool, not an integer")
            _LAYOUT.pack_into(self._view, 0, *flat)  # struct refuses non-integers and values out of range
        except StateError:
            raise
        except (KeyError, TypeError, AttributeError, struct.error) as e:
            raise StateError(f"CPU state is malformed: {e!r}") from None
        err = self._lib.uc_reg_write_batch(self._uc._uch, self._ids, self._ptrs, self._n)
        if err:
            restore_cpu_each(self._uc, state)  # names the register the CPU refuses
            raise StateError(f"CPU state: the CPU refuses a value: {UcError(err)}")


def save_cpu(uc: Uc, rf: RegisterFile | None = None) -> dict[str, Any]:
    return (rf or RegisterFile(uc)).save()


def restore_cpu(uc: Uc, state: dict[str, Any], rf: RegisterFile | None = None) -> None:
    (rf or RegisterFile(uc)).restore(state)


def reg(uc: Uc, name: str) -> int:
    return int(uc.reg_read(_IDS[name]))


def set_reg(uc: Uc, name: str, value: int) -> None:
    uc.reg_write(_IDS[name], value)
