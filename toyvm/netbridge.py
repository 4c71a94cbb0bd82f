"""Real TCP clients as network-device connections: every accepted socket becomes a connection id.

Single-threaded (selectors): the run loop calls pump() between slices, and with a timeout while the guest
is idle, so a client's bytes wake the guest. When the device's input queue is full the bridge stops reading
sockets (TCP pushes back on the clients); nothing is dropped. The sockets themselves are `tcpclients`, the same
code colo's gateway serves its clients with: bounded output per client, half-closed clients kept for their
replies.
"""
from __future__ import annotations

import collections
import logging
import selectors

from tcpclients import Backlog, ClientEvent, ClientTable, Connected, Data, Eof, Gone, parse_address

from .devices.net import CLOSE, DATA, OPEN, NetDevice, QueueFull

log = logging.getLogger("toyvm.net")
MAX_CLIENT_OUT = 4 << 20  # unsent reply bytes per client before the bridge stops reading its requests

__all__ = ["TcpBridge", "parse_address"]


class TcpBridge:
    def __init__(self, net: NetDevice, address: str) -> None:
        self.net = net
        self._sel = selectors.DefaultSelector()
        self._table = ClientTable(self._sel, parse_address(address), self._on_client, out_limit=MAX_CLIENT_OUT)
        self.address = self._table.address
        self._next_id = 1
        self._backlog: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self._ended: set[int] = set()  # connections the guest was told are closed (or closed itself)

    def close(self) -> None:
        self._table.close_all()
        self._sel.close()

    # -- moving events ------------------------------------------------------------------------------------
    def _on_client(self, ev: ClientEvent) -> None:
        if isinstance(ev, Connected):
            conn = self._next_id
            self._next_id += 1
            self._table.adopt(ev.token, conn)
            self._deliver(OPEN, conn)
        elif isinstance(ev, Data):
            self._deliver(DATA, ev.conn, ev.data)
        elif isinstance(ev, (Eof, Gone)):
            # End of the client's stream (or of its socket): tell the guest once. After an Eof the socket
            # stays for the guest's replies until it answers with its own CLOSE (or the grace period ends).
            if ev.conn not in self._ended:
                self._ended.add(ev.conn)
                self._deliver(CLOSE, ev.conn)
            if isinstance(ev, Gone):
                self._ended.discard(ev.conn)
        elif isinstance(ev, Backlog):
            pass  # the table stops reading that client by itself

    def _deliver(self, kind: int, conn: int, data: bytes = b"") -> None:
        self._backlog.append((kind, conn, data))
        self._drain_backlog()

    def _drain_backlog(self) -> None:
        while self._backlog:
            kind, conn, data = self._backlog[0]
            try:
                self.net.deliver(kind, conn, data)
            except QueueFull:
                return
            self._backlog.popleft()

    def _take_guest_output(self) -> None:
        for ev in self.net.take_output():
            if ev.conn not in self._table.clients:
                log.debug("output for connection %d, which is gone: dropped", ev.conn)
                continue
            if ev.kind == DATA:
                self._table.write(ev.conn, ev.data)
            elif ev.kind == CLOSE:
                self._ended.add(ev.conn)  # the guest closed it: it needs no CLOSE from us
                self._table.close(ev.conn)

    # -- the loop step ------------------------------------------------------------------------------------
    def pump(self, timeout: float = 0.0) -> None:
        """Move guest output to sockets and socket input to the guest; wait at most `timeout` for activity."""
        self._take_guest_output()
        self._drain_backlog()
        self._table.poll()
        reading = not self._backlog  # push back: read nothing more until the device took what we hold
        for key, mask in self._sel.select(timeout if reading else min(timeout, 0.001)):
            owner, conn = key.data
            if not reading:
                mask &= ~selectors.EVENT_READ
                if not mask:
                    continue
            owner.on_ready(conn, mask)
