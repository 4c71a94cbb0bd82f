"""One network event, as colo moves it: the gateway's numbered client input, a VM's numbered output.

Every place in colo that carries network events (the input and output messages, the events of `promoted`, the
outputs and inputs a checkpoint carries, a node's backlog) uses `NetEvent` and checks foreign ones with
`event_problem`, so an event means the same thing, and is refused for the same reasons, everywhere.

toyvm's network device has its own event tuple for the machine's state (toyvm never imports colo, and the
gateway imports nothing from toyvm); the two agree on the numbers of `kind`, which docs/machine.md fixes.
"""
from __future__ import annotations

from typing import NamedTuple

KIND_OPEN = 1  # a client connection opened
KIND_DATA = 2  # bytes on a connection
KIND_CLOSE = 3  # a connection closed
EVENT_KINDS = {KIND_OPEN: "open", KIND_DATA: "data", KIND_CLOSE: "close"}
MAX_CONN = 2**32 - 1  # connection ids the gateway assigns are u32
EVENT_SHAPE = "[seq, kind, conn, data]"


class NetEvent(NamedTuple):
    """Event number `seq`: connection `conn` opened, carried `data`, or closed."""

    seq: int
    kind: int
    conn: int
    data: bytes = b""

    def as_list(self) -> list[object]:
        """The wire shape (msgpack has no tuples that come back as tuples)."""
        return [self.seq, self.kind, self.conn, self.data]

    def __repr__(self) -> str:
        return f"NetEvent(seq={self.seq}, kind={EVENT_KINDS.get(self.kind, self.kind)}, conn={self.conn}, " \
               f"data=<{len(self.data)} bytes>)"


MAX_SEQ = 2**64 - 1  # msgpack carries unsigned 64 bits: an event that exists must be sendable


def seq_problem(v: object) -> str | None:
    if type(v) is not int or v < 1:
        return f"must be an int >= 1, got {v!r}"
    return None if v <= MAX_SEQ else f"must fit 64 bits (at most {MAX_SEQ}), got {v}"


def kind_problem(v: object) -> str | None:
    if type(v) is int and v in EVENT_KINDS:
        return None
    choices = ", ".join(f"{k} ({name})" for k, name in EVENT_KINDS.items())
    return f"must be one of {choices}, got {v!r}"


def conn_problem(v: object) -> str | None:
    return None if type(v) is int and 0 <= v <= MAX_CONN else f"must be an int in 0..{MAX_CONN}, got {v!r}"


def data_problem(v: object) -> str | None:
    return None if type(v) is bytes else f"must be bytes, got {type(v).__name__}"


_PARTS = (("seq", seq_problem), ("kind", kind_problem), ("conn", conn_problem), ("data", data_problem))


def event_problem(v: object) -> str | None:
    """What is wrong with `v` as a wire event ([seq, kind, conn, data]), or None when it is one."""
    # Every relayed request and reply passes here, and a checkpoint's head carries an epoch's outputs (thousands
    # under load): a good event is recognised in one expression, the rules below only name what is wrong.
    if type(v) is list and len(v) == 4:
        seq, kind, conn, data = v
        if (type(seq) is int and 1 <= seq <= MAX_SEQ and type(kind) is int and kind in EVENT_KINDS
                and type(conn) is int and 0 <= conn <= MAX_CONN and type(data) is bytes):
            return None
    return _what_is_wrong(v)


def _what_is_wrong(v: object) -> str | None:
    if type(v) is not list or len(v) != len(_PARTS):
        got = f"{len(v)} items" if type(v) is list else type(v).__name__
        return f"must be a {EVENT_SHAPE} list, got {got}"
    for (name, rule), value in zip(_PARTS, v, strict=True):
        problem = rule(value)
        if problem is not None:
            return f"{name!r} {problem}"
    return None


def events_problem(v: object, limit: int) -> str | None:
    """What is wrong with `v` as a list of at most `limit` wire events, or None."""
    if type(v) is not list or len(v) > limit:
        got = f"{len(v)} events" if type(v) is list else type(v).__name__
        return f"must be a list of at most {limit} {EVENT_SHAPE} lists, got {got}"
    for i, event in enumerate(v):
        problem = event_problem(event)
        if problem is not None:
            return f"has a bad event at index {i}: {problem}"
    return None


def to_events(v: list[list[object]]) -> list[NetEvent]:
    """Wire events (already checked) as NetEvents."""
    return [NetEvent(*e) for e in v]  # type: ignore[arg-type]
