"""The thin I/O layer around the sans-I/O pieces: an authenticated TCP connection with a reader thread.

Every connection first completes the HMAC handshake (colo.auth) with a short timeout; then a reader
thread turns bytes into messages on a queue, and any thread may send. Liveness: every byte received
refreshes `last_seen`; `alive(timeout)` says whether the peer spoke recently. A `Link` carries plain
messages (gateway and control links); a `ProtocolLink` drives a checkpoint state machine (colo.protocol)
under a lock, so the replication link gets the table's checks on everything sent and received.
"""
from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection
from typing import TextIO

from colo.auth import Handshake
from colo.errors import AuthError, ColoError
from colo.messages import Heartbeat, Message, VmstateChunk, describe
from colo.protocol import ConnectionClosed, ProtocolSide
from colo.wire import MAX_PAYLOAD

log = logging.getLogger("colo.link")
AUTH_TIMEOUT = 5.0
QUIET_MESSAGES = {"heartbeat", "node-status"}  # not traced: they would drown everything else


class Closed:
    """Queue event: the connection ended (`reason` says how)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Closed({self.reason!r})"


Event = Message | ConnectionClosed | Closed


class Tracer:
    """--trace: every protocol message with a timestamp, for people learning the protocol."""

    def __init__(self, who: str, stream: TextIO | None = None) -> None:
        self.who = who
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, direction: str, peer: str, msg: Message) -> None:
        if msg.NAME in QUIET_MESSAGES:
            return
        text = describe(msg)
        if isinstance(msg, VmstateChunk) or msg.NAME == "initial-chunk":
            text += f" ({len(getattr(msg, 'data', b''))} bytes)"
        elif msg.NAME in ("input", "output"):
            text += f" seq {getattr(msg, 'seq', '?')} conn {getattr(msg, 'conn', '?')} " \
                    f"{len(getattr(msg, 'data', b''))} bytes"
        with self._lock:
            print(f"[{time.monotonic() - self.t0:9.4f}] {self.who} {direction} {peer}: {text}",
                  file=self.stream, flush=True)


def authenticate(sock: socket.socket, key: bytes, role: str, peer_role: str | Collection[str], *,
                 encrypt: bool = False) -> Handshake:
    """Run the handshake on a connected socket; AuthError (or OSError) on failure."""
    hs = Handshake(key, role, peer_role, encrypt=encrypt)
    sock.settimeout(AUTH_TIMEOUT)
    try:
        sock.sendall(hs.start())
        while not hs.done:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                raise AuthError(f"{role}: authentication timed out after {AUTH_TIMEOUT:.0f} s") from None
            out = hs.receive_data(data)
            if out:
                sock.sendall(out)
    finally:
        sock.settimeout(None)
    return hs


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


class Link:
    """A framed, authenticated connection carrying plain messages, with a reader thread."""

    def __init__(self, sock: socket.socket, hs: Handshake, *, name: str = "",
                 max_payload: int = MAX_PAYLOAD, tracer: Tracer | None = None,
                 inbox: queue.Queue[tuple[Link, Event]] | None = None) -> None:
        """Events go to `self.events`, or as (link, event) pairs to a shared `inbox` (a server's many links)."""
        self.sock = sock
        self.peer_role = hs.peer_role
        self.name = name or hs.peer_role
        self.events: queue.Queue[Event] = queue.Queue()
        self.inbox = inbox
        self.last_seen = time.monotonic()
        self.closed = False
        self._send_lock = threading.Lock()
        self._tracer = tracer
        self.codec = hs.session(max_payload=max_payload)  # seals and verifies every frame
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._read_loop, name=f"link-{self.name}", daemon=True)
        self._thread.start()

    # -- receiving ----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self.codec.feed(data)
        while (msg := self.codec.next_message()) is not None:
            self._deliver(msg)

    on_arrival: Callable[[Event], None] | None = None  # called in the reader thread, before queueing

    def _deliver(self, msg: Event) -> None:
        if self._tracer is not None and isinstance(msg, Message):
            self._tracer("<-", self.name, msg)
        if self.on_arrival is not None:
            self.on_arrival(msg)  # e.g. stop the running VM now: a checkpoint request must not wait a slice
        if self.inbox is not None:
            self.inbox.put((self, msg))
        else:
            self.events.put(msg)

    def _drain_pending(self) -> None:
        """Messages in the bytes that came with the handshake (the codec holds them already)."""
        while (msg := self.codec.next_message()) is not None:
            self._deliver(msg)

    def _read_loop(self) -> None:
        reason = "closed by peer"
        try:
            # Here, not in the constructor: a bad frame pipelined behind the peer's proof then takes
            # the same path as any later one (logged, Closed), instead of escaping from __init__.
            self._drain_pending()
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                self.last_seen = time.monotonic()
                self._feed(data)
        except ColoError as e:
            reason = f"bad input from {self.name}: {e}"
            log.error("%s", reason)
        except OSError as e:
            reason = f"connection error: {e}"
        self.closed = True
        self._deliver(Closed(reason))

    # -- sending ------------------------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Send one message (thread-safe). OSError if the connection is gone."""
        with self._send_lock:  # sealing takes the next sequence number: under the lock
            self.sock.sendall(self.codec.encode(msg))
        if self._tracer is not None:
            self._tracer("->", self.name, msg)

    def try_send(self, msg: Message) -> bool:
        try:
            self.send(msg)
            return True
        except OSError:
            return False

    # -- liveness and closing -----------------------------------------------------------------------
    def alive(self, timeout: float) -> bool:
        return not self.closed and time.monotonic() - self.last_seen < timeout

    def get(self, timeout: float | None = None) -> Event | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ProtocolLink(Link):
    """The replication link: the checkpoint state machine checks every message both ways."""

    def __init__(self, sock: socket.socket, proto: ProtocolSide, *, name: str, tracer: Tracer | None = None,
                 inbox: queue.Queue[tuple[Link, Event]] | None = None) -> None:
        self.proto = proto
        self._proto_lock = threading.Lock()
        # The protocol object already holds the handshake's leftover bytes.
        self.sock = sock
        self.peer_role = proto.ROLE.peer.value
        self.name = name
        self.events = queue.Queue()
        self.inbox = inbox
        self.last_seen = time.monotonic()
        self.closed = False
        self._send_lock = threading.Lock()
        self._tracer = tracer
        self._thread = threading.Thread(target=self._read_loop, name=f"link-{name}", daemon=True)
        self._thread.start()

    def _drain_pending(self) -> None:
        with self._proto_lock:
            self._drain()

    def _drain(self) -> None:
        while (ev := self.proto.next_event()) is not None:
            self._deliver(ev)
            if isinstance(ev, ConnectionClosed):
                return

    def _feed(self, data: bytes) -> None:
        with self._proto_lock:
            self.proto.receive_data(data)
            self._drain()

    def _read_loop(self) -> None:
        super()._read_loop()
        if not self.closed or self.proto.state.name not in ("ERROR", "CLOSED"):
            try:
                with self._proto_lock:
                    self.proto.receive_data(b"")
                    self._drain()
            except ColoError:
                pass

    def send(self, msg: Message) -> None:
        with self._send_lock:
            with self._proto_lock:
                frame = self.proto.send(msg)
            self.sock.sendall(frame)
        if self._tracer is not None:
            self._tracer("->", self.name, msg)

    def heartbeat(self) -> bool:
        return self.try_send(Heartbeat())
