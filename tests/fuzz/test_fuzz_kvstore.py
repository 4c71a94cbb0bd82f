"""The RESP parser the kvstore guest runs (guests/runtime/resp.c), fuzzed on a real toyvm Machine
through its network device: arbitrary bytes and edits of valid commands never make the guest fault
or hang; it answers, closes, or waits for the rest of a command; and afterwards it still serves a
fresh connection. One VM serves the whole module, so damage left by one input shows in the next."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import guest
from toyvm import Machine
from toyvm.devices.net import CLOSE, DATA, OPEN
from toyvm.machine import StopReason

FUZZ = settings(database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_SLICES = 300  # 10 ms slices: a guest still busy after 3 s of guest time is hung


class Guest:
    def __init__(self) -> None:
        self.vm = Machine(4 << 20)
        self.vm.boot(guest("kvstore"))
        self.next_conn = 1
        self.settle()
        assert b"kvstore: ready" in self.vm.take_serial()

    def settle(self) -> None:
        """Run until the guest waits for input with none pending. A fault raises (a ToyVMError)."""
        for _ in range(MAX_SLICES):
            r = self.vm.run_slice(0.01)
            assert r.reason is not StopReason.POWER_OFF, "the guest powered off"
            if r.reason is StopReason.HALT and not self.vm.net.input_pending:
                return
        raise AssertionError("the guest is still busy: hung")

    def session(self, pieces: list[bytes], close: bool = True) -> list[Any]:
        conn = self.next_conn
        self.next_conn += 1
        self.vm.net.deliver(OPEN, conn)
        out = []
        for piece in pieces:
            self.vm.net.deliver(DATA, conn, piece)
            self.settle()
            out += self.vm.net.take_output()
        if close:
            self.vm.net.deliver(CLOSE, conn)
            self.settle()
            out += self.vm.net.take_output()
        assert all(e.conn == conn and e.kind in (DATA, CLOSE) for e in out), out
        return out

    def still_serves(self) -> None:
        out = self.session([b"*1\r\n$4\r\nPING\r\n", b"SET fuzzcheck 1\r\nGET fuzzcheck\r\n"])
        replies = b"".join(e.data for e in out if e.kind == DATA)
        assert replies == b"+PONG\r\n+OK\r\n$1\r\n1\r\n", replies


@pytest.fixture(scope="module")
def kv() -> Guest:
    return Guest()


COMMANDS = [
    b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
    b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n",
    b"*2\r\n$4\r\nINCR\r\n$3\r\nctr\r\n",
    b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n",
    b"PING\r\n",
    b"DEL a b c\r\n",
    b"*1\r\n$6\r\nDBSIZE\r\n",
]
# RESP's own vocabulary, so edits produce near-valid input more often than random bytes would.
TOKENS = st.sampled_from([b"*", b"$", b"+", b"-", b":", b"\r\n", b"\r", b"\n", b"-1", b"0", b"99999999999999999999",
                          b"2147483648", b"4294967296", b"18446744073709551616", b" ", b"\x00", b"SET", b"GET"])


@st.composite
def edited_commands(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(data)))
        choice = draw(st.integers(0, 2))
        if choice == 0 and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif choice == 1:
            data[at:at] = draw(TOKENS)
        else:
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


def pieces_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    out, last = [], 0
    for p in points:
        if p > last:
            out.append(data[last:p])
        last = p
    return out or [b""]


@FUZZ
@given(data=st.binary(min_size=1, max_size=400), cuts=st.lists(st.integers(0, 400), max_size=4))
def test_arbitrary_bytes(kv: Guest, data: bytes, cuts: list[int]) -> None:
    kv.session(pieces_of(data, cuts))


@FUZZ
@given(data=edited_commands(), cuts=st.lists(st.integers(0, 400), max_size=4), close=st.booleans())
def test_edited_commands(kv: Guest, data: bytes, cuts: list[int], close: bool) -> None:
    kv.session(pieces_of(data, cuts), close=close)


def test_a_huge_claimed_bulk_length_is_refused_or_awaited_not_allocated(kv: Guest) -> None:
    for claim in (b"2147483648", b"9223372036854775807", b"99999999999999999999999"):
        out = kv.session([b"*2\r\n$3\r\nGET\r\n$" + claim + b"\r\nabc\r\n"])
        assert all(e.kind in (DATA, CLOSE) for e in out)


def test_the_guest_still_serves_after_the_fuzzing(kv: Guest) -> None:
    # pytest runs a module's tests in order: this one comes last and checks what the others left.
    kv.still_serves()
