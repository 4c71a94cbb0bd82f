"""Client TCP connections as numbered byte streams, served from a selector loop.

One implementation for the two places that own clients' sockets: toyvm's network bridge (`toyvm run
--net-listen`) and colo's gateway. It is its own package because toyvm never imports colo and the gateway imports
nothing from toyvm.

A `ClientTable` accepts connections on a listening socket and reports what happens as events (`Connected`, `Data`,
`Eof`, `Gone`, `Backlog`) to the callback it was given; its owner answers a `Connected` at once with `adopt`
(giving the connection its id) or `refuse`. Output is bounded per client: past `out_limit` unsent bytes the table
stops reading that client (backpressure on that connection only) and says so (`Backlog`); a client that stays over
the limit without taking a byte for `slow_timeout` seconds is closed. A client that ends its stream (`Eof`) keeps
its socket for the replies, until the owner closes it or `close_grace` passes.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("tcpclients")
READ_CHUNK = 64 << 10
OUT_LIMIT = 1 << 20  # unsent reply bytes per client before its input is no longer read
SLOW_TIMEOUT = 30.0  # seconds a client may stay over OUT_LIMIT without reading a byte
CLOSE_GRACE = 30.0  # seconds a half-closed client waits for its last replies


@dataclass(frozen=True, slots=True)
class Connected:
    """A client connected: answer with `adopt(token, conn)` or `refuse(token, why)` before the next event."""

    token: int
    peer: str


@dataclass(frozen=True, slots=True)
class Data:
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    """The client ended its stream; replies can still reach it."""

    conn: int


@dataclass(frozen=True, slots=True)
class Gone:
    """The client's socket is closed (by either side): nothing more goes to or comes from it."""

    conn: int
    why: str


@dataclass(frozen=True, slots=True)
class Backlog:
    """The client's unsent output went over `out_limit` (over=True) or back under half of it."""

    conn: int
    over: bool


ClientEvent = Connected | Data | Eof | Gone | Backlog


@dataclass
class _Client:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False  # close once `out` is sent
    eof_at: float | None = None  # the client stopped sending
    paused: bool = False  # the owner asked us not to read it
    over: bool = False  # out is over the limit
    stuck_since: float | None = None  # over the limit and not taking bytes since


def parse_address(text: str) -> tuple[str, int]:
    """"HOST:PORT" (HOST may be empty or bracketed) as a (host, port) pair; ValueError names what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:6379")
    return host.strip("[]") or "127.0.0.1", int(port)


class ListenError(OSError):
    """An address that cannot be listened on; its text is the whole message (no "[Errno 98]" in front)."""

    @classmethod
    def of(cls, address: tuple[str, int], e: OSError, doing: str = "listen on", hint: str = "") -> ListenError:
        """"cannot DOING HOST:PORT: Address already in use (HINT)", keeping the errno of `e`."""
        why = os.strerror(e.errno) if e.errno else str(e)
        return cls(e.errno, f"cannot {doing} {format_address(address)}: {why}" + (f" ({hint})" if hint else ""))

    def __str__(self) -> str:
        return str(self.strerror)


def listen_on(address: tuple[str, int], backlog: int) -> socket.socket:
    """A listening socket on `address`, or a ListenError that names it: "cannot listen on 127.0.0.1:6379:
    Address already in use"."""
    try:
        return socket.create_server(address, backlog=backlog)
    except OSError as e:
        raise ListenError.of(address, e) from None


def format_address(address: tuple[str, int]) -> str:
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"{host}:{address[1]}"


class ClientTable:
    def __init__(self, sel: selectors.BaseSelector, address: tuple[str, int], on_event: Callable[[ClientEvent], None],
                 *, out_limit: int = OUT_LIMIT, slow_timeout: float = SLOW_TIMEOUT, close_grace: float = CLOSE_GRACE,
                 listening: bool = True, backlog: int = 512) -> None:
        self.sel = sel
        self.on_event = on_event
        self.out_limit, self.slow_timeout, self.close_grace = out_limit, slow_timeout, close_grace
        self.listener = listen_on(address, backlog)
        self.listener.setblocking(False)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.clients: dict[int, _Client] = {}
        self._new: dict[int, socket.socket] = {}  # accepted, waiting for adopt/refuse
        self._next_token = 1
        self.listening = False
        self.set_listening(listening)

    # -- the owner's calls ---------------------------------------------------------------------------------------
    def set_listening(self, on: bool) -> None:
        """Accept new clients, or leave them waiting in the listen backlog."""
        if on and not self.listening:
            self.sel.register(self.listener, selectors.EVENT_READ, (self, None))
        elif not on and self.listening:
            self.sel.unregister(self.listener)
        self.listening = on

    def adopt(self, token: int, conn: int) -> None:
        sock = self._new.pop(token)
        self.clients[conn] = _Client(sock)
        self._interest(conn)

    def refuse(self, token: int, why: str) -> None:
        sock = self._new.pop(token)
        log.info("refused a client: %s", why)
        _close(sock)

    def write(self, conn: int, data: bytes) -> None:
        c = self.clients.get(conn)
        if c is None or c.closing:
            return  # the client is gone, or closing: nothing more reaches it
        if not c.out:  # nothing waiting: most replies leave whole in one send, and nothing else changes
            n = self._send(conn, c, data)
            if n is None:
                return
            if n == len(data):
                c.stuck_since = None
                return
            data = data[n:]
        c.out += data
        self._flush(conn, c)

    def close(self, conn: int) -> None:
        """Close `conn` once what was written to it is sent."""
        c = self.clients.get(conn)
        if c is not None:
            c.closing = True
            self._flush(conn, c)

    def pause(self, conn: int) -> None:
        c = self.clients.get(conn)
        if c is not None and not c.paused:
            c.paused = True
            self._interest(conn)

    def resume(self, conn: int) -> None:
        c = self.clients.get(conn)
        if c is not None and c.paused:
            c.paused = False
            self._interest(conn)

    def unsent(self, conn: int) -> int:
        c = self.clients.get(conn)
        return len(c.out) if c is not None else 0

    def poll(self, now: float | None = None) -> None:
        """Call now and then: closes half-closed clients past their grace and clients stuck over the limit."""
        now = time.monotonic() if now is None else now
        for conn, c in list(self.clients.items()):
            if c.eof_at is not None and not c.out and now - c.eof_at > self.close_grace:
                self._drop(conn, "the client ended its stream and no reply came")
            elif c.stuck_since is not None and now - c.stuck_since > self.slow_timeout:
                self._drop(conn, f"the client read nothing of {len(c.out)} reply bytes for {self.slow_timeout:.0f} s")

    def close_all(self) -> None:
        for conn in list(self.clients):
            self._drop(conn, "closing", notify=False)
        for sock in self._new.values():
            _close(sock)
        self._new.clear()
        self.set_listening(False)
        self.listener.close()

    # -- the selector's calls ------------------------------------------------------------------------------------
    def on_ready(self, conn: int | None, mask: int) -> None:
        if conn is None:
            self._accept()
            return
        c = self.clients.get(conn)
        if c is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn, c)
            if conn not in self.clients:
                return
        if mask & selectors.EVENT_READ and self._reading(c):
            self._read(conn, c)

    # -- internals -----------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while self.listening:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: leave the rest in the backlog for now
                log.warning("cannot accept a client: %s", e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            token = self._next_token
            self._next_token += 1
            self._new[token] = sock
            self.on_event(Connected(token, f"{peer[0]}:{peer[1]}"))
            if token in self._new:  # the owner must answer at once: a client nobody adopts is refused
                self.refuse(token, "not adopted")

    def _read(self, conn: int, c: _Client) -> None:
        try:
            data = c.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, f"connection error: {e}")
            return
        if data:
            self.on_event(Data(conn, data))
        else:
            c.eof_at = time.monotonic()
            self._interest(conn)
            self.on_event(Eof(conn))

    def _send(self, conn: int, c: _Client, data: bytes | bytearray) -> int | None:
        """What the socket took of `data` (0 when it is full); None: the connection failed and is dropped."""
        try:
            return c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            self._drop(conn, f"connection error: {e}")
            return None

    def _flush(self, conn: int, c: _Client) -> None:
        if c.out:
            n = self._send(conn, c, c.out)
            if n is None:
                return
            if n:
                del c.out[:n]
                c.stuck_since = None
        if c.closing and not c.out:
            self._drop(conn, "closed")
            return
        over = len(c.out) > self.out_limit if not c.over else len(c.out) > self.out_limit // 2
        if c.over and not over:
            c.stuck_since = None
        elif over and c.stuck_since is None:
            c.stuck_since = time.monotonic()
        if over != c.over:
            c.over = over
            self.on_event(Backlog(conn, over))
            if conn not in self.clients:
                return
        self._interest(conn)

    def _reading(self, c: _Client) -> bool:
        return c.eof_at is None and not c.paused and not c.over and not c.closing

    def _interest(self, conn: int) -> None:
        c = self.clients[conn]
        events = (selectors.EVENT_READ if self._reading(c) else 0) | (selectors.EVENT_WRITE if c.out else 0)
        key = (self, conn)
        try:
            if events:
                self.sel.modify(c.sock, events, key)
            else:
                self.sel.unregister(c.sock)
        except KeyError:
            if events:
                self.sel.register(c.sock, events, key)

    def _drop(self, conn: int, why: str, notify: bool = True) -> None:
        c = self.clients.pop(conn, None)
        if c is None:
            return
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        _close(c.sock)
        if notify:
            self.on_event(Gone(conn, why))


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
