"""The host loop around a Machine: slices, serial output, the network bridge, limits and signals."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import BinaryIO

from .machine import Machine, StopReason
from .netbridge import TcpBridge

IDLE_POLL = 0.5  # seconds the loop waits for a client while the guest is idle


class RunEnd(enum.StrEnum):
    POWER_OFF = "power-off"
    INSTRUCTION_LIMIT = "instruction-limit"
    TIME_LIMIT = "time-limit"
    IDLE = "idle"  # the guest waits for input and nothing can send it any
    INTERRUPTED = "interrupted"


def run(vm: Machine, *, serial_out: BinaryIO | None = None, bridge: TcpBridge | None = None,
        max_instructions: int | None = None, max_seconds: float | None = None, slice_seconds: float = 0.01,
        on_slice: Callable[[], None] | None = None) -> RunEnd:
    """Run until power-off, a limit, an idle guest with no input source, or vm.request_stop()."""
    end = None if max_seconds is None else time.monotonic() + max_seconds
    remaining = max_instructions

    def drain() -> None:
        out = vm.take_serial()
        if out and serial_out is not None:
            serial_out.write(out)
            serial_out.flush()

    try:
        while True:
            if vm.powered_off:
                return RunEnd.POWER_OFF
            budget = slice_seconds if end is None else min(slice_seconds, end - time.monotonic())
            if budget <= 0:
                return RunEnd.TIME_LIMIT
            r = vm.run_slice(budget, remaining)
            if remaining is not None and r.instructions is not None:
                remaining -= r.instructions
            drain()
            if on_slice is not None:
                on_slice()
            if r.reason is StopReason.HALT:
                if bridge is None:
                    return RunEnd.IDLE
                bridge.pump(0.0)
                if vm.wakeup_pending:
                    continue
                wait = IDLE_POLL if end is None else max(0.0, min(IDLE_POLL, end - time.monotonic()))
                bridge.pump(wait)
            elif bridge is not None:
                bridge.pump(0.0)
            if r.reason is StopReason.POWER_OFF:
                return RunEnd.POWER_OFF
            if r.reason is StopReason.INSTRUCTION_LIMIT:
                return RunEnd.INSTRUCTION_LIMIT
            if r.reason is StopReason.STOP_REQUESTED:
                return RunEnd.INTERRUPTED
    finally:
        drain()
        if bridge is not None:
            bridge.pump(0.0)  # deliver what the guest produced last
