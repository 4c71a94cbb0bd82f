"""Copying a running VM to a new secondary (pre-copy, as live migration does).

The copy goes in rounds while the guest keeps serving: round 0 sends every non-zero page, each later round the
pages the guest dirtied during the one before; when what is left fits one short stop (or the rounds stop
shrinking: a guest that dirties faster than the link carries), the guest stops once, and the rest goes with the
CPU and the devices. Only then does the secondary say checkpoint-ready; until then the primary is unprotected and
its output is released at once, as before any copy.

Two pieces here, both without I/O:
- `RoundPlanner` decides, after each round, whether to go on, stop (converged) or stop anyway (stalled);
- the copy's byte stream, carried by initial-chunk messages: a sequence of records, each a kind byte and a
  length, then the pieces of one checkpoint state (colo.vmstate), each a u32 length and its bytes. A `ROUND`
  record carries pages only (the secondary writes them into its VM, which does not run); the `FINAL` record
  carries the last pages and the machine state. `RecordReader` cuts the stream back into records, whatever the
  chunking.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from colo.errors import ProtocolError

ROUND, FINAL = 0, 1
_RECORD = struct.Struct(">BI")  # kind, blob length
MAX_RECORD = 1 << 31  # a round of pages for the largest RAM, compressed or not, fits below this
BATCH_PAGES = 1024  # pages per record in a round (4 MiB): one record per turn of the loop, then a guest slice


@dataclass
class RoundPlanner:
    """When to stop copying rounds and take the final stop.

    `stop_pages`: a final stop of this many pages or fewer is short enough (about one checkpoint's pause); `at
    least` `min_stop_pages` in any case. A round that does not shrink the remainder by `shrink` (10 %) counts as a
    stall; `stalls` of them in a row, or `max_rounds` rounds, and the copy stops anyway.
    """

    stop_pages: int = 256
    shrink: float = 0.9
    stalls: int = 2
    max_rounds: int = 30
    rounds: list[int] = field(default_factory=list)  # pages sent in each round so far
    stalled: bool = False
    _flat: int = 0

    def plan(self, left: int) -> str:
        """After a round: `left` pages were dirtied meanwhile. "round" (send them as the next round), "stop" (the
        final stop now: converged) or "stall" (the final stop now although it did not converge)."""
        previous = self.rounds[-1] if self.rounds else None
        if left <= self.stop_pages:
            return "stop"
        if previous is not None and left > self.shrink * previous:
            self._flat += 1
        else:
            self._flat = 0
        if self._flat >= self.stalls or len(self.rounds) >= self.max_rounds:
            self.stalled = True
            return "stall"
        return "round"

    def sent(self, pages: int) -> None:
        self.rounds.append(pages)


_PIECE = struct.Struct(">I")


def pack_pieces(pieces: list[bytes]) -> bytes:
    """A record's body: the pieces of one state (colo.vmstate), each after its length."""
    return b"".join(_PIECE.pack(len(p)) + p for p in pieces)


def unpack_pieces(blob: bytes) -> list[memoryview]:
    """The pieces of a record's body, as views of it; ProtocolError when the lengths do not add up."""
    out, at, view = [], 0, memoryview(blob)
    while at < len(blob):
        if at + _PIECE.size > len(blob):
            raise ProtocolError("copy: a record ends inside a piece's length")
        (n,) = _PIECE.unpack_from(blob, at)
        at += _PIECE.size
        if at + n > len(blob):
            raise ProtocolError(f"copy: a piece of {n} bytes runs past the end of its record")
        out.append(view[at:at + n])
        at += n
    if not out:
        raise ProtocolError("copy: an empty record")
    return out


def record(kind: int, blob: bytes) -> bytes:
    if kind not in (ROUND, FINAL):
        raise ValueError(f"record kind must be ROUND or FINAL, got {kind!r}")
    return _RECORD.pack(kind, len(blob)) + blob


class RecordReader:
    """Cuts the copy's stream (fed in any pieces) back into (kind, blob) records; ProtocolError on garbage."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.final_seen = False

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        if self.final_seen:
            raise ProtocolError("copy: bytes after the final record")
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= _RECORD.size:
            kind, length = _RECORD.unpack_from(self._buf)
            if kind not in (ROUND, FINAL):
                raise ProtocolError(f"copy: unknown record kind {kind}")
            if length > MAX_RECORD:
                raise ProtocolError(f"copy: a record of {length} bytes is larger than {MAX_RECORD}")
            end = _RECORD.size + length
            if len(self._buf) < end:
                break
            with memoryview(self._buf) as view:
                out.append((kind, bytes(view[_RECORD.size:end])))  # one copy (a bytearray slice is two)
            del self._buf[:end]
            if kind == FINAL:
                self.final_seen = True
                if self._buf:
                    raise ProtocolError("copy: bytes after the final record")
                break
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
