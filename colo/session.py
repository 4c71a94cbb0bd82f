"""Sealed frames: every frame after the handshake is authenticated, and optionally encrypted.

Key schedule (both ends compute it alone; nothing secret travels):

    salt    = SHA-256(transcript)   transcript: both challenges (role, nonce, flags), sorted by role
    secret  = HKDF-SHA256(ikm = shared key, salt, info = LABEL 0 sender 0 receiver), 32 bytes,
              one per direction
    iv      = HKDF-Expand(secret, LABEL 0 "iv", 12)
    keys(j) = HKDF-Expand(secret, LABEL 0 "keys" || j as 8 bytes, 64) = header key | frame key,
              for the frames with sequence numbers in [j * REKEY_FRAMES, (j + 1) * REKEY_FRAMES)

The nonces make the keys differ per connection, the roles per direction: a frame moved to another
connection, or reflected back to its sender, is checked under the wrong key and fails. The flags
(encryption on or off) are in the transcript too, so the two modes never share a key.

Sealing (frame layout in colo.wire) uses AES-256-GCM with the nonce iv XOR seq: the header tag is
GCM's tag over the first 17 header bytes with the header key (GMAC: checked as soon as the header
is in, so a garbled length or sequence number is caught at once, not after waiting for a body that
never comes); the frame tag is GCM's tag under the frame key over the whole frame, with the body as
associated data (integrity only, the payload stays readable) or as plaintext (encrypted). The
sequence number is sent, and checked once its header tag verifies, so the error says whether a
frame was altered, replayed or dropped. The receiver verifies before msgpack sees a byte.

Why GCM and a fresh key every REKEY_FRAMES frames: see docs/decisions.md ("Wire security").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from colo.errors import ColoError, IntegrityError, WireError
from colo.messages import Message
from colo.wire import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    SEALED_HEAD,
    SEALED_HEADER_SIZE,
    TAG_SIZE,
    VERSION,
    VERSION_ENCRYPTED,
    VERSION_SEALED,
    check_max_payload,
    decode_payload,
    encode_payload,
)

LABEL = b"COLO-SESSION-1"  # domain separation for everything derived here
REKEY_FRAMES = 4096  # frames under one pair of keys (see the module docstring and docs/decisions.md)
# cryptography's AEADs take at most 2**31 - 1 bytes; integrity mode passes header + body as one
# associated-data buffer.
MAX_SESSION_PAYLOAD = 2**31 - 1 - SEALED_HEADER_SIZE
MAX_SEQ = 2**64 - 1
_IV_SIZE = 12
# From this payload size on, a frame is sealed incrementally: on this kind of machine the one-call
# AEAD's whole-frame temporaries cost more than its lower fixed cost (benchmarks/frame_cost.py).
_INCREMENTAL_FROM = 16 * 1024
_T = TypeVar("_T")
_KEY_SIZE = 32


def transcript(challenges: Iterable[tuple[str, bytes, int]]) -> bytes:
    """An unambiguous encoding of both handshake challenges (role, nonce, flags), sorted by role
    so that both ends build the same bytes (the roles of a connection always differ)."""
    out = bytearray(LABEL)
    for role, nonce, flags in sorted(challenges):
        name = role.encode("ascii")
        out += len(name).to_bytes(1, "big") + name + len(nonce).to_bytes(1, "big") + nonce
        out += flags.to_bytes(4, "big")
    return bytes(out)


def direction_secret(key: bytes, transcript_bytes: bytes, sender: str, receiver: str) -> bytes:
    """The 32-byte secret of the frames `sender` sends to `receiver` on this connection."""
    info = LABEL + b"\x00" + sender.encode("ascii") + b"\x00" + receiver.encode("ascii")
    salt = hashlib.sha256(transcript_bytes).digest()
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=salt, info=info).derive(key)


def _expand(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=LABEL + b"\x00" + info).derive(secret)


class _Direction:
    """The keys of one direction: the current pair of AEADs, re-derived every REKEY_FRAMES."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._iv = int.from_bytes(_expand(secret, b"iv", _IV_SIZE), "big")
        self._epoch = -1
        self._header_aead = self._frame_aead = AESGCM(bytes(_KEY_SIZE))  # replaced before use
        self.frame_key = b""  # the frame key itself, for the incremental GCM of large frames

    def nonce(self, seq: int) -> bytes:
        return (self._iv ^ seq).to_bytes(_IV_SIZE, "big")

    def aeads(self, seq: int) -> tuple[AESGCM, AESGCM]:
        epoch = seq // REKEY_FRAMES
        if epoch != self._epoch:
            keys = _expand(self._secret, b"keys" + epoch.to_bytes(8, "big"), 2 * _KEY_SIZE)
            self._header_aead, self._frame_aead = AESGCM(keys[:_KEY_SIZE]), AESGCM(keys[_KEY_SIZE:])
            self.frame_key = keys[_KEY_SIZE:]
            self._epoch = epoch
        return self._header_aead, self._frame_aead


class SessionCodec:
    """Seals the frames one end sends and opens the ones it receives, on one connection.

    `encode(msg)` gives one complete sealed frame. `feed(data)` then `next_message()` give the
    peer's messages in order, each verified before it is parsed; None means more bytes are
    needed. Receiving fails for good on the first bad frame (IntegrityError when a frame is not
    authentic, WireError when an authentic one is malformed): after that the stream cannot be
    trusted. Sending is independent, so the socket layer can still tell the peer why.
    Callers bound the buffer by draining `next_message()` after each `feed()`: it then never holds
    more than one frame (max_payload + 49 bytes) plus one read.
    """

    def __init__(self, *, send_secret: bytes, receive_secret: bytes, encrypt: bool,
                 role: str, peer_role: str, max_payload: int = MAX_PAYLOAD) -> None:
        check_max_payload(max_payload)
        if max_payload > MAX_SESSION_PAYLOAD:
            raise ValueError(f"max_payload must be at most {MAX_SESSION_PAYLOAD} on a session, "
                             f"got {max_payload}")
        self.max_payload = max_payload
        self.encrypt = encrypt
        self.role, self.peer_role = role, peer_role
        self._version = VERSION_ENCRYPTED if encrypt else VERSION_SEALED
        self._send = _Direction(send_secret)
        self._receive = _Direction(receive_secret)
        self.frames_out = 0  # frames sealed; the next one carries frames_out + 1
        self.frames_in = 0  # frames verified and returned; the next one must carry frames_in + 1
        self._buf = bytearray()
        self._length: int | None = None  # body length of the verified header at the buffer's head
        self._failed: ColoError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf)

    @property
    def error(self) -> ColoError | None:
        """Why receiving stopped, or None while it works."""
        return self._failed

    # -- sending ----------------------------------------------------------------------------------

    def encode(self, msg: Message) -> bytes:
        """The sealed frame for `msg`. An oversized message is refused without using a number."""
        return self.seal(encode_payload(msg, max_payload=self.max_payload))

    def seal(self, payload: bytes) -> bytes:
        """The sealed frame for any payload bytes (`encode` is this for a message's payload; tests
        and fuzzers use it to put malformed payloads behind a valid MAC)."""
        if len(payload) > self.max_payload:
            raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {self.max_payload} bytes")
        seq = self.frames_out + 1
        if seq > MAX_SEQ:
            raise WireError(f"{self.role}: session used up ({MAX_SEQ} frames): reconnect")
        head = SEALED_HEAD.pack(MAGIC, self._version, len(payload), seq)
        header_aead, frame_aead = self._send.aeads(seq)
        nonce = self._send.nonce(seq)
        header = head + header_aead.encrypt(nonce, b"", head)
        if len(payload) < _INCREMENTAL_FROM:  # one call: the fastest for small frames
            if self.encrypt:
                frame = header + frame_aead.encrypt(nonce, payload, header)
            else:
                frame = header + payload
                frame += frame_aead.encrypt(nonce, b"", frame)
        else:  # the same GCM, fed piece by piece: no whole-frame temporaries to allocate and copy
            gcm = Cipher(algorithms.AES(self._send.frame_key), modes.GCM(nonce)).encryptor()
            gcm.authenticate_additional_data(header)
            if self.encrypt:
                body = gcm.update(payload)
            else:
                gcm.authenticate_additional_data(payload)
                body = payload
            gcm.finalize()
            frame = b"".join((header, body, gcm.tag))
        self.frames_out = seq
        return frame

    # -- receiving --------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; a bad header at the head of the buffer is rejected now."""
        self._check_alive()
        self._buf += data
        self._guard(self._parse_header)

    def next_message(self) -> Message | None:
        """The next verified message, or None until more bytes are fed."""
        self._check_alive()
        return self._guard(self._next)

    def _next(self) -> Message | None:
        self._parse_header()
        if self._length is None:
            return None
        body_end = SEALED_HEADER_SIZE + self._length
        end = body_end + TAG_SIZE
        if len(self._buf) < end:
            return None
        seq = self.frames_in + 1
        _, frame_aead = self._receive.aeads(seq)
        nonce = self._receive.nonce(seq)
        with memoryview(self._buf) as view:
            try:
                if self.encrypt:
                    payload: bytes | memoryview = frame_aead.decrypt(
                        nonce, view[SEALED_HEADER_SIZE:end], view[:SEALED_HEADER_SIZE])
                else:
                    frame_aead.decrypt(nonce, view[body_end:end], view[:body_end])
                    payload = view[SEALED_HEADER_SIZE:body_end]
            except InvalidTag:
                raise self._integrity(f"frame {seq} from the {self.peer_role} fails its MAC: altered frame "
                                "(its header is intact: the body or the tag was changed)") from None
            msg = decode_payload(payload)  # authentic; may still be malformed (a peer's bug)
            del payload
        del self._buf[:end]
        self._length = None
        self.frames_in = seq
        return msg

    def _parse_header(self) -> None:
        if self._length is not None or len(self._buf) < HEADER_SIZE:
            return
        seq = self.frames_in + 1
        if self._buf[:4] != MAGIC:
            raise self._integrity(f"frame {seq} from the {self.peer_role} has a bad magic "
                            f"{bytes(self._buf[:4])!r}: garbled or injected bytes")
        version = self._buf[4]
        if version != self._version:
            if version == VERSION:
                why = "a plain, unauthenticated frame where a sealed one must come"
            elif version in (VERSION_SEALED, VERSION_ENCRYPTED):
                why = "the other sealing mode than this session's: an altered header"
            else:
                why = "an unknown frame format: an altered header"
            raise self._integrity(f"frame {seq} from the {self.peer_role} has version {version}, "
                            f"expected {self._version}: {why}")
        if len(self._buf) < SEALED_HEADER_SIZE:
            return
        head = bytes(self._buf[:SEALED_HEAD.size])
        _, _, length, sent_seq = SEALED_HEAD.unpack(head)
        # Check the tag under the sequence number the frame claims, then the number itself: a
        # genuine frame out of place then gets named as a replay or a gap, not as "altered".
        header_aead, _ = self._receive.aeads(sent_seq)
        try:
            header_aead.decrypt(self._receive.nonce(sent_seq),
                                bytes(self._buf[SEALED_HEAD.size:SEALED_HEADER_SIZE]), head)
        except InvalidTag:
            raise self._integrity(f"frame {seq} from the {self.peer_role} fails its MAC: altered, reordered, "
                            "replayed or dropped frame, or one from another connection") from None
        if sent_seq < seq:
            raise self._integrity(f"frame {seq} from the {self.peer_role} is a replay: it carries sequence "
                            f"number {sent_seq} (a replayed or reordered frame)")
        if sent_seq > seq:
            raise self._integrity(f"frame {seq} from the {self.peer_role} is missing: the next frame carries "
                            f"sequence number {sent_seq} (a dropped or reordered frame)")
        if length > self.max_payload:
            raise WireError(f"frame {seq} from the {self.peer_role}: payload of {length} bytes exceeds "
                            f"the limit of {self.max_payload} bytes")
        self._length = length

    def _integrity(self, text: str) -> IntegrityError:
        return IntegrityError(f"{self.role}: {text}")

    def _guard(self, step: Callable[[], _T]) -> _T:
        """Run `step`; any error stops receiving for good before it propagates."""
        try:
            return step()
        except ColoError as exc:
            self._failed = exc
            raise

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise type(self._failed)(f"{self.role}: receiving stopped after an earlier error: "
                                     f"{self._failed}")
