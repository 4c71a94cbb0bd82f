"""What a checkpoint carries, and how the secondary stages and applies it.

A checkpoint's state is one blob, sent as vmstate-chunk (or initial-chunk) frames:

    b"CVS1" | CRC-32 of the body, 4 bytes big-endian | body: a msgpack map
      format, version, epoch, full (bool: a whole copy of the VM, at the start of protection)
      generation, node: the primary's generation and node id (a secondary learns them from its copy)
      conns:    the connections the VM has open (after a failover the gateway closes those no client holds)
      vm:       the machine state without RAM (CPU, devices, machine): toyvm's versioned state, msgpack bytes
      batches:  [{"index": u32 page numbers, "zero": packed bits (1 = the page is all zero, not sent),
                  "data": lz4 block of the non-zero pages in index order, "raw": its uncompressed size}]
      outputs:  network outputs produced since the previous checkpoint, [[seq, kind, conn, data], ...]
      inputs:   inputs the primary holds that its VM has not accepted yet (same shape): a secondary that
                takes over must not lose them

The secondary decodes and checks all of it (CRC, structure, page numbers inside RAM, every batch
decompresses to the size it claims, the machine state fits the VM) before it says vmstate-received;
only `apply()` changes the VM, all at once.
"""
from __future__ import annotations

import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
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

MAGIC = b"CVS1"
FORMAT = "colo-vmstate"
VERSION = 2
BATCH_PAGES = 512  # 2 MiB of pages per lz4 block: large enough to compress well, small enough to spread
MAX_STATE_EVENTS = 1 << 22  # events one checkpoint may carry (outputs of an epoch, inputs held)
_HEAD = struct.Struct(">4sI")
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lz4")  # lz4 releases the GIL


@dataclass
class EncodeStats:
    dirty_pages: int = 0
    zero_pages: int = 0
    raw_bytes: int = 0  # pages + machine state, before compression
    wire_bytes: int = 0  # the blob
    collect_s: float = 0.0  # find the pages, save the machine state
    compress_s: float = 0.0  # lz4, framing, checksum


def _compress(block: memoryview) -> bytes:
    out: bytes = lz4.block.compress(block, store_size=False)  # lz4 is untyped
    return out


def _batches(ram_pages: npt.NDArray[np.uint8], idx: npt.NDArray[np.uint32]) -> list[tuple[Any, Any, Any]]:
    """Split the pages into batches of (indices, zero flags, non-zero pages as one C-contiguous array).
    A run of consecutive pages is a view of guest RAM (no copy: the VM is stopped for the whole checkpoint);
    scattered pages are gathered, one batch at a time."""
    out = []
    for lo in range(0, len(idx), BATCH_PAGES):
        bidx = idx[lo:lo + BATCH_PAGES]
        first, last = int(bidx[0]), int(bidx[-1])
        pages = ram_pages[first:last + 1] if last - first + 1 == len(bidx) else ram_pages[bidx]
        nonzero = pages.view(np.uint64).any(axis=1)
        if not nonzero.all():
            pages = pages[nonzero]
        out.append((bidx, ~nonzero, pages))
    return out


def encode(vm: Machine, pages: npt.NDArray[np.int64], *, epoch: int, full: bool,
           outputs: list[list[Any]] | None = None, inputs: list[list[Any]] | None = None,
           generation: int = 1, node: str = "", conns: list[int] | None = None) -> tuple[bytes, EncodeStats]:
    """The checkpoint blob for `pages` of vm's RAM plus its CPU and device state. The VM must stay stopped
    until the blob is built (its RAM is read in place)."""
    st = EncodeStats(dirty_pages=len(pages))
    t0 = time.perf_counter()
    idx = np.asarray(pages, dtype=np.uint32)
    machine_state = msgpack.packb(vm.save_state(include_ram=False), use_bin_type=True)
    parts = _batches(vm.ram.pages, idx)
    st.collect_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    blocks = [memoryview(p).cast("B") for _, _, p in parts]
    compressed = list(_pool.map(_compress, blocks)) if len(blocks) > 1 else [_compress(b) for b in blocks]
    batches = [{"index": i.tobytes(), "zero": np.packbits(z).tobytes(), "data": c, "raw": len(b)}
               for (i, z, _), b, c in zip(parts, blocks, compressed, strict=True)]
    body = msgpack.packb({"format": FORMAT, "version": VERSION, "epoch": epoch, "full": full,
                          "generation": generation, "node": node, "conns": conns or [],
                          "vm": machine_state, "batches": batches, "outputs": outputs or [],
                          "inputs": inputs or []},
                         use_bin_type=True)
    blob = _HEAD.pack(MAGIC, zlib.crc32(body)) + body
    st.compress_s = time.perf_counter() - t1
    st.zero_pages = sum(int(np.count_nonzero(z)) for _, z, _ in parts)
    st.raw_bytes = len(idx) * PAGE_SIZE + len(machine_state)
    st.wire_bytes = len(blob)
    return blob, st


@dataclass
class Batch:
    index: npt.NDArray[np.uint32]  # the pages this batch carries
    zero: npt.NDArray[np.bool_]  # which of them are all zero
    data: npt.NDArray[np.uint8]  # the non-zero ones, (n, 4096), in index order


@dataclass
class StagedCheckpoint:
    """A checkpoint that arrived whole and verified, not yet applied."""

    epoch: int
    full: bool
    vm_state: dict[str, Any]
    batches: list[Batch]
    outputs: list[list[Any]] = field(default_factory=list)
    inputs: list[list[Any]] = field(default_factory=list)
    generation: int = 1
    node: str = ""
    conns: list[int] = field(default_factory=list)

    @property
    def input_seq(self) -> int:
        return int(self.vm_state["devices"]["net"]["last_input_seq"])

    @property
    def output_seq(self) -> int:
        return int(self.vm_state["devices"]["net"]["last_output_seq"])


def _fail(epoch: int | None, text: str) -> StateError:
    return StateError(f"checkpoint {epoch}: {text}" if epoch is not None else f"copy: {text}")


def decode(blob: bytes, vm: Machine, *, epoch: int | None, full: bool | None = None) -> StagedCheckpoint:
    """Check everything in `blob` against `vm` and stage it; StateError names what is wrong. `epoch` None: a part
    of a copy, whose epoch the state itself says; `full`, when given, must match the state's."""
    if len(blob) < _HEAD.size:
        raise _fail(epoch, f"state of {len(blob)} bytes is too short to be one")
    magic, crc = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise _fail(epoch, f"bad state magic {magic!r}, expected {MAGIC!r}")
    body = memoryview(blob)[_HEAD.size:]
    if zlib.crc32(body) != crc:
        raise _fail(epoch, "checksum mismatch: the state is corrupt")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False)
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
    elif m.get("epoch") != epoch:
        raise _fail(epoch, f"the state says it is for epoch {m.get('epoch')!r}")
    if full is not None and m.get("full") is not full:
        raise _fail(epoch, "a whole copy was expected" if full else "a checkpoint, not a whole copy, was expected")
    try:
        vm_state = msgpack.unpackb(m["vm"], raw=False, strict_map_key=False)
        if not isinstance(vm_state, dict) or "ram" in vm_state:
            raise _fail(epoch, "the machine state must be a map without RAM")
        vm.check_state(vm_state)
        npages = vm.ram.npages
        batches = []
        for b in m["batches"]:
            index = np.frombuffer(b["index"], dtype="<u4")
            if len(index) == 0:
                raise _fail(epoch, "a page batch with no pages")
            if len(index) > 1 and not bool(np.all(np.diff(index.astype(np.int64)) > 0)):
                raise _fail(epoch, "page indices in a batch must be strictly increasing")
            zero = np.unpackbits(np.frombuffer(b["zero"], dtype=np.uint8), count=len(index)).astype(bool)
            if int(index[-1]) >= npages:
                raise _fail(epoch, f"page index {int(index[-1])} is outside guest RAM ({npages} pages)")
            want = int(np.count_nonzero(~zero)) * PAGE_SIZE
            if b["raw"] != want:
                raise _fail(epoch, f"batch claims {b['raw']} bytes for {want // PAGE_SIZE} non-zero pages")
            raw = lz4.block.decompress(b["data"], uncompressed_size=want) if want else b""
            if len(raw) != want:
                raise _fail(epoch, f"batch decompressed to {len(raw)} bytes, expected {want}")
            batches.append(Batch(index, zero, np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE)))
        outputs, inputs = m["outputs"], m["inputs"]
        for name, events in (("outputs", outputs), ("inputs", inputs)):
            problem = events_problem(events, MAX_STATE_EVENTS)
            if problem is not None:
                raise _fail(epoch, f"{name} {problem}")
        generation, node, conns = m["generation"], m["node"], m["conns"]
        if type(generation) is not int or generation < 0 or type(node) is not str or len(node) > 64:
            raise _fail(epoch, f"bad generation {generation!r} or node {node!r}")
        if type(conns) is not list or not all(conn_problem(c) is None for c in conns):
            raise _fail(epoch, "conns must be a list of connection ids")
        return StagedCheckpoint(epoch, bool(m["full"]), vm_state, batches, outputs, inputs, generation, node,
                                conns)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, msgpack.UnpackException, lz4.block.LZ4BlockError) as e:
        raise _fail(epoch, f"malformed state ({e!r})") from None


def apply(vm: Machine, staged: StagedCheckpoint) -> None:
    """Make `vm` the checkpointed VM: RAM pages, then CPU and devices (all checked by decode)."""
    if staged.full:
        vm.ram.clear()
    apply_pages(vm, staged)
    vm.restore_state(staged.vm_state, checked=True)  # flushes translated code and the TLB


def apply_pages(vm: Machine, staged: StagedCheckpoint) -> None:
    """Only the pages (a round of a copy: the VM does not run until the copy's last part)."""
    pages = vm.ram.pages
    for b in staged.batches:
        first, last = int(b.index[0]), int(b.index[-1])
        if not b.zero.any() and last - first + 1 == len(b.index):
            pages[first:last + 1] = b.data  # a run of pages: one copy
        else:
            pages[b.index[~b.zero]] = b.data
            pages[b.index[b.zero]] = 0


def peek_ram_size(blob: bytes) -> int:
    """The RAM size a (full) checkpoint blob is for, so the secondary can build a matching VM first."""
    try:
        m = msgpack.unpackb(memoryview(blob)[_HEAD.size:], raw=False, strict_map_key=False)
        size = int(msgpack.unpackb(m["vm"], raw=False)["machine"]["ram_size"])
    except Exception as e:  # noqa: BLE001 - any malformation is reported the same way
        raise StateError(f"initial state: cannot read the RAM size ({e!r})") from None
    return size


def apply_hybrid(vm: Machine, cache: npt.NDArray[np.uint8], staged: StagedCheckpoint) -> int:
    """Hybrid mode (QEMU's colo_flush_ram_cache): the secondary VM ran too, so besides the pages the primary
    changed, every page the secondary wrote itself must go back to the primary's version. `cache` holds the
    primary's memory as of the last checkpoint; the checkpoint's pages update it first. Returns the number of
    pages copied into the VM."""
    cache_pages = cache.reshape(-1, PAGE_SIZE)
    touched = [vm.collect_dirty().astype(np.uint32)]  # what the secondary's own run wrote
    for b in staged.batches:
        cache_pages[b.index[~b.zero]] = b.data
        cache_pages[b.index[b.zero]] = 0
        touched.append(b.index)
    idx = np.unique(np.concatenate(touched))
    vm.ram.pages[idx] = cache_pages[idx]
    if STREAM.active:  # the teaching view: the secondary's own writes, and every page put back from the cache
        trace.hybrid_pages(staged.epoch, touched[0], idx, vm.ram.npages)
    vm.restore_state(staged.vm_state, checked=True)
    return len(idx)
