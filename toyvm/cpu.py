"""CPU state as an explicit, named register list (never a pickled UcContext: that is a raw struct that is
only valid between identical libunicorn builds)."""
from __future__ import annotations

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


def save_cpu(uc: Uc) -> dict[str, Any]:
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


def restore_cpu(uc: Uc, state: dict[str, Any]) -> None:
    name = "?"
    try:
        regs, msrs = state["regs"], state["msrs"]
        missing = (ALL_REGISTERS - regs.keys()) | (MSRS.keys() - msrs.keys())
        unknown = (regs.keys() - ALL_REGISTERS) | (msrs.keys() - MSRS.keys())
        if missing or unknown:
            raise StateError(f"CPU state: missing registers {sorted(missing)}, unknown {sorted(unknown)}")
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


def reg(uc: Uc, name: str) -> int:
    return int(uc.reg_read(_IDS[name]))


def set_reg(uc: Uc, name: str, value: int) -> None:
    uc.reg_write(_IDS[name], value)
