"""The gateway: the network as clients see it, and the witness that decides which node is active.

It owns the client TCP sockets and numbers every input event (open, data, close) in one sequence; it logs
inputs since the last committed checkpoint and forwards them to the active node; it holds the active node's
output until a checkpoint covering it is complete (output commit), then releases it in order. When the primary
is lost it fences it and promotes the secondary, which reports what its state covers: the gateway releases held
output up to that point, drops the rest (the secondary will produce it again) and replays the logged inputs the
restored VM has not seen. Clients keep their TCP connections throughout.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from colo.compare import Action, NeedCheckpoint, OutputComparer, Release, ReleaseClose
from colo.errors import AuthError, ColoError
from colo.link import Closed, Event, Link, Tracer, authenticate
from colo.messages import (
    CheckpointNow,
    CommandResult,
    Commit,
    FailoverCommand,
    FailoverRequest,
    Fence,
    Heartbeat,
    Input,
    Message,
    NodeHello,
    NodeStatus,
    Output,
    Promote,
    Promoted,
    Protection,
    ProtectionState,
    StatusReply,
    StatusRequest,
    Trigger,
)
from colo.node import DEFAULT_HEARTBEAT_TIMEOUT
from colo.protocol import ConnectionClosed
from toyvm.devices.net import CLOSE, DATA, OPEN

log = logging.getLogger("colo.gateway")
READ_CHUNK = 64 << 10
MAX_LOG_BYTES = 64 << 20  # unacknowledged input the gateway holds before it stops reading clients
PEER_ROLES = ("primary", "secondary", "control")
COMPARE_TIMEOUT = 0.2  # hybrid: output unmatched this long (s) triggers a checkpoint
MAX_PENDING = 1 << 20  # hybrid: held bytes per connection and side before a checkpoint is forced


class WakingQueue(queue.Queue[tuple[Link, Event]]):
    """A queue whose put() also wakes the gateway's selector, so link events are handled at once."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: tuple[Link, Event], block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        try:
            self._wake.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the selector is awake anyway


@dataclass
class Client:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False


@dataclass
class GatewayConfig:
    key: bytes
    listen: tuple[str, int] = ("127.0.0.1", 0)  # nodes and control clients
    service: tuple[str, int] = ("127.0.0.1", 0)  # the guest's clients
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    trace: bool = False
    max_log_bytes: int = MAX_LOG_BYTES
    mode: str = "periodic"  # "hybrid": both VMs run; their outputs are compared
    compare_timeout: float = COMPARE_TIMEOUT
    max_pending: int = MAX_PENDING


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.tracer = Tracer("gateway") if cfg.trace else None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.inbox = WakingQueue(self._wake_w)
        self.listener = socket.create_server(cfg.listen, backlog=16)
        self.service = socket.create_server(cfg.service, backlog=512)
        self.service.setblocking(False)
        self.listen_address = self.listener.getsockname()[:2]
        self.service_address = self.service.getsockname()[:2]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.service, selectors.EVENT_READ, "service")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.clients: dict[int, Client] = {}
        self.next_conn = 1
        self.input_seq = 0
        self.log: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self.log_bytes = 0
        self.reading = True
        self.held: dict[int, tuple[int, int, bytes]] = {}
        self.released_seq = 0
        self.nodes: dict[str, Link] = {}
        self.node_info: dict[str, dict[str, Any]] = {}
        self.active: Link | None = None
        self.protected = False
        self.promoting: Link | None = None
        self.failover_requested_at: float | None = None
        self.failover_started: float | None = None
        self.events: list[dict[str, Any]] = []  # failovers, fencing: shown by `colo status`
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        self.hybrid = cfg.mode == "hybrid"
        self.comparer = OutputComparer(timeout=cfg.compare_timeout, max_pending=cfg.max_pending)
        self.mirror: Link | None = None  # hybrid: the secondary, once it runs a copy of the VM
        self.synced_epoch = -1  # hybrid: the checkpoint the secondary said it loaded last
        self.primary_committed = 0  # the last checkpoint the primary said is complete
        self.sec_queue: collections.deque[Message] = collections.deque()
        self.checkpoint_asked = False

    # -- lifecycle ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def run(self) -> None:
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
        try:
            while not self._stop.is_set():
                self._step()
        finally:
            for link in list(self.nodes.values()):
                link.close()
            for c in self.clients.values():
                c.sock.close()
            self.listener.close()
            self.service.close()
            self.sel.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._authenticate, args=(sock, peer), daemon=True).start()

    def _authenticate(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hs = authenticate(sock, self.cfg.key, "gateway", PEER_ROLES)
        except (AuthError, ColoError, OSError) as e:
            log.error("gateway: refused a connection from %s:%d: %s", peer[0], peer[1], e)
            sock.close()
            return
        Link(sock, hs, name=hs.peer_role, tracer=self.tracer, inbox=self.inbox)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _step(self) -> None:
        for key, mask in self.sel.select(timeout=self.cfg.heartbeat_timeout / 8):
            if key.data == "wake":
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif key.data == "service":
                self._accept_clients()
            else:
                self._client_io(key.data, mask)
        while True:
            try:
                link, ev = self.inbox.get_nowait()
            except queue.Empty:
                break
            try:
                self._on_link_event(link, ev)
            except Exception:  # noqa: BLE001 - the witness must outlive any one bad event: log it, drop the link
                log.exception("gateway: error handling %r from the %s: dropping that connection", ev, link.name)
                self._node_lost(link, "error while handling its message")
        self._check_liveness()
        now = time.monotonic()
        if self._comparing():
            self._act(self.comparer.poll(now))
        if now - self._last_heartbeat >= self.cfg.heartbeat_timeout / 4:
            self._last_heartbeat = now
            for link in list(self.nodes.values()):
                link.try_send(Heartbeat())

    # -- clients ----------------------------------------------------------------------------------------------
    def _accept_clients(self) -> None:
        while True:
            try:
                sock, _ = self.service.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.next_conn
            self.next_conn += 1
            self.clients[conn] = Client(sock)
            if self.reading:
                self.sel.register(sock, selectors.EVENT_READ, conn)
            self._input(OPEN, conn)

    def _client_io(self, conn: int, mask: int) -> None:
        c = self.clients.get(conn)
        if c is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn, c)
        if mask & selectors.EVENT_READ and conn in self.clients and self.reading:
            try:
                data = c.sock.recv(READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self._input(DATA, conn, data)
            else:
                self._drop_client(conn)
                self._input(CLOSE, conn)

    def _flush(self, conn: int, c: Client) -> None:
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except BlockingIOError:
                pass
            except OSError:
                self._drop_client(conn)
                self._input(CLOSE, conn)
                return
        if c.closing and not c.out:
            self._drop_client(conn)
            return
        events = (selectors.EVENT_READ if self.reading else 0) | (selectors.EVENT_WRITE if c.out else 0)
        self._set_interest(c.sock, events, conn)

    def _set_interest(self, sock: socket.socket, events: int, conn: int) -> None:
        if events:
            try:
                self.sel.modify(sock, events, conn)
            except KeyError:
                self.sel.register(sock, events, conn)
        else:
            try:
                self.sel.unregister(sock)
            except KeyError:
                pass

    def _drop_client(self, conn: int) -> None:
        c = self.clients.pop(conn, None)
        if c is not None:
            self._set_interest(c.sock, 0, conn)
            c.sock.close()

    # -- inputs ---------------------------------------------------------------------------------------------
    def _input(self, kind: int, conn: int, data: bytes = b"") -> None:
        self.input_seq += 1
        ev = (self.input_seq, kind, conn, data)
        if self._logging():
            self.log.append(ev)  # kept until a checkpoint covers it: a failover replays it
            self.log_bytes += len(data)
            if self.log_bytes > self.cfg.max_log_bytes and self.reading:
                self._set_reading(False)  # push back on the clients: nothing is dropped
        if self.active is not None and self.promoting is None:
            self._send_input(self.active, ev)
            if self.mirror is not None:
                self._send_input(self.mirror, ev)  # hybrid: the secondary runs on the same inputs

    def _logging(self) -> bool:
        """Inputs are logged whenever a failover could need them: while a secondary exists or may take over."""
        return (self.protected or "secondary" in self.nodes or self.active is None
                or self.promoting is not None)

    def _send_input(self, link: Link, ev: tuple[int, int, int, bytes]) -> None:
        if not link.try_send(Input(*ev)):
            self._node_lost(link, "send failed")

    def _set_reading(self, on: bool) -> None:
        self.reading = on
        for conn, c in self.clients.items():
            self._set_interest(c.sock, (selectors.EVENT_READ if on else 0) |
                               (selectors.EVENT_WRITE if c.out else 0), conn)

    def _trim_log(self, upto: int) -> None:
        while self.log and self.log[0][0] <= upto:
            self.log_bytes -= len(self.log.popleft()[3])
        if not self.reading and self.log_bytes <= self.cfg.max_log_bytes // 2:
            self._set_reading(True)

    # -- outputs -----------------------------------------------------------------------------------------------
    def _output(self, ev: Output) -> None:
        if self._comparing():
            self._act(self.comparer.primary_output(ev.seq, ev.kind, ev.conn, ev.data, time.monotonic()))
            self.released_seq = max(self.released_seq, self.comparer.released_seq)
            return
        if ev.seq <= self.released_seq or ev.seq in self.held:
            return  # already released (a promoted secondary repeating itself) or already held
        if self.protected:
            self.held[ev.seq] = (ev.kind, ev.conn, ev.data)
        else:
            self._release(ev.seq, ev.kind, ev.conn, ev.data)

    def _comparing(self) -> bool:
        """Hybrid mode with a running secondary: outputs are released when both VMs produced them."""
        return self.hybrid and self.mirror is not None

    def _act(self, actions: list[Action]) -> None:
        if actions:
            self.released_seq = max(self.released_seq, self.comparer.released_seq)
        for a in actions:
            if isinstance(a, Release):
                self._to_client(a.conn, DATA, a.data)
            elif isinstance(a, ReleaseClose):
                self._to_client(a.conn, CLOSE, b"")
            elif isinstance(a, NeedCheckpoint) and self.active is not None and not self.checkpoint_asked:
                self.checkpoint_asked = True
                self._record("checkpoint-asked", trigger=str(a.trigger), reason=a.reason)
                self.active.try_send(CheckpointNow(Trigger(a.trigger)))

    def _release_upto(self, seq: int) -> None:
        for s in sorted(k for k in self.held if k <= seq):
            kind, conn, data = self.held.pop(s)
            self._release(s, kind, conn, data)

    def _release(self, seq: int, kind: int, conn: int, data: bytes) -> None:
        self.released_seq = max(self.released_seq, seq)
        self._to_client(conn, kind, data)

    def _to_client(self, conn: int, kind: int, data: bytes) -> None:
        c = self.clients.get(conn)
        if c is None:
            return  # the client is gone
        if kind == DATA:
            c.out += data
        elif kind == CLOSE:
            c.closing = True
        self._flush(conn, c)

    # -- node links ------------------------------------------------------------------------------------------
    def _on_link_event(self, link: Link, ev: Event) -> None:
        if isinstance(ev, (Closed, ConnectionClosed)):
            self._node_lost(link, getattr(ev, "reason", "connection closed"))
            return
        if link.peer_role == "control":
            self._on_control(link, ev)
            return
        role = link.peer_role
        if isinstance(ev, NodeHello):
            self._on_hello(link, ev)
        elif self.nodes.get(role) is not link:
            return  # a fenced or refused node: ignore it
        elif isinstance(ev, NodeStatus):
            self.node_info[role] = dict(ev.info)
        elif self.hybrid and role == "secondary" and isinstance(ev, (Output, Commit, Promoted)):
            self.sec_queue.append(ev)  # in order: a resync marker may have to wait for the primary's commit
            self._drain_secondary(link)
        elif isinstance(ev, Output) and link is self.active:
            self._output(ev)
        elif isinstance(ev, Commit) and link is self.active:
            self.primary_committed = ev.epoch
            if self._comparing():
                self._act(self.comparer.checkpoint_committed(ev.output_seq))
                self.released_seq = max(self.released_seq, self.comparer.released_seq)
                self.checkpoint_asked = False
            self._release_upto(ev.output_seq)
            self._trim_log(ev.input_seq)
            sec = self.nodes.get("secondary")
            if self.hybrid and sec is not None:
                self._drain_secondary(sec)
        elif isinstance(ev, Protection) and link is self.active:
            self.protected = ev.state == ProtectionState.PROTECTED
            if not self.protected:
                self._unprotected()
            self._record("protected" if self.protected else "unprotected", role=role)
        elif isinstance(ev, FailoverRequest) and role == "secondary":
            self._record("failover-request", reason=ev.reason)
            if self.failover_requested_at is None:
                self.failover_requested_at = time.monotonic()
        elif isinstance(ev, Promoted) and link is self.promoting:
            self._on_promoted(link, ev)  # periodic mode (hybrid: through the secondary's queue)
        elif isinstance(ev, Heartbeat):
            pass
        else:
            log.warning("gateway: unexpected %r from the %s", ev, role)

    def _drain_secondary(self, link: Link) -> None:
        """Hybrid: handle the secondary's events in order. Its marker "I loaded checkpoint E" (a commit from the
        secondary) waits until the primary's commit of E has been handled: output it sends after the marker
        belongs to the new state and must not be dropped with the old."""
        while self.sec_queue:
            ev = self.sec_queue[0]
            if isinstance(ev, Commit) and 0 < ev.epoch and ev.epoch > self.primary_committed:
                promoted = next((e for e in self.sec_queue if isinstance(e, Promoted)), None)
                if self.promoting is None or promoted is None:
                    return  # wait for the primary's commit of this epoch (or for the promotion report)
                # The primary died before committing E, but the secondary holds E: clients must see exactly
                # the primary's output up to E (the primary never ran past E: it resumes after the commit).
                self.sec_queue.popleft()
                self._act(self.comparer.failover_rollback(ev.output_seq, promoted.events))
                self.mirror = None
                continue
            self.sec_queue.popleft()
            if isinstance(ev, Commit):
                self._secondary_synced(link, ev)
            elif isinstance(ev, Promoted):
                if link is self.promoting:
                    self._on_promoted(link, ev)
            elif not isinstance(ev, Output):
                continue
            elif (self._comparing() and link is self.mirror) or (
                    self.comparer.failed_over and link in (self.active, self.promoting)):
                # Compared with the primary's; after a failover the comparer passes the survivor's output
                # straight through (its output numbers are its own, not the primary's).
                self._act(self.comparer.secondary_output(ev.kind, ev.conn, ev.data, time.monotonic()))
            elif link is self.active:
                self._output(ev)

    def _secondary_synced(self, link: Link, ev: Commit) -> None:
        """Hybrid: the secondary's VM now equals checkpoint `epoch`. Its earlier output is from a run that no
        longer exists; it needs every input after input_seq (the first time: it starts receiving inputs)."""
        self.synced_epoch = ev.epoch
        if ev.epoch > 0:
            self.comparer.secondary_resynced()
        first = self.mirror is not link
        self.mirror = link
        for logged in self.log:
            if logged[0] > ev.input_seq:
                self._send_input(link, logged)
        if first:
            self._record("mirroring", role="secondary", epoch=ev.epoch, input_seq=ev.input_seq)
            held, self.held = self.held, {}
            for seq in sorted(held):  # the primary's output since the copy: the secondary will produce it too
                kind, conn, data = held[seq]
                self._act(self.comparer.primary_output(seq, kind, conn, data, time.monotonic()))

    def _stop_comparing(self) -> None:
        """Hybrid, the secondary is gone: the primary's output the comparer holds may go now; compare no more."""
        if self._comparing() and not self.comparer.failed_over:
            self._act(self.comparer.checkpoint_committed(self.comparer.last_primary_seq))
        self.mirror = None

    def _unprotected(self) -> None:
        """The active node goes on alone: release everything held, stop comparing and mirroring."""
        self._stop_comparing()
        self._release_upto(1 << 62)
        if "secondary" not in self.nodes:
            self._trim_log(1 << 62)

    def _on_hello(self, link: Link, ev: NodeHello) -> None:
        role = link.peer_role
        if ev.role != role:
            link.try_send(Fence(f"authenticated as {role} but says it is {ev.role}"))
            link.close()
            return
        if role in self.nodes and not self.nodes[role].closed:
            link.try_send(Fence(f"a {role} is already attached"))
            link.close()
            return
        if role == "primary" and (self.active is not None or self.promoting is not None):
            link.try_send(Fence("another node is active: a new primary would split the brain"))
            link.close()
            return
        self.nodes[role] = link
        self.node_info[role] = dict(ev.info)
        self._record("attached", role=role, pid=ev.info.get("pid"))
        if role == "primary":
            self.active = link
            for logged in self.log:  # inputs that came before any node: the new VM has seen none
                self._send_input(link, logged)

    def _node_lost(self, link: Link, why: str) -> None:
        role = link.peer_role
        if self.nodes.get(role) is not link:
            link.close()
            return
        del self.nodes[role]
        link.close()
        self._record("lost", role=role, reason=why)
        if link is self.active:
            self._active_lost(why)
        elif link is self.promoting:
            self.promoting = None
            self.active = None
            log.error("gateway: the secondary died while taking over: the service is down")
        elif role == "secondary":
            self.failover_requested_at = None
            if link is self.mirror:
                self._stop_comparing()  # held replies of the primary must not wait for a peer that is gone
            if not self.protected:
                self._trim_log(1 << 62)

    def _active_lost(self, why: str) -> None:
        self.active = None
        sec = self.nodes.get("secondary")
        if self.protected and sec is not None and not sec.closed:
            self._promote(sec, f"the primary was lost: {why}")
        else:
            log.warning("gateway: the active node is gone (%s) and no ready secondary can take over: the service "
                        "waits for a node", why)
            if sec is not None:  # it holds no state it may serve from: let it go instead of waiting forever
                self._fence(sec, "the primary is gone and was not protected: there is nothing to take over")

    def _promote(self, sec: Link, why: str) -> None:
        self.failover_started = time.monotonic()
        self.promoting = sec
        self._record("promote", role="secondary", reason=why)
        if not sec.try_send(Promote(why)):
            self._node_lost(sec, "send failed")

    def _fence(self, link: Link, why: str) -> None:
        link.try_send(Fence(why))
        self._record("fenced", role=link.peer_role, reason=why)
        self.nodes.pop(link.peer_role, None)
        link.close()

    def _on_promoted(self, link: Link, ev: Promoted) -> None:
        if self.hybrid and self.mirror is None and self.comparer.failed_over:
            pass  # already rolled back to the checkpoint it holds (see _drain_secondary)
        elif self.hybrid and self.mirror is link:
            if ev.epoch > self.synced_epoch:
                # It loaded a checkpoint that arrived complete as the primary died: clients must see exactly
                # the primary's output up to that checkpoint, nothing of either VM beyond it.
                self._act(self.comparer.failover_rollback(ev.output_seq, ev.events))
            else:
                # It goes on from its own running state, which produced everything clients saw: release the
                # output it has that the comparer still holds.
                self._act(self.comparer.failover_continue())
            self.mirror = None
        else:
            # Outputs the surviving state covers: fill in any we never got, release them all, in order.
            for seq, kind, conn, data in ev.events:
                if seq > self.released_seq and seq <= ev.output_seq and seq not in self.held:
                    self.held[seq] = (kind, conn, data)
            self._release_upto(ev.output_seq)
        self.held.clear()  # beyond the checkpoint: never seen by a client; the secondary will redo it
        self.promoting = None
        self.active = link
        self.protected = False
        replay = [e for e in self.log if e[0] > ev.input_seq]
        for logged in replay:
            self._send_input(link, logged)
        self.log.clear()
        self.log_bytes = 0
        if not self.reading:
            self._set_reading(True)
        took = (time.monotonic() - self.failover_started) * 1e3 if self.failover_started else 0.0
        self.failover_requested_at = None
        self._record("promoted", role="secondary", epoch=ev.epoch, replayed=len(replay),
                     failover_ms=round(took, 1))
        log.warning("gateway: failover complete in %.1f ms: secondary active from checkpoint %d, %d inputs "
                    "replayed", took, ev.epoch, len(replay))

    def _check_liveness(self) -> None:
        timeout = self.cfg.heartbeat_timeout
        for role, link in list(self.nodes.items()):
            if not link.alive(timeout):
                self._node_lost(link, f"silent for more than {timeout} s")
        if self.failover_requested_at is not None:
            primary = self.nodes.get("primary")
            if primary is None:
                self.failover_requested_at = None
            elif time.monotonic() - self.failover_requested_at > 2 * timeout:
                # We still hear the primary: the secondary lost only its own link. It must not take over.
                sec = self.nodes.get("secondary")
                if sec is not None:
                    self._fence(sec, "the gateway still hears the primary")
                self.failover_requested_at = None

    # -- control ------------------------------------------------------------------------------------------------
    def _on_control(self, link: Link, ev: Event) -> None:
        if isinstance(ev, StatusRequest):
            link.try_send(StatusReply(self.status()))
        elif isinstance(ev, FailoverCommand):
            ok, why = self.manual_failover(ev.reason)
            link.try_send(CommandResult(ok, why))
        elif not isinstance(ev, Heartbeat):
            link.try_send(CommandResult(False, f"unexpected {type(ev).__name__}"))

    def manual_failover(self, reason: str) -> tuple[bool, str]:
        primary, sec = self.nodes.get("primary"), self.nodes.get("secondary")
        if primary is None or primary is not self.active:
            return False, "there is no active primary to fail over from"
        if sec is None or not self.protected:
            return False, "there is no ready secondary to take over"
        self._fence(primary, f"manual failover: {reason}")
        self.active = None
        self._promote(sec, f"manual failover: {reason}")
        return True, "failover started: the secondary takes over"

    def status(self) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for role in ("primary", "secondary"):
            link = self.nodes.get(role)
            info = dict(self.node_info.get(role, {}))
            if link is not None:
                try:
                    host, port = link.sock.getpeername()[:2]
                    info["address"] = f"{host}:{port}"
                except OSError:
                    pass
            info["connected"] = link is not None
            info["active"] = link is not None and link is self.active
            nodes[role] = info
        return {
            "gateway": {"pid": os.getpid(), "listen": "%s:%d" % self.listen_address,
                        "service": "%s:%d" % self.service_address, "clients": len(self.clients),
                        "input_seq": self.input_seq, "released_output_seq": self.released_seq,
                        "held_outputs": len(self.held), "logged_inputs": len(self.log),
                        "protected": self.protected, "mode": self.cfg.mode,
                        "compare_held_bytes": self.comparer.held_total() if self.hybrid else 0},
            "nodes": nodes,
            "events": self.events[-20:],
        }

    def _record(self, what: str, **details: Any) -> None:
        entry = {"time": round(time.time(), 3), "event": what, **details}
        self.events.append(entry)
        log.info("gateway: %s", entry)
