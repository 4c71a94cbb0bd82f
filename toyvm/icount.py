"""How many instructions a count-limited emu_start executed.

Unicorn 2.1.4 counts them (`uc->emu_counter`, advanced by its internal count hook) but has no API to read the
counter. We find it once per process: run a known program with a known `count`, look for the adjacent pair
(emu_counter, emu_count) in the engine struct, and verify the offset with a second, different run. The design
pins unicorn==2.1.4, so the layout is fixed; if the probe ever fails, counted runs refuse to start.
"""
from __future__ import annotations

import ctypes

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from .errors import ConfigError

_SCAN_WORDS = 4096
_offset: int | None = None


def _words(uc: Uc) -> ctypes.Array[ctypes.c_uint64]:
    addr = ctypes.cast(uc._uch, ctypes.c_void_p).value
    assert addr is not None
    return (ctypes.c_uint64 * _SCAN_WORDS).from_address(addr)


def _run(nops: int, count: int) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, b"\x90" * nops + b"\xf4")
    uc.emu_start(0x1000, 0, count=count)
    return uc


def _find_offset() -> int:
    uc = _run(37, 1_000_003)  # 37 nops + hlt: the counter reads 38
    words = _words(uc)
    candidates = [i for i in range(_SCAN_WORDS - 1) if words[i] == 38 and words[i + 1] == 1_000_003]
    uc2 = _run(5, 777)
    words2 = _words(uc2)
    for i in candidates:
        if words2[i] == 6 and words2[i + 1] == 777:
            return i
    raise ConfigError("cannot locate unicorn's instruction counter: is this unicorn 2.1.4?")


class InstructionCounter:
    def __init__(self, uc: Uc) -> None:
        global _offset
        if _offset is None:
            _offset = _find_offset()
        self._words = _words(uc)
        self._i = _offset

    def raw(self) -> int:
        return int(self._words[self._i])

    def executed(self, count: int) -> int:
        """Instructions the last emu_start(count=count) executed (the stop request lands on instruction count+1)."""
        return min(self.raw(), count)

    def exhausted(self, count: int) -> bool:
        return self.raw() > count
