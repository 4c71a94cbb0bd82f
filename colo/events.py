"""One event stream: what every role does, as structured events on one clock (DESIGN.md section 7).

Every process has one `Stream` (`STREAM`). Code that does something worth seeing calls `STREAM.emit(kind, ...)`;
the stream stamps it and hands it to its sinks: a JSON-lines file (`--trace-file`), the `--trace` printer on
stderr, a test's list. With no sink attached `STREAM.active` is False and call sites skip all work (hot paths test
it before building anything), so a stream that is off costs one attribute read.

An event is one flat JSON object:

    t      seconds since the Unix epoch, on the common clock (below), to the microsecond
    role   gateway | primary | secondary | spare (a node's role changes in place), or control, view
    node   the node's id (the gateway's: its witness id)
    pid    the process
    kind   what happened (KINDS), then the kind's own fields

The clock. Each process reads the monotonic clock (`time.perf_counter`, the clock the checkpoint phases are
timed with) and adds a wall-clock anchor read once at start: its events never run backwards (an NTP step moves
the wall clock, not this one), and processes on one host agree to within the anchors' read error (microseconds).
Across hosts wall clocks differ by more than a checkpoint lasts, so the gateway estimates each node's offset from
its heartbeats (a node that runs under the gateway's own kernel, the `kernel` of its info, gets offset 0 and no
estimate): a node puts the time it sends each `node-status` in its info (`sent_at`), the gateway takes
`offset = received - sent_at`, keeps the minimum over a window of samples (the sample with the least queueing) and
emits it as a `clock` event. Readers add a node's offset to its events' times (`merge`) when it is larger than
CLOCK_SLACK: a smaller one is the heartbeat's own delay (one host: one clock). The estimate includes the smallest
heartbeat delay, so a corrected node's events are late by up to that much: a message sent faster than any
heartbeat can then look received before it was sent, by a fraction of a millisecond.

Times are taken before a message leaves: colo.link emits `send` after the frame is built and before it is queued,
so a reply's event can never come before its request's.
"""
from __future__ import annotations

import collections
import fnmatch
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

SCHEMA = 1
# Every kind of event, and what its fields mean (docs/decisions.md, "One event stream", has the reasons).
KINDS: dict[str, str] = {
    "start": "a process began tracing: schema, anchor (its clock: wall and monotonic readings of one instant)",
    "send": "a message left: msg, link (replication|gateway|control), to (peer role), peer, flow, frame (bytes on "
            "the wire), fields, state (the replication protocol's state after it), hex (the frame's first bytes)",
    "recv": "a message arrived: msg, link, from, peer, flow (the send's), frame, state",
    "client": "gateway and a client: dir (in|out|open|close), conn, bytes, data, seq (output event)",
    "witness": "a decision of the witness (its Record actions): event, level, and its details",
    "phase": "a checkpoint phase ended: side, epoch, phase, start, end",
    "checkpoint": "a checkpoint completed (primary): epoch, trigger, start, end, pause_ms, phases [[name, start, "
                  "end]], dirty_pages, bytes_raw, bytes_wire",
    "checkpoint-failed": "a checkpoint was abandoned (primary): epoch, reason",
    "pages": "guest pages: side, epoch, what (dirty|staged|applied|own|copied), count, runs [[first, last]], "
             "npages, page_size",
    "state": "a node's state changed: was, now",
    "failover": "a node's step of a failover or a re-protection: step, and its details",
    "gate": "step mode: a handshake message waits (waiting) or goes (released): msg, epoch",
    "clock": "gateway: its estimate of a node's clock offset: of (node id), offset, samples (0: the node runs under "
             "the gateway's kernel, so it reads the same clock)",
}
# The --trace printer skips these by default: liveness, and the status a control client polls for.
QUIET_MESSAGES = frozenset({"heartbeat", "node-status", "progress", "status-request", "status-reply"})
# An estimated offset this small is the heartbeats' own delay, not a second clock: on one host every process reads
# the same clock, and "correcting" it would only move node events late by a heartbeat's queueing (a fraction of a
# millisecond, more than a checkpoint message takes). Beyond it the clocks differ and the estimate is applied.
CLOCK_SLACK = 0.002
MAX_TEXT = 256  # bytes of a data field kept in an event, as escaped text


class Stream:
    """This process's event stream. `role` and `node` stamp every event; `role_of` (a node's) says the role at the
    moment of the event, since a node changes role in place."""

    def __init__(self) -> None:
        self.active = False
        self.role = "?"
        self.node = ""
        self.pid = os.getpid()
        self.role_of: Callable[[], str] | None = None
        self.hex_bytes = 0  # record this many leading bytes of every frame, in hex (the tutorial's frames)
        self._sinks: list[Callable[[dict[str, Any]], None]] = []
        self.anchor_wall, self.anchor_mono = _anchor()

    # -- the clock --------------------------------------------------------------------------------------------
    def now(self) -> float:
        return self.anchor_wall + (time.perf_counter() - self.anchor_mono)

    def at(self, perf: float) -> float:
        """A `time.perf_counter()` reading on the common clock (the checkpoint phases are timed with it)."""
        return self.anchor_wall + (perf - self.anchor_mono)

    # -- sinks ------------------------------------------------------------------------------------------------
    def attach(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self._sinks.append(sink)
        self.active = True

    def detach(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self._sinks = [s for s in self._sinks if s is not sink]
        self.active = bool(self._sinks)

    def reset(self) -> None:
        """No sinks (tests)."""
        self._sinks = []
        self.active = False

    def emit(self, kind: str, t: float | None = None, **fields: Any) -> None:
        if not self._sinks:
            return
        role = self.role_of() if self.role_of is not None else self.role
        ev: dict[str, Any] = {"t": round(self.now() if t is None else t, 6), "role": role, "node": self.node,
                              "pid": self.pid, "kind": kind}
        ev.update(fields)
        for sink in self._sinks:
            try:
                sink(ev)
            except (OSError, ValueError):
                pass  # a full disk or a closed stderr must not stop the service it watches


def _anchor() -> tuple[float, float]:
    """(wall, monotonic) read at one instant: the pair of reads least apart of a few tries (a process preempted
    between its two reads would put every event it stamps off by the time it lost: on a busy host, milliseconds)."""
    best = (float("inf"), 0.0, 0.0)
    for _ in range(8):
        m0 = time.perf_counter()
        wall = time.time()
        m1 = time.perf_counter()
        if m1 - m0 < best[0]:
            best = (m1 - m0, wall, (m0 + m1) / 2)
    return best[1], best[2]


STREAM = Stream()


class FileSink:
    """Appends one JSON line per event. Several processes may share the file (one merged stream): the file is
    opened O_APPEND and each line is one write(2), which the kernel never interleaves with another's. Written at
    once, not buffered: a process killed by SIGKILL (the teaching case) loses nothing it emitted."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, ev: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(ev, separators=(",", ":"), default=_default) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PrintSink:
    """--trace: the events the filter passes, one readable line each, on stderr."""

    def __init__(self, flt: EventFilter | None = None, stream: TextIO | None = None) -> None:
        self.filter = flt or EventFilter("")
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def __call__(self, ev: dict[str, Any]) -> None:
        if not self.filter(ev):
            return
        line = format_event(ev)
        with self._lock:
            print(line, file=self.stream, flush=True)


def configure(role: str, *, trace: bool = False, trace_file: str | None = None, trace_filter: str = "",
              hex_bytes: int = 0) -> Stream:
    """What a role process does with its command line's --trace, --trace-file, --trace-filter, --trace-hex."""
    STREAM.role = role
    STREAM.pid = os.getpid()
    STREAM.hex_bytes = max(0, hex_bytes)
    if trace_file:
        STREAM.attach(FileSink(trace_file.replace("{role}", role)))
    if trace:
        STREAM.attach(PrintSink(EventFilter(trace_filter)))
    return STREAM


def started() -> None:
    """The process's first event (once its node id is known): the schema and its clock's anchor."""
    if STREAM.active:
        STREAM.emit("start", schema=SCHEMA, anchor=[STREAM.anchor_wall, STREAM.anchor_mono])


# -- values in events --------------------------------------------------------------------------------------------
def text_of(data: bytes | bytearray | memoryview, limit: int = MAX_TEXT) -> str:
    """Bytes as readable text: printable ASCII as is, the rest escaped (\\r, \\n, \\xNN); cut at `limit`."""
    b = bytes(data[:limit])
    out = []
    for c in b:
        if c == 0x5C:
            out.append("\\\\")
        elif 0x20 <= c < 0x7F:
            out.append(chr(c))
        elif c == 0x0D:
            out.append("\\r")
        elif c == 0x0A:
            out.append("\\n")
        elif c == 0x09:
            out.append("\\t")
        else:
            out.append(f"\\x{c:02x}")
    return "".join(out)


def jsonable(value: Any, depth: int = 0) -> Any:
    """A message field as JSON: bytes become {"len", "text"} (text cut at MAX_TEXT, "more": true when cut);
    enums their value; long lists their first 32 items and {"more": n}."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)  # a StrEnum (a trigger) as its plain value
    if isinstance(value, (bytes, bytearray, memoryview)):
        n = len(value)
        d: dict[str, Any] = {"len": n, "text": text_of(value)}
        if n > MAX_TEXT:
            d["more"] = True
        return d
    if depth > 8:
        return "..."
    if isinstance(value, (list, tuple)):
        items = [jsonable(v, depth + 1) for v in value[:32]]
        if len(value) > 32:
            items.append({"more": len(value) - 32})
        return items
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if hasattr(value, "value"):  # an enum
        return jsonable(value.value, depth + 1)
    return str(value)


def _default(value: Any) -> Any:
    return jsonable(value)


def page_runs(pages: Iterable[int]) -> list[list[int]]:
    """Sorted page numbers as [[first, last], ...] runs of consecutive pages."""
    runs: list[list[int]] = []
    for p in pages:
        p = int(p)
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        elif not runs or p > runs[-1][1]:
            runs.append([p, p])
    return runs


# -- the gateway's estimate of the nodes' clocks ------------------------------------------------------------------
@functools.cache
def kernel_id() -> str:
    """The running kernel's boot id (Linux), "" where there is none. Processes under one kernel read one
    CLOCK_REALTIME and one CLOCK_MONOTONIC (containers included: a time namespace shifts the monotonic clock,
    which the anchor's difference cancels), so their events share a clock and need no estimate."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class ClockOffsets:
    """offset = gateway receive time - node send time, the minimum over the last `window` samples per node."""

    def __init__(self, window: int = 64, report_every: float = 2.0) -> None:
        self.window = window
        self.report_every = report_every
        self._samples: dict[str, collections.deque[float]] = {}
        self._reported: dict[str, tuple[float, float]] = {}  # node -> (offset, when)

    def sample(self, node: str, sent_at: float, received: float, same_kernel: bool = False) -> float | None:
        """Add one sample; returns the estimate when it should be reported (changed, or not reported lately).
        A node on our kernel reads our clock: its offset is 0, reported once, whatever its heartbeats' delay (a
        starting node's first ones are queued by milliseconds, and one such sample would shift all its events)."""
        if same_kernel:
            if node in self._reported:
                return None
            self._reported[node] = (0.0, received)
            return 0.0
        q = self._samples.setdefault(node, collections.deque(maxlen=self.window))
        q.append(received - sent_at)
        est = min(q)
        last = self._reported.get(node)
        if last is None or abs(est - last[0]) > 50e-6 or received - last[1] > self.report_every:
            self._reported[node] = (est, received)
            return est
        return None

    def samples(self, node: str) -> int:
        return len(self._samples.get(node, ()))

    def offset(self, node: str) -> float | None:
        q = self._samples.get(node)
        return min(q) if q else None


# -- reading a stream -----------------------------------------------------------------------------------------
def read_lines(lines: Iterable[str], skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Events from JSON lines; a cut or garbled line (a process killed mid-line, in theory) is skipped, and
    counted in `skipped[0]` when given."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            ev = None
        if isinstance(ev, dict) and "t" in ev and "kind" in ev:
            yield ev
        elif skipped is not None:
            skipped[0] += 1


def read_file(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The events of one trace file as recorded (not merged), and how many of its lines were not events."""
    skipped = [0]
    with open(path, encoding="utf-8", errors="replace") as f:
        return list(read_lines(f, skipped)), skipped[0]


def read(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every event of one or more trace files, merged onto the common clock (see `merge`)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    events: list[dict[str, Any]] = []
    for p in paths:
        events.extend(read_file(p)[0])
    return merge(events)


def merge(events: Iterable[dict[str, Any]], correct: bool = True) -> list[dict[str, Any]]:
    """Events of several processes in one order: node events shifted by the gateway's estimate of their clock's
    offset (the estimate in effect at the time), then sorted by time (stably: one process's events keep their
    order). Shifted events keep their own reading in `t_local`."""
    evs = list(events)
    offsets: dict[str, list[tuple[float, float]]] = {}
    if correct:
        for ev in evs:
            if ev.get("kind") == "clock" and isinstance(ev.get("of"), str):
                offsets.setdefault(ev["of"], []).append((float(ev["t"]), float(ev["offset"])))
        # A node whose best estimate is within the slack shares our clock: its early estimates (few samples, a
        # busy start) are queueing, not offset.
        offsets = {n: table for n, table in offsets.items() if min(abs(o) for _, o in table) > CLOCK_SLACK}
    if offsets:
        for ev in evs:
            table = offsets.get(ev.get("node", ""))
            if not table or ev.get("role") == "gateway":
                continue
            t = float(ev["t"])
            off = table[0][1]
            for when, o in table:  # the last estimate made before the event (the first one before any)
                if when > t + o:
                    break
                off = o
            ev["t_local"] = ev["t"]
            ev["t"] = round(t + off, 6)
    evs.sort(key=lambda e: float(e["t"]))
    return evs


# -- the --trace printer --------------------------------------------------------------------------------------
# Kinds the printer shows unless the filter names them: one line per message (its sender's), the client side,
# the witness's decisions, the nodes' states and failover steps, the step gate.
DEFAULT_KINDS = frozenset({"send", "client", "witness", "state", "failover", "gate", "checkpoint-failed"})


class EventFilter:
    """--trace-filter: comma-separated patterns (shell globs), each matched against an event's role, kind, message
    name and witness event; "-PATTERN" hides what it matches. With positive patterns, only events matching one of
    them are shown; without, the default kinds are (sends, not receipts: one line per message), quiet messages
    (heartbeat, node-status, progress) and the witness's per-output records excepted. A pattern that names a kind
    or message explicitly shows it even when the default hides it: "output", "heartbeat", "phase"."""

    def __init__(self, spec: str) -> None:
        terms = [t.strip() for t in spec.split(",") if t.strip()]
        self.include = [t for t in terms if not t.startswith("-")]
        self.exclude = [t[1:] for t in terms if t.startswith("-") and len(t) > 1]

    @staticmethod
    def _names(ev: dict[str, Any]) -> list[str]:
        names = [str(ev.get("role", "")), str(ev.get("kind", ""))]
        for key in ("msg", "event", "step", "what", "dir"):
            if key in ev:
                names.append(str(ev[key]))
        return names

    def _matches(self, ev: dict[str, Any], patterns: list[str]) -> bool:
        names = self._names(ev)
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

    def __call__(self, ev: dict[str, Any]) -> bool:
        if self.exclude and self._matches(ev, self.exclude):
            return False
        if self.include:
            return self._matches(ev, self.include)
        if ev.get("kind") not in DEFAULT_KINDS:
            return False
        if ev.get("msg") in QUIET_MESSAGES:
            return False
        return not (ev.get("kind") == "witness" and ev.get("level") == "trace")


def clock_text(t: float, date: bool = True) -> str:
    """Local time to the microsecond, dated as colo's log lines are (so that `colo up`, which merges the roles'
    logs by their stamps, puts trace lines among them in order)."""
    sec = int(t)
    us = round((t - sec) * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, 0
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(sec)) + f".{us:06d}"


def fields_text(fields: dict[str, Any]) -> str:
    parts = []
    for k, v in fields.items():
        if isinstance(v, dict) and "len" in v and "text" in v:
            v = f'"{v["text"]}"' if v["len"] <= SHOWN_BYTES else f"<{v['len']} bytes>"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, separators=(",", ":"))
            if len(v) > 120:
                v = v[:117] + "..."
        parts.append(f"{k}={v}")
    return " ".join(parts)


WHO_WIDTH = 9
SHOWN_BYTES = 80  # data fields up to this long are printed as text; longer ones as their length


def format_event(ev: dict[str, Any]) -> str:
    """One line: time on the common clock, who, what, and every field by its name."""
    who = str(ev.get("role", "?"))
    head = f"{clock_text(float(ev['t']))} {who:<{WHO_WIDTH}}"
    kind = ev.get("kind")
    if kind in ("send", "recv"):
        arrow = "->" if kind == "send" else "<-"
        peer = ev.get("to" if kind == "send" else "from", "?")
        text = f"{head} {arrow} {peer:<{WHO_WIDTH}} {ev.get('msg')}"
        f = fields_text(ev.get("fields") or {})
        tail = f" [{ev['frame']} B]" if "frame" in ev else ""
        return f"{text} {f}{tail}".rstrip() if f else text + tail
    if kind == "client":
        d = ev.get("dir")
        arrow = {"in": "<-", "out": "->", "open": "<-", "close": "--"}.get(str(d), "--")
        rest = {k: v for k, v in ev.items() if k in ("data", "seq", "bytes", "reason")}
        return f"{head} {arrow} client {ev.get('conn')}: {d} {fields_text(rest)}".rstrip()
    if kind == "witness":
        rest = {k: v for k, v in ev.items() if k not in _STAMP and k not in ("event", "level")}
        return f"{head} witness: {ev.get('event')} {fields_text(rest)}".rstrip()
    rest = {k: v for k, v in ev.items() if k not in _STAMP}
    return f"{head} {kind}: {fields_text(rest)}".rstrip()


_STAMP = frozenset({"t", "t_local", "role", "node", "pid", "kind"})
