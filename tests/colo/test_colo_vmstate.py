"""Checkpoint state in pieces (colo.vmstate): what the primary stages and streams, the secondary stages and
applies, page for page, in both staging modes, with deltas, across batch boundaries and with the buffers reused."""
from __future__ import annotations

import contextlib
import gc

import msgpack
import numpy as np
import pytest

from colo import vmstate
from colo.node import state_digest
from conftest import guest
from toyvm import Machine
from toyvm.errors import StateError

RAM = 8 << 20


def running_vm() -> Machine:
    vm = Machine(RAM)
    vm.boot(guest("memtouch"), "pages=700 iters=0 fill=random")  # more than one batch of random pages
    vm.run_slice(0.05)
    vm.take_serial()
    return vm


def send(stager: vmstate.Stager, vm: Machine, receiver: vmstate.Receiver, target: Machine, epoch: int, *,
         full: bool, copy: bool, delta: bool = False, run_between: bool = False) -> vmstate.EncodeStats:
    pages = vm.ram.nonzero_pages() if full else vm.collect_dirty()
    if full:
        vm.collect_dirty()
    staged = stager.stage(vm, pages, epoch=epoch, full=full, copy=copy, delta=delta, outputs=[[epoch + 1, 2, 1, b"o"]])
    expected = state_digest(vm)
    if run_between:  # pipelined: the guest runs on while the pieces are made from the staged copy
        vm.run_slice(0.02)
    receiver.begin(epoch=None if full else epoch, full=full, vm=target, base=lambda: target.ram.pages)
    count = 0
    for piece in stager.pieces(staged):
        receiver.feed(bytes(piece))
        count += 1
    assert count == stager.count(staged)
    got = receiver.finish()
    assert got.outputs == [[epoch + 1, 2, 1, b"o"]] and got.epoch == epoch
    vmstate.apply(target, got)
    assert state_digest(target) == expected
    return staged.stats


@pytest.mark.parametrize("copy", [False, True], ids=["in-place", "staged-copy"])
@pytest.mark.parametrize("delta", [False, True], ids=["plain", "delta"])
def test_checkpoints_reproduce_the_vm(copy: bool, delta: bool) -> None:
    vm, target = running_vm(), Machine(RAM)
    stager, receiver = vmstate.Stager(), vmstate.Receiver()
    send(stager, vm, receiver, target, 0, full=True, copy=False, delta=delta)
    for epoch in range(1, 5):
        while len(vm.ram.peek_dirty()) <= vmstate.BATCH_PAGES:
            vm.run_slice(0.01)
        st = send(stager, vm, receiver, target, epoch, full=False, copy=copy, delta=delta, run_between=copy)
        assert st.dirty_pages > vmstate.BATCH_PAGES and st.wire_bytes > 0


def test_a_delta_of_an_unchanged_page_is_tiny() -> None:
    vm, target = running_vm(), Machine(RAM)
    stager, receiver = vmstate.Stager(), vmstate.Receiver()
    send(stager, vm, receiver, target, 0, full=True, copy=False, delta=True)
    vm.collect_dirty()
    vm.ram.write(0x300000, b"\x01")  # one byte of a random page: its delta is nearly all zero
    st = send(stager, vm, receiver, target, 1, full=False, copy=True, delta=True)
    assert st.dirty_pages == 1 and st.wire_bytes < 3000


def test_an_abandoned_stream_frees_its_buffers_before_reuse() -> None:
    vm, target = running_vm(), Machine(RAM)
    stager, receiver = vmstate.Stager(), vmstate.Receiver()
    send(stager, vm, receiver, target, 0, full=True, copy=False)
    vm.run_slice(0.02)
    dirty = vm.collect_dirty()
    staged = stager.stage(vm, dirty, epoch=1, full=False, copy=True)
    with contextlib.closing(stager.pieces(staged)) as pieces:
        next(pieces)
        next(pieces)  # the first batch; the rest are being compressed when we give up
    vm.run_slice(0.02)
    # That state never arrived: its pages go again with the next (the guest may not have rewritten them all in
    # 20 ms on a busy machine).
    for page in dirty:
        vm.ram.mark(int(page) << 12, 1)
    send(stager, vm, receiver, target, 1, full=False, copy=True)  # a new state over the same buffers


def test_pieces_are_bounded_and_numbered() -> None:
    vm = running_vm()
    pieces, st = vmstate.encode(vm, np.arange(0, RAM // 4096, dtype=np.int64), epoch=3, full=False)
    assert len(pieces) == 1 + (RAM // 4096 + vmstate.BATCH_PAGES - 1) // vmstate.BATCH_PAGES
    assert max(map(len, pieces)) < vmstate.BATCH_PAGES * 4096 + 64 * 1024
    assert st.wire_bytes == sum(map(len, pieces)) and st.zero_pages == 0


def test_no_collection_while_a_head_is_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver unpacks a head with the collector off (a hybrid head's thousands of events would set off
    collections of every generation), and leaves it as it found it, on or off, also when the unpack fails."""
    seen: list[bool] = []
    real = msgpack.unpackb

    def unpackb(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(msgpack, "unpackb", unpackb)
    vm = Machine(RAM)
    pieces, _ = vmstate.encode(vm, np.array([0], dtype=np.int64), epoch=1, full=True,
                               outputs=[[s, 2, 1, b"+OK\r\n"] for s in range(1, 2001)])
    was = gc.isenabled()
    try:
        for on in (True, False):
            (gc.enable if on else gc.disable)()
            rx = vmstate.Receiver()
            rx.begin(epoch=1, full=True, vm=Machine(RAM))
            for p in pieces:
                rx.feed(p)
            assert len(rx.finish().outputs) == 2000
            assert gc.isenabled() is on
        gc.enable()
        rx = vmstate.Receiver()
        rx.begin(epoch=1, full=True, vm=Machine(RAM))
        with pytest.raises(StateError):
            rx.feed(pieces[0][:-3] + b"bad")  # a corrupt head: refused, the collector on again
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    assert seen and seen[0] is False  # the head (the first unpack of each) was unpacked with the collector off
