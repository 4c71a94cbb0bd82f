"""A node process: one VM, one role at a time, and what both roles share.

A node is primary (it runs the guest and checkpoints it), secondary (it holds a copy and takes over on failover) or
spare (a secondary with no copy yet, waiting for the gateway to pair it with a primary). Its role is a mode, not a
process: a promoted secondary becomes a primary in place, with the same VM, and can take a secondary of its own.
`Node.run` drives the roles (colo.primary.PrimaryRole, colo.secondary.SecondaryRole) one after the other.

Two threads: the VM thread (this module's loops, the roles) and the I/O thread (colo.nodeio), which owns the
sockets, sends the heartbeats and turns silence into events.

Losing the gateway is not losing the service: the node stops taking input and releasing output (the primary
pauses its guest), keeps its VM and its pair, and reconnects until a gateway answers. It gives up only when told
(fence, shutdown) or when a newer generation exists.
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import queue
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from colo import events, sched
from colo.errors import ColoError
from colo.events import STREAM, kernel_id
from colo.gate import Gate
from colo.link import DEFAULT_HEARTBEAT_TIMEOUT, Closed, Conn
from colo.memory import keep_buffers_on_heap
from colo.messages import (
    BATCH_BYTES,
    BATCH_EVENTS,
    CheckpointNow,
    CheckpointReply,
    CheckpointRequest,
    ErrorMessage,
    Fence,
    Heartbeat,
    Input,
    InputFloor,
    Inputs,
    Message,
    NodeHello,
    NodeStatus,
    Output,
    Outputs,
    Progress,
    Promote,
    Shutdown,
    Step,
    VmstateLoaded,
    VmstateReceived,
    Welcome,
)
from colo.netevents import KIND_CLOSE, KIND_OPEN, NetEvent, to_events
from colo.nodeio import Attached, Detached, Heard, NodeEvent, NodeIO, Silent, Source
from colo.protocol import ConnectionClosed
from colo.vmstate import FORMAT as _FORMAT
from colo.vmstate import VERSION as _STATE_VERSION
from toyvm import Machine
from toyvm.devices.net import QueueFull
from toyvm.version import VERSION

log = logging.getLogger("colo.node")

SLICE = 0.01
EXIT_FENCED = 4
STATE_FORMAT = f"{_FORMAT}/{_STATE_VERSION}"  # a node can protect another only if it reads its checkpoints
EXIT_FAULT = 125  # the guest faulted (as `toyvm run`)
LEAVING = "leaving: "  # an error message that starts so is a deliberate end (a stop, a guest that ended), not a loss


class Mode(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class NodeState(enum.Enum):
    """What the node is doing, as `colo status` shows it."""

    STARTING = "starting"
    SPARE = "spare"  # a secondary with no copy: waiting for a primary
    RECEIVING = "receiving the copy"
    SECONDARY = "secondary"
    SECONDARY_RUNNING = "secondary (hybrid: running)"
    FAILOVER_REQUESTED = "failover requested"
    TAKING_OVER = "taking over"
    UNPROTECTED = "active (unprotected)"
    PROTECTING = "active (copying to a secondary)"
    PROTECTED = "active (protected)"
    DETACHED = "waiting for the gateway"
    HANDED_OVER = "handed over (holding still)"
    ENDED = "ended"


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

    def write(self, vm: Machine | None, epoch: int | str, generation: int = 0) -> None:
        if self._f is not None and vm is not None:
            self._f.write(json.dumps({"epoch": epoch, "generation": generation, **state_digest(vm)}) + "\n")


class NodeStop(Exception):
    """The node must stop serving: `exit_code` says why (see colo.cli)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Fenced(NodeStop):
    def __init__(self, why: str) -> None:
        super().__init__(f"fenced by the gateway: {why}", EXIT_FENCED)


class GuestExited(NodeStop):
    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or f"the guest powered off with exit code {code}", code)


@dataclass
class NodeConfig:
    """Everything a node needs in any role (a secondary that is promoted checkpoints like a primary)."""

    key: bytes
    gateway: tuple[str, int]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    trace: bool = False
    hooks: str | None = None
    mode: str = "periodic"  # "hybrid": the secondary's VM runs too
    # The guest's serial console on stdout: "active" while this node is the primary (one copy of the console
    # for whoever watches, also in hybrid mode, where the secondary's VM prints the same lines), "always", "off"
    console: str = "active"
    encrypt: bool = True  # frames encrypted as well as authenticated, on every link
    interval: float = 0.1  # periodic: seconds between checkpoints
    backstop: float = 2.0  # hybrid: a checkpoint at least this often
    checkpoint_mode: str = "pipelined"  # or "strict": the guest stays stopped until vmstate-loaded
    delta: bool = False  # send pages XOR their previous content (colo.vmstate; docs/decisions.md)
    stats: str | None = None  # append one JSON line per checkpoint
    # how a new secondary gets the VM: "live" (rounds of pages while the guest serves, then one short stop) or
    # "stop" (the guest stops for the whole copy). A guest that has not run yet is always copied in one stop.
    copy: str = "live"
    # primary: the guest to boot
    guest: str = ""
    ram: int = 64 << 20
    cmdline: str = ""
    # secondary: where primaries connect, and the address to give them (default: the one bound)
    listen: tuple[str, int] = ("127.0.0.1", 0)
    advertise: tuple[str, int] | None = None
    on_listening: Callable[[tuple[str, int]], None] | None = field(default=None, repr=False)

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_timeout / 4


class Node:
    """The process: its VM, its I/O thread, its generation; the roles do the rest."""

    def __init__(self, cfg: NodeConfig, role: Mode) -> None:
        self.cfg = cfg
        self.id = secrets.token_hex(6)
        self.mode = role
        STREAM.node, STREAM.role_of = self.id, self.trace_role  # before the first event
        events.started()
        self.state = NodeState.STARTING
        self.generation = 1 if role is Mode.PRIMARY else 0
        self.hybrid = cfg.mode == "hybrid"
        self.vm: Machine | None = None
        self.backlog: dict[int, NetEvent] = {}  # inputs not yet in the VM, by seq: replays may come out of order
        self.received_seq = 0  # the highest input seq received
        self.conns_open: set[int] = set()  # connections the VM has open (from its inputs and outputs)
        self.epoch_outputs: list[list[Any]] = []  # outputs since the last checkpoint: the next one carries them
        # Pipelined checkpoints: outputs the guest produced after the stop of a checkpoint still in flight reach
        # the gateway only after that checkpoint's commit, so that the gateway never sees output of epoch E+1
        # before E is complete (it could otherwise release, on a match in hybrid mode, output a failover to E
        # would have to take back).
        self.hold_outputs = False
        self.held_outputs: list[list[Any]] = []
        self.gateway_id = ""
        self.attached = False  # a gateway welcomed us and is heard
        self.shutdown_requested = False
        self.state_log = StateLog()
        self.role: Any = None  # the current role object (PrimaryRole or SecondaryRole)
        self._taken_sent = 0
        self.runs: dict[str, Any] = {}  # as a primary: which guest image, how much RAM (what spares may insist on)
        self.wants: dict[str, Any] = {}  # as a spare: the guest and RAM it insists on protecting (empty: any)
        self.io = NodeIO(key=cfg.key, gateway=cfg.gateway, role=self.hello_role,
                         heartbeat_timeout=cfg.heartbeat_timeout, hello=self.hello, status=self.status,
                         on_message=self._urgent, encrypt=cfg.encrypt)
        self.inbox = self.io.inbox
        self.gate = self.io.gate = Gate()  # step mode and slow motion (teaching): colo.gate
        sys.setswitchinterval(0.0005)  # hand the GIL over fast: the I/O thread must not wait 5 ms to run
        keep_buffers_on_heap()

    @property
    def state(self) -> NodeState:
        return self._state

    @state.setter
    def state(self, new: NodeState) -> None:
        old = getattr(self, "_state", None)
        self._state = new
        if STREAM.active and new is not old:
            STREAM.emit("state", was=old.value if old is not None else None, now=new.value)

    def trace_role(self) -> str:
        """The role the event stream stamps on this node's events now (a spare is named so until it is paired)."""
        if self.mode is Mode.PRIMARY:
            return "primary"
        return "spare" if getattr(self, "_state", NodeState.STARTING) in (NodeState.SPARE, NodeState.STARTING) \
            else "secondary"

    # -- what the gateway learns about us -----------------------------------------------------------------------
    def hello_role(self) -> str:
        if self.mode is Mode.PRIMARY:
            return "primary"
        return "secondary" if self.role is not None and self.role.holds_copy() else "spare"

    def hello(self) -> NodeHello:
        role = self.role
        info = self.status_info()
        return NodeHello(self.hello_role(), self.id, self.generation, role.epoch_held() if role else 0,
                         self.received_seq, self.vm.net.state.last_output_seq if self.vm is not None else 0,
                         sorted(self.conns_open), self.gateway_id, role.address() if role else "",
                         role.peer() if role else "", info)

    def status(self) -> NodeStatus:
        return NodeStatus(self.generation, self.status_info())

    def status_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"role": self.mode.value, "pid": os.getpid(), "state": self.state.value,
                                "generation": self.generation, "mode": self.cfg.mode,
                                "state_format": STATE_FORMAT, "colo_version": VERSION,
                                "cpus": sched.cpus_label()}  # live: `taskset` may move us
        if self.role is not None:
            info.update(self.role.status_info())
        if STREAM.active:
            info["sent_at"] = STREAM.now()  # the gateway estimates our clock's offset from it (colo.events)
            info["kernel"] = kernel_id()  # unless we run under its kernel: then we read its clock
        if self.gate.holding:
            info["step"] = {"on": self.gate.stepping, "delay_ms": round(self.gate.delay * 1e3),
                            "waiting": self.gate.waiting}
        return info

    # -- running the roles -------------------------------------------------------------------------------------
    def run(self, first_role: Any) -> int:
        self.role = first_role
        self.role.prepare()  # before the I/O thread connects: the hello must say where a primary reaches us
        self.io.start()
        try:
            while True:
                nxt = self.role.run()
                self.role = nxt
        except NodeStop as e:
            log.warning("%s: %s", self.mode.value, e)  # why the process ends: always worth a line
            return e.exit_code
        finally:
            if self.role is not None:
                self.role.close(f"{LEAVING}the {self.mode.value} stops")
            self.io.stop()

    def request_shutdown(self) -> None:
        """From a signal handler: stop at the next exact point and leave cleanly."""
        self.shutdown_requested = True
        self.gate.release_all()
        if self.vm is not None:
            self.vm.request_stop()
        self.io.wake()

    def _urgent(self, source: Source, msg: Any) -> None:
        """I/O thread, before the message is queued: messages that must not wait for the VM's slice to end."""
        if self.vm is not None and isinstance(msg, (CheckpointNow, CheckpointRequest, CheckpointReply,
                                                    VmstateReceived, VmstateLoaded, Promote, Fence, Shutdown)):
            self.vm.request_stop()
        if isinstance(msg, Step):
            self.gate.update(msg.on, msg.delay_ms, msg.grant)  # here: the VM thread may be waiting in the gate
        elif isinstance(msg, (Fence, Shutdown)):
            self.gate.release_all()

    # -- events ------------------------------------------------------------------------------------------------
    def next_event(self, timeout: float) -> tuple[Source, NodeEvent] | None:
        """Wait up to `timeout` for an event that is not the gateway's (gateway events are handled here, and end
        the wait with None so that the caller re-checks its state)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.shutdown_requested:
                raise NodeStop("stopped by a signal", 0)
            try:
                source, ev = self.inbox.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.05)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
                continue
            if source == "gateway":
                self.on_gateway_event(ev)
                return None
            self.io.taken(ev)
            return source, ev

    def drain_events(self) -> list[tuple[Source, NodeEvent]]:
        """Everything already queued (gateway events handled), without waiting."""
        out = []
        while not self.inbox.empty():
            got = self.next_event(0.0)
            if got is not None:
                out.append(got)
        return out

    def on_gateway_event(self, ev: NodeEvent) -> None:
        if isinstance(ev, Input | Inputs):
            for got in [ev.event] if isinstance(ev, Input) else to_events(ev.events):
                if got.seq > self.received_seq:
                    self.received_seq = got.seq
                self.backlog[got.seq] = got
        elif isinstance(ev, Progress | Output | Outputs):
            pass  # not for us
        elif isinstance(ev, Step):
            pass  # the I/O thread applied it (_urgent)
        elif isinstance(ev, Welcome):
            self.gateway_id = ev.gateway
            self.attached = True
            log.info("%s: attached to gateway %s (generation %d)", self.mode.value, ev.gateway, ev.generation)
            self.role.on_attached()
        elif isinstance(ev, InputFloor):
            self.input_floor(ev.input_seq)
        elif isinstance(ev, Fence):
            raise Fenced(ev.reason)
        elif isinstance(ev, Shutdown):
            raise NodeStop(f"stopped by the gateway: {ev.reason}", 0)
        elif isinstance(ev, Attached):
            pass  # our hello is on its way; we are attached once welcomed
        elif isinstance(ev, Detached):
            if self.attached:
                log.warning("%s: lost the gateway (%s): holding still and reconnecting", self.mode.value, ev.reason)
            self.attached = False
            self.role.on_detached()
        elif isinstance(ev, Silent):
            log.warning("%s: the gateway is silent: holding still until it speaks", self.mode.value)
            self.attached = False
            self.role.on_detached()
        elif isinstance(ev, Heard):
            log.warning("%s: the gateway speaks again", self.mode.value)
            self.attached = bool(self.gateway_id)
            self.role.on_attached()
        elif isinstance(ev, (Heartbeat, NodeStatus)):
            pass
        elif isinstance(ev, (Closed, ConnectionClosed)):
            pass  # the I/O thread reports the end as Detached
        elif isinstance(ev, Message):
            self.role.on_gateway_message(ev)

    def input_floor(self, seq: int) -> None:
        """Inputs up to `seq` will never come (they were for clients that are gone): go on from seq + 1."""
        for old in [s for s in self.backlog if s <= seq]:
            del self.backlog[old]
        self.received_seq = max(self.received_seq, seq)
        if self.vm is not None and self.vm.net.state.last_input_seq < seq:
            self.vm.net.state.last_input_seq = seq
        log.info("%s: inputs up to %d are void (clients of an earlier gateway)", self.mode.value, seq)

    def send_gateway(self, msg: Message, block: float | None = None, flush: bool = True) -> bool:
        """Send to the gateway if one is attached; output is never queued for a gateway we do not have.
        `flush=False`: queued, to leave with the next flushed send or `io.flush_gateway()`."""
        return self.attached and self.io.send_gateway(msg, block, flush)

    # -- serving the guest -------------------------------------------------------------------------------------
    def deliver_inputs(self) -> None:
        assert self.vm is not None
        net = self.vm.net
        while self.backlog:
            seq = net.state.last_input_seq + 1
            ev = self.backlog.get(seq)
            if ev is None:
                # Drop what the VM has already (a replay, or a restored state that went past it); any other gap
                # is filled by the gateway's replay next.
                for old in [s for s in self.backlog if s < seq]:
                    del self.backlog[old]
                return
            try:
                net.deliver(ev.kind, ev.conn, ev.data, seq=ev.seq)
            except QueueFull:
                return  # the guest has not caught up: hold the rest (the gateway's credit bounds it)
            del self.backlog[seq]
            if ev.kind == KIND_OPEN:
                self.conns_open.add(ev.conn)
            elif ev.kind == KIND_CLOSE:
                self.conns_open.discard(ev.conn)

    def taken_seq(self) -> int:
        """Every input up to this the guest has taken from the device (what the gateway's credit counts)."""
        assert self.vm is not None
        st = self.vm.net.state
        return int(st.rx[0][0]) - 1 if st.rx else st.last_input_seq

    def take_outputs(self) -> list[list[Any]]:
        """The VM's new outputs as wire events ([seq, kind, conn, data]); the caller decides where they go. Keeps
        `conns_open` and the epoch's outputs (the same lists: nobody changes an event once the device made it)."""
        assert self.vm is not None
        out = self.vm.net.take_output_lists()
        self.epoch_outputs += out
        for e in out:
            if e[1] == KIND_CLOSE:
                self.conns_open.discard(e[2])
        return out

    def forward_outputs(self) -> None:
        """Send the VM's new outputs (and how far it took input) to the gateway; held while `hold_outputs`."""
        # All of it in one write: one system call, and one wake-up of the gateway, per slice.
        if self.hold_outputs:
            self.held_outputs += self.take_outputs()
        else:
            self.send_outputs(self.take_outputs())
        taken = self.taken_seq()
        if taken > self._taken_sent and self.send_gateway(Progress(self.generation, taken), flush=False):
            self._taken_sent = taken
        self.io.flush_gateway()

    def release_outputs(self) -> None:
        """Stop holding outputs and send the held ones, in order (after the commit that makes them sendable)."""
        self.hold_outputs = False
        held, self.held_outputs = self.held_outputs, []
        self.send_outputs(held)
        self.io.flush_gateway()

    def send_outputs(self, outs: list[list[Any]]) -> None:
        """Queue outputs (wire events from `take_outputs`) for the gateway, in order: one `output`, or `outputs`
        frames for several (one seal and one decode for all of them: the relay's cost is per frame, the guest's
        output comes in slices). Not checked again: the device makes only events the rules allow (a sequence
        number of its own, data or close, a u32 connection, bytes)."""
        start, size = 0, 0
        for i, e in enumerate(outs):
            size += len(e[3])
            if size >= BATCH_BYTES or i + 1 - start >= BATCH_EVENTS or i == len(outs) - 1:
                batch = outs[start:i + 1]
                self.send_gateway(Outputs.checked_already(self.generation, batch) if len(batch) > 1
                                  else Output.checked_already(self.generation, *batch[0]), flush=False)
                start, size = i + 1, 0

    def print_console(self) -> None:
        assert self.vm is not None
        console = self.vm.take_serial()  # taken even when not printed: the buffer must not grow
        show = self.cfg.console == "always" or (self.cfg.console == "active" and self.mode is Mode.PRIMARY)
        if console and show:  # the serial port is this node's local console: not output-committed
            try:
                sys.stdout.buffer.write(console)
                sys.stdout.flush()
            except OSError as e:  # nobody reads the console any more (a closed pipe or terminal): serve on
                log.warning("%s: cannot write the guest's console (%s): not printing it any more",
                            self.mode.value, e)
                self.cfg.console = "off"

    def close_repl(self, why: str | None = None, conn: Conn | None = None) -> None:
        """Drop the replication link, telling the peer `why` first when there is a reason to give."""
        repl = conn or self.io.repl
        if repl is None:
            return
        if why is not None and repl.open:
            try:
                repl.send(ErrorMessage(why[:1000]), block=0.2)
            except ColoError:
                pass  # the protocol side is already in ERROR or CLOSED: nothing more to say
        self.io.close_repl(why or "closed")
