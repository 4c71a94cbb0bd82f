"""The gateway process: one thread, one selector, around the witness (colo.witness), which decides everything.

It listens for nodes and control clients on one port and for the guest's clients on another; it runs every
handshake and every framed connection without blocking (colo.link), serves the clients with the code toyvm's
net bridge uses too (tcpclients), turns all of it into witness events, and carries out the witness's actions.
It imports nothing from toyvm: a gateway host needs no emulator.
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Any

from colo import durable, events, sched, trace
from colo.errors import ColoError
from colo.events import STREAM
from colo.link import Closed, Conn, Opened
from colo.messages import BATCH_BYTES, BATCH_EVENTS, Input, Inputs, Message, NodeHello, Output, Outputs
from colo.protocol import ConnectionClosed
from colo.witness import (
    AcceptClient,
    ClientBacklog,
    ClientClosed,
    ClientConnected,
    ClientData,
    CloseClient,
    CloseLink,
    ControlRequest,
    Exit,
    LinkClosed,
    ListenClients,
    NodeAttached,
    NodeMessage,
    PauseClient,
    Persist,
    Record,
    RefuseClient,
    ResumeClient,
    Send,
    Tick,
    ToClient,
    Witness,
    WitnessConfig,
)
from colo.witness import Event as WitnessEvent
from tcpclients import Backlog, ClientEvent, ClientTable, Connected, Data, Eof, Gone, listen_on

log = logging.getLogger("colo.gateway")
PEER_ROLES = ("primary", "secondary", "spare", "control")
NODE_ROLES = ("primary", "secondary", "spare")
EXIT_FLUSH = 2.0  # seconds the gateway waits for its last messages to leave before it exits
CLIENT_POLL = 0.1  # seconds between looks for clients past their timeouts (seconds long): not every turn


@dataclass
class GatewayConfig:
    key: bytes
    listen: tuple[str, int] = ("127.0.0.1", 0)  # nodes and control clients
    service: tuple[str, int] = ("127.0.0.1", 0)  # the guest's clients
    heartbeat_timeout: float = 0.8
    trace: bool = False
    mode: str = "periodic"  # "hybrid": both VMs run; their outputs are compared
    compare_timeout: float = 0.2
    credit: int = 16 << 10
    out_limit: int = 1 << 20
    slow_timeout: float = 30.0
    encrypt: bool = True  # every connection's frames encrypted as well as authenticated (colo.session)
    # What the witness must remember across a restart of the gateway (colo.durable); None: nothing survives one
    state_file: str | None = None


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        saved = durable.load(cfg.state_file) if cfg.state_file else None
        try:
            self.witness = Witness(WitnessConfig(mode=cfg.mode, heartbeat_timeout=cfg.heartbeat_timeout,
                                                 compare_timeout=cfg.compare_timeout, credit=cfg.credit,
                                                 durable=saved))
        except ValueError as e:
            raise ColoError(f"the gateway state {cfg.state_file}: {e}") from e
        if saved:
            log.info("gateway: read %s (copies voided by an earlier gateway: %s)", cfg.state_file,
                     ", ".join(sorted(self.witness.voids)) or "none")
        self.witness.trace = STREAM.active  # the event stream gets every output held, released, dropped
        trace.watch_witness(self.witness)
        STREAM.node = self.witness.id
        events.started()
        self.sel = selectors.DefaultSelector()
        self.listener = listen_on(cfg.listen, 64)
        self.listener.setblocking(False)
        self.listen_address: tuple[str, int] = self.listener.getsockname()[:2]
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        self.clients = ClientTable(self.sel, cfg.service, self._on_client, listening=False,
                                   out_limit=cfg.out_limit, slow_timeout=cfg.slow_timeout)
        self.service_address = self.clients.address
        self.witness.about = {"pid": os.getpid(), "listen": "%s:%d" % self.listen_address,
                              "service": "%s:%d" % self.service_address, "cpus": sched.cpus_label()}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.conns: dict[int, Conn] = {}  # every node and control connection, by link id
        self.attached: set[int] = set()  # node links that said hello (the witness knows them)
        self.control: set[int] = set()
        self._events: collections.deque[WitnessEvent] = collections.deque()
        # Links with frames queued this turn: written once at its end (one system call, and one wake-up of the
        # peer, for all the witness sent it in the turn, instead of one per message).
        self._unflushed: set[int] = set()
        # Inputs the witness sent a link this turn, not queued yet: they leave as one `inputs` frame (one seal, one
        # decode, one hand-over to the node's VM thread for all of them), before anything else sent after them.
        self._inputs: dict[int, list[Input]] = {}
        self._inputs_bytes: dict[int, int] = {}
        self._stopping = False
        self._exit_at: float | None = None
        self._next_client_poll = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """From a signal handler: leave at the next turn of the loop."""
        self._stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def run(self) -> None:
        try:
            self._do(Tick(time.monotonic(), time.time()))
            while not self._stopping:
                self._turn()
                if self._exit_at is not None and (time.monotonic() > self._exit_at or not self._flushing()):
                    break
        finally:
            self._close()

    def _flushing(self) -> bool:
        return any(c.queued and not c.closed for c in self.conns.values())

    def _close(self) -> None:
        for c in self.conns.values():
            c.release("the gateway stops")
        self.clients.close_all()
        self.listener.close()
        self.sel.close()

    # -- the loop -----------------------------------------------------------------------------------------
    def _turn(self) -> None:
        self._refresh_interest()
        ready = self.sel.select(timeout=self.cfg.heartbeat_timeout / 8)
        self._do(Tick(time.monotonic(), time.time()))
        for key, mask in ready:
            kind, what = key.data
            if kind == "listen":
                self._accept()
            elif kind == "wake":
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            elif kind == "conn":
                self._conn_ready(what, mask)
            else:  # the client table's sockets: (table, conn)
                kind.on_ready(what, mask)
            self._drain()
        now = time.monotonic()
        for link, c in list(self.conns.items()):
            if c.handshake_expired(now):
                self._conn_closed(link, f"authentication timed out after {now - c.started:.0f} s")
        if now >= self._next_client_poll:
            self._next_client_poll = now + CLIENT_POLL
            self.clients.poll(now)
        self._drain()
        self._flush_links()

    def _flush_links(self) -> None:
        while self._unflushed:
            link = self._unflushed.pop()
            c = self.conns.get(link)
            if c is not None and not (self._queue_inputs(link, c) and c.flush_now()):
                self._conn_closed(link, c.closed_reason or "send failed")

    def _queue_inputs(self, link: int, c: Conn) -> bool:
        """Queue the inputs held back for `link` (in order, ahead of what comes next); False if the link failed."""
        batch = self._inputs.pop(link, None)
        self._inputs_bytes.pop(link, None)
        if not batch:
            return True
        if len(batch) == 1:
            return c.send(batch[0], flush=False)
        # Each is an Input the witness built (and checked): regrouped, they need no second check.
        return c.send(Inputs.checked_already([[m.seq, m.kind, m.conn, m.data] for m in batch]), flush=False)

    def _refresh_interest(self) -> None:
        for link, c in list(self.conns.items()):
            if c.closed:  # closed once its last bytes were written (close_after_flush), or by a failed send
                self._conn_closed(link, c.closed_reason or "closed")
                continue
            events = c.interest()
            try:
                key = self.sel.get_key(c.sock)
                if key.events != events:
                    if events:
                        self.sel.modify(c.sock, events, ("conn", link))
                    else:
                        self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                if events and not c.closed:
                    self.sel.register(c.sock, events, ("conn", link))

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("gateway: cannot accept a connection: %s", e)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(sock, key=self.cfg.key, role="gateway", peer_role=PEER_ROLES, name=f"{peer[0]}:{peer[1]}",
                     encrypt=self.cfg.encrypt)
            c.loop_owned = True
            self.conns[c.id] = c

    def _conn_ready(self, link: int, mask: int) -> None:
        c = self.conns.get(link)
        if c is None:
            return
        for ev in c.on_ready(mask):
            if isinstance(ev, Opened):
                c.name = c.peer_role
                if c.peer_role == "control":
                    self.control.add(link)
            elif isinstance(ev, (Closed, ConnectionClosed)):
                self._conn_closed(link, getattr(ev, "reason", "connection closed"))
                return
            elif isinstance(ev, Message):
                self._message(link, c, ev)
        if c.closed:
            self._conn_closed(link, c.closed_reason)

    def _message(self, link: int, c: Conn, msg: Message) -> None:
        if link in self.control:
            self._events.append(ControlRequest(link, msg))
        elif link in self.attached:
            if isinstance(msg, Outputs):  # the witness takes them one by one, as if each had its own frame
                gen = msg.generation  # the frame's events were checked as it was decoded
                self._events.extend(NodeMessage(link, Output.checked_already(gen, *e)) for e in msg.events)
            else:
                self._events.append(NodeMessage(link, msg))
        elif isinstance(msg, NodeHello) and msg.role == c.peer_role:
            self.attached.add(link)
            c.name = f"{msg.role} {msg.node}"
            self._events.append(NodeAttached(link, msg))
        else:
            why = (f"authenticated as {c.peer_role} but says it is {msg.role}" if isinstance(msg, NodeHello)
                   else f"expected node-hello first, got {msg.NAME}")
            log.error("gateway: refused %s: %s", c.name, why)
            c.close(why)
            self._conn_closed(link, why)

    def _conn_closed(self, link: int, why: str) -> None:
        self._inputs.pop(link, None)
        self._inputs_bytes.pop(link, None)
        c = self.conns.pop(link, None)
        if c is None:
            return
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.release(why)
        if not c.authenticated:
            log.error("gateway: refused a connection from %s: %s", c.name, why)
        elif link not in self.attached and why.startswith("bad input"):
            log.error("gateway: dropped %s: %s", c.name, why)
        self.control.discard(link)
        if link in self.attached:
            self.attached.discard(link)
            self._events.append(LinkClosed(link, why))

    # -- clients --------------------------------------------------------------------------------------------
    def _on_client(self, ev: ClientEvent) -> None:
        if STREAM.active:
            self._trace_client(ev)
        if isinstance(ev, Connected):
            # The witness answers at once (the table needs adopt/refuse before its next event).
            self._run(ClientConnected(ev.token))
        elif isinstance(ev, Data):
            self._events.append(ClientData(ev.conn, ev.data))
        elif isinstance(ev, Eof):
            self._events.append(ClientClosed(ev.conn, gone=False))
        elif isinstance(ev, Gone):
            self._events.append(ClientClosed(ev.conn, gone=True))
        elif isinstance(ev, Backlog):
            self._events.append(ClientBacklog(ev.conn, ev.over))

    def _trace_client(self, ev: ClientEvent) -> None:
        if isinstance(ev, Data):
            trace.client("in", ev.conn, ev.data)
        elif isinstance(ev, (Eof, Gone)):
            trace.client("close", ev.conn, reason="the client closed" if isinstance(ev, Eof) else "gone")

    def _persist(self, state: dict[str, Any]) -> None:
        """Before the actions after it (they may release output that only this state keeps a restart from taking
        back): written and synced, in this thread, so nothing goes out first."""
        if self.cfg.state_file is None:
            return
        try:
            durable.save(self.cfg.state_file, state)
        except OSError as e:
            # Holding the output for good would stop the service; go on, and say what a restart would miss.
            log.error("gateway: cannot write %s (%s): a restarted gateway would not know the copies voided now",
                      self.cfg.state_file, e)

    # -- witness events and actions -----------------------------------------------------------------------
    def _do(self, ev: WitnessEvent) -> None:
        self._events.append(ev)
        self._drain()
        self._flush_links()

    def _drain(self) -> None:
        while self._events:
            self._run(self._events.popleft())

    def _run(self, ev: WitnessEvent) -> None:
        try:
            actions = self.witness.handle(ev)
        except Exception:  # the witness must outlive a bug in one event: log it loudly
            log.exception("gateway: the witness failed on %r", ev)
            return
        for a in actions:
            self._act(a)

    def _act(self, a: Any) -> None:
        if isinstance(a, Send):
            c = self.conns.get(a.link)
            if c is not None and isinstance(a.msg, Input):
                batch = self._inputs.setdefault(a.link, [])
                batch.append(a.msg)
                size = self._inputs_bytes[a.link] = self._inputs_bytes.get(a.link, 0) + len(a.msg.data)
                self._unflushed.add(a.link)
                if (size >= BATCH_BYTES or len(batch) >= BATCH_EVENTS) and not self._queue_inputs(a.link, c):
                    self._conn_closed(a.link, c.closed_reason or "send failed")
            elif c is not None:
                if not self._queue_inputs(a.link, c):
                    self._conn_closed(a.link, c.closed_reason or "send failed")
                elif c.send(a.msg, flush=False):
                    self._unflushed.add(a.link)  # written at the end of the turn (_flush_links)
                else:
                    self._conn_closed(a.link, c.closed_reason or "send failed")
        elif isinstance(a, ToClient):
            if STREAM.active:
                trace.client("out", a.conn, a.data, a.seq)
            self.clients.write(a.conn, a.data)
        elif isinstance(a, CloseClient):
            if STREAM.active:
                trace.client("close", a.conn, reason=a.reason)
            self.clients.close(a.conn)
        elif isinstance(a, AcceptClient):
            if STREAM.active:
                trace.client("open", a.conn)
            self.clients.adopt(a.token, a.conn)
        elif isinstance(a, RefuseClient):
            self.clients.refuse(a.token, a.reason)
        elif isinstance(a, PauseClient):
            self.clients.pause(a.conn)
        elif isinstance(a, ResumeClient):
            self.clients.resume(a.conn)
        elif isinstance(a, ListenClients):
            self.clients.set_listening(a.on)
        elif isinstance(a, CloseLink):
            c = self.conns.get(a.link)
            if c is not None:
                self._queue_inputs(a.link, c)  # what it was sent before goes first (a failure closes it anyway)
                c.close_after_flush(a.reason)
                if c.closed:
                    self._conn_closed(a.link, a.reason)
        elif isinstance(a, Record):
            if STREAM.active:
                trace.record(a.entry, a.level)
            if a.level == "trace":
                return  # for the event stream only
            level = {"warning": logging.WARNING, "error": logging.ERROR}.get(a.level, logging.INFO)
            entry = a.entry
            details = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("time", "event"))
            log.log(level, "gateway: %s%s", entry["event"], f" ({details})" if details else "")
        elif isinstance(a, Persist):
            self._persist(a.state)
        elif isinstance(a, Exit):
            log.info("gateway: %s: exiting", a.reason)  # an operator's shutdown: not a warning
            self.clients.set_listening(False)
            self._exit_at = time.monotonic() + EXIT_FLUSH
