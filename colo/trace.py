"""Where the roles feed the event stream (colo.events): one function per place, so that the code they watch
carries one guarded line each (`if STREAM.active: trace.sent(...)`) and nothing here runs while the stream is off.

Messages are matched across processes by their `flow`: CONN:SENDER:SEQ, where CONN is the connection's id (both
ends derive it from the handshake's nonces, colo.auth), SENDER the role the sender authenticated as on it, and
SEQ the sealed frame's sequence number in that direction (colo.session counts them on both ends).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from colo.events import STREAM, ClockOffsets, jsonable, kernel_id, text_of
from colo.messages import Message, NodeHello, NodeStatus, field_names

if TYPE_CHECKING:
    from colo.link import Conn

MAX_RUNS = 4096  # page runs kept in one event (a scattered epoch is summarised by its count beyond that)
_clocks = ClockOffsets()
_witness: Any = None  # the gateway's: it knows each link's node and that node's role now (watch_witness)


def watch_witness(witness: Any) -> None:
    """The gateway: name a node link's peer by the node's role now (it authenticated as a spare; it is a
    secondary once paired, a primary once promoted), not by the role it proved when it connected."""
    global _witness
    _witness = witness


def peer_role(conn: Conn) -> str:
    if _witness is not None:
        n = _witness.nodes.get(_witness.links.get(conn.id, ""))
        if n is not None:
            return str(n.role)
    return conn.peer_role


def link_kind(conn: Conn) -> str:
    if conn.proto is not None:
        return "replication"
    if "control" in (conn.hs.role, conn.peer_role):
        return "control"
    return "gateway"


def message_fields(msg: Message) -> dict[str, Any]:
    return {name: jsonable(getattr(msg, name)) for name in field_names(type(msg))}


def _codec(conn: Conn) -> Any:
    return conn.proto.codec if conn.proto is not None else conn._codec


def sent(conn: Conn, msg: Message, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """colo.link.Conn.send: the frame is built (as the buffers to write in order) and not yet queued (the time
    is taken before the send)."""
    codec = _codec(conn)
    seq = codec.frames_out if codec is not None else 0
    ev: dict[str, Any] = {"msg": msg.NAME, "link": link_kind(conn), "to": peer_role(conn), "peer": conn.name,
                          "flow": f"{conn.hs.connection_id}:{conn.hs.role}:{seq}", "frame": sum(len(p) for p in parts),
                          "fields": message_fields(msg)}
    if conn.proto is not None:
        ev["state"] = conn.proto.state.value
    if STREAM.hex_bytes:
        ev["hex"] = b"".join(bytes(p[:STREAM.hex_bytes]) for p in parts)[:STREAM.hex_bytes].hex()
    now = STREAM.now()
    STREAM.emit("send", t=now, **ev)
    if conn.proto is not None and conn.hs.role == "secondary":
        _secondary_phase(conn, "send", msg, now)


def received(conn: Conn, msg: Message) -> None:
    """colo.link.Conn._drain: a message was verified and parsed."""
    codec = _codec(conn)
    seq = codec.frames_in if codec is not None else 0
    ev: dict[str, Any] = {"msg": msg.NAME, "link": link_kind(conn), "from": peer_role(conn), "peer": conn.name,
                          "flow": f"{conn.hs.connection_id}:{conn.peer_role}:{seq}"}
    if conn.proto is not None:
        ev["state"] = conn.proto.state.value
    elif ev["link"] == "control":
        ev["fields"] = message_fields(msg)  # its sender (`colo status`, the view) keeps no stream of its own
    now = STREAM.now()
    STREAM.emit("recv", t=now, **ev)
    if conn.proto is not None and conn.hs.role == "secondary":
        _secondary_phase(conn, "recv", msg, now)
    if STREAM.role != "gateway":
        return
    if isinstance(msg, NodeHello):
        conn.__dict__["_trace_node"] = msg.node
    elif isinstance(msg, NodeStatus):
        node = conn.__dict__.get("_trace_node")
        sent_at = msg.info.get("sent_at")
        if isinstance(node, str) and isinstance(sent_at, float):
            est = _clocks.sample(node, sent_at, now, same_kernel=msg.info.get("kernel") == kernel_id() != "")
            if est is not None:
                STREAM.emit("clock", of=node, offset=round(est, 6), samples=_clocks.samples(node))


# The secondary's phases of a checkpoint, read off its own messages as they pass (its receive path is timed by
# nothing else): each ends at a message and starts at the one before it.
SECONDARY_PHASES = {("send", "checkpoint-reply"): ("reply", ("recv", "checkpoint-request")),
                    ("recv", "vmstate-size"): ("receive", ("send", "checkpoint-reply")),
                    ("send", "vmstate-received"): ("verify", ("recv", "vmstate-size")),
                    ("send", "vmstate-loaded"): ("apply", ("send", "vmstate-received"))}


def _secondary_phase(conn: Conn, direction: str, msg: Message, now: float) -> None:
    marks: dict[tuple[str, str], float] = conn.__dict__.setdefault("_trace_marks", {})
    key = (direction, msg.NAME)
    if key == ("recv", "checkpoint-request"):
        marks.clear()
    marks[key] = now
    phase = SECONDARY_PHASES.get(key)
    if phase is not None and phase[1] in marks:
        STREAM.emit("phase", side="secondary", epoch=getattr(msg, "epoch", None), phase=phase[0],
                    start=round(marks[phase[1]], 6), end=round(now, 6))


# -- the gateway ----------------------------------------------------------------------------------------------
def client(direction: str, conn: int, data: bytes = b"", seq: int = 0, reason: str = "") -> None:
    ev: dict[str, Any] = {"dir": direction, "conn": conn}
    if data:
        ev["bytes"] = len(data)
        ev["data"] = {"len": len(data), "text": text_of(data)}
    if seq:
        ev["seq"] = seq
    if reason:
        ev["reason"] = reason
    STREAM.emit("client", **ev)


def record(entry: dict[str, Any], level: str) -> None:
    """A witness Record action: its decisions are the gateway's events."""
    details = {_RENAMED.get(k, k): jsonable(v) for k, v in entry.items() if k not in ("time", "event")}
    STREAM.emit("witness", event=entry.get("event", "?"), level=level, **details)


# Record details named like the stream's own stamps: "node" is the node a decision is about ("who").
_RENAMED = {"node": "who", "kind": "event_kind", "role": "its_role", "t": "at", "pid": "its_pid"}


# -- the nodes --------------------------------------------------------------------------------------------------
def runs_of(pages: Any) -> list[list[int]]:
    """Page numbers (any order, numpy or not) as sorted [[first, last], ...] runs."""
    import numpy as np
    idx = np.unique(np.asarray(pages, dtype=np.int64))
    if idx.size == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate((idx[:1], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], idx[-1:]))
    out: list[list[int]] = np.stack([starts, ends], axis=1)[:MAX_RUNS].tolist()
    return out


def pages(side: str, epoch: int, what: str, idx: Any, npages: int) -> None:
    """Guest pages of one epoch: `what` is dirty (the primary's epoch), staged or applied (the secondary), own (a
    hybrid secondary's own writes) or copied (a hybrid secondary's pages restored from its cache)."""
    runs = runs_of(idx)
    count = sum(b - a + 1 for a, b in runs)
    ev: dict[str, Any] = {"side": side, "epoch": epoch, "what": what, "count": count, "runs": runs,
                          "npages": npages, "page_size": 4096}
    if len(runs) >= MAX_RUNS:
        ev["truncated"] = True
    STREAM.emit("pages", **ev)


def staged_pages(staged: Any) -> Any:
    """The page numbers a staged checkpoint (colo.vmstate.StagedCheckpoint) carries."""
    import numpy as np
    return np.asarray(staged.index, dtype=np.int64)


def checkpoint_done(rec: Any, phases: list[tuple[str, float, float]]) -> None:
    """The primary's checkpoint completed: its slice and its phases (name, start, end in time.perf_counter), in the
    order they happen. A pipelined checkpoint's phases come from two threads: each is clamped to start where the
    one before ended, so that they never overlap and nest exactly inside the slice."""
    out: list[list[Any]] = []
    t = STREAM.at(phases[0][1]) if phases else STREAM.now()
    start = t
    for name, a, b in phases:
        lo = max(t, STREAM.at(a))
        hi = max(lo, STREAM.at(b))
        out.append([name, round(lo, 6), round(hi, 6)])
        t = hi
    STREAM.emit("checkpoint", epoch=rec.epoch, trigger=rec.trigger, start=round(start, 6), end=round(t, 6),
                pause_ms=round(rec.pause_ms, 3), commit_ms=round(rec.commit_ms, 3), mode=rec.checkpoint_mode,
                phases=out, dirty_pages=rec.dirty_pages, zero_pages=rec.zero_pages, bytes_raw=rec.bytes_raw,
                bytes_wire=rec.bytes_wire)


def failover(step: str, **details: Any) -> None:
    STREAM.emit("failover", step=step, **{k: jsonable(v) for k, v in details.items()})


def hybrid_pages(epoch: int, own: Any, copied: Any, npages: int) -> None:
    pages("secondary", epoch, "own", own, npages)
    pages("secondary", epoch, "copied", copied, npages)
