"""The witness (colo.witness), driven in-process through every failure sequence: no sockets, no clocks.

A `Harness` owns one `Witness`, feeds it events (time only through `Tick`), keeps every action it answered
and knows which link each node is on, so a test reads as the sequence it checks: attach a spare and a primary,
protect, output, commit, lose a node, promote. Known witness bugs are `xfail(strict=True)` tests with the
minimal sequence that shows them; they start passing (and so fail) when the witness is fixed.
"""
# Harness.service is a property that changes with every event fed in, but mypy keeps the narrowing of an earlier
# `assert h.service is S.X` and calls the next `h.service is S.Y` a non-overlapping check.
# mypy: disable-error-code="comparison-overlap"
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from colo.messages import (
    KIND_CLOSE,
    KIND_DATA,
    KIND_OPEN,
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
    SwitchoverCommand,
    Trigger,
    Unprotect,
    Welcome,
)
from colo.witness import (
    DURABLE_FORMAT,
    SERVICE_TRANSITIONS,
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
    Service,
    Tick,
    ToClient,
    Witness,
    WitnessConfig,
    WitnessError,
    load_voids,
)

S = Service
TIMEOUT = 0.8  # the default heartbeat timeout; ticks below are shorter than the stall threshold (0.4 s)
STEP = 0.2
CONTROL = 9999  # the link id of the control connection
M = TypeVar("M", bound=Message)


# -- the harness ----------------------------------------------------------------------------------------------


def hello(role: str, node: str, *, generation: int = 0, epoch: int = 0, input_seq: int = 0, output_seq: int = 0,
          conns: Iterable[int] = (), gateway: str = "", address: str = "", peer: str = "",
          info: dict[str, Any] | None = None) -> NodeHello:
    return NodeHello(role, node, generation, epoch, input_seq, output_seq, list(conns), gateway, address, peer,
                     info or {})


@dataclass
class Node:
    """The test's handle on one node: its id, the link it is on, the generation it was last told."""

    id: str
    link: int
    gen: int = 0


class Harness:
    """One witness, every action it ever answered (`log`), and the nodes' links."""

    def __init__(self, mode: str = "periodic", **cfg: Any) -> None:
        self.w = Witness(WitnessConfig(mode=mode, gateway_id="gw", **cfg))
        self.now = 0.0
        self.log: list[Any] = []
        self.last: list[Any] = []
        self.transitions: list[tuple[Service, str]] = []  # every (state, what) the witness took
        self._links = itertools.count(1)
        self._tokens = itertools.count(1)
        self.nodes: dict[str, Node] = {}
        go = self.w._go

        def spy(what: str) -> None:  # record the table entries taken, without touching the witness's code
            self.transitions.append((self.w.service, what))
            go(what)

        self.w._go = spy  # type: ignore[method-assign]
        self.send(Tick(0.0, 1000.0))

    # -- events ---------------------------------------------------------------------------------------------
    def send(self, event: Any) -> list[Any]:
        acts = self.w.handle(event)
        self.log.extend(acts)
        self.last = acts
        for a in acts:  # a node obeys the generation it is told (welcome, promote)
            if isinstance(a, Send) and isinstance(a.msg, (Welcome, Promote)):
                for n in self.nodes.values():
                    if n.link == a.link:
                        n.gen = max(n.gen, a.msg.generation)
        return acts

    @property
    def service(self) -> Service:
        return self.w.service

    def mark(self) -> int:
        return len(self.log)

    def since(self, mark: int) -> list[Any]:
        return self.log[mark:]

    def tick(self, dt: float = STEP, heard: Iterable[Node] = ()) -> list[Any]:
        """Time passes by `dt`; the nodes in `heard` sent a heartbeat just before."""
        mark = self.mark()
        for n in heard:
            self.msg(n, Heartbeat())
        self.now += dt
        self.send(Tick(self.now, 1000.0 + self.now))
        return self.since(mark)

    def run_for(self, seconds: float, heard: Iterable[Node] = ()) -> list[Any]:
        """Ticks of STEP (a running gateway, not a stall) for `seconds`, hearing `heard` before each."""
        heard = list(heard)
        mark = self.mark()
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.tick(min(STEP, end - self.now), heard)
        return self.since(mark)

    def attach(self, role: str, node_id: str, **kw: Any) -> Node:
        n = Node(node_id, next(self._links), kw.get("generation", 0))
        self.nodes[node_id] = n
        self.send(NodeAttached(n.link, hello(role, node_id, **kw)))
        return n

    def attach_primary(self, node_id: str = "p", **kw: Any) -> Node:
        return self.attach("primary", node_id, **kw)

    def attach_spare(self, node_id: str = "s", address: str | None = None, **kw: Any) -> Node:
        return self.attach("spare", node_id, address=address or f"10.0.0.{len(self.nodes) + 1}:7000", **kw)

    def attach_secondary(self, node_id: str = "s", **kw: Any) -> Node:
        kw.setdefault("address", "10.0.0.9:7000")
        return self.attach("secondary", node_id, **kw)

    def msg(self, n: Node | int, msg: Message) -> list[Any]:
        return self.send(NodeMessage(n.link if isinstance(n, Node) else n, msg))

    def output(self, n: Node, seq: int, conn: int, data: bytes = b"", kind: int = KIND_DATA,
               generation: int | None = None) -> list[Any]:
        return self.msg(n, Output(n.gen if generation is None else generation, seq, kind, conn, data))

    def commit(self, n: Node, epoch: int, input_seq: int, output_seq: int) -> list[Any]:
        return self.msg(n, Commit(n.gen, epoch, input_seq, output_seq))

    def protected(self, p: Node, secondary: Node, *, epoch: int = 0, input_seq: int | None = None,
                  output_seq: int | None = None) -> list[Any]:
        inp = self.w.input_seq if input_seq is None else input_seq
        out = self.w.released_seq if output_seq is None else output_seq
        return self.msg(p, Protection(p.gen, ProtectionState.PROTECTED, epoch, inp, out, secondary.id, ""))

    def unprotected(self, p: Node, reason: str = "the secondary went away") -> list[Any]:
        return self.msg(p, Protection(p.gen, ProtectionState.UNPROTECTED, 0, 0, 0, "", reason))

    def progress(self, p: Node, taken: int) -> list[Any]:
        return self.msg(p, Progress(p.gen, taken))

    def promoted(self, n: Node, *, epoch: int, input_seq: int, output_seq: int,
                 events: Iterable[tuple[int, int, int, bytes]] = (), conns: Iterable[int] = ()) -> list[Any]:
        return self.msg(n, Promoted(n.gen, epoch, input_seq, output_seq, [list(e) for e in events], list(conns)))

    def close_link(self, n: Node, why: str = "connection reset") -> list[Any]:
        return self.send(LinkClosed(n.link, why))

    def try_connect(self) -> list[Any]:
        return self.send(ClientConnected(next(self._tokens)))

    def connect(self) -> int:
        acts = self.try_connect()
        accepted: list[AcceptClient] = of(acts, AcceptClient)
        assert accepted, f"the client was not accepted: {acts}"
        return accepted[0].conn

    def data(self, conn: int, data: bytes) -> list[Any]:
        return self.send(ClientData(conn, data))

    def client_close(self, conn: int, gone: bool = False) -> list[Any]:
        return self.send(ClientClosed(conn, gone))

    def control(self, msg: Message) -> list[Any]:
        return self.send(ControlRequest(CONTROL, msg))

    # -- scenarios --------------------------------------------------------------------------------------------
    def protected_pair(self, primary: str = "p", spare: str = "s") -> tuple[Node, Node]:
        """A fresh gateway: a spare attaches, a primary attaches, Protect, the copy completes."""
        s = self.attach_spare(spare)
        p = self.attach_primary(primary)
        assert sent(self.last, p, Protect) == [Protect(s.id, self.w.nodes[s.id].address, self.w.protect_attempt)]
        self.protected(p, s)
        assert self.service is S.PROTECTED and self.w.protected
        return p, s


def of(actions: Iterable[Any], cls: type) -> list[Any]:
    return [a for a in actions if isinstance(a, cls)]


def sent(actions: Iterable[Any], n: Node | int, cls: type[M]) -> list[M]:
    """The messages of type `cls` the actions send to node (or link) `n`."""
    link = n.link if isinstance(n, Node) else n
    return [a.msg for a in actions if isinstance(a, Send) and a.link == link and isinstance(a.msg, cls)]


def fenced(actions: Iterable[Any], n: Node | int) -> bool:
    link = n.link if isinstance(n, Node) else n
    return bool(sent(actions, link, Fence)) and any(isinstance(a, CloseLink) and a.link == link for a in actions)


def reset(actions: Iterable[Any], n: Node | int) -> bool:
    """The witness told the node to discard its copy and wait as a spare (it stays connected)."""
    link = n.link if isinstance(n, Node) else n
    return bool(sent(actions, link, Reset)) and not any(isinstance(a, CloseLink) and a.link == link for a in actions)


def released(actions: Iterable[Any]) -> list[tuple[int, int, bytes]]:
    """(seq, conn, data) of every ToClient."""
    return [(a.seq, a.conn, a.data) for a in actions if isinstance(a, ToClient)]


def events_named(actions: Iterable[Any], name: str) -> list[dict[str, Any]]:
    return [a.entry for a in actions if isinstance(a, Record) and a.entry.get("event") == name]


def input_seqs(actions: Iterable[Any], n: Node) -> list[int]:
    return [m.seq for m in sent(actions, n, Input)]


def assert_contiguous(seqs: list[int], first: int) -> None:
    assert seqs == list(range(first, first + len(seqs))), f"inputs {seqs} are not {first}, {first + 1}, ..."


# -- fresh start ----------------------------------------------------------------------------------------------


def test_the_first_event_must_be_a_tick() -> None:
    w = Witness(WitnessConfig(gateway_id="gw"))
    with pytest.raises(WitnessError):
        w.handle(ClientConnected(1))


def test_a_fresh_gateway_listens_only_once_an_active_node_is_chosen() -> None:
    h = Harness()
    assert of(h.last, ListenClients) == [ListenClients(False)]
    assert h.service is S.LEARNING
    assert of(h.try_connect(), RefuseClient)  # nothing serves yet
    s = h.attach_spare()
    assert sent(h.last, s, Welcome) == [Welcome("gw", 0)]
    assert h.service is S.LEARNING  # a spare alone is not a service
    p = h.attach_primary()
    assert sent(h.last, p, Welcome) == [Welcome("gw", 0)]
    assert ListenClients(True) in h.last
    assert events_named(h.last, "active")[0]["node"] == "p"
    # The spare that waited is the secondary at once: the primary is told to copy its VM to it.
    assert sent(h.last, p, Protect) == [Protect("s", h.w.nodes["s"].address, h.w.protect_attempt)]
    assert h.service is S.PROTECTING and not h.w.protected
    h.protected(p, s)
    assert h.service is S.PROTECTED and h.w.protected
    assert h.w.status()["gateway"]["protected"] is True


def test_a_primary_alone_runs_unprotected_until_a_spare_attaches() -> None:
    h = Harness()
    p = h.attach_primary()
    assert h.service is S.ALONE
    assert not sent(h.last, p, Protect)
    s = h.attach_spare()
    assert sent(h.last, p, Protect) == [Protect(s.id, h.w.nodes[s.id].address, h.w.protect_attempt)]
    assert h.service is S.PROTECTING


def test_a_spare_without_an_address_is_never_chosen() -> None:
    h = Harness()
    p = h.attach_primary()
    h.attach("spare", "nowhere", address="")
    assert not sent(h.last, p, Protect) and h.service is S.ALONE


def test_learning_with_nobody_goes_down_after_the_grace_and_refuses_clients() -> None:
    h = Harness()
    h.attach_spare()
    acts = h.run_for(2 * TIMEOUT + STEP)
    assert h.service is S.DOWN
    assert ListenClients(True) in acts  # so that a client is refused at once instead of waiting
    assert of(h.try_connect(), RefuseClient)


@pytest.mark.parametrize("earlier", [False, True], ids=["first-start", "restarted"])
def test_a_gateway_alone_says_why_it_is_down(earlier: bool) -> None:
    """Started before its nodes, nothing is wrong yet: the gateway says so, at info; a gateway that an earlier
    one left its state to, finding no node, has lost the service: a warning."""
    h = Harness(durable={"format": DURABLE_FORMAT, "void": {}}) if earlier else Harness()
    (down,) = [a for a in h.run_for(2 * TIMEOUT + STEP) if isinstance(a, Record) and a.entry["event"] == "down"]
    assert h.service is S.DOWN
    (refused,) = of(h.try_connect(), RefuseClient)
    assert refused.reason == down.entry["reason"]  # in the gateway's log of each refused client
    if earlier:
        assert (down.level, down.entry["reason"]) == ("warning", "no node holds the service")
    else:
        assert down.level == "info" and "no node has attached yet" in down.entry["reason"], down


def test_input_is_numbered_in_one_sequence_and_sent_to_the_active_node() -> None:
    h = Harness()
    p = h.attach_primary()
    a, b = h.connect(), h.connect()
    h.data(a, b"x")
    h.data(b, b"y")
    h.client_close(a)
    ins = sent(h.log, p, Input)
    assert [(m.seq, m.kind, m.conn, m.data) for m in ins] == [
        (1, KIND_OPEN, a, b""), (2, KIND_OPEN, b, b""), (3, KIND_DATA, a, b"x"), (4, KIND_DATA, b, b"y"),
        (5, KIND_CLOSE, a, b"")]
    assert a != b


def test_a_client_that_closes_and_is_gone_is_forgotten() -> None:
    h = Harness()
    p = h.attach_primary()
    a = h.connect()
    acts = h.client_close(a, gone=True)
    assert [(m.kind, m.conn) for m in sent(acts, p, Input)] == [(KIND_CLOSE, a)]
    assert a not in h.w.conns


def test_a_half_closed_client_is_forgotten_once_gone() -> None:
    h = Harness()
    p = h.attach_primary()
    a = h.connect()
    acts = h.client_close(a, gone=False)  # it ended its stream; it may still read output
    assert [(m.kind, m.conn) for m in sent(acts, p, Input)] == [(KIND_CLOSE, a)]
    assert released(h.output(p, 1, a, b"bye")) == [(1, a, b"bye")]
    acts = h.client_close(a, gone=True)
    assert not sent(acts, p, Input) and a not in h.w.conns
    assert not released(h.output(p, 2, a, b"nobody"))


def test_a_client_gone_while_its_input_waits_is_closed_in_the_guest_later() -> None:
    h = Harness()
    p = h.attach_primary()
    a = h.connect()
    h.run_for(TIMEOUT + 2 * STEP)  # the primary is silent: nothing is forwarded
    assert h.service is S.DOWN
    h.data(a, b"last words")
    h.client_close(a, gone=True)
    acts = h.msg(p, Heartbeat())
    assert [(m.kind, m.data) for m in sent(acts, p, Input)] == [(KIND_DATA, b"last words"), (KIND_CLOSE, b"")]
    assert a not in h.w.conns


def test_unprotected_output_is_released_at_once() -> None:
    h = Harness()
    p = h.attach_primary()
    c = h.connect()
    assert released(h.output(p, 1, c, b"hi")) == [(1, c, b"hi")]
    h.attach_spare()
    assert h.service is S.PROTECTING  # the copy is still running: the guest serves unprotected
    assert released(h.output(p, 2, c, b"yo")) == [(2, c, b"yo")]


def test_protected_output_is_held_until_the_commit_covering_it_and_released_in_order() -> None:
    h = Harness()
    p, _s = h.protected_pair()
    c = h.connect()
    h.data(c, b"get")
    for seq in (1, 2, 3):
        assert not released(h.output(p, seq, c, b"o%d" % seq))
    assert released(h.commit(p, 1, h.w.input_seq, 2)) == [(1, c, b"o1"), (2, c, b"o2")]
    assert released(h.commit(p, 2, h.w.input_seq, 3)) == [(3, c, b"o3")]
    # A repeated output (at or below what was released) is dropped, not sent twice.
    assert not released(h.output(p, 3, c, b"o3"))


def test_a_guest_close_is_released_like_output_and_ends_the_client() -> None:
    h = Harness()
    p, _s = h.protected_pair()
    c = h.connect()
    assert not of(h.output(p, 1, c, kind=KIND_CLOSE), CloseClient)  # held like any output
    acts = h.commit(p, 1, h.w.input_seq, 1)
    assert [a.conn for a in of(acts, CloseClient)] == [c]
    before = h.w.input_seq
    h.data(c, b"late")  # input after the guest closed it goes nowhere
    assert h.w.input_seq == before


# -- the primary lost while protected -------------------------------------------------------------------------


def _protected_with_traffic(h: Harness) -> tuple[Node, Node, int]:
    """Protected pair, one client: outputs 1..4 from the primary, commit covering 1..2 and the input so far;
    two more inputs after the commit (logged)."""
    p, s = h.protected_pair()
    c = h.connect()  # input 1
    h.data(c, b"a")  # 2
    for seq in (1, 2):
        h.output(p, seq, c, b"o%d" % seq)
    assert released(h.commit(p, 1, h.w.input_seq, 2)) == [(1, c, b"o1"), (2, c, b"o2")]
    h.data(c, b"b")  # 3
    h.data(c, b"c")  # 4
    h.output(p, 4, c, b"o4")  # 3 never reached the gateway (the primary died with it on the wire)
    return p, s, c


@pytest.mark.parametrize("how", ["link-closed", "silent"])
def test_primary_lost_while_protected_promotes_the_secondary(how: str) -> None:
    h = Harness()
    p, s, c = _protected_with_traffic(h)
    if how == "link-closed":
        acts = h.close_link(p)
    else:
        acts = h.run_for(TIMEOUT + 2 * STEP, heard=[s])
        assert fenced(acts, p)  # its link is still open: it is told it is out, then closed
    assert sent(acts, s, Promote) == [Promote(1, sent(acts, s, Promote)[0].reason)]
    assert h.service is S.PROMOTING and h.w.generation == 1 and s.gen == 1
    assert not released(acts)
    # A client that connects during the failover is accepted; its input waits for the new primary.
    c2 = h.connect()
    h.data(c2, b"new")
    assert not sent(h.since(0), s, Input)
    # The secondary resumed from checkpoint 1, which covers input up to 3 and output up to 3: output 3 comes
    # only in its events; held output 4 is beyond it and dropped.
    acts = h.promoted(s, epoch=1, input_seq=3, output_seq=3, events=[(3, KIND_DATA, c, b"o3")], conns=[c])
    assert released(acts) == [(3, c, b"o3")]
    assert h.service is S.ALONE and h.w.active == "s"
    # Replayed: input 4 (logged, after the state's input 3), exactly once and in order, then the new client's.
    ins = sent(acts, s, Input)
    assert [(m.seq, m.kind, m.conn, m.data) for m in ins] == [
        (4, KIND_DATA, c, b"c"), (5, KIND_OPEN, c2, b""), (6, KIND_DATA, c2, b"new")]
    assert not sent(acts, s, InputFloor)
    # The survivor's own output 4 is new output; the dead primary's 4 never reached a client.
    assert released(h.output(s, 4, c, b"redo")) == [(4, c, b"redo")]
    assert (4, c, b"o4") not in released(h.log)
    assert events_named(h.log, "promoted")[0]["replayed"] == 1


def test_a_promoted_node_that_repeats_released_output_is_not_released_twice() -> None:
    h = Harness()
    p, s, c = _protected_with_traffic(h)
    h.close_link(p)
    h.promoted(s, epoch=1, input_seq=2, output_seq=2, events=[(2, KIND_DATA, c, b"o2")], conns=[c])
    assert not released(h.last)  # 1 and 2 were released at the commit
    ins = sent(h.last, s, Input)
    assert [m.seq for m in ins] == [3, 4]


def test_after_a_failover_a_new_spare_protects_the_survivor() -> None:
    h = Harness()
    p, s, c = _protected_with_traffic(h)
    h.close_link(p)
    h.promoted(s, epoch=1, input_seq=3, output_seq=3, events=[(3, KIND_DATA, c, b"o3")], conns=[c])
    s2 = h.attach_spare("s2")
    assert sent(h.last, s, Protect) == [Protect("s2", h.w.nodes["s2"].address, h.w.protect_attempt)]
    h.protected(s, s2, epoch=2)
    assert h.service is S.PROTECTED
    assert not released(h.output(s, 4, c, b"x"))
    assert released(h.commit(s, 3, h.w.input_seq, 4)) == [(4, c, b"x")]


def test_the_promoting_node_lost_takes_the_service_down() -> None:
    h = Harness()
    p, s, c = _protected_with_traffic(h)
    h.close_link(p)
    acts = h.close_link(s)
    assert h.service is S.DOWN
    assert [a.conn for a in of(acts, CloseClient)] == [c]
    assert of(h.try_connect(), RefuseClient)


# -- the secondary lost while protected -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["link-closed", "silent", "primary-says-unprotected"])
def test_secondary_lost_while_protected_releases_held_output_at_once(how: str) -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    h.output(p, 1, c, b"one")
    h.output(p, 2, c, b"two")
    if how == "link-closed":
        acts = h.close_link(s)
        assert sent(acts, p, Unprotect)
    elif how == "silent":
        acts = h.run_for(TIMEOUT + 2 * STEP, heard=[p])
        assert fenced(acts, s) and sent(acts, p, Unprotect)  # not heard: lost (it would be reset if it came back)
    else:
        acts = h.unprotected(p)
        assert reset(acts, s)  # the primary dropped it: it holds nothing the service counts on; a spare again
    assert released(acts) == [(1, c, b"one"), (2, c, b"two")]
    assert h.service is S.ALONE and not h.w.protected
    assert not of(acts, Promote)
    assert released(h.output(p, 3, c, b"three")) == [(3, c, b"three")]


def test_the_secondary_lost_during_the_copy_leaves_the_primary_alone() -> None:
    h = Harness()
    s = h.attach_spare()
    p = h.attach_primary()
    assert h.service is S.PROTECTING
    acts = h.close_link(s)
    assert h.service is S.ALONE and sent(acts, p, Unprotect)
    h.attach_spare("s2")  # the next spare is used at once
    assert sent(h.last, p, Protect) == [Protect("s2", h.w.nodes["s2"].address, h.w.protect_attempt)]


def test_a_spare_that_attaches_during_the_copy_waits_and_is_used_next() -> None:
    h = Harness()
    s = h.attach_spare()
    p = h.attach_primary()
    assert h.service is S.PROTECTING
    s2 = h.attach_spare("s2")
    assert not sent(h.last, p, Protect)  # one copy at a time: the primary is being copied to s
    assert [n["id"] for n in h.w.status()["spares"]] == ["s2"]
    h.protected(p, s)
    assert h.service is S.PROTECTED
    acts = h.close_link(s)  # the secondary lost once protected: the waiting spare is next
    assert h.service is S.PROTECTING
    assert sent(acts, p, Protect) == [Protect("s2", h.w.nodes["s2"].address, h.w.protect_attempt)]
    h.protected(p, s2, epoch=5)
    assert h.service is S.PROTECTED and h.w.protected


def test_a_secondary_cut_off_by_a_partition_comes_back_as_a_fresh_spare() -> None:
    """Silent past the timeout: lost (fenced if it speaks). When the partition heals it registers again as
    what it is now, a spare holding nothing (a fenced node discards its VM): it is copied afresh, never
    trusted with its old state."""
    h = Harness()
    p, s = h.protected_pair()
    acts = h.run_for(TIMEOUT + 2 * STEP, heard=[p])
    assert fenced(acts, s) and sent(acts, p, Unprotect) and h.service is S.ALONE
    stale = h.attach_secondary("s", epoch=0, address="10.0.0.2:7000")  # its old claim, on a new link
    assert not of(h.last, Promote) and not h.w.protected
    assert fenced(h.last, stale) or reset(h.last, stale)  # its old copy counts for nothing
    back = h.attach_spare("s")
    assert sent(h.last, p, Protect) == [Protect("s", h.w.nodes["s"].address, h.w.protect_attempt)]
    h.protected(p, back, epoch=7)
    assert h.service is S.PROTECTED


# -- the primary lost while unprotected -----------------------------------------------------------------------


@pytest.mark.parametrize("copying", [False, True])
def test_primary_lost_while_unprotected_takes_the_service_down(copying: bool) -> None:
    h = Harness()
    s = h.attach_spare() if copying else None
    p = h.attach_primary()
    assert h.service is (S.PROTECTING if copying else S.ALONE)
    c1, c2 = h.connect(), h.connect()
    acts = h.close_link(p)
    assert h.service is S.DOWN
    assert sorted(a.conn for a in of(acts, CloseClient)) == [c1, c2]
    assert ListenClients(True) in acts
    assert not of(acts, Promote)
    if s is not None:  # its copy is incomplete: nothing to take over; it waits as a spare again
        assert not fenced(acts, s) and not of(acts, Promote)
        assert [n["id"] for n in h.w.status()["spares"]] == [s.id]
    assert of(h.try_connect(), RefuseClient)
    assert h.w.status()["gateway"]["service_state"] == "down"


def test_a_primary_that_reattaches_after_the_service_went_down_serves_again() -> None:
    h = Harness()
    p = h.attach_primary()
    c = h.connect()  # 1
    h.data(c, b"a")  # 2
    h.output(p, 1, c, b"r")
    h.close_link(p)  # its gateway link broke; it keeps its VM and dials again
    assert h.service is S.DOWN
    p2 = h.attach_primary("p", input_seq=2, output_seq=1, conns=[c])
    assert h.service is S.ALONE and h.w.active == "p"
    # The old connection's client is gone: closed in the guest, numbered on from what the VM has taken.
    assert [(m.seq, m.kind, m.conn) for m in sent(h.last, p2, Input)] == [(3, KIND_CLOSE, c)]
    c2 = h.connect()
    assert c2 != c
    assert released(h.output(p2, 2, c2, b"new")) == [(2, c2, b"new")]


def test_a_fresh_primary_after_the_service_went_down_has_its_output_released() -> None:
    h = Harness()
    p = h.attach_primary()
    c = h.connect()
    for seq in (1, 2, 3):
        h.output(p, seq, c, b"o%d" % seq)
    h.close_link(p)  # the host is gone for good
    fresh = h.attach_primary("p-new")  # a new VM: generation 0 is still current (no failover happened)
    assert h.service is S.ALONE and sent(h.last, fresh, InputFloor)
    c2 = h.connect()
    assert released(h.output(fresh, 1, c2, b"hello")) == [(1, c2, b"hello")]


def test_a_silent_unprotected_primary_that_speaks_again_loses_nothing() -> None:
    h = Harness()
    p = h.attach_primary()
    c = h.connect()  # input 1
    h.data(c, b"a")  # 2
    acts = h.run_for(TIMEOUT + 2 * STEP)
    assert h.service is S.DOWN
    assert events_named(acts, "silent") and not of(acts, CloseClient) and not fenced(acts, p)
    assert of(h.try_connect(), RefuseClient)  # nobody serves now
    h.data(c, b"b")  # waits: the node may be gone
    assert input_seqs(h.last, p) == []
    acts = h.msg(p, Heartbeat())
    assert h.service is S.ALONE and ListenClients(True) in acts
    assert [(m.seq, m.data) for m in sent(acts, p, Input)] == [(3, b"b")]
    assert_contiguous(input_seqs(h.log, p), 1)
    assert released(h.output(p, 1, c, b"r")) == [(1, c, b"r")]
    h.connect()


def test_a_silent_copying_primary_that_speaks_again_goes_on_copying() -> None:
    h = Harness()
    s = h.attach_spare()
    p = h.attach_primary()
    h.run_for(TIMEOUT + 2 * STEP, heard=[s])
    assert h.service is S.DOWN
    h.msg(p, Heartbeat())
    assert h.service is S.PROTECTING
    h.protected(p, s)
    assert h.service is S.PROTECTED


# -- failover requests ----------------------------------------------------------------------------------------


def test_a_failover_request_while_the_primary_is_heard_fences_the_secondary_after_two_timeouts() -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    h.output(p, 1, c, b"held")
    h.msg(s, FailoverRequest(s.gen, "lost the primary"))
    acts = h.run_for(2 * TIMEOUT - STEP, heard=[p, s])
    assert not fenced(acts, s) and h.service is S.PROTECTED
    acts = h.run_for(2 * STEP, heard=[p, s])
    assert reset(acts, s) and sent(acts, p, Unprotect)
    assert h.service is S.ALONE
    assert released(acts) == [(1, c, b"held")]
    assert not of(h.log, Promote)


@pytest.mark.parametrize("how", ["link-closed", "silent"])
def test_a_failover_request_then_the_primary_lost_promotes(how: str) -> None:
    h = Harness()
    p, s = h.protected_pair()
    h.msg(s, FailoverRequest(s.gen, "lost the primary"))
    h.run_for(0.4, heard=[p, s])
    acts = h.close_link(p) if how == "link-closed" else h.run_for(TIMEOUT + 2 * STEP, heard=[s])
    assert sent(acts, s, Promote) and h.service is S.PROMOTING
    h.run_for(2 * TIMEOUT, heard=[s])  # the request's timer is gone: the promoting node is not fenced
    assert h.service is S.PROMOTING and h.w.promoting == "s"


def test_a_failover_request_before_the_copy_is_complete_fences_the_secondary_at_once() -> None:
    h = Harness()
    s = h.attach_spare()
    p = h.attach_primary()
    acts = h.msg(s, FailoverRequest(s.gen, "lost the primary"))
    assert reset(acts, s) and sent(acts, p, Unprotect)
    assert h.service is S.ALONE


# -- manual failover ------------------------------------------------------------------------------------------


def test_manual_failover_fences_the_primary_and_promotes_the_secondary() -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    h.output(p, 1, c, b"held")
    acts = h.control(FailoverCommand("maintenance"))
    assert sent(acts, CONTROL, CommandResult)[0].ok is True
    assert fenced(acts, p)
    assert sent(acts, s, Promote)[0].generation == 1
    assert h.service is S.PROMOTING
    h.output(p, 2, c, b"zombie")  # on the fenced link: dropped
    acts = h.promoted(s, epoch=0, input_seq=h.w.input_seq, output_seq=0, conns=[c])
    assert h.service is S.ALONE and not released(h.log)  # output 1 was beyond the secondary's checkpoint


@pytest.mark.parametrize("state", ["learning", "down", "alone", "protecting", "promoting"])
def test_manual_failover_is_refused_without_a_protected_pair(state: str) -> None:
    h = Harness()
    if state == "down":
        h.run_for(2 * TIMEOUT + STEP)
    elif state == "alone":
        h.attach_primary()
    elif state == "protecting":
        h.attach_spare()
        h.attach_primary()
    elif state == "promoting":
        p, _s = h.protected_pair()
        h.close_link(p)
    was = h.service
    acts = h.control(FailoverCommand("try"))
    result = sent(acts, CONTROL, CommandResult)
    assert len(result) == 1 and result[0].ok is False and result[0].reason
    assert h.service is was and not of(acts, Promote) and not of(acts, CloseLink)


# -- stopping -------------------------------------------------------------------------------------------------


def test_shutdown_command_stops_every_node_and_exits() -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    acts = h.control(ShutdownCommand("colo down"))
    shutdowns = [a.link for a in acts if isinstance(a, Send) and isinstance(a.msg, Shutdown)]
    assert shutdowns == [s.link, p.link]  # the secondary first: the primary's going is then no failure
    assert [a.conn for a in of(acts, CloseClient)] == [c]
    assert len(of(acts, Exit)) == 1
    assert sent(acts, CONTROL, CommandResult)[0].ok is True
    assert h.service is S.STOPPED
    acts = h.close_link(s) + h.close_link(p)
    assert not of(acts, Promote) and not of(acts, Send)
    assert of(h.try_connect(), RefuseClient)
    late = h.attach_spare("late")
    assert sent(h.last, late, Shutdown)
    h.control(ShutdownCommand("again"))  # a second stop is harmless
    assert h.service is S.STOPPED


def test_guest_ended_closes_clients_without_a_failover() -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    acts = h.msg(p, GuestEnded(p.gen, 3, "powered off"))
    assert h.service is S.ENDED and h.w.ended_code == 3
    assert [a.conn for a in of(acts, CloseClient)] == [c]
    assert sent(acts, s, Shutdown) and not sent(acts, p, Shutdown)
    assert of(h.try_connect(), RefuseClient)
    acts = h.close_link(p) + h.run_for(2 * TIMEOUT, heard=[s])
    assert not of(h.log, Promote)
    assert h.service is S.ENDED


def test_a_repeated_guest_ended_is_harmless() -> None:
    h = Harness()
    p = h.attach_primary()
    h.msg(p, GuestEnded(p.gen, 0, "powered off"))
    h.msg(p, GuestEnded(p.gen, 0, "powered off"))  # a peer's message must never crash the gateway
    assert h.service is S.ENDED


# -- generations ----------------------------------------------------------------------------------------------


def _failed_over(h: Harness) -> tuple[Node, Node, int]:
    p, s, c = _protected_with_traffic(h)
    h.close_link(p)
    h.promoted(s, epoch=1, input_seq=3, output_seq=3, events=[(3, KIND_DATA, c, b"o3")], conns=[c])
    assert h.w.generation == 1 and h.service is S.ALONE
    return p, s, c


def test_a_primary_hello_of_an_older_generation_is_fenced() -> None:
    h = Harness()
    _p, _s, c = _failed_over(h)
    old = h.attach_primary("p", generation=0, epoch=1, input_seq=4, output_seq=4, conns=[c])
    assert fenced(h.last, old) and not sent(h.last, old, Welcome)
    assert h.w.active == "s"
    assert not released(h.output(old, 5, c, b"zombie"))


def test_a_woken_zombie_primary_never_reaches_a_client() -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    h.output(p, 1, c, b"before")
    acts = h.run_for(TIMEOUT + 2 * STEP, heard=[s])  # p is paused (SIGSTOP)
    assert fenced(acts, p) and sent(acts, s, Promote)
    h.promoted(s, epoch=0, input_seq=h.w.input_seq, output_seq=0, conns=[c])
    mark = h.mark()
    # p wakes up: whatever it had queued arrives on its dropped link, then it dials again with its old hello.
    h.output(p, 2, c, b"zombie", generation=0)
    h.commit(p, 1, h.w.input_seq, 2)
    h.msg(p, Heartbeat())
    z = h.attach_primary("p", generation=0, output_seq=2, conns=[c])
    h.output(z, 3, c, b"zombie", generation=0)
    h.commit(z, 2, h.w.input_seq, 3)
    assert not released(h.since(mark))
    assert fenced(h.since(mark), z)
    assert h.w.active == "s"


def test_a_second_primary_of_the_same_generation_is_fenced() -> None:
    h = Harness()
    h.attach_primary("first", generation=1)
    second = h.attach_primary("second", generation=1)
    assert fenced(h.last, second) and h.w.active == "first"
    assert events_named(h.last, "second-primary")


def test_a_restarted_gateway_obeys_the_highest_generation_even_if_it_attaches_second() -> None:
    h = Harness()
    old = h.attach_primary("old", generation=1)  # a zombie of generation 1 (its secondary took over since)
    new = h.attach_primary("new", generation=2)
    assert not fenced(h.log, new)
    assert fenced(h.log, old)
    assert h.w.active == "new" and h.w.generation == 2


def test_learning_fences_the_older_of_two_waiting_primaries() -> None:
    h = Harness()
    # Both name a secondary that has not attached, so the witness waits; at the deadline it picks the newest.
    old = h.attach_primary("old", generation=1, peer="gone1")
    new = h.attach_primary("new", generation=2, peer="gone2")
    assert h.service is S.LEARNING
    acts = h.run_for(2 * TIMEOUT + STEP, heard=[old, new])
    assert fenced(acts, old) and not fenced(acts, new)
    assert h.w.active == "new" and h.w.generation == 2 and h.service is S.ALONE


def test_a_message_of_an_older_generation_from_the_active_node_fences_it() -> None:
    h = Harness()
    p = h.attach_primary(generation=2)
    c = h.connect()
    acts = h.output(p, 1, c, b"stale", generation=1)
    assert fenced(acts, p) and not released(acts)


def test_fencing_the_active_node_for_a_stale_generation_is_losing_it() -> None:
    h = Harness()
    p = h.attach_primary(generation=2)
    c = h.connect()
    acts = h.output(p, 1, c, b"stale", generation=1)
    assert fenced(acts, p)
    assert h.service is S.DOWN  # as for any unprotected active node lost
    assert [a.conn for a in of(acts, CloseClient)] == [c]
    assert of(h.try_connect(), RefuseClient)


# -- the gateway itself stalled -------------------------------------------------------------------------------


def test_a_gateway_stall_does_not_make_nodes_lost() -> None:
    h = Harness()
    p, s = h.protected_pair()
    h.run_for(0.6, heard=[p, s])
    acts = h.tick(5.0)  # SIGSTOP of the gateway for 5 s: nobody was heard, because nobody was read
    assert events_named(acts, "gateway-stalled")
    assert not events_named(acts, "silent") and not events_named(acts, "lost")
    assert h.service is S.PROTECTED and h.w.protected
    h.run_for(2 * TIMEOUT, heard=[p, s])
    assert h.service is S.PROTECTED and not of(h.log, Promote)


def test_after_a_stall_a_node_that_stays_silent_is_still_lost() -> None:
    h = Harness()
    p, s = h.protected_pair()
    h.run_for(0.4, heard=[p, s])
    h.tick(3.0)
    acts = h.run_for(TIMEOUT + 2 * STEP, heard=[s])  # p really is gone: judged on the gateway's running time
    assert sent(acts, s, Promote)


def test_a_stall_does_not_count_against_a_failover_request() -> None:
    h = Harness()
    p, s = h.protected_pair()
    h.msg(s, FailoverRequest(s.gen, "lost the primary"))
    h.run_for(0.4, heard=[p, s])
    acts = h.tick(3.0)
    assert not fenced(acts, s)
    h.run_for(0.8, heard=[p, s])
    assert not fenced(h.log, s)
    acts = h.run_for(1.0, heard=[p, s])
    assert reset(acts, s)


def test_heartbeats_go_to_every_node_link() -> None:
    h = Harness()
    p, s = h.protected_pair()
    acts = h.run_for(1.0, heard=[p, s])
    assert len(sent(acts, p, Heartbeat)) >= 4 and len(sent(acts, s, Heartbeat)) >= 4


# -- a restarted gateway learns the pair ----------------------------------------------------------------------


PRIMARY_STATE = dict(generation=3, epoch=5, input_seq=40, output_seq=12, conns=[3, 7], gateway="old-gw")
SECONDARY_STATE = dict(generation=3, epoch=5, input_seq=38, output_seq=10, conns=[3, 7], gateway="old-gw")


@pytest.mark.parametrize("primary_first", [True, False])
def test_a_restarted_gateway_learns_a_pair(primary_first: bool) -> None:
    h = Harness()

    def primary() -> Node:
        return h.attach_primary("p", peer="s", **PRIMARY_STATE)

    def secondary() -> Node:
        return h.attach_secondary("s", peer="p", **SECONDARY_STATE)

    if primary_first:
        p = primary()
        assert h.service is S.LEARNING  # it names its secondary: wait for it
        secondary()
    else:
        secondary()
        assert h.service is S.LEARNING
        p = primary()
    acts = h.last
    assert h.service is S.PROTECTED and h.w.protected
    assert h.w.generation == 3 and h.w.active == "p" and h.w.secondary == "s"
    assert ListenClients(True) in acts
    # The old gateway's clients are gone: their connections are closed in the guest, numbered on from the VM.
    ins = sent(acts, p, Input)
    assert [(m.seq, m.kind, m.conn) for m in ins] == [(41, KIND_CLOSE, 3), (42, KIND_CLOSE, 7)]
    assert not sent(acts, p, InputFloor)  # nothing numbered here before: the VM's own numbering goes on
    assert not sent(acts, p, Protect)
    c = h.connect()
    assert c > 7
    h.data(c, b"x")
    assert [(m.seq, m.kind, m.conn) for m in sent(h.log, p, Input)][-2:] == [(43, KIND_OPEN, c), (44, KIND_DATA, c)]
    assert not released(h.output(p, 13, c, b"r"))  # protected: held until the commit
    assert released(h.commit(p, 6, 44, 13)) == [(13, c, b"r")]


def test_a_learned_pair_fails_over_with_an_input_floor() -> None:
    h = Harness()
    p = h.attach_primary("p", peer="s", **PRIMARY_STATE)
    s = h.attach_secondary("s", peer="p", **SECONDARY_STATE)
    c = h.connect()  # 43, data 44
    h.data(c, b"x")
    acts = h.close_link(p)
    assert sent(acts, s, Promote)[0].generation == 4
    acts = h.promoted(s, epoch=5, input_seq=38, output_seq=10, conns=[3, 7])
    # Inputs 39..40 were for the old gateway's clients: they will never come.
    assert sent(acts, s, InputFloor) == [InputFloor(40)]
    assert [(m.seq, m.kind, m.conn) for m in sent(acts, s, Input)] == [
        (41, KIND_CLOSE, 3), (42, KIND_CLOSE, 7), (43, KIND_OPEN, c), (44, KIND_DATA, c)]


def test_a_learned_pair_after_failover_releases_the_survivors_new_output() -> None:
    h = Harness()
    p = h.attach_primary("p", peer="s", **PRIMARY_STATE)
    s = h.attach_secondary("s", peer="p", **SECONDARY_STATE)
    c = h.connect()
    h.data(c, b"x")
    h.close_link(p)
    h.promoted(s, epoch=5, input_seq=38, output_seq=10, conns=[3, 7])
    assert released(h.output(s, 11, c, b"reply")) == [(11, c, b"reply")]


def test_a_learned_pair_gives_new_clients_ids_above_both_vms_connections() -> None:
    h = Harness()
    h.attach_primary("p", peer="s", **PRIMARY_STATE)
    h.attach_secondary("s", peer="p", **{**SECONDARY_STATE, "conns": [3, 7, 9]})
    assert h.connect() > 9


def test_a_primary_naming_a_secondary_that_never_comes_is_chosen_at_the_deadline() -> None:
    h = Harness()
    p = h.attach_primary("p", peer="s", **PRIMARY_STATE)
    h.run_for(2 * TIMEOUT + STEP, heard=[p])
    assert h.service is S.ALONE and h.w.active == "p"
    late = h.attach_secondary("s", peer="p", **SECONDARY_STATE)  # too late: its copy is of a past gone by
    assert reset(h.last, late)


def test_a_secondary_whose_primary_comes_after_the_deadline_is_paired_again() -> None:
    h = Harness()
    s = h.attach_secondary("s", peer="p", **SECONDARY_STATE)
    h.run_for(2 * TIMEOUT + STEP, heard=[s])
    assert h.service is S.DOWN  # it still names a primary: it is no orphan to promote
    h.attach_primary("p", peer="s", **PRIMARY_STATE)
    assert h.service is S.PROTECTED and h.w.secondary == "s"


ORPHAN = dict(generation=2, epoch=9, input_seq=30, output_seq=8, conns=[1, 2], gateway="old-gw")


def test_an_orphaned_secondary_is_promoted_after_the_learn_deadline() -> None:
    h = Harness()
    s = h.attach_secondary("s", peer="", **ORPHAN)
    acts = h.run_for(2 * TIMEOUT - STEP, heard=[s])
    assert not sent(acts, s, Promote)
    acts = h.run_for(2 * STEP, heard=[s])
    assert sent(acts, s, Promote)[0].generation == 3
    assert h.service is S.PROMOTING
    h.promoted(s, epoch=9, input_seq=30, output_seq=8, conns=[1, 2])
    assert h.service is S.ALONE and h.w.active == "s"
    # The old gateway's connections are closed in the guest.
    assert [(m.kind, m.conn) for m in sent(h.last, s, Input)] == [(KIND_CLOSE, 1), (KIND_CLOSE, 2)]


def test_an_orphan_promoted_by_a_new_gateway_gets_input_numbered_past_its_state() -> None:
    h = Harness()
    s = h.attach_secondary("s", peer="", **ORPHAN)
    h.run_for(2 * TIMEOUT + STEP, heard=[s])
    mark = h.mark()
    h.promoted(s, epoch=9, input_seq=30, output_seq=8, conns=[])
    h.connect()  # its open is the first input the survivor gets from this gateway
    seqs = [m.seq for m in sent(h.since(mark), s, Input)]
    assert seqs == [31], f"input numbered {seqs} at a node that has taken up to 30"


def test_clients_accepted_during_an_orphans_promotion_never_share_the_vms_connections() -> None:
    h = Harness()
    s = h.attach_secondary("s", peer="", **ORPHAN)
    h.run_for(2 * TIMEOUT + STEP, heard=[s])
    assert h.service is S.PROMOTING
    c = h.connect()
    acts = h.promoted(s, epoch=9, input_seq=30, output_seq=8, events=[(8, KIND_DATA, 1, b"old client's data")],
                      conns=[1, 2])
    assert c not in (1, 2)
    assert not released(acts)


# -- per-connection credit ------------------------------------------------------------------------------------


def _inflight(h: Harness, p: Node, conn: int, taken: int) -> int:
    return sum(len(m.data) for m in sent(h.log, p, Input) if m.conn == conn and m.kind == KIND_DATA
               and m.seq > taken)


def test_a_flooding_connection_gets_at_most_its_credit_in_flight_and_others_still_go_out() -> None:
    h = Harness(credit=10, pending_limit=30)
    p = h.attach_primary()
    a, b = h.connect(), h.connect()
    flood = bytes(range(100))
    acts = h.data(a, flood)
    assert [len(m.data) for m in sent(acts, p, Input)] == [10]
    assert of(acts, PauseClient) == [PauseClient(a)]  # 90 bytes wait: past pending_limit, stop reading it
    acts = h.data(b, b"ping")  # another connection's input is not stuck behind the flood
    assert [(m.conn, m.data) for m in sent(acts, p, Input)] == [(b, b"ping")]
    taken = 0
    resumed_at = None
    while _inflight(h, p, a, taken) or h.w.conns[a].pending:
        assert _inflight(h, p, a, taken) <= 10
        taken = h.w.input_seq
        acts = h.progress(p, taken)
        if of(acts, ResumeClient):
            assert of(acts, ResumeClient) == [ResumeClient(a)]
            resumed_at = h.w.conns[a].pending_bytes
    assert resumed_at is not None and resumed_at <= 15  # resumed once drained to half the limit
    got = b"".join(m.data for m in sent(h.log, p, Input) if m.conn == a and m.kind == KIND_DATA)
    assert got == flood  # in order, nothing lost or repeated


def test_credit_is_counted_against_progress_not_against_sends() -> None:
    h = Harness(credit=10, pending_limit=1000)
    p = h.attach_primary()
    a = h.connect()
    h.data(a, b"x" * 25)
    first = sent(h.last, p, Input)
    assert [len(m.data) for m in first] == [10]
    h.progress(p, first[0].seq - 1)  # taken before the piece: nothing freed
    assert not sent(h.last, p, Input)
    h.progress(p, first[0].seq)
    assert [len(m.data) for m in sent(h.last, p, Input)] == [10]


def test_a_backlogged_client_gets_no_more_input_forwarded_others_do() -> None:
    h = Harness()
    p = h.attach_primary()
    a, b = h.connect(), h.connect()
    h.send(ClientBacklog(a, over=True))  # it does not read its replies: feed the guest no more of its requests
    assert not sent(h.data(a, b"GET"), p, Input)
    assert [m.conn for m in sent(h.data(b, b"PING"), p, Input)] == [b]
    acts = h.send(ClientBacklog(a, over=False))
    assert [(m.conn, m.data) for m in sent(acts, p, Input)] == [(a, b"GET")]


def test_input_stops_when_the_log_is_full_and_goes_on_after_a_commit() -> None:
    h = Harness(max_log_bytes=10)
    p, _s = h.protected_pair()
    c = h.connect()
    h.data(c, b"x" * 11)
    assert not sent(h.data(c, b"y"), p, Input)  # the log holds 11 > 10 bytes: wait for a commit
    acts = h.commit(p, 1, h.w.input_seq, 0)
    assert [m.data for m in sent(acts, p, Input)] == [b"y"]


# -- hybrid mode ----------------------------------------------------------------------------------------------


def _hybrid_pair(h: Harness) -> tuple[Node, Node, int]:
    p, s = h.protected_pair()
    acts = h.msg(s, Resynced(s.gen, 0, h.w.input_seq, 0))
    assert h.w.mirror == "s" and events_named(acts, "mirroring")
    c = h.connect()
    return p, s, c


def test_hybrid_inputs_go_to_both_vms_and_matching_output_is_released_at_once() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.data(c, b"GET k")
    assert [m.seq for m in sent(h.log, p, Input)] == [m.seq for m in sent(h.log, s, Input)] == [1, 2]
    assert not of(h.output(p, 1, c, b"value"), ToClient)
    acts = h.output(s, 1, c, b"value")
    assert [(a.conn, a.data) for a in of(acts, ToClient)] == [(c, b"value")]
    # Either order: the secondary first, then the primary.
    assert not of(h.output(s, 2, c, b"more"), ToClient)
    assert [(a.conn, a.data) for a in of(h.output(p, 2, c, b"more"), ToClient)] == [(c, b"more")]


def test_hybrid_mismatch_asks_for_a_checkpoint_and_the_commit_releases_the_primarys_output() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.output(p, 1, c, b"abc")
    acts = h.output(s, 1, c, b"abX")
    assert [a.data for a in of(acts, ToClient)] == [b"ab"]  # the common prefix is safe either way
    assert sent(acts, p, CheckpointNow) == [CheckpointNow(Trigger.MISMATCH)]
    assert not sent(h.output(s, 2, c, b"zz"), p, CheckpointNow)  # one request per divergence
    acts = h.commit(p, 1, h.w.input_seq, 1)
    assert [a.data for a in of(acts, ToClient)] == [b"c"]
    h.msg(s, Resynced(s.gen, 1, h.w.input_seq, 1))
    h.output(p, 2, c, b"same")
    assert [a.data for a in of(h.output(s, 2, c, b"same"), ToClient)] == [b"same"]


def test_hybrid_unmatched_output_asks_for_a_checkpoint_after_the_compare_timeout() -> None:
    h = Harness(mode="hybrid", compare_timeout=0.2)
    p, s, c = _hybrid_pair(h)
    h.output(p, 1, c, b"lonely")
    acts = h.run_for(0.4, heard=[p, s])
    assert sent(acts, p, CheckpointNow) == [CheckpointNow(Trigger.TIMEOUT)]


def test_hybrid_output_before_the_secondary_resyncs_is_held_then_compared() -> None:
    h = Harness(mode="hybrid")
    p, s = h.protected_pair()
    c = h.connect()
    assert not of(h.output(p, 1, c, b"early"), ToClient)  # no secondary output to compare with yet
    h.msg(s, Resynced(s.gen, 0, 0, 0))
    assert [a.data for a in of(h.output(s, 1, c, b"early"), ToClient)] == [b"early"]


def test_hybrid_secondary_lost_releases_the_primarys_held_output() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.output(p, 1, c, b"only-primary")
    acts = h.close_link(s)
    assert [a.data for a in of(acts, ToClient)] == [b"only-primary"]
    assert h.service is S.ALONE and h.w.comparer is None
    assert [a.data for a in of(h.output(p, 2, c, b"direct"), ToClient)] == [b"direct"]


def test_hybrid_failover_continues_from_the_secondarys_running_state() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.data(c, b"req")
    h.output(p, 1, c, b"resp")
    h.output(s, 1, c, b"resp-and-more")
    assert [a.data for a in of(h.log, ToClient)] == [b"resp"]
    h.close_link(p)
    acts = h.promoted(s, epoch=0, input_seq=h.w.input_seq, output_seq=1, conns=[c])
    assert [a.data for a in of(acts, ToClient)] == [b"-and-more"]  # its own output, which the clients go on with
    assert [a.data for a in of(h.output(s, 2, c, b"next"), ToClient)] == [b"next"]


def test_hybrid_a_resync_that_arrives_after_the_promotion_began_still_counts() -> None:
    """The primary dies right after its commit of checkpoint 1; the gateway starts the promotion before the
    secondary's `resynced 1` arrives. The secondary goes on from checkpoint 1 and its own run after it: its output
    is released as it is, not taken for a rollback onto checkpoint 1 (which once raised "output 2 was never
    received" and left the service promoting for good: 1 CI run in about 80)."""
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.data(c, b"GET k")
    h.output(p, 1, c, b"abc")
    h.output(s, 1, c, b"abX")  # a mismatch: checkpoint 1
    h.commit(p, 1, h.w.input_seq, 1)
    h.close_link(p)  # killed after its commit
    assert h.w.promoting == "s"
    h.msg(s, Resynced(s.gen, 1, h.w.input_seq, 1))  # sent before it heard of the promotion
    h.data(c, b"GET j")
    h.output(s, 2, c, b"def")  # its own run after checkpoint 1
    acts = h.promoted(s, epoch=1, input_seq=h.w.input_seq, output_seq=2, events=[(1, KIND_DATA, c, b"abc")],
                      conns=[c])
    assert not events_named(h.log, "output-lost") and events_named(acts, "promoted")
    assert b"".join(a.data for a in of(h.log, ToClient)) == b"abcdef"  # the primary's 1, then the survivor's 2
    assert not of(h.log, CloseClient)


def test_hybrid_failover_onto_a_state_whose_output_went_missing_ends_the_clients_not_the_service() -> None:
    """The survivor loaded a checkpoint covering primary output 2 that the gateway never got and the state does not
    carry: no client may get a stream with that hole, but the service must not hang in its promotion either."""
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.data(c, b"req")
    h.output(p, 1, c, b"one")
    h.close_link(p)
    acts = h.promoted(s, epoch=1, input_seq=h.w.input_seq, output_seq=3, events=[(3, KIND_DATA, c, b"three")],
                      conns=[c])
    lost = events_named(acts, "output-lost")
    assert lost and "output 2 was never received" in lost[0]["reason"]
    assert [a.conn for a in of(acts, CloseClient)] == [c] and not of(acts, ToClient)
    assert events_named(acts, "promoted") and h.w.active == "s"
    assert [e.seq for e in sent(acts, s, Input)][-1:] == [h.w.input_seq]  # the guest hears the client is gone
    c2 = h.connect()
    assert [a.data for a in of(h.output(s, 4, c2, b"next"), ToClient)] == [b"next"]


def test_hybrid_a_primary_output_that_skips_a_number_is_an_error_not_a_crash() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    acts = h.output(p, 2, c, b"x")  # 1 never came: a node's bug
    assert [(e["seq"], e["expected"]) for e in events_named(acts, "output-gap")] == [(2, 1)]
    assert not of(h.output(s, 1, c, b"x"), ToClient)  # nothing of the primary's to compare with
    assert [a.data for a in of(h.output(p, 1, c, b"x"), ToClient)] == [b"x"]  # the stream goes on from 1


def test_hybrid_a_repeated_primary_output_is_ignored() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.output(p, 1, c, b"x")
    h.output(p, 1, c, b"x")  # a peer's message must not crash the gateway
    assert [a.data for a in of(h.output(s, 1, c, b"x"), ToClient)] == [b"x"]


def test_hybrid_after_failover_a_new_secondarys_protection_holds_output_again() -> None:
    h = Harness(mode="hybrid")
    p, s, c = _hybrid_pair(h)
    h.output(p, 1, c, b"a")
    h.output(s, 1, c, b"a")
    h.commit(p, 1, h.w.input_seq, 1)
    h.msg(s, Resynced(s.gen, 1, h.w.input_seq, 1))
    h.close_link(p)
    h.promoted(s, epoch=1, input_seq=h.w.input_seq, output_seq=1, conns=[c])
    s2 = h.attach_spare("s2")
    h.protected(s, s2, epoch=2, output_seq=1)
    assert h.service is S.PROTECTED
    assert not of(h.output(s, 2, c, b"uncovered"), ToClient)


# -- status ---------------------------------------------------------------------------------------------------


def test_status_tells_the_truth() -> None:
    h = Harness()
    p, s = h.protected_pair()
    reply = sent(h.control(StatusRequest()), CONTROL, StatusReply)[0].info
    assert reply["gateway"]["service_state"] == "protected" and reply["gateway"]["protected"] is True
    assert reply["nodes"]["primary"]["id"] == "p" and reply["nodes"]["secondary"]["id"] == "s"
    h.msg(p, NodeStatus(p.gen, {"epoch": 4}))
    h.close_link(s, "killed")
    st = h.w.status()
    assert st["gateway"]["service_state"] == "unprotected" and st["gateway"]["protected"] is False
    assert st["nodes"]["primary"]["epoch"] == 4
    assert [(n["id"], "killed" in n["lost"]) for n in st["lost"]] == [("s", True)]


def test_an_unexpected_control_message_is_answered_not_obeyed() -> None:
    h = Harness()
    acts = h.control(Heartbeat())
    assert acts == []
    acts = h.control(Welcome("x", 0))
    assert sent(acts, CONTROL, CommandResult)[0].ok is False


# -- the transition table -------------------------------------------------------------------------------------


def _pair_silent_primary(h: Harness, secondary: bool) -> Node:
    s = h.attach_spare() if secondary else None
    p = h.attach_primary()
    h.run_for(TIMEOUT + 2 * STEP, heard=[s] if s else [])
    assert h.service is S.DOWN
    h.msg(p, Heartbeat())
    return p


def _promoting(h: Harness) -> tuple[Node, Node]:
    p, s = h.protected_pair()
    h.close_link(p)
    return p, s


def _ended(h: Harness) -> list[Any]:
    p = h.attach_primary()
    return h.msg(p, GuestEnded(p.gen, 0, "off"))


def _learned_pair_after_deadline(h: Harness) -> None:
    s = h.attach_secondary("s", peer="p", **SECONDARY_STATE)
    h.run_for(2 * TIMEOUT + STEP, heard=[s])
    h.attach_primary("p", peer="s", **PRIMARY_STATE)


def _orphan_promoted_at_deadline(h: Harness) -> None:
    s = h.attach_secondary("s", **ORPHAN)
    h.run_for(2 * TIMEOUT + STEP, heard=[s])


SCENARIOS: dict[tuple[Service, str], Callable[[Harness], object]] = {
    (S.LEARNING, "active-chosen"): lambda h: h.attach_primary(),
    (S.LEARNING, "pair-learned"): lambda h: (h.attach_primary("p", peer="s", **PRIMARY_STATE),
                                             h.attach_secondary("s", peer="p", **SECONDARY_STATE)),
    (S.LEARNING, "promote"): _orphan_promoted_at_deadline,
    (S.LEARNING, "nobody"): lambda h: h.run_for(2 * TIMEOUT + STEP),
    (S.DOWN, "active-chosen"): lambda h: (h.run_for(2 * TIMEOUT + STEP), h.attach_primary()),
    (S.DOWN, "active-back"): lambda h: _pair_silent_primary(h, secondary=False),
    (S.DOWN, "active-back-protecting"): lambda h: _pair_silent_primary(h, secondary=True),
    (S.DOWN, "pair-learned"): _learned_pair_after_deadline,
    (S.ALONE, "copy-started"): lambda h: (h.attach_primary(), h.attach_spare()),
    (S.ALONE, "superseded"): lambda h: (h.attach_primary("old", generation=1),
                                        h.attach_primary("new", generation=2)),
    (S.PROTECTING, "superseded"): lambda h: (h.attach_primary("old", generation=1), h.attach_spare(),
                                             h.attach_primary("new", generation=2)),
    (S.PROTECTED, "superseded"): lambda h: (h.protected_pair(), h.attach_primary("new", generation=5)),
    (S.PROTECTED, "handed-over"): lambda h: (h.protected_pair(), h.control(SwitchoverCommand(False, "t")),
                                             h.msg(h.nodes["p"], HandedOver(1, 0))),
    (S.ALONE, "active-lost"): lambda h: h.close_link(h.attach_primary()),
    (S.PROTECTING, "protected"): lambda h: h.protected_pair(),
    (S.PROTECTING, "secondary-lost"): lambda h: (h.attach_primary(), h.close_link(h.attach_spare())),
    (S.PROTECTING, "unprotected"): lambda h: (h.attach_spare(), h.unprotected(h.attach_primary())),
    (S.PROTECTING, "active-lost"): lambda h: (h.attach_spare(), h.close_link(h.attach_primary())),
    (S.PROTECTED, "secondary-lost"): lambda h: h.close_link(h.protected_pair()[1]),
    (S.PROTECTED, "unprotected"): lambda h: h.unprotected(h.protected_pair()[0]),
    (S.PROTECTED, "active-lost"): lambda h: h.close_link(h.protected_pair()[0]),
    (S.PROTECTED, "manual-failover"): lambda h: (h.protected_pair(), h.control(FailoverCommand("op"))),
    (S.PROMOTING, "promoted"): lambda h: h.promoted(_promoting(h)[1], epoch=0, input_seq=0, output_seq=0),
    (S.PROMOTING, "promotion-failed"): lambda h: h.close_link(_promoting(h)[1]),
    (S.ALONE, "guest-ended"): _ended,
    (S.PROTECTING, "guest-ended"): lambda h: (h.attach_spare(), (p := h.attach_primary()),
                                              h.msg(p, GuestEnded(p.gen, 1, "x"))),
    (S.PROTECTED, "guest-ended"): lambda h: h.msg((p := h.protected_pair()[0]), GuestEnded(p.gen, 1, "x")),
    (S.LEARNING, "shutdown"): lambda h: h.control(ShutdownCommand("op")),
    (S.DOWN, "shutdown"): lambda h: (h.run_for(2 * TIMEOUT + STEP), h.control(ShutdownCommand("op"))),
    (S.ALONE, "shutdown"): lambda h: (h.attach_primary(), h.control(ShutdownCommand("op"))),
    (S.PROTECTING, "shutdown"): lambda h: (h.attach_spare(), h.attach_primary(), h.control(ShutdownCommand("op"))),
    (S.PROTECTED, "shutdown"): lambda h: (h.protected_pair(), h.control(ShutdownCommand("op"))),
    (S.PROMOTING, "shutdown"): lambda h: (_promoting(h), h.control(ShutdownCommand("op"))),
    (S.ENDED, "shutdown"): lambda h: (_ended(h), h.control(ShutdownCommand("op"))),
}


def test_every_transition_of_the_table_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(SERVICE_TRANSITIONS)


@pytest.mark.parametrize("pair", list(SERVICE_TRANSITIONS), ids=lambda p: f"{p[0].value}-{p[1]}")
def test_every_transition_of_the_table_is_reachable(pair: tuple[Service, str]) -> None:
    h = Harness()
    SCENARIOS[pair](h)
    assert pair in h.transitions, f"{pair} not taken; took {h.transitions}"
    i = h.transitions.index(pair)
    after = h.transitions[i + 1][0] if i + 1 < len(h.transitions) else h.service
    assert after is SERVICE_TRANSITIONS[pair]


@pytest.mark.parametrize("pair", [(S.LEARNING, "promoted"), (S.ALONE, "protected"), (S.STOPPED, "shutdown"),
                                  (S.ENDED, "guest-ended"), (S.DOWN, "secondary-lost")],
                         ids=lambda p: f"{p[0].value}-{p[1]}")
def test_a_transition_not_in_the_table_raises(pair: tuple[Service, str]) -> None:
    assert pair not in SERVICE_TRANSITIONS
    w = Witness(WitnessConfig(gateway_id="gw"))
    w.handle(Tick(0.0, 0.0))
    w.service = pair[0]
    with pytest.raises(WitnessError):
        w._go(pair[1])
    assert w.service is pair[0]


def test_the_table_is_closed_over_its_states() -> None:
    # Every state but STOPPED can be left; STOPPED and ENDED accept nothing but what the table says.
    assert {s for s, _ in SERVICE_TRANSITIONS} == set(Service) - {S.STOPPED}
    assert {nxt for nxt in SERVICE_TRANSITIONS.values()} <= set(Service)


# -- switchover ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", [False, True])
def test_a_switchover_promotes_the_secondary_from_the_handover_checkpoint(swap: bool) -> None:
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    h.data(c, b"before")
    acts = h.control(SwitchoverCommand(swap, "maintenance"))
    assert sent(acts, p, Handover) and of(acts, Send)[-1].msg.ok
    # Input waits while the primary hands over: none of it may land after its last checkpoint.
    assert not sent(h.data(c, b"during"), p, Input)
    h.commit(p, 3, h.w.input_seq, 0)
    gen = h.w.generation
    acts = h.msg(p, HandedOver(p.gen, 3))
    promote = sent(acts, s, Promote)
    assert promote and promote[0].generation == gen + 1
    if swap:
        assert sent(acts, p, Demote) and not fenced(acts, p)
    else:
        assert sent(acts, p, Shutdown)
    acts = h.promoted(s, epoch=3, input_seq=h.w.input_seq - 1, output_seq=0)
    assert [m.data for m in sent(acts, s, Input)] == [b"during"]  # what waited goes to the new primary, once
    assert h.w.active == s.id and h.w.generation == gen + 1
    promoted = events_named(acts, "promoted")
    assert promoted and "switchover" in promoted[0]["reason"]


def test_a_switchover_is_refused_without_a_ready_secondary() -> None:
    h = Harness()
    h.attach_primary()
    acts = h.control(SwitchoverCommand(False, "maintenance"))
    result = of(acts, Send)[-1].msg
    assert isinstance(result, CommandResult) and not result.ok and "no ready secondary" in result.reason
    assert h.w.switchover is None


def test_a_switchover_whose_checkpoint_fails_is_called_off_and_input_flows_again() -> None:
    h = Harness()
    p, _s = h.protected_pair()
    c = h.connect()
    h.control(SwitchoverCommand(False, "maintenance"))
    h.data(c, b"waits")
    acts = h.unprotected(p)
    assert events_named(acts, "switchover-failed") and h.w.switchover is None
    assert [m.data for m in sent(acts, p, Input) if m.kind == KIND_DATA] == [b"waits"]
    assert h.service is S.ALONE and not of(acts, Promote)


# -- which spare can protect which primary -----------------------------------------------------------------------


def test_a_spare_for_another_guest_or_ram_size_or_state_format_is_not_paired() -> None:
    h = Harness()
    p = h.attach_primary(info={"guest": "kvstore.bin", "guest_sha256": "aa", "ram": 16 << 20,
                               "state_format": "colo-vmstate/2"})
    h.attach_spare("other-ram", info={"wants_ram": 32 << 20, "state_format": "colo-vmstate/2"})
    assert not sent(h.last, p, Protect) and h.service is S.ALONE
    why = events_named(h.last, "incompatible")
    assert why and "33554432" in why[0]["reason"] and "16777216" in why[0]["reason"], why
    h.attach_spare("old", info={"state_format": "colo-vmstate/1"})
    assert not sent(h.last, p, Protect)
    assert "upgrade them together" in events_named(h.last, "incompatible")[0]["reason"]
    h.attach_spare("other-guest", info={"wants_guest": "noisy.bin", "wants_guest_sha256": "bb"})
    assert not sent(h.last, p, Protect) and "noisy.bin" in events_named(h.last, "incompatible")[0]["reason"]
    h.attach_spare("fits", info={"wants_guest_sha256": "aa", "wants_ram": 16 << 20, "state_format": "colo-vmstate/2"})
    assert sent(h.last, p, Protect) == [Protect("fits", h.w.nodes["fits"].address, h.w.protect_attempt)]


# -- voided copies: what a restarted gateway must not promote ----------------------------------------------------


def _voided_state(how: str) -> tuple[Harness, Node, Node, int, dict[str, Any]]:
    """A protected pair with output held; the primary then goes on without its secondary (`how`)."""
    h = Harness()
    p, s = h.protected_pair()
    c = h.connect()
    h.output(p, 1, c, b"one")
    if how == "link-closed":
        acts = h.close_link(s)
    elif how == "silent":
        acts = h.run_for(TIMEOUT + 2 * STEP, heard=[p])
    else:
        acts = h.unprotected(p)
    kinds = [type(a) for a in acts if isinstance(a, (Persist, ToClient))]
    assert kinds[:2] == [Persist, ToClient], f"the void must be persisted before output goes: {acts}"
    state = of(acts, Persist)[0].state
    assert state["void"] == {"s": 0}
    assert events_named(acts, "copy-voided")
    return h, p, s, c, state


@pytest.mark.parametrize("how", ["primary-says-unprotected", "link-closed", "silent"])
def test_a_copy_left_behind_is_voided_durably_before_output_past_it_is_released(how: str) -> None:
    h, p, _, c, _ = _voided_state(how)
    assert released(h.log) == [(1, c, b"one")]
    assert released(h.output(p, 2, c, b"two")) == [(2, c, b"two")]
    assert not of(h.last, Persist)  # voided once: output after it goes without another write


def test_a_restarted_gateway_does_not_promote_a_copy_an_earlier_one_voided() -> None:
    """The gap the restarting-gateway property found: the primary went on without its secondary, the gateway
    released output past the secondary's copy, then the primary's host and the gateway were lost before the
    secondary heard it was reset. The next gateway meets only the secondary: promoting it would take back
    output clients saw."""
    _, _, _, _, state = _voided_state("primary-says-unprotected")
    h = Harness(durable=state)
    s = h.attach_secondary("s", input_seq=1, gateway="gw")  # the copy of generation 0 the first gateway voided
    acts = h.run_for(3 * TIMEOUT, heard=[s])
    assert not sent(acts, s, Promote)
    assert reset(acts, s)
    assert h.service is S.DOWN


def test_a_restarted_gateway_does_not_learn_a_pair_whose_copy_was_voided() -> None:
    """The primary never heard it was unprotected (its hello still names the secondary): it serves alone, and
    the voided secondary is a spare again, to be copied anew."""
    _, _, _, _, state = _voided_state("link-closed")
    h = Harness(durable=state)
    p = h.attach_primary("p", peer="s", input_seq=1, output_seq=1, gateway="gw")
    s = h.attach_secondary("s", peer="p", input_seq=1, gateway="gw")
    assert reset(h.log, s)
    assert h.service is S.ALONE and h.w.active == "p" and not h.w.protected
    acts = h.run_for(3 * TIMEOUT, heard=[p, s])  # after the reset's pause it is paired again
    assert sent(acts, p, Protect)


def test_a_voided_node_that_completes_a_new_copy_counts_again() -> None:
    h, p, s, _, _ = _voided_state("primary-says-unprotected")
    assert h.w.voids == {"s": 0}
    h.run_for(3 * TIMEOUT, heard=[p, s])
    assert sent(h.log, p, Protect)[-1].node == "s"
    acts = h.protected(p, s, epoch=7)
    assert of(acts, Persist)[0].state["void"] == {} and h.w.voids == {}


def test_a_voided_copy_of_a_newer_generation_counts() -> None:
    """A void covers the copies the node held then: after a failover (a higher generation) it may hold a valid
    one again, and an orphan of that generation is promoted as usual."""
    _, _, _, _, state = _voided_state("primary-says-unprotected")
    h = Harness(durable=state)
    s = h.attach_secondary("s", **SECONDARY_STATE)  # generation 3 > the voided 0
    h.run_for(3 * TIMEOUT, heard=[s])
    assert sent(h.log, s, Promote)


@pytest.mark.parametrize("bad", [[], {"format": "other"}, {"format": "colo-witness/1"},
                                 {"format": "colo-witness/1", "void": {"s": "1"}},
                                 {"format": "colo-witness/1", "void": {"s": -1}}])
def test_a_malformed_durable_state_is_refused_with_a_reason(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"format|void"):
        load_voids(bad)


def test_a_protection_report_on_an_abandoned_copy_is_stale() -> None:
    """The primary reported the copy complete before it read our unprotect, and the report came late (a stalled
    primary), after the next protect to the same node: taking it for that copy would count on a secondary that
    discarded its copy. Each protect is numbered and the report names the one it answers."""
    h = Harness()
    s = h.attach_spare()
    p = h.attach_primary()
    first = sent(h.log, p, Protect)[-1].attempt
    h.close_link(s)  # lost during the copy: the witness gives up that copy
    s = h.attach_spare("s")  # back as a spare: paired again after the pause
    h.run_for(3 * TIMEOUT, heard=[p, s])
    second = sent(h.log, p, Protect)[-1].attempt
    assert second > first and h.service is S.PROTECTING
    acts = h.msg(p, Protection(p.gen, ProtectionState.PROTECTED, 1, 0, 0, "s", "", first))
    assert events_named(acts, "stale-protection") and h.service is S.PROTECTING and not h.w.protected
    h.msg(p, Protection(p.gen, ProtectionState.PROTECTED, 2, 0, 0, "s", "", second))
    assert h.service is S.PROTECTED and h.w.protected


def test_a_learned_pairs_protection_report_counts_whatever_number_it_carries() -> None:
    """A new gateway learned the pair (it sent no protect): the primary's report that it lost its secondary names
    the old gateway's protect, and still counts."""
    h = Harness()
    p = h.attach_primary("p", peer="s", **PRIMARY_STATE)
    h.attach_secondary("s", peer="p", **SECONDARY_STATE)
    assert h.service is S.PROTECTED
    acts = h.msg(p, Protection(p.gen, ProtectionState.UNPROTECTED, 5, 0, 0, "", "the secondary went away", 12345))
    assert not events_named(acts, "stale-protection")
    assert h.service is S.ALONE and not h.w.protected
