"""What the primary and the secondary share: the gateway link, heartbeats, and serving the guest.

A node has one inbox: every link delivers (link, event) pairs to it, so the main thread waits on one queue
for gateway input, replication messages and connection loss alike. A heartbeat thread speaks on every link
so the peers can tell a live node from a dead one even while the main thread is busy (a large checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from colo.link import Closed, Event, Link, ProtocolLink, Tracer, authenticate, connect
from colo.memory import keep_buffers_on_heap
from colo.errors import ColoError
from colo.messages import (
    CheckpointNow,
    ErrorMessage,
    Fence,
    Heartbeat,
    Input,
    NodeHello,
    NodeStatus,
    Output,
    Trigger,
)
from colo.protocol import ConnectionClosed
from toyvm import Machine, StopReason
from toyvm.devices.net import QueueFull

log = logging.getLogger("colo.node")

DEFAULT_HEARTBEAT_TIMEOUT = 0.8  # seconds of silence after which a peer counts as lost (DESIGN: under 1 s)
SLICE = 0.01


def state_digest(vm: Machine) -> dict[str, str]:
    """Hashes of the whole VM state (RAM, CPU, devices): equal digests mean equal VMs."""
    st = vm.save_state(include_ram=False)
    return {"ram": hashlib.sha256(memoryview(vm.ram.view)).hexdigest(),
            "cpu": hashlib.sha256(msgpack.packb(st["cpu"], use_bin_type=True)).hexdigest(),
            "devices": hashlib.sha256(msgpack.packb(st["devices"], use_bin_type=True)).hexdigest()}


class StateLog:
    """Test and teaching aid: with COLO_STATE_LOG=FILE a node appends the digest of its VM at every checkpoint
    (the primary when it takes one, the secondary when it applies one), so two logs can be compared."""

    def __init__(self) -> None:
        path = os.environ.get("COLO_STATE_LOG")
        self._f = open(path, "a", buffering=1) if path else None

    def write(self, vm: Machine | None, epoch: int | str) -> None:
        if self._f is not None and vm is not None:
            self._f.write(json.dumps({"epoch": epoch, **state_digest(vm)}) + "\n")


class NodeStop(Exception):
    """The node must stop serving: `exit_code` says why (see colo.cli)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GatewayLost(NodeStop):
    def __init__(self, why: str) -> None:
        super().__init__(f"lost the gateway ({why}): stopping, so there is never a second active copy", 3)


class Fenced(NodeStop):
    def __init__(self, why: str) -> None:
        super().__init__(f"fenced by the gateway: {why}", 4)


class GuestExited(NodeStop):
    def __init__(self, code: int) -> None:
        super().__init__(f"the guest powered off with exit code {code}", code)


@dataclass
class NodeConfig:
    key: bytes
    gateway: tuple[str, int]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    trace: bool = False
    hooks: str | None = None

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_timeout / 4


class Node:
    """Base of PrimaryNode and SecondaryNode."""

    ROLE = ""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.inbox: queue.Queue[tuple[Link, Event]] = queue.Queue()
        self.tracer = Tracer(self.ROLE) if cfg.trace else None
        self.gw: Link | None = None
        self.repl: ProtocolLink | None = None
        self.vm: Machine | None = None
        self.backlog: dict[int, Input] = {}  # inputs not yet in the VM, by seq: replays may arrive out of order
        self.epoch_outputs: list[list[Any]] = []  # outputs since the last checkpoint: the next one carries them
        self.requested_trigger: Trigger | None = None
        self.state = "starting"
        self._stop_heartbeat = threading.Event()
        self.state_log = StateLog()
        self.shutdown_requested = False
        sys.setswitchinterval(0.0005)  # hand the GIL over fast: link threads must not wait 5 ms to run
        keep_buffers_on_heap()

    # -- links ------------------------------------------------------------------------------------------
    def connect_gateway(self) -> None:
        sock = connect(self.cfg.gateway)
        hs = authenticate(sock, self.cfg.key, self.ROLE, "gateway")
        self.gw = Link(sock, hs, name="gateway", tracer=self.tracer, inbox=self.inbox)
        self.gw.send(NodeHello(self.ROLE, self.status_info()))
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.cfg.heartbeat_interval):
            if self.gw is not None:
                self.gw.try_send(NodeStatus(self.status_info()))
            repl = self.repl
            if repl is not None and not repl.closed:
                try:
                    repl.heartbeat()
                except Exception:  # noqa: BLE001 - a protocol in ERROR/CLOSED: the main loop sees the loss
                    pass

    def status_info(self) -> dict[str, Any]:
        return {"role": self.ROLE, "pid": os.getpid(), "state": self.state}

    def next_event(self, timeout: float) -> tuple[Link, Event] | None:
        """Wait up to `timeout` for an event. A gateway event is handled here and ends the wait with None
        (the caller re-checks its own state); any other event is returned."""
        deadline = time.monotonic() + timeout
        while True:
            try:  # what already arrived first (a fence before the gateway's close), then liveness
                link, ev = self.inbox.get_nowait()
            except queue.Empty:
                self.check_gateway()
                try:
                    link, ev = self.inbox.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.05)))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        return None
                    continue
            if link is self.gw:
                self.on_gateway_event(ev)
                return None
            return link, ev

    def request_shutdown(self) -> None:
        """From a signal handler: stop at the next exact point and leave cleanly."""
        self.shutdown_requested = True
        if self.vm is not None:
            self.vm.request_stop()

    def check_gateway(self) -> None:
        if self.shutdown_requested:
            raise NodeStop("stopped by a signal", 0)
        gw = self.gw
        if gw is not None and not gw.alive(self.cfg.heartbeat_timeout):
            raise GatewayLost("connection closed" if gw.closed else
                              f"silent for {time.monotonic() - gw.last_seen:.2f} s")

    def on_gateway_event(self, ev: Event) -> None:
        if isinstance(ev, Input):
            self.backlog[ev.seq] = ev
        elif isinstance(ev, Fence):
            raise Fenced(ev.reason)
        elif isinstance(ev, CheckpointNow):
            self.requested_trigger = ev.trigger
        elif isinstance(ev, (Closed, ConnectionClosed)):
            raise GatewayLost(getattr(ev, "reason", "connection closed"))
        elif isinstance(ev, Heartbeat):
            pass
        else:
            self.on_other_gateway_message(ev)

    def on_other_gateway_message(self, ev: Event) -> None:
        log.warning("%s: unexpected message from the gateway: %r", self.ROLE, ev)

    # -- serving the guest ------------------------------------------------------------------------------
    def deliver_inputs(self) -> None:
        assert self.vm is not None
        net = self.vm.net
        while self.backlog:
            seq = net.state.last_input_seq + 1
            ev = self.backlog.get(seq)
            if ev is None:
                # Drop what the VM has already (a replay, or a restored state that went past it); any other
                # gap is filled by the gateway's replay next.
                for old in [s for s in self.backlog if s < seq]:
                    del self.backlog[old]
                return
            try:
                net.deliver(ev.kind, ev.conn, ev.data, seq=ev.seq)
            except QueueFull:
                return  # the guest has not caught up: hold the rest (the gateway holds what we do not read)
            del self.backlog[seq]

    def forward_outputs(self) -> None:
        assert self.vm is not None and self.gw is not None
        for ev in self.vm.net.take_output():
            self.epoch_outputs.append([ev.seq, ev.kind, ev.conn, ev.data])
            try:
                self.gw.send(Output(ev.seq, ev.kind, ev.conn, ev.data))
            except OSError as e:
                raise GatewayLost(str(e)) from None

    def serve(self, seconds: float, on_replication_event: Callable[[Link, Event], None] | None = None) -> None:
        """Run the guest for `seconds` (less if a checkpoint is requested), moving inputs and outputs."""
        vm = self.vm
        assert vm is not None
        deadline = time.monotonic() + seconds
        while self.requested_trigger is None:
            self.check_gateway()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.deliver_inputs()
            r = vm.run_slice(min(SLICE, left))
            self.forward_outputs()
            console = vm.take_serial()
            if console:  # the serial port is this node's local console: not output-committed
                sys.stdout.buffer.write(console)
                sys.stdout.flush()
            if r.reason is StopReason.POWER_OFF:
                self.state_log.write(vm, "final")
                raise GuestExited(vm.exit_code or 0)
            idle = r.reason is StopReason.HALT and not vm.wakeup_pending and not self.backlog
            # Idle guest: sleep until something arrives or the deadline; busy guest: take what came in.
            got = self.next_event(max(0.0, deadline - time.monotonic()) if idle else 0.0)
            while got is not None or not self.inbox.empty():
                if got is not None and on_replication_event is not None:
                    on_replication_event(*got)
                got = self.next_event(0.0)

    def close_replication(self, why: str | None = None) -> None:
        """Drop the replication link, telling the peer `why` first when there is a reason to give."""
        repl, self.repl = self.repl, None
        if repl is None:
            return
        if why is not None:
            try:
                repl.try_send(ErrorMessage(why))
            except ColoError:
                pass  # the protocol side is already in ERROR or CLOSED: nothing more to say
        repl.close()

    def stop(self) -> None:
        self._stop_heartbeat.set()
        for link in (self.repl, self.gw):
            if link is not None:
                link.close()

