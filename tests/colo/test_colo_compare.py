"""The hybrid-mode output comparer (colo.compare), driven without any socket.

Properties: any segmentation and interleaving of the same streams matches exactly; any single
difference (a byte changed, added or removed, a close against more data) is caught exactly when
both VMs have produced the differing position, and nothing from there on reaches a client; after
either failover the clients' streams are exactly what the surviving VM produces. Examples: the
timeouts, the bound on held bytes, checkpoints and resync, and every misuse.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from colo.compare import Action, NeedCheckpoint, OutputComparer, Release, ReleaseClose
from colo.messages import KIND_CLOSE, KIND_DATA, Trigger

SETTINGS = settings(database=None, deadline=None, max_examples=150)
BIG = 1 << 20  # a max_pending no test stream reaches

DATA, CLOSE = KIND_DATA, KIND_CLOSE
Event = tuple[int, int, bytes]  # (kind, conn, data): one output event of one VM
Stream = tuple[bytes, bool]  # a connection's bytes, and whether the VM closes it after them


@dataclass
class Clients:
    """What the clients see: every action applied, the invariants checked on the way."""

    data: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    closed: set[int] = field(default_factory=set)
    checkpoints: list[NeedCheckpoint] = field(default_factory=list)

    def apply(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, Release):
                assert a.conn not in self.closed, f"data released after the close: {a}"
                assert a.data, "an empty release"
                self.data[a.conn] += a.data
            elif isinstance(a, ReleaseClose):
                assert a.conn not in self.closed, f"a second close: {a}"
                self.closed.add(a.conn)
            else:
                assert isinstance(a, NeedCheckpoint), a
                self.checkpoints.append(a)
        return actions

    def stream(self, conn: int) -> bytes:
        return bytes(self.data.get(conn, b""))


def asked(actions: list[Action]) -> NeedCheckpoint:
    """The one action, which must be a checkpoint request."""
    (a,) = actions
    assert isinstance(a, NeedCheckpoint), a
    return a


class Feeder:
    """A comparer, the clients, and the primary's seq counter."""

    def __init__(self, *, timeout: float = 10.0, max_pending: int = BIG) -> None:
        self.cmp = OutputComparer(timeout=timeout, max_pending=max_pending)
        self.clients = Clients()
        self.seq = 0  # the primary's last output seq

    def p(self, kind: int, conn: int, data: bytes = b"", now: float = 0.0) -> list[Action]:
        self.seq += 1
        return self.clients.apply(self.cmp.primary_output(self.seq, kind, conn, data, now))

    def s(self, kind: int, conn: int, data: bytes = b"", now: float = 0.0) -> list[Action]:
        return self.clients.apply(self.cmp.secondary_output(kind, conn, data, now))

    def feed(self, tagged: list[tuple[str, Event]]) -> None:
        for side, (kind, conn, data) in tagged:
            (self.p if side == "P" else self.s)(kind, conn, data)


# -- strategies ----------------------------------------------------------------------------------

# A small alphabet, so that streams often agree by chance and differences hide among equal bytes.
small_bytes = st.binary(max_size=30).map(lambda b: bytes(x % 4 + 97 for x in b))
more_bytes = st.binary(min_size=1, max_size=10).map(lambda b: bytes(x % 4 + 97 for x in b))
streams_st = st.dictionaries(st.integers(0, 4), st.tuples(small_bytes, st.booleans()), max_size=4)


# Both @st.composite's draw and st.data().draw: hypothesis types them differently.
Draw = Callable[[st.SearchStrategy[Any]], Any]


def segment(draw: Draw, conn: int, stream: Stream) -> list[Event]:
    """One VM's events for a stream: its bytes cut anywhere (empty events too), then the close."""
    data, closed = stream
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    bounds = [0, *cuts, len(data)]
    events: list[Event] = [(DATA, conn, data[a:b]) for a, b in itertools.pairwise(bounds)]
    return events + [(CLOSE, conn, b"")] * closed


def merge(draw: Draw, lists: list[list[Any]]) -> list[Any]:
    """A random interleaving of the lists that keeps the order within each."""
    queues = [list(q) for q in lists if q]
    out = []
    while queues:
        i = draw(st.integers(0, len(queues) - 1))
        out.append(queues[i].pop(0))
        if not queues[i]:
            del queues[i]
    return out


def side_events(draw: Draw, streams: dict[int, Stream]) -> list[Event]:
    """One VM's output for all its connections: each segmented, the connections interleaved."""
    return merge(draw, [segment(draw, conn, s) for conn, s in streams.items()])


def both_sides(draw: Draw, p: dict[int, Stream], s: dict[int, Stream]) -> list[tuple[str, Event]]:
    """The two VMs' events as the gateway might see them: [("P" | "S", event), ...]."""
    pe = [("P", e) for e in side_events(draw, p)]
    se = [("S", e) for e in side_events(draw, s)]
    return merge(draw, [pe, se])


def tokens(stream: Stream) -> list[int | None]:
    """A stream as positions: its bytes, then None for the close."""
    data, closed = stream
    return [*data, *([None] * closed)]


def first_difference(a: list[Any], b: list[Any]) -> int | None:
    """The first position both lists have where they differ (None: one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def primary_stream_upto(sent: list[tuple[int, int, int, bytes]], upto: int) -> dict[int, Stream]:
    """Per connection, what the primary's events with seq <= upto put on it."""
    out: dict[int, Stream] = {}
    for seq, kind, conn, data in sent:
        b, closed = out.get(conn, (b"", False))
        if seq <= upto and not closed:  # after its close, a VM's output on conn is ignored
            out[conn] = (b + data, kind == CLOSE)
    return out


# -- properties ----------------------------------------------------------------------------------


@SETTINGS
@given(st.data(), streams_st)
def test_same_streams_always_match(data: st.DataObject, streams: dict[int, Stream]) -> None:
    f = Feeder()
    f.feed(both_sides(data.draw, streams, streams))
    assert f.clients.checkpoints == []
    for conn, (b, _closed) in streams.items():
        assert f.clients.stream(conn) == b
    assert f.clients.closed == {conn for conn, (_, closed) in streams.items() if closed}
    assert f.cmp.held_total() == 0
    assert f.cmp.released_seq == f.seq  # every primary event released whole


@st.composite
def one_difference(draw: st.DrawFn) -> tuple[dict[int, Stream], dict[int, Stream], int]:
    """Streams for both VMs, equal except on one connection, where the secondary's differs by a
    byte changed, added or removed, or a close cut in early or moved later (more data after it)."""
    p = draw(streams_st)
    conn = draw(st.integers(0, 4))
    b, closed = p[conn] = draw(st.tuples(small_bytes, st.booleans()))
    how = draw(st.sampled_from(["change", "add", "remove", "close early", "close late"]))
    if how == "change" and b:
        i = draw(st.integers(0, len(b) - 1))
        sb = b[:i] + bytes([b[i] ^ draw(st.integers(1, 255))]) + b[i + 1 :]
    elif how == "add":
        i = draw(st.integers(0, len(b)))
        sb = b[:i] + draw(st.binary(min_size=1, max_size=1)) + b[i:]
    elif how == "remove" and b:
        i = draw(st.integers(0, len(b) - 1))
        sb = b[:i] + b[i + 1 :]
    elif how == "close early" and b:
        sb, closed = b[: draw(st.integers(0, len(b) - 1))], True  # the secondary closes early
    else:  # close late: the primary closes; the secondary sends more first
        sb, closed = b + draw(more_bytes), True
        p[conn] = (b, True)
    s = dict(p)
    s[conn] = (sb, closed)
    if draw(st.booleans()):  # the difference on the primary's side instead
        p, s = s, p
    return p, s, conn


@SETTINGS
@given(st.data(), one_difference())
def test_any_difference_is_caught_when_both_reach_it(
    data: st.DataObject, case: tuple[dict[int, Stream], dict[int, Stream], int]
) -> None:
    p, s, bad = case
    d = first_difference(tokens(p[bad]), tokens(s[bad]))
    assume(d is not None)  # e.g. a byte added at the end of a stream that never closes
    assert d is not None
    f = Feeder()
    produced = {"P": 0, "S": 0}  # positions of `bad` each VM has produced so far
    for side, (kind, conn, chunk) in both_sides(data.draw, p, s):
        (f.p if side == "P" else f.s)(kind, conn, chunk)
        if conn == bad:
            produced[side] += 1 if kind == CLOSE else len(chunk)
        reached = min(produced.values()) > d
        # the request comes exactly when both VMs have produced position d, and only once
        assert [c.trigger for c in f.clients.checkpoints] == ([Trigger.MISMATCH] if reached else [])
        # nothing at or past the difference reaches the client
        assert p[bad][0][:d].startswith(f.clients.stream(bad))
        assert bad not in f.clients.closed
    assert f.clients.stream(bad) == p[bad][0][:d]  # the whole common prefix, once both made it
    for conn in p.keys() - {bad}:  # the other connections are not held up
        assert f.clients.stream(conn) == p[conn][0]
        assert (conn in f.clients.closed) == p[conn][1]


@st.composite
def two_runs(draw: st.DrawFn) -> tuple[dict[int, Stream], dict[int, Stream]]:
    """Streams for both VMs: the same, one difference, or unrelated."""
    kind = draw(st.sampled_from(["same", "one difference", "unrelated"]))
    if kind == "same":
        p = draw(streams_st)
        return p, dict(p)
    if kind == "one difference":
        p, s, _ = draw(one_difference())
        return p, s
    return draw(streams_st), draw(streams_st)


@SETTINGS
@given(st.data(), two_runs())
def test_failover_continue_gives_the_clients_the_secondarys_streams(
    data: st.DataObject, runs: tuple[dict[int, Stream], dict[int, Stream]]
) -> None:
    p, s = runs
    events = both_sides(data.draw, p, s)
    cut = data.draw(st.integers(0, len(events)), label="primary lost after this many events")
    f = Feeder()
    for i, (side, (kind, conn, chunk)) in enumerate(events):
        if i == cut:
            f.clients.apply(f.cmp.failover_continue())
        (f.p if side == "P" else f.s)(kind, conn, chunk)  # the primary's, after: ignored
        for c, (b, _) in s.items():  # never a byte the survivor would not have produced
            assert b.startswith(f.clients.stream(c))
    if cut == len(events):
        f.clients.apply(f.cmp.failover_continue())
    for conn, (b, closed) in s.items():
        assert f.clients.stream(conn) == b
        assert (conn in f.clients.closed) == closed
    assert f.clients.data.keys() <= s.keys()
    assert f.cmp.held_total() == 0 and f.cmp.failed_over


@SETTINGS
@given(st.data(), two_runs())
def test_failover_rollback_gives_the_clients_the_primarys_streams(
    data: st.DataObject, runs: tuple[dict[int, Stream], dict[int, Stream]]
) -> None:
    """The primary dies; the secondary loads its checkpoint covering output up to `upto` and,
    being deterministic, goes on to produce the primary's output after it."""
    p, s = runs
    pe = side_events(data.draw, p)
    all_sent = [(seq, kind, conn, chunk) for seq, (kind, conn, chunk) in enumerate(pe, 1)]
    se = side_events(data.draw, s)
    events = merge(data.draw, [[("P", e) for e in pe], [("S", e) for e in se]])
    cut = data.draw(st.integers(0, len(events)), label="primary lost after this many events")
    f = Feeder()
    f.feed(events[:cut])
    got = f.seq  # primary events the comparer received
    upto = data.draw(st.integers(0, len(pe)), label="output_seq")
    since = data.draw(st.integers(0, min(got, upto)), label="events carried from seq")
    record = [list(e) for e in all_sent if since < e[0] <= upto]
    covered = primary_stream_upto(all_sent, upto)
    # Output past the checkpoint that already reached a client cannot be taken back: refused.
    too_late = any(
        not covered.get(c, (b"", False))[0].startswith(f.clients.stream(c))
        or (c in f.clients.closed and not covered.get(c, (b"", False))[1])
        for c in f.clients.data.keys() | f.clients.closed
    )
    if too_late:
        with pytest.raises(ValueError, match="already reached"):
            f.cmp.failover_rollback(upto, record)
        return
    f.clients.apply(f.cmp.failover_rollback(upto, record))
    for conn in p.keys() | s.keys():
        b, closed = covered.get(conn, (b"", False))
        assert f.clients.stream(conn) == b
        assert (conn in f.clients.closed) == closed
    assert f.cmp.released_seq == upto and f.cmp.held_total() == 0
    for _, kind, conn, chunk in all_sent[upto:]:  # the survivor's output from the checkpoint on
        f.s(kind, conn, chunk)
    for conn, (b, closed) in p.items():
        assert f.clients.stream(conn) == b
        assert (conn in f.clients.closed) == closed


@SETTINGS
@given(st.data(), two_runs(), streams_st)
def test_checkpoint_then_resync_carries_on_from_the_primarys_streams(
    data: st.DataObject,
    runs: tuple[dict[int, Stream], dict[int, Stream]],
    after: dict[int, Stream],
) -> None:
    """Whatever happened before a checkpoint, afterwards the clients have exactly the primary's
    streams, and two VMs that agree from there on match again to the end."""
    p, s = runs
    f = Feeder()
    f.feed(both_sides(data.draw, p, s))
    f.clients.apply(f.cmp.checkpoint_committed(f.seq))
    for conn, (b, closed) in p.items():
        assert f.clients.stream(conn) == b
        assert (conn in f.clients.closed) == closed
    assert f.cmp.held_total() == 0 and f.cmp.released_seq == f.seq
    f.s(DATA, 99, b"in flight before the checkpoint")  # dropped: the state it came from is gone
    f.cmp.secondary_resynced()
    # From the checkpoint on both VMs run the same: new output on open connections and new ones.
    later = {c + 10 * (c in f.clients.closed): st_ for c, st_ in after.items()}
    f.clients.checkpoints.clear()
    f.feed(both_sides(data.draw, later, later))
    assert f.clients.checkpoints == []
    for conn, (b, closed) in later.items():
        assert f.clients.stream(conn) == p.get(conn, (b"", False))[0] + b
        assert (conn in f.clients.closed) == closed
    assert f.clients.stream(99) == b""


# -- examples: matching ----------------------------------------------------------------------------


def test_releases_split_events_by_bytes() -> None:
    f = Feeder()
    assert f.p(DATA, 1, b"ab") == []
    assert f.s(DATA, 1, b"a") == [Release(1, b"a")]
    assert f.cmp.pending_bytes(1) == (1, 0)
    assert f.p(DATA, 1, b"c") == []
    assert f.s(DATA, 1, b"bc") == [Release(1, b"bc")]
    assert f.cmp.pending_bytes(1) == (0, 0) and f.cmp.released_seq == 2


def test_close_is_released_once_both_closed_after_the_same_bytes() -> None:
    f = Feeder()
    f.p(DATA, 1, b"bye")
    f.p(CLOSE, 1)
    assert f.s(DATA, 1, b"bye") == [Release(1, b"bye")]
    assert f.cmp.released_seq == 1  # the close (seq 2) is not released yet
    assert f.s(CLOSE, 1) == [ReleaseClose(1)]
    assert f.cmp.released_seq == 2
    # the connection is over: more output on it is ignored, on either side
    assert f.p(DATA, 1, b"late") == [] and f.s(DATA, 1, b"late") == [] and f.s(CLOSE, 1) == []
    assert f.cmp.released_seq == 3 and f.cmp.held_total() == 0
    # a new connection id is compared as usual
    f.p(DATA, 2, b"hi")
    assert f.s(DATA, 2, b"hi") == [Release(2, b"hi")]


def test_output_after_a_vms_own_close_is_ignored() -> None:
    f = Feeder()
    f.p(DATA, 1, b"x")
    f.p(CLOSE, 1)
    assert f.p(DATA, 1, b"after my close") == [] and f.p(CLOSE, 1) == []
    assert f.cmp.pending_bytes(1) == (1, 0)
    assert f.s(DATA, 1, b"x") == [Release(1, b"x")]
    assert f.s(CLOSE, 1) == [ReleaseClose(1)]
    assert f.cmp.released_seq == 4 and f.clients.checkpoints == []


@pytest.mark.parametrize("first", ["P", "S"])
def test_a_close_against_more_data_is_a_mismatch(first: str) -> None:
    f = Feeder()
    closer, other = (f.p, f.s) if first == "P" else (f.s, f.p)
    closer(DATA, 1, b"ab")
    closer(CLOSE, 1)
    assert other(DATA, 1, b"ab") == [Release(1, b"ab")]
    ask = asked(other(DATA, 1, b"c"))
    assert ask.trigger == Trigger.MISMATCH
    assert "closed it after byte 2" in ask.reason
    assert other(CLOSE, 1) == []  # the connection stays held: no close reaches the client


def test_a_close_against_held_data_is_a_mismatch_at_once() -> None:
    f = Feeder()
    f.p(DATA, 1, b"abc")
    assert f.s(DATA, 1, b"ab") == [Release(1, b"ab")]
    ask = asked(f.s(CLOSE, 1))
    assert ask.trigger == Trigger.MISMATCH and "the secondary closed it after byte 2" in ask.reason


def test_mismatch_releases_the_common_prefix_and_names_the_byte() -> None:
    f = Feeder()
    f.p(DATA, 1, b"hello")
    rel, ask = f.s(DATA, 1, b"help!")
    assert rel == Release(1, b"hel")
    assert ask == NeedCheckpoint(
        Trigger.MISMATCH, "conn 1: byte 3 differs (primary 0x6c, secondary 0x70)"
    )
    # the connection stays held; equal bytes after the difference release nothing
    assert f.p(DATA, 1, b"xyz") == [] and f.s(DATA, 1, b"xyz") == []
    assert f.cmp.pending_bytes(1) == (5, 5)


def test_released_seq_is_the_last_primary_event_released_whole() -> None:
    f = Feeder()
    f.p(DATA, 1, b"aaa")  # seq 1, held
    f.p(DATA, 2, b"bb")  # seq 2
    f.p(DATA, 1, b"")  # seq 3, empty: released once all of conn 1 before it is
    assert f.s(DATA, 2, b"bb") == [Release(2, b"bb")]
    assert f.cmp.released_seq == 0  # seq 2 is released, but seq 1 is not
    f.s(DATA, 1, b"aa")
    assert f.cmp.released_seq == 0  # seq 1 only in part
    f.s(DATA, 1, b"a")
    assert f.cmp.released_seq == 3


# -- examples: timeouts, the bound, one request per divergence -------------------------------------


def test_output_unmatched_longer_than_the_timeout_asks_for_a_checkpoint() -> None:
    f = Feeder(timeout=1.0)
    f.p(DATA, 1, b"abc", now=10.0)
    assert f.cmp.poll(10.5) == [] and f.cmp.poll(11.0) == []
    ask = asked(f.cmp.poll(11.25))
    assert ask.trigger == Trigger.TIMEOUT
    assert ask.reason == "conn 1: 3 bytes of primary output unmatched for 1.25 s (timeout 1 s)"
    assert f.cmp.checkpoint_requested


def test_output_matched_in_time_asks_nothing() -> None:
    f = Feeder(timeout=1.0)
    f.p(DATA, 1, b"ab", now=10.0)
    f.p(DATA, 1, b"cd", now=10.8)
    f.s(DATA, 1, b"ab", now=10.9)
    assert f.cmp.poll(11.5) == []  # "ab" waited 0.9 s and is released; "cd" waits since 10.8
    ask = asked(f.cmp.poll(11.85))
    assert "2 bytes of primary output" in ask.reason


def test_the_timeout_counts_on_both_sides_and_for_a_close() -> None:
    f = Feeder(timeout=1.0)
    f.s(DATA, 1, b"xy", now=0.0)
    ask = asked(f.cmp.poll(1.5))
    assert "2 bytes of secondary output" in ask.reason
    g = Feeder(timeout=1.0)
    g.p(CLOSE, 1, now=0.0)
    ask = asked(g.cmp.poll(1.5))
    assert "a close of primary output" in ask.reason


def test_an_unresolved_request_is_repeated_after_each_further_timeout() -> None:
    f = Feeder(timeout=1.0)
    f.p(DATA, 1, b"a", now=0.0)
    first = asked(f.s(DATA, 1, b"b", now=0.5))
    assert first.trigger == Trigger.MISMATCH
    assert f.cmp.poll(1.5) == []  # asked at 0.5: not yet a full timeout
    again = asked(f.cmp.poll(1.6))
    assert again.trigger == Trigger.MISMATCH and again.reason.endswith(first.reason)
    assert f.cmp.poll(2.5) == []
    assert len(f.cmp.poll(2.7)) == 1


def test_one_request_per_divergence() -> None:
    f = Feeder(timeout=1.0, max_pending=4)
    f.p(DATA, 1, b"a", now=0.0)
    assert len(f.s(DATA, 1, b"b", now=0.0)) == 1  # mismatch
    f.p(DATA, 2, b"c", now=0.1)
    assert f.s(DATA, 2, b"d", now=0.1) == []  # a second mismatch: already asked
    assert f.p(DATA, 3, b"12345", now=0.2) == []  # over the bound: already asked
    assert f.cmp.poll(0.9) == []  # unmatched for long, but asked at 0.0
    f.cmp.checkpoint_committed(f.seq)
    f.cmp.secondary_resynced()
    f.p(DATA, 4, b"e", now=2.0)
    assert asked(f.s(DATA, 4, b"f", now=2.0)).trigger == Trigger.MISMATCH  # a new one


def test_held_bytes_over_the_bound_ask_for_a_checkpoint_and_are_kept() -> None:
    f = Feeder(max_pending=4)
    assert f.p(DATA, 1, b"abcd") == []  # at the bound: fine
    ask = asked(f.p(DATA, 1, b"e"))
    assert ask.trigger == Trigger.TIMEOUT
    assert ask.reason == "conn 1: primary held bytes exceed max_pending (5 > 4)"
    assert f.p(DATA, 1, b"fgh") == []  # nothing dropped, nothing asked again
    assert f.cmp.pending_bytes(1) == (8, 0) and f.cmp.held_total() == 8
    assert f.cmp.checkpoint_committed(f.seq) == [Release(1, b"abcdefgh")]


def test_the_secondary_over_the_bound_too() -> None:
    f = Feeder(max_pending=2)
    ask = asked(f.s(DATA, 7, b"xyz"))
    assert ask.reason == "conn 7: secondary held bytes exceed max_pending (3 > 2)"


# -- examples: checkpoints -------------------------------------------------------------------------


def test_a_checkpoint_releases_the_primary_and_voids_the_secondary_until_it_resyncs() -> None:
    f = Feeder(timeout=1.0)
    f.p(DATA, 1, b"one")
    f.p(DATA, 2, b"two")
    f.p(CLOSE, 2)
    f.s(DATA, 1, b"onX")  # mismatch on conn 1
    f.s(DATA, 3, b"secondary only")
    assert f.cmp.checkpoint_committed(3) == [Release(1, b"e"), Release(2, b"two"), ReleaseClose(2)]
    assert f.cmp.held_total() == 0 and f.cmp.released_seq == 3
    assert not f.cmp.checkpoint_requested and f.cmp.awaiting_resync
    # the secondary's output from before it loaded the checkpoint, still in flight: dropped
    assert f.s(DATA, 1, b"stale") == [] and f.s(CLOSE, 1) == []
    assert f.cmp.pending_bytes(1) == (0, 0)
    # the primary runs on; its output waits for the secondary, without timing out meanwhile
    f.p(DATA, 1, b"four", now=5.0)
    assert f.cmp.poll(100.0) == []
    f.cmp.secondary_resynced()
    assert f.cmp.poll(100.5) == []  # the clock restarts at the first time seen after the resync
    assert f.s(DATA, 1, b"fo", now=100.7) == [Release(1, b"fo")]
    assert len(f.cmp.poll(101.6)) == 1  # "ur" unmatched since the restart at 100.5


def test_a_checkpoint_keeps_primary_output_past_output_seq_for_the_resynced_secondary() -> None:
    f = Feeder()
    f.p(DATA, 1, b"ab")  # seq 1: covered
    f.p(DATA, 1, b"cd")  # seq 2: produced after the checkpoint's state (not in this protocol)
    assert f.cmp.checkpoint_committed(1) == [Release(1, b"ab")]
    assert f.cmp.released_seq == 1 and f.cmp.pending_bytes(1) == (2, 0)
    f.cmp.secondary_resynced()
    assert f.s(DATA, 1, b"cd") == [Release(1, b"cd")]  # the secondary, from the checkpoint on
    assert f.cmp.released_seq == 2


# -- examples: failover ----------------------------------------------------------------------------


def test_failover_continue_releases_the_secondarys_held_output_and_passes_it_through() -> None:
    f = Feeder()
    f.p(DATA, 1, b"abc")
    f.p(DATA, 2, b"primary")
    f.s(DATA, 1, b"abXY")  # mismatch: "ab" released
    f.s(DATA, 3, b"s3")
    f.s(CLOSE, 3)
    assert f.cmp.failover_continue() == [Release(1, b"XY"), Release(3, b"s3"), ReleaseClose(3)]
    assert f.cmp.held_total() == 0 and f.cmp.failed_over
    assert f.s(DATA, 1, b"more") == [Release(1, b"more")]
    assert f.s(DATA, 2, b"new") == [Release(2, b"new")]
    assert f.s(CLOSE, 2) == [ReleaseClose(2)]
    assert f.s(DATA, 2, b"late") == [] and f.s(DATA, 3, b"late") == []
    assert f.p(DATA, 1, b"fenced") == []  # the fenced primary's late output
    assert f.cmp.poll(1e9) == []


def test_failover_rollback_releases_the_primarys_output_up_to_output_seq() -> None:
    f = Feeder()
    f.p(DATA, 1, b"abc")  # seq 1
    f.s(DATA, 1, b"ab")  # "ab" released
    f.s(DATA, 2, b"secondary")  # dropped: the secondary loads the primary's state
    record = [
        [1, DATA, 1, b"abc"],  # received: the comparer's own copy is used
        [2, DATA, 2, b"never received"],
        [3, CLOSE, 1, b""],
        [4, DATA, 5, b"after output_seq"],  # not covered: ignored
    ]
    actions = f.cmp.failover_rollback(3, record)
    assert actions == [Release(1, b"c"), ReleaseClose(1), Release(2, b"never received")]
    assert f.cmp.released_seq == 3 and f.cmp.held_total() == 0
    assert f.s(DATA, 2, b"!") == [Release(2, b"!")]  # straight through from here


def test_failover_rollback_drops_primary_output_past_output_seq() -> None:
    f = Feeder()
    f.p(DATA, 1, b"ab")  # seq 1
    f.p(DATA, 1, b"cd")  # seq 2, past the checkpoint
    assert f.cmp.failover_rollback(1, []) == [Release(1, b"ab")]
    assert f.s(DATA, 1, b"CD") == [Release(1, b"CD")]  # the survivor's own, from the checkpoint


def test_failover_rollback_refuses_what_it_cannot_do_and_changes_nothing() -> None:
    f = Feeder()
    f.p(DATA, 1, b"ab")  # seq 1
    f.p(DATA, 2, b"cd")  # seq 2
    f.s(DATA, 2, b"c")  # releases part of seq 2
    with pytest.raises(ValueError, match="output 2 on conn 2, after output_seq 1, already reached"):
        f.cmp.failover_rollback(1, [])
    with pytest.raises(ValueError, match="output 3 was never received and is not in events"):
        f.cmp.failover_rollback(4, [[4, DATA, 1, b"x"]])
    with pytest.raises(ValueError, match="output kind"):
        f.cmp.failover_rollback(3, [[3, 1, 1, b"x"]])
    assert not f.cmp.failed_over and f.cmp.pending_bytes(2) == (1, 0)
    assert f.cmp.failover_rollback(2, []) == [Release(1, b"ab"), Release(2, b"d")]
    g = Feeder()
    g.p(DATA, 1, b"a")
    g.s(DATA, 1, b"a")
    with pytest.raises(ValueError, match=r"output_seq must be an int >= 1"):
        g.cmp.failover_rollback(0, [])


def test_failover_discard_drops_what_is_held_and_passes_the_survivor_through() -> None:
    f = Feeder()
    f.p(DATA, 1, b"held")  # never matched: no client saw it
    f.cmp.failover_discard()
    assert f.cmp.failed_over and f.cmp.pending_bytes(1) == (0, 0)
    assert f.cmp.secondary_output(DATA, 1, b"after", 0.0) == [Release(1, b"after")]
    with pytest.raises(ValueError, match="after a failover"):
        f.cmp.failover_discard()


# -- examples: misuse ------------------------------------------------------------------------------


def test_misuse_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="timeout"):
        OutputComparer(timeout=0, max_pending=1)
    with pytest.raises(ValueError, match="max_pending"):
        OutputComparer(timeout=1.0, max_pending=0)
    cmp = OutputComparer(timeout=1.0, max_pending=10, released_seq=41)
    with pytest.raises(ValueError, match="seq must be 42"):
        cmp.primary_output(41, DATA, 1, b"x", 0.0)
    with pytest.raises(ValueError, match="output kind"):
        cmp.primary_output(42, 1, 1, b"x", 0.0)
    with pytest.raises(ValueError, match="output kind"):
        cmp.secondary_output(True, 1, b"x", 0.0)
    with pytest.raises(ValueError, match="no committed checkpoint awaits a resync"):
        cmp.secondary_resynced()
    with pytest.raises(ValueError, match="output_seq must be an int <= 41"):
        cmp.checkpoint_committed(42)
    assert cmp.primary_output(42, DATA, 1, b"x", 0.0) == []
    cmp.failover_continue()
    for call in (
        cmp.failover_continue,
        cmp.secondary_resynced,
        lambda: cmp.checkpoint_committed(42),
        lambda: cmp.failover_rollback(42, []),
    ):
        with pytest.raises(ValueError, match="after a failover"):
            call()
