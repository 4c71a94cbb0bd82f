"""What a checkpoint carries, and how the secondary stages and applies it.

A checkpoint's state is one blob, sent as vmstate-chunk (or initial-chunk) frames:

    b"CVS1" | CRC-32 of the body, 4 bytes big-endian | body: a msgpack map
      format, version, epoch, full (bool: the initial copy, or re-protection)
      vm:       the machine state without RAM (CPU, devices, machine): toyvm's versioned state
      batches:  [{"index": u32 page numbers, "zero": packed bits (1 = the page is all zero, not sent),
                  "data": lz4 block of the non-zero pages in index order, "raw": its uncompressed size}]
      outputs:  network outputs produced since the previous checkpoint, [[seq, kind, conn, data], ...]

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

from toyvm import Machine
from toyvm.contract import PAGE_SIZE
from toyvm.errors import StateError

MAGIC = b"CVS1"
FORMAT = "colo-vmstate"
VERSION = 1
BATCH_PAGES = 512  # 2 MiB of pages per lz4 block: large enough to compress well, small enough to spread
_HEAD = struct.Struct(">4sI")
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lz4")  # lz4 releases the GIL


@dataclass
class EncodeStats:
    dirty_pages: int = 0
    zero_pages: int = 0
    raw_bytes: int = 0  # pages + machine state, before compression
    wire_bytes: int = 0  # the blob
    collect_s: float = 0.0  # gather pages and machine state
    compress_s: float = 0.0


def _compress(block: bytes) -> bytes:
    return lz4.block.compress(block, store_size=False)


def encode(vm: Machine, pages: npt.NDArray[np.int64], *, epoch: int, full: bool,
           outputs: list[list[Any]] | None = None) -> tuple[bytes, EncodeStats]:
    """The checkpoint blob for `pages` of vm's RAM plus its CPU and device state. The VM must be stopped."""
    st = EncodeStats(dirty_pages=len(pages))
    t0 = time.perf_counter()
    idx = np.asarray(pages, dtype=np.uint32)
    gathered = vm.ram.pages[idx]  # one copy: the VM may run again while we compress
    nonzero = gathered.view(np.uint64).any(axis=1) if len(idx) else np.zeros(0, bool)
    machine_state = vm.save_state(include_ram=False)
    st.collect_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    parts = []
    for lo in range(0, len(idx), BATCH_PAGES):
        nz = nonzero[lo:lo + BATCH_PAGES]
        parts.append((idx[lo:lo + BATCH_PAGES], nz, gathered[lo:lo + BATCH_PAGES][nz].tobytes()))
    compressed = list(_pool.map(_compress, [p[2] for p in parts])) if len(parts) > 1 else \
        [_compress(p[2]) for p in parts]
    batches = [{"index": i.tobytes(), "zero": np.packbits(~nz).tobytes(), "data": c, "raw": len(raw)}
               for (i, nz, raw), c in zip(parts, compressed)]
    body = msgpack.packb({"format": FORMAT, "version": VERSION, "epoch": epoch, "full": full,
                          "vm": machine_state, "batches": batches, "outputs": outputs or []},
                         use_bin_type=True)
    blob = _HEAD.pack(MAGIC, zlib.crc32(body)) + body
    st.compress_s = time.perf_counter() - t1
    st.zero_pages = int(len(idx) - np.count_nonzero(nonzero))
    st.raw_bytes = len(idx) * PAGE_SIZE + len(msgpack.packb(machine_state, use_bin_type=True))
    st.wire_bytes = len(blob)
    return blob, st


@dataclass
class StagedCheckpoint:
    """A checkpoint that arrived whole and verified, not yet applied."""

    epoch: int
    full: bool
    vm_state: dict[str, Any]
    index: npt.NDArray[np.uint32]  # every page the checkpoint carries
    zero: npt.NDArray[np.bool_]  # which of them are all zero
    data: npt.NDArray[np.uint8]  # the non-zero ones, (n, 4096), in index order
    outputs: list[list[Any]] = field(default_factory=list)

    @property
    def input_seq(self) -> int:
        return int(self.vm_state["devices"]["net"]["last_input_seq"])

    @property
    def output_seq(self) -> int:
        return int(self.vm_state["devices"]["net"]["last_output_seq"])


def decode(blob: bytes, vm: Machine, *, epoch: int) -> StagedCheckpoint:
    """Check everything in `blob` against `vm` and stage it; StateError names what is wrong."""
    if len(blob) < _HEAD.size:
        raise StateError(f"checkpoint {epoch}: state of {len(blob)} bytes is too short to be one")
    magic, crc = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise StateError(f"checkpoint {epoch}: bad state magic {magic!r}, expected {MAGIC!r}")
    body = memoryview(blob)[_HEAD.size:]
    if zlib.crc32(body) != crc:
        raise StateError(f"checkpoint {epoch}: checksum mismatch: the state is corrupt")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise StateError(f"checkpoint {epoch}: state is not valid msgpack ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StateError(f"checkpoint {epoch}: not a colo state")
    if m.get("version") != VERSION:
        raise StateError(f"checkpoint {epoch}: state version {m.get('version')!r} is not supported "
                         f"(this colo reads version {VERSION})")
    if m.get("epoch") != epoch:
        raise StateError(f"checkpoint {epoch}: the state says it is for epoch {m.get('epoch')!r}")
    try:
        vm_state, batches, outputs, full = m["vm"], m["batches"], m["outputs"], bool(m["full"])
        if "ram" in vm_state:
            raise StateError(f"checkpoint {epoch}: machine state must not carry RAM")
        vm.check_state(vm_state)
        indexes, zeros, datas = [], [], []
        npages = vm.ram.npages
        for b in batches:
            index = np.frombuffer(b["index"], dtype="<u4")
            zero = np.unpackbits(np.frombuffer(b["zero"], dtype=np.uint8), count=len(index)).astype(bool)
            if len(index) and int(index.max()) >= npages:
                raise StateError(f"checkpoint {epoch}: page index {int(index.max())} is outside guest RAM "
                                 f"({npages} pages)")
            want = int(np.count_nonzero(~zero)) * PAGE_SIZE
            if b["raw"] != want:
                raise StateError(f"checkpoint {epoch}: batch claims {b['raw']} bytes for {want // PAGE_SIZE} "
                                 "non-zero pages")
            raw = lz4.block.decompress(b["data"], uncompressed_size=want) if want else b""
            if len(raw) != want:
                raise StateError(f"checkpoint {epoch}: batch decompressed to {len(raw)} bytes, expected {want}")
            indexes.append(index)
            zeros.append(zero)
            datas.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE))
        if not isinstance(outputs, list):
            raise StateError(f"checkpoint {epoch}: outputs must be a list")
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, lz4.block.LZ4BlockError) as e:
        raise StateError(f"checkpoint {epoch}: malformed state ({e!r})") from None
    return StagedCheckpoint(
        epoch=epoch, full=full, vm_state=vm_state, outputs=outputs,
        index=np.concatenate(indexes) if indexes else np.zeros(0, np.uint32),
        zero=np.concatenate(zeros) if zeros else np.zeros(0, bool),
        data=np.concatenate(datas) if datas else np.zeros((0, PAGE_SIZE), np.uint8))


def apply(vm: Machine, staged: StagedCheckpoint) -> None:
    """Make `vm` the checkpointed VM: RAM pages, then CPU and devices (already checked by decode)."""
    ram = vm.ram
    if staged.full:
        ram.clear()
    ram.pages[staged.index[~staged.zero]] = staged.data
    ram.pages[staged.index[staged.zero]] = 0
    vm.restore_state(staged.vm_state)  # flushes translated code and the TLB, starts a new dirty epoch


def peek_ram_size(blob: bytes) -> int:
    """The RAM size a (full) checkpoint blob is for, so the secondary can build a matching VM first."""
    try:
        m = msgpack.unpackb(memoryview(blob)[_HEAD.size:], raw=False, strict_map_key=False)
        size = int(m["vm"]["machine"]["ram_size"])
    except Exception as e:  # noqa: BLE001 - any malformation is reported the same way
        raise StateError(f"initial state: cannot read the RAM size ({e!r})") from None
    return size
