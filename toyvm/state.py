"""The VM state format: a versioned msgpack map, and its file framing (magic, version, CRC-32, length).

RAM is carried as the indices of its non-zero pages plus those pages, lz4-compressed as one block; the same
page codec serves checkpoints of dirty pages.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import numpy as np
import numpy.typing as npt

from .contract import PAGE_SIZE
from .errors import StateError
from .ram import GuestRAM

FORMAT = "toyvm-state"
VERSION = 1
FILE_MAGIC = b"TOYVMST\0"
_HEADER = struct.Struct("<8sIIQ")
MAX_STATE_BYTES = 8 << 30


def encode_pages(ram: GuestRAM, pages: npt.NDArray[np.int64]) -> dict[str, Any]:
    """Pages (by index) of guest RAM -> {'pages': u32 indices, 'data': lz4 block of the pages}."""
    idx = np.asarray(pages, dtype=np.uint32)
    raw = ram.pages[idx].tobytes() if len(idx) else b""
    return {"pages": idx.tobytes(), "data": lz4.block.compress(raw, store_size=False), "raw_size": len(raw)}


def decode_pages(blob: Any, ram_size: int) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint8]]:
    """Check and unpack an encode_pages() map; returns (indices, pages as an (n, 4096) array)."""
    try:
        idx = np.frombuffer(blob["pages"], dtype="<u4")
        raw_size = int(blob["raw_size"])
        data = blob["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"RAM pages: malformed page block ({e})") from None
    npages = ram_size // PAGE_SIZE
    if raw_size != len(idx) * PAGE_SIZE:
        raise StateError(f"RAM pages: {len(idx)} page indices but {raw_size} bytes of page data")
    if len(idx) and int(idx.max()) >= npages:
        raise StateError(f"RAM pages: page index {int(idx.max())} is outside guest RAM ({npages} pages)")
    try:
        raw = lz4.block.decompress(data, uncompressed_size=raw_size) if raw_size else b""
    except lz4.block.LZ4BlockError as e:
        raise StateError(f"RAM pages: corrupt lz4 data ({e})") from None
    if len(raw) != raw_size:
        raise StateError(f"RAM pages: decompressed {len(raw)} bytes, expected {raw_size}")
    return idx, np.frombuffer(raw, dtype=np.uint8).reshape(len(idx), PAGE_SIZE)


def check_payload(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise StateError(f"state is a {type(payload).__name__}, expected a map")
    if payload.get("format") != FORMAT:
        raise StateError(f"not a toyvm state (format {payload.get('format')!r}, expected {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise StateError(f"state format version {payload.get('version')!r} is not supported (this toyvm reads "
                         f"version {VERSION})")
    missing = {"machine", "cpu", "devices"} - payload.keys()
    if missing:
        raise StateError(f"state lacks {sorted(missing)}")
    return payload


def pack(payload: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(payload, use_bin_type=True)  # msgpack is untyped
    return body


def unpack(blob: bytes) -> dict[str, Any]:
    try:
        payload = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise StateError(f"state payload is not valid msgpack ({e})") from None
    return check_payload(payload)


def write_file(path: str | Path, payload: dict[str, Any]) -> None:
    body = pack(payload)
    header = _HEADER.pack(FILE_MAGIC, VERSION, zlib.crc32(body), len(body))
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(header + body)
    tmp.replace(path)  # a crash mid-write never leaves a half-written state under the real name


def read_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise StateError(f"{path}: truncated state file ({len(head)} bytes, header needs {_HEADER.size})")
            magic, version, crc, length = _HEADER.unpack(head)
            if magic != FILE_MAGIC:
                raise StateError(f"{path}: not a toyvm state file (bad magic {magic!r})")
            if version != VERSION:
                raise StateError(f"{path}: state file version {version} is not supported (this toyvm reads "
                                 f"version {VERSION})")
            if length > MAX_STATE_BYTES:
                raise StateError(f"{path}: header claims {length} bytes of state, more than the "
                                 f"{MAX_STATE_BYTES} limit")
            body = f.read(length)
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror}") from None
    if len(body) != length:
        raise StateError(f"{path}: truncated state file: {len(body)} of {length} payload bytes")
    if zlib.crc32(body) != crc:
        raise StateError(f"{path}: checksum mismatch: the state file is corrupt")
    return unpack(body)
