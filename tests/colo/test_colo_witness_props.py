"""The witness (colo.witness) against a simulated cluster in periodic mode: random interleavings, invariants.

Hypothesis drives one witness and a handful of simulated nodes that behave as the real ones should: a
primary takes its input in order and numbers its output 1, 2, 3...; it copies its VM to the spare it is told
to protect with and commits checkpoints carrying the input and output it has reached; a secondary holds the
last complete checkpoint and, when promoted, answers with that state and the outputs of its epoch. Around
them: clients that connect, send, close and stop reading; nodes that crash, pause (SIGSTOP) and wake up as
zombies, reconnect, ask for a failover; operators that fail over by hand; a gateway that stalls.

Checked after every event the witness handles (`Cluster.deliver`) and after every step:
- never two active nodes (made active: chosen as the primary or sent promote; not since fenced or closed);
- output released while the service was protected is covered by a complete checkpoint the secondary holds;
- output a client sees is the output of the VM that is the service's history (a promoted node resumes from a
  state no released output is beyond; a zombie's output never reaches a client);
- released output sequence numbers strictly increase;
- every input numbered reaches the active node exactly once, in order, with the same content when replayed
  (no gap but an InputFloor, which must skip nothing the gateway numbered);
- new input of one connection never has more than `credit` bytes in flight past the node's progress;
- a client only ever sees output of its own connection's life in the guest (connection ids never shared);
- liveness: unprotected output goes out at once, held output a commit covers is released, waiting input always
  has a reason (credit, a backlog, the log bound), a client the gateway stopped reading is read again once its
  input drained;
- a gateway stall makes no node silent; status says protected only while a secondary holds a checkpoint.

`RestartingCluster` also kills the gateway and starts a new one that learns the cluster from the nodes.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from colo.messages import (
    KIND_CLOSE,
    KIND_DATA,
    KIND_OPEN,
    Commit,
    FailoverCommand,
    FailoverRequest,
    Fence,
    GuestEnded,
    Input,
    InputFloor,
    Message,
    NodeHello,
    NodeStatus,
    Output,
    Progress,
    Promote,
    Promoted,
    Protect,
    Protection,
    ProtectionState,
    Reset,
    Shutdown,
    ShutdownCommand,
    StatusRequest,
    Unprotect,
    Welcome,
)
from colo.netevents import NetEvent
from colo.witness import (
    SERVING,
    AcceptClient,
    ClientBacklog,
    ClientClosed,
    ClientConnected,
    ClientData,
    CloseClient,
    CloseLink,
    ControlRequest,
    Event,
    LinkClosed,
    NodeAttached,
    NodeMessage,
    PauseClient,
    Persist,
    Record,
    ResumeClient,
    Send,
    Service,
    Tick,
    ToClient,
    Witness,
    WitnessAction,
    WitnessConfig,
)

S = Service
TIMEOUT = 0.8
CREDIT = 6  # small, so that input is split and waits for progress
PENDING_LIMIT = 4 * CREDIT
MAX_LOG = 60  # small, so that input also waits for commits
CONTROL = 9999


# -- the simulated nodes --------------------------------------------------------------------------------------


@dataclass
class VM:
    """A toy guest: it echoes each data input on its connection. The echo names the node that produced it, so
    output of a run that is not the service's history is recognisable wherever it ends up."""

    input_seq: int = 0
    output_seq: int = 0
    conns: set[int] = field(default_factory=set)
    outputs: dict[int, NetEvent] = field(default_factory=dict)
    opened: dict[int, int] = field(default_factory=dict)  # conn -> the input that opened it
    # output seq -> the input that opened its connection: which client's life in the guest it belongs to
    output_life: dict[int, int] = field(default_factory=dict)

    def copy(self) -> VM:
        return VM(self.input_seq, self.output_seq, set(self.conns), dict(self.outputs), dict(self.opened),
                  dict(self.output_life))

    def emit(self, kind: int, conn: int, data: bytes) -> NetEvent:
        self.output_seq += 1
        ev = NetEvent(self.output_seq, kind, conn, data)
        self.outputs[ev.seq] = ev
        self.output_life[ev.seq] = self.opened.get(conn, 0)
        return ev


@dataclass
class Checkpoint:
    epoch: int
    vm: VM
    prev_output_seq: int  # the previous checkpoint's: the outputs of this epoch follow it


@dataclass
class Node:
    id: str
    role: str  # primary | secondary | spare: what the node itself believes
    link: int | None
    address: str = ""
    gen: int = 0
    alive: bool = True
    paused: bool = False
    vm: VM | None = None  # a primary's running guest
    ckpt: Checkpoint | None = None  # a secondary's last complete checkpoint
    epoch: int = 0  # a primary's last checkpoint
    peer: str = ""
    copy_to: str | None = None  # told to protect, copy not complete yet
    secondary: str | None = None  # holds a complete copy of this primary
    repl_broken: bool = False  # the replication link between the pair is cut
    ended: bool = False  # its guest powered off: it says so once and produces nothing more
    progress: int = 0  # the last progress sent
    attempt: int = 0  # the last protect's number, echoed in its protection reports
    outbox: collections.deque[Message] = field(default_factory=collections.deque)
    inbox: collections.deque[Message] = field(default_factory=collections.deque)


@dataclass
class Client:
    paused: bool = False  # the gateway stopped reading it
    half_closed: bool = False
    gone: bool = False
    closed: bool = False  # the gateway closed it


def config(gateway_id: str, durable: dict[str, object] | None = None) -> WitnessConfig:
    # A short learn grace, so that a restarted gateway decides within a few ticks.
    return WitnessConfig(gateway_id=gateway_id, heartbeat_timeout=TIMEOUT, credit=CREDIT, pending_limit=PENDING_LIMIT,
                         max_log_bytes=MAX_LOG, learn_grace=0.3, durable=durable)


def weighted(**weights: float) -> st.SearchStrategy[str]:
    """One of the names, about as often as its weight says (weights are relative, in tenths)."""
    return st.sampled_from([name for name, w in weights.items() for _ in range(round(w * 10))])


class Violation(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = Witness(config("gw"))
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self.links: dict[int, str] = {}
        self.open_links: set[int] = set()
        self._link_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._names = itertools.count(1)
        self.pending: collections.deque[Event] = collections.deque()
        self.clients: dict[int, Client] = {}
        self.used_conns: set[int] = set()
        self.conn_opened: dict[int, int] = {}  # client connection -> the input that opened it in the guest
        # what the checks remember
        self.truth: dict[int, tuple[int, int, bytes]] = {}  # input numbered by this gateway: seq -> event
        self.data_inputs: list[tuple[int, int, int]] = []  # (seq, conn, bytes) of data inputs numbered
        self.taken = 0  # the active node's progress as the witness was told it
        self.last_released = 0
        self.made_active: dict[str, int] = {}  # node -> the link on which it was made active
        self.stalling = False
        self.spoke: dict[str, float] = {}
        self.stalled_from = 0.0  # node -> when it last sent the gateway something (sim time)
        self.persisted: dict[str, object] | None = None  # what the witness saved for the next gateway (Persist)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        """Hand one event to the witness, check what it answers, carry it out; then whatever that caused."""
        self.pending.append(event)
        self._run_pending()

    def _run_pending(self) -> None:
        while self.pending:
            ev = self.pending.popleft()
            before = self.w.service
            covering = self.nodes.get(self.w.secondary or self.w.promoting or "")
            if isinstance(ev, (NodeMessage, NodeAttached)) and ev.link in self.open_links:
                self.spoke[self.links[ev.link]] = self.now
            acts = self.w.handle(ev)
            self._check(ev, before, covering, acts)
            self._carry_out(acts)

    def _check(self, ev: Event, before: Service, covering: Node | None, acts: list[WitnessAction]) -> None:
        after = self.w.service
        if isinstance(ev, NodeMessage) and isinstance(ev.msg, Promoted) and self.w.active == self.links.get(ev.link):
            self.taken = ev.msg.input_seq  # the survivor took everything its state covers
        # The state as the actions unfold: the witness records each change of state, in order, among them.
        state, gave_up = before, False
        for a in acts:
            if isinstance(a, Record) and a.entry.get("event") == "service":
                state = Service(a.entry["now"])
                # It stopped counting on the secondary (the primary is all there is), or the guest ended
                # (nothing will ever fail over): from here, held output may go.
                gave_up = gave_up or a.entry["on"] in ("secondary-lost", "unprotected", "guest-ended")
            if isinstance(a, ToClient):
                check(a.seq > 0, f"periodic output released without its number: {a}")
                check(a.seq > self.last_released, f"output {a.seq} released after {self.last_released}")
                self.last_released = a.seq
                c = self.clients.get(a.conn)
                check(c is not None and not c.closed, f"output to a connection that is not open: {a}")
                act = self.nodes.get(self.w.active or "")
                origin = act.vm.outputs.get(a.seq) if act is not None and act.vm is not None else None
                check(origin is not None and (origin.conn, origin.data) == (a.conn, a.data),
                      f"released {a} is not output {a.seq} of the active VM ({origin})")
                assert act is not None and act.vm is not None and c is not None
                life, opened = act.vm.output_life[a.seq], self.conn_opened.get(a.conn)
                check(life == opened, f"released {a} belongs to the connection opened by input {life}; this "
                                      f"client's was opened by input {opened}")
                if state in (S.PROTECTED, S.PROMOTING) and not gave_up:
                    # Still counting on the secondary: only what its complete checkpoint covers.
                    covered = covering.ckpt.vm.output_seq if covering and covering.ckpt else 0
                    check(a.seq <= covered, f"output {a.seq} released while {state.value}; the "
                                            f"secondary's checkpoint covers only up to {covered}")
            elif isinstance(a, AcceptClient):
                check(a.conn not in self.used_conns, f"connection id {a.conn} used twice")
                check(after not in (S.ENDED, S.STOPPED, S.DOWN), f"client accepted while {after.value}")
                self.used_conns.add(a.conn)
            elif isinstance(a, Record):
                name = a.entry.get("event")
                if name == "active":
                    link = self.nodes[a.entry["node"]].link
                    assert link is not None
                    self.made_active[a.entry["node"]] = link
                    self.taken = a.entry["input_seq"]  # nothing is in flight on a node just made active
                if self.stalling and name in ("silent", "lost"):
                    # Not one already at the timeout's edge before the stall (float rounding may tip it).
                    quiet = self.stalled_from - self.spoke.get(a.entry["node"], 0.0)
                    check(quiet >= TIMEOUT - 1e-6, f"a gateway stall made a node {name}: {a.entry}")
            elif isinstance(a, Send) and isinstance(a.msg, Promote):
                n = self.nodes[self.links[a.link]]
                check(n.ckpt is not None, f"promote sent to {n.id}, which holds no complete checkpoint")
                self.made_active[n.id] = a.link
            elif isinstance(a, Send) and isinstance(a.msg, Input):
                self._check_input_sent(a.msg)
        if isinstance(ev, NodeMessage) and isinstance(ev.msg, Output) and ev.msg.kind == KIND_DATA \
                and before in (S.ALONE, S.PROTECTING) and after is before \
                and self.links.get(ev.link) == self.w.active and ev.link in self.open_links:
            # Unprotected output of the active node goes out at once, to a client still there.
            cl = self.clients.get(ev.msg.conn)
            if cl is not None and not cl.closed and not cl.gone:
                check(any(isinstance(a, ToClient) and a.seq == ev.msg.seq for a in acts),
                      f"unprotected output {ev.msg.seq} for client {ev.msg.conn} was not released")

    def _check_input_sent(self, m: Input) -> None:
        item = (m.kind, m.conn, m.data)
        if m.seq in self.truth:  # a replay: the same input as first numbered
            check(self.truth[m.seq] == item, f"input {m.seq} replayed as {item}, was {self.truth[m.seq]}")
            return
        check(not self.truth or m.seq == max(self.truth) + 1, f"input {m.seq} numbered out of order")
        self.truth[m.seq] = item
        if m.kind == KIND_OPEN:
            self.conn_opened[m.conn] = m.seq
        if m.kind == KIND_DATA:
            self.data_inputs.append((m.seq, m.conn, len(m.data)))
            inflight = sum(n for seq, conn, n in self.data_inputs if conn == m.conn and seq > self.taken)
            check(inflight <= CREDIT, f"conn {m.conn}: {inflight} bytes in flight past {self.taken} > {CREDIT}")

    def _carry_out(self, acts: list[WitnessAction]) -> None:
        for a in acts:
            if isinstance(a, Send):
                if isinstance(a.msg, (Fence, Shutdown)):
                    self._deactivate(a.link)
                node_id = self.links.get(a.link)
                if node_id is not None and a.link in self.open_links:
                    self._receive(self.nodes[node_id], a.msg)
            elif isinstance(a, CloseLink):
                self._deactivate(a.link)
                self.open_links.discard(a.link)
            elif isinstance(a, Persist):
                self.persisted = a.state  # on disk, before the actions after it
            elif isinstance(a, AcceptClient):
                self.clients[a.conn] = Client()
            elif isinstance(a, CloseClient):
                if a.conn in self.clients:
                    self.clients[a.conn].closed = True
            elif isinstance(a, PauseClient):
                self.clients[a.conn].paused = True
            elif isinstance(a, ResumeClient):
                self.clients[a.conn].paused = False

    def _deactivate(self, link: int) -> None:
        for node_id, made_on in list(self.made_active.items()):
            if made_on == link:
                del self.made_active[node_id]

    def _new_link(self, n: Node) -> int:
        link = next(self._link_ids)
        self.links[link] = n.id
        self.open_links.add(link)
        n.link = link
        return link

    def _linked(self, n: Node) -> bool:
        return n.alive and not n.paused and n.link is not None and n.link in self.open_links

    def _hello(self, n: Node) -> NodeHello:
        if n.role == "primary" and n.vm is not None:
            vm, epoch, peer = n.vm, n.epoch, n.secondary or ""
        elif n.ckpt is not None:
            vm, epoch, peer = n.ckpt.vm, n.ckpt.epoch, n.peer
        else:
            vm, epoch, peer = VM(), 0, ""
        return NodeHello(n.role, n.id, n.gen, epoch, vm.input_seq, vm.output_seq, sorted(vm.conns), "gw",
                         n.address, peer, {})

    # -- what a node does with what it is sent ------------------------------------------------------------------
    def _receive(self, n: Node, msg: Message) -> None:
        n.inbox.append(msg)
        if not n.paused:
            self._drain(n)

    def _drain(self, n: Node) -> None:
        while n.inbox and n.alive and not n.paused:
            self._obey(n, n.inbox.popleft())

    def _obey(self, n: Node, msg: Message) -> None:
        if isinstance(msg, Welcome):
            n.gen = max(n.gen, msg.generation)
        elif isinstance(msg, Fence):
            n.alive = False  # it exits at once, without another word
            n.outbox.clear()
        elif isinstance(msg, Shutdown):
            n.alive = False
            n.outbox.clear()
            if n.link in self.open_links:
                self.open_links.discard(n.link)
                self.pending.append(LinkClosed(n.link, "the node exited"))
        elif isinstance(msg, Protect):
            check(n.role == "primary", f"protect sent to {n.role} {n.id}")
            n.copy_to, n.attempt = msg.node, msg.attempt
        elif isinstance(msg, Unprotect):
            n.secondary = n.copy_to = None
            n.repl_broken = False
        elif isinstance(msg, Reset):
            n.role, n.ckpt, n.peer = "spare", None, ""  # it discards its copy and waits as a spare
        elif isinstance(msg, InputFloor):
            check(n.role == "primary" and n.vm is not None, f"input-floor sent to {n.role} {n.id}")
            assert n.vm is not None
            check(msg.input_seq >= n.vm.input_seq, f"input-floor {msg.input_seq} below {n.vm.input_seq}")
            skipped = [s for s in range(n.vm.input_seq + 1, msg.input_seq + 1) if s in self.truth]
            check(not skipped, f"input-floor {msg.input_seq} at {n.id} skips numbered inputs {skipped}")
            n.vm.input_seq = msg.input_seq
        elif isinstance(msg, Input):
            check(n.role == "primary" and n.vm is not None, f"input {msg.seq} sent to {n.role} {n.id}")
            assert n.vm is not None
            check(msg.seq == n.vm.input_seq + 1, f"{n.id} got input {msg.seq} after {n.vm.input_seq}")
            self._take(n, n.vm, msg)
        elif isinstance(msg, Promote):
            check(n.ckpt is not None, f"{n.id} promoted without a checkpoint")
            assert n.ckpt is not None
            ck = n.ckpt
            check(self.last_released <= ck.vm.output_seq,
                  f"output up to {self.last_released} was released; {n.id} resumes from output {ck.vm.output_seq}")
            # It keeps `ckpt`: the state it resumed from is what covers the output released at its promotion.
            n.gen, n.role, n.vm, n.epoch, n.peer = msg.generation, "primary", ck.vm.copy(), ck.epoch, ""
            n.progress = n.vm.input_seq
            events = [n.vm.outputs[s].as_list() for s in range(ck.prev_output_seq + 1, ck.vm.output_seq + 1)]
            n.outbox.append(Promoted(n.gen, ck.epoch, n.vm.input_seq, n.vm.output_seq, events, sorted(n.vm.conns)))

    def _take(self, n: Node, vm: VM, msg: Input) -> None:
        vm.input_seq = msg.seq
        if msg.kind == KIND_OPEN:
            check(msg.conn not in vm.conns, f"{n.id}: open of connection {msg.conn}, which the guest has open")
            vm.conns.add(msg.conn)
            vm.opened[msg.conn] = msg.seq
        elif msg.kind == KIND_CLOSE:
            vm.conns.discard(msg.conn)
        elif msg.conn in vm.conns:
            ev = vm.emit(KIND_DATA, msg.conn, b"%s:%d" % (n.id.encode(), msg.seq))
            n.outbox.append(Output(n.gen, *ev))

    def _flush(self, n: Node) -> None:
        """The node writes what it has queued, then tells how far its guest has taken input."""
        link = n.link
        while n.outbox and n.alive and link is not None:
            self.deliver(NodeMessage(link, n.outbox.popleft()))
        if n.alive and n.role == "primary" and n.vm is not None and n.vm.input_seq > n.progress \
                and link is not None and link in self.open_links:
            n.progress = n.vm.input_seq
            self._report_progress(n, link)

    def _report_progress(self, n: Node, link: int) -> None:
        assert n.vm is not None
        if self.w.active == n.id:
            self.taken = max(self.taken, n.vm.input_seq)
        self.deliver(NodeMessage(link, Progress(n.gen, n.vm.input_seq)))

    def _heartbeats(self) -> None:
        for n in list(self.nodes.values()):
            if self._linked(n):
                self._flush(n)
            if self._linked(n):
                assert n.link is not None
                # node-status doubles as the heartbeat, and carries the generation the witness checks
                self.deliver(NodeMessage(n.link, NodeStatus(n.gen, {})))

    def _pick(self, nodes: list[Node], i: int) -> Node | None:
        return nodes[i % len(nodes)] if nodes else None

    def _active(self) -> Node | None:
        n = self.nodes.get(self.w.active or "")
        return n if n is not None and self._linked(n) and n.vm is not None else None

    def _attach(self, n: Node) -> None:
        self.nodes[n.id] = n
        self.deliver(NodeAttached(self._new_link(n), self._hello(n)))

    def _add_spare(self) -> None:
        k = next(self._names)
        self._attach(Node(f"s{k}", "spare", None, address=f"10.0.0.{k}:7000"))

    # -- the steps --------------------------------------------------------------------------------------------
    # A few rules, each drawing what happens from weighted kinds: hypothesis picks rules about evenly, and runs
    # should get far (a crash or a stop ends what is interesting about a run, so those are rare).
    @initialize(spares_before=st.integers(0, 2), spares_after=st.integers(0, 1), copied=st.booleans(),
                clients=st.integers(0, 2))
    def start(self, spares_before: int, spares_after: int, copied: bool, clients: int) -> None:
        self.deliver(Tick(0.0, 0.0))
        for _ in range(spares_before):
            self._add_spare()
        self._attach(Node("p0", "primary", None, vm=VM()))
        for _ in range(spares_after):
            self._add_spare()
        for _ in range(clients):
            self.deliver(ClientConnected(next(self._tokens)))
        if copied:  # most runs start protected: the failures that matter most happen there
            self._copy_completes()

    @rule(kind=weighted(tick=6, a_while=2, stall=1), dt=st.sampled_from([0.1, 0.2, 0.35]))
    def time_passes(self, kind: str, dt: float) -> None:
        if kind == "tick":
            self._heartbeats()
            self.now += dt
            self.deliver(Tick(self.now, self.now))
        elif kind == "a_while":  # a second of running: a paused node is found silent
            for _ in range(5):
                self._heartbeats()
                self.now += 0.2
                self.deliver(Tick(self.now, self.now))
        else:  # the gateway was stopped for seconds: nobody was read meanwhile
            self.stalled_from = self.now
            self.now += 10 * dt
            self.stalling = True
            try:
                self.deliver(Tick(self.now, self.now))
            finally:
                self.stalling = False
            self._heartbeats()

    @rule(kind=weighted(connect=2, send=6, close=1, leave=1, backlog=1, drained=1), i=st.integers(0, 50),
          size=st.integers(1, 2 * CREDIT + 3))
    def client(self, kind: str, i: int, size: int) -> None:
        if kind == "connect":
            self.deliver(ClientConnected(next(self._tokens)))
            return
        if kind == "leave":
            # A half-close first (close), `gone` later: ClientClosed(gone=True) on a connection whose CLOSE can
            # be forwarded at once raises KeyError (the xfail in test_colo_witness.py).
            conns = [c for c, cl in sorted(self.clients.items()) if cl.half_closed and not cl.gone]
            if conns:
                leaving = conns[i % len(conns)]
                self.clients[leaving].gone = True
                self.deliver(ClientClosed(leaving, True))
            return
        conn = self._client(i, writable=kind in ("send", "close"))
        if conn is None:
            return
        if kind == "send" and not self.clients[conn].paused:
            self.deliver(ClientData(conn, bytes([97 + conn % 26]) * size))
        elif kind == "close":
            self.clients[conn].half_closed = True
            self.deliver(ClientClosed(conn, False))
        elif kind in ("backlog", "drained"):
            self.deliver(ClientBacklog(conn, kind == "backlog"))

    def _client(self, i: int, *, writable: bool = True) -> int | None:
        conns = [c for c, cl in sorted(self.clients.items())
                 if not cl.closed and not cl.gone and (not writable or not cl.half_closed)]
        return conns[i % len(conns)] if conns else None

    @precondition(lambda self: self._active() is not None)
    @rule(kind=weighted(output=5, close=1, flush=5, copy=2, copy_queued=1, checkpoint=4, checkpoint_queued=2,
                        checkpoint_lost=1, end=0.1), i=st.integers(0, 50))
    def guest(self, kind: str, i: int) -> None:
        """The active node's work: its guest writes unasked (or closes a connection), it sends what it has
        queued, completes a copy, checkpoints (`checkpoint_lost`: complete at the secondary, but the primary
        dies before its commit reaches the gateway, and with it every output it had not sent), its guest ends.
        `_queued`: the protection or commit message waits in the node's queue (a later flush, a crash, or the
        gateway's unprotect may come first)."""
        n = self._active()
        assert n is not None and n.vm is not None
        if kind in ("output", "close") and n.vm.conns and not n.ended:
            conn = sorted(n.vm.conns)[i % len(n.vm.conns)]
            if kind == "close":
                n.vm.conns.discard(conn)
                ev = n.vm.emit(KIND_CLOSE, conn, b"")
            else:
                ev = n.vm.emit(KIND_DATA, conn, b"%s:u%d" % (n.id.encode(), n.vm.output_seq + 1))
            n.outbox.append(Output(n.gen, *ev))
        elif kind == "flush":
            self._flush(n)
        elif kind in ("copy", "copy_queued"):
            self._copy_completes(flush=kind == "copy")
        elif kind in ("checkpoint", "checkpoint_queued", "checkpoint_lost"):
            self._checkpoint(lost=kind == "checkpoint_lost", flush=kind == "checkpoint")
        elif kind == "end" and not n.ended and n.link is not None:
            n.ended = True  # a guest ends once: a second guest-ended is a known witness bug (test_colo_witness)
            self._flush(n)
            if self._linked(n):
                self.deliver(NodeMessage(n.link, GuestEnded(n.gen, 0, "powered off")))

    def _copy_completes(self, flush: bool = True) -> None:
        n = self._active()
        if n is None or n.copy_to is None or n.vm is None:
            return
        target = self.nodes.get(n.copy_to)
        if target is None or target.paused:
            return  # the copy waits for it
        if not self._reachable(target):
            n.copy_to = None
            n.outbox.append(Protection(n.gen, ProtectionState.UNPROTECTED, 0, 0, 0, "", "the copy failed", n.attempt))
        else:
            n.epoch += 1
            target.ckpt = Checkpoint(n.epoch, n.vm.copy(), n.vm.output_seq)
            target.role, target.peer = "secondary", n.id
            n.secondary, n.copy_to = target.id, None
            n.outbox.append(Protection(n.gen, ProtectionState.PROTECTED, n.epoch, n.vm.input_seq,
                                       n.vm.output_seq, target.id, "", n.attempt))
        if flush:
            self._flush(n)

    def _reachable(self, target: Node) -> bool:
        return target.alive and target.role != "primary"

    def _checkpoint(self, lost: bool, flush: bool = True) -> None:
        n = self._active()
        if n is None or n.vm is None or n.secondary is None:
            return
        sec = self.nodes[n.secondary]
        if sec.paused:
            return  # the checkpoint waits for the secondary's reply
        if not self._reachable(sec) or n.repl_broken or sec.ckpt is None:
            n.secondary = None
            n.outbox.append(Protection(n.gen, ProtectionState.UNPROTECTED, 0, 0, 0, "", "the secondary is gone",
                                       n.attempt))
            self._flush(n)
            return
        n.epoch += 1
        sec.ckpt = Checkpoint(n.epoch, n.vm.copy(), sec.ckpt.vm.output_seq)
        if lost:
            self._crash(n)
            return
        n.outbox.append(Commit(n.gen, n.epoch, n.vm.input_seq, n.vm.output_seq))
        if flush:
            self._flush(n)

    def _crash(self, n: Node) -> None:
        n.alive = False
        n.outbox.clear()
        if n.link in self.open_links:
            assert n.link is not None
            self.open_links.discard(n.link)
            self.deliver(LinkClosed(n.link, "killed"))

    @rule(kind=weighted(crash=1, crash_active=1, pause=1, pause_active=2, wake=3, reconnect=1, reconnect_closed=1,
                        flush=3, spare=2, ask_failover=2), i=st.integers(0, 20))
    def node(self, kind: str, i: int) -> None:
        """`_active`: the active node, whose loss is what failover is for; otherwise any node."""
        if kind in ("crash", "crash_active"):
            n = self._active() if kind == "crash_active" else \
                self._pick([n for n in self.nodes.values() if n.alive], i)
            if n is not None:
                self._crash(n)
        elif kind in ("pause", "pause_active"):  # SIGSTOP: it sends nothing and reads nothing
            n = self._active() if kind == "pause_active" else \
                self._pick([n for n in self.nodes.values() if n.alive and not n.paused], i)
            if n is not None:
                n.paused = True
        elif kind == "wake":
            n = self._pick([n for n in self.nodes.values() if n.alive and n.paused], i)
            if n is not None:
                self._wake(n)
        elif kind in ("reconnect", "reconnect_closed"):
            n = self._pick([n for n in self.nodes.values() if n.alive and not n.paused], i)
            if n is not None:
                self._reconnect(n, close_first=kind == "reconnect_closed")
        elif kind == "flush":
            n = self._pick([n for n in self.nodes.values() if self._linked(n)], i)
            if n is not None:
                self._flush(n)
        elif kind == "spare":
            if len(self.nodes) < 6:
                self._add_spare()
        elif kind == "ask_failover":
            self._secondary_asks_failover()

    def _wake(self, n: Node) -> None:
        """SIGCONT: it writes what it had queued (on its link, even one the gateway has dropped), then reads."""
        n.paused = False
        old = n.link
        if old is not None:
            while n.outbox and n.alive:
                self.deliver(NodeMessage(old, n.outbox.popleft()))
        self._drain(n)
        self._run_pending()  # what obeying caused (a shutdown's link closing)
        if n.alive and n.link is not None and n.link not in self.open_links:
            n.link = None  # it sees that the gateway closed its link: it will dial again (reconnect)

    def _reconnect(self, n: Node, close_first: bool) -> None:
        """Its gateway link broke, or it dials again after its link was closed: a new link, a hello with what it
        holds. The gateway may see the old link close first, or only the new hello."""
        if n.link is not None and n.link in self.open_links:
            self._flush(n)
            if not n.alive:
                return
            assert n.link is not None
            if close_first:
                self.open_links.discard(n.link)
                self.deliver(LinkClosed(n.link, "connection reset"))
            else:
                self._deactivate(n.link)  # the gateway closes it when the hello comes
                self.open_links.discard(n.link)
        if n.alive:
            self._attach(n)

    def _secondary_asks_failover(self) -> None:
        """The replication link breaks: the secondary asks to be promoted; the primary cannot checkpoint."""
        sec = self.nodes.get(self.w.secondary or "")
        if sec is None or not self._linked(sec) or sec.ckpt is None:
            return
        prim = self.nodes.get(sec.peer)
        if prim is not None:
            prim.repl_broken = True
        assert sec.link is not None
        self.deliver(NodeMessage(sec.link, FailoverRequest(sec.gen, "lost the primary")))

    RESTARTS = False  # RestartingCluster: the gateway may also be killed and started again

    @precondition(lambda self: self.RESTARTS)
    @rule(rare=st.integers(0, 3), with_primary=st.booleans(), heal=st.booleans())
    def gateway_restarts(self, rare: int, with_primary: bool, heal: bool) -> None:
        """SIGKILL of the gateway, a new one on the same address: every link and client connection ends with the
        old one; the nodes keep their VMs and pairs, and dial the new one with what they hold. `with_primary`:
        the active node dies with it (one host lost), unseen by the old gateway: its secondary is an orphan.
        `heal`: the nodes the old gateway could not reach (stopped, or cut off by a partition) dial the new one
        too, never having read what the old one sent them last (a reset, a fence: lost with its connections)."""
        if rare:
            return
        act = self.nodes.get(self.w.active or "")
        if with_primary and act is not None:
            act.alive = False
        self.w = Witness(config(f"gw{next(self._names)}", self.persisted))
        self.open_links.clear()
        self.made_active.clear()
        for cl in self.clients.values():
            cl.closed = True
        self.clients, self.used_conns, self.conn_opened = {}, set(), {}
        self.truth, self.data_inputs, self.taken = {}, [], 0  # numbering is per gateway: the new one goes on
        self.pending.clear()  # whatever was on its way to the old gateway
        self.deliver(Tick(self.now, self.now))
        for n in self.nodes.values():
            n.outbox.clear()  # unsent, and unread, bytes die with the connections
            n.inbox.clear()
            n.link, n.copy_to = None, None
            if n.role == "secondary" and n.peer and not self.nodes[n.peer].alive:
                n.peer = ""  # its primary is gone: it is an orphan holding the newest copy
        for n in list(self.nodes.values()):
            if heal and n.alive and n.paused:
                n.paused = False  # its inbox was cleared above: what it was sent died with the old connections
            if n.alive and not n.paused:
                self._attach(n)

    @rule(kind=weighted(failover=10, status=19, stop=1))
    def operator(self, kind: str) -> None:
        msg = {"failover": FailoverCommand("maintenance"), "status": StatusRequest(),
               "stop": ShutdownCommand("colo down")}[kind]
        self.deliver(ControlRequest(CONTROL, msg))

    # -- invariants after every step --------------------------------------------------------------------------
    @invariant()
    def never_two_active_nodes(self) -> None:
        live = {n: link for n, link in self.made_active.items() if link in self.open_links}
        check(len(live) <= 1, f"two active nodes: {live}")
        check(not (self.w.active and self.w.promoting), "an active node and a promotion at once")

    @invariant()
    def every_input_reached_the_active_node(self) -> None:
        n = self.nodes.get(self.w.active or "")
        if n is None or not self._linked(n) or n.vm is None or self.w.service not in SERVING:
            return
        check(n.vm.input_seq == self.w.input_seq,
              f"the active node {n.id} has taken input up to {n.vm.input_seq}; the gateway numbered "
              f"{self.w.input_seq}")

    @invariant()
    def protected_only_with_a_checkpoint(self) -> None:
        if self.w.protected:
            sec = self.nodes[self.w.secondary or ""]
            check(sec.ckpt is not None, f"status says protected, but {sec.id} holds no complete checkpoint")

    @invariant()
    def covered_output_is_not_held(self) -> None:
        if self.w.service is S.PROTECTED:
            stuck = [s for s in self.w.held if s <= self.w.commit_output_seq]
            check(not stuck, f"outputs {stuck} are held although commit {self.w.commit_epoch} covers them")

    @invariant()
    def input_waits_only_for_a_reason(self) -> None:
        if not self.w._can_forward():
            return
        for conn, c in self.w.conns.items():
            if c.pending and not c.backlogged:
                kind, _ = c.pending[0]
                check(kind == KIND_DATA and c.inflight >= CREDIT,
                      f"conn {conn}: input waits with {c.inflight} bytes in flight and nothing holding it")

    @invariant()
    def a_paused_client_is_resumed(self) -> None:
        for conn, cl in self.clients.items():
            c = self.w.conns.get(conn)
            if cl.paused and not cl.closed and c is not None:
                check(c.pending_bytes > PENDING_LIMIT // 2,
                      f"client {conn} is not read, with only {c.pending_bytes} bytes waiting")

    @invariant()
    def stopped_is_final(self) -> None:
        if self.w.service in (S.STOPPED, S.ENDED):
            check(self.w.promoting is None, "a promotion after the service stopped")


Cluster.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None, database=None,
                                     suppress_health_check=[HealthCheck.too_slow])
test_witness_in_a_simulated_cluster = Cluster.TestCase


class RestartingCluster(Cluster):
    RESTARTS = True


RestartingCluster.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                               database=None, suppress_health_check=[HealthCheck.too_slow])


def test_witness_in_a_simulated_cluster_with_gateway_restarts() -> None:
    RestartingCluster.TestCase("runTest").runTest()


@pytest.mark.slow
def test_witness_in_a_simulated_cluster_long() -> None:
    """More and longer runs (about 30 s): `pytest -m slow`."""
    run_state_machine_as_test(Cluster, settings=settings(
        max_examples=2000, stateful_step_count=80, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
