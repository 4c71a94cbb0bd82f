"""Hybrid (COLO) mode: compare the two VMs' network output and decide what clients may see.

In hybrid mode both VMs run and get the same input. The gateway hands every output event of both
to one `OutputComparer`, which answers with actions. It is sans-I/O: no sockets, threads or clocks;
the caller passes the time in and carries the actions out, in the order given:

    Release(conn, data)           send `data` to the client of connection `conn`
    ReleaseClose(conn)            close that client's connection (after everything released before)
    NeedCheckpoint(trigger, why)  ask the primary for a checkpoint now (`CheckpointNow(trigger)`)

The rule, per connection: clients see the longest common prefix of the two VMs' byte streams, as
soon as both have produced it. That prefix is safe whatever happens next, because whichever VM
survives has produced it. Everything past it is held. Matching is by bytes, not by events: the
primary may send "ab", "c" where the secondary sends "a", "bc", so a release may split an event.
A close is a terminal marker at the end of a stream: it is released only once both VMs closed the
connection with exactly the same bytes before it; a close on one side where the other has more
bytes is a mismatch. Output on a connection after its close was released is ignored.

A checkpoint is asked for when the streams differ (trigger "mismatch"), when output stays unmatched
longer than `timeout`, or when a connection holds more than `max_pending` bytes on one side (both
trigger "timeout"; the reason says which). One request per divergence: after asking, the comparer
stays quiet until `checkpoint_committed`, except that `poll` asks again every further `timeout`
while no checkpoint comes (the request may have been lost, or the primary busy).

Like QEMU's colo-compare after a checkpoint, the primary's held output is then released and the
secondary's dropped: the secondary's state is replaced by the primary's, so what it produced
before is void. Its output stays void until `secondary_resynced` (it may still be in flight).

Failover has two cases. `failover_continue`: the secondary goes on from its own running state, so
its held output is what clients must see next. `failover_rollback`: the secondary loads the
primary's last complete checkpoint, so clients must see the primary's output up to that
checkpoint's `output_seq`. Either way, the comparer then passes the survivor's output straight
through. For `failover_rollback` the comparer tracks which primary events (numbered by `seq`) are
fully released: `released_seq`.

Ordering the caller must keep: outputs of one VM in the order that VM produced them; a VM's
`checkpoint_committed` / failover call after that VM's outputs that precede it on its link; and
`secondary_resynced` for a checkpoint after `checkpoint_committed` for it. docs/protocol.md,
"Hybrid mode: comparing outputs", tells the whole story.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from colo.messages import KIND_CLOSE, KIND_DATA, Trigger

# -- the actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Release:
    """Action: send `data` to the client of connection `conn`, after everything released before."""

    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ReleaseClose:
    """Action: close the client's connection `conn`, after all the data released on it."""

    conn: int


@dataclass(frozen=True, slots=True)
class NeedCheckpoint:
    """Action: ask the primary for a checkpoint, for `trigger` (mismatch or timeout)."""

    trigger: Trigger
    reason: str


Action = Release | ReleaseClose | NeedCheckpoint

# -- what the comparer holds -------------------------------------------------------------------


@dataclass(slots=True)
class _Side:
    """One VM's output on one connection that no client has seen yet."""

    # The bytes, from the connection's `released` offset on (both sides start at the same offset).
    held: bytearray = field(default_factory=bytearray)
    # (stream offset just past an event's bytes, when the event came), oldest first: the first
    # entry tells how long the oldest held byte has been waiting for a match.
    arrivals: collections.deque[tuple[int, float]] = field(default_factory=collections.deque)
    closed_at: float | None = None  # when this VM closed the connection; None: still open

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def add(self, kind: int, data: bytes, now: float, released: int) -> None:
        if kind == KIND_CLOSE:
            self.closed_at = now
        elif data:
            self.held += data
            self.arrivals.append((released + len(self.held), now))

    def waiting_since(self) -> float | None:
        """When the oldest output nobody matched yet came (None: nothing unmatched)."""
        return self.arrivals[0][1] if self.arrivals else self.closed_at

    def forget(self) -> None:
        self.held.clear()
        self.arrivals.clear()
        self.closed_at = None


@dataclass(slots=True)
class _Conn:
    """One client connection: how much the client has seen, and what each VM holds past that."""

    released: int = 0  # bytes released to the client so far
    primary: _Side = field(default_factory=_Side)
    secondary: _Side = field(default_factory=_Side)
    diverged: bool = False  # the streams differ: compare no more until a checkpoint

    def sides(self) -> tuple[tuple[str, _Side], tuple[str, _Side]]:
        return ("primary", self.primary), ("secondary", self.secondary)


@dataclass(frozen=True, slots=True)
class _PrimaryEvent:
    """Where one primary output event lies in its connection's stream: its bytes are
    [start, end). Enough to tell when it is fully released, and to release what is left of it."""

    seq: int
    conn: int
    start: int
    end: int
    close: bool  # a close (start == end: where the stream ends)
    ignored: bool  # came after the connection was closed: no client will ever see it


# -- the comparer ------------------------------------------------------------------------------


class OutputComparer:
    """Compares the primary's and the secondary's output per connection; see the module docstring.

    Public attributes, read-only for callers:
      timeout           seconds output may stay unmatched before a checkpoint is asked for
      max_pending       bytes one side may hold on one connection before a checkpoint is asked for
      released_seq      every primary output event with seq <= released_seq is fully released
      awaiting_resync   a checkpoint was committed; the secondary's output is dropped until it
                        has loaded it (`secondary_resynced`)
      failed_over       one of the failovers happened: the survivor's output passes straight
                        through, and the primary is gone
    """

    def __init__(self, *, timeout: float, max_pending: int, released_seq: int = 0) -> None:
        # `released_seq`: the last primary output already released before this comparer took
        # over (a primary that ran unprotected first); the next primary event must be seq + 1.
        if type(timeout) not in (int, float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if type(max_pending) is not int or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if type(released_seq) is not int or released_seq < 0:
            raise ValueError(f"released_seq must be an int >= 0, got {released_seq!r}")
        self.timeout = float(timeout)
        self.max_pending = max_pending
        self.released_seq = released_seq
        self.awaiting_resync = False
        self.failed_over = False
        self._last_seq = released_seq  # the last primary event received
        # The last fully released primary event that showed a client something (bytes, a close).
        self._visible_seq = released_seq
        self._conns: dict[int, _Conn] = {}  # connections not yet released-closed
        self._finished: set[int] = set()  # connections released-closed: their ids are spent
        # Primary events not yet fully released, in seq order (the head decides `released_seq`).
        self._events: collections.deque[_PrimaryEvent] = collections.deque()
        self._request: NeedCheckpoint | None = None  # the checkpoint asked for and not yet come
        self._requested_at = 0.0
        # Output is judged "unmatched too long" from max(its arrival, _clock_from): after the
        # secondary resyncs, the clock restarts at the next `now` the comparer sees.
        self._clock_from = -math.inf
        self._restart_clock = False

    # -- the VMs' output ------------------------------------------------------------------------

    def primary_output(
        self, seq: int, kind: int, conn: int, data: bytes, now: float
    ) -> list[Action]:
        """The primary VM's output event number `seq` (DATA or CLOSE on `conn`) came at `now`."""
        _check_kind(kind)
        self._tick(now)
        if self.failed_over:
            return []  # a late event from the fenced primary: no client may see it
        if type(seq) is not int or seq != self._last_seq + 1:
            raise ValueError(
                f"primary output seq must be {self._last_seq + 1} (one after the last), got {seq!r}"
            )
        actions = self._compare(conn, now) if self._add_primary(seq, kind, conn, data, now) else []
        self._advance_released_seq()
        return actions

    def secondary_output(self, kind: int, conn: int, data: bytes, now: float) -> list[Action]:
        """The secondary VM's output event (DATA or CLOSE on `conn`) came at `now`."""
        _check_kind(kind)
        self._tick(now)
        if self.failed_over:
            return self._pass_through(kind, conn, data)
        if self.awaiting_resync:
            return []  # from the secondary's run before the checkpoint replaced its state
        c = self._open(conn)
        if c is None or c.secondary.closed:
            return []  # after its own close: the connection is over for this VM
        c.secondary.add(kind, data, now, c.released)
        actions = self._compare(conn, now)
        self._advance_released_seq()
        return actions

    def poll(self, now: float) -> list[Action]:
        """Call often: asks for a checkpoint when output has waited more than `timeout` for its
        match, or again when a checkpoint asked for has not come `timeout` after asking."""
        self._tick(now)
        if self.failed_over:
            return []
        if self._request is not None:
            waited = now - self._requested_at
            if waited <= self.timeout:
                return []
            self._requested_at = now  # ask again, and again after each further timeout
            why = f"no checkpoint {waited:.3g} s after asking for one: {self._request.reason}"
            return [NeedCheckpoint(self._request.trigger, why)]
        if self.awaiting_resync:
            return []  # the secondary is loading the checkpoint: it cannot match anything yet
        for conn, c in self._conns.items():
            for name, side in c.sides():
                since = side.waiting_since()
                if since is None:
                    continue
                age = now - max(since, self._clock_from)
                if age > self.timeout:
                    what = f"{len(side.held)} bytes" if side.held else "a close"
                    return self._ask(
                        Trigger.TIMEOUT,
                        f"conn {conn}: {what} of {name} output unmatched for {age:.3g} s "
                        f"(timeout {self.timeout:g} s)",
                        now,
                    )
        return []

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_committed(self, output_seq: int) -> list[Action]:
        """The checkpoint covering the primary's output up to `output_seq` is complete: release
        the primary's held output it covers, and void the secondary's until it resyncs.

        The primary sends its commit before it resumes, so all its held output has seq <=
        output_seq and all of it is released. Were any later events held, they would stay held,
        to be compared with what the resynced secondary produces from the checkpoint on.
        """
        self._check_live("checkpoint_committed")
        if type(output_seq) is not int or output_seq > self._last_seq:
            raise ValueError(
                f"checkpoint_committed: output_seq must be an int <= {self._last_seq} (the last "
                f"primary output received), got {output_seq!r}"
            )
        for c in self._conns.values():  # the secondary's state is replaced: its output is void
            c.secondary.forget()
            c.diverged = False
        actions = self._release_primary_upto(output_seq)
        self._request = None  # the divergence, if any, is resolved
        self.awaiting_resync = True
        return actions

    @property
    def last_primary_seq(self) -> int:
        """The last primary output event received (all of it may be released once the secondary is gone)."""
        return self._last_seq

    def secondary_resynced(self) -> None:
        """The secondary has loaded the committed checkpoint: compare its output again."""
        self._check_live("secondary_resynced")
        if not self.awaiting_resync:
            raise ValueError(
                "secondary_resynced: no committed checkpoint awaits a resync (call "
                "checkpoint_committed for a checkpoint before secondary_resynced for it)"
            )
        self.awaiting_resync = False
        self._restart_clock = True  # the secondary gets a full timeout to catch up

    # -- failover --------------------------------------------------------------------------------

    def failover_continue(self) -> list[Action]:
        """The primary is lost; the secondary goes on from its own running state: release what
        it produced and the comparer holds (closes too), drop the primary's held output, and
        from now on pass the secondary's output straight through."""
        self._check_live("failover_continue")
        actions: list[Action] = []
        for conn, c in self._conns.items():
            if c.secondary.held:
                actions.append(Release(conn, bytes(c.secondary.held)))
            if c.secondary.closed:
                actions.append(ReleaseClose(conn))
                self._finished.add(conn)
        self._pass_through_from_now()
        return actions

    def failover_rollback(self, output_seq: int, events: Sequence[Sequence[Any]]) -> list[Action]:
        """The primary is lost during a checkpoint whose state arrived complete; the secondary
        loads it. Release what is left of the primary's output up to `output_seq` (taken from
        `events`, [[seq, kind, conn, data], ...], for events the comparer never received), drop
        all other held output, and from now on pass the secondary's output straight through.

        Raises ValueError, changing nothing, if output past `output_seq` already reached a
        client (it cannot be taken back) or if `events` lacks an event the comparer never got.
        """
        self._check_live("failover_rollback")
        if type(output_seq) is not int or output_seq < self._visible_seq:
            raise ValueError(
                f"failover_rollback: output_seq must be an int >= {self._visible_seq} (output "
                f"up to {self._visible_seq} already reached the clients), got {output_seq!r}"
            )
        for ev in self._events:
            if ev.seq > output_seq and not ev.ignored:
                c = self._conns.get(ev.conn)
                if c is None or c.released > ev.start:
                    raise ValueError(
                        f"failover_rollback: primary output {ev.seq} on conn {ev.conn}, after "
                        f"output_seq {output_seq}, already reached the client"
                    )
        missing: dict[int, tuple[int, int, bytes]] = {}  # seq -> (kind, conn, data)
        for event in events:
            seq, kind, conn, data = event
            _check_kind(kind)
            if self._last_seq < seq <= output_seq:
                missing[seq] = (kind, conn, data)
        for seq in range(self._last_seq + 1, output_seq + 1):  # stops at the first hole
            if seq not in missing:
                raise ValueError(
                    f"failover_rollback: output {seq} was never received and is not in events (received up "
                    f"to {self._last_seq}; events {sorted(int(e[0]) for e in events)}, up to {output_seq})"
                )
        # Now nothing can fail: fill in the missing events as if the primary had sent them.
        for seq in sorted(missing):
            self._add_primary(seq, *missing[seq], now=0.0)
        for c in self._conns.values():
            c.secondary.forget()
        actions = self._release_primary_upto(output_seq)
        self._pass_through_from_now()
        self.released_seq = output_seq  # the survivor numbers its output on from here
        return actions

    # -- introspection (status, tests) -------------------------------------------------------------

    def pending_bytes(self, conn: int) -> tuple[int, int]:
        """(primary, secondary) bytes held on `conn`."""
        c = self._conns.get(conn)
        return (len(c.primary.held), len(c.secondary.held)) if c else (0, 0)

    def held_total(self) -> int:
        """Bytes held on all connections, both sides."""
        return sum(len(c.primary.held) + len(c.secondary.held) for c in self._conns.values())

    def snapshot(self, conn: int, limit: int = 256) -> dict[str, Any]:
        """Where `conn` stands (the event stream, the teaching view): the bytes released so far (the common
        prefix), what each side holds past it (its first `limit` bytes), and whether the streams differ; when they
        do, they differ at byte `released` (the first byte each side holds), or one side closed before it."""
        c = self._conns.get(conn)
        if c is None:
            return {"released": None, "finished": conn in self._finished}
        p, s = c.primary, c.secondary
        return {"released": c.released, "primary": bytes(p.held[:limit]), "secondary": bytes(s.held[:limit]),
                "primary_held": len(p.held), "secondary_held": len(s.held), "primary_closed": p.closed,
                "secondary_closed": s.closed, "diverged": c.diverged,
                "differs_at": c.released if c.diverged else None}

    @property
    def checkpoint_requested(self) -> bool:
        """A checkpoint was asked for and has not been committed yet."""
        return self._request is not None

    def failover_discard(self) -> None:
        """The primary is lost and what the survivor's state covers cannot be given to the clients (output
        missing): drop everything held, and from now on pass the secondary's output straight through. The
        caller ends the client connections."""
        self._check_live("failover_discard")
        self._pass_through_from_now()

    # -- internals -------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        if self._restart_clock:
            self._clock_from = now
            self._restart_clock = False

    def _check_live(self, call: str) -> None:
        if self.failed_over:
            raise ValueError(f"{call}: after a failover there is only one VM: nothing to compare")

    def _open(self, conn: int) -> _Conn | None:
        """The state of `conn`, new if it is the first output on it; None once it is over."""
        if conn in self._finished:
            return None
        c = self._conns.get(conn)
        if c is None:
            c = self._conns[conn] = _Conn()
        return c

    def _add_primary(self, seq: int, kind: int, conn: int, data: bytes, now: float) -> bool:
        """Hold primary event `seq` and note where it lies; False if it is to be ignored."""
        self._last_seq = seq
        c = self._open(conn)
        if c is None or c.primary.closed:  # after the close: the connection is over for this VM
            self._events.append(_PrimaryEvent(seq, conn, 0, 0, close=False, ignored=True))
            return False
        start = c.released + len(c.primary.held)
        c.primary.add(kind, data, now, c.released)
        end = c.released + len(c.primary.held)
        self._events.append(_PrimaryEvent(seq, conn, start, end, kind == KIND_CLOSE, False))
        return True

    def _compare(self, conn: int, now: float) -> list[Action]:
        """Release what both sides now agree on; ask for a checkpoint if they disagree."""
        c = self._conns[conn]
        if c.diverged:
            return self._check_overflow(conn, c, now)  # still holding both: bound them
        p, s = c.primary, c.secondary
        if not (p.held and s.held) and not (p.closed or s.closed):
            return self._check_overflow(conn, c, now)  # one side is ahead: nothing to match yet (the usual case)
        actions: list[Action] = []
        n = min(len(p.held), len(s.held))
        same = _common_prefix(p.held, s.held, n)
        if same:
            actions.append(self._release(conn, c, same))
        if same < n:  # the first held byte of each side is the first difference
            why = (
                f"byte {c.released} differs "
                f"(primary {p.held[0]:#04x}, secondary {s.held[0]:#04x})"
            )
            return actions + self._diverge(conn, c, why, now)
        # Now at most one side holds bytes. A close with more bytes on the other side: mismatch.
        for (name, side), (other_name, other) in zip(c.sides(), c.sides()[::-1], strict=True):
            if side.closed and other.held:
                why = f"the {name} closed it after byte {c.released}; the {other_name} sent more"
                return actions + self._diverge(conn, c, why, now)
        if p.closed and s.closed:  # both closed after the same bytes: the stream is complete
            actions.append(ReleaseClose(conn))
            del self._conns[conn]
            self._finished.add(conn)
            return actions
        return actions + self._check_overflow(conn, c, now)

    def _release(self, conn: int, c: _Conn, n: int) -> Release:
        """Release the next `n` bytes of `conn`: the primary's (equal to the secondary's, if it
        holds them)."""
        data = bytes(c.primary.held[:n])
        del c.primary.held[:n]
        del c.secondary.held[:n]
        c.released += n
        for side in (c.primary, c.secondary):
            while side.arrivals and side.arrivals[0][0] <= c.released:
                side.arrivals.popleft()
        return Release(conn, data)

    def _release_primary_upto(self, output_seq: int) -> list[Action]:
        """Release the held primary output of events with seq <= output_seq (secondary already
        forgotten): on each connection, up to the end of its last such event."""
        covered: dict[int, _PrimaryEvent] = {}
        for ev in self._events:
            if ev.seq > output_seq:
                break
            if not ev.ignored:
                covered[ev.conn] = ev
        actions: list[Action] = []
        for conn, last in covered.items():
            c = self._conns.get(conn)
            if c is None:
                continue  # released-closed already
            if last.end > c.released:
                actions.append(self._release(conn, c, last.end - c.released))
            if last.close:
                actions.append(ReleaseClose(conn))
                del self._conns[conn]
                self._finished.add(conn)
        self._advance_released_seq()
        return actions

    def _advance_released_seq(self) -> None:
        while self._events and self._is_released(self._events[0]):
            ev = self._events.popleft()
            self.released_seq = ev.seq
            if not ev.ignored and (ev.close or ev.end > ev.start):
                self._visible_seq = ev.seq

    def _is_released(self, ev: _PrimaryEvent) -> bool:
        c = self._conns.get(ev.conn)
        if ev.ignored or c is None:  # nothing to release, or the connection is released-closed
            return True
        return not ev.close and c.released >= ev.end

    def _diverge(self, conn: int, c: _Conn, why: str, now: float) -> list[Action]:
        c.diverged = True
        return self._ask(Trigger.MISMATCH, f"conn {conn}: {why}", now)

    def _check_overflow(self, conn: int, c: _Conn, now: float) -> list[Action]:
        for name, side in c.sides():
            if len(side.held) > self.max_pending:
                size = f"({len(side.held)} > {self.max_pending})"
                why = f"conn {conn}: {name} held bytes exceed max_pending {size}"
                return self._ask(Trigger.TIMEOUT, why, now)
        return []

    def _ask(self, trigger: Trigger, why: str, now: float) -> list[Action]:
        """Ask for a checkpoint, unless one was asked for already (one per divergence)."""
        if self._request is not None:
            return []
        self._request = NeedCheckpoint(trigger, why)
        self._requested_at = now
        return [self._request]

    def _pass_through_from_now(self) -> None:
        self.failed_over = True
        self.awaiting_resync = False
        self._conns.clear()  # all that was held and not released is dropped
        self._events.clear()
        self._request = None

    def _pass_through(self, kind: int, conn: int, data: bytes) -> list[Action]:
        if conn in self._finished:
            return []
        if kind == KIND_CLOSE:
            self._finished.add(conn)
            return [ReleaseClose(conn)]
        return [Release(conn, bytes(data))] if data else []


def _check_kind(kind: int) -> None:
    if type(kind) is not int or kind not in (KIND_DATA, KIND_CLOSE):
        raise ValueError(
            f"output kind must be {KIND_DATA} (data) or {KIND_CLOSE} (close), got {kind!r}"
        )


def _common_prefix(a: bytearray, b: bytearray, n: int) -> int:
    """How many of the first `n` bytes of `a` and `b` are equal before the first difference."""
    if a[:n] == b[:n]:  # the usual case, at C speed
        return n
    lo, hi = 0, n  # binary search on slice equality: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
