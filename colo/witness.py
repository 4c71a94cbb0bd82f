"""The witness: every decision the gateway makes, as a sans-I/O state machine.

The gateway process is a thin selector loop around one `Witness`. It turns what happens on its sockets into
events and carries out the actions the witness answers with, in order:

    actions = witness.handle(event)

Events: `Tick(now, wall)` (the only source of time), `NodeAttached`, `NodeMessage`, `LinkClosed`,
`ClientConnected`, `ClientData`, `ClientClosed`, `ClientBacklog`, `ControlRequest`.
Actions: `Send`, `CloseLink`, `AcceptClient`, `RefuseClient`, `ToClient`, `CloseClient`, `PauseClient`,
`ResumeClient`, `ListenClients`, `Record`, `Persist` (write durably before what follows), `Exit`.

What it decides:
- which node is active, and which generation it obeys (a generation is a fencing token: each promotion starts a
  new one; a node that speaks for an older generation is fenced);
- whether the service is protected (`Service`, whose transitions are the table `SERVICE_TRANSITIONS`);
- which client input goes to the active node, numbered in one sequence, logged while a failover could need it,
  and at most `credit` bytes per connection in flight past what the guest has taken (so one connection's backlog
  cannot starve the others inside the guest);
- which output clients see: in periodic mode, output is held until a checkpoint covering it is complete; in
  hybrid mode, the two VMs' outputs are compared (colo.compare) and their common prefix released;
- promotion when the active node is lost: which outputs to release and drop, which inputs to replay;
- what a gateway that starts with no memory learns from the nodes (`Service.LEARNING`).

Liveness is judged on the witness's own running time: if the gateway itself was stopped (SIGSTOP, a long pause),
the time it did not run does not count against the nodes (see `Tick`).
"""
from __future__ import annotations

import collections
import enum
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from colo.compare import Action as CompareAction
from colo.compare import NeedCheckpoint, OutputComparer, Release, ReleaseClose
from colo.messages import (
    CheckpointCommand,
    CheckpointNow,
    CommandResult,
    Commit,
    Demote,
    FailoverCommand,
    FailoverRequest,
    Fence,
    GuestEnded,
    HandedOver,
    Handover,
    Heartbeat,
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
    Resynced,
    Shutdown,
    ShutdownCommand,
    StatusReply,
    StatusRequest,
    Step,
    StepCommand,
    SwitchoverCommand,
    Trigger,
    Unprotect,
    Welcome,
)
from colo.netevents import KIND_CLOSE, KIND_DATA, KIND_OPEN, NetEvent

# -- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WitnessConfig:
    mode: str = "periodic"  # "hybrid": both VMs run, their outputs are compared
    heartbeat_timeout: float = 0.8  # a node not heard this long (witness running time) is lost
    compare_timeout: float = 0.2  # hybrid: output unmatched this long triggers a checkpoint
    max_pending: int = 1 << 20  # hybrid: held bytes per connection and side before a checkpoint is forced
    credit: int = 16 << 10  # input bytes per connection in flight past what the guest has taken
    pending_limit: int = 256 << 10  # input bytes per connection waiting for credit before reading pauses
    max_log_bytes: int = 64 << 20  # logged input beyond which no more input is forwarded until a commit
    learn_grace: float | None = None  # a fresh gateway waits this long to hear from nodes (default 2 timeouts)
    gateway_id: str = ""  # default: a fresh random id
    # What an earlier gateway persisted (`Persist`): copies it voided, which no restart may promote
    durable: dict[str, Any] | None = None

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_timeout / 4


# -- events in ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """The time now: `now` on a monotonic clock (decisions), `wall` on the wall clock (records)."""

    now: float
    wall: float


@dataclass(frozen=True, slots=True)
class NodeAttached:
    """An authenticated node connection (`link`) said hello."""

    link: int
    hello: NodeHello


@dataclass(frozen=True, slots=True)
class NodeMessage:
    link: int
    msg: Message


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """A node connection ended (the peer closed it, it failed, or its bytes were bad)."""

    link: int
    why: str


@dataclass(frozen=True, slots=True)
class ClientConnected:
    """A client connected; `token` names it until the witness accepts it as a connection id."""

    token: int


@dataclass(frozen=True, slots=True)
class ClientData:
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client ended its stream (`gone`: its socket is gone too, nothing more can reach it)."""

    conn: int
    gone: bool = False


@dataclass(frozen=True, slots=True)
class ClientBacklog:
    """The client's unsent output crossed the gateway's bound (`over`) or fell back under it."""

    conn: int
    over: bool


@dataclass(frozen=True, slots=True)
class ControlRequest:
    link: int
    msg: Message


Event = (Tick | NodeAttached | NodeMessage | LinkClosed | ClientConnected | ClientData | ClientClosed
         | ClientBacklog | ControlRequest)

# -- actions out ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    link: int
    msg: Message


@dataclass(frozen=True, slots=True)
class CloseLink:
    """Close node or control connection `link` once what was sent on it is flushed."""

    link: int
    reason: str


@dataclass(frozen=True, slots=True)
class AcceptClient:
    token: int
    conn: int


@dataclass(frozen=True, slots=True)
class RefuseClient:
    token: int
    reason: str


@dataclass(frozen=True, slots=True)
class ToClient:
    """Send `data` to client `conn`; `seq` is the output event it belongs to (0: not one numbered event)."""

    conn: int
    data: bytes
    seq: int = 0


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close client `conn` once the data given to it is sent."""

    conn: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PauseClient:
    """Stop reading client `conn` (its input waits for credit)."""

    conn: int


@dataclass(frozen=True, slots=True)
class ResumeClient:
    conn: int


@dataclass(frozen=True, slots=True)
class ListenClients:
    """Accept new clients (on) or leave them waiting in the listen backlog (off)."""

    on: bool


@dataclass(frozen=True, slots=True)
class Record:
    """Something an operator should see (status, logs): `entry` has "event" and details."""

    entry: dict[str, Any]
    level: str = "info"  # info | warning | error


@dataclass(frozen=True, slots=True)
class Persist:
    """Write `state` where the next gateway reads it (`WitnessConfig.durable`), durably, before the actions after
    this one are carried out: they may release output that only this state keeps a restart from taking back."""

    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Exit:
    """The service is stopped: the gateway may exit once it has flushed what it sent."""

    reason: str


WitnessAction = (Send | CloseLink | AcceptClient | RefuseClient | ToClient | CloseClient | PauseClient
                 | ResumeClient | ListenClients | Record | Persist | Exit)
DURABLE_FORMAT = "colo-witness/1"
MAX_VOIDS = 32  # voided copies remembered (the oldest go first: a node is voided again whenever it matters)


def load_voids(durable: dict[str, Any] | None) -> dict[str, int]:
    """The voided copies in what an earlier gateway persisted; ValueError says what is wrong with it."""
    if durable is None:
        return {}
    if not isinstance(durable, dict) or durable.get("format") != DURABLE_FORMAT:
        raise ValueError(f"not a witness state of format {DURABLE_FORMAT!r}")
    voids = durable.get("void")
    if not isinstance(voids, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0
                                                  for k, v in voids.items()):
        raise ValueError("its 'void' must map node ids to generations")
    return dict(voids)


# -- the service's states -------------------------------------------------------------------------------------


class Service(enum.Enum):
    LEARNING = "learning"  # a gateway that just started: hearing from the nodes what exists
    DOWN = "down"  # no node can serve: new clients are refused
    ALONE = "unprotected"  # an active node, no secondary holds a complete copy: output is released at once
    PROTECTING = "protecting"  # the active node copies its VM to a secondary (output still released at once)
    PROTECTED = "protected"  # a secondary holds a complete checkpoint: output waits for the commit covering it
    PROMOTING = "promoting"  # the active node was lost: a secondary is taking over
    ENDED = "ended"  # the guest powered off or faulted: nothing to fail over to
    STOPPED = "stopped"  # an operator stopped the service


S = Service
# (state, what happened) -> next state. Anything else is a bug in the witness, and raises.
SERVICE_TRANSITIONS: dict[tuple[Service, str], Service] = {
    (S.LEARNING, "active-chosen"): S.ALONE,
    (S.LEARNING, "pair-learned"): S.PROTECTED,
    (S.LEARNING, "promote"): S.PROMOTING,
    (S.LEARNING, "nobody"): S.DOWN,
    (S.DOWN, "active-chosen"): S.ALONE,
    (S.DOWN, "active-back"): S.ALONE,
    (S.DOWN, "active-back-protecting"): S.PROTECTING,
    (S.DOWN, "pair-learned"): S.PROTECTED,
    (S.ALONE, "copy-started"): S.PROTECTING,
    (S.ALONE, "active-lost"): S.DOWN,
    (S.PROTECTING, "protected"): S.PROTECTED,
    (S.PROTECTING, "secondary-lost"): S.ALONE,
    (S.PROTECTING, "unprotected"): S.ALONE,
    (S.PROTECTING, "active-lost"): S.DOWN,
    (S.PROTECTED, "secondary-lost"): S.ALONE,
    (S.PROTECTED, "unprotected"): S.ALONE,
    (S.PROTECTED, "active-lost"): S.PROMOTING,
    (S.PROTECTED, "manual-failover"): S.PROMOTING,
    (S.PROTECTED, "handed-over"): S.PROMOTING,
    (S.PROMOTING, "promoted"): S.ALONE,
    (S.PROMOTING, "promotion-failed"): S.DOWN,
    **{(s, "guest-ended"): S.ENDED for s in (S.ALONE, S.PROTECTING, S.PROTECTED)},
    **{(s, "superseded"): S.DOWN for s in (S.ALONE, S.PROTECTING, S.PROTECTED)},
    **{(s, "shutdown"): S.STOPPED for s in Service if s is not S.STOPPED},
}
SERVING = (S.ALONE, S.PROTECTING, S.PROTECTED)  # an active node takes input and produces output
ADMITTING = (*SERVING, S.PROMOTING)  # new clients are accepted (their input waits during a failover)


class WitnessError(Exception):
    """A transition the table does not allow: a bug in the witness, never the peers' fault."""


def incompatible(spare: dict[str, Any], primary: dict[str, Any]) -> str:
    """Why a spare (its status info) cannot protect a primary (its), or "" when it can."""
    sf, pf = spare.get("state_format"), primary.get("state_format")
    if sf and pf and sf != pf:
        return (f"the spare reads checkpoints of format {sf}, the primary writes {pf} (colo "
                f"{spare.get('colo_version', '?')} and {primary.get('colo_version', '?')}): upgrade them together")
    want = spare.get("wants_guest_sha256")
    if want and primary.get("guest_sha256") and want != primary.get("guest_sha256"):  # (a promoted node may not know)
        return (f"the spare is for guest {spare.get('wants_guest', '?')} ({want}), the primary runs "
                f"{primary.get('guest', '?')} ({primary.get('guest_sha256', '?')})")
    ram = spare.get("wants_ram")
    if ram and ram != primary.get("ram"):
        return f"the spare is for {ram} bytes of RAM, the primary's VM has {primary.get('ram', '?')}"
    return ""


# -- what the witness keeps -----------------------------------------------------------------------------------


@dataclass
class NodeView:
    """One node as the witness knows it (`id` is the node's own, stable over reconnections)."""

    id: str
    link: int | None
    role: str
    generation: int
    address: str
    peer: str
    heard: float  # witness time of the last message
    since: float  # wall time it attached
    hello: NodeHello
    info: dict[str, Any] = field(default_factory=dict)
    silent: bool = False
    not_before: float = 0.0  # a spare whose copy failed is not paired again before this witness time
    lost: str = ""  # why it was lost ("" while it is part of the service)
    lost_at: float = 0.0  # wall time

    @property
    def connected(self) -> bool:
        return self.link is not None and not self.silent and not self.lost


@dataclass
class ConnState:
    """One client connection: its input waiting for credit, and its input in flight to the guest."""

    pending: collections.deque[tuple[int, bytes]] = field(default_factory=collections.deque)
    pending_bytes: int = 0
    inflight: int = 0  # bytes forwarded past the active node's `taken`
    paused: bool = False  # the gateway stopped reading it
    backlogged: bool = False  # its unsent output is over the bound: send it no more input
    input_closed: bool = False  # its CLOSE is numbered: no more input on it
    gone: bool = False  # the client socket is gone


class Witness:
    """The gateway's decisions. Feed it events with `handle`; carry out the actions it returns, in order."""

    def __init__(self, cfg: WitnessConfig | None = None) -> None:
        self.cfg = cfg = cfg or WitnessConfig()
        if cfg.mode not in ("periodic", "hybrid"):
            raise ValueError(f"mode must be periodic or hybrid, got {cfg.mode!r}")
        self.id = cfg.gateway_id or secrets.token_hex(8)
        self.hybrid = cfg.mode == "hybrid"
        self.service = Service.LEARNING
        self.generation = 0
        self.now: float | None = None
        self.wall = 0.0
        self._learn_deadline: float | None = None
        self.nodes: dict[str, NodeView] = {}
        self.links: dict[int, str] = {}  # node links -> node id
        self.active: str | None = None
        self.secondary: str | None = None  # the node protecting the active one (copying or holding a copy)
        self.promoting: str | None = None
        self.failover_started: float | None = None
        self.failover_request_at: float | None = None
        self.failovers = 0
        self.switchover: tuple[str, bool, float] | None = None  # (node handing over, swap, started), while asked
        self._promote_reason = ""
        self.down_reason = "no node holds the service"  # the last "down" event's: logged for each refused client
        self._refused_pairs: set[tuple[str, str]] = set()
        # input
        self.input_seq = 0  # the last input number assigned
        self.log: collections.deque[NetEvent] = collections.deque()  # since the last commit, while it matters
        self.log_bytes = 0
        self.conns: dict[int, ConnState] = {}
        self.next_conn = 1
        self.taken = 0  # the active node's VM took every input up to here
        self._inflight: collections.deque[tuple[int, int, int]] = collections.deque()  # (seq, conn, bytes)
        # output
        self.held: dict[int, NetEvent] = {}
        self.released_seq = 0
        self.commit_epoch = -1
        self.commit_output_seq = 0
        # hybrid
        self.comparer: OutputComparer | None = None
        self.mirror: str | None = None  # the secondary, once its copy of the VM runs on the same input
        self.synced_epoch = -1
        self.primary_committed = 0
        self.sec_queue: collections.deque[Message] = collections.deque()
        self.checkpoint_asked = False
        # bookkeeping
        self.events: list[dict[str, Any]] = []
        self.about: dict[str, Any] = {}  # what the shell knows of itself (pid, addresses), shown in the status
        self.ended_code: int | None = None
        self._last_heartbeat = -1e18
        self._out: list[WitnessAction] = []
        # teaching: `trace` adds Record actions of level "trace" (each output held, released, dropped; each
        # comparison) for the event stream; `step` is the step mode and slow motion the nodes were told
        self.trace = False
        self.step = Step(False, 0, 0)
        # Copies no promotion may use, persisted (Persist) so that a restarted gateway knows them too: node id ->
        # the generation up to which its copies are void. A secondary's copy is voided when the primary goes on
        # without it: output released from then on is in no copy it holds (docs/replication.md).
        self.voids: dict[str, int] = load_voids(cfg.durable)
        # The number of the last protect sent: protection reports name the one they answer. Numbers start at a
        # random point, so that a report on an earlier gateway's protect is not taken for one of ours.
        self.protect_attempt = secrets.randbits(31)
        self.protects_sent = 0

    # -- the one entry point ----------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[WitnessAction]:
        self._out = []
        if isinstance(event, Tick):
            self._tick(event.now, event.wall)
        elif self.now is None:
            raise WitnessError("the first event must be a Tick: the witness has no time yet")
        elif isinstance(event, NodeMessage):  # the relay's events first: they are nearly all of them
            self._node_message(event.link, event.msg)
        elif isinstance(event, ClientData):
            self._client_data(event.conn, event.data)
        elif isinstance(event, NodeAttached):
            self._attached(event.link, event.hello)
        elif isinstance(event, LinkClosed):
            self._link_closed(event.link, event.why)
        elif isinstance(event, ClientConnected):
            self._client_connected(event.token)
        elif isinstance(event, ClientClosed):
            self._client_closed(event.conn, event.gone)
        elif isinstance(event, ClientBacklog):
            self._client_backlog(event.conn, event.over)
        elif isinstance(event, ControlRequest):
            self._control(event.link, event.msg)
        else:
            raise TypeError(f"not a witness event: {event!r}")
        out, self._out = self._out, []
        return out

    @property
    def liveness_suspended(self) -> bool:
        """Step mode or slow motion is on (teaching): no node is found silent."""
        return self.step.on or self.step.delay_ms > 0

    @property
    def protected(self) -> bool:
        """A secondary holds a complete checkpoint and both nodes are heard."""
        if self.service is not S.PROTECTED or self.active is None or self.secondary is None:
            return False
        return self.nodes[self.active].connected and self.nodes[self.secondary].connected

    # -- time -------------------------------------------------------------------------------------------------
    def _tick(self, now: float, wall: float) -> None:
        timeout = self.cfg.heartbeat_timeout
        if self.now is None:
            self.now, self.wall = now, wall
            grace = self.cfg.learn_grace if self.cfg.learn_grace is not None else 2 * timeout
            self._learn_deadline = now + grace
            self._emit(ListenClients(False))
            self._record("started", gateway=self.id, mode=self.cfg.mode)
            return
        gap = now - self.now
        if gap > max(timeout / 2, 0.25):
            # We did not run for `gap` seconds (stopped, starved): that time is not the nodes' silence.
            for n in self.nodes.values():
                n.heard += gap
            if self.failover_request_at is not None:
                self.failover_request_at += gap
            if self._learn_deadline is not None:
                self._learn_deadline += gap
            self._record("gateway-stalled", seconds=round(gap, 3), level="warning")
        self.now, self.wall = now, wall
        if self.liveness_suspended:
            for n in self.nodes.values():  # step mode: time spent waiting for a step is nobody's silence
                n.heard = now
        if self.service is S.LEARNING and self._learn_deadline is not None and now >= self._learn_deadline:
            self._finish_learning()
        for n in list(self.nodes.values()):
            if n.link is not None and not n.silent and not n.lost and now - n.heard > timeout:
                self._node_silent(n)
        if self.failover_request_at is not None and now - self.failover_request_at > 2 * timeout:
            self.failover_request_at = None
            sec = self._node(self.secondary)
            act = self._node(self.active)
            if sec is not None and act is not None and act.connected:
                # We still hear the primary: the secondary lost only its own link. It must not take over.
                self._lose_secondary(sec, "it lost the primary, but the gateway still hears the primary",
                                     fence=True)
        if self.comparer is not None and self._comparing():
            self._compare_actions(self.comparer.poll(now))
        if self.service is S.ALONE and self.secondary is None:
            self._assign_protection()  # a spare whose retry pause has passed
        if now - self._last_heartbeat >= self.cfg.heartbeat_interval:
            self._last_heartbeat = now
            for link in self.links:
                self._emit(Send(link, Heartbeat()))

    # -- nodes attaching --------------------------------------------------------------------------------------
    def _attached(self, link: int, hello: NodeHello) -> None:
        old = self.nodes.get(hello.node)
        if old is not None and old.link is not None and old.link != link:
            # The same node on a new connection: whatever was in flight on the old one may be lost, so the old
            # one counts as lost (a failover may follow); the node is then judged afresh.
            self._emit(CloseLink(old.link, "the node reconnected"))
            self._link_closed(old.link, "the node reconnected on a new connection")
        if hello.role not in ("primary", "secondary", "spare"):
            self._fence_link(link, f"unknown role {hello.role!r}")
            return
        if hello.generation < self.generation and hello.role == "primary":
            self._fence_link(link, f"it speaks for generation {hello.generation}; generation "
                                   f"{self.generation} exists (a newer primary took over)")
            return
        assert self.now is not None
        # New clients never get an id a VM still has open (a past gateway's clients), whichever node serves next.
        self.next_conn = max(self.next_conn, max(hello.conns, default=0) + 1)
        n = NodeView(hello.node, link, hello.role, hello.generation, hello.address, hello.peer, self.now,
                     self.wall, hello, dict(hello.info))
        self.nodes[hello.node] = n
        self.links[link] = hello.node
        self._record("attached", node=n.id, role=n.role, generation=n.generation, epoch=hello.epoch,
                     pid=hello.info.get("pid"), address=n.address or None)
        self._decide_on(n)
        # Last, after whatever the decision sent it (input floor, a protect): a freshly booted primary that reads
        # the welcome knows whether a copy comes first.
        self._send(n, Welcome(self.id, max(self.generation, hello.generation)))
        if self.liveness_suspended and n.link is not None:
            self._send(n, Step(self.step.on, self.step.delay_ms, 0))

    def _decide_on(self, n: NodeView) -> None:
        hello = n.hello
        if self.service is S.LEARNING:
            self._learn()
        elif self.service in (S.STOPPED, S.ENDED):
            self._send(n, Shutdown(f"the service has {self.service.value}"))
        elif hello.role == "primary":
            self._primary_attached(n)
        elif hello.role == "secondary":
            # It holds a copy of some primary's VM, but it is not the active node's secondary (it came back after a
            # partition, say): that copy is of a past the service has left. It starts again as a spare.
            self._reset(n, "your copy is not of the active node")
            self._assign_protection()
        else:
            self._assign_protection()

    def _primary_attached(self, n: NodeView) -> None:
        act = self._node(self.active)
        if self.service is S.PROMOTING:
            self._fence(n, "a failover is in progress: a second primary would split the brain")
        elif act is not None and n.generation > act.generation:
            # The active node is stale: a newer primary exists (promoted behind a gateway that is gone). The witness
            # obeys the highest generation: the stale one goes, with its clients and its copy.
            why = f"generation {n.generation} of node {n.id} exists"
            self._record("superseded", node=act.id, generation=act.generation, by=n.id, level="error")
            self.active = None
            self._fence(act, why)
            sec = self._node(self.secondary)
            if sec is not None:
                self.secondary = None
                self._reset(sec, f"its primary was stale: {why}")
            self._stop_comparing()
            self._go("superseded")
            self._close_all_clients(why)
            self.generation = n.generation
            self.active = n.id
            self._start_active(n)
        elif act is not None:
            self._fence(n, f"node {act.id} is active: a second primary would split the brain")
            self._record("second-primary", node=n.id, generation=n.generation, active=act.id,
                         active_generation=act.generation, level="error")
        elif self.service is S.DOWN:
            self.generation = max(self.generation, n.generation)
            self.active = n.id
            self._start_active(n)

    def _start_active(self, n: NodeView) -> None:
        """Make `n` the node that serves: number input past what it has seen, close the connections its VM
        has open that no client of ours holds, start accepting clients."""
        hello = n.hello
        floor = max(self.input_seq, hello.input_seq)
        if floor > hello.input_seq:
            self._send(n, InputFloor(floor))
        self.input_seq = floor
        self.released_seq = hello.output_seq  # its own numbering: what it produced before now is released or void
        self.taken = floor
        self._inflight.clear()
        for c in self.conns.values():
            c.inflight = 0
        self._close_stale_conns(n, hello.conns, set())
        peer = self._node(n.peer)
        if peer is not None and peer.connected and peer.role == "secondary" and peer.peer == n.id:
            # A pair that outlived its gateway: the secondary holds a complete checkpoint of this node. Inputs
            # from now on are logged; those between its checkpoint and now were for clients that are gone.
            self.secondary = peer.id
            self._go("pair-learned")
            self.commit_epoch = min(hello.epoch, peer.hello.epoch)
            if self.hybrid:  # the two VMs may have seen different input last: compare only after a resync
                self._ask_checkpoint(Trigger.MANUAL, "a new gateway: the secondary must resynchronise")
        else:
            self._go("active-chosen")
        self._record("active", node=n.id, generation=self.generation, input_seq=floor,
                     output_seq=self.released_seq, service=self.service.value)
        self._emit(ListenClients(True))
        self._assign_protection()
        self._pump_all()

    def _close_stale_conns(self, n: NodeView, vm_conns: Iterable[int], closed: set[int]) -> None:
        """Connections the active VM has open that the gateway holds no client for (a previous gateway's, or
        ones whose client went while the node was away): tell the guest they closed."""
        for conn in sorted(set(vm_conns) - closed):
            if conn in self.conns:
                continue
            self.next_conn = max(self.next_conn, conn + 1)
            self._number(KIND_CLOSE, conn, b"")
        self.next_conn = max(self.next_conn, max(vm_conns, default=0) + 1)

    # -- learning: a gateway that starts with no memory --------------------------------------------------------
    def _learn(self) -> None:
        """Decide as soon as what we heard is enough: a primary of the highest generation whose secondary (if it
        has one) is here too."""
        primaries = [n for n in self.nodes.values() if n.role == "primary" and n.connected]
        if not primaries:
            return
        best = max(primaries, key=lambda n: n.generation)
        if best.peer and self._node(best.peer) is None:
            return  # its secondary may be on its way: wait for it (or for the deadline)
        if best.hello.gateway and not best.peer:
            return  # it served behind a gateway that is gone: a newer primary may exist, give it the grace
        self._finish_learning()

    def _finish_learning(self) -> None:
        self._learn_deadline = None
        live = [n for n in self.nodes.values() if n.connected]
        for n in live:
            if n.role == "secondary" and self._voided(n):
                self._reset(n, "an earlier gateway voided its copy: the primary went on without it")
        primaries = [n for n in live if n.role == "primary"]
        if primaries:
            best = max(primaries, key=lambda n: n.generation)
            for other in primaries:
                if other is not best:
                    self._fence(other, f"generation {best.generation} of node {best.id} is the newest")
            self.generation = max(self.generation, best.generation)
            self.active = best.id
            self._start_active(best)
            return
        # No primary. A secondary that holds a copy and lost its primary may take over.
        orphans = [n for n in live if n.role == "secondary" and n.peer == ""]
        if orphans:
            best = max(orphans, key=lambda n: (n.generation, n.hello.epoch))
            self.generation = max([self.generation] + [n.generation for n in self.nodes.values()])
            self.secondary = best.id
            self._go("promote")
            self._promote(best, "a new gateway found no primary; this secondary holds the newest copy")
            return
        self._go("nobody")
        if not self.nodes and self.cfg.durable is None:  # a first start, before its nodes: nothing is wrong yet
            self._record("down", reason="no node has attached yet: clients are refused until a primary does")
        else:
            self._record("down", reason="no node holds the service", level="warning")
        self._emit(ListenClients(True))  # so that clients are told at once instead of waiting

    # -- messages from nodes ----------------------------------------------------------------------------------
    def _node_message(self, link: int, msg: Message) -> None:
        n = self._node(self.links.get(link))
        if n is None:
            return  # a late message on a link we dropped
        assert self.now is not None
        n.heard = self.now
        if n.silent:
            n.silent = False
            self._record("heard-again", node=n.id, role=n.role)
            if n.id == self.active and self.service is S.DOWN:
                self._go("active-back-protecting" if self.secondary is not None else "active-back")
                self._emit(ListenClients(True))
                self._pump_all()
        gen = getattr(msg, "generation", None)
        if gen is not None and gen < self.generation and (n.id == self.active or n.role == "primary"):
            self._lose(n, f"fenced: it speaks for generation {gen}; generation {self.generation} exists")
            return
        if isinstance(msg, (Heartbeat,)):
            return
        if isinstance(msg, NodeStatus):
            n.info = dict(msg.info)
            n.generation = msg.generation  # a secondary's follows its primary's (it learns it from the copy)
            address = n.info.get("address")
            if not n.address and isinstance(address, str) and address.rpartition(":")[2].isdigit():
                n.address = address  # it said hello before it knew where it listens
                self._assign_protection()
            return
        if self.hybrid and n.id in (self.secondary, self.promoting, self.mirror) and n.id != self.active \
                and isinstance(msg, (Output, Resynced, Promoted)):
            self.sec_queue.append(msg)  # in order: a resync marker may have to wait for the primary's commit
            self._drain_secondary(n)
            return
        if isinstance(msg, Output):
            if n.id == self.active:
                self._output(n, msg)
        elif isinstance(msg, Progress):
            if n.id == self.active:
                self._progress(msg.taken)
        elif isinstance(msg, Commit):
            if n.id == self.active:
                self._commit(msg)
        elif isinstance(msg, Protection):
            if n.id == self.active:
                self._protection(n, msg)
        elif isinstance(msg, FailoverRequest):
            if n.id == self.secondary:
                self._failover_request(n, msg.reason)
        elif isinstance(msg, Promoted):
            if n.id == self.promoting:
                self._promoted(n, msg)
        elif isinstance(msg, GuestEnded):
            if n.id == self.active:
                self._guest_ended(n, msg)
        elif isinstance(msg, HandedOver):
            if n.id == self.active and self.switchover is not None and self.switchover[0] == n.id:
                self._handed_over(n, msg)
        else:
            self._record("unexpected", node=n.id, message=msg.NAME, level="warning")

    # -- input ------------------------------------------------------------------------------------------------
    def _client_connected(self, token: int) -> None:
        if self.service not in ADMITTING:
            why = {S.DOWN: self.down_reason, S.ENDED: "the guest has ended",
                   S.STOPPED: "the service was stopped", S.LEARNING: "the gateway is starting"}[self.service]
            self._emit(RefuseClient(token, why))
            return
        conn = self.next_conn
        self.next_conn += 1
        self.conns[conn] = ConnState()
        self._emit(AcceptClient(token, conn))
        self._queue(conn, KIND_OPEN, b"")

    def _client_data(self, conn: int, data: bytes) -> None:
        c = self.conns.get(conn)
        if c is None or c.input_closed or not data:
            return
        self._queue(conn, KIND_DATA, data)
        if c.pending_bytes > self.cfg.pending_limit and not c.paused:
            c.paused = True
            self._emit(PauseClient(conn))

    def _client_closed(self, conn: int, gone: bool) -> None:
        c = self.conns.get(conn)
        if c is None:
            return
        c.gone = c.gone or gone
        if c.gone:
            # Nobody reads its replies any more: its unsent output no longer holds its input back (what it sent
            # before it went still reaches the guest, like a request piped in and the socket closed).
            c.backlogged = False
        if not any(kind == KIND_CLOSE for kind, _ in c.pending) and not c.input_closed:
            self._queue(conn, KIND_CLOSE, b"")
        else:
            self._pump(conn)
        if conn in self.conns:
            self._reap(conn, c)

    def _client_backlog(self, conn: int, over: bool) -> None:
        c = self.conns.get(conn)
        if c is not None:
            c.backlogged = over
            if not over:
                self._pump(conn)

    def _queue(self, conn: int, kind: int, data: bytes) -> None:
        c = self.conns[conn]
        c.pending.append((kind, data))
        c.pending_bytes += len(data)
        self._pump(conn)

    def _can_forward(self) -> bool:
        act = self._node(self.active)
        return (self.service in SERVING and act is not None and act.connected and self.switchover is None
                and self.log_bytes <= self.cfg.max_log_bytes)

    def _pump(self, conn: int) -> None:
        c = self.conns.get(conn)
        if c is None or not self._can_forward():
            return
        while c.pending and not c.backlogged:
            kind, data = c.pending[0]
            if kind == KIND_DATA:
                room = self.cfg.credit - c.inflight
                if room <= 0:
                    break
                piece, rest = data[:room], data[room:]
                if rest:
                    c.pending[0] = (kind, rest)
                else:
                    c.pending.popleft()
                c.pending_bytes -= len(piece)
                c.inflight += len(piece)
                self._number(kind, conn, piece)
                self._inflight.append((self.input_seq, conn, len(piece)))
            else:
                c.pending.popleft()
                self._number(kind, conn, b"")
                if kind == KIND_CLOSE:
                    c.input_closed = True
        if c.paused and c.pending_bytes <= self.cfg.pending_limit // 2:
            c.paused = False
            self._emit(ResumeClient(conn))
        self._reap(conn, c)

    def _pump_all(self) -> None:
        for conn in list(self.conns):
            self._pump(conn)

    def _reap(self, conn: int, c: ConnState) -> None:
        if c.gone and c.input_closed:
            self.conns.pop(conn, None)

    def _number(self, kind: int, conn: int, data: bytes) -> None:
        """Give the input its sequence number, log it while a failover could need it, and send it."""
        self.input_seq += 1
        ev = NetEvent(self.input_seq, kind, conn, data)
        # Logged until a state that covers it exists: a commit (or a copy) with a secondary, the guest's taking
        # it without one. An input sent but not yet received would otherwise be lost to a copy made meanwhile.
        self.log.append(ev)
        self.log_bytes += len(data)
        msg = Input.checked_already(*ev)  # our own number, kind and connection, and a client's bytes: valid
        act = self._node(self.active)
        if act is not None:
            self._send(act, msg)
        mirror = self._node(self.mirror)
        if mirror is not None and self._comparing():
            self._send(mirror, msg)

    def _progress(self, taken: int) -> None:
        if taken <= self.taken:
            return
        self.taken = taken
        freed: set[int] = set()
        while self._inflight and self._inflight[0][0] <= taken:
            _, conn, nbytes = self._inflight.popleft()
            c = self.conns.get(conn)
            if c is not None:
                c.inflight -= nbytes
                freed.add(conn)
        for conn in freed:
            self._pump(conn)
        if self.secondary is None and self.promoting is None:
            self._trim_log(taken)

    def _trim_log(self, upto: int) -> None:
        was_full = self.log_bytes > self.cfg.max_log_bytes
        while self.log and self.log[0].seq <= upto:
            self.log_bytes -= len(self.log.popleft().data)
        if was_full and self.log_bytes <= self.cfg.max_log_bytes:
            self._pump_all()

    # -- output -----------------------------------------------------------------------------------------------
    def _output(self, n: NodeView, msg: Output) -> None:
        ev = msg.event
        if self.comparer is not None and self.comparer.failed_over:
            # After a hybrid failover the survivor's output goes straight through (its numbering is its own).
            self.released_seq = max(self.released_seq, ev.seq)
            self._compare_actions(self.comparer.secondary_output(ev.kind, ev.conn, ev.data, self._t()))
            return
        if self._comparing():
            assert self.comparer is not None
            if ev.seq <= self.comparer.last_primary_seq:
                return  # a repeat (a promoted node repeating itself): the comparer has it
            if ev.seq != self.comparer.last_primary_seq + 1:  # a node's bug: nothing can be compared with it
                self._record("output-gap", node=n.id, seq=ev.seq, expected=self.comparer.last_primary_seq + 1,
                             level="error")
                return
            self._compare_actions(self.comparer.primary_output(ev.seq, ev.kind, ev.conn, ev.data, self._t()))
            if self.trace:
                self._trace_compare(ev.conn)
            return
        if ev.seq <= self.released_seq or ev.seq in self.held:
            return  # already released (a promoted node repeating itself) or already held
        if self.service is S.PROTECTED:
            self.held[ev.seq] = ev
            if self.trace:  # covered by the checkpoint of the epoch after the last commit
                self._trace_output("held", ev, epoch=self.commit_epoch + 1, held=len(self.held))
        else:
            self._release(ev)

    def _release(self, ev: NetEvent, epoch: int | None = None) -> None:
        self.released_seq = max(self.released_seq, ev.seq)
        if self.trace:
            self._trace_output("released", ev, epoch=epoch, held=len(self.held))
        self._to_client(ev)

    def _trace_output(self, action: str, ev: NetEvent, **details: Any) -> None:
        self._trace("output", action=action, seq=ev.seq, conn=ev.conn, kind=ev.kind, bytes=len(ev.data),
                    data=ev.data[:256], **details)

    def _drop_held(self, why: str) -> None:
        """Held output no client will see (the state that produced it is gone)."""
        if self.trace:
            for seq in sorted(self.held):
                self._trace_output("dropped", self.held[seq], reason=why, held=0)
        self.held.clear()

    def _trace_compare(self, conn: int) -> None:
        """Hybrid: where the two VMs' streams on `conn` stand (released prefix, what each holds, the difference)."""
        if self.trace and self.comparer is not None:
            self._trace("compare", conn=conn, **self.comparer.snapshot(conn))

    def _to_client(self, ev: NetEvent) -> None:
        if ev.conn not in self.conns:
            return  # a connection of a gateway that is gone, or a client that left
        if ev.kind == KIND_DATA:
            self._emit(ToClient(ev.conn, ev.data, ev.seq))
        elif ev.kind == KIND_CLOSE:
            self._guest_closed(ev.conn)

    def _guest_closed(self, conn: int) -> None:
        """The guest closed `conn`: the client gets everything released before, then the close; the guest needs
        no CLOSE input for it, and the client's further input goes nowhere."""
        c = self.conns[conn]
        self._emit(CloseClient(conn, "the guest closed the connection"))
        c.pending.clear()
        c.pending_bytes = 0
        c.input_closed = True
        self._reap(conn, c)

    def _release_upto(self, seq: int, epoch: int | None = None) -> None:
        for s in sorted(k for k in self.held if k <= seq):
            self._release(self.held.pop(s), epoch)

    def _commit(self, msg: Commit) -> None:
        self.primary_committed = msg.epoch
        self.commit_epoch = msg.epoch
        self.commit_output_seq = msg.output_seq
        if self.comparer is not None and self._comparing():
            self._compare_actions(self.comparer.checkpoint_committed(msg.output_seq))
            self.checkpoint_asked = False
            for conn in self.conns if self.trace else ():
                self._trace_compare(conn)  # the primary's held output went out; the secondary's is void
        self._release_upto(msg.output_seq, msg.epoch)
        self._trim_log(msg.input_seq)
        sec = self._node(self.secondary)
        if self.hybrid and sec is not None:
            self._drain_secondary(sec)

    def _protection(self, n: NodeView, msg: Protection) -> None:
        if msg.attempt and self.protects_sent and msg.attempt != self.protect_attempt:
            # A report on a copy abandoned since (sent before the primary read our unprotect, and slow to come):
            # taking it for the current copy would count on a secondary that may hold nothing. (Before our first
            # protect, a report is on a pair this gateway learned: it counts, whatever number it carries.)
            self._record("stale-protection", node=n.id, attempt=msg.attempt, current=self.protect_attempt,
                         state=msg.state.value, level="warning")
            return
        if msg.state == ProtectionState.PROTECTED:
            if msg.peer != self.secondary or self.service is not S.PROTECTING:
                self._record("unexpected", node=n.id, message="protection", peer=msg.peer, level="warning")
                return
            self._go("protected")
            self._unvoid(msg.peer)
            self.commit_epoch = msg.epoch
            self.primary_committed = msg.epoch  # the copy is this node's checkpoint `epoch`
            self.commit_output_seq = msg.output_seq
            self._trim_log(msg.input_seq)
            self._record("protected", node=n.id, secondary=msg.peer, epoch=msg.epoch)
            return
        self._record("unprotected", node=n.id, reason=msg.reason, level="warning")
        if self.switchover is not None:
            self._record("switchover-failed", node=n.id, reason=msg.reason, level="error")
            self.switchover = None
            self._pump_all()
        sec = self._node(self.secondary)
        copying = self.service is S.PROTECTING
        if self.service in (S.PROTECTING, S.PROTECTED):
            self._go("unprotected")
        self._unprotected(sec)
        if sec is not None:
            self.secondary = None
            if sec.connected:
                # The copy failed, or the pair lost each other (a refused frame, a cut link): the secondary's copy
                # no longer covers what clients saw. It starts again as a spare, copied anew after a pause (not at
                # once: the same failure would repeat in a loop).
                self._reset(sec, f"the primary dropped it: {msg.reason}" if not copying else
                            f"the copy failed: {msg.reason}")
            else:
                self._fence(sec, f"the primary dropped it: {msg.reason}")
        self._assign_protection()

    def _unprotected(self, left: NodeView | None) -> None:
        """The active node goes on alone: release everything held, stop comparing and mirroring. `left`: the
        secondary it goes on without, whose copy is voided first (durably: no restart may promote it)."""
        self._stop_comparing()
        if left is not None:
            self._void(left)
        self._release_upto(1 << 62)
        self.failover_request_at = None
        if self.secondary is None and self.promoting is None:
            self._trim_log(self.taken)

    def _guest_ended(self, n: NodeView, msg: GuestEnded) -> None:
        if self.service is S.ENDED:
            return
        self._go("guest-ended")
        self.ended_code = msg.code
        self._stop_comparing()
        sec = self._node(self.secondary)
        if sec is not None:
            self._void(sec)  # it is told to shut down; should it not hear that, no restart may promote it
        self._release_upto(1 << 62)
        self._record("guest-ended", node=n.id, code=msg.code, reason=msg.reason,
                     level="warning" if msg.code else "info")
        for conn in list(self.conns):
            self._emit(CloseClient(conn, "the guest has ended"))
        self.conns.clear()
        for other in self.nodes.values():
            if other.id != n.id and other.link is not None and not other.lost:
                self._send(other, Shutdown("the guest has ended"))
        self._emit(ListenClients(True))  # new clients are refused at once

    # -- protection -------------------------------------------------------------------------------------------
    def _assign_protection(self) -> None:
        """An active node with no secondary gets the first secondary that waits as a spare."""
        act = self._node(self.active)
        if act is None or self.service is not S.ALONE or self.secondary is not None or not act.connected:
            return
        assert self.now is not None
        spares = [n for n in self.nodes.values() if n.role == "spare" and n.connected and n.address
                  and n.not_before <= self.now and self._compatible(n, act)]
        if not spares:
            return
        sec = min(spares, key=lambda n: n.since)
        self.secondary = sec.id
        if self.comparer is not None and self.comparer.failed_over:
            self.comparer = None  # a new pair: compare again once the new secondary runs (its first resync)
        sec.role = "secondary"
        sec.peer = act.id
        self._go("copy-started")
        self.protect_attempt += 1
        self.protects_sent += 1
        self._record("protect", node=act.id, secondary=sec.id, address=sec.address, attempt=self.protect_attempt)
        self._send(act, Protect(sec.id, sec.address, self.protect_attempt))

    def _compatible(self, spare: NodeView, act: NodeView) -> bool:
        """Whether `spare` can protect `act`: it reads the same state format, and runs for the same guest and RAM
        if it was started for one. A mismatch is recorded once per pair, with the reason; nothing is sent."""
        why = incompatible(spare.info or spare.hello.info, act.info or act.hello.info)
        if why and (spare.id, act.id) not in self._refused_pairs:
            self._refused_pairs.add((spare.id, act.id))
            self._record("incompatible", node=spare.id, primary=act.id, reason=why, level="warning")
        return not why

    def _failover_request(self, n: NodeView, reason: str) -> None:
        self._record("failover-request", node=n.id, reason=reason)
        if self.service in (S.ENDED, S.STOPPED):
            return  # the service ended on purpose: nothing to take over
        act = self._node(self.active)
        if act is not None and not act.connected and self.service is S.PROTECTED:
            return  # already being handled as the active node's loss
        if self.service is not S.PROTECTED:
            self._lose_secondary(n, f"it lost the primary before holding a complete copy ({reason})", fence=True)
            return
        if self.failover_request_at is None:
            assert self.now is not None
            self.failover_request_at = self.now

    # -- losing nodes -----------------------------------------------------------------------------------------
    def _link_closed(self, link: int, why: str) -> None:
        node_id = self.links.pop(link, None)
        n = self._node(node_id)
        if n is None or n.link != link:
            return
        n.link = None
        self._lose(n, f"connection closed: {why}")

    def _node_silent(self, n: NodeView) -> None:
        n.silent = True
        self._record("silent", node=n.id, role=n.role, seconds=self.cfg.heartbeat_timeout, level="warning")
        if n.id == self.active and self.service is S.PROTECTED:
            self._lose(n, f"silent for more than {self.cfg.heartbeat_timeout} s")
        elif n.id == self.active:
            # Nobody can take over: keep its link, it may speak again (a stalled host), and its VM is the
            # only one. Until then the service is down.
            if self.service in SERVING:
                self._go("active-lost")
                self._record("down", reason=f"the active node {n.id} is silent and nothing can take over",
                             level="error")
        elif n.id in (self.secondary, self.promoting):
            self._lose(n, f"silent for more than {self.cfg.heartbeat_timeout} s")

    def _lose(self, n: NodeView, why: str) -> None:
        """`n` is no longer part of the service."""
        if n.lost:
            return
        was_active, was_promoting = n.id == self.active, n.id == self.promoting
        n.lost, n.lost_at = why, self.wall
        if self.service in (S.ENDED, S.STOPPED):
            self._record("left", node=n.id, role=n.role, reason=why)
            if n.link is not None:
                self._emit(CloseLink(n.link, why))
                self.links.pop(n.link, None)
                n.link = None
            return
        self._record("lost", node=n.id, role=n.role, reason=why, level="warning")
        if n.link is not None:
            self._fence(n, why)
        if was_active:
            self._active_lost(n, why)
        elif was_promoting:
            self.promoting = None
            self.active = None
            self.secondary = None
            self._go("promotion-failed")
            self._record("down", reason="the secondary was lost while taking over", level="error")
            self._close_all_clients("no node holds the service")
        elif n.id == self.secondary:
            self._lose_secondary(n, why, fence=False)

    def _lose_secondary(self, n: NodeView, why: str, *, fence: bool) -> None:
        if n.id == self.secondary:
            self.secondary = None
            self.failover_request_at = None
            if self.service in (S.PROTECTING, S.PROTECTED):
                self._go("secondary-lost")
                self._record("unprotected", node=self.active, reason=f"the secondary {n.id} was lost: {why}",
                             level="warning")
            if n.id == self.mirror:
                self._stop_comparing()
            self._unprotected(n)
            act = self._node(self.active)
            if act is not None and act.link is not None:
                self._send(act, Unprotect(f"the secondary {n.id} was lost: {why}"))
        if fence and not n.lost:
            if n.connected:
                self._reset(n, why)  # heard, only out of step with the primary: a spare again, copied anew
            else:
                n.lost, n.lost_at = why, self.wall
                self._record("lost", node=n.id, role=n.role, reason=why, level="warning")
                if n.link is not None:
                    self._fence(n, why)
        self._assign_protection()

    def _active_lost(self, n: NodeView, why: str) -> None:
        sec = self._node(self.secondary)
        if self.service is S.PROTECTED and sec is not None and sec.connected:
            self.active = None
            self._go("active-lost")
            self._promote(sec, f"the primary was lost: {why}")
            return
        was = self.service
        self.active = None
        if was in SERVING:
            self._go("active-lost")
        self._record("down", reason=f"the active node is gone ({why}) and no secondary holds a complete copy",
                     level="error")
        if sec is not None:
            self.secondary = None
            if was is S.PROTECTING and sec.connected:
                sec.role, sec.peer = "spare", ""  # its partial copy is discarded: it waits as a spare again
            else:
                self._fence(sec, "the primary is gone and was not protected: there is nothing to take over")
        self._close_all_clients("no node holds the service")
        self._emit(ListenClients(True))  # refuse new clients at once

    def _close_all_clients(self, why: str) -> None:
        for conn in list(self.conns):
            self._emit(CloseClient(conn, why))
        self.conns.clear()
        self._drop_held(why)
        self.log.clear()
        self.log_bytes = 0

    # -- failover ---------------------------------------------------------------------------------------------
    def _promote(self, sec: NodeView, why: str) -> None:
        assert self.now is not None
        self.generation += 1
        self.failover_started = self.now
        self.failover_request_at = None
        self.promoting = sec.id
        self.secondary = None
        self._promote_reason = why
        self._record("promote", node=sec.id, generation=self.generation, reason=why, level="warning")
        self._send(sec, Promote(self.generation, why))

    def _rollback(self, output_seq: int, events: Sequence[Sequence[Any]]) -> None:
        """Hybrid failover onto a checkpoint the survivor loaded: clients get the primary's output up to it."""
        assert self.comparer is not None
        try:
            self._compare_actions(self.comparer.failover_rollback(output_seq, events))
        except ValueError as e:
            # Output that state covers is neither here nor in it: a stream with a hole must reach no client.
            # Their connections end (the guest is told), the service goes on for the clients that come next.
            self._record("output-lost", reason=str(e), level="error")
            self.comparer.failover_discard()
            self._close_all_clients("the failover lost output of this connection")

    def _promoted(self, n: NodeView, msg: Promoted) -> None:
        self._on_promoted(n, msg)

    def _on_promoted(self, n: NodeView, ev: Promoted) -> None:
        if self.hybrid and self.mirror is None and self.comparer is not None and self.comparer.failed_over:
            pass  # already rolled back to the checkpoint it holds (see _drain_secondary)
        elif self.hybrid and self.mirror == n.id and self.comparer is not None:
            if ev.epoch > self.synced_epoch:
                # It loaded a checkpoint that arrived complete as the primary died: clients must see exactly
                # the primary's output up to that checkpoint, nothing of either VM beyond it.
                self._rollback(ev.output_seq, ev.events)
            else:
                # It goes on from its own running state, which produced everything clients saw: release the
                # output it has that the comparer still holds.
                self._compare_actions(self.comparer.failover_continue())
            self.mirror = None
        else:
            # Outputs the surviving state covers: fill in any we never got, release them all, in order.
            for entry in ev.events:
                seq, kind, conn, data = entry
                if self.released_seq < seq <= ev.output_seq and seq not in self.held:
                    self.held[seq] = NetEvent(seq, kind, conn, data)
            self._release_upto(ev.output_seq, ev.epoch)
        dropped = sorted(self.held)
        self._drop_held("beyond the survivor's state")  # never seen by a client; the survivor will redo it
        self.promoting = None
        self.active = n.id
        n.role = "primary"
        n.generation = ev.generation
        n.peer = ""
        self.failovers += 1
        self._go("promoted")
        # Input numbering goes on past everything the survivor may have received (from a gateway that is gone, too).
        self.input_seq = max(self.input_seq, ev.input_seq, n.hello.input_seq)
        replay = [e for e in self.log if e.seq > ev.input_seq]
        if replay and replay[0].seq > ev.input_seq + 1:
            # The log starts after its checkpoint (a gateway that restarted since): the inputs in between were
            # for clients of that gateway, all gone.
            self._send(n, InputFloor(replay[0].seq - 1))
        elif not replay and self.input_seq > ev.input_seq:
            self._send(n, InputFloor(self.input_seq))
        for e in replay:
            self._send(n, Input(*e))
        self.log.clear()
        self.log_bytes = 0
        self.taken = ev.input_seq
        self._inflight.clear()
        for c in self.conns.values():
            c.inflight = 0
        for e in replay:
            if e.kind == KIND_DATA and e.conn in self.conns:
                self.conns[e.conn].inflight += len(e.data)
                self._inflight.append((e.seq, e.conn, len(e.data)))
        # The survivor numbers its output on from its own state (after a hybrid failover that is not the primary's
        # numbering); what the old primary numbered past it was held, or for clients of a gateway that is gone.
        self.released_seq = ev.output_seq
        self._close_stale_conns(n, ev.conns, {e.conn for e in replay if e.kind == KIND_CLOSE})
        took = (self.now - self.failover_started) * 1e3 if self.now is not None and self.failover_started else 0.0
        self._record("promoted", node=n.id, generation=self.generation, epoch=ev.epoch, replayed=len(replay),
                     failover_ms=round(took, 1), reason=self._promote_reason, level="warning")
        self._trace("takeover", node=n.id, epoch=ev.epoch, input_seq=ev.input_seq, output_seq=ev.output_seq,
                    dropped=dropped, replayed=[e.seq for e in replay])
        self._pump_all()
        self._assign_protection()

    def manual_failover(self, reason: str) -> tuple[bool, str]:
        act, sec = self._node(self.active), self._node(self.secondary)
        if act is None or self.service not in SERVING:
            return False, f"there is no active primary to fail over from (the service is {self.service.value})"
        if sec is None or not self.protected:
            return False, "there is no ready secondary to take over"
        self.active = None
        self._fence(act, f"manual failover: {reason}")
        act.lost, act.lost_at = f"manual failover: {reason}", self.wall
        self._go("manual-failover")
        self._promote(sec, f"manual failover: {reason}")
        return True, "failover started: the secondary takes over"

    def start_switchover(self, swap: bool, reason: str) -> tuple[bool, str]:
        """A planned move of the service to the secondary at a checkpoint boundary: the primary takes a checkpoint
        and holds still after it; the secondary is promoted from exactly that checkpoint (`_handed_over`)."""
        act, sec = self._node(self.active), self._node(self.secondary)
        if act is None or self.service not in SERVING:
            return False, f"there is no active primary to switch over from (the service is {self.service.value})"
        if sec is None or not self.protected:
            return False, "there is no ready secondary to switch over to"
        if self.switchover is not None:
            return False, "a switchover is already under way"
        assert self.now is not None
        self.switchover = (act.id, swap, self.now)
        self._record("switchover", node=act.id, secondary=sec.id, swap=swap, reason=reason)
        self._send(act, Handover(reason))
        return True, "switchover started: the primary checkpoints, then the secondary takes over"

    def _handed_over(self, n: NodeView, msg: HandedOver) -> None:
        assert self.switchover is not None and self.now is not None
        _, swap, started = self.switchover
        self.switchover = None
        sec = self._node(self.secondary)
        if sec is None or not sec.connected or self.service is not S.PROTECTED:
            self._record("switchover-failed", node=n.id, reason="the secondary was lost meanwhile", level="error")
            self._pump_all()
            return
        self.active = None
        self.commit_epoch = msg.epoch
        self._go("handed-over")
        if swap:
            # It stays, as a spare: the new primary copies its VM to it (it discards its own).
            n.role, n.peer, n.address = "spare", "", ""
            n.not_before = self.now
            self._record("demoted", node=n.id)
            self._send(n, Demote("switchover: the secondary takes over; wait as a spare"))
        else:
            n.lost, n.lost_at = "switched over", self.wall
            self._send(n, Shutdown("switchover: the secondary took over"))
        self._promote(sec, f"switchover from {n.id} at checkpoint {msg.epoch}")
        self.failover_started = started  # the stall clients see runs from the request

    # -- hybrid mode ------------------------------------------------------------------------------------------
    def _comparing(self) -> bool:
        """Hybrid mode with a running secondary: outputs are released when both VMs produced them."""
        return self.hybrid and self.mirror is not None and self.comparer is not None

    def _t(self) -> float:
        assert self.now is not None
        return self.now

    def _compare_actions(self, actions: list[CompareAction]) -> None:
        if self.comparer is not None and actions:
            self.released_seq = max(self.released_seq, self.comparer.released_seq)
        for a in actions:
            if isinstance(a, Release):
                if a.conn in self.conns:
                    self._emit(ToClient(a.conn, a.data))
                    if self.trace:  # not even the arguments while nobody watches: every reply passes here
                        self._trace("output", action="released", conn=a.conn, bytes=len(a.data), data=a.data[:256],
                                    compared=True)
            elif isinstance(a, ReleaseClose):
                if a.conn in self.conns:
                    self._guest_closed(a.conn)
            elif isinstance(a, NeedCheckpoint):
                self._ask_checkpoint(a.trigger, a.reason)

    def _ask_checkpoint(self, trigger: Trigger, why: str) -> None:
        act = self._node(self.active)
        if act is None or self.checkpoint_asked:
            return
        self.checkpoint_asked = True
        self._record("checkpoint-asked", trigger=str(trigger), reason=why)
        self._send(act, CheckpointNow(trigger))

    def _drain_secondary(self, n: NodeView) -> None:
        """Hybrid: handle the secondary's events in order. Its marker "I loaded checkpoint E" waits until the
        primary's commit of E has been handled: output it sends after the marker belongs to the new state and
        must not be dropped with the old."""
        while self.sec_queue:
            ev = self.sec_queue[0]
            if isinstance(ev, Resynced) and 0 < ev.epoch and ev.epoch > self.primary_committed:
                promoted = next((e for e in self.sec_queue if isinstance(e, Promoted)), None)
                if self.promoting is None or promoted is None:
                    return  # wait for the primary's commit of this epoch (or for the promotion report)
                # The primary died before committing E, but the secondary holds E: clients must see exactly
                # the primary's output up to E (the primary never ran past E: it resumes after the commit).
                self.sec_queue.popleft()
                if self.comparer is not None:
                    self._rollback(ev.output_seq, promoted.events)
                self.mirror = None
                continue
            self.sec_queue.popleft()
            if isinstance(ev, Resynced):
                self._secondary_synced(n, ev)
            elif isinstance(ev, Promoted):
                if n.id == self.promoting:
                    self._on_promoted(n, ev)
            elif not isinstance(ev, Output):
                continue
            elif self.comparer is not None and ((self._comparing() and n.id == self.mirror) or (
                    self.comparer.failed_over and n.id in (self.active, self.promoting))):
                # Compared with the primary's; after a failover the comparer passes the survivor's output
                # straight through (its output numbers are its own, not the primary's).
                e = ev.event
                self._compare_actions(self.comparer.secondary_output(e.kind, e.conn, e.data, self._t()))
                if self.trace:
                    self._trace_compare(e.conn)
            elif n.id == self.active:
                self._output(n, ev)

    def _secondary_synced(self, n: NodeView, ev: Resynced) -> None:
        """Hybrid: the secondary's VM now equals checkpoint `epoch`. Its earlier output is from a run that no
        longer exists; it needs every input after input_seq (the first time: it starts receiving inputs). It
        counts from the node being promoted as well: sent before it heard of the promotion, it says that node goes
        on from checkpoint `epoch` and its own run after it, not from a checkpoint still to be loaded (if it was
        mirroring already: a first one starts no comparison with a node that is taking over)."""
        if n.id != self.secondary and not (n.id == self.promoting and n.id == self.mirror):
            return
        self.synced_epoch = ev.epoch
        first = self.mirror != n.id
        if first:
            self.comparer = OutputComparer(timeout=self.cfg.compare_timeout, max_pending=self.cfg.max_pending,
                                           released_seq=self.released_seq)
        elif self.comparer is not None:
            self.comparer.secondary_resynced()
        self.mirror = n.id
        for logged in self.log:
            if logged.seq > ev.input_seq:
                self._send(n, Input(*logged))
        if first:
            self._record("mirroring", node=n.id, epoch=ev.epoch, input_seq=ev.input_seq)
            held, self.held = self.held, {}
            assert self.comparer is not None
            for seq in sorted(held):  # the primary's output since the copy: the secondary will produce it too
                e = held[seq]
                self._compare_actions(self.comparer.primary_output(seq, e.kind, e.conn, e.data, self._t()))

    def _stop_comparing(self) -> None:
        """Hybrid, the secondary is gone: the primary's output the comparer holds may go now; compare no more."""
        if self.comparer is not None and self._comparing() and not self.comparer.failed_over:
            self._compare_actions(self.comparer.checkpoint_committed(self.comparer.last_primary_seq))
        self.mirror = None
        if self.comparer is not None and not self.comparer.failed_over:
            self.comparer = None
        self.sec_queue.clear()
        self.checkpoint_asked = False

    # -- control ----------------------------------------------------------------------------------------------
    def _control(self, link: int, msg: Message) -> None:
        if isinstance(msg, StatusRequest):
            self._emit(Send(link, StatusReply(self.status())))
        elif isinstance(msg, FailoverCommand):
            ok, why = self.manual_failover(msg.reason)
            self._emit(Send(link, CommandResult(ok, why)))
        elif isinstance(msg, SwitchoverCommand):
            ok, why = self.start_switchover(msg.swap, msg.reason)
            self._emit(Send(link, CommandResult(ok, why)))
        elif isinstance(msg, CheckpointCommand):
            ok, why = self.manual_checkpoint(msg.reason)
            self._emit(Send(link, CommandResult(ok, why)))
        elif isinstance(msg, StepCommand):
            self._emit(Send(link, CommandResult(*self.set_step(msg))))
        elif isinstance(msg, ShutdownCommand):
            self._emit(Send(link, CommandResult(True, "the service is stopping")))
            self._shutdown(msg.reason)
        elif not isinstance(msg, Heartbeat):
            self._emit(Send(link, CommandResult(False, f"unexpected {msg.NAME}")))

    def manual_checkpoint(self, reason: str) -> tuple[bool, str]:
        """An operator asks for a checkpoint now (trigger manual)."""
        act = self._node(self.active)
        if act is None or self.service not in SERVING:
            return False, f"there is no active primary (the service is {self.service.value})"
        if self.secondary is None or self.service is not S.PROTECTED:
            return False, "the primary has no secondary to checkpoint to"
        self._record("checkpoint-asked", trigger=str(Trigger.MANUAL), reason=reason)
        self._send(act, CheckpointNow(Trigger.MANUAL))
        return True, "checkpoint requested"

    def set_step(self, msg: StepCommand) -> tuple[bool, str]:
        """Step mode and slow motion (teaching): tell every node; grant `msg.grant` messages to `msg.target`."""
        changed = (msg.on, msg.delay_ms) != (self.step.on, self.step.delay_ms)
        if msg.target and msg.grant and msg.target not in self.nodes:
            return False, f"no node {msg.target}"
        self.step = Step(msg.on, msg.delay_ms, 0)
        for n in self.nodes.values():
            if n.link is not None and (changed or n.id == msg.target):
                self._send(n, Step(msg.on, msg.delay_ms, msg.grant if n.id == msg.target else 0))
        if changed:
            self._record("step-mode", on=msg.on, delay_ms=msg.delay_ms)
        elif msg.grant:
            self._trace("step", node=msg.target, grant=msg.grant)
        return True, "stepping" if msg.on else ("slow motion" if msg.delay_ms else "running")

    def _shutdown(self, reason: str) -> None:
        if self.service is S.STOPPED:
            return
        self._go("shutdown")
        self._record("shutdown", reason=reason)
        # Stop the secondary first, so that the primary's going cannot look like a failure to anyone.
        order = sorted(self.nodes.values(), key=lambda n: n.id == self.active)
        for n in order:
            if n.link is not None:
                self._send(n, Shutdown(reason))
        for conn in list(self.conns):
            self._emit(CloseClient(conn, "the service was stopped"))
        self.conns.clear()
        self.active = self.secondary = self.promoting = None
        self._emit(Exit(reason))

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        def view(n: NodeView | None) -> dict[str, Any]:
            if n is None:
                return {"connected": False}
            d = dict(n.info)
            d.update(id=n.id, role=n.role, generation=n.generation, connected=n.connected,
                     active=n.id == self.active, silent=n.silent, address=n.address or d.get("address"))
            if n.lost:
                d.update(lost=n.lost, lost_at=round(n.lost_at, 3))
            return d

        sec = self._node(self.secondary) or self._node(self.promoting)
        spares = [view(n) for n in self.nodes.values() if n.role == "spare" and n.connected]
        lost = [view(n) for n in self.nodes.values() if n.lost]
        return {
            "gateway": {**self.about, "id": self.id, "service_state": self.service.value, "protected": self.protected,
                        "generation": self.generation, "failovers": self.failovers, "mode": self.cfg.mode,
                        "clients": len(self.conns), "input_seq": self.input_seq,
                        "released_output_seq": self.released_seq, "held_outputs": len(self.held),
                        "logged_inputs": len(self.log), "ended_code": self.ended_code,
                        "compare_held_bytes": self.comparer.held_total() if self.comparer is not None else 0,
                        "voided": dict(self.voids)},
            "nodes": {"primary": view(self._node(self.active)), "secondary": view(sec)},
            "spares": spares,
            "lost": lost[-10:],
            "events": self.events[-20:],
        }

    # -- helpers ----------------------------------------------------------------------------------------------
    def _node(self, node_id: str | None) -> NodeView | None:
        return self.nodes.get(node_id) if node_id is not None else None

    def _send(self, n: NodeView, msg: Message) -> None:
        if n.link is not None:
            self._emit(Send(n.link, msg))

    def _fence(self, n: NodeView, why: str) -> None:
        if n.link is not None:
            self._fence_link(n.link, why)
            self.links.pop(n.link, None)
            n.link = None
        if not n.lost:
            n.lost, n.lost_at = f"fenced: {why}", self.wall
        if self.active == n.id:
            self.active = None

    # -- voided copies ----------------------------------------------------------------------------------------
    def _void(self, n: NodeView) -> None:
        """No copy `n` holds now may ever be promoted: persist that before anything is released past it."""
        gen = max(self.generation, n.generation)
        if self.voids.get(n.id, -1) >= gen:
            return
        self.voids.pop(n.id, None)
        self.voids[n.id] = gen
        while len(self.voids) > MAX_VOIDS:
            del self.voids[next(iter(self.voids))]
        self._record("copy-voided", node=n.id, generation=gen, level="warning")
        self._persist()

    def _unvoid(self, node: str) -> None:
        """`node` completed a new copy of the active node: that one counts."""
        if self.voids.pop(node, None) is not None:
            self._persist()

    def _persist(self) -> None:
        self._emit(Persist({"format": DURABLE_FORMAT, "void": dict(self.voids)}))

    def _voided(self, n: NodeView) -> bool:
        return n.generation <= self.voids.get(n.id, -1)

    def _reset(self, n: NodeView, why: str) -> None:
        """`n` goes back to being a spare: it discards its copy, and is paired again after a pause."""
        assert self.now is not None
        if self.secondary == n.id:
            self.secondary = None
        n.role, n.peer = "spare", ""
        n.not_before = self.now + 2 * self.cfg.heartbeat_timeout
        self._record("reset", node=n.id, reason=why, level="warning")
        self._send(n, Reset(why))

    def _fence_link(self, link: int, why: str) -> None:
        self._emit(Send(link, Fence(why)))
        self._emit(CloseLink(link, f"fenced: {why}"))
        self._record("fenced", node=self.links.get(link), reason=why, level="warning")

    def _forget(self, n: NodeView, why: str) -> None:
        n.lost, n.lost_at = why, self.wall

    def _go(self, what: str) -> None:
        nxt = SERVICE_TRANSITIONS.get((self.service, what))
        if nxt is None:
            raise WitnessError(f"the witness cannot go from {self.service.value} on {what!r}")
        if nxt is not self.service:
            self._record("service", was=self.service.value, now=nxt.value, on=what)
        if self.service is S.LEARNING and nxt is not S.LEARNING:
            self._emit(ListenClients(True))  # from now on clients are served, or told at once that they cannot be
        self.service = nxt

    def _emit(self, action: WitnessAction) -> None:
        self._out.append(action)

    def _trace(self, what: str, **details: Any) -> None:
        """A Record for the event stream only (self.trace: the gateway has a sink): no log line, not in the status."""
        if self.trace:
            self._emit(Record({"event": what, **details}, "trace"))

    def _record(self, what: str, level: str = "info", **details: Any) -> None:
        entry = {"time": round(self.wall, 3), "event": what, **{k: v for k, v in details.items() if v is not None}}
        if what != "service":
            self.events.append(entry)
            del self.events[:-200]
        if what == "down":
            self.down_reason = str(details.get("reason") or self.down_reason)
        self._emit(Record(entry, level))
