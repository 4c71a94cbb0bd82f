"""The port-I/O bus: devices claim port ranges; overlapping claims are refused (the kvmtool pattern)."""
from __future__ import annotations

import bisect
from typing import Any, Protocol

from .errors import ConfigError, GuestFault


class PortDevice(Protocol):
    """What a device on the bus provides. State lives in a plain dataclass; save/restore move it."""

    name: str
    base: int
    nports: int
    width: int  # the only access size (bytes) the device's registers accept

    def read(self, port: int) -> int: ...
    def write(self, port: int, value: int) -> None: ...
    def save(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...


class PortBus:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._devices: list[PortDevice] = []

    def register(self, dev: PortDevice) -> None:
        lo, hi = dev.base, dev.base + dev.nports
        if not (0 <= lo < hi <= 0x10000):
            raise ConfigError(f"device {dev.name}: port range {lo:#x}..{hi - 1:#x} is outside 0..0xffff")
        for other in self._devices:
            if lo < other.base + other.nports and other.base < hi:
                raise ConfigError(f"device {dev.name} ports {lo:#x}..{hi - 1:#x} overlap {other.name} "
                                  f"({other.base:#x}..{other.base + other.nports - 1:#x})")
        i = bisect.bisect(self._starts, lo)
        self._starts.insert(i, lo)
        self._devices.insert(i, dev)

    @property
    def devices(self) -> list[PortDevice]:
        return list(self._devices)

    def find(self, port: int) -> PortDevice | None:
        i = bisect.bisect(self._starts, port) - 1
        if i >= 0:
            dev = self._devices[i]
            if port < dev.base + dev.nports:
                return dev
        return None

    def _claim(self, port: int, size: int, direction: str) -> PortDevice:
        dev = self.find(port)
        if dev is None:
            raise GuestFault(f"guest {direction} of {size} byte(s) at port {port:#x}: no device claims this port")
        if size != dev.width:
            raise GuestFault(f"guest {direction} of {size} byte(s) at port {port:#x} ({dev.name}): "
                             f"its registers are {dev.width} byte(s) wide")
        return dev

    def read(self, port: int, size: int) -> int:
        return self._claim(port, size, "IN").read(port) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        self._claim(port, size, "OUT").write(port, value & ((1 << (8 * size)) - 1))
