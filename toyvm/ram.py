"""Guest RAM: one page-aligned host buffer that owns its dirty-page bitmap (the TinyEMU shape)."""
from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from .contract import MAX_RAM, MIN_RAM, PAGE_SHIFT, PAGE_SIZE
from .errors import ConfigError, GuestFault

_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """'64M', '1G', '2048k' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SIZE_SUFFIXES.get(s[-1:], 1)
    digits = s[:-1] if s[-1:] in _SIZE_SUFFIXES else s
    try:
        return int(digits) * mult
    except ValueError:
        raise ConfigError(f"bad size {text!r}: expected e.g. 64M, 1G or a byte count") from None


def check_ram_size(size: int) -> None:
    if size % PAGE_SIZE:
        raise ConfigError(f"RAM size {size} is not a multiple of the {PAGE_SIZE}-byte page")
    if not MIN_RAM <= size <= MAX_RAM:
        raise ConfigError(f"RAM size {size >> 20} MiB is outside the supported "
                          f"{MIN_RAM >> 20} MiB .. {MAX_RAM >> 30} GiB")


class GuestRAM:
    """Guest physical memory [0, size).

    Guest stores are recorded by the CPU's TLB-fill hook writing into `dirty_bitmap`; host writes go through
    `write()`, which marks the pages itself. `on_host_write` lets the machine drop translated code that a host
    write may have changed; `on_reset` lets it flush the TLB so the next guest store to a page fills again.
    """

    def __init__(self, size: int) -> None:
        check_ram_size(size)
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._cbuf = (ctypes.c_char * size).from_buffer(self._mmap)
        self.address = ctypes.addressof(self._cbuf)
        self.view: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        self.pages: npt.NDArray[np.uint8] = self.view.reshape(self.npages, PAGE_SIZE)
        # A bytearray: Python hooks index it fast, native hooks get its address, numpy reads it with no copy.
        self.dirty_bitmap = bytearray(self.npages)
        self._dirty_view = np.frombuffer(self.dirty_bitmap, dtype=np.uint8)
        self._dirty_cbuf = (ctypes.c_uint8 * self.npages).from_buffer(self.dirty_bitmap)
        self.dirty_address = ctypes.addressof(self._dirty_cbuf)
        self.on_host_write: Callable[[int, int], None] | None = None
        self.on_reset: Callable[[], None] | None = None

    # -- bounds -----------------------------------------------------------------------------------------
    def contains(self, addr: int, length: int) -> bool:
        return 0 <= addr and length >= 0 and addr + length <= self.size

    def check(self, addr: int, length: int, what: str) -> None:
        if not self.contains(addr, length):
            raise GuestFault(f"{what} [{addr:#x}, +{length:#x}) lies outside guest RAM (size {self.size:#x})")

    # -- host access --------------------------------------------------------------------------------------
    def read(self, addr: int, length: int, what: str = "host read") -> bytes:
        self.check(addr, length, what)
        return self.view[addr:addr + length].tobytes()

    def read_u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write(self, addr: int, data: bytes | bytearray | memoryview, what: str = "host write") -> None:
        """Copy data into guest RAM, marking every touched page dirty."""
        n = len(data)
        self.check(addr, n, what)
        if n == 0:
            return
        self.view[addr:addr + n] = np.frombuffer(data, dtype=np.uint8)
        self.mark(addr, n)
        if self.on_host_write is not None:
            self.on_host_write(addr, n)

    def mark(self, addr: int, length: int) -> None:
        if length > 0:
            self._dirty_view[addr >> PAGE_SHIFT:((addr + length - 1) >> PAGE_SHIFT) + 1] = 1

    # -- dirty log ----------------------------------------------------------------------------------------
    def peek_dirty(self) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self._dirty_view.view(np.bool_))  # bool scan: ~7x faster than uint8 at 1 GiB

    def collect_and_reset(self) -> npt.NDArray[np.int64]:
        """Return the page numbers written since the last call and start a new epoch."""
        pages = self.peek_dirty()
        self._dirty_view[:] = 0
        if self.on_reset is not None:
            self.on_reset()
        return pages

    # -- whole-memory helpers -----------------------------------------------------------------------------
    def nonzero_pages(self) -> npt.NDArray[np.int64]:
        words = self.view.view(np.uint64).reshape(self.npages, PAGE_SIZE // 8)
        return np.flatnonzero(words.any(axis=1))

    def clear(self) -> None:
        self.view[:] = 0
