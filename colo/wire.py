"""Framing: how a message becomes bytes on a stream, and back.

A plain frame (version 1, the handshake's) is a fixed 9-byte header followed by a msgpack payload:

    offset 0  4 bytes  magic b"COLO"
    offset 4  1 byte   format version (1)
    offset 5  4 bytes  payload length, big-endian
    offset 9  ...      payload: a msgpack map {"msg": <message name>, <field>: <value>, ...}

The length is checked against a per-connection bound as soon as the header is in, before the
payload is waited for or allocated, so a hostile peer cannot make us reserve 4 GiB by sending
nine bytes. Every failure raises `WireError`, and a decoder that failed stays failed: after a bad
frame the stream position is meaningless, so the only safe move is to drop the connection.

Every frame after the handshake is sealed (version 2: authenticated; 3: also encrypted): the same
first 9 bytes, then a sequence number, a tag over the header, the body and a tag over the whole
frame. The layout is defined here, so that tools which only need frame boundaries (`frame_size`)
do not depend on the keys; the sealing itself is `colo.session`.

    offset 0   4 bytes  magic b"COLO"
    offset 4   1 byte   2 (sealed) or 3 (sealed and encrypted)
    offset 5   4 bytes  body length n, big-endian
    offset 9   8 bytes  sequence number of the frame in its direction, from 1
    offset 17  16 bytes header tag
    offset 33  n bytes  body: the msgpack payload, or its ciphertext
    offset 33+n 16 bytes frame tag
"""

from __future__ import annotations

import struct

import msgpack

from colo.errors import WireError
from colo.messages import Message, from_fields, to_fields

MAGIC = b"COLO"
VERSION = 1  # a plain frame: only the handshake travels in these
VERSION_SEALED = 2  # authenticated (colo.session)
VERSION_ENCRYPTED = 3  # authenticated and encrypted (colo.session)
_HEADER = struct.Struct(">4sBI")
HEADER_SIZE = _HEADER.size
SEALED_HEAD = struct.Struct(">4sBIQ")  # magic, version, length, sequence number: what the header tag covers
TAG_SIZE = 16
SEALED_HEADER_SIZE = SEALED_HEAD.size + TAG_SIZE  # 33: everything before the body
SEALED_OVERHEAD = SEALED_HEADER_SIZE + TAG_SIZE  # 49: a sealed frame's bytes around its body
MAX_PAYLOAD = 64 * 1024 * 1024  # default bound on one frame's payload; configurable per connection
LENGTH_FIELD_LIMIT = 0xFFFF_FFFF  # the most a 4-byte length can say
NAME_KEY = "msg"  # the payload key that holds the message name

# Bytes a vmstate-chunk frame's payload spends around its data (map header, keys, the epoch, the
# bin header), with a margin: a chunk of max_payload - CHUNK_OVERHEAD data bytes always fits.
CHUNK_OVERHEAD = 64
DEFAULT_CHUNK_SIZE = 1024 * 1024  # a sensible slice of the state per vmstate-chunk


def check_max_payload(max_payload: int) -> int:
    """Validate a configured payload bound (it must fit the 4-byte length field)."""
    if type(max_payload) is not int or not 1 <= max_payload <= LENGTH_FIELD_LIMIT:
        raise ValueError(f"max_payload must be an int in 1..{LENGTH_FIELD_LIMIT}, got {max_payload!r}")
    return max_payload


def encode_payload(msg: Message, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """The msgpack payload for `msg`. Refuses one the peer's decoder would reject."""
    payload: bytes = msgpack.packb({NAME_KEY: msg.NAME, **to_fields(msg)}, use_bin_type=True)
    if len(payload) > max_payload:
        raise WireError(
            f"{msg.NAME}: payload of {len(payload)} bytes exceeds the limit of {max_payload} bytes"
        )
    return payload


def encode_frame(msg: Message, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """The complete plain frame for `msg` (the handshake's; later frames are sealed)."""
    payload = encode_payload(msg, max_payload=max_payload)
    return _HEADER.pack(MAGIC, VERSION, len(payload)) + payload


def frame_size(head: bytes | bytearray | memoryview) -> int:
    """The whole size of the frame whose first HEADER_SIZE (or more) bytes are `head`, plain or
    sealed, from its header alone: for tools that cut a stream into frames without the keys."""
    magic, version, length = _HEADER.unpack(bytes(head[:HEADER_SIZE]))
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: expected {MAGIC!r} (not a colo peer, or out of sync)")
    if version == VERSION:
        return HEADER_SIZE + int(length)
    if version in (VERSION_SEALED, VERSION_ENCRYPTED):
        return SEALED_OVERHEAD + int(length)
    raise WireError(f"unsupported frame format version {version}")


def parse_header(header: bytes | bytearray, *, max_payload: int = MAX_PAYLOAD) -> int:
    """Check a 9-byte header and return the payload length it announces."""
    magic, version, length = _HEADER.unpack(bytes(header[:HEADER_SIZE]))
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: expected {MAGIC!r} (not a colo peer, or out of sync)")
    if version != VERSION:
        raise WireError(f"unsupported frame format version {version}: expected {VERSION}")
    if length > max_payload:
        raise WireError(f"frame payload of {length} bytes exceeds the limit of {max_payload} bytes")
    return int(length)


def decode_payload(payload: bytes | bytearray | memoryview) -> Message:
    """The message in one frame payload."""
    try:
        # strict_map_key: only str/bytes keys. msgpack bounds every length by the buffer size.
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage; all mean the same here
        raise WireError(f"undecodable msgpack payload ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise WireError(f"payload must be a msgpack map, got {type(obj).__name__}")
    if NAME_KEY not in obj:
        raise WireError(f"payload has no {NAME_KEY!r} key naming the message")
    name = obj.pop(NAME_KEY)
    return from_fields(name, obj)


def decode_frame(frame: bytes, *, max_payload: int = MAX_PAYLOAD) -> Message:
    """The message in exactly one complete frame (convenient for tests and tools)."""
    if len(frame) < HEADER_SIZE:
        raise WireError(f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    length = parse_header(frame, max_payload=max_payload)
    if len(frame) != HEADER_SIZE + length:
        raise WireError(f"frame is {len(frame)} bytes, header says {HEADER_SIZE + length}")
    return decode_payload(frame[HEADER_SIZE:])


class FrameDecoder:
    """Streaming decoder: feed bytes as they arrive, take complete messages out.

    A partial frame is buffered, not an error. The decoder keeps only the bytes it was fed and
    has not yet turned into messages; the caller bounds that by draining `next_message()` after
    each `feed()` (then the buffer never exceeds one frame plus one read).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = check_max_payload(max_payload)
        self._buf = bytearray()
        self._length: int | None = None  # payload length of the frame at the buffer's head
        self._failed: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages (a partial frame, at the end)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._check_alive()
        self._buf += data
        self._parse_header()  # reject a bad header now, without waiting for its payload

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        self._check_alive()
        self._parse_header()
        if self._length is None:
            return None
        end = HEADER_SIZE + self._length
        if len(self._buf) < end:
            return None
        payload = self._buf[HEADER_SIZE:end]
        del self._buf[:end]
        self._length = None
        try:
            return decode_payload(payload)
        except WireError as exc:
            self._failed = exc
            raise

    def take_unused(self) -> bytes:
        """Hand over every buffered byte and empty the decoder (after a handshake, the bytes
        beyond its last frame belong to the next layer)."""
        self._check_alive()
        data = bytes(self._buf)
        self._buf.clear()
        self._length = None
        return data

    def _parse_header(self) -> None:
        if self._length is None and len(self._buf) >= HEADER_SIZE:
            try:
                self._length = parse_header(self._buf, max_payload=self.max_payload)
            except WireError as exc:
                self._failed = exc
                raise

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise WireError(f"decoder stopped after an earlier error: {self._failed}")
