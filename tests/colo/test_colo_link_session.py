"""The selector-served `Conn` on top of the session codec: it runs the handshake without blocking, seals both
ways, and a bad frame pipelined behind the peer's proof ends the connection with a `Closed` event naming it,
never an exception out of `on_ready` (which would take the whole serving loop down)."""

from __future__ import annotations

import selectors
import socket
import time

from colo.auth import Handshake
from colo.link import Closed, Conn, Opened
from colo.messages import Heartbeat, NodeStatus

KEY = b"link-test-key-0123456789abcdef"
BOTH = selectors.EVENT_READ | selectors.EVENT_WRITE


def pump(conn: Conn, until: type, timeout: float = 5.0) -> list[object]:
    """Serve the connection as a loop would, until an event of type `until` came."""
    seen: list[object] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += conn.on_ready(BOTH)
        if any(isinstance(e, until) for e in seen):
            return seen
        time.sleep(0.005)
    raise AssertionError(f"no {until.__name__} within {timeout} s: {seen}")


def connected(extra: bytes | None = None) -> tuple[Conn, Handshake, socket.socket, list[object]]:
    """Our Conn (as the gateway) over a socketpair, the peer's handshake (done) and socket. `extra` is what the
    peer sends in the same write as its proof, sealed by its session unless it is raw bytes."""
    ours, theirs = socket.socketpair()
    conn = Conn(ours, key=KEY, role="gateway", peer_role=("control",), name="control")
    b = Handshake(KEY, "control", "gateway", encrypt=True)  # as Conn, by default
    theirs.sendall(b.start())
    events: list[object] = list(conn.on_ready(BOTH))  # sends our challenge
    while not b.done:
        out = b.receive_data(theirs.recv(4096))
        if b.done:
            out += extra or b""
        if out:
            theirs.sendall(out)
        events += conn.on_ready(BOTH)
    if not any(isinstance(e, (Opened, Closed)) for e in events):
        events += pump(conn, Opened) if extra is None else pump(conn, Closed)
    return conn, b, theirs, events


def test_messages_are_sealed_both_ways() -> None:
    conn, b, theirs, _ = connected()
    codec = b.session()
    theirs.sendall(codec.encode(NodeStatus(1, {"x": 1})))
    assert NodeStatus(1, {"x": 1}) in pump(conn, NodeStatus)
    assert conn.send(Heartbeat())
    codec.feed(theirs.recv(4096))
    assert codec.next_message() == Heartbeat()
    conn.close()
    theirs.close()


def test_a_good_frame_behind_the_proof_is_delivered() -> None:
    ours, theirs = socket.socketpair()
    conn = Conn(ours, key=KEY, role="gateway", peer_role=("control",), name="control")
    b = Handshake(KEY, "control", "gateway", encrypt=True)  # as Conn, by default
    theirs.sendall(b.start())
    events = conn.on_ready(BOTH)
    while not b.done:
        out = b.receive_data(theirs.recv(4096))
        if b.done:
            out += b.session().encode(Heartbeat())
        if out:
            theirs.sendall(out)
        events += conn.on_ready(BOTH)
    assert Heartbeat() in events or Heartbeat() in pump(conn, Heartbeat)
    conn.close()
    theirs.close()


def test_a_bad_frame_behind_the_proof_closes_the_link_instead_of_raising() -> None:
    # a sealed header with a bad tag, in the same write as the proof
    conn, _, theirs, events = connected(extra=b"COLO\x03" + bytes(28))
    if not any(isinstance(e, Closed) for e in events):
        events += pump(conn, Closed)
    closed = [e for e in events if isinstance(e, Closed)]
    assert closed and "frame 1 from the control fails its MAC" in closed[0].reason, events
    assert conn.closed
    theirs.close()
