"""Each device's behaviour and its save/restore, driven through the bus the way the CPU hooks drive it."""
from __future__ import annotations

import time

import pytest

from toyvm.bus import PortBus
from toyvm.contract import IO_COST_NS
from toyvm.devices.clock import Clock
from toyvm.devices.net import (
    BAD_DESC,
    CLOSE,
    DATA,
    EMPTY,
    FULL,
    OK,
    OPEN,
    TX_MAX_EVENTS,
    NetDevice,
    QueueFull,
    SequenceError,
)
from toyvm.devices.power import Power
from toyvm.devices.rng import Rng
from toyvm.devices.serial import Serial
from toyvm.errors import ConfigError, GuestFault, StateError
from toyvm.ram import GuestRAM


def test_bus_rejects_overlapping_ranges_and_dispatches() -> None:
    bus = PortBus()
    serial, clock = Serial(), Clock()
    bus.register(serial)
    bus.register(clock)
    with pytest.raises(ConfigError, match="overlap serial"):
        bus.register(Serial())
    assert bus.find(0x3FF) is serial and bus.find(0x400) is None and bus.find(0x52F) is clock
    with pytest.raises(GuestFault, match="port 0x80: no device claims"):
        bus.read(0x80, 1)
    with pytest.raises(GuestFault, match="its registers are 1 byte"):
        bus.write(0x3F8, 4, 65)


def test_serial_transmit_receive_and_line_status() -> None:
    bus, s = PortBus(), Serial()
    bus.register(s)
    for ch in b"hi":
        bus.write(0x3F8, 1, ch)
    assert s.take_output() == b"hi" and s.take_output() == b""
    assert bus.read(0x3FD, 1) == 0x60  # THR empty + transmitter empty, nothing received
    s.feed(b"ok")
    assert bus.read(0x3FD, 1) & 1
    assert bytes([bus.read(0x3F8, 1), bus.read(0x3F8, 1)]) == b"ok"
    assert bus.read(0x3F8, 1) == 0 and not bus.read(0x3FD, 1) & 1
    bus.write(0x3FF, 1, 0x5A)
    bus.write(0x3FB, 1, 0x03)
    assert bus.read(0x3FF, 1) == 0x5A and bus.read(0x3FB, 1) == 0x03 and bus.read(0x3FA, 1) == 0x01
    s.feed(b"x")
    saved = s.save()
    s2 = Serial()
    s2.restore(saved)
    assert s2.save() == saved and s2.read(0x3F8) == ord("x")


def test_power_records_the_exit_code() -> None:
    seen: list[int] = []
    p = Power(seen.append)
    p.write(0x500, 0x1_03)
    assert seen == [3] and p.save() == {"exit_code": 3}
    p2 = Power(seen.append)
    p2.restore(p.save())
    assert p2.state.exit_code == 3


def test_clock_virtual_time_latches_and_timer() -> None:
    c = Clock()
    c.tick_io()
    c.tick_io()
    assert c.read(0x510) == 2 * IO_COST_NS and c.read(0x514) == 0
    c.state.virtual_ns = (5 << 32) + 7
    assert c.read(0x510) == 7
    c.state.virtual_ns += 1  # the high half comes from the latch, not from the moving clock
    assert c.read(0x514) == 5
    before = time.time_ns()
    lo = c.read(0x518)
    host = (c.read(0x51C) << 32) | lo
    assert before <= host <= time.time_ns()
    c.state.virtual_ns = 100
    c.write(0x520, 1000)
    assert not c.timer_armed  # armed only when the high half is written
    c.write(0x524, 1)
    assert c.timer_armed and c.state.deadline == (1 << 32) + 1000
    c.expire_timer()
    assert c.state.virtual_ns == (1 << 32) + 1000
    assert not c.timer_armed
    saved = c.save()
    c2 = Clock()
    c2.restore(saved)
    assert c2.save() == saved


def test_rng_is_random_and_stateless() -> None:
    r = Rng()
    assert len({r.read(0x530) for _ in range(16)}) > 1
    r.restore({})
    with pytest.raises(StateError):
        r.restore({"seed": 1})


@pytest.fixture
def net() -> NetDevice:
    return NetDevice(GuestRAM(2 << 20))


def write_desc(ram: GuestRAM, at: int, kind: int = 0, conn: int = 0, buf: int = 0, cap: int = 0) -> None:
    ram.write(at, kind.to_bytes(4, "little") + conn.to_bytes(4, "little") + buf.to_bytes(8, "little")
              + cap.to_bytes(4, "little") + bytes(12))


def read_desc(ram: GuestRAM, at: int) -> tuple[int, int, int, int]:
    return ram.read_u32(at), ram.read_u32(at + 4), ram.read_u32(at + 20), ram.read_u64(at + 24)


def test_net_receive_events_with_dma_and_partial_data(net: NetDevice) -> None:
    ram = net.ram
    assert net.read(0x540) == 0x2  # nothing to receive, room to send
    assert net.deliver(OPEN, 9) and net.deliver(DATA, 9, b"hello world") and net.deliver(CLOSE, 9)
    assert net.read(0x540) & 1
    write_desc(ram, 0x1000, buf=0x2000, cap=5)
    net.write(0x544, 0x1000)
    assert net.read(0x54C) == OK and read_desc(ram, 0x1000) == (OPEN, 9, 0, 1)
    net.write(0x544, 0x1000)
    assert read_desc(ram, 0x1000) == (DATA, 9, 5, 2) and ram.read(0x2000, 5) == b"hello"
    net.write(0x544, 0x1000)  # the rest of the same event, same seq
    assert read_desc(ram, 0x1000) == (DATA, 9, 5, 2) and ram.read(0x2000, 5) == b" worl"
    net.write(0x544, 0x1000)
    assert read_desc(ram, 0x1000) == (DATA, 9, 1, 2) and ram.read(0x2000, 1) == b"d"
    net.write(0x544, 0x1000)
    assert read_desc(ram, 0x1000)[:2] == (CLOSE, 9)
    net.write(0x544, 0x1000)
    assert net.read(0x54C) == EMPTY
    assert net.state.last_input_seq == 3


def test_net_sequence_numbers_replay_and_push_back(net: NetDevice) -> None:
    assert net.deliver(OPEN, 1, seq=1)
    assert not net.deliver(OPEN, 1, seq=1)  # a replayed duplicate is ignored
    with pytest.raises(SequenceError, match="skips ahead"):
        net.deliver(DATA, 1, b"x", seq=5)
    with pytest.raises(QueueFull):
        for _ in range(5000):
            net.deliver(DATA, 1, b"y")
    assert len(net.state.rx) == 1024  # nothing beyond the bound was taken, nothing was dropped


def test_net_send_output_and_bounds(net: NetDevice) -> None:
    ram = net.ram
    ram.write(0x3000, b"reply")
    write_desc(ram, 0x1000, DATA, 4, 0x3000, 5)
    net.write(0x548, 0x1000)
    assert net.read(0x54C) == OK and ram.read_u64(0x1000 + 24) == 1
    write_desc(ram, 0x1000, CLOSE, 4)
    net.write(0x548, 0x1000)
    out = net.take_output()
    assert [(e.seq, e.kind, e.conn, e.data) for e in out] == [(1, DATA, 4, b"reply"), (2, CLOSE, 4, b"")]
    write_desc(ram, 0x1000, 7, 4)
    net.write(0x548, 0x1000)
    assert net.read(0x54C) == BAD_DESC
    write_desc(ram, 0x1000, DATA, 4, 0x3000, 1)
    for _ in range(TX_MAX_EVENTS):
        net.write(0x548, 0x1000)
    assert net.read(0x540) & 0x2 == 0
    net.write(0x548, 0x1000)
    assert net.read(0x54C) == FULL and net.tx_unblocked is False
    net.take_output()
    assert net.tx_unblocked  # a guest that found the queue full is woken once there is room


def test_net_dma_outside_ram_faults_and_keeps_the_event(net: NetDevice) -> None:
    net.deliver(DATA, 1, b"payload")
    write_desc(net.ram, 0x1000, buf=net.ram.size - 2, cap=100)
    with pytest.raises(GuestFault, match=r"net RECV buffer .* outside guest RAM"):
        net.write(0x544, 0x1000)
    assert net.state.rx == [[1, DATA, 1, b"payload"]]
    with pytest.raises(GuestFault, match="net RECV descriptor"):
        net.write(0x544, net.ram.size - 8)


def test_net_save_restore_and_malformed_state(net: NetDevice) -> None:
    net.deliver(OPEN, 2)
    net.deliver(DATA, 2, b"abc")
    saved = net.save()
    other = NetDevice(net.ram)
    other.restore(saved)
    assert other.save() == saved
    bad = dict(saved, rx=[[1, 99, 2, b""]])
    with pytest.raises(StateError, match="malformed queued event"):
        other.restore(bad)
    with pytest.raises(StateError, match="do not match"):
        other.restore({"rx": []})
    assert other.save() == saved  # a rejected state changed nothing
