"""The checkpoint-state decoder (`colo.vmstate.decode`), fuzzed against a real small VM: arbitrary
bytes, edits of a real checkpoint (with the CRC fixed up, so the edit reaches the parser behind it)
and structural edits of its msgpack body only ever raise StateError, and decoding never touches the
VM: its RAM, CPU and devices hash the same before and after."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
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
    """A small VM that ran a little, a real incremental checkpoint of it, and the digest to keep."""
    vm = Machine(RAM)
    vm.boot(guest("memtouch"), "pages=24 iters=0")
    vm.run_slice(0.02)
    assert b"memtouch: 24 pages" in vm.take_serial()
    vm.collect_dirty()
    vm.run_slice(0.01)
    blob, _ = vmstate.encode(vm, vm.collect_dirty(), epoch=5, full=False,
                             outputs=[[1, 2, 3, b"out"]], inputs=[[4, 2, 3, b"in"]])
    assert len(vmstate.decode(blob, vm, epoch=5).batches) >= 1  # the unmutated blob is good
    return {"vm": vm, "blob": blob, "digest": state_digest(vm)}


def with_crc(body: bytes) -> bytes:
    return struct.pack(">4sI", vmstate.MAGIC, zlib.crc32(body)) + body


def decode_leaves_vm_alone(world: dict[str, Any], blob: bytes) -> None:
    try:
        vmstate.decode(blob, world["vm"], epoch=5)
    except StateError:
        pass
    assert state_digest(world["vm"]) == world["digest"]


@FUZZ
@given(blob=st.binary(max_size=2000))
def test_arbitrary_bytes(world: dict[str, Any], blob: bytes) -> None:
    decode_leaves_vm_alone(world, blob)
    decode_leaves_vm_alone(world, with_crc(blob))  # past the checksum, into msgpack


@FUZZ
@given(data=st.data())
def test_byte_edits_of_a_real_checkpoint(world: dict[str, Any], data: st.DataObject) -> None:
    body = bytearray(world["blob"][8:])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body) - 1))
        if data.draw(st.booleans()):
            body[at] ^= data.draw(st.integers(1, 255))
        else:
            del body[at:at + data.draw(st.integers(1, 64))]
    decode_leaves_vm_alone(world, with_crc(bytes(body)))
    decode_leaves_vm_alone(world, world["blob"][:8] + bytes(body))  # the CRC catches it


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
def test_structural_edits_of_a_real_checkpoint(world: dict[str, Any], data: st.DataObject) -> None:
    # Replace or delete one node anywhere in the body, including inside the machine state (which
    # travels as msgpack bytes inside the body): every field rule of the decoder gets its turn.
    body = msgpack.unpackb(world["blob"][8:], raw=False, strict_map_key=False)
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
    decode_leaves_vm_alone(world, with_crc(msgpack.packb(body, use_bin_type=True)))


def test_page_indices_cannot_make_decode_allocate_more_than_guest_ram(world: dict[str, Any]) -> None:
    # The decompressed size is claimed by the sender; the indices must be inside RAM and strictly
    # increasing first, so no claim can exceed the RAM size.
    body = msgpack.unpackb(world["blob"][8:], raw=False, strict_map_key=False)
    pages = RAM // 4096
    body["batches"] = [{"index": struct.pack(f"<{pages + 1}I", *range(pages + 1)),
                        "zero": bytes((pages + 8) // 8), "data": b"", "raw": (pages + 1) * 4096}]
    with pytest.raises(StateError, match="outside guest RAM"):
        vmstate.decode(with_crc(msgpack.packb(body, use_bin_type=True)), world["vm"], epoch=5)
    assert state_digest(world["vm"]) == world["digest"]


LEAF_EDGES: list[object] = [None, -1, 2**40, 2**63, 2**64 - 1, 1.5, "x", b"x" * 17, []]


def test_every_leaf_of_the_machine_state_at_the_edges(world: dict[str, Any]) -> None:
    # A sweep rather than a sample: every register, MSR and device field, each set to values at the
    # edges of what msgpack carries. (Found: a control register value unicorn refuses used to escape
    # as UcError; it is a StateError now.)
    body = msgpack.unpackb(world["blob"][8:], raw=False, strict_map_key=False)
    vm_state = msgpack.unpackb(body["vm"], raw=False, strict_map_key=False)
    leaves = [p for p in paths(vm_state) if p and not isinstance(_at(vm_state, p), (dict, list))]
    assert len(leaves) > 50
    for where in leaves:
        for value in LEAF_EDGES:
            tree = msgpack.unpackb(body["vm"], raw=False, strict_map_key=False)
            _at(tree, where[:-1])[where[-1]] = value
            edited = {**body, "vm": msgpack.packb(tree, use_bin_type=True)}
            decode_leaves_vm_alone(world, with_crc(msgpack.packb(edited, use_bin_type=True)))


def _at(tree: Any, where: tuple[Any, ...]) -> Any:
    for key in where:
        tree = tree[key]
    return tree
