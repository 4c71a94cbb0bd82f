"""The thin I/O layer around the sans-I/O pieces: authenticated, framed connections served from a selector.

A `Conn` is one TCP connection. It runs the HMAC handshake (colo.auth) without blocking, then frames messages
(colo.wire), or, on the replication link, drives a checkpoint state machine (colo.protocol) that checks every
message both ways. It never blocks the loop that serves it: the gateway's single thread, or a node's I/O thread.

Threads: `on_ready` (reading, and flushing what is queued) belongs to the loop's thread; `send` may be called
from any thread (a node's VM thread sends its checkpoints itself, without a hand-off); with `block=...` it also
waits, in the calling thread, until the bytes are on the wire. Liveness: `last_heard` is the time of the last
complete, valid frame (a byte that starts a frame proves nothing: a garbled length would otherwise look alive).
"""
from __future__ import annotations

import collections
import enum
import errno
import itertools
import logging
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Collection

from colo import trace
from colo.auth import Handshake
from colo.errors import AuthError, ColoError
from colo.events import STREAM
from colo.messages import ErrorMessage, Heartbeat, Message
from colo.protocol import ConnectionClosed, ProtocolSide
from colo.session import SessionCodec
from colo.wire import MAX_PAYLOAD

log = logging.getLogger("colo.link")
AUTH_TIMEOUT = 5.0  # seconds a peer has to connect and prove the key
DEFAULT_HEARTBEAT_TIMEOUT = 0.8  # seconds of silence after which a peer counts as lost (DESIGN: under 1 s)
READ_SIZE = 1 << 20
STATE_READ = 64 << 10  # replication links: small reads find a large frame's header early (see on_ready)
SENDMSG_PARTS = 64  # buffers per sendmsg call
READS_PER_READY = 8  # reads per readiness before the loop serves other connections


class Opened:
    """Event: the handshake completed; the connection carries messages now."""

    def __repr__(self) -> str:
        return "Opened()"


class Closed:
    """Event: the connection ended (`reason` says how)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Closed({self.reason!r})"


Event = Message | ConnectionClosed | Closed | Opened


class State(enum.Enum):
    CONNECTING = "connecting"  # an outgoing connect in progress
    HANDSHAKE = "handshake"  # proving the key both ways
    OPEN = "open"
    CLOSED = "closed"


ProtocolFactory = Callable[[Handshake], ProtocolSide]


class Conn:
    """One authenticated, framed connection. See the module text for which thread may call what."""

    _ids = iter(range(1, 1 << 62))
    gate: Callable[[Conn, Message], None] | None = None  # a node sets it: colo.gate.Gate

    def __init__(self, sock: socket.socket, *, key: bytes, role: str, peer_role: str | Collection[str],
                 name: str = "", connecting: bool = False,
                 protocol: ProtocolFactory | None = None, max_payload: int = MAX_PAYLOAD,
                 encrypt: bool = True) -> None:
        self.id = next(Conn._ids)
        self.sock = sock
        sock.setblocking(False)
        self.name = name
        self.hs = Handshake(key, role, peer_role, encrypt=encrypt)
        self.peer_role = self.hs.peer_role
        self.state = State.CONNECTING if connecting else State.HANDSHAKE
        self.started = time.monotonic()
        self.last_heard = self.started
        self.read_paused = False  # flow control (colo.nodeio): the reader is behind; the kernel holds the rest
        self.closed_reason = ""
        self.proto: ProtocolSide | None = None
        self._protocol = protocol
        self._codec: SessionCodec | None = None  # plain links: every frame sealed (colo.session)
        self._max_payload = max_payload
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._wlock = threading.Lock()  # the queue of frames and writes to the socket
        self._plock = threading.Lock()  # the protocol object (sends in one thread, receives in another)
        self._close_after_flush = ""
        self.on_change: Callable[[], None] | None = None  # a sender from another thread queued bytes
        # Served from a selector: only the loop closes the file descriptor (`release`, after it unregistered it).
        # Closed from another thread, a number still in the selector could go to a new socket, which the selector
        # would then never watch (a node that missed its fence for good).
        self.loop_owned = False
        if not connecting:
            self._queue(self.hs.start())

    def __repr__(self) -> str:
        return f"Conn({self.name or self.peer_role or '?'} #{self.id}, {self.state.value})"

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def open(self) -> bool:
        return self.state is State.OPEN

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def queued(self) -> int:
        return self._out_bytes

    def interest(self) -> int:
        if self.closed:
            return 0
        if self.state is State.CONNECTING:
            return selectors.EVENT_WRITE
        read = 0 if self.read_paused else selectors.EVENT_READ
        return read | (selectors.EVENT_WRITE if self._out_bytes else 0)

    def alive(self, timeout: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.open and now - self.last_heard < timeout

    @property
    def authenticated(self) -> bool:
        return self.hs.done

    def handshake_expired(self, now: float) -> bool:
        return self.state in (State.CONNECTING, State.HANDSHAKE) and now - self.started > AUTH_TIMEOUT

    # -- the loop's side ----------------------------------------------------------------------------------
    def on_ready(self, mask: int) -> list[Event]:
        """Serve readiness: finish a connect, flush, read. Returns what arrived, in order."""
        events: list[Event] = []
        if self.closed:
            return events
        if self.state is State.CONNECTING:
            if mask & selectors.EVENT_WRITE:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return self._fail(f"cannot connect: {errno.errorcode.get(err, err)} ({err})")
                self.state = State.HANDSHAKE
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._queue(self.hs.start())
            return events
        if mask & selectors.EVENT_WRITE:
            if not self._flush_some():
                return self._fail(self.closed_reason or "connection error while sending")
        if mask & selectors.EVENT_READ:
            for _ in range(READS_PER_READY):
                target = self._read_target()
                want = len(target) if target is not None else READ_SIZE if self.proto is None else STATE_READ
                try:
                    if target is not None:  # the rest of a large frame, straight into its own buffer
                        got = self.sock.recv_into(target)
                        data = b"" if got == 0 else None
                    else:
                        data = self.sock.recv(want)
                        got = len(data)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    events += self._fail(f"connection error: {e}")
                    return events
                if not got:
                    events += self._eof()
                    return events
                try:
                    events += self._feed(data) if data is not None else self._filled(got)
                except (ColoError, AuthError) as e:
                    # Before the handshake completes the serving loop reports the refusal (it knows its role);
                    # after it, this is an authenticated peer misbehaving, also when its first bad frame came in
                    # the same read as the end of its handshake.
                    reason = f"bad input from {self.peer_role or 'the peer'}: {e}" if self.open else str(e)
                    events += self._fail(reason)
                    return events
                if self.closed:
                    return events
                if got < want:
                    break
        return events

    def _read_target(self) -> memoryview | None:
        if self.state is not State.OPEN:
            return None
        if self.proto is not None:
            with self._plock:
                return self.proto.read_target()
        return self._codec.read_target() if self._codec is not None else None

    def _filled(self, n: int) -> list[Event]:
        if self.proto is not None:
            with self._plock:
                self.proto.filled(n)
        else:
            assert self._codec is not None
            self._codec.filled(n)
        return self._drain()

    def _feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.state is State.HANDSHAKE:
            out = self.hs.receive_data(data)
            if out:
                self._queue(out)
                with self._wlock:  # at once: the peer must get our proof even if we close right after
                    self._flush_some_locked()
            if not self.hs.done:
                return events
            self.peer_role = self.hs.peer_role
            self.state = State.OPEN
            self.last_heard = time.monotonic()
            if self._protocol is not None:
                with self._plock:
                    self.proto = self._protocol(self.hs)  # it takes the bytes pipelined after the proof
            else:
                self._codec = self.hs.session(max_payload=self._max_payload)  # takes the pipelined bytes
                if self._codec.error is not None:
                    raise self._codec.error
            events.append(Opened())
            return events + self._drain()
        if self.proto is not None:
            with self._plock:
                self.proto.receive_data(data)
        else:
            assert self._codec is not None
            self._codec.feed(data)
        return events + self._drain()

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            if self.proto is not None:
                with self._plock:
                    ev = self.proto.next_event()
            else:
                assert self._codec is not None
                ev = self._codec.next_message()
            if ev is None:
                return events
            self.last_heard = time.monotonic()
            if STREAM.active and isinstance(ev, Message):
                trace.received(self, ev)
            events.append(ev)
            if isinstance(ev, ConnectionClosed):
                return events
            if isinstance(ev, ErrorMessage) and self.proto is not None:
                # The peer gave up on this connection: the protocol side is in ERROR now, and so is the link.
                return events + self._fail(f"the {self.peer_role or 'peer'} gave up: {ev.reason}")

    def _eof(self) -> list[Event]:
        events: list[Event] = []
        if self.state is State.OPEN and self.proto is not None:
            try:
                with self._plock:
                    self.proto.receive_data(b"")
                events += self._drain()  # ends with ConnectionClosed: where the conversation was
            except ColoError:
                pass
        if self.state is State.HANDSHAKE:
            try:
                self.hs.receive_data(b"")  # it names the problem (a frame cut off, ...)
            except AuthError as e:
                return events + self._fail(str(e))
            return events + self._fail("connection closed during authentication")
        return events + self._fail("closed by peer")

    def _fail(self, reason: str) -> list[Event]:
        if self.closed:
            return []
        self._shut(reason)
        return [Closed(reason)]

    # -- any thread ---------------------------------------------------------------------------------------
    def send(self, msg: Message, *, block: float | None = None, flush: bool = True) -> bool:
        """Queue `msg` and write what the socket takes now. With `block` (seconds), wait until all of it is on the
        wire; False if the connection is gone, or (blocking) if it did not drain in time. ColoError if the protocol
        refuses to send `msg` now (a bug on our side). A state chunk's data that is a memoryview is written from
        where it is: the caller keeps it unchanged until it is written (send with `block`). `flush=False` only
        queues the frame, to go out with the next one sent (one system call, and one wake-up of the peer, for
        several frames); the caller sends (or flushes) again soon."""
        if not self.open:
            return False
        if self.gate is not None:
            self.gate(self, msg)  # step mode and slow motion (colo.gate): may wait here, in the sender's thread
            if not self.open:
                return False  # the link ended while the message waited: as if it had ended just before
        with self._wlock:
            if self.proto is not None:
                with self._plock:
                    parts = self.proto.send_parts(msg)
            else:
                assert self._codec is not None
                parts = self._codec.encode_parts(msg)  # under the write lock: frames leave in the order sealed
            if STREAM.active:
                trace.sent(self, msg, parts)  # before the bytes leave: a reply's event never precedes it
            for part in parts:
                self._queue(part)
            if not flush:
                return True
            ok = self._flush_some_locked()
        if not ok:
            self._shut(self.closed_reason or "connection error while sending")
            return False
        if self._out_bytes and self.on_change is not None:
            self.on_change()
        if block is not None and self._out_bytes:
            return self.flush(block)
        return True

    def try_heartbeat(self, msg: Message | None = None) -> None:
        """From the loop: a heartbeat, unless another thread is busy sending (its frames prove we live)."""
        if not self.open or self._out_bytes > (1 << 20):
            return
        if not self._wlock.acquire(blocking=False):
            return
        try:
            hb = msg or Heartbeat()
            if self.proto is not None:
                with self._plock:
                    frame = self.proto.send(hb)
            else:
                assert self._codec is not None
                frame = self._codec.encode(hb)
            self._queue(frame)
            ok = self._flush_some_locked()
        except ColoError:
            return  # a protocol in ERROR or CLOSED: the reader sees the end
        finally:
            self._wlock.release()
        if not ok:
            self._shut(self.closed_reason or "connection error while sending")

    def flush_now(self) -> bool:
        """Write what the socket takes now (frames queued with flush=False), without waiting; False when the
        connection failed."""
        if not self.open or not self._out_bytes:
            return self.open
        if not self._flush_some():  # (and a close_after_flush that was waiting for these bytes happens)
            self._shut(self.closed_reason or "connection error while sending")
            return False
        if self._out_bytes and self.on_change is not None:
            self.on_change()  # the rest when the socket takes it: the loop must watch for writability
        return True

    def flush(self, timeout: float, below: int = 0) -> bool:
        """Wait in this thread until everything queued is written, or all but `below` bytes (or `timeout` passes,
        or the connection ends)."""
        deadline = time.monotonic() + timeout
        while self._out_bytes > below and self.open:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                select.select([], [self.sock], [], min(left, 0.05))
            except (OSError, ValueError):
                return False
            with self._wlock:
                ok = self._flush_some_locked()
            if not ok:
                self._shut(self.closed_reason or "connection error while sending")
                return False
        return self.open

    def close(self, reason: str = "closed") -> None:
        """Close the connection (any thread). A loop-owned one keeps its file descriptor until `release`."""
        self._shut(reason)

    def release(self, reason: str = "closed") -> None:
        """The loop's thread, once the selector no longer holds the socket: close it and free its descriptor."""
        self._shut(reason)
        try:
            self.sock.close()
        except OSError:
            pass

    def close_after_flush(self, reason: str) -> None:
        """Close once what is queued is written (the loop calls `finish_close` when it is)."""
        self._close_after_flush = reason
        if not self._out_bytes:
            self._shut(reason)

    def finish_close(self) -> None:
        if self._close_after_flush and not self._out_bytes and not self.closed:
            self._shut(self._close_after_flush)

    # -- internals ----------------------------------------------------------------------------------------
    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            view = memoryview(data)
            self._out.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
            self._out_bytes += view.nbytes

    def _flush_some(self) -> bool:
        with self._wlock:
            ok = self._flush_some_locked()
        if ok:
            self.finish_close()
        return ok

    def _flush_some_locked(self) -> bool:
        """Write what the socket takes now. False when the connection failed."""
        while self._out:
            try:
                if len(self._out) == 1:
                    n = self.sock.send(self._out[0])
                else:  # several frames (or a frame's parts) in one system call
                    n = self.sock.sendmsg(list(itertools.islice(self._out, SENDMSG_PARTS)))
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                self.closed_reason = f"connection error: {e}"
                return False
            self._out_bytes -= n
            while n:
                head = self._out[0]
                if n >= len(head):
                    n -= len(head)
                    self._out.popleft()
                else:
                    self._out[0] = head[n:]
                    return True
        return True

    def _shut(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        if self._out_bytes and self._wlock.acquire(blocking=False):
            try:  # what is queued (a proof, a fence, an error) goes out if the socket takes it now
                self._flush_some_locked()
            finally:
                self._wlock.release()
        self.state = State.CLOSED
        self.closed_reason = self.closed_reason or reason
        if self.proto is not None:
            with self._plock:
                self.proto.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the peer learns it now, and so does the loop (a hang-up)
        except OSError:
            pass
        if self.loop_owned:
            if self.on_change is not None:
                self.on_change()  # wake the loop: it drops the link and releases the socket
            return
        try:
            self.sock.close()
        except OSError:
            pass


def connect_nonblocking(address: tuple[str, int]) -> socket.socket:
    """A socket whose connect to `address` is under way (finish it by waiting for writability)."""
    infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        sock.close()
        raise OSError(err, f"cannot connect to {address[0]}:{address[1]}: {errno.errorcode.get(err, err)}")
    return sock


# -- blocking helpers for one-shot clients (`colo status`, tests) ------------------------------------------------
def authenticate(sock: socket.socket, key: bytes, role: str, peer_role: str | Collection[str], *,
                 encrypt: bool = True) -> Handshake:
    """Run the handshake on a connected blocking socket; AuthError (or OSError) on failure."""
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


class Client:
    """A blocking request/reply connection: the control commands (`colo status`, `colo failover`) and tests."""

    def __init__(self, address: tuple[str, int], key: bytes, role: str = "control", peer_role: str = "gateway",
                 timeout: float = 5.0, encrypt: bool = True) -> None:
        self.sock = connect(address, timeout)
        try:
            self.hs = authenticate(self.sock, key, role, peer_role, encrypt=encrypt)
        except BaseException:
            self.sock.close()
            raise
        self._decoder = self.hs.session()
        self.timeout = timeout

    def send(self, msg: Message) -> None:
        self.sock.sendall(self._decoder.encode(msg))

    def receive(self, timeout: float | None = None) -> Message:
        """The next message (heartbeats skipped); ColoError when the peer closes or is silent too long."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                if isinstance(msg, Heartbeat):
                    continue
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise ColoError(f"no answer within {self.timeout if timeout is None else timeout:.0f} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                raise ColoError("the peer closed the connection")
            self._decoder.feed(data)

    def ask(self, msg: Message, reply: type[Message], timeout: float | None = None) -> Message:
        self.send(msg)
        while True:
            got = self.receive(timeout)
            if isinstance(got, reply):
                return got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
