"""Real TCP clients as network-device connections: every accepted socket becomes a connection id.

Single-threaded (selectors): the run loop calls pump() between slices, and with a timeout while the guest
is idle, so a client's bytes wake the guest. When the device's input queue is full the bridge stops reading
sockets (TCP pushes back on the clients); nothing is dropped.
"""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import time
from dataclasses import dataclass, field

from .devices.net import CLOSE, DATA, OPEN, NetDevice, QueueFull

log = logging.getLogger("toyvm.net")
READ_CHUNK = 64 << 10


CLOSE_GRACE = 30.0  # seconds a half-closed client waits for the guest to answer its CLOSE
MAX_CLIENT_OUT = 4 << 20  # unsent reply bytes per client before the bridge stops reading its requests


@dataclass
class _Client:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False  # the guest closed it: shut down once `out` is sent
    eof_at: float | None = None  # the client stopped sending: only replies flow now


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:6379")
    return host.strip("[]") or "127.0.0.1", int(port)


class TcpBridge:
    def __init__(self, net: NetDevice, address: str) -> None:
        self.net = net
        host, port = parse_address(address)
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=512)
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._clients: dict[int, _Client] = {}
        self._next_id = 1
        self._backlog: collections.deque[tuple[int, int, bytes]] = collections.deque()

    def close(self) -> None:
        for c in self._clients.values():
            c.sock.close()
        self._clients.clear()
        self._sel.close()
        self._listener.close()

    # -- moving events ------------------------------------------------------------------------------------
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
            c = self._clients.get(ev.conn)
            if c is None:
                log.debug("output for connection %d, which is gone: dropped", ev.conn)
                continue
            if ev.kind == DATA:
                c.out += ev.data
            elif ev.kind == CLOSE:
                c.closing = True
            self._flush(ev.conn, c)

    def _flush(self, conn: int, c: _Client) -> None:
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except BlockingIOError:
                pass
            except OSError:
                self._drop(conn, notify=True)
                return
        if c.closing and not c.out:
            self._drop(conn, notify=False)
            return
        # A client that does not read its replies is not read either: its output stays bounded.
        reading = c.eof_at is None and len(c.out) < MAX_CLIENT_OUT
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if c.out else 0)
        self._interest(c.sock, events, conn)

    def _interest(self, sock: socket.socket, events: int, conn: int) -> None:
        """Watch `sock` for `events`; with none, stop watching it (the next reply re-arms it)."""
        try:
            if events:
                self._sel.modify(sock, events, conn)
            else:
                self._sel.unregister(sock)
        except KeyError:
            if events:
                self._sel.register(sock, events, conn)

    def _expire_half_closed(self) -> None:
        now = time.monotonic()
        for conn, c in list(self._clients.items()):
            if c.eof_at is not None and not c.out and now - c.eof_at > CLOSE_GRACE:
                self._drop(conn, notify=False)

    def _drop(self, conn: int, notify: bool) -> None:
        c = self._clients.pop(conn)
        self._interest(c.sock, 0, conn)
        c.sock.close()
        if notify:
            self._deliver(CLOSE, conn)

    # -- the loop step ------------------------------------------------------------------------------------
    def pump(self, timeout: float = 0.0) -> None:
        """Move guest output to sockets and socket input to the guest; wait at most `timeout` for activity."""
        self._take_guest_output()
        self._drain_backlog()
        self._expire_half_closed()
        reading = not self._backlog  # push back: read nothing more until the device took what we hold
        for key, mask in self._sel.select(timeout if reading else min(timeout, 0.001)):
            if key.fileobj is self._listener:
                self._accept()
                continue
            conn = key.data
            c = self._clients.get(conn)
            if c is None:
                continue
            if mask & selectors.EVENT_WRITE:
                self._flush(conn, c)
                if conn not in self._clients:
                    continue
            if mask & selectors.EVENT_READ and reading:
                self._read(conn, c)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self._next_id
            self._next_id += 1
            self._clients[conn] = _Client(sock)
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._deliver(OPEN, conn)

    def _read(self, conn: int, c: _Client) -> None:
        try:
            data = c.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._deliver(DATA, conn, data)
            if len(c.out) >= MAX_CLIENT_OUT:
                self._flush(conn, c)
        else:
            # End of the client's stream: tell the guest, keep the socket for its replies until it answers
            # with its own CLOSE (or the grace period ends).
            c.eof_at = time.monotonic()
            self._deliver(CLOSE, conn)
            self._flush(conn, c)
