"""A man in the middle for the end-to-end tests: a TCP proxy that cuts the colo stream into frames
(from the headers alone: it has no key) and, on command, tampers with one of them.

    mitm = Mitm(("127.0.0.1", secondary_port)).start()     # point the primary at mitm.address
    rule = mitm.flip_body(3, direction="c2s", match=lambda f: b"vmstate-chunk" in f.body)
    ... run the cluster ...
    assert rule.fired.wait(10)
    mitm.close()

Actions: flip a bit in the Nth frame's body or header, drop it, replay it (send it twice), or
reorder it with the frame after it. Everything else passes through unchanged, byte for byte.
"c2s" is the direction from the side that connected to the proxy to the target. Frames are counted
per connection and direction; by default a rule counts only sealed frames (the ones after the
handshake), and `match` narrows it further (in integrity-only mode the body is readable msgpack;
encrypted, only sizes and positions are). Each rule fires once, on the first connection where it
matches unless `conn` names one (connections are numbered from 0 in accept order).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from colo.errors import WireError
from colo.wire import HEADER_SIZE, SEALED_HEADER_SIZE, VERSION, frame_size

C2S, S2C = "c2s", "s2c"
ACTIONS = ("flip-body", "flip-header", "drop", "replay", "reorder")


@dataclass(frozen=True)
class Frame:
    """One frame as the proxy saw it."""

    conn: int
    direction: str
    index: int  # among all frames of this connection and direction, handshake included, from 0
    data: bytes

    @property
    def sealed(self) -> bool:
        return self.data[4] != VERSION

    @property
    def body(self) -> bytes:
        start = SEALED_HEADER_SIZE if self.sealed else HEADER_SIZE
        return self.data[start:start + int.from_bytes(self.data[5:9], "big")]


def _sealed(frame: Frame) -> bool:
    return frame.sealed


@dataclass
class Rule:
    action: str
    direction: str
    nth: int = 0  # the nth matching frame, from 0
    match: Callable[[Frame], bool] = _sealed
    offset: int = 0  # flip-body: byte of the body; flip-header: byte of the header
    mask: int = 0x01
    conn: int | None = None
    fired: threading.Event = field(default_factory=threading.Event)
    hit: Frame | None = None  # the frame it acted on
    _seen: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.direction not in (C2S, S2C):
            raise ValueError(f"direction must be {C2S!r} or {S2C!r}, got {self.direction!r}")


class Mitm:
    """The proxy. Thread-safe: rules may be added while traffic flows."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.target = target
        self._server = socket.create_server(listen)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self.rules: list[Rule] = []
        self.frames: list[Frame] = []  # every frame seen, in order (for tests and debugging)
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._closed = False

    # -- commands -----------------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def flip_body(self, nth: int = 0, **kw: object) -> Rule:
        return self.add(Rule("flip-body", nth=nth, **kw))  # type: ignore[arg-type]

    def flip_header(self, nth: int = 0, **kw: object) -> Rule:
        kw.setdefault("offset", 5)  # the length's first byte by default
        return self.add(Rule("flip-header", nth=nth, **kw))  # type: ignore[arg-type]

    def drop(self, nth: int = 0, **kw: object) -> Rule:
        return self.add(Rule("drop", nth=nth, **kw))  # type: ignore[arg-type]

    def replay(self, nth: int = 0, **kw: object) -> Rule:
        return self.add(Rule("replay", nth=nth, **kw))  # type: ignore[arg-type]

    def reorder(self, nth: int = 0, **kw: object) -> Rule:
        return self.add(Rule("reorder", nth=nth, **kw))  # type: ignore[arg-type]

    # -- running ------------------------------------------------------------------------------------
    def start(self) -> Mitm:
        self._spawn(self._accept_loop, "mitm-accept")
        return self

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            conns = list(self._conns)
        for pair in conns:
            for s in pair:
                _close(s)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Mitm:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def cut(self) -> None:
        """Drop every proxied connection now (new ones are still accepted)."""
        with self._lock:
            conns = list(self._conns)
        for pair in conns:
            for s in pair:
                _close(s)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        self._server.settimeout(0.1)  # close() cannot wake a blocked accept(): poll instead
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = len(self._conns)
                self._conns.append((client, upstream))
            self._spawn(self._pump, f"mitm-{conn}-{C2S}", conn, C2S, client, upstream)
            self._spawn(self._pump, f"mitm-{conn}-{S2C}", conn, S2C, upstream, client)

    def _pump(self, conn: int, direction: str, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray()
        index = 0
        held: bytes | None = None  # a frame being reordered: it goes out after the next one
        raw = False  # the stream stopped parsing as frames: pass the rest through untouched
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                if raw:
                    dst.sendall(data)
                    continue
                buf += data
                out = bytearray()
                while len(buf) >= HEADER_SIZE:
                    try:
                        size = frame_size(buf[:HEADER_SIZE])
                    except WireError:
                        raw = True
                        break
                    if len(buf) < size:
                        break
                    frame = Frame(conn, direction, index, bytes(buf[:size]))
                    del buf[:size]
                    index += 1
                    with self._lock:
                        self.frames.append(frame)
                    emitted, hold = self._apply(frame)
                    if held is not None and (emitted or hold is not None):
                        emitted, held = emitted + held, None
                    if hold is not None:
                        held = hold
                    out += emitted
                if raw:
                    out += buf
                    buf.clear()
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            try:
                if held is not None:
                    dst.sendall(held)
                if buf:
                    dst.sendall(buf)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _apply(self, frame: Frame) -> tuple[bytes, bytes | None]:
        """(bytes to send now, a frame to hold back until the next one)."""
        with self._lock:
            rule = next((r for r in self.rules if self._matches(r, frame)), None)
        if rule is None:
            return frame.data, None
        rule.hit = frame
        rule.fired.set()
        data = bytearray(frame.data)
        if rule.action == "flip-body":
            start = SEALED_HEADER_SIZE if frame.sealed else HEADER_SIZE
            data[start + rule.offset % max(1, len(frame.body))] ^= rule.mask
        elif rule.action == "flip-header":
            data[rule.offset % (SEALED_HEADER_SIZE if frame.sealed else HEADER_SIZE)] ^= rule.mask
        elif rule.action == "drop":
            return b"", None
        elif rule.action == "replay":
            return frame.data * 2, None
        elif rule.action == "reorder":
            return b"", frame.data
        return bytes(data), None

    @staticmethod
    def _matches(rule: Rule, frame: Frame) -> bool:
        if rule.fired.is_set() or rule.direction != frame.direction:
            return False
        if not rule.match(frame):
            return False
        if rule.conn is None:
            rule.conn = frame.conn  # the first connection with a matching frame is the one
        elif rule.conn != frame.conn:
            return False
        rule._seen += 1
        return rule._seen > rule.nth


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
