"""The man-in-the-middle proxy of tests/mitm.py, on its own: a primary and a secondary that speak the
real handshake and sessions through it, each tampering action, and what the receiver says about it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mitm import C2S, S2C, Frame, Mitm, Rule

from colo.auth import Handshake
from colo.errors import ColoError, IntegrityError
from colo.messages import Heartbeat, Message, VmstateChunk

KEY = b"mitm-test-key-0123456789abcdef"
N = 6  # messages each test sends


class Receiver:
    """A TCP server that authenticates as the secondary and decodes sealed messages until the
    stream ends or a frame is refused; it can also send `N` messages back (for s2c)."""

    def __init__(self, *, encrypt: bool = False, reply: bool = False, slow: float = 0.0) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.got: list[Message] = []
        self.error: ColoError | None = None
        self.encrypt, self.reply, self.slow = encrypt, reply, slow
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        sock, _ = self.server.accept()
        try:
            hs = authenticate(sock, "secondary", "primary", self.encrypt, self.slow)
            codec = hs.session()
            if self.reply:
                sock.sendall(b"".join(codec.encode(m) for m in messages()))
            while (data := sock.recv(65536)) or True:
                codec.feed(data)
                while (msg := codec.next_message()) is not None:
                    self.got.append(msg)
                if not data:
                    break
        except ColoError as exc:
            self.error = exc
        finally:
            sock.close()
            self.server.close()
            self.done.set()


def authenticate(sock: socket.socket, role: str, peer: str, encrypt: bool, slow: float = 0.0) -> Handshake:
    """`slow`: seconds to wait before each read, so that what the peer sends next is already there."""
    hs = Handshake(KEY, role, peer, encrypt=encrypt)
    sock.sendall(hs.start())
    while not hs.done:
        time.sleep(slow)
        out = hs.receive_data(sock.recv(4096))
        if out:
            sock.sendall(out)
    return hs


def messages() -> list[Message]:
    return [VmstateChunk(1, bytes([i]) * (100 + i)) for i in range(N)]


def run_through(mitm: Mitm, *, encrypt: bool = False, reply: bool = False, rx: Receiver,
                slow: float = 0.0) -> tuple[list[Message], Any]:
    """The primary's side: connect through the proxy, send N messages, then read what comes back
    (when the receiver replies). Returns what the primary decoded and the error it hit, if any."""
    sock = socket.create_connection(mitm.address, timeout=10)
    got: list[Message] = []
    error = None
    try:
        hs = authenticate(sock, "primary", "secondary", encrypt, slow)
        codec = hs.session()
        sock.sendall(b"".join(codec.encode(m) for m in messages()))
        sock.shutdown(socket.SHUT_WR)
        if reply:
            try:
                while True:  # the codec first: replies that came with the peer's proof are in it already
                    while (msg := codec.next_message()) is not None:
                        got.append(msg)
                    if not (data := sock.recv(65536)):
                        break
                    codec.feed(data)
            except ColoError as exc:
                error = exc
    finally:
        assert rx.done.wait(10)
        sock.close()
    return got, error


@pytest.fixture
def proxy() -> Iterator[Any]:
    made: list[Mitm] = []

    def make(rx: Receiver) -> Mitm:
        m = Mitm(rx.address).start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.mark.parametrize("encrypt", [False, True], ids=["integrity", "encrypted"])
def test_everything_passes_through_untouched(proxy: Any, encrypt: bool) -> None:
    rx = Receiver(encrypt=encrypt)
    mitm = proxy(rx)
    run_through(mitm, encrypt=encrypt, rx=rx)
    assert rx.error is None and rx.got == messages()
    c2s = [f for f in mitm.frames if f.direction == C2S]
    assert len(c2s) == 2 + N and [f.sealed for f in c2s] == [False, False] + [True] * N  # challenge, proof


# (rule, what the receiver must say). Rules count sealed frames from 0: nth=2 is the third message.
CASES = [
    (Rule("flip-body", C2S, nth=2), "frame 3 from the primary fails its MAC: altered frame"),
    (Rule("flip-body", C2S, nth=0, offset=40, mask=0x80), "frame 1 from the primary fails its MAC: altered frame"),
    (Rule("flip-header", C2S, nth=2, offset=5), "frame 3 from the primary fails its MAC: altered, reordered"),
    (Rule("flip-header", C2S, nth=2, offset=16), "frame 3 from the primary fails its MAC"),  # the sequence number
    (Rule("flip-header", C2S, nth=1, offset=0), "frame 2 from the primary has a bad magic"),
    (Rule("drop", C2S, nth=2), "frame 3 from the primary is missing: the next frame carries sequence number 4"),
    (Rule("replay", C2S, nth=2), "frame 4 from the primary is a replay: it carries sequence number 3"),
    (Rule("reorder", C2S, nth=2), "frame 3 from the primary is missing: the next frame carries sequence number 4"),
    (Rule("drop", C2S, nth=N - 1), None),  # the last one: the stream just ends early
]


@pytest.mark.parametrize("encrypt", [False, True], ids=["integrity", "encrypted"])
@pytest.mark.parametrize(("rule", "text"), CASES, ids=[f"{r.action}-{r.nth}-{r.offset}" for r, _ in CASES])
def test_each_action_is_detected_by_the_receiver(proxy: Any, rule: Rule, text: str | None, encrypt: bool) -> None:
    rx = Receiver(encrypt=encrypt)
    mitm = proxy(rx)
    mitm.add(Rule(rule.action, rule.direction, nth=rule.nth, offset=rule.offset, mask=rule.mask))
    run_through(mitm, encrypt=encrypt, rx=rx)
    assert mitm.rules[0].fired.is_set()
    assert rx.got == messages()[:len(rx.got)]  # never a message that was not sent
    if text is None:
        assert rx.error is None and len(rx.got) == N - 1
    else:
        assert isinstance(rx.error, IntegrityError) and text in str(rx.error), rx.error
        assert len(rx.got) < N


# slow: the secondary reads the primary's challenge and proof at once and replies behind its own proof; the
# primary, slower still, reads that proof and every reply in one read (what a loaded machine did once in CI)
@pytest.mark.parametrize("slow", [0.0, 0.2], ids=["prompt", "slow"])
def test_the_other_direction_and_a_match(proxy: Any, slow: float) -> None:
    rx = Receiver(reply=True, slow=1.5 * slow)
    mitm = proxy(rx)
    # the 4th sealed frame back, the one whose body holds the bytes of message 3 (readable: integrity only)
    rule = mitm.flip_body(0, direction=S2C, match=lambda f: f.sealed and bytes([3]) * 103 in f.body)
    got, error = run_through(mitm, reply=True, rx=rx, slow=slow)
    assert rule.fired.is_set() and isinstance(rule.hit, Frame) and rule.hit.index == 2 + 3, (rule.hit, error)
    assert got == messages()[:3], (len(got), error, rx.error)
    assert isinstance(error, IntegrityError) and "frame 4 from the secondary fails its MAC" in str(error)
    assert rx.got == messages()  # the other direction was left alone


def test_bytes_that_are_not_frames_pass_through_raw(proxy: Any) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        while data := conn.recv(4096):
            got.extend(data)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    mitm = Mitm(server.getsockname()[:2]).start()
    try:
        c = socket.create_connection(mitm.address)
        payload = b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 20
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        t.join(10)
        c.close()
        assert bytes(got) == payload
    finally:
        mitm.close()
        server.close()


def test_rules_are_checked() -> None:
    with pytest.raises(ValueError, match="action must be one of"):
        Rule("explode", C2S)
    with pytest.raises(ValueError, match="direction must be"):
        Rule("drop", "sideways")


def test_cut_drops_live_connections(proxy: Any) -> None:
    rx = Receiver()
    mitm = proxy(rx)
    sock = socket.create_connection(mitm.address, timeout=10)
    sock.sendall(authenticate(sock, "primary", "secondary", False).session().encode(Heartbeat()))
    mitm.cut()
    assert rx.done.wait(10)
    assert sock.recv(10) == b""
    sock.close()
