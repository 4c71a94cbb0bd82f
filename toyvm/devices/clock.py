"""Two clocks: virtual time (deterministic: a function of what the guest did) and the host's wall clock."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..contract import CLOCK_BASE, CLOCK_PORTS, IO_COST_NS
from .base import state_from_dict, state_to_dict

VIRT_LO, VIRT_HI, HOST_LO, HOST_HI, DEADLINE_LO, DEADLINE_HI = 0x0, 0x4, 0x8, 0xC, 0x10, 0x14
MASK32 = 0xFFFFFFFF


@dataclass
class ClockState:
    virtual_ns: int = 0
    virt_latch: int = 0
    host_latch: int = 0
    deadline_lo: int = 0  # written first, takes effect when the high half is written
    deadline: int = 0  # armed timer deadline in virtual ns; 0 = disarmed


class Clock:
    name = "clock"
    base = CLOCK_BASE
    nports = CLOCK_PORTS
    width = 4

    def __init__(self) -> None:
        self.state = ClockState()

    def tick_io(self) -> None:
        """Every guest port access costs IO_COST_NS of virtual time (docs/machine.md)."""
        self.state.virtual_ns += IO_COST_NS

    @property
    def timer_armed(self) -> bool:
        return self.state.deadline != 0

    def expire_timer(self) -> None:
        """The guest halted with the timer armed and no input: jump virtual time to the deadline."""
        s = self.state
        s.virtual_ns = max(s.virtual_ns, s.deadline)
        s.deadline = 0

    def read(self, port: int) -> int:
        s = self.state
        reg = port - self.base
        if reg == VIRT_LO:
            s.virt_latch = s.virtual_ns
            return s.virt_latch & MASK32
        if reg == VIRT_HI:
            return s.virt_latch >> 32
        if reg == HOST_LO:
            s.host_latch = time.time_ns()
            return s.host_latch & MASK32
        if reg == HOST_HI:
            return s.host_latch >> 32
        return 0

    def write(self, port: int, value: int) -> None:
        s = self.state
        reg = port - self.base
        if reg == DEADLINE_LO:
            s.deadline_lo = value
        elif reg == DEADLINE_HI:
            s.deadline = (value << 32) | s.deadline_lo

    def save(self) -> dict[str, Any]:
        return state_to_dict(self.state)

    def restore(self, state: dict[str, Any]) -> None:
        self.state = state_from_dict(ClockState, self.name, state)
