"""The message network device ("socket offload"): the host hands the guest connection events.

Inputs (OPEN, DATA, CLOSE) carry sequence numbers assigned in arrival order (or by the caller, e.g. a replication
gateway replaying its log); the state records the last input accepted and the last output produced, so a restored
VM can be fed exactly the inputs it has not seen and its outputs already delivered can be recognised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..contract import NET_BASE, NET_PORTS
from ..errors import StateError
from ..ram import GuestRAM
from .base import state_from_dict, state_to_dict

OPEN, DATA, CLOSE = 1, 2, 3
KIND_NAMES = {OPEN: "open", DATA: "data", CLOSE: "close"}
STATUS, RECV, SEND, RESULT = 0x0, 0x4, 0x8, 0xC
RX_READY, TX_ROOM = 0x1, 0x2
OK, EMPTY, FULL, BAD_DESC = 0, 1, 2, 3
DESC_SIZE = 32
MAX_SEND = 64 << 10
RX_MAX_EVENTS, RX_MAX_BYTES = 1024, 4 << 20
TX_MAX_EVENTS, TX_MAX_BYTES = 256, 1 << 20


class NetEvent(NamedTuple):
    seq: int
    kind: int
    conn: int
    data: bytes = b""


class QueueFull(Exception):
    """The input queue is full: the host must hold the event and retry (push back, never drop)."""


class SequenceError(ValueError):
    """An input with a sequence number that is not the next one."""


@dataclass
class NetState:
    rx: list[list[Any]] = field(default_factory=list)  # [seq, kind, conn, data]: inputs not yet taken
    tx: list[list[Any]] = field(default_factory=list)  # outputs produced, not yet taken by the host
    last_input_seq: int = 0
    last_output_seq: int = 0
    result: int = OK


class NetDevice:
    name = "net"
    base = NET_BASE
    nports = NET_PORTS
    width = 4

    def __init__(self, ram: GuestRAM) -> None:
        self.ram = ram
        self.state = NetState()

    # -- host side ------------------------------------------------------------------------------------------
    def can_accept(self, nbytes: int = 0) -> bool:
        rx = self.state.rx
        return len(rx) < RX_MAX_EVENTS and sum(len(e[3]) for e in rx) + nbytes <= RX_MAX_BYTES

    def deliver(self, kind: int, conn: int, data: bytes = b"", seq: int | None = None) -> bool:
        """Queue an input event. Returns False for an already-accepted seq (a replayed duplicate)."""
        if kind not in KIND_NAMES:
            raise ValueError(f"unknown event kind {kind}")
        s = self.state
        if seq is not None:
            if seq <= s.last_input_seq:
                return False
            if seq != s.last_input_seq + 1:
                raise SequenceError(f"input seq {seq} skips ahead: the device accepted up to {s.last_input_seq}")
        if not self.can_accept(len(data)):
            raise QueueFull(f"network input queue full ({len(s.rx)} events)")
        s.last_input_seq += 1
        s.rx.append([s.last_input_seq, kind, conn, bytes(data)])
        return True

    def take_output(self) -> list[NetEvent]:
        return [NetEvent(*e) for e in self.take_output_lists()]

    def take_output_lists(self) -> list[list[Any]]:
        """The outputs as the device holds them, [seq, kind, conn, data] each, handed over without a copy (the
        device keeps none of them: a replication node sends them as they are)."""
        out, self.state.tx = self.state.tx, []
        return out

    @property
    def input_pending(self) -> bool:
        return bool(self.state.rx)

    @property
    def tx_unblocked(self) -> bool:
        """The guest's last SEND found the output queue full and there is room again: wake it."""
        return self.state.result == FULL and self._tx_room()

    def _tx_room(self) -> bool:
        tx = self.state.tx
        return len(tx) < TX_MAX_EVENTS and sum(len(e[3]) for e in tx) < TX_MAX_BYTES

    # -- guest side -----------------------------------------------------------------------------------------
    def read(self, port: int) -> int:
        reg = port - self.base
        if reg == STATUS:
            return (RX_READY if self.state.rx else 0) | (TX_ROOM if self._tx_room() else 0)
        if reg == RESULT:
            return self.state.result
        return 0

    def write(self, port: int, value: int) -> None:
        reg = port - self.base
        if reg == RECV:
            self.state.result = self._recv(value)
        elif reg == SEND:
            self.state.result = self._send(value)

    def _recv(self, desc: int) -> int:
        ram = self.ram
        ram.check(desc, DESC_SIZE, "net RECV descriptor")
        if not self.state.rx:
            return EMPTY
        head = self.state.rx[0]
        seq, kind, conn, data = head
        n = 0
        if kind == DATA:
            buf, cap = ram.read_u64(desc + 8), ram.read_u32(desc + 16)
            n = min(cap, len(data))
            ram.check(buf, n, "net RECV buffer")  # checked before anything changes: a fault loses nothing
            ram.write(buf, data[:n])
        if n < len(data):
            head[3] = data[n:]  # the rest arrives with the next RECV, same seq
        else:
            self.state.rx.pop(0)
        ram.write(desc, kind.to_bytes(4, "little") + conn.to_bytes(4, "little"))
        ram.write(desc + 20, n.to_bytes(4, "little") + seq.to_bytes(8, "little"))
        return OK

    def _send(self, desc: int) -> int:
        ram = self.ram
        ram.check(desc, DESC_SIZE, "net SEND descriptor")
        kind, conn = ram.read_u32(desc), ram.read_u32(desc + 4)
        buf, length = ram.read_u64(desc + 8), ram.read_u32(desc + 16)
        if kind not in (DATA, CLOSE) or (kind == DATA and length > MAX_SEND):
            return BAD_DESC
        data = ram.read(buf, length, "net SEND buffer") if kind == DATA else b""
        if not self._tx_room():
            return FULL
        s = self.state
        s.last_output_seq += 1
        s.tx.append([s.last_output_seq, kind, conn, data])
        ram.write(desc + 24, s.last_output_seq.to_bytes(8, "little"))
        return OK

    # -- state ----------------------------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        d = state_to_dict(self.state)
        d["rx"] = [list(e) for e in d["rx"]]
        d["tx"] = [list(e) for e in d["tx"]]
        return d

    def restore(self, state: dict[str, Any]) -> None:
        new = state_from_dict(NetState, self.name, state)
        for queue in (new.rx, new.tx):
            for e in queue:
                if (not isinstance(e, list) or len(e) != 4 or not all(isinstance(v, int) for v in e[:3])
                        or e[1] not in KIND_NAMES or not isinstance(e[3], bytes)):
                    raise StateError(f"device net: malformed queued event {e!r}")
        new.rx = [list(e) for e in new.rx]
        new.tx = [list(e) for e in new.tx]
        self.state = new
