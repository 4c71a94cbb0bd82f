"""Flow control on the replication link: state bytes read ahead of the VM thread are bounded. A copy piled up
in a secondary's inbox made the primary's final stop wait for all of it to be applied (hundreds of ms at 1 GiB)."""
from __future__ import annotations

import selectors
import socket
from typing import Any

from colo.link import Conn
from colo.messages import Heartbeat, InitialChunk, VmstateChunk
from colo.nodeio import BACKLOG_LIMIT, NodeIO


def node_io() -> NodeIO:
    return NodeIO(key=b"k" * 32, gateway=("127.0.0.1", 9), role=lambda: "secondary", heartbeat_timeout=0.8,
                  hello=lambda: Heartbeat(), status=lambda: Heartbeat())


class FakeConn:
    read_paused = False


def test_state_chunks_count_until_the_vm_thread_takes_them() -> None:
    io = node_io()
    repl: Any = FakeConn()
    io.repl = repl
    chunk = InitialChunk(b"x" * (1 << 20))
    for _ in range(9):
        io._post(repl, chunk)
    io._post(repl, Heartbeat())  # not state: not counted
    assert io.backlog == 9 << 20 > BACKLOG_LIMIT
    woken: list[bool] = []
    io.wake = lambda: woken.append(True)  # type: ignore[method-assign]
    repl.read_paused = True  # as the I/O thread's turn sets it past the limit
    _, ev = io.inbox.get_nowait()
    io.taken(ev)
    assert io.backlog == 8 << 20 and woken == [True]  # at the limit again: the I/O thread reads on
    io.taken(VmstateChunk(1, b"y" * 10))
    assert io.backlog == (8 << 20) - 10


def test_a_paused_link_is_not_read() -> None:
    a, b = socket.socketpair()
    try:
        conn = Conn(a, key=b"k" * 32, role="secondary", peer_role="primary")
        assert conn.interest() & selectors.EVENT_READ
        conn.read_paused = True
        assert not conn.interest() & selectors.EVENT_READ
    finally:
        a.close()
        b.close()
