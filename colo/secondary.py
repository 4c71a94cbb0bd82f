"""The secondary role: receive a copy of the primary's VM, then its checkpoints; take over when promoted.

A node starts as a spare: it listens for a primary and waits. When the gateway pairs it with one, the primary
connects and sends the whole VM (`receive_copy`); after that, each checkpoint arrives in one straight-line
function (`receive_checkpoint`, as QEMU's colo_process_incoming_thread), with the periodic/hybrid differences in
that one place. A checkpoint is *complete* when its state arrived whole and verified (vmstate-received); it is
applied right after; if the primary dies between the two, failover applies it first. A state that was cut off or
fails verification is discarded: the VM stays at the last complete checkpoint.

When promoted, the role hands the node, with its VM, to a PrimaryRole: the node goes on as the primary.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from colo import trace, vmstate
from colo.errors import ColoError, ProtocolError
from colo.events import STREAM
from colo.faults import FaultPlan
from colo.link import Closed, Conn, Opened
from colo.livecopy import ROUND, RecordReader, unpack_pieces
from colo.messages import (
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    ErrorMessage,
    FailoverRequest,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Message,
    Promote,
    Promoted,
    Reset,
    Resynced,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.netevents import NetEvent
from colo.node import LEAVING, SLICE, Mode, Node, NodeState
from colo.nodeio import Heard, NodeEvent, Silent, Source
from colo.protocol import ConnectionClosed, SecondaryProtocol
from toyvm import Machine, StopReason
from toyvm.contract import PAGE_SIZE
from toyvm.errors import GuestFault, StateError, ToyVMError

log = logging.getLogger("colo.secondary")
COPY_TIMEOUT_FACTOR = 4  # a silent primary inside a copy or a checkpoint: this many heartbeat timeouts


class PrimaryLost(Exception):
    pass


class BadState(Exception):
    """The primary sent something we must refuse: drop it, keep what we hold."""


class SecondaryRole:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.faults = FaultPlan()
        self.complete: vmstate.StagedCheckpoint | None = None  # received and verified, not yet applied
        self.applied: vmstate.StagedCheckpoint | None = None  # the checkpoint the VM holds now
        self.repl: Conn | None = None
        self.primary_id = ""
        self.cache: Any = None  # hybrid: the primary's memory as of the last checkpoint
        self.promote: Promote | None = None
        self.failover_asked = False
        self.listen_address: tuple[str, int] = ("", 0)
        self.receiver = vmstate.Receiver()  # its staging buffers are reused from checkpoint to checkpoint
        self._chunks = 0
        self._sunk: int | None = None  # the epoch whose state the I/O thread stages (_sink)
        self._finished: int | None = None  # the epoch whose state the I/O thread completed
        self._refused: StateError | None = None  # why it refused it
        if not node.io.started:
            # Listen before the I/O thread starts: its hello to the gateway must carry our address, or the gateway
            # never pairs us with a primary (it only pairs spares whose address it knows).
            self.listen()

    def listen(self) -> None:
        node = self.node
        if self.listen_address[1] == 0:
            self.listen_address = node.io.listen(self.cfg.listen, lambda hs: SecondaryProtocol(hs, first_epoch=None))
            if self.cfg.on_listening is not None:
                self.cfg.on_listening(self.listen_address)

    # -- what the node reports ---------------------------------------------------------------------------------
    def holds_copy(self) -> bool:
        return self.applied is not None

    def epoch_held(self) -> int:
        latest = self.complete or self.applied
        return latest.epoch if latest is not None else 0

    def address(self) -> str:
        host, port = self.cfg.advertise or self.listen_address
        return f"{host}:{port}" if port else ""

    def peer(self) -> str:
        return self.primary_id if self.repl is not None and self.repl.open else ""

    def status_info(self) -> dict[str, Any]:
        latest = self.complete or self.applied
        wants = {f"wants_{k}": v for k, v in self.node.wants.items()}  # what it may protect (if set)
        return {**wants, "epoch": self.applied.epoch if self.applied else 0,
                "complete_epoch": latest.epoch if latest else 0, "primary": self.primary_id or None,
                "address": self.address() or None}

    # -- the main loop -----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.bind()

    def bind(self) -> None:
        """Listen for primaries. Call it before the node starts its I/O thread, so that the first hello carries
        our address: the gateway pairs a spare with a primary only if it can say where the spare listens."""
        if self.listen_address[1] == 0:
            self.listen_address = self.node.io.listen(self.cfg.listen,
                                                      lambda hs: SecondaryProtocol(hs, first_epoch=None))
            if self.cfg.on_listening is not None:
                self.cfg.on_listening(self.listen_address)

    def run(self) -> Any:
        node = self.node
        node.mode = Mode.SECONDARY
        node.io.repl_sink = self._sink
        self.prepare()
        node.state = NodeState.SPARE
        while self.promote is None:
            try:
                if self.cfg.mode == "hybrid" and self.repl is not None and self.applied is not None:
                    self.run_hybrid()
                else:
                    self.step(node.next_event(0.05))
            except PrimaryLost as e:
                self.primary_lost(str(e))
            except BadState as e:
                self.drop_primary(str(e))
        return self.take_over(self.promote)

    def close(self, why: str) -> None:
        if self.repl is not None:
            self.node.close_repl(why, self.repl)

    def step(self, got: tuple[Source, NodeEvent] | None) -> None:
        if got is None:
            return
        source, ev = got
        if isinstance(ev, Opened) and isinstance(source, Conn):
            self.adopt(source)
            return
        if source is not self.repl:
            return  # a late event of a link we dropped, or a refused second primary
        if isinstance(ev, CheckpointRequest):
            self.receive_checkpoint(ev)
        elif isinstance(ev, (Heartbeat, Heard)):
            pass
        else:
            raise PrimaryLost(self._describe_loss(ev))

    def run_hybrid(self) -> None:
        """Hybrid mode between checkpoints: run our own VM on the mirrored inputs, as the primary does."""
        node, vm = self.node, self.node.vm
        assert vm is not None
        if not node.attached:
            self.step(node.next_event(0.05))
            return
        node.deliver_inputs()
        try:
            r = vm.run_slice(SLICE)
        except GuestFault as e:
            # The checkpoint will replace this VM (the primary faults the same way, or it does not).
            log.warning("secondary: our VM faulted (%s): waiting for the next checkpoint", e)
            r = None
        node.send_outputs(node.take_outputs())
        node.io.flush_gateway()  # one write per slice
        node.print_console()
        idle = r is None or (r.reason in (StopReason.HALT, StopReason.POWER_OFF) and not vm.wakeup_pending
                             and not node.backlog)
        self.step(node.next_event(0.05 if idle else 0.0))
        for got in node.drain_events():
            self.step(got)

    def adopt(self, conn: Conn) -> None:
        """A primary connected and proved the key: take its copy of the VM (our old state, if any, is discarded)."""
        node = self.node
        self.repl = conn
        self.failover_asked = False
        node.state = NodeState.RECEIVING
        try:
            self.receive_copy()
        except (StateError, ToyVMError, ColoError) as e:
            raise BadState(f"bad copy from the primary: {e}") from None
        node.state = NodeState.SECONDARY_RUNNING if self.cfg.mode == "hybrid" else NodeState.SECONDARY

    # -- the gateway's say ---------------------------------------------------------------------------------
    def on_attached(self) -> None:
        if self.failover_asked and self.applied is not None:
            self.node.send_gateway(FailoverRequest(self.node.generation, "the primary was lost"))

    def on_detached(self) -> None:
        pass

    def on_gateway_message(self, msg: Message) -> None:
        if isinstance(msg, Promote):
            if self.applied is None:
                log.error("secondary: promoted while holding no copy of the VM: ignored")
                return
            self.promote = msg
        elif isinstance(msg, Reset):
            self.reset(msg.reason)
        else:
            log.warning("secondary: unexpected message from the gateway: %r", msg)

    # -- receiving ---------------------------------------------------------------------------------------------
    def expect(self, *classes: type[Message], timeout: float | None = None) -> Message:
        """The next message from the primary, which must be one of `classes` (heartbeats skipped); silence,
        loss or an error lose the primary."""
        limit = timeout or self.cfg.heartbeat_timeout * COPY_TIMEOUT_FACTOR
        deadline = time.monotonic() + limit
        while True:
            if self.node.gate.holding:
                deadline = time.monotonic() + limit  # step mode: waiting for a step is not the primary's silence
            left = deadline - time.monotonic()
            if left <= 0:
                raise PrimaryLost(f"nothing from the primary for {limit:.1f} s inside a checkpoint")
            got = self.node.next_event(min(left, self.cfg.heartbeat_interval))
            if got is None:
                continue
            source, ev = got
            if source is not self.repl:
                continue
            if isinstance(ev, classes):
                return ev
            if isinstance(ev, (Heartbeat, Heard)):
                continue
            raise PrimaryLost(self._describe_loss(ev))

    def receive_copy(self) -> None:
        """The VM, as records (colo.livecopy): rounds of pages while the primary's guest serves on, then the final
        record with the last pages, the CPU and the devices; each verified piece by piece; then checkpoint-ready."""
        repl = self.repl
        assert repl is not None
        self.applied = self.complete = None  # from the first page on, what we held is no VM any more
        reader = RecordReader()
        r = self.receiver
        vm: Machine | None = None
        final: vmstate.StagedCheckpoint | None = None
        rounds = 0
        try:
            while True:
                ev = self.expect(InitialChunk, InitialSize)
                if not isinstance(ev, InitialChunk):
                    break  # initial-size (the protocol checked that it counts the bytes that came)
                for kind, blob in reader.feed(ev.data):
                    r.begin(epoch=None, full=False, vm=vm, machine_for=self._copy_target)
                    for piece in unpack_pieces(blob):
                        r.feed(piece)
                    staged = r.finish()
                    vm = r.machine
                    assert vm is not None
                    self.faults.reach("mid-copy", staged.epoch)
                    if kind == ROUND:  # (its pages live in the receiver's buffer until the next record)
                        vmstate.apply_pages(vm, staged)  # the VM does not run before the final record
                        rounds += 1
                        if STREAM.active:
                            trace.pages("secondary", staged.epoch, "applied", trace.staged_pages(staged),
                                        vm.ram.npages)
                    else:
                        final = staged
        finally:
            r.abort()  # a copy cut off: nothing staged survives it
        if vm is None or final is None:
            raise ProtocolError(f"the copy ended without its final record ({reader.pending} bytes of a record)")
        if self.cfg.mode == "hybrid":  # our VM runs from the copy on: the gateway must know it first
            self.load_copy(vm, final, rounds)
            self.resync()
            repl.send(CheckpointReady(final.epoch + 1))
        else:  # verified whole: the primary's guest may go on while we apply it (as after vmstate-received)
            repl.send(CheckpointReady(final.epoch + 1))
            self.load_copy(vm, final, rounds)

    def _copy_target(self, ram: int) -> Machine:
        """The VM a copy is written into (its first record says how much RAM): ours, emptied, when its RAM is
        that size; else a new one."""
        node = self.node
        if node.vm is not None and node.vm.ram.size == ram:
            node.vm.ram.clear()
            return node.vm
        node.vm = Machine(ram, hooks=self.cfg.hooks)
        return node.vm

    def load_copy(self, vm: Machine, staged: vmstate.StagedCheckpoint, rounds: int = 0) -> None:
        """The copy's final record: its pages, then the machine; from here the VM is the primary's."""
        node = self.node
        vmstate.apply(vm, staged)
        node.vm, self.applied, self.complete = vm, staged.applied(), None
        self.primary_id = staged.node
        node.generation = staged.generation
        node.epoch_outputs = []
        node.backlog = {e[0]: NetEvent(*e) for e in staged.inputs}
        node.received_seq = max([vm.net.state.last_input_seq, *node.backlog])
        node.conns_open = set(staged.conns)
        if self.cfg.mode == "hybrid":
            self.cache = vm.ram.view.copy()
        node.state_log.write(vm, staged.epoch, staged.generation)
        if STREAM.active:
            trace.pages("secondary", staged.epoch, "applied", trace.staged_pages(staged), vm.ram.npages)
        log.info("secondary: holds the VM of %s as of epoch %d (generation %d, %d round%s before the last)",
                 staged.node, staged.epoch, staged.generation, rounds, "" if rounds == 1 else "s")

    def receive_checkpoint(self, req: CheckpointRequest) -> None:
        """One checkpoint, start to end (our VM is stopped: we are not inside a slice). Each piece is checked as
        it comes and its pages decompressed in the pool meanwhile; nothing is applied until all of it is in."""
        repl, vm = self.repl, self.node.vm
        assert repl is not None and vm is not None and self.complete is None
        epoch = req.epoch
        self.faults.reach("after-request", epoch)
        # Before the reply: from then on the I/O thread may stage this checkpoint's state (_sink).
        self._sunk, self._finished, self._refused = None, None, None
        repl.send(CheckpointReply(epoch))
        self.faults.reach("after-reply", epoch)
        r = self.receiver
        try:
            self.expect(VmstateSend)  # the I/O thread has begun staging (_sink), unless the step gate holds
            if self._sunk != epoch:
                self._begin_state(epoch, vm)  # this state is ours to stage, here
            while True:  # the chunks are staged by the I/O thread as they arrive: only the size comes here
                ev = self.expect(VmstateChunk, VmstateSize)
                if not isinstance(ev, VmstateChunk):
                    break
                self._stage_chunk(ev)  # (without the I/O thread's help)
            if self._finished != epoch and self._refused is None:
                self._finish_state(epoch)  # (without the I/O thread's help)
        finally:
            r.abort()  # cut off or refused: the partial state is dropped, the VM stays where it was
        if self._refused is not None:
            raise BadState(f"bad state from the primary: {self._refused}")
        self.apply_complete()
        if self.cfg.mode == "hybrid":
            self.resync()
        repl.send(VmstateLoaded(epoch))
        self.faults.reach("after-loaded", epoch)

    def _sink(self, msg: Message) -> bool:
        """I/O thread, every message of the replication link: a checkpoint's state is staged here as it arrives
        (checked piece by piece, pages decompressed in the pool), so the VM thread, waiting in
        receive_checkpoint, wakes once, at vmstate-size, instead of once per chunk. True: taken care of."""
        if isinstance(msg, VmstateSend):
            vm = self.node.vm
            # Not while the step gate may hold: vmstate-received would wait in this thread, which reads the step
            # that would let it go. The VM thread then stages this state itself.
            if vm is not None and self.applied is not None and not self.node.gate.holding:
                self._begin_state(msg.epoch, vm)
                self._sunk = msg.epoch
            return False  # the VM thread sees it too: it follows the conversation
        if self._sunk is None or getattr(msg, "epoch", None) != self._sunk:
            return False
        if isinstance(msg, VmstateChunk):
            self._stage_chunk(msg)
            return True
        if isinstance(msg, VmstateSize):
            self._finish_state(msg.epoch)
            return False  # the VM thread applies it
        return False

    def _finish_state(self, epoch: int) -> None:
        """vmstate-size: the state is all in. Verified, it is complete, and we say so at once (from the I/O
        thread, as soon as it reads vmstate-size): the primary may release the output it covers."""
        self.faults.reach("after-size", epoch)
        try:
            self.complete = self.receiver.finish()
        except StateError as e:
            self._refused = e
            return
        vm = self.receiver.machine
        if STREAM.active and vm is not None:
            trace.pages("secondary", epoch, "staged", trace.staged_pages(self.complete), vm.ram.npages)
        repl = self.repl
        if repl is not None:
            repl.send(VmstateReceived(epoch))
        self.faults.reach("after-received", epoch)
        self._finished = epoch

    def _begin_state(self, epoch: int, vm: Machine) -> None:
        # Delta batches are against the primary's memory as of the last checkpoint: our RAM (periodic), or the
        # cache of it (hybrid: our VM ran since).
        pages = self.cache.reshape(-1, PAGE_SIZE) if self.cfg.mode == "hybrid" else vm.ram.pages
        self.receiver.begin(epoch=epoch, full=False, vm=vm, base=lambda: pages)
        self._chunks = 0

    def _stage_chunk(self, msg: VmstateChunk) -> None:
        self.receiver.offer(msg.data)  # a refusal is raised by finish(), at vmstate-size
        self._chunks += 1
        if self._chunks == 1:
            self.faults.reach("mid-receive", msg.epoch)

    def apply_complete(self) -> None:
        node, staged = self.node, self.complete
        if staged is None or node.vm is None:
            return
        if self.cfg.mode == "hybrid":
            vmstate.apply_hybrid(node.vm, self.cache, staged)
        else:
            vmstate.apply(node.vm, staged)
        node.backlog = {e[0]: NetEvent(*e) for e in staged.inputs}
        node.conns_open = set(staged.conns)
        node.generation = staged.generation
        self.applied, self.complete = staged.applied(), None
        node.state_log.write(node.vm, staged.epoch, staged.generation)
        if STREAM.active:
            trace.pages("secondary", staged.epoch, "applied", trace.staged_pages(staged), node.vm.ram.npages)

    def resync(self) -> None:
        """Hybrid: tell the gateway our VM now equals checkpoint `epoch`: our output before this point is from a
        run that no longer exists (drop it), and inputs after input_seq are what we need next."""
        node, staged = self.node, self.applied
        assert staged is not None and node.vm is not None
        node.vm.take_serial()
        node.vm.net.take_output()  # produced by the discarded run: never sent
        node.send_gateway(Resynced(node.generation, staged.epoch, staged.input_seq, staged.output_seq))

    def reset(self, why: str) -> None:
        """The gateway says our copy is of a past the service left: discard it and wait as a spare (the VM object
        stays, to be filled by the next copy)."""
        log.warning("secondary: reset by the gateway (%s): discarding the copy, waiting as a spare", why)
        if self.repl is not None:
            self.node.close_repl(f"{LEAVING}reset by the gateway", self.repl)
        self.repl = None
        self.applied = self.complete = None
        self.cache = None
        self.primary_id = ""
        self.failover_asked = False
        self.node.backlog.clear()
        self.node.state = NodeState.SPARE

    # -- losing the primary ------------------------------------------------------------------------------------
    def drop_primary(self, why: str) -> None:
        """Bad input: drop the connection, keep the last complete checkpoint, wait for a primary again."""
        log.error("secondary: %s", why)
        if self.repl is not None:
            self.node.close_repl(why, self.repl)
        self.repl = None
        self.complete = None if self.applied is None else self.complete
        self.node.state = NodeState.SECONDARY if self.applied is not None else NodeState.SPARE

    def primary_lost(self, why: str) -> None:
        node = self.node
        if self.repl is not None:
            node.close_repl(None, self.repl)
        self.repl = None
        if why.startswith(f"the primary reported an error: {LEAVING}"):
            # It left on purpose (a stop, or its guest ended): not a failure. The gateway says what comes next.
            log.info("secondary: the primary left (%s)", why.split(LEAVING, 1)[1])
            node.state = NodeState.SECONDARY if self.applied is not None else NodeState.SPARE
            return
        if self.applied is None:
            log.warning("secondary: the primary was lost before its copy arrived (%s): waiting as a spare", why)
            node.state = NodeState.SPARE
            self.primary_id = ""
            return
        log.warning("secondary: primary lost (%s): asking the gateway to promote us", why)
        if STREAM.active:
            trace.failover("primary-lost", reason=why, epoch=self.applied.epoch)
        node.state = NodeState.FAILOVER_REQUESTED
        self.failover_asked = True
        node.send_gateway(FailoverRequest(node.generation, why[:1000]))

    def _describe_loss(self, ev: Any) -> str:
        if isinstance(ev, ErrorMessage):
            return f"the primary reported an error: {ev.reason}"
        if isinstance(ev, ConnectionClosed):
            return "the primary closed the connection" + (" mid-checkpoint" if ev.state.name not in (
                "IDLE", "WAIT_READY") else "")
        if isinstance(ev, Closed):
            return ev.reason
        if isinstance(ev, Silent):
            return f"the primary was silent for more than {self.cfg.heartbeat_timeout} s"
        return f"unexpected {ev!r} from the primary"

    # -- failover ----------------------------------------------------------------------------------------------
    def take_over(self, promote: Promote) -> Any:
        from colo.primary import PrimaryRole

        node = self.node
        started = time.perf_counter()
        node.io.repl_sink = None
        node.state = NodeState.TAKING_OVER
        if self.repl is not None:
            node.close_repl(None, self.repl)
            self.repl = None
        rollback = self.complete is not None or self.cfg.mode != "hybrid"
        if STREAM.active:
            trace.failover("promote", generation=promote.generation, reason=promote.reason,
                           staged=self.complete.epoch if self.complete is not None else None, rollback=rollback)
        self.apply_complete()  # a complete checkpoint not yet applied: the primary may have released its output
        staged, vm = self.applied, node.vm
        assert staged is not None and vm is not None
        node.generation = promote.generation
        node.mode = Mode.PRIMARY
        # What it runs now: the VM's RAM, and the guest it insisted on (if it did): spares may check them.
        node.runs = {**node.wants, "ram": vm.ram.size}
        if rollback:  # we resume from checkpoint `epoch`: the gateway replays what came after it
            input_seq, output_seq = staged.input_seq, staged.output_seq
        else:  # hybrid: we go on from our own running state, which produced everything clients saw
            input_seq, output_seq = vm.net.state.last_input_seq, vm.net.state.last_output_seq
        if STREAM.active:
            trace.failover("resume", epoch=staged.epoch, generation=node.generation, input_seq=input_seq,
                           output_seq=output_seq, took_ms=round((time.perf_counter() - started) * 1e3, 3))
        node.send_gateway(Promoted(node.generation, staged.epoch, input_seq, output_seq,
                                   [list(e) for e in staged.outputs], sorted(node.conns_open)))
        log.warning("secondary: promoted (%s): resuming from checkpoint %d as the primary of generation %d "
                    "in %.1f ms", promote.reason, staged.epoch, node.generation,
                    (time.perf_counter() - started) * 1e3)
        return PrimaryRole(node, epoch=staged.epoch + 1)
