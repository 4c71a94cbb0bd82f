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
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from colo.errors import ColoError, IntegrityError, WireError
from colo.messages import InitialChunk, Message, VmstateChunk
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
# From this frame size on, a received frame is read straight into a buffer of its own, and a state chunk's
# data is handed on as a view of it; a state chunk sent is sealed over its data in place (no copies).
LARGE_FRAME = 64 * 1024
Buffer = bytes | bytearray | memoryview
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
        self._big: bytearray | None = None  # a large frame being read into its own buffer
        self._big_fill = 0
        self._failed: ColoError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) + (self._big_fill if self._big is not None else 0)

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
        return b"".join(self.seal_parts([payload]))

    def encode_parts(self, msg: Message) -> list[Buffer]:
        """The sealed frame for `msg` as buffers to write in order: a large state chunk's data is one of
        them, not copied (keep it unchanged until the frame is written)."""
        data = getattr(msg, "data", None)
        if isinstance(msg, (VmstateChunk, InitialChunk)) and data is not None and len(data) >= LARGE_FRAME:
            return self.seal_parts([chunk_prefix(msg), data])
        return self.seal_parts([encode_payload(msg, max_payload=self.max_payload)])

    def seal_parts(self, payload: Sequence[Buffer]) -> list[Buffer]:
        """Seal a payload given as consecutive parts; returns the frame's buffers."""
        length = sum(len(p) for p in payload)
        if length > self.max_payload:
            raise WireError(f"payload of {length} bytes exceeds the limit of {self.max_payload} bytes")
        seq = self.frames_out + 1
        if seq > MAX_SEQ:
            raise WireError(f"{self.role}: session used up ({MAX_SEQ} frames): reconnect")
        head = SEALED_HEAD.pack(MAGIC, self._version, length, seq)
        header_aead, frame_aead = self._send.aeads(seq)
        nonce = self._send.nonce(seq)
        header = head + header_aead.encrypt(nonce, b"", head)
        out: list[Buffer]
        if length < _INCREMENTAL_FROM:  # one call: the fastest for small frames
            body = payload[0] if len(payload) == 1 else b"".join(payload)
            if self.encrypt:
                out = [header + frame_aead.encrypt(nonce, body, header)]
            else:
                frame = header + body
                out = [frame + frame_aead.encrypt(nonce, b"", frame)]
        else:  # the same GCM, fed piece by piece: no whole-frame temporaries to allocate and copy
            gcm = Cipher(algorithms.AES(self._send.frame_key), modes.GCM(nonce)).encryptor()
            gcm.authenticate_additional_data(header)
            out = [header]
            for part in payload:
                if self.encrypt:
                    out.append(gcm.update(part))
                else:
                    gcm.authenticate_additional_data(part)
                    out.append(part)
            gcm.finalize()
            out.append(gcm.tag)
        self.frames_out = seq
        return out

    # -- receiving --------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; a bad header at the head of the buffer is rejected now."""
        self._check_alive()
        if self._big is not None:  # the rest of a large frame first; what follows it waits in the buffer
            take = min(len(data), len(self._big) - self._big_fill)
            view = memoryview(data)
            self._big[self._big_fill:self._big_fill + take] = view[:take]
            self._big_fill += take
            self._buf += view[take:]
            return
        self._buf += data
        self._guard(self._parse_header)

    def read_target(self) -> memoryview | None:
        """Where the next bytes should be read to: the rest of a large frame whose header is in (read
        straight into its own buffer), or None: read as usual and `feed()` them."""
        if self._big is None or self._failed is not None:
            return None
        return memoryview(self._big)[self._big_fill:]

    def filled(self, n: int) -> None:
        """`n` bytes were read into `read_target()`."""
        self._check_alive()
        assert self._big is not None and 0 <= n <= len(self._big) - self._big_fill
        self._big_fill += n

    def next_message(self) -> Message | None:
        """The next verified message, or None until more bytes are fed."""
        self._check_alive()
        return self._guard(self._next)

    def _next(self) -> Message | None:
        self._parse_header()
        if self._big is not None:
            if self._big_fill < len(self._big):
                return None
            frame, self._big = self._big, None
            return self._open(frame, own=True)
        if self._length is None:
            return None
        end = SEALED_HEADER_SIZE + self._length + TAG_SIZE
        if len(self._buf) < end:
            return None
        msg = self._open(self._buf, own=False, end=end)
        del self._buf[:end]
        return msg

    def _open(self, buf: bytearray, *, own: bool, end: int | None = None) -> Message:
        """Verify and decode the frame at the start of `buf` (all of it when `own`: then the frame's
        buffer is ours to hand on, and a state chunk's data is a view of it)."""
        end = len(buf) if end is None else end
        body_end = end - TAG_SIZE
        seq = self.frames_in + 1
        _, frame_aead = self._receive.aeads(seq)
        nonce = self._receive.nonce(seq)
        with memoryview(buf) as view:
            try:
                if self.encrypt:
                    payload: bytes | memoryview = frame_aead.decrypt(
                        nonce, view[SEALED_HEADER_SIZE:end], view[:SEALED_HEADER_SIZE])
                    own = True  # a fresh plaintext
                else:
                    frame_aead.decrypt(nonce, view[body_end:end], view[:body_end])
                    payload = view[SEALED_HEADER_SIZE:body_end]
            except InvalidTag:
                raise self._integrity(f"frame {seq} from the {self.peer_role} fails its MAC: altered frame "
                                "(its header is intact: the body or the tag was changed)") from None
            # authentic; may still be malformed (a peer's bug)
            msg = (chunk_from_payload(payload) if own else None) or decode_payload(payload)
            del payload
        self._length = None
        self.frames_in = seq
        return msg

    def _parse_header(self) -> None:
        if self._length is not None or self._big is not None or len(self._buf) < HEADER_SIZE:
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
        total = SEALED_HEADER_SIZE + length + TAG_SIZE
        if total >= LARGE_FRAME:  # a frame of its own: the rest is read straight into it
            self._big = bytearray(total)
            take = min(total, len(self._buf))
            self._big[:take] = self._buf[:take]
            self._big_fill = take
            del self._buf[:take]

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


# -- state chunks without copies ---------------------------------------------------------------------------------
# A state chunk's payload is the msgpack map {"msg": name, ["epoch": e,] "data": bin}, built here as a prefix and
# the data, byte for byte what encode_payload makes, and read back the same way; anything that is not exactly
# that goes through the general decoder, which then accepts or refuses it as it would anyway.
_DATA_KEY: bytes = msgpack.packb("data")
_MSG_KEY: bytes = msgpack.packb("msg") + msgpack.packb(VmstateChunk.NAME)
_INITIAL_KEY: bytes = msgpack.packb("msg") + msgpack.packb(InitialChunk.NAME)
_EPOCH_KEY: bytes = msgpack.packb("epoch")
_UINTS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BINS = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def chunk_prefix(msg: VmstateChunk | InitialChunk) -> bytes:
    """The payload bytes before the data of a state chunk."""
    if isinstance(msg, VmstateChunk):
        epoch: bytes = msgpack.packb(msg.epoch)
        head = b"\x83" + _MSG_KEY + _EPOCH_KEY + epoch
    else:
        head = b"\x82" + _INITIAL_KEY
    return head + _DATA_KEY + _bin_header(len(msg.data))


def chunk_from_payload(payload: bytes | memoryview) -> Message | None:
    """A state chunk whose data is a view of `payload`, or None when the payload is anything else."""
    p = memoryview(payload)
    epoch: int | None = None
    if not p:
        return None
    if p[0] == 0x83 and p[1:1 + len(_MSG_KEY)] == _MSG_KEY:
        at = 1 + len(_MSG_KEY)
        if p[at:at + len(_EPOCH_KEY)] != _EPOCH_KEY:
            return None
        at += len(_EPOCH_KEY)
        if at >= len(p):
            return None
        tag = p[at]
        if tag < 0x80:
            epoch, at = tag, at + 1
        elif tag in _UINTS:
            w = _UINTS[tag]
            epoch, at = int.from_bytes(p[at + 1:at + 1 + w], "big"), at + 1 + w
        else:
            return None
    elif p[0] == 0x82 and p[1:1 + len(_INITIAL_KEY)] == _INITIAL_KEY:
        at = 1 + len(_INITIAL_KEY)
    else:
        return None
    if p[at:at + len(_DATA_KEY)] != _DATA_KEY:
        return None
    at += len(_DATA_KEY)
    if at >= len(p) or p[at] not in _BINS:
        return None
    w = _BINS[p[at]]
    n = int.from_bytes(p[at + 1:at + 1 + w], "big")
    at += 1 + w
    if at + n != len(p):
        return None
    data = p[at:]
    return InitialChunk(data) if epoch is None else VmstateChunk(epoch, data)
