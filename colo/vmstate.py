"""What a checkpoint carries; how the primary stages and streams it; how the secondary stages and applies it.

A checkpoint's state is a stream of *pieces*, each the data of one vmstate-chunk (or initial-chunk) frame, so
that no multi-megabyte blob is ever built, checksummed or parsed as a whole:

    head      b"CVH2" | u32 head length | u32 CRC-32 of the head | the head's first bytes
    (more)    b"CVHC" | the head's next bytes                (only when the head is longer than HEAD_PART)
    batch     b"CVB2" | u32 number | u32 n | u32 flags | u32 CRC-32 | n x u32 page numbers | lz4 block

All integers little-endian. The head is a msgpack map: format, version, epoch, full (a whole copy of the VM, at
the start of protection), generation and node (the primary's), conns (the connections the VM has open), vm (the
machine state without RAM: toyvm's versioned state, msgpack bytes), outputs (network outputs of the epoch,
[[seq, kind, conn, data], ...]), inputs (inputs the primary holds that its VM has not taken: a secondary that
takes over must not lose them), batches and pages (how many batch pieces, and pages in all, follow).

A batch carries the pages listed, in strictly increasing order (and after the previous batch's), compressed as
one lz4 block that must decompress to exactly n x 4096 bytes; flag DELTA says the block holds each page XOR its
content at the previous checkpoint. Its CRC-32 covers the piece but the CRC field: the cheap check against
accidents between the primary's staging buffer and the secondary's (frames are authenticated besides).
Zero pages are not looked for: lz4 shrinks a zero page to a few bytes, in less time than a scan would take.
Only a whole copy scans for non-zero pages (so that 1 GiB of zeros is not sent at all).

Both sides work on reused buffers: the primary's `Stager` copies the pages into its staging buffer when the guest
is to resume before they are sent, and compresses each batch in a worker thread into its own buffer (the CRC is
computed there too: lz4 and zlib release the GIL); the secondary's `Receiver` checks each piece as it arrives
and decompresses batches in the same pool straight into its staging buffer. It checks everything (CRCs,
structure, page numbers inside RAM, sizes, the machine state fits the VM) before the checkpoint is complete;
only `apply()` changes the VM, all at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import struct
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import msgpack
import numpy as np
import numpy.typing as npt

from colo import trace
from colo.events import STREAM
from colo.netevents import conn_problem, events_problem
from toyvm import Machine
from toyvm.contract import PAGE_SIZE
from toyvm.errors import StateError

FORMAT = "colo-vmstate"
VERSION = 3
HEAD_MAGIC, MORE_MAGIC, BATCH_MAGIC = b"CVH2", b"CVHC", b"CVB2"
_HEAD = struct.Struct("<4sII")  # magic, head length, CRC-32 of the head
_BATCH = struct.Struct("<4sIIII")  # magic, number, pages, flags, CRC-32
HEAD_PART = 1 << 20  # head bytes per piece
BATCH_PAGES = 512  # 2 MiB of pages per lz4 block: large enough to compress well, small enough to spread
DELTA = 1  # batch flag: the pages are XORed with their content at the previous checkpoint
MAX_STATE_EVENTS = 1 << 22  # events one checkpoint may carry (outputs of an epoch, inputs held)
WINDOW = 4  # batches compressed ahead of the one being sent (each has its own output buffer)
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lz4")  # lz4, zlib and ctypes release the GIL


# -- lz4 into and out of buffers we own ----------------------------------------------------------------------------
class _Lz4:
    """liblz4 through ctypes, so blocks are compressed into and decompressed into preallocated buffers (the Python
    binding returns a new bytes object each time); the same block format as `lz4.block` without a stored size,
    which stands in where the library is missing."""

    def __init__(self) -> None:
        self.lib: Any = None
        name = ctypes.util.find_library("lz4")
        try:
            lib = ctypes.CDLL(name or "liblz4.so.1")
            for fn in (lib.LZ4_compress_default, lib.LZ4_decompress_safe):
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                fn.restype = ctypes.c_int
            lib.LZ4_compressBound.argtypes = [ctypes.c_int]
            lib.LZ4_compressBound.restype = ctypes.c_int
            self.lib = lib
        except (OSError, AttributeError):
            self.lib = None

    @staticmethod
    def bound(n: int) -> int:
        return n + n // 255 + 16  # LZ4_COMPRESSBOUND

    def compress_into(self, src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8]) -> int:
        if self.lib is not None:
            n = int(self.lib.LZ4_compress_default(src.ctypes.data, dst.ctypes.data, src.nbytes, dst.nbytes))
            if n <= 0:
                raise StateError("lz4 could not compress a batch")
            return n
        out = lz4.block.compress(src.data, store_size=False)
        dst[:len(out)] = np.frombuffer(out, np.uint8)
        return len(out)

    def decompress_into(self, src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8]) -> int:
        """Bytes written to dst, or -1 when src is not an lz4 block that fits dst."""
        if self.lib is not None:
            return int(self.lib.LZ4_decompress_safe(src.ctypes.data, dst.ctypes.data, src.nbytes, dst.nbytes))
        try:
            out = lz4.block.decompress(src.data, uncompressed_size=dst.nbytes)
        except lz4.block.LZ4BlockError:
            return -1
        dst.reshape(-1)[:len(out)] = np.frombuffer(out, np.uint8)
        return len(out)


LZ4 = _Lz4()


def _grow(buf: npt.NDArray[Any] | None, rows: int, shape_tail: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
    """A buffer of at least `rows` rows, reused when it is big enough (grown by half again, so a slowly growing
    dirty set does not reallocate every checkpoint)."""
    if buf is not None and buf.shape[0] >= rows:
        return buf
    return np.empty((max(rows, int(1.5 * (0 if buf is None else buf.shape[0]))), *shape_tail), dtype=dtype)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while a head is unpacked (msgpack's own advice for large messages): a hybrid epoch's
    head holds 10,000 and more events, whose new lists set off collections of every generation, the oldest
    included, and made the 3 ms unpack 15-22 ms in one checkpoint of two under load (measured); the collector
    runs after, once over what the unpack made. Another thread inside at the same time is harmless: whoever
    found it on turns it on again."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# -- the primary's side ------------------------------------------------------------------------------------------
@dataclass
class EncodeStats:
    dirty_pages: int = 0
    zero_pages: int = 0  # not scanned any more (lz4 does it): 0 but in whole copies
    raw_bytes: int = 0  # pages + machine state, before compression
    wire_bytes: int = 0  # every piece (what vmstate-size says)
    stage_s: float = 0.0  # at the stop: dirty log, machine state, the copy into staging
    compress_s: float = 0.0  # worker time spent in lz4 and CRC (overlaps the sending)


@dataclass
class Staged:
    """A checkpoint as the primary holds it between the stop and the last piece sent."""

    epoch: int
    # The head's fields, every value taken at the stop (the machine state packed, the lists copied; the events in
    # them are never changed), packed into `head` when it is first sent: the epoch's outputs (ten thousand and
    # more in a hybrid epoch under load) are then packed by the sender while the guest runs, not in the pause.
    head_fields: dict[str, Any]
    index: npt.NDArray[np.uint32]  # every page, sorted
    pages: npt.NDArray[np.uint8] | None  # (n, 4096) copies in the staging buffer, or None: read guest RAM
    ram: npt.NDArray[np.uint8]  # the VM's pages (read only when `pages` is None: the VM stays stopped)
    stats: EncodeStats
    base: npt.NDArray[np.uint8] | None = None  # delta: each page's content at the previous checkpoint
    _head: bytes | None = field(default=None, repr=False)

    @property
    def head(self) -> bytes:
        if self._head is None:
            self._head = msgpack.packb(self.head_fields, use_bin_type=True)
        return self._head


class Stager:
    """Stages checkpoints at the stop and turns them into pieces; one per primary, its buffers reused."""

    def __init__(self) -> None:
        self._pages: npt.NDArray[np.uint8] | None = None  # staging: copies of the dirty pages
        self._slots: list[npt.NDArray[np.uint8]] = []  # compressed batches, WINDOW of them in rotation
        self._gather: list[npt.NDArray[np.uint8]] = []  # scattered pages of a batch read from guest RAM
        self._lock = threading.Lock()
        self._busy: list[Future[Any]] = []  # compressions of an abandoned stream: wait before reusing buffers
        self.cache: npt.NDArray[np.uint8] | None = None  # delta: every page as the secondary holds it

    def stage(self, vm: Machine, pages: npt.NDArray[np.int64], *, epoch: int, full: bool, copy: bool,
              outputs: list[list[Any]] | None = None, inputs: list[list[Any]] | None = None,
              generation: int = 1, node: str = "", conns: list[int] | None = None, delta: bool = False) -> Staged:
        """At an exact stop: the head (machine state and all) and, with `copy`, the pages in the staging buffer,
        so that the guest may run on while the pieces go out. Without `copy` the VM must stay stopped until the
        last piece is made. `delta`: send each page XOR its content at the previous checkpoint, kept here
        (a whole copy starts that cache; it needs as much memory again as guest RAM)."""
        self.wait_idle()
        t0 = time.perf_counter()
        st = EncodeStats(dirty_pages=len(pages))
        idx = np.asarray(pages, dtype=np.uint32)
        n = len(idx)
        staged_pages = None
        if copy and n:
            self._pages = _grow(self._pages, n, (PAGE_SIZE,), np.uint8)
            staged_pages = self._pages[:n]
            np.take(vm.ram.pages, idx, axis=0, out=staged_pages, mode="clip")  # "raise" buffers out= (slower)
        machine_state = msgpack.packb(vm.save_state(include_ram=False), use_bin_type=True)
        batches = (n + BATCH_PAGES - 1) // BATCH_PAGES
        head = {"format": FORMAT, "version": VERSION, "epoch": epoch, "full": full, "generation": generation,
                "node": node, "conns": list(conns or ()), "vm": machine_state,
                "outputs": list(outputs or ()), "inputs": list(inputs or ()), "batches": batches, "pages": n}
        st.raw_bytes = n * PAGE_SIZE + len(machine_state)
        base = None
        if delta and full:  # what the secondary will hold: the base of the next checkpoint's deltas
            self.remember(vm)
        elif delta and self.cache is not None and self.cache.shape == vm.ram.pages.shape:
            base = self.cache
        elif not delta:
            self.cache = None
        st.stage_s = time.perf_counter() - t0
        return Staged(epoch, head, idx, staged_pages, vm.ram.pages, st, base)

    def remember(self, vm: Machine) -> None:
        """Delta: the secondary now holds exactly `vm`'s RAM (a copy just ended): the base of the next deltas."""
        self.wait_idle()
        if self.cache is None or self.cache.shape != vm.ram.pages.shape:
            self.cache = np.empty_like(vm.ram.pages)
        np.copyto(self.cache, vm.ram.pages)

    def pieces(self, staged: Staged) -> Generator[memoryview | bytes, None, None]:
        """The head, then every batch, compressed in the pool ahead of the one being yielded (WINDOW of them).
        A yielded buffer is reused once the next piece is asked for: send it (and wait until it is written)
        first. Closing the iterator early waits for the compressions under way."""
        head = staged.head
        first = min(len(head), HEAD_PART)
        piece: bytes | memoryview = _HEAD.pack(HEAD_MAGIC, len(head), zlib.crc32(head)) + head[:first]
        staged.stats.wire_bytes += len(piece)
        yield piece
        for lo in range(first, len(head), HEAD_PART):
            piece = MORE_MAGIC + head[lo:lo + HEAD_PART]
            staged.stats.wire_bytes += len(piece)
            yield piece
        n = len(staged.index)
        count = (n + BATCH_PAGES - 1) // BATCH_PAGES
        with self._lock:
            while len(self._slots) < min(WINDOW, count):
                self._slots.append(np.empty(0, np.uint8))
                self._gather.append(np.empty((0, PAGE_SIZE), np.uint8))
        futures: dict[int, Future[tuple[int, float]]] = {}
        if count == 1:  # nothing to overlap: a hand-off to the pool and back costs more than it saves
            size, spent = self._compress(staged, 0, 0)
            staged.stats.compress_s += spent
            staged.stats.wire_bytes += size
            yield self._slots[0].data[:size]
            return

        def submit(b: int) -> None:
            if b < count:
                futures[b] = _pool.submit(self._compress, staged, b, b % WINDOW)
        try:
            for b in range(min(WINDOW, count)):
                submit(b)
            for b in range(count):
                size, spent = futures.pop(b).result()
                staged.stats.compress_s += spent
                staged.stats.wire_bytes += size
                yield self._slots[b % WINDOW].data[:size]
                submit(b + WINDOW)  # its slot held batch b, which the caller has sent by now
        finally:
            if futures:
                with self._lock:
                    self._busy += futures.values()

    @staticmethod
    def count(staged: Staged) -> int:
        """How many pieces `pieces(staged)` yields."""
        head_parts = 1 + max(0, (len(staged.head) - 1) // HEAD_PART)
        return head_parts + (len(staged.index) + BATCH_PAGES - 1) // BATCH_PAGES

    def wait_idle(self) -> None:
        with self._lock:
            busy, self._busy = self._busy, []
        for f in busy:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - an abandoned stream's failure does not matter any more
                pass

    def _compress(self, staged: Staged, b: int, slot: int) -> tuple[int, float]:
        """Worker thread: batch `b` as a piece, in its slot's buffer. Returns (piece size, seconds spent)."""
        t0 = time.perf_counter()
        lo = b * BATCH_PAGES
        idx = staged.index[lo:lo + BATCH_PAGES]
        n = len(idx)
        if staged.pages is not None:
            src = staged.pages[lo:lo + n]
        elif int(idx[-1]) - int(idx[0]) + 1 == n:
            src = staged.ram[int(idx[0]):int(idx[-1]) + 1]  # a run of pages: read in place (the VM is stopped)
        else:
            g = self._gather[slot] = _grow(self._gather[slot], n, (PAGE_SIZE,), np.uint8)
            src = g[:n]
            np.take(staged.ram, idx, axis=0, out=src, mode="clip")
        flags = 0
        if staged.base is not None:
            new = src
            src = np.bitwise_xor(src, staged.base[idx])
            staged.base[idx] = new  # the secondary's copy once this checkpoint is applied
            flags |= DELTA
        start = _BATCH.size + 4 * n
        need = start + LZ4.bound(n * PAGE_SIZE)
        out = self._slots[slot]
        if out.nbytes < need:
            out = self._slots[slot] = np.empty(max(need, _BATCH.size + 4 * BATCH_PAGES
                                                   + LZ4.bound(BATCH_PAGES * PAGE_SIZE)), np.uint8)
        out[_BATCH.size:start] = idx.view(np.uint8)  # uint32 is little-endian on every host numpy runs on here
        size = start + LZ4.compress_into(src.reshape(-1), out[start:])
        mv = out.data
        struct.pack_into("<4sIII", mv, 0, BATCH_MAGIC, b, n, flags)
        crc = zlib.crc32(mv[_BATCH.size:size], zlib.crc32(mv[:16]))
        struct.pack_into("<I", mv, 16, crc)
        return size, time.perf_counter() - t0


def encode(vm: Machine, pages: npt.NDArray[np.int64], *, epoch: int, full: bool,
           outputs: list[list[Any]] | None = None, inputs: list[list[Any]] | None = None,
           generation: int = 1, node: str = "", conns: list[int] | None = None) -> tuple[list[bytes], EncodeStats]:
    """Every piece of a checkpoint as bytes (tests and tools; the roles stream them with a Stager)."""
    stager = Stager()
    staged = stager.stage(vm, pages, epoch=epoch, full=full, copy=False, outputs=outputs, inputs=inputs,
                          generation=generation, node=node, conns=conns)
    out = [bytes(p) for p in stager.pieces(staged)]
    return out, staged.stats


# -- the secondary's side ----------------------------------------------------------------------------------------
@dataclass
class StagedCheckpoint:
    """A checkpoint that arrived whole and verified, not yet applied. `data` lives in the Receiver's staging
    buffer: it stays valid until the receiver starts on the next state."""

    epoch: int
    full: bool
    vm_state: dict[str, Any]
    index: npt.NDArray[np.uint32]  # every page it carries, sorted
    data: npt.NDArray[np.uint8]  # their contents, (n, 4096)
    outputs: list[list[Any]] = field(default_factory=list)
    inputs: list[list[Any]] = field(default_factory=list)
    generation: int = 1
    node: str = ""
    conns: list[int] = field(default_factory=list)

    def applied(self) -> StagedCheckpoint:
        """What is kept of it once applied: everything but the pages (their buffer is reused)."""
        return dataclasses.replace(self, index=_NO_INDEX, data=_NO_PAGES)

    @property
    def input_seq(self) -> int:
        return int(self.vm_state["devices"]["net"]["last_input_seq"])

    @property
    def output_seq(self) -> int:
        return int(self.vm_state["devices"]["net"]["last_output_seq"])


_NO_INDEX = np.empty(0, np.uint32)
_NO_PAGES = np.empty((0, PAGE_SIZE), np.uint8)


def _fail(epoch: int | None, text: str) -> StateError:
    return StateError(f"checkpoint {epoch}: {text}" if epoch is not None else f"copy: {text}")


class Receiver:
    """Stages one state at a time, piece by piece, into buffers reused from state to state.

    `begin()`, then `feed()` every piece as it arrives (StateError at the first bad one; the state is then
    dropped), then `finish()` for the verified StagedCheckpoint. `machine_for(ram_size)` gives the VM a whole copy
    is for (the head says its RAM size); an incremental state is for `vm`. `base()` gives each page's content at
    the previous checkpoint (delta batches): the secondary's RAM, or its cache in hybrid mode."""

    def __init__(self) -> None:
        self._data: npt.NDArray[np.uint8] | None = None
        self._index: npt.NDArray[np.uint32] | None = None
        self._futures: list[Future[None]] = []
        self._active = False
        self._lock = threading.RLock()  # the secondary feeds from its I/O thread and finishes from its VM thread
        self.error: StateError | None = None  # the first refusal of `offer`, raised by finish()

    def begin(self, *, epoch: int | None, full: bool | None, vm: Machine | None = None,
              machine_for: Callable[[int], Machine] | None = None,
              base: Callable[[], npt.NDArray[np.uint8]] | None = None) -> None:
        with self._lock:
            self._begin(epoch, full, vm, machine_for, base)

    def _begin(self, epoch: int | None, full: bool | None, vm: Machine | None,
               machine_for: Callable[[int], Machine] | None,
               base: Callable[[], npt.NDArray[np.uint8]] | None) -> None:
        self.abort()
        self.error = None
        if epoch is None and full is None:
            full = True  # a state that says its own epoch is a copy: whole, unless a record of a live copy
        self.epoch, self.full = epoch, full
        self.vm, self._machine_for, self._base = vm, machine_for, base
        self._head = bytearray()
        self._head_len = self._head_crc = -1
        self._meta: dict[str, Any] | None = None
        self._batch = 0
        self._pages = 0
        self._last = -1
        self._active = True

    @property
    def machine(self) -> Machine | None:
        return self.vm

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        """One piece; StateError names what is wrong with it (the state is then dropped)."""
        with self._lock:
            if not self._active:
                raise self.error or _fail(self.epoch, "a piece of state outside a transfer")
            try:
                self._feed(memoryview(piece).cast("B") if not isinstance(piece, bytes) else piece)
            except StateError as e:
                self.abort()
                self.error = e
                raise
            except (KeyError, TypeError, ValueError, struct.error, msgpack.UnpackException) as e:
                self.abort()
                self.error = _fail(self.epoch, f"malformed state ({e!r})")
                raise self.error from None

    def offer(self, piece: bytes | bytearray | memoryview) -> None:
        """As `feed`, but a refusal is kept for `finish()` to raise (the caller is not the one to act on it);
        after one, later pieces are ignored."""
        with self._lock:
            if self.error is None:
                try:
                    self.feed(piece)
                except StateError:
                    pass

    def _feed(self, piece: bytes | memoryview) -> None:
        magic = bytes(piece[:4])
        if self._meta is None:  # the head comes first, in one or more pieces
            if self._head_len < 0:
                if magic != HEAD_MAGIC:
                    raise _fail(self.epoch, f"bad state magic {magic!r}: the state must start with its head "
                                            f"({HEAD_MAGIC!r})")
                if len(piece) < _HEAD.size:
                    raise _fail(self.epoch, f"a head piece of {len(piece)} bytes is too short to be one")
                _, self._head_len, self._head_crc = _HEAD.unpack_from(piece)
                if self._head_len > 64 << 20:
                    raise _fail(self.epoch, f"a head of {self._head_len} bytes is too long")
                self._head += piece[_HEAD.size:]
            elif magic == MORE_MAGIC:
                self._head += piece[4:]
            else:
                raise _fail(self.epoch, f"the head is cut short: {len(self._head)} of {self._head_len} bytes")
            if len(self._head) > self._head_len:
                raise _fail(self.epoch, f"the head is longer than the {self._head_len} bytes it claims")
            if len(self._head) == self._head_len:
                self._take_head(bytes(self._head))
            return
        if magic != BATCH_MAGIC or len(piece) < _BATCH.size:
            raise _fail(self.epoch, f"expected page batch {self._batch}, got a piece starting {magic!r}")
        _, number, n, flags, crc = _BATCH.unpack_from(piece)
        meta = self._meta
        if number != self._batch or number >= meta["batches"]:
            raise _fail(self.epoch, f"page batch {number} where batch {self._batch} of {meta['batches']} "
                                    "was expected")
        if n == 0 or self._pages + n > meta["pages"] or n > BATCH_PAGES:
            raise _fail(self.epoch, f"page batch {number} of {n} pages does not fit the {meta['pages']} pages the "
                                    "head announces")
        if flags & ~DELTA:
            raise _fail(self.epoch, f"page batch {number} has unknown flags {flags:#x}")
        if flags & DELTA and (self._base is None or meta["full"]):
            raise _fail(self.epoch, f"page batch {number} is a delta, but there is nothing to apply it to")
        if len(piece) < _BATCH.size + 4 * n:
            raise _fail(self.epoch, f"page batch {number} is too short for its {n} page numbers")
        index = np.frombuffer(piece, dtype="<u4", count=n, offset=_BATCH.size)
        first, last = int(index[0]), int(index[-1])
        if first <= self._last or (n > 1 and not bool(np.all(index[1:] > index[:-1]))):
            raise _fail(self.epoch, "page indices must be strictly increasing")
        assert self.vm is not None
        if last >= self.vm.ram.npages:
            raise _fail(self.epoch, f"page index {last} is outside guest RAM ({self.vm.ram.npages} pages)")
        assert self._data is not None and self._index is not None
        lo = self._pages
        self._index[lo:lo + n] = index
        dst = self._data[lo:lo + n]
        base = self._base() if flags & DELTA and self._base is not None else None
        if meta["batches"] == 1:  # nothing to overlap with: decompress here, without a hand-off
            done: Future[None] = Future()
            try:
                self._unpack(piece, n, crc, dst, base, index, number)
                done.set_result(None)
            except StateError as e:
                done.set_exception(e)
            self._futures.append(done)
        else:
            self._futures.append(_pool.submit(self._unpack, piece, n, crc, dst, base, index, number))
        self._batch += 1
        self._pages += n
        self._last = last

    def _take_head(self, head: bytes) -> None:
        epoch = self.epoch
        if zlib.crc32(head) != self._head_crc:
            raise _fail(epoch, "checksum mismatch: the state's head is corrupt")
        try:
            with _collector_paused():
                m = msgpack.unpackb(head, raw=False, strict_map_key=False)
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise _fail(epoch, f"state is not valid msgpack ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise _fail(epoch, "not a colo state")
        if m.get("version") != VERSION:
            raise _fail(epoch, f"state version {m.get('version')!r} is not supported (this colo reads version "
                               f"{VERSION})")
        if epoch is None:
            epoch = m.get("epoch")
            if type(epoch) is not int or epoch < 0:
                raise _fail(0, f"the copy says it ends at epoch {epoch!r}")
            self.epoch = epoch
        elif m.get("epoch") != epoch:
            raise _fail(epoch, f"the state says it is for epoch {m.get('epoch')!r}")
        if type(m.get("full")) is not bool:
            raise _fail(epoch, f"the head's full must be true or false, not {m.get('full')!r}")
        if self.full is not None and m.get("full") is not self.full:
            raise _fail(epoch, "a whole copy was expected" if self.full else
                        "a checkpoint, not a whole copy, was expected")
        batches, pages = m["batches"], m["pages"]
        if type(batches) is not int or type(pages) is not int or pages < 0 or \
                batches != (pages + BATCH_PAGES - 1) // BATCH_PAGES:
            raise _fail(epoch, f"the head announces {batches!r} batches for {pages!r} pages")
        if type(m["vm"]) is not bytes:
            raise _fail(epoch, "the machine state must be bytes")
        vm_state = msgpack.unpackb(m["vm"], raw=False, strict_map_key=False)
        if not isinstance(vm_state, dict) or "ram" in vm_state:
            raise _fail(epoch, "the machine state must be a map without RAM")
        if self.vm is None:
            try:
                size = int(vm_state["machine"]["ram_size"])
            except (KeyError, TypeError, ValueError):
                raise _fail(epoch, "the machine state lacks machine.ram_size") from None
            if self._machine_for is None:
                raise _fail(epoch, "no machine to receive the state into")
            self.vm = self._machine_for(size)
        if pages > self.vm.ram.npages:
            raise _fail(epoch, f"{pages} pages announced for a VM of {self.vm.ram.npages}")
        self.vm.check_state(vm_state)
        for name in ("outputs", "inputs"):
            problem = events_problem(m[name], MAX_STATE_EVENTS)
            if problem is not None:
                raise _fail(epoch, f"{name} {problem}")
        generation, node, conns = m["generation"], m["node"], m["conns"]
        if type(generation) is not int or generation < 0 or type(node) is not str or len(node) > 64:
            raise _fail(epoch, f"bad generation {generation!r} or node {node!r}")
        if type(conns) is not list or not all(conn_problem(c) is None for c in conns):
            raise _fail(epoch, "conns must be a list of connection ids")
        self._data = _grow(self._data, pages, (PAGE_SIZE,), np.uint8)
        self._index = _grow(self._index, pages, (), np.uint32)
        m["vm"] = vm_state
        self._meta = m

    @staticmethod
    def _unpack(piece: bytes | memoryview, n: int, crc: int, dst: npt.NDArray[np.uint8],
                base: npt.NDArray[np.uint8] | None, index: npt.NDArray[np.uint32], number: int) -> None:
        """Worker thread: check a batch's CRC and decompress it into its place in the staging buffer."""
        mv = memoryview(piece)
        if zlib.crc32(mv[_BATCH.size:], zlib.crc32(mv[:16])) != crc:
            raise StateError(f"page batch {number}: checksum mismatch: the batch is corrupt")
        src = np.frombuffer(piece, dtype=np.uint8, offset=_BATCH.size + 4 * n)
        flat = dst.reshape(-1)
        got = LZ4.decompress_into(src, flat) if len(src) else -1
        if got != flat.nbytes:
            raise StateError(f"page batch {number}: does not decompress to its {n} pages")
        if base is not None:
            np.bitwise_xor(dst, base.reshape(-1, PAGE_SIZE)[index], out=dst)

    def finish(self) -> StagedCheckpoint:
        """Every piece is in: wait for the batches, check that all the head announced came."""
        with self._lock:
            return self._finish()

    def _finish(self) -> StagedCheckpoint:
        if not self._active:
            raise self.error or _fail(self.epoch, "no state under way")
        try:
            if self._meta is None:
                raise _fail(self.epoch, "the state ended before its head was complete")
            m = self._meta
            if self._batch != m["batches"] or self._pages != m["pages"]:
                raise _fail(self.epoch, f"the state ended after {self._batch} of {m['batches']} page batches")
            for f in self._futures:
                e = f.exception()
                if e is not None:
                    raise _fail(self.epoch, str(e)) if isinstance(e, StateError) else e
        except BaseException:
            self.abort()
            raise
        self._futures = []
        self._active = False
        assert self._data is not None and self._index is not None and self.epoch is not None
        n = self._pages
        return StagedCheckpoint(self.epoch, bool(m["full"]), m["vm"], self._index[:n], self._data[:n],
                                m["outputs"], m["inputs"], m["generation"], m["node"], m["conns"])

    def abort(self) -> None:
        """Drop a partial state (its batches still decompressing are waited for: they write our buffers)."""
        with self._lock:
            for f in self._futures:
                f.exception()
            self._futures = []
            self._active = False


def decode(pieces: list[bytes], vm: Machine | None, *, epoch: int | None, full: bool | None = None,
           machine_for: Callable[[int], Machine] | None = None) -> StagedCheckpoint:
    """Check every piece of a state against `vm` and stage it (tests and tools; the secondary feeds a Receiver as
    the pieces arrive)."""
    r = Receiver()
    r.begin(epoch=epoch, full=full, vm=vm, machine_for=machine_for)
    for p in pieces:
        r.feed(p)
    return r.finish()


# -- applying ------------------------------------------------------------------------------------------------
def _runs(index: npt.NDArray[np.uint32]) -> list[tuple[int, int]]:
    """(start in the list, length) of each run of consecutive page numbers."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(index)]))
    return list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))


def _copy_pages(dst: npt.NDArray[np.uint8], index: npt.NDArray[np.uint32], data: npt.NDArray[np.uint8]) -> None:
    runs = _runs(index)
    if len(runs) <= 64:
        for lo, n in runs:  # runs of pages: plain copies
            first = int(index[lo])
            dst[first:first + n] = data[lo:lo + n]
    else:
        dst[index] = data


def apply(vm: Machine, staged: StagedCheckpoint) -> None:
    """Make `vm` the checkpointed VM: RAM pages, then CPU and devices (all checked when it was staged)."""
    if staged.full:
        vm.ram.clear()
    _copy_pages(vm.ram.pages, staged.index, staged.data)
    vm.restore_state(staged.vm_state, checked=True)  # flushes translated code and the TLB


def apply_pages(vm: Machine, staged: StagedCheckpoint) -> None:
    """Only the pages (a round of a live copy: the VM does not run until the copy's last record)."""
    _copy_pages(vm.ram.pages, staged.index, staged.data)


def apply_hybrid(vm: Machine, cache: npt.NDArray[np.uint8], staged: StagedCheckpoint) -> int:
    """Hybrid mode (QEMU's colo_flush_ram_cache): the secondary VM ran too, so besides the pages the primary
    changed, every page the secondary wrote itself must go back to the primary's version. `cache` holds the
    primary's memory as of the last checkpoint; the checkpoint's pages update it first. Returns the number of
    pages copied into the VM."""
    cache_pages = cache.reshape(-1, PAGE_SIZE)
    if staged.full:
        cache_pages[:] = 0
    _copy_pages(cache_pages, staged.index, staged.data)
    own = vm.collect_dirty().astype(np.uint32)  # what the secondary's own run wrote
    idx = np.union1d(own, staged.index)  # ours and the primary's
    vm.ram.pages[idx] = cache_pages[idx]
    if STREAM.active:  # the teaching view: the secondary's own writes, and every page put back from the cache
        trace.hybrid_pages(staged.epoch, own, idx, vm.ram.npages)
    vm.restore_state(staged.vm_state, checked=True)
    return len(idx)
