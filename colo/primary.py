"""The primary role: run the guest, serve it through the gateway, and checkpoint it to a secondary.

`checkpoint()` is the whole transaction in one straight line, as QEMU's colo_do_checkpoint_transaction:
request, reply, collect, compress, send, received (output may now be released), loaded, resume.
Which secondary protects us is the gateway's decision (`protect`); any trouble with it (silence, an error, a
protocol violation) makes the primary go on unprotected and say so. A guest that powers off or faults ends the
service: the primary says so (no failover: the secondary would end the same way) and exits with its code.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from colo import trace, vmstate
from colo.copysender import GUEST_SLICE, CopySender
from colo.errors import ColoError
from colo.events import STREAM
from colo.faults import FaultPlan
from colo.link import Closed, Conn, Opened
from colo.messages import (
    CheckpointNow,
    CheckpointReply,
    CheckpointRequest,
    Commit,
    Demote,
    ErrorMessage,
    GuestEnded,
    HandedOver,
    Handover,
    Heartbeat,
    Message,
    Promote,
    Protect,
    Protection,
    ProtectionState,
    Trigger,
    Unprotect,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.node import EXIT_FAULT, LEAVING, SLICE, GuestExited, Mode, Node, NodeState
from colo.nodeio import Heard, NodeEvent, Silent, Source
from colo.protocol import ConnectionClosed, PrimaryProtocol
from colo.stats import CheckpointRecord, PhaseClock, StatsWriter
from colo.wire import DEFAULT_CHUNK_SIZE
from toyvm import Machine, StopReason
from toyvm.errors import GuestFault

log = logging.getLogger("colo.primary")
CONNECT_TIMEOUT = 10.0  # seconds to reach and authenticate a secondary the gateway named
REPLY_TIMEOUT_FACTOR = 4  # wait this many heartbeat timeouts for a reply inside a checkpoint
MAX_GATEWAY_QUEUE = 8 << 20  # output bytes queued for the gateway before the guest is paused


class SecondaryLost(Exception):
    pass


def guest_identity(image: Path, ram: int) -> dict[str, Any]:
    """What a spare may insist on before it protects a primary: which guest image, how much RAM."""
    return {"guest": image.name, "guest_sha256": hashlib.sha256(image.read_bytes()).hexdigest()[:16], "ram": ram}


class PrimaryRole:
    def __init__(self, node: Node, *, epoch: int = 1) -> None:
        self.node = node
        self.cfg = node.cfg
        self.epoch = epoch  # the next checkpoint's number
        self.checkpoints = 0
        self.triggers: dict[str, int] = {}
        self.last_pause_ms = 0.0
        self.protected = False
        self.repl: Conn | None = None
        self.secondary_id = ""
        self.pending_protect: Protect | None = None
        self.requested_trigger: Trigger | None = None
        self.stats = StatsWriter(node.cfg.stats, mode=node.cfg.mode, interval_ms=self.interval * 1e3)
        self.handover: Handover | None = None  # a switchover asked: checkpoint, then hold still
        self.copy: CopySender | None = None  # a copy to a new secondary, under way
        self.last_copy: dict[str, Any] = {}
        self.demoted = False
        self.fresh = False  # a guest booted here, not yet run
        self.ran = False  # the guest ran in the last serve()
        self.faults = FaultPlan()

    @property
    def interval(self) -> float:
        """Periodic: the checkpoint interval; hybrid: the backstop."""
        return self.cfg.backstop if self.cfg.mode == "hybrid" else self.cfg.interval

    # -- what the node reports ---------------------------------------------------------------------------------
    def holds_copy(self) -> bool:
        return True

    def epoch_held(self) -> int:
        return self.epoch - 1

    def address(self) -> str:
        return ""

    def peer(self) -> str:
        return self.secondary_id if self.protected else ""

    def status_info(self) -> dict[str, Any]:
        live = self.copy  # (read once: the I/O thread asks while the loop may end the copy)
        copy = live.progress() if live is not None else None
        return {**self.node.runs, "copy": copy, "last_copy": self.last_copy or None,
                "epoch": self.epoch - 1, "checkpoints": self.checkpoints, "triggers": dict(self.triggers),
                "protected": self.protected, "last_pause_ms": round(self.last_pause_ms, 3),
                "interval_ms": round(self.interval * 1e3, 3), "secondary": self.secondary_id or None}

    # -- start -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        pass

    @classmethod
    def boot(cls, node: Node) -> PrimaryRole:
        cfg = node.cfg
        node.vm = Machine(cfg.ram, hooks=cfg.hooks)
        node.vm.boot(Path(cfg.guest), cfg.cmdline)
        node.runs = guest_identity(Path(cfg.guest), cfg.ram)
        role = cls(node)
        role.fresh = True
        return role

    def run(self) -> Any:
        node = self.node
        node.mode = Mode.PRIMARY
        node.state = NodeState.UNPROTECTED if node.attached else NodeState.DETACHED
        if self.fresh:
            # A guest that has not run yet waits for a gateway (nothing could reach a client without one); if the
            # gateway has a secondary for it, the copy comes first (the gateway sends protect before its welcome),
            # so that the guest is protected from its first instruction.
            while not node.attached:
                node.next_event(0.1)
            for got in node.drain_events():
                self._handle(got)
            if self.pending_protect is not None:
                self.protect(self.pending_protect)
        while True:
            started = time.perf_counter()
            if self.copy is not None:  # a live copy: one step of it between two guest slices
                self.serve(GUEST_SLICE)
                if self.copy is not None:
                    self.copy_step()
                continue
            self.serve(self.interval)
            if self.pending_protect is not None:
                self.protect(self.pending_protect)
                continue
            if self.repl is None or not self.protected:
                self.requested_trigger = None  # nobody to checkpoint to: a late request means nothing
                continue
            trigger = self.requested_trigger or Trigger.TIMER
            self.requested_trigger = None
            if trigger is Trigger.TIMER and not self.ran:
                continue  # the guest held still (no gateway): nothing changed that a checkpoint could carry
            self.checkpoint(trigger, suspended_at=started + self.interval)
            if self.handover is not None:
                nxt = self.hand_over()
                if nxt is not None:
                    return nxt

    def close(self, why: str) -> None:
        self.stats.close()
        if self.repl is not None:
            self.node.close_repl(why, self.repl)

    # -- the gateway's say ---------------------------------------------------------------------------------
    def on_attached(self) -> None:
        self.node.state = self._serving_state()

    def on_detached(self) -> None:
        self.node.state = NodeState.DETACHED

    def _serving_state(self) -> NodeState:
        if self.protected:
            return NodeState.PROTECTED
        return NodeState.PROTECTING if self.repl is not None else NodeState.UNPROTECTED

    def on_gateway_message(self, msg: Message) -> None:
        if isinstance(msg, CheckpointNow):
            self.requested_trigger = msg.trigger
        elif isinstance(msg, Protect):
            if self.repl is None:
                self.pending_protect = msg
            else:
                log.warning("primary: asked to protect with %s while %s protects us: ignored", msg.node,
                            self.secondary_id)
        elif isinstance(msg, Unprotect):
            if self.repl is not None:
                self._unprotect(f"the gateway says so: {msg.reason}", tell=False)
        elif isinstance(msg, Handover):
            if self.repl is not None and self.protected:
                self.handover = msg
                self.requested_trigger = Trigger.MANUAL
            else:
                log.warning("primary: asked to hand over with no secondary: ignored")
        elif isinstance(msg, Demote):
            self.demoted = True
        elif isinstance(msg, Promote):
            log.warning("primary: the gateway sent promote to a primary: ignored")
        else:
            log.warning("primary: unexpected message from the gateway: %r", msg)

    # -- serving ---------------------------------------------------------------------------------------------
    def serve(self, seconds: float) -> None:
        """Run the guest for `seconds` (less when a checkpoint is asked for or protection starts), moving inputs and
        outputs. Without a gateway the guest holds still: nothing could reach a client."""
        node, vm = self.node, self.node.vm
        assert vm is not None
        deadline = time.monotonic() + seconds
        self.ran = False
        while (self.requested_trigger is None or not self.protected) and self.pending_protect is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            gw = node.io.gateway
            if not node.attached or gw is None or gw.queued > MAX_GATEWAY_QUEUE:
                self._handle(node.next_event(min(left, 0.05)))
                continue
            node.deliver_inputs()
            self.ran = True
            self.fresh = False  # from here a copy is worth doing live
            try:
                r = vm.run_slice(min(SLICE, left))
            except GuestFault as e:
                self.guest_ended(EXIT_FAULT, f"VM fault: {e}")
            node.forward_outputs()
            node.print_console()
            if r.reason is StopReason.POWER_OFF:
                node.state_log.write(vm, "final", node.generation)
                self.guest_ended(vm.exit_code or 0, f"the guest powered off with exit code {vm.exit_code or 0}")
            idle = r.reason is StopReason.HALT and not vm.wakeup_pending and not node.backlog
            # Idle guest: sleep until something arrives or the deadline; busy guest: take what came in.
            self._handle(node.next_event(max(0.0, deadline - time.monotonic()) if idle else 0.0))
            for got in node.drain_events():
                self._handle(got)

    def hand_over(self) -> Any:
        """A switchover: the checkpoint just taken is the last of this primary. Say so and hold the guest still
        until the gateway says what next: a spare again (`demote`, the next role), or leave (`shutdown`)."""
        from colo.secondary import SecondaryRole

        node = self.node
        self.handover = None
        if self.repl is None:  # that checkpoint failed: we are unprotected and the switchover is off; serve on
            return None
        node.send_gateway(HandedOver(node.generation, self.epoch - 1))
        log.warning("primary: handed over at checkpoint %d: holding still", self.epoch - 1)
        node.state = NodeState.HANDED_OVER
        while not self.demoted:
            got = node.next_event(0.1)  # a fence or a shutdown ends the process from in here
            if got is not None and got[0] is self.repl and not isinstance(got[1], (Heartbeat, Heard)):
                self.repl = None  # the secondary took over and left our link: expected, not a loss
        log.warning("primary: demoted by the gateway: discarding the VM, waiting as a spare")
        self.node.close_repl(f"{LEAVING}switched over", self.repl)
        self.repl = None
        self.stats.close()
        node.mode = Mode.SECONDARY
        return SecondaryRole(node)

    def _handle(self, got: tuple[Source, NodeEvent] | None) -> None:
        """Between checkpoints only heartbeats may come from the secondary."""
        if got is None:
            return
        source, ev = got
        if source is not self.repl or self.repl is None:
            return
        if isinstance(ev, (Heartbeat, Heard)):
            return
        if isinstance(ev, ErrorMessage) and ev.reason.startswith(LEAVING):
            log.info("primary: the secondary left on purpose (%s)", ev.reason[len(LEAVING):])
            self._unprotect(ev.reason, quiet=True)
            return
        self._unprotect(self._describe_loss(ev))

    def guest_ended(self, code: int, why: str) -> None:
        """The guest powered off or faulted: nothing to fail over to. Tell the gateway (waiting a little for one if
        we have none right now), release the secondary, and leave with the guest's code."""
        node = self.node
        vm = node.vm
        assert vm is not None
        node.print_console()  # what the guest wrote in its last slice is never lost
        node.forward_outputs()
        node.state = NodeState.ENDED  # (why is logged once, as the reason the node stops)
        deadline = time.monotonic() + 2 * self.cfg.heartbeat_timeout
        while not node.attached and time.monotonic() < deadline:
            node.next_event(0.05)
        node.send_gateway(GuestEnded(node.generation, code, why[:1000]), block=1.0)
        if self.repl is not None:
            node.close_repl(f"{LEAVING}the guest ended: {why}", self.repl)
            self.repl = None
        raise GuestExited(code, why)

    # -- protection ------------------------------------------------------------------------------------------
    def protect(self, req: Protect) -> None:
        """Connect to the secondary the gateway named and start the copy of the VM: live (the guest serves on while
        rounds of pages go out: `copy_step`), or, with `--copy stop`, the whole VM in one stop."""
        node = self.node
        self.pending_protect = None
        self.secondary_id = req.node
        node.state = NodeState.PROTECTING
        host, _, port = req.address.rpartition(":")
        first_epoch = self.epoch
        node.io.connect_repl((host.strip("[]"), int(port)),
                             lambda hs: PrimaryProtocol(hs, first_epoch=first_epoch))
        try:
            self.repl = self._wait_open(req.address)
            self.copy = CopySender(self, live=self.cfg.copy == "live" and not self.fresh,
                                   reply_timeout=self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR)
            if not self.copy.live:
                self.copy.final_stop()
        except (OSError, ColoError, SecondaryLost) as e:
            self._copy_failed(f"cannot protect the VM with {req.node} at {req.address}: {e}")

    def copy_step(self) -> None:
        """Between two guest slices: the next part of a live copy (one record), or its final stop."""
        assert self.copy is not None
        try:
            self.copy.step()
        except (OSError, ColoError, SecondaryLost) as e:
            self._copy_failed(f"the copy to {self.secondary_id} failed: {e}")

    def _copy_failed(self, why: str) -> None:
        self._unprotect(why)

    def copied(self, summary: dict[str, Any]) -> None:
        """The copy is complete (checkpoint-ready came, the guest still stopped): protected from here on."""
        node, vm = self.node, self.node.vm
        assert vm is not None
        self.copy = None
        self.last_copy = summary
        self.requested_trigger = None  # asked while unprotected: the copy is the checkpoint
        self.protected = True
        node.state = NodeState.PROTECTED
        net = vm.net.state
        node.send_gateway(Protection(node.generation, ProtectionState.PROTECTED, self.epoch - 1,
                                     net.last_input_seq, net.last_output_seq, self.secondary_id, ""))
        log.info("primary: protected by %s (%s)", self.secondary_id,
                 ", ".join(f"{k} {v}" for k, v in summary.items()))

    def _wait_open(self, address: str) -> Conn:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            got = self.node.next_event(0.05)
            if got is None:
                continue
            source, ev = got
            if isinstance(ev, Opened) and isinstance(source, Conn) and source.peer_role == "secondary":
                return source
            if isinstance(ev, Closed) and (source == "repl" or (isinstance(source, Conn)
                                                               and source.peer_role == "secondary")):
                raise SecondaryLost(ev.reason)
        raise SecondaryLost(f"could not reach the secondary at {address} within {CONNECT_TIMEOUT:.0f} s")

    def held_inputs(self) -> list[list[Any]]:
        return [e.as_list() for _, e in sorted(self.node.backlog.items())]

    def _unprotect(self, why: str, tell: bool = True, quiet: bool = False) -> None:
        """Go on alone: the gateway releases what it held and everything from now on."""
        node = self.node
        if not quiet:
            log.warning("primary: running unprotected: %s", why)
        if self.repl is not None:
            node.close_repl(why, self.repl)
        self.repl = None
        self.copy = None  # a copy under way ends with its link
        self.protected = False
        self.secondary_id = ""
        node.state = NodeState.UNPROTECTED if node.attached else NodeState.DETACHED
        node.epoch_outputs.clear()
        if tell:
            node.send_gateway(Protection(node.generation, ProtectionState.UNPROTECTED, self.epoch - 1, 0, 0, "",
                                         why[:1000]))

    # -- the checkpoint transaction ----------------------------------------------------------------------------
    def checkpoint(self, trigger: Trigger, suspended_at: float) -> None:
        node, vm, repl = self.node, self.node.vm, self.repl
        assert vm is not None and repl is not None
        epoch = self.epoch
        clock = PhaseClock(min(suspended_at, time.perf_counter()))
        clock.trace_as("primary", epoch)  # the event stream: each phase as it ends
        rec = CheckpointRecord(epoch, trigger.value)
        timeout = self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
        try:
            self.faults.reach("before-request", epoch)
            self._send(CheckpointRequest(epoch, trigger))
            self.faults.reach("after-request", epoch)
            self.expect(CheckpointReply)
            # suspend: from the end of the VM's last slice through the request/reply round trip
            clock.mark("suspend")
            self.faults.reach("after-reply", epoch)
            outputs = node.epoch_outputs
            node.epoch_outputs = []
            pages = vm.collect_dirty()
            if STREAM.active:
                trace.pages("primary", epoch, "dirty", pages, vm.ram.npages)
            blob, st = vmstate.encode(vm, pages, epoch=epoch, full=False, outputs=outputs,
                                      inputs=self.held_inputs(), generation=node.generation, node=node.id,
                                      conns=sorted(node.conns_open))
            node.state_log.write(vm, epoch, node.generation)
            clock.mark("compress")  # collect (dirty log, page runs, machine state) + compress: split them
            clock.phases["collect"] = clock.phases["compress"] - st.compress_s * 1e3
            clock.phases["compress"] = st.compress_s * 1e3
            self._send(VmstateSend(epoch))
            chunks = range(0, len(blob), DEFAULT_CHUNK_SIZE)
            for n, lo in enumerate(chunks):
                if n == len(chunks) // 2:
                    self.faults.reach("mid-send", epoch)
                self._send(VmstateChunk(epoch, blob[lo:lo + DEFAULT_CHUNK_SIZE]), block=timeout)
            self._send(VmstateSize(epoch, len(blob)))
            clock.mark("send")
            self.faults.reach("after-size", epoch)
            self.expect(VmstateReceived)
            clock.mark("received")
            self.faults.reach("after-received", epoch)
            net = vm.net.state
            node.send_gateway(Commit(node.generation, epoch, net.last_input_seq, net.last_output_seq))
            self.faults.reach("after-commit", epoch)
            self.expect(VmstateLoaded)
            clock.mark("loaded")
            self.faults.reach("after-loaded", epoch)
        except (SecondaryLost, ColoError, OSError) as e:
            if STREAM.active:
                STREAM.emit("checkpoint-failed", epoch=epoch, reason=str(e))
            self._unprotect(f"checkpoint {epoch} failed: {e}")
            return
        self.epoch += 1
        self.checkpoints += 1
        self.triggers[trigger.value] = self.triggers.get(trigger.value, 0) + 1
        clock.mark("resume")
        rec.dirty_pages, rec.zero_pages = st.dirty_pages, st.zero_pages
        rec.bytes_raw, rec.bytes_wire = st.raw_bytes, st.wire_bytes
        rec.phases_ms = clock.phases
        rec.pause_ms = clock.total_ms()
        self.last_pause_ms = rec.pause_ms
        self.stats.write(rec)
        if STREAM.active:
            trace.checkpoint_done(clock, rec)

    def _send(self, msg: Message, block: float | None = None) -> None:
        repl = self.repl
        assert repl is not None
        if not repl.send(msg, block=block):
            raise SecondaryLost(f"cannot send {msg.NAME}: {repl.closed_reason or 'the link is stuck'}")

    def expect(self, cls: type[Message], timeout: float | None = None) -> Message:
        """Wait for `cls` from the secondary (colo_receive_check_message): heartbeats are skipped; anything else
        the protocol would already have refused; silence, loss or an error message lose the secondary."""
        limit = timeout if timeout is not None else self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
        deadline = time.monotonic() + limit
        repl = self.repl
        assert repl is not None
        while True:
            if self.node.gate.holding:
                deadline = time.monotonic() + limit  # step mode: waiting for a step is not the secondary's silence
            left = deadline - time.monotonic()
            if left <= 0:
                raise SecondaryLost(f"no {cls.NAME} from the secondary within {limit:.1f} s")
            got = self.node.next_event(min(left, self.cfg.heartbeat_interval))
            if got is None:
                continue
            source, ev = got
            if source is not repl:
                continue
            if isinstance(ev, cls):
                return ev
            if isinstance(ev, (Heartbeat, Heard)):
                continue
            raise SecondaryLost(self._describe_loss(ev))

    def _describe_loss(self, ev: Any) -> str:
        if isinstance(ev, ErrorMessage):
            return f"the secondary reported an error: {ev.reason}"
        if isinstance(ev, (Closed, ConnectionClosed)):
            return "the secondary closed the connection"
        if isinstance(ev, Silent):
            return f"the secondary was silent for more than {self.cfg.heartbeat_timeout} s"
        return f"unexpected {ev!r}"
