"""tcpclients.ClientTable's output to one client, over real sockets: a reply that leaves whole queues nothing, and
one that does not leaves the rest queued, bounded and reported (`Backlog`), then sent once the client reads."""
from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tcpclients import Backlog, ClientTable, Connected, ListenError, listen_on


class Table:
    """A table on a loopback port with one adopted client, and every event it reported."""

    def __init__(self, out_limit: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.events: list[Any] = []
        self.table = ClientTable(self.sel, ("127.0.0.1", 0), self._on_event, out_limit=out_limit)
        self.client = socket.create_connection(self.table.address)
        self.client.setblocking(False)
        self.turn_until(lambda: 1 in self.table.clients)

    def _on_event(self, ev: Any) -> None:
        self.events.append(ev)
        if isinstance(ev, Connected):
            self.table.adopt(ev.token, 1)

    def turn_until(self, done: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the table never got there"
            for key, mask in self.sel.select(0.05):
                table, conn = key.data
                table.on_ready(conn, mask)

    def interest(self) -> int:
        return self.sel.get_key(self.table.clients[1].sock).events

    def read_all(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk

    def close(self) -> None:
        self.client.close()
        self.table.close_all()
        self.sel.close()


@pytest.fixture
def t() -> Iterator[Table]:
    table = Table(out_limit=64 << 10)
    yield table
    table.close()


def test_a_reply_that_leaves_whole_queues_nothing(t: Table) -> None:
    before = t.interest()
    for i in range(100):
        t.table.write(1, b"+OK %d\r\n" % i)
    assert t.table.unsent(1) == 0 and t.interest() == before == selectors.EVENT_READ
    time.sleep(0.05)
    assert t.read_all() == b"".join(b"+OK %d\r\n" % i for i in range(100))


def test_output_a_client_does_not_read_is_queued_bounded_and_sent_once_it_reads(t: Table) -> None:
    sent = b""
    i = 0
    while not any(isinstance(e, Backlog) for e in t.events):  # the socket buffers fill, then the queue
        piece = (b"%08d" % i) * 512
        t.table.write(1, piece)
        sent += piece
        i += 1
        assert i < 100_000, "the table never reported a backlog"
    assert t.events[-1] == Backlog(1, True) and t.table.unsent(1) > 64 << 10
    assert t.interest() == selectors.EVENT_WRITE  # it stopped reading the client, waits to write
    got = t.read_all()  # room in the socket again, before the table has written into it
    time.sleep(0.05)
    t.table.write(1, b"tail")  # behind what waits: never ahead of it
    deadline = time.monotonic() + 10
    while len(got) < len(sent) + 4 and time.monotonic() < deadline:
        got += t.read_all()
        for key, mask in t.sel.select(0.01):
            key.data[0].on_ready(key.data[1], mask)
    assert got == sent + b"tail"
    assert t.events[-1] == Backlog(1, False) and t.table.unsent(1) == 0
    assert t.interest() == selectors.EVENT_READ


def test_an_address_that_cannot_be_listened_on_is_named_in_the_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as e:
            listen_on(("127.0.0.1", port), 8)
        sel = selectors.DefaultSelector()
        with pytest.raises(OSError) as e2:  # the client table (toyvm's --net-listen, the gateway) says the same
            ClientTable(sel, ("127.0.0.1", port), lambda ev: None)
        sel.close()
    assert str(e.value) == str(e2.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert e.value.errno == errno.EADDRINUSE
