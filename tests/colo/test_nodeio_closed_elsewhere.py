"""A link that another thread closes (the VM thread's send found it broken) still ends in the I/O thread: the node
hears `Detached` and connects again, and the gateway forgets a link it closed after its last bytes.

Found as a rare e2e failure: a primary woken from SIGSTOP sent to its gateway, which had fenced and closed the
link meanwhile; the failed send closed the socket in the VM thread, the I/O thread never dropped the link, and the
node neither read the fence waiting in the kernel nor reconnected to be fenced again: it held still for good.
"""
from __future__ import annotations

import queue
import socket
import time
from typing import Any

from colo.gateway import Gateway, GatewayConfig
from colo.link import Closed, Conn, Opened
from colo.messages import Heartbeat
from colo.nodeio import Attached, Detached, NodeIO

KEY = b"k" * 32
BOTH = 3  # selectors.EVENT_READ | EVENT_WRITE


def accept_node(server: socket.socket, timeout: float = 5.0) -> Conn:
    """The gateway's side of one node connection, authenticated."""
    server.settimeout(timeout)
    sock, _ = server.accept()
    conn = Conn(sock, key=KEY, role="gateway", peer_role=("primary",), name="primary")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(isinstance(e, Opened) for e in conn.on_ready(BOTH)):
            return conn
        time.sleep(0.005)
    raise AssertionError("the node's handshake did not complete")


def next_gateway_event(io: NodeIO, kind: type, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            source, ev = io.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {kind.__name__} from the I/O thread within {timeout} s") from None
        if source == "gateway" and isinstance(ev, kind):
            return ev


def test_a_link_closed_by_another_thread_ends_and_the_node_reconnects() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    io = NodeIO(key=KEY, gateway=server.getsockname()[:2], role=lambda: "primary", heartbeat_timeout=0.8,
                hello=lambda: Heartbeat(), status=lambda: Heartbeat())
    io.start()
    first = second = None
    try:
        first = accept_node(server)
        next_gateway_event(io, Attached)
        gw = io.gateway
        assert gw is not None and gw.loop_owned
        gw.close("connection error: [Errno 104] Connection reset by peer")  # as a failed send in the VM thread
        assert gw.sock.fileno() != -1 or gw not in io._conns  # the descriptor is the I/O thread's to free
        detached = next_gateway_event(io, Detached)
        assert "reset by peer" in detached.reason
        second = accept_node(server)  # it connects again (and would say hello to be judged afresh)
        next_gateway_event(io, Attached)
        assert gw.sock.fileno() == -1  # released by the I/O thread
    finally:
        io.stop(flush=0.0)
        for c in (first, second):
            if c is not None:
                c.release()
        server.close()


def _open_pair() -> tuple[Conn, Conn]:
    a, b = socket.socketpair()
    ours = Conn(a, key=KEY, role="primary", peer_role="secondary", name="secondary")
    theirs = Conn(b, key=KEY, role="secondary", peer_role="primary", name="primary")
    opened = 0
    deadline = time.monotonic() + 5
    while opened < 2 and time.monotonic() < deadline:
        opened += sum(isinstance(e, Opened) for c in (ours, theirs) for e in c.on_ready(BOTH))
        time.sleep(0.002)
    assert opened == 2
    return ours, theirs


def test_the_replication_link_closed_elsewhere_is_reported_once_let_go_of_it_is_not() -> None:
    io = NodeIO(key=KEY, gateway=("127.0.0.1", 9), role=lambda: "primary", heartbeat_timeout=0.8,
                hello=lambda: Heartbeat(), status=lambda: Heartbeat())
    current, peer1 = _open_pair()
    old, peer2 = _open_pair()
    def add_both() -> None:  # in the I/O thread, as connect_repl and accept do
        io._add(current)
        io._add(old)

    io.call(add_both)
    io.repl = current
    io.start()
    try:
        time.sleep(0.1)
        old.close("a failed send, after the VM thread let go of it")  # as Node.close_repl's goodbye failing
        current.close("connection error: [Errno 32] Broken pipe")
        deadline = time.monotonic() + 3
        seen: list[Any] = []
        while time.monotonic() < deadline and not any(src is current for src, _ in seen):
            try:
                seen.append(io.inbox.get(timeout=0.1))
            except queue.Empty:
                pass
        time.sleep(0.2)
        while not io.inbox.empty():
            seen.append(io.inbox.get_nowait())
        closed = [(src, ev) for src, ev in seen if isinstance(ev, Closed)]
        assert [src for src, _ in closed] == [current] and "Broken pipe" in closed[0][1].reason, seen
        assert io.repl is None and current.sock.fileno() == old.sock.fileno() == -1  # both released
    finally:
        io.stop(flush=0.0)
        for c in (peer1, peer2):
            c.release()


def test_the_gateway_forgets_a_link_closed_after_its_last_bytes() -> None:
    gw = Gateway(GatewayConfig(KEY))
    a, b = socket.socketpair()
    try:
        conn = Conn(a, key=KEY, role="gateway", peer_role=("control",), name="control")
        conn.loop_owned = True
        gw.conns[conn.id] = conn
        gw._turn()
        conn.close_after_flush("done")  # nothing queued beyond the handshake start: it closes at once or soon
        for _ in range(20):
            gw._turn()
            if conn.id not in gw.conns:
                break
        assert conn.id not in gw.conns and a.fileno() == -1
    finally:
        b.close()
        gw._close()
