"""The thread-based Link on top of the session codec: sealed both ways, and a bad frame pipelined
behind the peer's proof is a logged Closed event, never an exception from the constructor (which
would leave a server's accepting thread dead and the socket open)."""

from __future__ import annotations

import socket

from colo.auth import Handshake
from colo.link import Closed, Link
from colo.messages import Heartbeat, NodeStatus

KEY = b"link-test-key-0123456789abcdef"


def connected(extra: bytes | None = None) -> tuple[Link, Handshake, socket.socket]:
    """Our Link (as the gateway) over a socketpair, the peer's completed handshake and socket;
    `extra` is what the peer sends in the same write as its proof, sealed by its session unless None."""
    ours, theirs = socket.socketpair()
    a = Handshake(KEY, "gateway", "control")
    b = Handshake(KEY, "control", "gateway")
    ca, cb = a.start(), b.start()
    pb = b.receive_data(ca)
    pa = a.receive_data(cb)
    b.receive_data(pa)
    a.receive_data(pb + (extra or b""))  # the peer pipelined its first frame behind its proof
    return Link(ours, a, name="control"), b, theirs


def test_messages_are_sealed_both_ways() -> None:
    a_link, b, theirs = connected()
    codec = b.session()
    theirs.sendall(codec.encode(NodeStatus({"x": 1})))
    assert a_link.get(timeout=5) == NodeStatus({"x": 1})
    a_link.send(Heartbeat())
    codec.feed(theirs.recv(4096))
    assert codec.next_message() == Heartbeat()
    a_link.close()
    theirs.close()


def test_a_good_frame_behind_the_proof_is_delivered() -> None:
    ours, theirs = socket.socketpair()
    a = Handshake(KEY, "gateway", "control")
    b = Handshake(KEY, "control", "gateway")
    ca, cb = a.start(), b.start()
    pb = b.receive_data(ca)
    pa = a.receive_data(cb)
    b.receive_data(pa)
    a.receive_data(pb + b.session().encode(Heartbeat()))
    link = Link(ours, a, name="control")
    assert link.get(timeout=5) == Heartbeat()
    link.close()
    theirs.close()


def test_a_bad_frame_behind_the_proof_closes_the_link_instead_of_raising() -> None:
    link, _, theirs = connected(extra=b"COLO\x02" + bytes(28))  # a sealed header with a bad tag
    ev = link.get(timeout=5)
    assert isinstance(ev, Closed) and "bad input from control" in ev.reason, ev
    assert "frame 1 from the control fails its MAC" in ev.reason
    link.close()
    theirs.close()
