"""The checkpoint-state decoder (`colo.vmstate.Receiver`, through `decode`), fuzzed against a real small VM:
arbitrary pieces, byte edits of a real checkpoint's pieces (with their CRCs fixed up, so the edit reaches the
parser behind them), structural edits of its head, and pieces dropped, repeated or reordered only ever raise
StateError, and decoding never touches the VM: its RAM, CPU and devices hash the same before and after."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo import vmstate
from colo.node import state_digest
from conftest import guest
from toyvm import Machine
from toyvm.errors import StateError

RAM = 4 << 20  # memtouch puts its buffer at 2 MiB
FUZZ = settings(database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    """A small VM that ran a little, a real incremental checkpoint of it (a head and two batches: memtouch's
    pages and its stack, across a batch boundary), and the digest to keep."""
    vm = Machine(RAM)
    vm.boot(guest("memtouch"), "pages=24 iters=0")
    vm.run_slice(0.02)
    assert b"memtouch: 24 pages" in vm.take_serial()
    vm.collect_dirty()
    vm.run_slice(0.01)
    pages = sorted(set(vm.collect_dirty().tolist()) | set(range(100, 700)))  # more than one batch
    pieces, _ = vmstate.encode(vm, np.array(pages, dtype=np.int64), epoch=5, full=False,
                               outputs=[[1, 2, 3, b"out"]], inputs=[[4, 2, 3, b"in"]])
    assert len(pieces) == 3, len(pieces)
    staged = vmstate.decode(pieces, vm, epoch=5)  # the unmutated state is good
    assert len(staged.index) == len(pages)
    return {"vm": vm, "pieces": pieces, "digest": state_digest(vm)}


def head_body(piece: bytes) -> bytes:
    return piece[12:]


def with_head(body: bytes) -> bytes:
    """A head piece for `body` with a correct length and CRC."""
    return struct.pack("<4sII", vmstate.HEAD_MAGIC, len(body), zlib.crc32(body)) + body


def with_crc(batch: bytes) -> bytes:
    """A batch piece with its CRC fixed up."""
    b = bytearray(batch)
    struct.pack_into("<I", b, 16, zlib.crc32(bytes(b[20:]), zlib.crc32(bytes(b[:16]))))
    return bytes(b)


def decode_leaves_vm_alone(world: dict[str, Any], pieces: list[bytes]) -> None:
    try:
        vmstate.decode(pieces, world["vm"], epoch=5)
    except StateError:
        pass
    assert state_digest(world["vm"]) == world["digest"]


@FUZZ
@given(blobs=st.lists(st.binary(max_size=2000), max_size=4))
def test_arbitrary_pieces(world: dict[str, Any], blobs: list[bytes]) -> None:
    decode_leaves_vm_alone(world, blobs)
    decode_leaves_vm_alone(world, [with_head(b) for b in blobs[:1]] + blobs[1:])  # past the CRC, into msgpack
    decode_leaves_vm_alone(world, world["pieces"][:1] + blobs)  # a good head, then anything
    decode_leaves_vm_alone(world, world["pieces"][:1] + [with_crc(b"CVB2" + b[4:]) for b in blobs if len(b) > 20])


@FUZZ
@given(data=st.data())
def test_byte_edits_of_a_real_checkpoint(world: dict[str, Any], data: st.DataObject) -> None:
    pieces = list(world["pieces"])
    which = data.draw(st.integers(0, len(pieces) - 1))
    piece = bytearray(pieces[which])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(piece) - 1))
        if data.draw(st.booleans()):
            piece[at] ^= data.draw(st.integers(1, 255))
        else:
            del piece[at:at + data.draw(st.integers(1, 64))]
    edited = bytes(piece)
    decode_leaves_vm_alone(world, [*pieces[:which], edited, *pieces[which + 1:]])  # the CRCs catch it
    fixed = with_head(edited[12:]) if which == 0 else with_crc(edited) if len(edited) >= 20 else edited
    decode_leaves_vm_alone(world, [*pieces[:which], fixed, *pieces[which + 1:]])


@FUZZ
@given(data=st.data())
def test_pieces_dropped_repeated_or_reordered(world: dict[str, Any], data: st.DataObject) -> None:
    pieces = world["pieces"]
    order = data.draw(st.lists(st.integers(0, len(pieces) - 1), max_size=6))
    if order == list(range(len(pieces))):
        return  # that one is the good state
    decode_leaves_vm_alone(world, [pieces[i] for i in order])


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded msgpack tree (map keys and list indices), parents first."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_structural_edits_of_the_head(world: dict[str, Any], data: st.DataObject) -> None:
    # Replace or delete one node anywhere in the head, including inside the machine state (which travels as
    # msgpack bytes inside the head): every field rule of the decoder gets its turn.
    body = msgpack.unpackb(head_body(world["pieces"][0]), raw=False, strict_map_key=False)
    inner_vm = data.draw(st.booleans())
    tree = msgpack.unpackb(body["vm"], raw=False, strict_map_key=False) if inner_vm else body
    where = data.draw(st.sampled_from(paths(tree)[1:]))
    parent = tree
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.integers(0, 4)) == 0 and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(json_like)
    if inner_vm:
        body["vm"] = msgpack.packb(tree, use_bin_type=True)
    decode_leaves_vm_alone(world, [with_head(msgpack.packb(body, use_bin_type=True)), *world["pieces"][1:]])


def batch(number: int, index: list[int], pages: bytes, flags: int = 0) -> bytes:
    head = struct.pack("<4sIIII", vmstate.BATCH_MAGIC, number, len(index), flags, 0)
    return with_crc(head + struct.pack(f"<{len(index)}I", *index) + lz4.block.compress(pages, store_size=False))


def test_page_indices_cannot_make_decode_allocate_more_than_guest_ram(world: dict[str, Any]) -> None:
    # The head announces the pages; the staging buffer is sized from that, so it must fit the VM's RAM, and every
    # page number must be inside RAM.
    body = msgpack.unpackb(head_body(world["pieces"][0]), raw=False, strict_map_key=False)
    pages = RAM // 4096
    body["pages"], body["batches"] = pages + 1, (pages + 1 + vmstate.BATCH_PAGES - 1) // vmstate.BATCH_PAGES
    with pytest.raises(StateError, match="pages announced for a VM of"):
        vmstate.decode([with_head(msgpack.packb(body, use_bin_type=True))], world["vm"], epoch=5)
    body["pages"], body["batches"] = 1, 1
    with pytest.raises(StateError, match="outside guest RAM"):
        vmstate.decode([with_head(msgpack.packb(body, use_bin_type=True)), batch(0, [pages], bytes(4096))],
                       world["vm"], epoch=5)
    assert state_digest(world["vm"]) == world["digest"]


@pytest.mark.parametrize("index, pages, flags, text", [
    ([5, 5], bytes(8192), 0, "strictly increasing"),
    ([6, 5], bytes(8192), 0, "strictly increasing"),
    ([5], bytes(4095), 0, "does not decompress to its 1 pages"),
    ([5], bytes(8192), 0, "does not decompress to its 1 pages"),
    ([5], bytes(4096), 1, "is a delta, but there is nothing to apply it to"),
    ([5], bytes(4096), 4, "unknown flags"),
])
def test_bad_batches_are_refused(world: dict[str, Any], index: list[int], pages: bytes, flags: int,
                                 text: str) -> None:
    body = msgpack.unpackb(head_body(world["pieces"][0]), raw=False, strict_map_key=False)
    body["pages"], body["batches"] = len(index), 1
    with pytest.raises(StateError, match=text):
        vmstate.decode([with_head(msgpack.packb(body, use_bin_type=True)), batch(0, index, pages, flags)],
                       world["vm"], epoch=5)
    assert state_digest(world["vm"]) == world["digest"]


def test_a_state_cut_short_is_refused(world: dict[str, Any]) -> None:
    pieces = world["pieces"]
    for n in range(len(pieces)):
        with pytest.raises(StateError):
            vmstate.decode(pieces[:n], world["vm"], epoch=5)
    with pytest.raises(StateError, match="head is cut short"):
        vmstate.decode([pieces[0][:100], pieces[1]], world["vm"], epoch=5)


LEAF_EDGES: list[object] = [None, -1, 2**40, 2**63, 2**64 - 1, 1.5, "x", b"x" * 17, []]


def test_every_leaf_of_the_machine_state_at_the_edges(world: dict[str, Any]) -> None:
    # A sweep rather than a sample: every register, MSR and device field, each set to values at the
    # edges of what msgpack carries. (Found: a control register value unicorn refuses used to escape
    # as UcError; it is a StateError now.)
    body = msgpack.unpackb(head_body(world["pieces"][0]), raw=False, strict_map_key=False)
    vm_state = msgpack.unpackb(body["vm"], raw=False, strict_map_key=False)
    leaves = [p for p in paths(vm_state) if p and not isinstance(_at(vm_state, p), (dict, list))]
    assert len(leaves) > 50
    for where in leaves:
        for value in LEAF_EDGES:
            tree = msgpack.unpackb(body["vm"], raw=False, strict_map_key=False)
            _at(tree, where[:-1])[where[-1]] = value
            edited = {**body, "vm": msgpack.packb(tree, use_bin_type=True)}
            decode_leaves_vm_alone(world, [with_head(msgpack.packb(edited, use_bin_type=True)),
                                           *world["pieces"][1:]])


def _at(tree: Any, where: tuple[Any, ...]) -> Any:
    for key in where:
        tree = tree[key]
    return tree
