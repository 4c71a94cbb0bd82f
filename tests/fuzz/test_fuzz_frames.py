"""Fuzzed decoders of the wire: the plain frame decoder (the handshake's), the session decoder (every
later frame) and the handshake itself. Arbitrary bytes and mutations of valid streams may only ever
raise the project's own errors, never make a decoder hold more than one frame plus one read, and a
sealed stream may only ever yield a prefix of what was sent: never a message that was not.
"""

from __future__ import annotations

import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo.auth import AUTH_MAX_PAYLOAD, Handshake
from colo.errors import AuthError, ColoError, IntegrityError, WireError
from colo.messages import (
    CheckpointRequest,
    ErrorMessage,
    Heartbeat,
    Input,
    Message,
    NodeStatus,
    Trigger,
    VmstateChunk,
    VmstateSize,
)
from colo.session import SessionCodec
from colo.wire import HEADER_SIZE, SEALED_HEADER_SIZE, SEALED_OVERHEAD, FrameDecoder, encode_frame

KEY = b"fuzz-key-0123456789abcdef-fuzz"
FUZZ = settings(database=None, deadline=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow])
SAMPLES: list[Message] = [
    Heartbeat(),
    CheckpointRequest(3, Trigger.MISMATCH),
    VmstateChunk(3, bytes(range(256)) * 3),
    VmstateSize(3, 768),
    Input(7, 2, 1, b"SET k v\r\n"),
    NodeStatus(2, {"epoch": 3, "nested": [1, 2.5, None, {"a": b"b"}]}),
    ErrorMessage("bye"),
]


def sessions(*, encrypt: bool = False, max_payload: int = 4096) -> tuple[SessionCodec, SessionCodec]:
    """A sender and a receiver codec from a handshake with fixed nonces (same keys every time)."""
    a = Handshake(KEY, "primary", "secondary", encrypt=encrypt, nonce=b"\x11" * 32)
    b = Handshake(KEY, "secondary", "primary", encrypt=encrypt, nonce=b"\x22" * 32)
    ca, cb = a.start(), b.start()
    pa, pb = a.receive_data(cb), b.receive_data(ca)
    a.receive_data(pb)
    b.receive_data(pa)
    return a.session(max_payload=max_payload), b.session(max_payload=max_payload)


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    """`stream` after a few random edits: flipped bits, overwritten, inserted or deleted runs, a cut."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 40))]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    return out


def drain(decoder: FrameDecoder | SessionCodec, pieces: list[bytes], bound: int) -> list[Message]:
    """Feed the pieces one read at a time, draining after each; check the buffer bound as we go."""
    got: list[Message] = []
    for piece in pieces:
        decoder.feed(piece)
        while (msg := decoder.next_message()) is not None:
            got.append(msg)
        assert decoder.buffered <= bound + len(piece), (decoder.buffered, len(piece))
    return got


# -- the plain frame decoder ---------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_plain_decoder_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    try:
        drain(FrameDecoder(max_payload=2048), splits(data, cuts), HEADER_SIZE + 2048)
    except WireError:
        pass


@FUZZ
@given(data=st.data(), cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_plain_decoder_on_mutated_streams(data: st.DataObject, cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in SAMPLES)
    bad = data.draw(mutated(stream))
    try:
        drain(FrameDecoder(max_payload=2048), splits(bad, cuts), HEADER_SIZE + 2048)
    except WireError:
        pass


def test_plain_decoder_allocates_nothing_for_a_claimed_length() -> None:
    decoder = FrameDecoder()  # 64 MiB bound
    tracemalloc.start()
    try:
        decoder.feed(b"COLO\x01" + (60 << 20).to_bytes(4, "big") + b"\x81")
        assert decoder.next_message() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak


# -- the session decoder -------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8), encrypt=st.booleans())
def test_session_decoder_on_arbitrary_bytes(data: bytes, cuts: list[int], encrypt: bool) -> None:
    _, receiver = sessions(encrypt=encrypt)
    try:
        got = drain(receiver, splits(data, cuts), SEALED_OVERHEAD + 4096)
    except IntegrityError:
        return
    assert got == []  # nothing decodes without the key: at most a partial header is buffered
    assert receiver.buffered < SEALED_HEADER_SIZE


@FUZZ
@given(data=st.data(), cuts=st.lists(st.integers(0, 5000), max_size=8), encrypt=st.booleans())
def test_session_decoder_on_mutated_streams(data: st.DataObject, cuts: list[int], encrypt: bool) -> None:
    sender, receiver = sessions(encrypt=encrypt)
    stream = b"".join(sender.encode(m) for m in SAMPLES)
    bad = data.draw(mutated(stream))
    got: list[Message] = []
    try:
        got = drain(receiver, splits(bad, cuts), SEALED_OVERHEAD + 4096)
    except IntegrityError:
        pass
    # Whatever the edit, what comes out is what was sent, in order, with nothing skipped.
    assert got == SAMPLES[:len(got)]
    if bad != stream and not stream.startswith(bad):
        assert receiver.error is not None or len(got) < len(SAMPLES)


@FUZZ
@given(payload=st.binary(max_size=600), encrypt=st.booleans())
def test_authentic_garbage_payloads_are_wire_errors(payload: bytes, encrypt: bool) -> None:
    # A peer that holds the key but sends nonsense: msgpack sees it only after the MAC verified,
    # and the result is a WireError (not an integrity failure, not a crash).
    sender, receiver = sessions(encrypt=encrypt)
    try:
        drain(receiver, [sender.seal(payload)], SEALED_OVERHEAD + 4096)
    except IntegrityError as exc:
        raise AssertionError(f"an authentic frame failed its MAC: {exc}") from exc
    except WireError:
        pass


@FUZZ
@given(length=st.integers(4097, 2**32 - 1), encrypt=st.booleans())
def test_session_decoder_allocates_nothing_for_a_claimed_length(length: int, encrypt: bool) -> None:
    # A forged header claiming a large body fails its tag at once; nothing is reserved for it.
    _, receiver = sessions(encrypt=encrypt)
    head = b"COLO" + bytes([3 if encrypt else 2]) + length.to_bytes(4, "big") + (1).to_bytes(8, "big")
    tracemalloc.start()
    try:
        try:
            receiver.feed(head + bytes(16))
        except IntegrityError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert receiver.error is not None and peak < 64 * 1024, peak


# -- the handshake -------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=6))
def test_handshake_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    hs = Handshake(KEY, "primary", "secondary")
    hs.start()
    try:
        for piece in splits(data, cuts):
            if piece:
                hs.receive_data(piece)
            assert hs._decoder.buffered <= HEADER_SIZE + AUTH_MAX_PAYLOAD + len(piece)
    except AuthError:
        return
    assert not hs.done  # no key, no completion


@FUZZ
@given(data=st.data(), encrypt=st.booleans())
def test_handshake_on_a_mutated_peer_flight(data: st.DataObject, encrypt: bool) -> None:
    a = Handshake(KEY, "primary", "secondary", encrypt=encrypt)
    b = Handshake(KEY, "secondary", "primary", encrypt=encrypt)
    ca, cb = a.start(), b.start()
    pb = b.receive_data(ca)
    flight = data.draw(mutated(cb + pb))
    try:
        pa = a.receive_data(flight)
        if not a.done:
            a.receive_data(b"")  # the peer stops there
    except AuthError:
        return
    # Completed despite the edit: then it was harmless, and the two ends share the keys.
    b.receive_data(pa)
    assert b.done
    receiver = a.session()
    receiver.feed(b.session().encode(Heartbeat()))
    assert receiver.next_message() == Heartbeat()


def test_errors_the_fuzzers_accept_are_the_projects() -> None:
    assert issubclass(IntegrityError, WireError) and issubclass(WireError, ColoError)
    assert issubclass(AuthError, ColoError)
