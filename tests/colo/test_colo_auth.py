"""The HMAC challenge-response handshake and key loading."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo.auth import (
    AUTH_MAX_PAYLOAD,
    Handshake,
    compute_proof,
    generate_key,
    load_key,
)
from colo.errors import AuthError, ColoError
from colo.messages import AuthChallenge, AuthProof, CheckpointReady, Heartbeat
from colo.wire import MAGIC, encode_frame

KEY = b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"fedcba9876543210fedcba9876543210"


def pair(key_p: bytes = KEY, key_s: bytes = KEY) -> tuple[Handshake, Handshake]:
    return Handshake(key_p, "primary", "secondary"), Handshake(key_s, "secondary", "primary")


def run(a: Handshake, b: Handshake) -> None:
    """Both flights of the handshake over an in-memory link."""
    challenge_a, challenge_b = a.start(), b.start()
    proof_a = a.receive_data(challenge_b)
    proof_b = b.receive_data(challenge_a)
    assert a.receive_data(proof_b) == b""
    assert b.receive_data(proof_a) == b""


def test_right_key_passes() -> None:
    a, b = pair()
    run(a, b)
    assert a.done and b.done
    assert a.unused_data == b"" and b.unused_data == b""


def test_bytes_after_the_proof_are_handed_over() -> None:
    a, b = pair()
    challenge_a, challenge_b = a.start(), b.start()
    proof_a = a.receive_data(challenge_b)
    proof_b = b.receive_data(challenge_a)
    a.receive_data(proof_b)
    early = encode_frame(Heartbeat())  # the peer pipelined protocol data behind its proof
    b.receive_data(proof_a + early)
    assert b.done and b.unused_data == early
    with pytest.raises(RuntimeError, match="feed further bytes to the protocol object"):
        b.receive_data(b"more")


@settings(database=None, deadline=None, max_examples=100)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_segmentation_completes(sizes: list[int]) -> None:
    a, b = pair()
    to_a, to_b = bytearray(b.start()), bytearray(a.start())
    i = 0
    while to_a or to_b:
        n = sizes[i % len(sizes)]
        i += 1
        if to_b:
            piece, to_b[:] = bytes(to_b[:n]), to_b[n:]
            to_a += b.receive_data(piece)
        if to_a:
            piece, to_a[:] = bytes(to_a[:n]), to_a[n:]
            to_b += a.receive_data(piece)
    assert a.done and b.done


def test_wrong_key_fails_on_both_sides() -> None:
    a, b = pair(KEY, OTHER_KEY)
    challenge_a, challenge_b = a.start(), b.start()
    proof_a = a.receive_data(challenge_b)
    proof_b = b.receive_data(challenge_a)
    with pytest.raises(AuthError, match="primary: authentication failed: auth-proof does not verify"):
        a.receive_data(proof_b)
    with pytest.raises(AuthError, match=r"secondary: .* does not verify: the peer does not have our key"):
        b.receive_data(proof_a)
    assert not a.done and not b.done
    with pytest.raises(AuthError, match="handshake already failed"):
        a.receive_data(b"")


def test_reflected_proof_fails() -> None:
    # An attacker without the key plays "secondary": it sends a challenge, gets our proof, and
    # echoes that proof back as its own.
    a = Handshake(KEY, "primary", "secondary")
    a.start()
    our_proof = a.receive_data(encode_frame(AuthChallenge("secondary", b"\x01" * 32)))
    with pytest.raises(AuthError, match="reflected proof"):
        a.receive_data(our_proof)


def test_proof_signed_with_the_wrong_role_fails() -> None:
    # Even with the right key, a proof made for the other role (e.g. our own, obtained from a
    # second connection) does not pass: the role is inside the MAC.
    a = Handshake(KEY, "primary", "secondary", nonce=b"\xaa" * 32)
    a.start()
    a.receive_data(encode_frame(AuthChallenge("secondary", b"\xbb" * 32)))
    as_primary = compute_proof(KEY, "primary", b"\xbb" * 32, b"\xaa" * 32)
    with pytest.raises(AuthError, match="does not verify"):
        a.receive_data(encode_frame(AuthProof(as_primary)))
    # ...while the proof for the right role passes.
    a = Handshake(KEY, "primary", "secondary", nonce=b"\xaa" * 32)
    a.start()
    a.receive_data(encode_frame(AuthChallenge("secondary", b"\xbb" * 32)))
    a.receive_data(encode_frame(AuthProof(compute_proof(KEY, "secondary", b"\xbb" * 32, b"\xaa" * 32))))
    assert a.done


def test_reflected_challenge_fails() -> None:
    a = Handshake(KEY, "primary", "secondary", nonce=b"\x07" * 32)
    own_challenge = a.start()
    with pytest.raises(AuthError, match="peer says it is 'primary', expected 'secondary'"):
        a.receive_data(own_challenge)
    a = Handshake(KEY, "primary", "secondary", nonce=b"\x07" * 32)
    a.start()
    with pytest.raises(AuthError, match="peer sent our own nonce back"):
        a.receive_data(encode_frame(AuthChallenge("secondary", b"\x07" * 32)))


def test_nonces_are_fresh() -> None:
    a1, a2 = Handshake(KEY, "primary", "secondary"), Handshake(KEY, "primary", "secondary")
    assert a1.start() != a2.start()


def test_a_close_after_our_proof_suggests_the_key() -> None:
    """A peer with another key rejects our proof by closing (it tells an impostor nothing): the error says what is
    likeliest; a close before our proof does not guess."""
    a, b = pair(KEY, OTHER_KEY)
    a.start()
    challenge_b = b.start()
    a.receive_data(challenge_b)  # our proof is out
    with pytest.raises(AuthError, match=r"closed during authentication: the peer closed after our proof "
                                        r"\(does it have our key\?\)"):
        a.receive_data(b"")
    early = Handshake(KEY, "primary", "secondary")
    early.start()
    with pytest.raises(AuthError) as e:
        early.receive_data(b"")
    assert "our proof" not in str(e.value)


def test_truncated_challenge_waits_then_fails_at_end_of_stream() -> None:
    a = Handshake(KEY, "primary", "secondary")
    a.start()
    challenge = Handshake(KEY, "secondary", "primary").start()
    assert a.receive_data(challenge[:20]) == b""  # partial frame: wait, no error
    with pytest.raises(AuthError, match=r"connection closed during authentication .*20 bytes buffered"):
        a.receive_data(b"")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad handshake frame: bad magic"),
        (struct.pack(">4sBI", MAGIC, 1, AUTH_MAX_PAYLOAD + 1), "exceeds the limit of 256 bytes"),
        (struct.pack(">4sBI", MAGIC, 1, 3) + b"\xc1\xc1\xc1", "undecodable msgpack"),
        (encode_frame(CheckpointReady(1)), "expected auth-challenge, got checkpoint-ready epoch 1"),
        (encode_frame(AuthProof(b"\x00" * 32)), "expected auth-challenge, got auth-proof"),
    ],
)
def test_garbage_challenge_fails(data: bytes, pattern: str) -> None:
    a = Handshake(KEY, "primary", "secondary")
    a.start()
    with pytest.raises(AuthError, match=pattern):
        a.receive_data(data)


def test_short_nonce_fails() -> None:
    import msgpack

    payload = msgpack.packb({"msg": "auth-challenge", "role": "secondary", "nonce": b"x" * 16,
                             "flags": 0})
    a = Handshake(KEY, "primary", "secondary")
    a.start()
    with pytest.raises(AuthError, match="'nonce' must be exactly 32 bytes, got 16 bytes"):
        a.receive_data(struct.pack(">4sBI", MAGIC, 1, len(payload)) + payload)


def test_second_challenge_instead_of_proof_fails() -> None:
    a = Handshake(KEY, "primary", "secondary")
    a.start()
    challenge = Handshake(KEY, "secondary", "primary").start()
    a.receive_data(challenge)
    with pytest.raises(AuthError, match="expected auth-proof, got auth-challenge"):
        a.receive_data(challenge)


def test_misuse_is_refused() -> None:
    with pytest.raises(AuthError, match="at least 16 are needed"):
        Handshake(b"short", "primary", "secondary")
    with pytest.raises(ValueError, match="must differ"):
        Handshake(KEY, "primary", "primary")
    a = Handshake(KEY, "primary", "secondary")
    with pytest.raises(RuntimeError, match="call start"):
        a.receive_data(b"x")
    with pytest.raises(RuntimeError, match="not complete"):
        _ = a.unused_data
    assert issubclass(AuthError, ColoError)


def test_generate_key() -> None:
    k1, k2 = generate_key(), generate_key()
    assert len(k1) == 64 and k1 != k2
    assert bytes.fromhex(k1.decode())  # hex text: safe in files and environment variables


def test_load_key_from_file_strips_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "colo.key"
    key = generate_key()
    path.write_bytes(b"  " + key + b"\n")
    assert load_key(path) == key
    assert load_key(str(path), environ={"COLO_KEY": "ignored-when-a-file-is-given"}) == key


def test_load_key_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"  tooshort \n")
    with pytest.raises(AuthError, match=r"short.key' is 8 bytes long; at least 16 are needed"):
        load_key(short)
    with pytest.raises(AuthError, match=r"cannot read key file .*missing.key"):
        load_key(tmp_path / "missing.key")


def test_load_key_from_environment() -> None:
    assert load_key(environ={"COLO_KEY": " 0123456789abcdef0123 \n"}) == b"0123456789abcdef0123"
    with pytest.raises(AuthError, match=r"\$COLO_KEY is 3 bytes long"):
        load_key(environ={"COLO_KEY": "abc"})
    with pytest.raises(AuthError, match="no key: pass a key file or set the COLO_KEY"):
        load_key(environ={})


def test_a_server_may_accept_several_peer_roles() -> None:
    server = Handshake(KEY, "gateway", ("primary", "control"))
    client = Handshake(KEY, "control", "gateway")
    a, b = server.start(), client.start()
    out_server = server.receive_data(b)
    out_client = client.receive_data(a)
    client.receive_data(out_server)
    server.receive_data(out_client)
    assert server.done and client.done and server.peer_role == "control"
    intruder = Handshake(KEY, "secondary", "gateway")
    other = Handshake(KEY, "gateway", ("primary", "control"))
    other.start()
    with pytest.raises(AuthError, match="peer says it is 'secondary', expected 'control' or 'primary'"):
        other.receive_data(intruder.start())
