"""A node's one I/O thread: every link, the heartbeats, liveness, and (re)connecting to the gateway.

The VM thread owns the VM and every decision; this thread owns the sockets. It hands the VM thread what happens as
(source, event) pairs on one queue: messages as they arrive (source: the `Conn`), `Silent`/`Heard` when a link goes
quiet past the heartbeat timeout or speaks again, `Closed` when it ends, `Opened` when a replication link is up,
and `Detached`/`Attached` for the gateway. The VM thread sends on a `Conn` itself (no hand-off on the checkpoint
path); anything that changes which sockets exist goes through `call()`, run by this thread.

A node never gives up on the gateway by itself: when the link ends it reconnects, again and again, with a
back-off; a gateway that is only silent (paused) keeps its link, and the node waits for it to speak again.
"""
from __future__ import annotations

import collections
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from colo.errors import ColoError
from colo.link import Closed, Conn, Event, Opened, ProtocolFactory, connect_nonblocking
from colo.messages import InitialChunk, Message, VmstateChunk
from tcpclients import listen_on

log = logging.getLogger("colo.node")
RECONNECT_MIN, RECONNECT_MAX = 0.05, 1.0  # seconds between attempts to reach the gateway
# State bytes (copy records, checkpoint chunks) read from the replication link and not yet taken by the VM thread:
# past this the link is not read until it catches up, so a fast primary waits in TCP instead of piling the copy
# up here (where the primary's final stop would wait for all of it to be applied).
BACKLOG_LIMIT = 8 << 20
STATE_CHUNKS = (InitialChunk, VmstateChunk)  # what counts against it
# Links are judged silent (or heard again) and handshakes timed out at most this often, not after every frame:
# the check is the thread's own work after it posted what it read, while the VM thread waits to run.
LIVENESS_EVERY = 0.005


class Silent:
    """Event: the link has been silent for more than the heartbeat timeout."""

    def __repr__(self) -> str:
        return "Silent()"


class Heard:
    """Event: a link that was silent speaks again."""

    def __repr__(self) -> str:
        return "Heard()"


class Detached:
    """Event (source "gateway"): the gateway link ended; the node is reconnecting."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Detached({self.reason!r})"


class Attached:
    """Event (source "gateway"): a gateway link is up and the node's hello is sent on it."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def __repr__(self) -> str:
        return f"Attached({self.conn!r})"


class Report:
    """Base of the events a node's own threads post for its VM thread (e.g. the checkpoint sender's)."""


NodeEvent = Event | Silent | Heard | Detached | Attached | Report
Source = Conn | str


class NodeIO:
    def __init__(self, *, key: bytes, gateway: tuple[str, int], role: Callable[[], str], heartbeat_timeout: float,
                 hello: Callable[[], Message], status: Callable[[], Message],
                 on_message: Callable[[Source, Any], None] | None = None, encrypt: bool = True) -> None:
        self.key = key
        self.encrypt = encrypt
        self.gateway_address = gateway
        self.role = role
        self.timeout = heartbeat_timeout
        self.interval = heartbeat_timeout / 4
        self.hello, self.status = hello, status
        self.gate: Any = None  # colo.gate.Gate: holds handshake messages in step mode (set by the node)
        self.on_message = on_message  # called in this thread before the event is queued (e.g. stop the VM now)
        # Called in this thread with each message of the replication link; True: it was taken care of here and is
        # not queued (the secondary stages a checkpoint's chunks as they arrive, without waking its VM thread).
        self.repl_sink: Callable[[Message], bool] | None = None
        self.inbox: queue.Queue[tuple[Source, NodeEvent]] = queue.Queue()
        self.backlog = 0  # state bytes in the inbox (BACKLOG_LIMIT); changed under _backlog_lock
        self._backlog_lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.gateway: Conn | None = None  # the current gateway link, once authenticated
        self.repl: Conn | None = None  # the replication link, once authenticated
        self._gw_conn: Conn | None = None  # the gateway link being set up or open
        self._conns: set[Conn] = set()
        self._listener: socket.socket | None = None
        self._repl_factory: ProtocolFactory | None = None  # how an accepted primary's link checks its messages
        self._calls: collections.deque[Callable[[], None]] = collections.deque()  # run by this thread, in order
        self._watched: dict[Conn, int] = {}  # the events the selector watches for each link, as last set
        self._last_liveness = 0.0
        self._silent: set[Conn] = set()
        self._next_connect = 0.0
        self._backoff = RECONNECT_MIN
        self._last_beat = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-io", daemon=True)

    # -- the VM thread's calls ------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._thread.is_alive() or self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: float = 0.5) -> None:
        """Stop after writing what is queued (at most `flush` seconds)."""
        deadline = time.monotonic() + flush
        while time.monotonic() < deadline and any(c.queued and c.open for c in list(self._conns)):
            time.sleep(0.01)
        self._stop.set()
        self.wake()
        self._thread.join(2.0)

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the I/O thread (anything that adds or removes sockets)."""
        self._calls.append(fn)
        self.wake()

    def send_gateway(self, msg: Message, block: float | None = None, flush: bool = True) -> bool:
        gw = self.gateway
        return gw is not None and gw.send(msg, block=block, flush=flush)

    def flush_gateway(self) -> None:
        """Write what was queued for the gateway with flush=False."""
        gw = self.gateway
        if gw is not None:
            gw.flush_now()

    def listen(self, address: tuple[str, int], factory: ProtocolFactory) -> tuple[str, int]:
        """Accept primaries on `address` (a secondary); returns the address bound."""
        sock = listen_on(address, 8)
        sock.setblocking(False)
        self._repl_factory = factory
        self._listener = sock
        def register() -> None:
            self.sel.register(sock, selectors.EVENT_READ, "listen")
        self.call(register)
        bound: tuple[str, int] = sock.getsockname()[:2]
        return bound

    def connect_repl(self, address: tuple[str, int], factory: ProtocolFactory) -> None:
        """Open the replication link to a secondary (a primary): (conn, Opened) or (conn, Closed) follows."""
        def go() -> None:
            try:
                sock = connect_nonblocking(address)
            except OSError as e:
                self.inbox.put(("repl", Closed(f"cannot connect to {address[0]}:{address[1]}: {e}")))
                return
            c = Conn(sock, key=self.key, role="primary", peer_role="secondary", name="secondary", connecting=True,
                     protocol=factory, encrypt=self.encrypt)
            self._add(c)
        self.call(go)

    def close_repl(self, reason: str) -> None:
        repl = self.repl
        self.repl = None
        if repl is not None:
            self.call(lambda: self._drop(repl, reason, tell=False))

    # -- the thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        except Exception:
            log.exception("node: the I/O thread failed")
            self.inbox.put(("gateway", Detached("the I/O thread failed")))
            self.inbox.put(("io", Closed("the I/O thread failed")))
        finally:
            for c in list(self._conns):
                c.release("the node stops")
            if self._listener is not None:
                self._listener.close()

    def _turn(self) -> None:
        while self._calls:
            self._calls.popleft()()
        now = time.monotonic()
        if self._gw_conn is None and now >= self._next_connect:
            self._connect_gateway()
        repl = self.repl
        if repl is not None:
            repl.read_paused = self.backlog > BACKLOG_LIMIT
        for c in list(self._conns):
            if c.closed:
                self._closed_elsewhere(c)
                continue
            events = c.interest()
            if self._watched.get(c) == events:
                continue  # as the selector has it: no need to ask (this runs on every turn, the relay's too)
            try:
                key = self.sel.get_key(c.sock)
                if key.events != events:
                    self.sel.modify(c.sock, events, c) if events else self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                if events and not c.closed:
                    self.sel.register(c.sock, events, c)
            except OSError:  # the VM thread closed it meanwhile (EBADF): it is gone, not a reason to stop
                self._drop(c, c.closed_reason or "closed")
                continue
            self._watched[c] = events
        wait = max(0.0, min(self.interval / 2, self._next_connect - now if self._gw_conn is None else 1.0))
        for key, mask in self.sel.select(wait):
            if key.data is None:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            elif key.data == "listen":
                self._accept()
            else:
                self._serve(key.data, mask)
        now = time.monotonic()
        if now - self._last_liveness < LIVENESS_EVERY:
            return  # a frame just woke us: the VM thread, on the same CPU maybe, is waiting for it
        self._last_liveness = now
        for c in list(self._conns):
            if c.handshake_expired(now):
                self._drop(c, "authentication timed out")
            elif c.open:
                if c.read_paused:
                    c.last_heard = now  # we do not read it (flow control): its silence is not its own
                silent = now - c.last_heard > self.timeout
                if silent and self.gate is not None and self.gate.holding:
                    silent, c.last_heard = False, now  # step mode: nobody is judged by the time it waits
                if silent and c not in self._silent:
                    self._silent.add(c)
                    self._post(c, Silent())
                elif not silent and c in self._silent:
                    self._silent.discard(c)
                    self._post(c, Heard())
        if now - self._last_beat >= self.interval:
            self._last_beat = now
            gw = self.gateway
            if gw is not None:
                try:
                    gw.try_heartbeat(self.status())
                except ColoError:
                    pass
            if self.repl is not None:
                self.repl.try_heartbeat()

    def _serve(self, c: Conn, mask: int) -> None:
        for ev in c.on_ready(mask):
            if isinstance(ev, Opened):
                self._opened(c)
            elif isinstance(ev, Closed):
                self._drop(c, ev.reason)
                return
            else:
                if isinstance(ev, Message) and self.on_message is not None:
                    self.on_message(self._source(c), ev)
                sink = self.repl_sink
                if c is self.repl and sink is not None and isinstance(ev, Message) and self._sunk(sink, ev):
                    continue
                self._post(c, ev)
        if c.closed:
            self._closed_elsewhere(c)

    def _closed_elsewhere(self, c: Conn) -> None:
        """Closed by another thread (a failed send), not by what we read: the link ends here, as if it had been
        read. Told only for the current replication link: one the VM thread let go of is old news to it."""
        self._drop(c, c.closed_reason or "closed", tell=c is self.repl)

    @staticmethod
    def _sunk(sink: Callable[[Message], bool], msg: Message) -> bool:
        try:
            return sink(msg)
        except Exception:  # a bug there must not kill this thread: the VM thread gets the message
            log.exception("node: handling %s in the I/O thread failed", msg.NAME)
            return False

    def _source(self, c: Conn) -> Source:
        return "gateway" if c is self._gw_conn else c

    def _post(self, c: Conn, ev: NodeEvent) -> None:
        # Tagged here, not judged by the VM thread later: by then the link may be gone (a shutdown message read
        # just before the gateway closed must still count as the gateway's).
        if isinstance(ev, STATE_CHUNKS):
            with self._backlog_lock:
                self.backlog += len(ev.data)
        self.inbox.put(("gateway" if c is self._gw_conn else c, ev))

    def taken(self, ev: NodeEvent) -> None:
        """The VM thread took `ev` from the inbox: a state chunk no longer counts against the backlog."""
        if isinstance(ev, STATE_CHUNKS):
            with self._backlog_lock:
                self.backlog -= len(ev.data)
                resume = self.repl is not None and self.repl.read_paused and self.backlog <= BACKLOG_LIMIT
            if resume:
                self.wake()

    def _add(self, c: Conn) -> None:
        self._conns.add(c)
        c.on_change = self.wake
        c.loop_owned = True
        c.gate = self.gate
        try:
            self.sel.register(c.sock, c.interest(), c)
        except (KeyError, ValueError):
            pass

    def _opened(self, c: Conn) -> None:
        if c is self._gw_conn:
            self.gateway = c
            self._backoff = RECONNECT_MIN
            c.send(self.hello())  # first, before anything the VM thread may send
            self.inbox.put(("gateway", Attached(c)))
        elif c.peer_role == "secondary":  # our outgoing replication link
            self.repl = c
            self._post(c, Opened())
        elif self.repl is not None and self.repl.open:
            log.error("secondary: refused a second primary: one is already attached")
            self._drop(c, "a primary is already attached", tell=False)
        else:
            self.repl = c
            self._post(c, Opened())

    def _drop(self, c: Conn, reason: str, tell: bool = True) -> None:
        if c not in self._conns:
            return
        self._conns.discard(c)
        self._watched.pop(c, None)
        self._silent.discard(c)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        was_open = c.open
        c.release(reason)
        if c.peer_role != "secondary" and c is not self._gw_conn and not c.authenticated:
            log.error("secondary: refused a connection from %s: %s", c.name, reason)
        elif was_open and reason.startswith("bad input"):
            log.error("%s: %s", self.role(), reason)
        if c is self._gw_conn:
            self._gw_conn = None
            if self.gateway is c:
                self.gateway = None
            self._next_connect = time.monotonic() + self._backoff
            self._backoff = min(RECONNECT_MAX, self._backoff * 2)
            if was_open or c.hs.done:
                self.inbox.put(("gateway", Detached(reason)))
            return
        if c is self.repl:
            self.repl = None
        if tell and (was_open or c.hs.done or c.peer_role == "secondary"):
            self._post(c, Closed(reason))

    def _connect_gateway(self) -> None:
        try:
            sock = connect_nonblocking(self.gateway_address)
        except OSError as e:
            log.debug("node: cannot reach the gateway: %s", e)
            self._next_connect = time.monotonic() + self._backoff
            self._backoff = min(RECONNECT_MAX, self._backoff * 2)
            return
        c = Conn(sock, key=self.key, role=self.role(), peer_role="gateway", name="gateway", connecting=True,
                 encrypt=self.encrypt)
        self._gw_conn = c
        self._add(c)

    def _accept(self) -> None:
        assert self._listener is not None and self._repl_factory is not None
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("secondary: cannot accept: %s", e)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._add(Conn(sock, key=self.key, role="secondary", peer_role="primary", name=f"{peer[0]}:{peer[1]}",
                           protocol=self._repl_factory, encrypt=self.encrypt))
