"""COM1: the subset of a 16550 UART a polling guest needs (transmit, line status, receive)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..contract import COM1_BASE, COM1_PORTS
from .base import state_from_dict, state_to_dict

THR_RBR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_DATA_READY, LSR_THR_EMPTY, LSR_TX_EMPTY = 0x01, 0x20, 0x40


@dataclass
class SerialState:
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    rx: bytes = b""  # bytes the host sent that the guest has not read yet


class Serial:
    name = "serial"
    base = COM1_BASE
    nports = COM1_PORTS
    width = 1

    def __init__(self) -> None:
        self.state = SerialState()
        self._out = bytearray()  # transmitted bytes the host has not taken yet (host side, not VM state)

    def read(self, port: int) -> int:
        s = self.state
        reg = port - self.base
        if reg == THR_RBR:
            if not s.rx:
                return 0
            byte, s.rx = s.rx[0], s.rx[1:]
            return byte
        if reg == LSR:
            return LSR_THR_EMPTY | LSR_TX_EMPTY | (LSR_DATA_READY if s.rx else 0)
        return {IER: s.ier, IIR_FCR: 0x01, LCR: s.lcr, MCR: s.mcr, MSR: 0xB0, SCR: s.scr}[reg]

    def write(self, port: int, value: int) -> None:
        reg = port - self.base
        if reg == THR_RBR:
            self._out.append(value)
        elif reg in (IER, LCR, MCR, SCR):
            setattr(self.state, {IER: "ier", LCR: "lcr", MCR: "mcr", SCR: "scr"}[reg], value)

    # -- host side --------------------------------------------------------------------------------------
    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes) -> None:
        self.state.rx += data

    @property
    def input_pending(self) -> bool:
        return bool(self.state.rx)

    def save(self) -> dict[str, Any]:
        return state_to_dict(self.state)

    def restore(self, state: dict[str, Any]) -> None:
        self.state = state_from_dict(SerialState, self.name, state)
