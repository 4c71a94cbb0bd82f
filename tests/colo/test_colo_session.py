"""Sealed frames after the handshake: keys per connection and direction, every frame verified before
it is parsed, and every kind of tampering named (altered, replayed, dropped, reordered, moved to
another connection, reflected, downgraded)."""

from __future__ import annotations

import hashlib
import hmac

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import colo.session
from colo.auth import Handshake, compute_proof
from colo.errors import AuthError, IntegrityError, WireError
from colo.messages import CheckpointReady, ErrorMessage, Heartbeat, InitialChunk, Message, VmstateChunk, VmstateSize
from colo.session import LABEL, SessionCodec, direction_secret, transcript
from colo.wire import HEADER_SIZE, SEALED_HEADER_SIZE, SEALED_OVERHEAD, frame_size

KEY = b"0123456789abcdef0123456789abcdef"


def handshake_pair(*, encrypt: bool = False, key_s: bytes = KEY) -> tuple[Handshake, Handshake]:
    a = Handshake(KEY, "primary", "secondary", encrypt=encrypt)
    b = Handshake(key_s, "secondary", "primary", encrypt=encrypt)
    ca, cb = a.start(), b.start()
    pa, pb = a.receive_data(cb), b.receive_data(ca)
    a.receive_data(pb)
    b.receive_data(pa)
    return a, b


def codecs(*, encrypt: bool = False, **options: int) -> tuple[SessionCodec, SessionCodec]:
    a, b = handshake_pair(encrypt=encrypt)
    return a.session(**options), b.session(**options)  # type: ignore[arg-type]


def receive_all(codec: SessionCodec, data: bytes) -> list[Message]:
    codec.feed(data)
    out = []
    while (msg := codec.next_message()) is not None:
        out.append(msg)
    return out


MODES = pytest.mark.parametrize("encrypt", [False, True], ids=["integrity", "encrypted"])
MESSAGES = [CheckpointReady(1), VmstateChunk(1, b"page data " * 50), Heartbeat(), VmstateSize(1, 500)]


@MODES
def test_round_trip_both_ways(encrypt: bool) -> None:
    p, s = codecs(encrypt=encrypt)
    stream = b"".join(p.encode(m) for m in MESSAGES)
    assert receive_all(s, stream) == MESSAGES
    assert (p.frames_out, s.frames_in, s.buffered) == (4, 4, 0)
    assert receive_all(p, s.encode(Heartbeat())) == [Heartbeat()]


@settings(database=None, deadline=None, max_examples=60)
@given(cuts=st.lists(st.integers(0, 2000), max_size=12), encrypt=st.booleans())
def test_any_split_of_the_stream_decodes_the_same(cuts: list[int], encrypt: bool) -> None:
    p, s = codecs(encrypt=encrypt)
    stream = b"".join(p.encode(m) for m in MESSAGES)
    got: list[Message] = []
    last = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        got += receive_all(s, stream[last:cut])
        assert s.buffered <= SEALED_OVERHEAD + 600 + (cut - last)  # at most one frame plus one read
        last = cut
    assert got == MESSAGES


@MODES
def test_the_frame_layout(encrypt: bool) -> None:
    p, _ = codecs(encrypt=encrypt)
    msg = VmstateChunk(3, b"secret page contents")
    frame = p.encode(msg)
    assert frame[:4] == b"COLO" and frame[4] == (3 if encrypt else 2)
    n = int.from_bytes(frame[5:9], "big")
    assert int.from_bytes(frame[9:17], "big") == 1  # the first frame of its direction
    assert len(frame) == SEALED_OVERHEAD + n == frame_size(frame[:HEADER_SIZE])
    body = frame[SEALED_HEADER_SIZE:SEALED_HEADER_SIZE + n]
    assert (b"secret page contents" in frame) is not encrypt
    if not encrypt:
        assert msgpack.unpackb(body) == {"msg": "vmstate-chunk", "epoch": 3, "data": b"secret page contents"}


def fixed_codecs(*, encrypt: bool = False) -> tuple[SessionCodec, SessionCodec]:
    """Codecs from a handshake with fixed nonces: each call gives the same keys, so a fresh receiver
    can check frames from an earlier sender."""
    a = Handshake(KEY, "primary", "secondary", encrypt=encrypt, nonce=b"\x01" * 32)
    b = Handshake(KEY, "secondary", "primary", encrypt=encrypt, nonce=b"\x02" * 32)
    ca, cb = a.start(), b.start()
    pa, pb = a.receive_data(cb), b.receive_data(ca)
    a.receive_data(pb)
    b.receive_data(pa)
    return a.session(), b.session()


@MODES
def test_every_altered_bit_pattern_of_every_byte_is_refused(encrypt: bool) -> None:
    p, _ = fixed_codecs(encrypt=encrypt)
    stream = p.encode(Heartbeat()) + p.encode(VmstateChunk(1, b"abc"))
    for i in range(len(stream)):
        for flip in (0x01, 0x80, 0xFF):
            _, s = fixed_codecs(encrypt=encrypt)
            bad = bytearray(stream)
            bad[i] ^= flip
            with pytest.raises(IntegrityError):
                receive_all(s, bytes(bad))


def test_an_altered_body_names_the_frame_and_the_peer() -> None:
    p, s = codecs()
    receive_all(s, p.encode(Heartbeat()))
    bad = bytearray(p.encode(VmstateChunk(1, b"the real page")))
    bad[-20] ^= 0x01
    with pytest.raises(IntegrityError, match=r"^secondary: frame 2 from the primary fails its MAC: altered"):
        receive_all(s, bytes(bad))


def test_a_garbled_header_is_caught_before_its_body_arrives() -> None:
    p, s = codecs()
    frame = bytearray(p.encode(VmstateChunk(1, bytes(1000))))
    frame[6] ^= 0x40  # the length now says about 4 MiB more: never wait for it
    with pytest.raises(IntegrityError, match="frame 1 from the primary fails its MAC"):
        s.feed(bytes(frame[:SEALED_HEADER_SIZE]))


@MODES
def test_replayed_dropped_and_reordered_frames_are_named(encrypt: bool) -> None:
    p, s = codecs(encrypt=encrypt)
    f1, f2, f3 = (p.encode(VmstateChunk(1, bytes([i]) * 10)) for i in range(3))
    receive_all(s, f1 + f2)
    with pytest.raises(IntegrityError, match="frame 3 from the primary is a replay: it carries sequence number 2"):
        receive_all(s, f2)
    p, s = codecs(encrypt=encrypt)
    f1, f2, f3 = (p.encode(Heartbeat()) for _ in range(3))
    with pytest.raises(IntegrityError, match=r"frame 2 from the primary is missing: the next frame carries "
                                             r"sequence number 3 .a dropped or reordered frame"):
        receive_all(s, f1 + f3)
    p, s = codecs(encrypt=encrypt)
    f1, f2 = p.encode(Heartbeat()), p.encode(Heartbeat())
    with pytest.raises(IntegrityError, match=r"frame 1 .* is missing"):
        receive_all(s, f2 + f1)


@MODES
def test_a_frame_reflected_to_its_sender_is_refused(encrypt: bool) -> None:
    p, _ = codecs(encrypt=encrypt)
    with pytest.raises(IntegrityError, match="primary: frame 1 from the secondary fails its MAC"):
        receive_all(p, p.encode(Heartbeat()))


@MODES
def test_a_frame_from_another_connection_is_refused(encrypt: bool) -> None:
    p1, _ = codecs(encrypt=encrypt)
    _, s2 = codecs(encrypt=encrypt)
    with pytest.raises(IntegrityError, match=r"fails its MAC: .*another connection"):
        receive_all(s2, p1.encode(Heartbeat()))


def test_a_plain_frame_on_a_session_is_refused() -> None:
    from colo.wire import encode_frame

    _, s = codecs()
    with pytest.raises(IntegrityError, match="version 1, expected 2: a plain, unauthenticated frame"):
        s.feed(encode_frame(ErrorMessage("let me in")))


def test_the_modes_do_not_mix() -> None:
    p, _ = codecs(encrypt=True)
    _, s = codecs(encrypt=False)
    with pytest.raises(IntegrityError, match="version 3, expected 2: the other sealing mode"):
        s.feed(p.encode(Heartbeat()))


def test_receiving_stays_failed_but_sending_goes_on() -> None:
    p, s = codecs()
    with pytest.raises(IntegrityError, match="bad magic"):
        s.feed(b"JUNK" * 10)
    assert isinstance(s.error, IntegrityError)
    for call in (lambda: s.feed(p.encode(Heartbeat())), s.next_message):
        with pytest.raises(IntegrityError, match=r"receiving stopped after an earlier error: .*bad magic"):
            call()
    assert receive_all(p, s.encode(ErrorMessage("bad frame from you"))) == [ErrorMessage("bad frame from you")]


def test_an_authentic_header_over_the_bound_is_refused_from_the_header() -> None:
    a, b = handshake_pair()
    p, s = a.session(max_payload=5000), b.session(max_payload=1000)
    frame = p.encode(VmstateChunk(1, bytes(2000)))
    with pytest.raises(WireError, match=r"frame 1 from the primary: payload of 20.. bytes exceeds the limit of 1000") \
            as info:
        s.feed(frame[:SEALED_HEADER_SIZE])
    assert not isinstance(info.value, IntegrityError)  # authentic, just too large: not an attack


def test_a_malformed_payload_behind_a_valid_mac_is_a_wire_error() -> None:
    p, s = codecs()
    with pytest.raises(WireError, match="unknown message name 'format-disk'"):
        receive_all(s, p.seal(msgpack.packb({"msg": "format-disk"})))


def test_oversized_messages_are_refused_without_using_a_sequence_number() -> None:
    p, s = codecs(max_payload=100)
    with pytest.raises(WireError, match="exceeds the limit of 100 bytes"):
        p.encode(VmstateChunk(1, bytes(200)))
    assert p.frames_out == 0
    assert receive_all(s, p.encode(Heartbeat())) == [Heartbeat()]


@MODES
def test_keys_change_every_rekey_interval(encrypt: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(colo.session, "REKEY_FRAMES", 4)
    p, s = codecs(encrypt=encrypt)
    msgs = [VmstateChunk(1, bytes([i]) * 8) for i in range(19)]
    assert receive_all(s, b"".join(p.encode(m) for m in msgs)) == msgs
    direction = p._send
    assert direction.aeads(4)[0] is not direction.aeads(8)[0]


def test_the_key_schedule_is_rfc_5869_hkdf() -> None:
    # An independent HKDF-SHA256 (RFC 5869, section 2) from the standard library's hmac.
    t = transcript([("secondary", b"\x02" * 32, 1), ("primary", b"\x01" * 32, 1)])
    assert t == transcript([("primary", b"\x01" * 32, 1), ("secondary", b"\x02" * 32, 1)])  # order-free
    salt = hashlib.sha256(t).digest()
    prk = hmac.new(salt, KEY, hashlib.sha256).digest()
    info = LABEL + b"\x00primary\x00secondary"
    okm = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    assert direction_secret(KEY, t, "primary", "secondary") == okm
    assert direction_secret(KEY, t, "secondary", "primary") != okm


def test_keys_depend_on_everything_in_the_transcript() -> None:
    base = [("primary", b"\x01" * 32, 0), ("secondary", b"\x02" * 32, 0)]
    variants = [
        base,
        [("primary", b"\x03" * 32, 0), base[1]],  # another nonce: another connection
        [("primary", b"\x01" * 32, 1), ("secondary", b"\x02" * 32, 1)],  # encryption on
        [("control", b"\x01" * 32, 0), base[1]],  # other roles
    ]
    secrets_ = {direction_secret(KEY, transcript(v), v[0][0], v[1][0]) for v in variants}
    assert len(secrets_) == len(variants)


# -- the handshake side: negotiation, downgrade, one codec per connection -------------------------------------


def test_session_needs_a_completed_handshake_and_is_taken_once() -> None:
    a = Handshake(KEY, "primary", "secondary")
    with pytest.raises(RuntimeError, match="handshake not complete"):
        a.session()
    a, _ = handshake_pair()
    with pytest.raises(ValueError, match="negotiated encrypt=False"):
        a.session(encrypt=True)
    a.session(encrypt=False)
    with pytest.raises(RuntimeError, match="called twice"):
        a.session()


def test_frames_pipelined_behind_the_proof_reach_the_session() -> None:
    for bad in (False, True):
        a = Handshake(KEY, "primary", "secondary")
        b = Handshake(KEY, "secondary", "primary")
        ca, cb = a.start(), b.start()
        pa, pb = a.receive_data(cb), b.receive_data(ca)
        a.receive_data(pb)
        early = a.session().encode(CheckpointReady(1))
        if bad:
            early = early[:-1] + bytes([early[-1] ^ 1])
        b.receive_data(pa + early)
        s = b.session()
        if bad:
            with pytest.raises(IntegrityError, match="fails its MAC"):
                s.next_message()
        else:
            assert s.next_message() == CheckpointReady(1)


@pytest.mark.parametrize("primary_encrypts", [True, False])
def test_a_mismatch_fails_both_sides_with_a_clear_error(primary_encrypts: bool) -> None:
    a = Handshake(KEY, "primary", "secondary", encrypt=primary_encrypts)
    b = Handshake(KEY, "secondary", "primary", encrypt=not primary_encrypts)
    ca, cb = a.start(), b.start()
    texts = {}
    for side, challenge in ((a, cb), (b, ca)):
        with pytest.raises(AuthError) as info:
            side.receive_data(challenge)
        texts[side.role] = str(info.value)
    wants, lacks = ("secondary", "primary") if primary_encrypts else ("primary", "secondary")
    assert texts[wants].endswith("the peer wants encryption, we do not: start both with --encrypt or neither")
    assert texts[lacks].endswith(
        "the peer does not want encryption, we do: start both with --encrypt or neither")


def _with_flags(challenge: bytes, flags: int) -> bytes:
    payload = msgpack.unpackb(challenge[HEADER_SIZE:])
    payload["flags"] = flags
    packed: bytes = msgpack.packb(payload)
    return challenge[:5] + len(packed).to_bytes(4, "big") + packed


def test_a_man_in_the_middle_cannot_turn_encryption_off() -> None:
    # Both want encryption; the attacker rewrites both challenges to "no encryption".
    a = Handshake(KEY, "primary", "secondary", encrypt=True)
    b = Handshake(KEY, "secondary", "primary", encrypt=True)
    ca, cb = a.start(), b.start()
    for side, challenge in ((a, cb), (b, ca)):
        with pytest.raises(AuthError, match="the peer does not want encryption, we do"):
            side.receive_data(_with_flags(challenge, 0))


def test_the_proofs_cover_the_flags() -> None:
    n1, n2 = b"\x01" * 32, b"\x02" * 32
    proofs = {compute_proof(KEY, "primary", n1, n2, f1, f2) for f1 in (0, 1) for f2 in (0, 1)}
    assert len(proofs) == 4


@MODES
def test_a_session_across_a_real_handshake_and_back(encrypt: bool) -> None:
    p, s = codecs(encrypt=encrypt)
    for i in range(10):
        assert receive_all(s, p.encode(VmstateChunk(1, bytes([i]) * 100))) == [VmstateChunk(1, bytes([i]) * 100)]
        assert receive_all(p, s.encode(Heartbeat())) == [Heartbeat()]
    assert (p.frames_out, p.frames_in, s.frames_out, s.frames_in) == (10, 10, 10, 10)


@MODES
def test_large_frames_are_sealed_the_same_incrementally(encrypt: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large payloads go through GCM piece by piece (no whole-frame temporaries); the bytes must be
    # exactly those of the one-call AEAD.
    sizes = [0, 1, 100, 16 * 1024 - 30, 16 * 1024, 70_000]
    frames = {}
    for threshold in (0, 2**40):
        monkeypatch.setattr(colo.session, "_INCREMENTAL_FROM", threshold)
        p, s = fixed_codecs(encrypt=encrypt)
        frames[threshold] = [p.encode(VmstateChunk(1, bytes([n % 251]) * n)) for n in sizes]
        assert receive_all(s, b"".join(frames[threshold])) == [VmstateChunk(1, bytes([n % 251]) * n) for n in sizes]
    assert frames[0] == frames[2**40]


# -- large state chunks without copies ---------------------------------------------------------------------------
CHUNK_SIZES = [0, 1, 255, 256, 65_535, 65_536, 200_000]


@MODES
def test_chunks_sealed_in_parts_are_the_same_frames(encrypt: bool) -> None:
    # encode_parts seals a large chunk over its data where it lies; the bytes are exactly encode()'s.
    msgs: list[Message] = [VmstateChunk(e, bytes([n % 251]) * n) for e in (0, 7, 300, 2**40) for n in CHUNK_SIZES]
    msgs += [InitialChunk(bytes([n % 13]) * n) for n in CHUNK_SIZES]
    a, _ = fixed_codecs(encrypt=encrypt)
    b, _ = fixed_codecs(encrypt=encrypt)
    for msg in msgs:
        assert b"".join(a.encode_parts(msg)) == b.encode(msg)
    view = memoryview(bytearray(b"x" * 100_000))
    assert b"".join(a.encode_parts(VmstateChunk(3, view))) == b.encode(VmstateChunk(3, bytes(view)))


@MODES
def test_large_frames_read_into_their_own_buffer(encrypt: bool) -> None:
    # A reader that follows read_target() gets the same messages as one that feeds everything; a large chunk's
    # data is then a view of the frame's own buffer (no copy), and stays valid as more frames come.
    msgs: list[Message] = [Heartbeat(), VmstateChunk(1, b"a" * 200_000), VmstateSize(1, 5),
                           VmstateChunk(1, b"b" * 70_000), VmstateChunk(1, b"c" * 10), Heartbeat()]
    p, s = codecs(encrypt=encrypt)
    stream = b"".join(p.encode(m) for m in msgs)
    got: list[Message] = []
    at = 0
    while at < len(stream):
        target = s.read_target()
        if target is not None:
            n = min(len(target), 5000, len(stream) - at)
            target[:n] = stream[at:at + n]
            s.filled(n)
        else:
            n = min(3000, len(stream) - at)
            s.feed(stream[at:at + n])
        at += n
        while (msg := s.next_message()) is not None:
            got.append(msg)
    assert got == msgs
    assert isinstance(got[1], VmstateChunk) and isinstance(got[1].data, memoryview)
    assert s.buffered == 0


def test_only_an_exact_chunk_payload_takes_the_fast_path() -> None:
    # chunk_from_payload reads only what decode_payload would make into the same message; anything else is left
    # to decode_payload, which refuses it as before.
    good = msgpack.packb({"msg": "vmstate-chunk", "epoch": 9, "data": b"xyz"}, use_bin_type=True)
    assert colo.session.chunk_from_payload(good) == VmstateChunk(9, b"xyz")
    for bad in (good + b"\x00", good[:-1], good.replace(b"vmstate-chunk", b"vmstate-chunX"),
                msgpack.packb({"msg": "vmstate-chunk", "epoch": -1, "data": b"xyz"}),
                msgpack.packb({"msg": "vmstate-chunk", "data": b"xyz", "epoch": 9}),
                msgpack.packb({"msg": "vmstate-chunk", "epoch": 9, "data": "xyz"}), b""):
        assert colo.session.chunk_from_payload(bad) is None
