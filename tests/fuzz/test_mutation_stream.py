"""A recorded checkpoint stream, flipped byte by byte: the initial copy and a few checkpoints of a
small guest, sent through a PrimaryProtocol with a session, then replayed into fresh
SecondaryProtocols with one byte flipped each time. Every flip must be refused with a project error
before the secondary has accepted anything it should not: no flipped stream may reach the end of
the conversation, and the secondary's VM is never touched (it only ever decodes, here)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from colo import livecopy, vmstate
from colo.auth import Handshake
from colo.errors import ColoError, ProtocolError
from colo.livecopy import FINAL, ROUND, RecordReader
from colo.messages import (
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    InitialChunk,
    InitialSize,
    Trigger,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.node import state_digest
from colo.protocol import PrimaryProtocol, SecondaryProtocol, State
from colo.wire import HEADER_SIZE, SEALED_HEADER_SIZE, TAG_SIZE, frame_size
from conftest import guest
from toyvm import Machine
from toyvm.errors import StateError

KEY = b"mutation-key-0123456789abcdef"
RAM = 4 << 20  # memtouch puts its buffer at 2 MiB
CHECKPOINTS = 3
READ = 4096  # the secondary reads the stream in pieces of this size
CHUNK = 8 * 1024  # the copy in small chunks: many frames, many headers


def pair(encrypt: bool) -> tuple[PrimaryProtocol, SecondaryProtocol]:
    """The two sides over a handshake with fixed nonces: every pair has the same keys, so a fresh
    secondary can check a stream recorded from an earlier primary."""
    hp = Handshake(KEY, "primary", "secondary", encrypt=encrypt, nonce=b"\x0a" * 32)
    hs = Handshake(KEY, "secondary", "primary", encrypt=encrypt, nonce=b"\x0b" * 32)
    cp, cs = hp.start(), hs.start()
    pp, ps = hp.receive_data(cs), hs.receive_data(cp)
    hp.receive_data(ps)
    hs.receive_data(pp)
    return PrimaryProtocol(hp), SecondaryProtocol(hs)


@dataclass
class Recording:
    stream: bytes  # everything the primary sent
    frames: list[tuple[int, int]]  # (offset, size) of each frame in it


SMALL = "pages=6 iters=0"  # about 10 KB of stream: every byte can be flipped
LARGE = "pages=24 iters=0 fill=random"  # incompressible pages: frames above LARGE_FRAME, read in pieces


def record(encrypt: bool, args: str = SMALL) -> Recording:
    vm = Machine(RAM)
    vm.boot(guest("memtouch"), args)
    out_serial = b""
    deadline = time.monotonic() + 10
    while b"memtouch: " not in out_serial and time.monotonic() < deadline:  # a slice is time: under load, several
        vm.run_slice(0.01)
        out_serial += vm.take_serial()
    assert b"memtouch: " in out_serial and not vm.powered_off
    vm.collect_dirty()
    primary, secondary = pair(encrypt)
    out = bytearray()

    def send(msg: object) -> None:
        frame = primary.send(msg)  # type: ignore[arg-type]
        out.extend(frame)
        secondary.receive_data(frame)
        while secondary.next_event() is not None:
            pass

    def reply(msg: object) -> None:
        primary.receive_data(secondary.send(msg))  # type: ignore[arg-type]
        while primary.next_event() is not None:
            pass

    pieces, _ = vmstate.encode(vm, vm.ram.nonzero_pages(), epoch=0, full=False)
    first_round, _ = vmstate.encode(vm, vm.ram.nonzero_pages()[:8], epoch=0, full=False)
    # as a live copy: a round of pages, then the VM
    copy = (livecopy.record(ROUND, livecopy.pack_pieces(first_round))
            + livecopy.record(FINAL, livecopy.pack_pieces(pieces)))
    for lo in range(0, len(copy), CHUNK):
        send(InitialChunk(copy[lo:lo + CHUNK]))
    send(InitialSize(len(copy)))
    reply(CheckpointReady(1))
    for epoch in range(1, CHECKPOINTS + 1):
        vm.run_slice(0.005)
        pieces, _ = vmstate.encode(vm, vm.collect_dirty(), epoch=epoch, full=False)
        send(CheckpointRequest(epoch, Trigger.TIMER))
        reply(CheckpointReply(epoch))
        send(VmstateSend(epoch))
        for piece in pieces:
            send(VmstateChunk(epoch, piece))
        send(VmstateSize(epoch, sum(map(len, pieces))))
        reply(VmstateReceived(epoch))
        reply(VmstateLoaded(epoch))
    assert secondary.state is State.IDLE and secondary.loaded_epoch == CHECKPOINTS
    frames, at = [], 0
    while at < len(out):
        size = frame_size(out[at:at + HEADER_SIZE])
        frames.append((at, size))
        at += size
    return Recording(bytes(out), frames)


def replay(stream: bytes, encrypt: bool, vm: Machine) -> int:
    """Play the secondary's part against `stream`, as colo.secondary does (decode each state, never
    apply it here); returns the last epoch it verified. A refusal raises a ColoError or StateError."""
    _, side = pair(encrypt)
    receiver = vmstate.Receiver()
    chunks: list[bytes] = []
    verified = 0
    for lo in range(0, len(stream), READ):
        side.receive_data(stream[lo:lo + READ])
        while (ev := side.next_event()) is not None:
            if isinstance(ev, InitialChunk):
                chunks.append(bytes(ev.data))
            elif isinstance(ev, VmstateChunk):
                receiver.feed(ev.data)
            elif isinstance(ev, InitialSize):
                reader = RecordReader()
                records = reader.feed(b"".join(chunks))
                if not reader.final_seen:
                    raise ProtocolError("the copy ended without its final record")
                for _, blob in records:
                    receiver.begin(epoch=None, full=False, vm=vm)
                    for piece in livecopy.unpack_pieces(blob):
                        receiver.feed(piece)
                    receiver.finish()
                chunks = []
                side.send(CheckpointReady(1))
            elif isinstance(ev, CheckpointRequest):
                side.send(CheckpointReply(ev.epoch))
            elif isinstance(ev, VmstateSend):
                receiver.begin(epoch=ev.epoch, full=False, vm=vm)
            elif isinstance(ev, VmstateSize):
                receiver.finish()
                verified = ev.epoch
                side.send(VmstateReceived(ev.epoch))
                side.send(VmstateLoaded(ev.epoch))
    return verified


def flip_positions(rec: Recording, every: int) -> list[int]:
    """Every `every`-th byte, and every byte of every frame's header and of its tag."""
    chosen = set(range(0, len(rec.stream), every))
    for offset, size in rec.frames:
        chosen.update(range(offset, offset + SEALED_HEADER_SIZE))
        chosen.update(range(offset + size - TAG_SIZE, offset + size))
    return sorted(chosen)


@pytest.fixture(scope="module")
def secondary_vm() -> Machine:
    return Machine(RAM)


def check_every_flip(encrypt: bool, every: int, vm: Machine, args: str = SMALL) -> int:
    rec = record(encrypt, args)
    assert len(rec.frames) > 10
    assert replay(rec.stream, encrypt, vm) == CHECKPOINTS  # the recording itself is good
    before = state_digest(vm)
    positions = flip_positions(rec, every)
    for at in positions:
        bad = bytearray(rec.stream)
        bad[at] ^= 0x01 if at % 2 else 0x80
        try:
            reached = replay(bytes(bad), encrypt, vm)
        except (ColoError, StateError):
            continue
        raise AssertionError(f"a flip at byte {at} of {len(bad)} was not refused (verified epoch {reached})")
    assert state_digest(vm) == before
    return len(positions)


@pytest.mark.parametrize("encrypt", [False, True], ids=["integrity", "encrypted"])
def test_flipped_bytes_of_a_checkpoint_stream_are_all_refused(encrypt: bool, secondary_vm: Machine) -> None:
    # every 400th byte of a larger stream, plus every header and tag byte
    flips = check_every_flip(encrypt, 400, secondary_vm, LARGE)
    assert flips >= 1000


@pytest.mark.slow
@pytest.mark.parametrize("encrypt", [False, True], ids=["integrity", "encrypted"])
def test_every_byte_of_a_checkpoint_stream_flipped(encrypt: bool, secondary_vm: Machine) -> None:
    check_every_flip(encrypt, 1, secondary_vm)
