"""Framing: round trips, partial frames, bounds checked before allocation, garbage."""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo.errors import WireError
from colo.messages import (
    MAC_SIZE,
    NONCE_SIZE,
    AuthChallenge,
    AuthProof,
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    ErrorMessage,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Message,
    Trigger,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.wire import (
    CHUNK_OVERHEAD,
    HEADER_SIZE,
    LENGTH_FIELD_LIMIT,
    MAGIC,
    MAX_PAYLOAD,
    FrameDecoder,
    check_max_payload,
    decode_frame,
    decode_payload,
    encode_frame,
)

SETTINGS = settings(database=None, deadline=None, max_examples=200)

epochs = st.integers(min_value=1, max_value=2**63 - 1)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(InitialChunk, st.binary(max_size=2000)),
    st.builds(InitialSize, st.integers(min_value=0, max_value=2**64 - 1)),
    st.builds(CheckpointReady, epochs),
    st.builds(CheckpointRequest, epochs, st.sampled_from(Trigger)),
    st.builds(CheckpointReply, epochs),
    st.builds(VmstateSend, epochs),
    st.builds(VmstateChunk, epochs, st.binary(max_size=2000)),
    st.builds(VmstateSize, epochs, st.integers(min_value=0, max_value=2**64 - 1)),
    st.builds(VmstateReceived, epochs),
    st.builds(VmstateLoaded, epochs),
    st.just(Heartbeat()),
    st.builds(ErrorMessage, st.text(max_size=200)),
    st.builds(
        AuthChallenge,
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=32),
        st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
    ),
    st.builds(AuthProof, st.binary(min_size=MAC_SIZE, max_size=MAC_SIZE)),
)


def frame_with_payload(payload: bytes, *, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return struct.pack(">4sBI", magic, version, len(payload)) + payload


def packed(obj: object) -> bytes:
    return frame_with_payload(msgpack.packb(obj, use_bin_type=True))


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the given offsets (any order, duplicates allowed: empty pieces too)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@SETTINGS
@given(messages)
def test_round_trip(msg: Message) -> None:
    frame = encode_frame(msg)
    assert frame[:4] == b"COLO" and frame[4] == 1
    assert int.from_bytes(frame[5:9], "big") == len(frame) - HEADER_SIZE
    assert decode_frame(frame) == msg


@SETTINGS
@given(st.lists(messages, max_size=20), st.lists(st.integers(min_value=0), max_size=40))
def test_stream_round_trip_under_any_segmentation(msgs: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    decoder = FrameDecoder()
    out: list[Message] = []
    for piece in cut(stream, cuts):
        decoder.feed(piece)
        while (m := decoder.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert decoder.buffered == 0


def test_every_truncation_waits_without_error() -> None:
    frame = encode_frame(VmstateChunk(3, b"x" * 100))
    for n in range(len(frame)):
        decoder = FrameDecoder()
        decoder.feed(frame[:n])
        assert decoder.next_message() is None
        assert decoder.buffered == n
        decoder.feed(frame[n:])
        assert decoder.next_message() == VmstateChunk(3, b"x" * 100)


def test_oversized_length_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_payload=1000)
    with pytest.raises(WireError, match="payload of 1001 bytes exceeds the limit of 1000 bytes"):
        decoder.feed(struct.pack(">4sBI", MAGIC, 1, 1001))  # nine bytes, no payload at all
    with pytest.raises(WireError, match="exceeds the limit"):
        FrameDecoder().feed(struct.pack(">4sBI", MAGIC, 1, LENGTH_FIELD_LIMIT))
    assert MAX_PAYLOAD == 64 * 1024 * 1024


def test_announced_length_is_never_preallocated() -> None:
    # Even at the largest legal bound, a header announcing ~4 GiB costs only the bytes received.
    decoder = FrameDecoder(max_payload=LENGTH_FIELD_LIMIT)
    tracemalloc.start()
    try:
        decoder.feed(struct.pack(">4sBI", MAGIC, 1, LENGTH_FIELD_LIMIT) + b"\x00" * 1000)
        assert decoder.next_message() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_bad_header_fields() -> None:
    with pytest.raises(WireError, match="bad magic b'HTTP'"):
        FrameDecoder().feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(WireError, match="unsupported frame format version 2: expected 1"):
        decode_frame(frame_with_payload(b"\x80", version=2))
    with pytest.raises(WireError, match="shorter than the 9-byte header"):
        decode_frame(b"COLO")
    with pytest.raises(WireError, match="header says"):
        decode_frame(encode_frame(Heartbeat()) + b"\x00")


@pytest.mark.parametrize(
    ("payload_obj", "pattern"),
    [
        ([1, 2], "payload must be a msgpack map, got list"),
        ({"epoch": 1}, "payload has no 'msg' key"),
        ({"msg": "checkpoint-bogus"}, "unknown message name 'checkpoint-bogus'"),
        ({"msg": 7}, "unknown message name 7"),
        ({"msg": "vmstate-size", "epoch": 1}, "vmstate-size: bad fields: missing size"),
        ({"msg": "heartbeat", "epoch": 1}, "heartbeat: bad fields: unexpected 'epoch'"),
        ({"msg": "checkpoint-ready", "epoch": "1"}, "'epoch' must be an int >= 0, got '1'"),
        ({"msg": "checkpoint-ready", "epoch": True}, "'epoch' must be an int >= 0, got True"),
        ({"msg": "checkpoint-ready", "epoch": 1.5}, "'epoch' must be an int >= 0, got 1.5"),
        ({"msg": "checkpoint-ready", "epoch": -1}, "'epoch' must be an int >= 0, got -1"),
        ({"msg": "vmstate-size", "epoch": 1, "size": -5}, "'size' must be an int >= 0"),
        ({"msg": "vmstate-chunk", "epoch": 1, "data": "text"}, "'data' must be bytes, got str"),
        ({"msg": "initial-chunk", "data": "text"}, "initial-chunk: field 'data' must be bytes"),
        ({"msg": "initial-chunk", "epoch": 1, "data": b""}, "bad fields: unexpected 'epoch'"),
        ({"msg": "initial-size", "size": -1}, "initial-size: field 'size' must be an int >= 0"),
        ({"msg": "initial-size", "size": 1.0}, "'size' must be an int >= 0, got 1.0"),
        ({"msg": "initial-size"}, "initial-size: bad fields: missing size"),
        ({"msg": "checkpoint-request", "epoch": 1, "trigger": "cron"}, "'trigger' must be one of"),
        ({"msg": "checkpoint-request", "epoch": 1, "trigger": [1]}, "'trigger' must be one of"),
        ({"msg": "error", "reason": b"bytes"}, "'reason' must be a str, got bytes"),
        ({"msg": "auth-proof", "mac": b"short"}, "'mac' must be exactly 32 bytes, got 5 bytes"),
    ],
)
def test_bad_payloads_name_the_problem(payload_obj: object, pattern: str) -> None:
    with pytest.raises(WireError, match=pattern):
        decode_frame(packed(payload_obj))


def test_undecodable_msgpack() -> None:
    with pytest.raises(WireError, match="undecodable msgpack payload"):
        decode_frame(frame_with_payload(b"\xc1"))  # 0xc1 is never used in msgpack
    with pytest.raises(WireError, match="undecodable msgpack payload"):
        decode_frame(frame_with_payload(b""))
    with pytest.raises(WireError, match="undecodable msgpack payload"):  # trailing bytes
        decode_frame(frame_with_payload(msgpack.packb({"msg": "heartbeat"}) + b"\x00"))
    with pytest.raises(WireError, match="undecodable msgpack payload"):  # truncated inside
        decode_frame(frame_with_payload(msgpack.packb({"msg": "heartbeat"})[:-2]))


def test_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    decoder.feed(packed({"msg": "nope"}) + encode_frame(Heartbeat()))
    with pytest.raises(WireError, match="unknown message name"):
        decoder.next_message()
    with pytest.raises(WireError, match="decoder stopped after an earlier error"):
        decoder.next_message()
    with pytest.raises(WireError, match="decoder stopped"):
        decoder.feed(encode_frame(Heartbeat()))


def test_good_message_before_a_bad_header_is_not_lost() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Heartbeat()) + b"JUNKJUNKJUNK")
    assert decoder.next_message() == Heartbeat()
    with pytest.raises(WireError, match="bad magic"):
        decoder.next_message()


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_give_wire_error_or_messages(garbage: bytes) -> None:
    decoder = FrameDecoder(max_payload=200)
    try:
        decoder.feed(garbage)
        while decoder.next_message() is not None:
            pass
    except WireError:
        pass


@SETTINGS
@given(st.binary(max_size=300))
def test_random_payloads_give_wire_error_or_a_message(payload: bytes) -> None:
    try:
        assert isinstance(decode_payload(payload), Message)
    except WireError:
        pass


def test_sender_refuses_oversized_frames_and_chunk_overhead_fits() -> None:
    limit = 4096
    fits = VmstateChunk(2**62, bytes(limit - CHUNK_OVERHEAD))
    assert decode_frame(encode_frame(fits, max_payload=limit), max_payload=limit) == fits
    with pytest.raises(WireError, match=r"vmstate-chunk: payload of .* exceeds the limit of 4096"):
        encode_frame(VmstateChunk(1, bytes(limit)), max_payload=limit)


@pytest.mark.parametrize("bad", [0, -1, LENGTH_FIELD_LIMIT + 1, 1.5, True])
def test_max_payload_must_fit_the_length_field(bad: object) -> None:
    with pytest.raises(ValueError, match="max_payload must be an int"):
        check_max_payload(bad)  # type: ignore[arg-type]
