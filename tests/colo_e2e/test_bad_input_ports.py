"""Bad input on the replication and control ports (DESIGN section 4, "Wire security", and section 5): every
kind of bad connection or bad state gives a clear error naming the problem, the connection is dropped, no process
crashes or hangs, and the secondary's VM stays at the last complete checkpoint.

Two setups:
- a whole cluster serving `kvstore` under a write workload, attacked from outside on the gateway's port and the
  secondary's port (no key, wrong key, malformed frames before and after authentication): it must keep working;
- a gateway and a secondary with no primary: the test authenticates as the primary with the right key, gives the
  secondary a valid initial copy and checkpoint, then bad checkpoints (page index outside RAM, wrong state
  version, bad checksum, cut off mid-transfer, wrong size, frames the protocol forbids...).
"""
from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest

from colo import vmstate
from colo.auth import Handshake, generate_key
from colo.link import Closed
from colo.livecopy import FINAL, pack_pieces, record
from colo.messages import (
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    CommandResult,
    ErrorMessage,
    Fence,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Message,
    NodeHello,
    Output,
    Trigger,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.node import state_digest
from colo.protocol import ConnectionClosed, PrimaryProtocol
from colo.session import SessionCodec
from colo.wire import MAX_PAYLOAD, SEALED_HEADER_SIZE
from colo_e2e.helpers import PeerLink, Procs, Workload, read_state_log, verify_ledger, wait_for
from conftest import guest
from toyvm import Machine
from toyvm.ram import parse_size

RAM = "16M"
AUTH_TIMEOUT_WAIT = 12.0  # the servers give an unauthenticated peer 5 s (colo.link.AUTH_TIMEOUT)


# -- raw attackers ------------------------------------------------------------------------------------------------
def frame_header(length: int, version: int = 1, magic: bytes = b"COLO") -> bytes:
    return struct.pack(">4sBI", magic, version, length)


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the server drops the connection; returns what it sent. Fails if it stays open."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return got
            got += data
    except ConnectionResetError:
        return got
    except TimeoutError:
        pass
    raise AssertionError(f"the server kept the connection open for {timeout} s after bad input (got {got[:100]!r})")


def attack(address: tuple[str, int], payload: bytes, *, close: bool = False) -> tuple[socket.socket, int]:
    """Connect, send `payload` raw (before any authentication), optionally close at once. Returns (socket,
    our local port): the servers name the peer's address in their error."""
    s = socket.create_connection(address, timeout=5)
    port = s.getsockname()[1]
    if payload:
        s.sendall(payload)
    if close:
        # Take the server's challenge first: closing with unread bytes would send a reset instead of an orderly
        # end of stream, and the server would only see "connection reset".
        s.settimeout(10)
        got = b""
        while len(got) < 9 or len(got) < 9 + int.from_bytes(got[5:9], "big"):
            data = s.recv(4096)
            if not data:
                break
            got += data
        s.close()
    return s, port


def wrong_key_handshake(address: tuple[str, int], role: str, peer_role: str) -> tuple[socket.socket, int]:
    """A full handshake attempt with a key the server does not have. The proof is sent before we check the
    server's (bytes fed one at a time), so the server sees a proof that does not verify."""
    s = socket.create_connection(address, timeout=15)
    port = s.getsockname()[1]
    hs = Handshake(generate_key(), role, peer_role, encrypt=True)  # as the servers: only the key is wrong
    s.sendall(hs.start())
    try:
        while True:
            data = s.recv(4096)
            for i in range(len(data)):
                out = hs.receive_data(data[i:i + 1])
                if out:
                    s.sendall(out)
            if not data:
                hs.receive_data(b"")
    except Exception:  # noqa: BLE001 - the expected AuthError (or the server closing on us)
        pass
    return s, port


def authed_link(address: tuple[str, int], key: bytes, role: str, peer_role: str, **options: Any) -> PeerLink:
    return PeerLink(address, key, role, peer_role, **options)


def get_until(link: PeerLink, pred: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = link.get(timeout=max(0.01, deadline - time.monotonic()))
        if ev is not None and pred(ev):
            return ev
    raise AssertionError(f"no matching event within {timeout} s")


# Pre-authentication attacks: name, bytes, what the server's log must say about our connection.
PRE_AUTH = [
    ("close", b"", True, "connection closed during authentication"),
    ("oversized-header", frame_header(0x7FFF_FFFF), False, "exceeds the limit of 256 bytes"),
    ("truncated-frame", frame_header(60) + b"\x81\xa3msg", True,
     "connection closed during authentication (inside a frame"),
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "bad magic"),
    ("wrong-version", frame_header(15, version=2) + msgpack.packb({"msg": "heartbeat"}), False,
     "unsupported frame format version 2"),
]

# Post-authentication attacks on a gateway or control link: bytes made with our link's session codec (an
# attacker in the middle has none: it can only send the first four), what the log must say.
POST_AUTH: list[tuple[str, Callable[[SessionCodec], bytes], str]] = [
    ("plain-frame", lambda c: frame_header(15) + msgpack.packb({"msg": "heartbeat"}),
     "a plain, unauthenticated frame where a sealed one must come"),
    ("forged-header", lambda c: struct.pack(">4sBIQ", b"COLO", 3 if c.encrypt else 2, 15, 1) + bytes(16),
     "frame 1 from the control fails its MAC"),
    ("garbage", lambda c: b"\x00garbage bytes that are not a frame\xff" * 4, "bad magic"),
    ("wrong-version", lambda c: frame_header(15, version=7) + msgpack.packb({"msg": "heartbeat"}), "has version 7"),
    # the peer holds the key: a header it sealed, announcing more than the bound (only the header is sent)
    ("oversized-header", lambda c: c.seal(bytes(MAX_PAYLOAD + 1))[:SEALED_HEADER_SIZE],
     f"exceeds the limit of {MAX_PAYLOAD} bytes"),
    ("unknown-message", lambda c: c.seal(msgpack.packb({"msg": "self-destruct"})),
     "unknown message name 'self-destruct'"),
]


def refused(log: str, port: int, text: str) -> bool:
    """The server's log says it refused the connection from our port, naming `text`."""
    return any(f":{port}:" in line and "refused a connection" in line and text in line for line in log.splitlines())


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    procs = Procs(tmp_path / "cluster", env={"secondary": {"COLO_STATE_LOG": str(tmp_path / "secondary.states")}})
    try:
        procs.start_gateway()
        procs.start_secondary()
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=30)

        def protected() -> bool:
            s = procs.status()
            return bool(s["gateway"]["protected"] and s["nodes"]["primary"].get("checkpoints", 0) >= 1)
        wait_for(protected, 30, "the cluster to be protected")
        yield procs
    finally:
        procs.stop()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (Debian redis-tools)")
def test_outside_attacks_on_both_ports_leave_the_cluster_working(cluster: Procs) -> None:
    w = Workload(cluster.service, persistent=2, cli=1).start()
    keep: list[socket.socket] = []
    expect: list[tuple[str, int, str]] = []  # (role whose log, our port, text)
    try:
        # A wrong key: as a control client and as a node on the gateway, as a primary on the secondary. First:
        # the secondary authenticates one connection at a time, so these must not queue behind the silent ones.
        for role, addr, me, peer in (("gateway", cluster.gateway, "control", "gateway"),
                                     ("gateway", cluster.gateway, "primary", "gateway"),
                                     ("secondary", cluster.secondary, "primary", "secondary")):
            s, port = wrong_key_handshake(addr, me, peer)
            keep.append(s)
            expect.append((role, port, "auth-proof does not verify: the peer does not have our key"))
        for role, addr in (("gateway", cluster.gateway), ("secondary", cluster.secondary)):
            for _name, payload, close, text in PRE_AUTH:
                s, port = attack(addr, payload, close=close)
                keep.append(s)
                expect.append((role, port, text))
        # No key at all: connect and say nothing (the slowest case: the servers wait 5 s), on both ports.
        for role, addr in (("gateway", cluster.gateway), ("secondary", cluster.secondary)):
            s, port = attack(addr, b"")
            keep.append(s)
            expect.append((role, port, "authentication timed out"))
        # Right key, then bad frames on the control link: each is dropped with the problem named.
        for _name, make, text in POST_AUTH:
            link = authed_link(cluster.gateway, cluster.key, "control", "gateway", max_payload=MAX_PAYLOAD + 1)
            link.sock.sendall(make(link.codec))
            ev = get_until(link, lambda e: isinstance(e, Closed), 10)
            assert ev is not None
            link.close()
            expect.append(("gateway", 0, text))
        # A control client sending a node's message gets a refusal, not a crash; a second primary is fenced.
        ctl = authed_link(cluster.gateway, cluster.key, "control", "gateway")
        ctl.send(Output(1, 1, 2, 1, b"forged output"))
        res = get_until(ctl, lambda e: isinstance(e, CommandResult))
        assert res.ok is False and "unexpected" in res.reason
        ctl.close()
        intruder = authed_link(cluster.gateway, cluster.key, "primary", "gateway")
        intruder.send(NodeHello("primary", "intruder", 1, 0, 0, 0, [], "", "", "", {"pid": 1}))
        fence = get_until(intruder, lambda e: isinstance(e, Fence))
        assert "already attached" in fence.reason or "split the brain" in fence.reason, fence.reason
        intruder.close()

        # Every refused connection is dropped by the server, and each error names the problem.
        for s in keep:
            if s.fileno() != -1:  # not one we closed ourselves
                wait_closed(s, AUTH_TIMEOUT_WAIT)
            s.close()
        for role, port, text in expect:
            if port:
                wait_for(lambda: refused(cluster.stderr(role), port, text), AUTH_TIMEOUT_WAIT,
                         f"the {role} to log '{text}' for the connection from port {port}")
            else:
                wait_for(lambda: any("bad input from control: " in line and text in line
                                     for line in cluster.stderr(role).splitlines()), 5,
                         f"the {role} to log 'bad input from control: ...{text}'")

        # The real cluster never noticed: same processes, still protected, checkpoints go on, clients served.
        before = cluster.status()["nodes"]["primary"]["checkpoints"]
        wait_for(lambda: cluster.status()["nodes"]["primary"]["checkpoints"] >= before + 5, 10,
                 "checkpoints to go on")
        since = time.monotonic()
        w.wait_replies(3, "the clients to keep getting replies", since=since, timeout=15)
    finally:
        for s in keep:
            s.close()
        w.stop()
    verify_ledger(w, cluster.service)
    w.close()
    status = cluster.cli_status()
    assert status["gateway"]["protected"] and status["nodes"]["primary"]["active"], status
    assert status["nodes"]["secondary"]["connected"] and status["nodes"]["secondary"]["epoch"] >= 1, status
    # Only the intruder was fenced (the gateway records it); the real pair never noticed anything.
    assert not [e for e in status["events"] if e["event"] in ("lost", "fenced", "promote", "promoted")
                and e.get("node") != "intruder"], status["events"]
    assert all(cluster.alive(r) for r in ("gateway", "secondary", "primary"))
    for role in ("gateway", "secondary", "primary"):
        assert "Traceback" not in cluster.stderr(role), cluster.stderr(role)


# -- a fake primary against a standalone secondary ---------------------------------------------------------------
class FakePrimary:
    """Authenticates to the secondary as the primary (with the right key) and drives the checkpoint protocol
    by hand, so it can send states and frames the real primary never would."""

    def __init__(self, address: tuple[str, int], key: bytes, vm: Machine) -> None:
        self.vm = vm
        # a larger bound than the secondary's only for what we may send: the oversized-frame attack
        self.link = PeerLink(address, key, "primary", "secondary",
                             protocol=lambda hs: PrimaryProtocol(hs, max_payload=MAX_PAYLOAD + 1))
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeats, daemon=True)
        self._hb.start()

    def _heartbeats(self) -> None:  # the secondary counts a silent primary as lost after 0.8 s
        while not self._stop.wait(0.15):
            try:
                self.link.heartbeat()
            except Exception:  # noqa: BLE001 - our protocol side is in ERROR or the link closed: stop
                return

    def expect(self, cls: type[Message], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.link.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(ev, cls):
                return ev
            if ev is None or isinstance(ev, Heartbeat):
                continue
            raise AssertionError(f"expected {cls.NAME}, got {ev!r}")
        raise AssertionError(f"no {cls.NAME} within {timeout} s")

    def closed_with(self, timeout: float = 10.0) -> list[Any]:
        """Events until the secondary drops the connection (an error message first, normally)."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.link.get(timeout=max(0.01, deadline - time.monotonic()))
            if ev is None or isinstance(ev, Heartbeat):
                continue
            seen.append(ev)
            if isinstance(ev, (Closed, ConnectionClosed)):
                return seen
        raise AssertionError(f"the secondary did not drop the connection within {timeout} s (saw {seen})")

    def initial_copy(self) -> dict[str, str]:
        vm = self.vm
        vm.collect_dirty()
        pieces, _ = vmstate.encode(vm, vm.ram.nonzero_pages(), epoch=0, full=False)
        copy = record(FINAL, pack_pieces(pieces))  # a stop-and-copy: one record, the whole VM
        for lo in range(0, len(copy), 1 << 20):
            self.link.send(InitialChunk(copy[lo:lo + (1 << 20)]))
        self.link.send(InitialSize(len(copy)))
        self.expect(CheckpointReady)
        return state_digest(vm)

    def next_state(self, epoch: int) -> tuple[list[bytes], dict[str, str]]:
        """Run the guest a little and encode the checkpoint's pieces, as the primary does."""
        self.vm.run_slice(0.005)
        self.vm.take_serial()
        pieces, _ = vmstate.encode(self.vm, self.vm.collect_dirty(), epoch=epoch, full=False)
        return pieces, state_digest(self.vm)

    def begin(self, epoch: int) -> None:
        self.link.send(CheckpointRequest(epoch, Trigger.TIMER))
        self.expect(CheckpointReply)
        self.link.send(VmstateSend(epoch))

    def send_state(self, epoch: int, pieces: list[bytes]) -> None:
        self.begin(epoch)
        for piece in pieces:
            self.link.send(VmstateChunk(epoch, piece))
        self.link.send(VmstateSize(epoch, sum(map(len, pieces))))

    def checkpoint(self, epoch: int) -> dict[str, str]:
        blob, digest = self.next_state(epoch)
        self.send_state(epoch, blob)
        self.expect(VmstateReceived)
        self.expect(VmstateLoaded)
        return digest

    def raw(self, data: bytes) -> None:
        """Bytes straight to the socket, past our protocol object (heartbeats stop first: no interleaving)."""
        self._stop.set()
        self._hb.join(2)
        self.link.sock.sendall(data)

    def forge(self, msg: Message) -> bytes:
        """The sealed frame for `msg` past our protocol object's checks (what a primary with a bug could send);
        heartbeats stop first, so nothing else takes a sequence number."""
        self._stop.set()
        self._hb.join(2)
        return self.link.codec.encode(msg)  # our protocol object's codec

    def seal(self, payload: bytes) -> bytes:
        """Any payload, sealed (a malformed one behind a valid MAC), past our protocol object."""
        self._stop.set()
        self._hb.join(2)
        return self.link.codec.seal(payload)

    def close(self) -> None:
        self._stop.set()
        self.link.close()


def head_piece(body: bytes) -> bytes:
    return struct.pack("<4sII", b"CVH2", len(body), zlib.crc32(body)) + body


def rebuild(pieces: list[bytes], change: Callable[[dict[str, Any]], None]) -> list[bytes]:
    """The state with its head (a msgpack map) changed by `change`, under a correct CRC, so only the intended
    field is wrong."""
    body = msgpack.unpackb(pieces[0][12:], raw=False, strict_map_key=False)
    change(body)
    return [head_piece(msgpack.packb(body, use_bin_type=True)), *pieces[1:]]


def batch_piece(number: int, index: list[int], data: bytes, flags: int = 0) -> bytes:
    """A page batch with a correct CRC."""
    b = bytearray(struct.pack("<4sIIII", b"CVB2", number, len(index), flags, 0))
    b += struct.pack(f"<{len(index)}I", *index) + lz4.block.compress(data, store_size=False)
    struct.pack_into("<I", b, 16, zlib.crc32(bytes(b[20:]), zlib.crc32(bytes(b[:16]))))
    return bytes(b)


def set_version(m: dict[str, Any]) -> None:
    m["version"] = 99


def page_outside_ram(pieces: list[bytes]) -> list[bytes]:
    b = bytearray(pieces[1])
    n = struct.unpack_from("<I", b, 8)[0]
    struct.pack_into("<I", b, 20 + 4 * (n - 1), parse_size(RAM) // 4096)  # one past the last page
    struct.pack_into("<I", b, 16, zlib.crc32(bytes(b[20:]), zlib.crc32(bytes(b[:16]))))
    return [pieces[0], bytes(b), *pieces[2:]]


def wrong_epoch_inside(m: dict[str, Any]) -> None:
    m["epoch"] = m["epoch"] + 7


def corrupt_batch(pieces: list[bytes]) -> list[bytes]:
    b = bytearray(pieces[-1])
    b[-1] ^= 0xFF
    return [*pieces[:-1], bytes(b)]


@pytest.fixture
def standalone(tmp_path: Path) -> Any:
    """A gateway and a secondary, no primary: the test plays the primary."""
    procs = Procs(tmp_path / "standalone", env={"secondary": {"COLO_STATE_LOG": str(tmp_path / "secondary.states")}})
    procs.state_log = tmp_path / "secondary.states"  # type: ignore[attr-defined]
    try:
        procs.start_gateway()
        procs.start_secondary()
        wait_for(lambda: spare(procs).get("connected"), 10, "the secondary to attach")
        yield procs
    finally:
        procs.stop()


def spare(procs: Procs) -> dict[str, Any]:
    spares = procs.status()["spares"]
    return spares[0] if spares else {}


def fresh_vm() -> Machine:
    vm = Machine(parse_size(RAM))
    vm.boot(guest("memtouch"), "pages=8 iters=0")
    return vm


def secondary_epochs(procs: Procs) -> list[Any]:
    return [e["epoch"] for e in read_state_log(procs.state_log)]  # type: ignore[attr-defined]


def assert_still_at(procs: Procs, digest: dict[str, str], epoch: int, lines: int) -> None:
    """The secondary logged nothing new (no epoch applied) and its last state is the last good checkpoint; it is
    alive, its gateway answers, and the gateway sees it at that epoch."""
    time.sleep(0.3)  # an apply would be logged right after the verification: give it the chance to show
    log = read_state_log(procs.state_log)  # type: ignore[attr-defined]
    assert len(log) == lines, f"the secondary applied something after the bad state: {log[lines - 1:]}"
    assert log[-1]["epoch"] == epoch and {k: log[-1][k] for k in ("ram", "cpu", "devices")} == digest
    assert procs.alive("secondary"), procs.stderr("secondary")
    assert procs.alive("gateway"), procs.stderr("gateway")
    def at_epoch() -> dict[str, Any] | None:
        sec = spare(procs)  # the gateway never paired it (the test plays the primary): it counts as a spare
        return sec if sec.get("epoch") == epoch else None
    sec = wait_for(at_epoch, 5, f"the secondary's status to show epoch {epoch}")
    assert sec["connected"] and sec["complete_epoch"] == epoch, sec


BAD_STATES: list[tuple[str, Callable[[list[bytes]], list[bytes]], str]] = [
    # name, how to make the state's pieces from a good one's, what the secondary must say
    ("page-outside-ram", page_outside_ram,
     f"page index {parse_size(RAM) // 4096} is outside guest RAM ({parse_size(RAM) // 4096} pages)"),
    ("wrong-state-version", lambda b: rebuild(b, set_version), "state version 99 is not supported"),
    ("bad-checksum", corrupt_batch, "checksum mismatch"),
    ("not-msgpack", lambda b: [head_piece(b"\xc1" * 32), *b[1:]], "not valid msgpack"),
    ("state-for-another-epoch", lambda b: rebuild(b, wrong_epoch_inside), "the state says it is for epoch 9"),
    ("bad-magic", lambda b: [b"XXXX" + b[0][4:], *b[1:]], "bad state magic"),
    ("too-short", lambda b: [b[0][:5]], "too short"),
    ("machine-state-for-other-ram", lambda b: rebuild(b, lambda m: m.__setitem__("vm", msgpack.packb(
        {**msgpack.unpackb(m["vm"], raw=False), "machine": {**msgpack.unpackb(m["vm"], raw=False)["machine"],
                                                             "ram_size": 32 << 20}}, use_bin_type=True))),
     "bytes of RAM"),
]


@pytest.mark.slow
def test_bad_states_from_an_authenticated_primary_are_refused(standalone: Procs) -> None:
    procs = standalone
    vm = fresh_vm()
    for name, make_bad, text in BAD_STATES:
        fake = FakePrimary(procs.secondary, procs.key, vm)
        try:
            fake.initial_copy()
            digest = fake.checkpoint(1)  # a good, complete checkpoint: the state to stay at
            lines = len(read_state_log(procs.state_log))  # type: ignore[attr-defined]
            good, _ = fake.next_state(2)
            fake.send_state(2, make_bad(good))
            seen = fake.closed_with()
            errors = [e.reason for e in seen if isinstance(e, ErrorMessage)]
            assert errors and text in errors[0], f"{name}: the secondary answered {seen}"
            assert not any(isinstance(e, (VmstateReceived, VmstateLoaded)) for e in seen), f"{name}: {seen}"
        finally:
            fake.close()
        wait_for(lambda: text in procs.stderr("secondary"), 5, f"the secondary to log {text!r}")
        assert_still_at(procs, digest, 1, lines)
    assert "Traceback" not in procs.stderr("secondary"), procs.stderr("secondary")
    assert procs.cli_status()["spares"][0]["epoch"] == 1


CUT_OFF = ["between-chunks", "before-size", "inside-a-frame"]


@pytest.mark.parametrize("where", CUT_OFF)
def test_state_cut_off_mid_transfer_is_discarded(standalone: Procs, where: str) -> None:
    procs = standalone
    fake = FakePrimary(procs.secondary, procs.key, fresh_vm())
    try:
        fake.initial_copy()
        digest = fake.checkpoint(1)
        lines = len(read_state_log(procs.state_log))  # type: ignore[attr-defined]
        fake.vm.ram.write(0x300000, b"\x5a" * (3 << 20))  # dirty: a state of several chunks
        pieces, _ = fake.next_state(2)
        assert len(pieces) >= 3
        fake.begin(2)
        half = len(pieces) // 2
        for piece in pieces[:half]:
            fake.link.send(VmstateChunk(2, piece))
        if where == "before-size":
            for piece in pieces[half:]:
                fake.link.send(VmstateChunk(2, piece))
        elif where == "inside-a-frame":
            frame = fake.forge(VmstateChunk(2, pieces[half]))
            fake.raw(frame[:len(frame) // 2])
        time.sleep(0.2)
    finally:
        fake.close()  # the connection drops between chunks: no vmstate-size ever comes
    wait_for(lambda: "primary lost" in procs.stderr("secondary"), 5, "the secondary to notice the loss")
    assert_still_at(procs, digest, 1, lines)
    # It is still a working secondary: a new primary can protect with it.
    fake = FakePrimary(procs.secondary, procs.key, fresh_vm())
    try:
        fake.initial_copy()
        fake.checkpoint(1)
    finally:
        fake.close()


def send_size_mismatch(fake: FakePrimary) -> None:
    """A whole state, then a vmstate-size that is not what was sent."""
    pieces, _ = fake.next_state(2)
    fake.begin(2)
    for piece in pieces:
        fake.link.send(VmstateChunk(2, piece))
    fake.raw(fake.forge(VmstateSize(2, sum(map(len, pieces)) + 1)))


PROTOCOL_ABUSE: list[tuple[str, Callable[[FakePrimary], None], str]] = [
    # name, what to do after a good checkpoint 1 (raw bytes bypass our own protocol checks), what must be logged
    ("plain-frame", lambda f: f.raw(frame_header(MAX_PAYLOAD + 1)), "a plain, unauthenticated frame"),
    ("oversized-frame", lambda f: f.raw(f.seal(bytes(MAX_PAYLOAD + 1))[:SEALED_HEADER_SIZE]),
     f"exceeds the limit of {MAX_PAYLOAD} bytes"),
    ("garbage", lambda f: f.raw(b"\xde\xad\xbe\xef" * 8), "bad magic"),
    ("wrong-frame-version", lambda f: f.raw(frame_header(15, version=9) + msgpack.packb({"msg": "heartbeat"})),
     "has version 9"),
    ("unknown-message", lambda f: f.raw(f.seal(msgpack.packb({"msg": "format-disk"}))),
     "unknown message name 'format-disk'"),
    ("wrong-epoch", lambda f: f.raw(f.forge(CheckpointRequest(5, Trigger.TIMER))),
     "got checkpoint-request epoch 5"),
    ("chunk-outside-send", lambda f: f.raw(f.forge(VmstateChunk(2, b"x" * 100))), "got vmstate-chunk"),
    ("message-of-the-wrong-side", lambda f: f.raw(f.forge(VmstateLoaded(1))), "got vmstate-loaded"),
    ("size-mismatch", send_size_mismatch, "expected vmstate-size"),
]


@pytest.mark.slow
def test_frames_and_messages_the_protocol_forbids_are_refused(standalone: Procs) -> None:
    procs = standalone
    vm = fresh_vm()
    for name, act, text in PROTOCOL_ABUSE:
        fake = FakePrimary(procs.secondary, procs.key, vm)
        try:
            fake.initial_copy()
            digest = fake.checkpoint(1)
            lines = len(read_state_log(procs.state_log))  # type: ignore[attr-defined]
            act(fake)
            fake.closed_with()
        finally:
            fake.close()
        wait_for(lambda: text in procs.stderr("secondary"), 5, f"{name}: the secondary to log {text!r}")
        assert_still_at(procs, digest, 1, lines)
    assert "Traceback" not in procs.stderr("secondary"), procs.stderr("secondary")
    assert procs.cli_status()["spares"][0]["epoch"] == 1


def test_a_second_primary_is_refused_while_one_is_attached(standalone: Procs) -> None:
    procs = standalone
    first = FakePrimary(procs.secondary, procs.key, fresh_vm())
    try:
        first.initial_copy()
        digest = first.checkpoint(1)
        lines = len(read_state_log(procs.state_log))  # type: ignore[attr-defined]
        second = FakePrimary(procs.secondary, procs.key, fresh_vm())
        try:
            second.closed_with()
        finally:
            second.close()
        wait_for(lambda: "refused a second primary" in procs.stderr("secondary"), 5, "the refusal in the log")
        assert_still_at(procs, digest, 1, lines)
        first.checkpoint(2)  # the first one is undisturbed
    finally:
        first.close()


# -- findings ----------------------------------------------------------------------------------------------------
def test_an_empty_page_batch_does_not_crash_the_secondary(standalone: Procs) -> None:
    procs = standalone
    fake = FakePrimary(procs.secondary, procs.key, fresh_vm())
    try:
        fake.initial_copy()
        digest = fake.checkpoint(1)
        lines = len(read_state_log(procs.state_log))  # type: ignore[attr-defined]
        good, _ = fake.next_state(2)
        bad = [*good, batch_piece(len(good) - 1, [], b"")]  # one batch more than the head says, with no pages
        fake.send_state(2, bad)
        seen = fake.closed_with()
        assert not any(isinstance(e, VmstateReceived) for e in seen), \
            f"the secondary said vmstate-received for a state it cannot apply: {seen}"
    finally:
        fake.close()
    assert procs.alive("secondary"), f"the secondary died:\n{procs.stderr('secondary')[-2000:]}"
    assert_still_at(procs, digest, 1, lines)


@pytest.mark.parametrize("order", [pytest.param((0, 2, 5), id="sorted"), pytest.param((0, 5, 2), id="unsorted")])
def test_pages_are_applied_where_the_index_says(standalone: Procs, order: tuple[int, ...]) -> None:
    procs = standalone
    vm = fresh_vm()
    fake = FakePrimary(procs.secondary, procs.key, vm)
    try:
        fake.initial_copy()
        fake.checkpoint(1)  # the VM does not run again: only the three pages below change
        base = 0x400000 // 4096
        pages = [base + i for i in order]
        for n, p in enumerate(pages):
            vm.ram.view[p * 4096:(p + 1) * 4096] = 0x11 * (n + 1)
        good, _ = vmstate.encode(vm, np.array(sorted(pages), dtype=np.int64), epoch=2, full=False)
        expected = state_digest(vm)
        # the same three pages, listed in `order`, data to match
        data = b"".join(bytes(vm.ram.view[p * 4096:(p + 1) * 4096]) for p in pages)
        lines = len(read_state_log(procs.state_log))  # type: ignore[attr-defined]
        fake.send_state(2, [good[0], batch_piece(0, pages, data)])
        if list(order) != sorted(order):
            # Page numbers out of order are refused (the primary always sends them sorted): no ack, no change.
            seen = fake.closed_with()
            assert not any(isinstance(e, VmstateReceived) for e in seen), seen
            assert "strictly increasing" in procs.stderr("secondary")
            assert len(read_state_log(procs.state_log)) == lines  # type: ignore[attr-defined]
            return
        fake.expect(VmstateReceived)
        fake.expect(VmstateLoaded)
    finally:
        fake.close()
    last = read_state_log(procs.state_log)[-1]  # type: ignore[attr-defined]
    assert last["epoch"] == 2
    assert {k: last[k] for k in ("ram", "cpu", "devices")} == expected, \
        "the secondary's state is not the checkpoint it acknowledged"


@pytest.mark.slow
def test_silent_unauthenticated_connections_do_not_keep_the_primary_unprotected(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "c")
    silent: list[socket.socket] = []
    try:
        procs.start_gateway()
        procs.start_secondary()
        for _ in range(3):  # no key, no bytes: just open connections
            silent.append(socket.create_connection(procs.secondary, timeout=5))
        procs.start_primary(guest("kvstore"), ram=RAM, interval_ms=30)
        wait_for(lambda: procs.status()["nodes"]["primary"].get("connected"), 20, "the primary to attach")
        # A legitimate primary must get protected despite the silent peers (the gateway, which authenticates each
        # connection in its own thread, has no such problem).
        wait_for(lambda: procs.status()["gateway"]["protected"] or "cannot protect" in procs.stderr("primary"), 15,
                 "the primary to be protected or to give up")
        assert procs.status()["gateway"]["protected"], procs.stderr("primary")
    finally:
        for s in silent:
            s.close()
        procs.stop()
