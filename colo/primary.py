"""The primary role: run the guest, serve it through the gateway, and checkpoint it to a secondary.

`checkpoint()` is the transaction, as QEMU's colo_do_checkpoint_transaction: request (the guest runs on until the
reply), stop, collect, then send, received (output may now be released), loaded, resume; pipelined, the guest
resumes right after collect and the rest follows while it runs (`Sender`, `_flight_event`). A new secondary
first gets the whole VM, copied live (colo.copysender).
Which secondary protects us is the gateway's decision (`protect`); any trouble with it (silence, an error, a
protocol violation) makes the primary go on unprotected and say so. A guest that powers off or faults ends the
service: the primary says so (no failover: the secondary would end the same way) and exits with its code.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from colo.nodeio import Heard, NodeEvent, Report, Silent, Source
from colo.protocol import ConnectionClosed, PrimaryProtocol
from colo.stats import CheckpointRecord, StatsWriter
from toyvm import Machine, StopReason
from toyvm.contract import PAGE_SIZE
from toyvm.errors import GuestFault

log = logging.getLogger("colo.primary")
CONNECT_TIMEOUT = 10.0  # seconds to reach and authenticate a secondary the gateway named
REPLY_TIMEOUT_FACTOR = 4  # wait this many heartbeat timeouts for a reply inside a checkpoint
MAX_GATEWAY_QUEUE = 8 << 20  # output bytes queued for the gateway before the guest is paused
# A pipelined checkpoint copies its pages at the stop; one larger than this is sent strictly instead (from guest
# RAM, the guest stopped), so that staging never holds more than this.
PIPELINE_MAX_BYTES = 256 << 20


class SecondaryLost(Exception):
    pass


def guest_identity(image: Path, ram: int) -> dict[str, Any]:
    """What a spare may insist on before it protects a primary: which guest image, how much RAM."""
    return {"guest": image.name, "guest_sha256": hashlib.sha256(image.read_bytes()).hexdigest()[:16], "ram": ram}


@dataclass
class InFlight:
    """A checkpoint between its stop and vmstate-loaded (pipelined: while the guest runs on)."""

    epoch: int
    trigger: Trigger
    rec: CheckpointRecord
    staged: vmstate.Staged
    commit: Commit  # taken at the stop: what the checkpoint covers
    t_stop: float
    t_request: float  # checkpoint-request sent (the guest ran on until the reply)
    t_reply: float  # checkpoint-reply handled
    t_resume: float | None = None  # pipelined: the guest ran again from here
    t_send_start: float | None = None
    t_sent: float | None = None
    t_received: float | None = None  # vmstate-received read, and the commit sent (by the I/O thread)
    t_loaded: float | None = None
    received: bool = False  # the VM thread has handled vmstate-received


@dataclass
class SendDone(Report):
    """Event (source "sender"): the sender thread finished with a state, or failed (`why`)."""

    epoch: int
    ok: bool
    why: str
    started: float
    finished: float


def send_state(repl: Conn, stager: vmstate.Stager, staged: vmstate.Staged, epoch: int, faults: FaultPlan,
               timeout: float) -> None:
    """vmstate-send, every piece as its own vmstate-chunk as soon as it is compressed, vmstate-size. Frames are
    written together where they can be (a small state in one system call): a batch is written before the next
    one is asked for, which may reuse its buffer; the head is bytes of its own, and the last batch's buffer is
    not reused before the next state."""
    def send(msg: Message, block: float | None = None, flush: bool = True) -> None:
        if not repl.send(msg, block=block, flush=flush):
            raise SecondaryLost(f"cannot send {msg.NAME}: {repl.closed_reason or 'the link is stuck'}")
    send(VmstateSend(epoch), flush=False)
    total = stager.count(staged)
    with contextlib.closing(stager.pieces(staged)) as pieces:
        for n, piece in enumerate(pieces):
            if n == total // 2:
                faults.reach("mid-send", epoch)
            last = n == total - 1
            if isinstance(piece, bytes) or last:
                send(VmstateChunk(epoch, piece), flush=False)
            else:
                send(VmstateChunk(epoch, piece), block=timeout)
    send(VmstateSize(epoch, staged.stats.wire_bytes), block=timeout)
    faults.reach("after-size", epoch)


class Sender:
    """Pipelined checkpoints: a thread that sends a staged state while the VM thread runs the guest. It only
    sends; the VM thread decides everything, on the SendDone it posts and on the secondary's replies.

    A thread rather than sends interleaved with the guest's slices: a state goes out as fast as the link and the
    secondary take it (the compression runs in the pool meanwhile, and the VM thread mostly waits in Unicorn
    without the GIL), instead of one piece per 10 ms slice, which would stretch the commit of a 16 MiB state
    over 80 ms."""

    def __init__(self, node: Node, stager: vmstate.Stager, faults: FaultPlan) -> None:
        self.node, self.stager, self.faults = node, stager, faults
        self._jobs: queue.Queue[tuple[Conn, vmstate.Staged, int]] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    def submit(self, repl: Conn, staged: vmstate.Staged, epoch: int) -> None:
        self._idle.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ckpt-sender", daemon=True)
            self._thread.start()
        self._jobs.put((repl, staged, epoch))

    def wait_idle(self) -> None:
        """Until the state under way is sent or abandoned (its buffers are then free)."""
        self._idle.wait()

    def _run(self) -> None:
        timeout = self.node.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
        while True:
            repl, staged, epoch = self._jobs.get()
            started = time.perf_counter()
            ok, why = True, ""
            try:
                send_state(repl, self.stager, staged, epoch, self.faults, timeout)
            except (SecondaryLost, ColoError, OSError) as e:
                ok, why = False, str(e)
            except Exception as e:
                log.exception("primary: sending checkpoint %d failed", epoch)
                ok, why = False, f"sending failed: {e!r}"
            finished = time.perf_counter()
            self._idle.set()
            self.node.inbox.put(("sender", SendDone(epoch, ok, why, started, finished)))


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
        self.protect_attempt = 0  # the gateway's number of the protect being carried out (echoed in protection)
        self.requested_trigger: Trigger | None = None
        self.stats = StatsWriter(node.cfg.stats, mode=node.cfg.mode, interval_ms=self.interval * 1e3)
        self.handover: Handover | None = None  # a switchover asked: checkpoint, then hold still
        self.copy: CopySender | None = None  # a copy to a new secondary, under way
        self.last_copy: dict[str, Any] = {}
        self.demoted = False
        self.fresh = False  # a guest booted here, not yet run
        self.ran = False  # the guest ran since the last checkpoint
        self.faults = FaultPlan()
        self.stager = vmstate.Stager()
        self.sender = Sender(node, self.stager, self.faults)
        self.inflight: InFlight | None = None  # pipelined: the checkpoint whose state is on its way
        self.committing: InFlight | None = None  # either mode: the checkpoint the next commit is for
        self.awaiting_reply: int | None = None  # the epoch whose checkpoint-reply the guest runs until
        self.reply_at = 0.0  # when that reply was handled
        self.slice_end = 0.0  # when the guest's last slice ended, and why
        self.last_stop: StopReason | None = None

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
        node.io.repl_sink = self._sink
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
            if self.inflight is not None:
                self.wait_inflight()  # at most one checkpoint in flight
                if self.repl is None:
                    continue
            trigger = self.requested_trigger or Trigger.TIMER
            self.requested_trigger = None
            if trigger is Trigger.TIMER and not self.ran:
                continue  # the guest held still (no gateway): nothing changed that a checkpoint could carry
            self.checkpoint(trigger)
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
    def serve(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Run the guest for `seconds`, moving inputs and outputs; sooner when `until()` holds (by default: a
        checkpoint is asked for or protection starts). Without a gateway the guest holds still: nothing could
        reach a client."""
        node, vm = self.node, self.node.vm
        assert vm is not None
        done = until or (lambda: (self.requested_trigger is not None and self.protected)
                                 or self.pending_protect is not None)
        deadline = time.monotonic() + seconds
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            gw = node.io.gateway
            if not node.attached or gw is None or gw.queued > MAX_GATEWAY_QUEUE:
                self._handle(node.next_event(min(left, 0.05)))
                for got in node.drain_events():
                    self._handle(got)
                continue
            node.deliver_inputs()
            self.ran = True
            self.fresh = False  # from here a copy is worth doing live
            try:
                r = vm.run_slice(min(SLICE, left))
            except GuestFault as e:
                self.guest_ended(EXIT_FAULT, f"VM fault: {e}")
            self.slice_end, self.last_stop = time.perf_counter(), r.reason
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
        """The secondary's messages while the guest runs: heartbeats, the reply we wait for, and (pipelined)
        what concerns the checkpoint in flight; anything else loses the secondary."""
        if got is None:
            return
        source, ev = got
        if isinstance(ev, SendDone):
            try:
                self._flight_event(ev)  # a report on a checkpoint given up already means nothing
            except SecondaryLost as e:
                self._checkpoint_failed(ev.epoch, str(e))
            return
        if source is not self.repl or self.repl is None:
            return
        if isinstance(ev, (Heartbeat, Heard)):
            return
        if isinstance(ev, ErrorMessage) and ev.reason.startswith(LEAVING):
            log.info("primary: the secondary left on purpose (%s)", ev.reason[len(LEAVING):])
            self._unprotect(ev.reason, quiet=True)
            return
        if isinstance(ev, CheckpointReply) and ev.epoch == self.awaiting_reply:
            self.awaiting_reply, self.reply_at = None, time.perf_counter()
            return
        try:
            if self._flight_event(ev):
                return
        except SecondaryLost as e:
            self._checkpoint_failed(self.epoch, str(e))
            return
        self._unprotect(self._describe_loss(ev))

    def guest_ended(self, code: int, why: str) -> None:
        """The guest powered off or faulted: nothing to fail over to. Tell the gateway (waiting a little for one if
        we have none right now), release the secondary, and leave with the guest's code."""
        node = self.node
        vm = node.vm
        assert vm is not None
        node.print_console()  # what the guest wrote in its last slice is never lost
        node.release_outputs()  # no checkpoint will cover them: the gateway releases all on guest-ended
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
        self.protect_attempt = req.attempt
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
        if self.cfg.delta:  # the secondary holds our RAM as it is now: the base of the next checkpoint's deltas
            self.stager.remember(vm)
        self.requested_trigger = None  # asked while unprotected: the copy is the checkpoint
        self.protected = True
        node.state = NodeState.PROTECTED
        net = vm.net.state
        node.send_gateway(Protection(node.generation, ProtectionState.PROTECTED, self.epoch - 1,
                                     net.last_input_seq, net.last_output_seq, self.secondary_id, "",
                                     self.protect_attempt))
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
        self.inflight = self.committing = None
        self.awaiting_reply = None
        node.state = NodeState.UNPROTECTED if node.attached else NodeState.DETACHED
        node.epoch_outputs.clear()
        if tell:
            node.send_gateway(Protection(node.generation, ProtectionState.UNPROTECTED, self.epoch - 1, 0, 0, "",
                                         why[:1000], self.protect_attempt))
        else:
            node.send_gateway(node.status())  # the gateway's view of us now, not at the next heartbeat
        node.release_outputs()  # unprotected, the gateway releases everything

    # -- the checkpoint transaction ----------------------------------------------------------------------------
    def checkpoint(self, trigger: Trigger) -> None:
        """One checkpoint, as QEMU's colo_do_checkpoint_transaction: request, and the guest runs until the reply;
        then stop, stage the state, and either (pipelined) resume at once while the state goes out in the
        background, or (strict) send it, wait for received (commit) and loaded, and resume."""
        node, vm, repl = self.node, self.node.vm, self.repl
        assert vm is not None and repl is not None and self.inflight is None
        epoch = self.epoch
        rec = CheckpointRecord(epoch, trigger.value)
        self.sender.wait_idle()  # a state given up on may still be leaving: its buffers are about to be reused
        try:
            t_request = time.perf_counter()
            self.faults.reach("before-request", epoch)
            self._send(CheckpointRequest(epoch, trigger))
            self.faults.reach("after-request", epoch)
            t_stop = self._run_until_reply(epoch, t_request)
            if t_stop is None:
                return  # the secondary was lost meanwhile (and we went on unprotected)
            rec.phases_ms["request"] = (self.reply_at - t_request) * 1e3
            self._phase(epoch, "request", t_request, self.reply_at)
            self.faults.reach("after-reply", epoch)
            # The guest is stopped from here.
            outputs = node.epoch_outputs
            node.epoch_outputs = []
            pages = vm.collect_dirty()
            if STREAM.active:
                trace.pages("primary", epoch, "dirty", pages, vm.ram.npages)
            # A switchover's checkpoint is its last: the guest must not run past it, so it is strict.
            pipelined = (self.cfg.checkpoint_mode == "pipelined" and self.handover is None
                         and len(pages) * PAGE_SIZE <= PIPELINE_MAX_BYTES)
            staged = self.stager.stage(vm, pages, epoch=epoch, full=False, copy=pipelined, outputs=outputs,
                                       inputs=self.held_inputs(), generation=node.generation, node=node.id,
                                       conns=sorted(node.conns_open), delta=self.cfg.delta)
            net = vm.net.state
            commit = Commit(node.generation, epoch, net.last_input_seq, net.last_output_seq)
            node.state_log.write(vm, epoch, node.generation)
            self.ran = False  # from here on, what the guest does goes into the next checkpoint
            t_staged = time.perf_counter()
            rec.phases_ms["collect"] = (t_staged - t_stop) * 1e3
            rec.checkpoint_mode = "pipelined" if pipelined else "strict"
            flight = InFlight(epoch, trigger, rec, staged, commit, t_stop, t_request, self.reply_at)
            self._phase(epoch, "collect", t_stop, t_staged)
            self.committing = flight  # before vmstate-send: its vmstate-received may come any time after
            if pipelined:
                node.hold_outputs = True  # outputs from now on belong to the next epoch: after our commit
                self.inflight = flight
                self.sender.submit(repl, staged, epoch)
                flight.t_resume = time.perf_counter()
                rec.phases_ms["resume"] = (flight.t_resume - t_staged) * 1e3
                rec.pause_ms = (flight.t_resume - t_stop) * 1e3
                self._phase(epoch, "resume", t_staged, flight.t_resume)
                return  # the guest runs on; received, commit and loaded come as events (see _flight_event)
            timeout = self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
            flight.t_send_start = t_staged
            send_state(repl, self.stager, staged, epoch, self.faults, timeout)
            flight.t_sent = time.perf_counter()
            self.expect(VmstateReceived)
            self._received(flight)
            self.expect(VmstateLoaded)
            self._loaded(flight)
        except (SecondaryLost, ColoError, OSError) as e:
            if self.repl is not None:
                self._checkpoint_failed(epoch, str(e))
            return

    def _run_until_reply(self, epoch: int, since: float) -> float | None:
        """Serve the guest until checkpoint-reply `epoch` is handled; returns when the guest stopped for it: the
        end of the slice the reply cut short (the I/O thread asks the VM to stop when it arrives), or the time
        it was handled (the guest was idle). None: the secondary was lost meanwhile."""
        self.awaiting_reply = epoch
        limit = self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
        deadline = time.monotonic() + limit
        while self.awaiting_reply is not None and self.repl is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.awaiting_reply = None
                raise SecondaryLost(f"no checkpoint-reply from the secondary within {limit:.1f} s")
            self.serve(left, until=lambda: self.awaiting_reply is None or self.repl is None)
        if self.repl is None:
            return None
        stopped_for_it = (self.last_stop is StopReason.STOP_REQUESTED
                          and since <= self.slice_end <= self.reply_at)
        return self.slice_end if stopped_for_it else self.reply_at

    def _received(self, flight: InFlight) -> None:
        """vmstate-received: the checkpoint is complete; the output it covers may go to clients. The I/O thread
        has sent the commit already (_sink), unless it could not."""
        flight.received = True
        if flight.t_received is None:
            self._commit(flight)
        self.node.release_outputs()  # the next epoch's outputs, held since the stop (pipelined)

    def _commit(self, flight: InFlight) -> None:
        flight.t_received = time.perf_counter()
        self.faults.reach("after-received", flight.epoch)
        self.node.send_gateway(flight.commit)
        self.faults.reach("after-commit", flight.epoch)

    def _sink(self, msg: Message) -> bool:
        """I/O thread, every message of the replication link: the commit goes to the gateway the moment
        vmstate-received is read, without waiting for the VM thread (the event is queued for it as well)."""
        flight = self.committing
        # Not while the step gate may hold (teaching): the commit would wait in this thread, which reads the
        # step that lets it go; the VM thread sends it instead.
        if isinstance(msg, VmstateReceived) and flight is not None and flight.epoch == msg.epoch \
                and flight.t_received is None and not self.node.gate.holding:
            self._commit(flight)
        return False

    def _loaded(self, flight: InFlight) -> None:
        """vmstate-loaded: the checkpoint is over; the next one may start."""
        flight.t_loaded = loaded_at = time.perf_counter()
        self.faults.reach("after-loaded", flight.epoch)
        self.inflight = self.committing = None
        self.epoch += 1
        self.checkpoints += 1
        self.triggers[flight.trigger.value] = self.triggers.get(flight.trigger.value, 0) + 1
        rec, st = flight.rec, flight.staged.stats
        loaded = loaded_at
        received = flight.t_received or loaded
        # The sender thread reports when its last write returned; the secondary's answer may be read before that
        # (pipelined): the state was sent by then.
        sent = min(flight.t_sent or received, received)
        send_start = min(flight.t_send_start or flight.t_resume or sent, sent)
        rec.phases_ms["send"] = (sent - send_start) * 1e3
        rec.phases_ms["received"] = (received - sent) * 1e3
        rec.phases_ms["loaded"] = (loaded - received) * 1e3
        end = loaded
        if flight.t_resume is None:  # strict: the guest resumes now
            end = time.perf_counter()
            rec.phases_ms["resume"] = (end - loaded) * 1e3
            rec.pause_ms = (end - flight.t_stop) * 1e3
        rec.commit_ms = (received - flight.t_stop) * 1e3
        rec.dirty_pages, rec.zero_pages = st.dirty_pages, st.zero_pages
        rec.bytes_raw, rec.bytes_wire = st.raw_bytes, st.wire_bytes
        self.last_pause_ms = rec.pause_ms
        self.stats.write(rec)
        if STREAM.active:
            epoch = flight.epoch
            for name, a, b in (("send", send_start, sent), ("received", sent, received), ("loaded", received, loaded)):
                self._phase(epoch, name, a, b)
            if flight.t_resume is None:
                self._phase(epoch, "resume", loaded, end)
            phases = [("request", flight.t_request, flight.t_reply),
                      ("collect", flight.t_stop, flight.t_stop + rec.phases_ms["collect"] / 1e3)]
            if flight.t_resume is not None:
                phases.append(("resume", phases[-1][2], flight.t_resume))
            phases += [("send", send_start, sent), ("received", sent, received), ("loaded", received, loaded)]
            if flight.t_resume is None:
                phases.append(("resume", loaded, end))
            trace.checkpoint_done(rec, phases)

    def _phase(self, epoch: int, name: str, start: float, end: float) -> None:
        """One phase of the primary's checkpoint `epoch` on the event stream, as it ends (perf_counter times)."""
        if STREAM.active:
            STREAM.emit("phase", side="primary", epoch=epoch, phase=name, start=round(STREAM.at(start), 6),
                        end=round(STREAM.at(end), 6))

    def _checkpoint_failed(self, epoch: int, why: str) -> None:
        if STREAM.active:
            STREAM.emit("checkpoint-failed", epoch=epoch, reason=why)
        self._unprotect(f"checkpoint {epoch} failed: {why}")

    def _flight_event(self, ev: Any) -> bool:
        """A message of the secondary or the sender's report about the checkpoint in flight (pipelined);
        True when it was one. Anything out of place loses the secondary."""
        flight = self.inflight
        if flight is None:
            return False
        if isinstance(ev, SendDone) and ev.epoch == flight.epoch:
            if not ev.ok:
                raise SecondaryLost(ev.why)
            flight.t_send_start, flight.t_sent = ev.started, ev.finished
            return True
        if isinstance(ev, VmstateReceived) and ev.epoch == flight.epoch and not flight.received:
            self._received(flight)
            return True
        if isinstance(ev, VmstateLoaded) and ev.epoch == flight.epoch and flight.received:
            self._loaded(flight)
            return True
        return False

    def wait_inflight(self) -> None:
        """Serve the guest until the checkpoint in flight is over (at most one is)."""
        limit = self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
        deadline = time.monotonic() + limit
        while self.inflight is not None and self.repl is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._checkpoint_failed(self.inflight.epoch, f"it did not complete within {limit:.1f} s")
                return
            self.serve(min(left, self.interval), until=lambda: self.inflight is None or self.repl is None)

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
