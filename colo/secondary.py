"""The secondary: receives checkpoints into a staging area, applies each whole, and takes over on failover.

A checkpoint is *complete* when its state arrived whole and verified (vmstate-received). It is applied
right after; if the primary dies between the two, failover applies it first. A state that was cut off or
fails verification is discarded: the VM stays at the last complete checkpoint.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from colo import vmstate
from colo.errors import AuthError, ColoError
from colo.faults import FaultPlan
from colo.link import Closed, Event, ProtocolLink, authenticate
from colo.messages import (
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    Commit,
    ErrorMessage,
    FailoverRequest,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Input,
    Promote,
    Promoted,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.node import Node, NodeConfig, NodeStop
from colo.protocol import ConnectionClosed, SecondaryProtocol
from toyvm import Machine
from toyvm.errors import StateError, ToyVMError

log = logging.getLogger("colo.secondary")


@dataclass
class SecondaryConfig(NodeConfig):
    listen: tuple[str, int] = ("127.0.0.1", 0)
    on_listening: Any = field(default=None, repr=False)  # callback(address) once the port is open
    mode: str = "periodic"  # "hybrid": the secondary VM runs too, on the same inputs as the primary


class PrimaryLost(Exception):
    pass


class SecondaryNode(Node):
    ROLE = "secondary"

    def __init__(self, cfg: SecondaryConfig) -> None:
        super().__init__(cfg)
        self.scfg = cfg
        self.faults = FaultPlan()
        self.complete: vmstate.StagedCheckpoint | None = None  # received and verified, not yet applied
        self.applied: vmstate.StagedCheckpoint | None = None  # the checkpoint the VM holds now
        self.promoted = False
        self.hybrid = cfg.mode == "hybrid"
        self.cache: Any = None  # hybrid: the primary's memory as of the last checkpoint
        self.in_checkpoint = False
        self._chunks: list[bytes] = []
        self._pending: list[tuple[socket.socket, Any]] = []
        self._pending_lock = threading.Lock()

    def status_info(self) -> dict[str, Any]:
        info = super().status_info()
        latest = self.complete or self.applied
        info.update(epoch=self.applied.epoch if self.applied else 0, complete_epoch=latest.epoch if latest else 0)
        return info

    # -- start ------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.listener = socket.create_server(self.scfg.listen, backlog=8)
        self.address = self.listener.getsockname()[:2]
        if self.scfg.on_listening is not None:
            self.scfg.on_listening(self.address)
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
        try:
            self.connect_gateway()
            self.state = "waiting for the primary"
            while not self.promoted:
                if self.hybrid and self.repl is not None and self.applied is not None:
                    self.run_hybrid()
                else:
                    self.step()
            return self.serve_forever()
        except NodeStop as e:
            log.warning("secondary: %s", e)
            return e.exit_code
        finally:
            self.stop()
            self.listener.close()

    def _accept_loop(self) -> None:
        """Authenticate every incoming connection, each in its own thread (a silent peer must not delay the
        real primary); only a primary that proves the key becomes our peer."""
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._authenticate, args=(sock, peer), daemon=True).start()

    def _authenticate(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hs = authenticate(sock, self.cfg.key, "secondary", "primary")
        except (AuthError, ColoError, OSError) as e:
            log.error("secondary: refused a connection from %s:%d: %s", peer[0], peer[1], e)
            sock.close()
            return
        with self._pending_lock:
            self._pending.append((sock, hs))

    def _adopt_primary(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for sock, hs in pending:
            if self.repl is not None or self.promoted:
                log.error("secondary: refused a second primary: one is already attached")
                sock.close()
                continue
            self.repl = ProtocolLink(sock, SecondaryProtocol(hs), name="primary", tracer=self.tracer,
                                     inbox=self.inbox)
            self.repl.on_arrival = self._stop_vm_for_checkpoint
            self._chunks = []
            self.state = "receiving the initial copy"

    def _stop_vm_for_checkpoint(self, ev: Event) -> None:
        """Reader thread: a checkpoint request stops our running VM at its next exact point (hybrid)."""
        if isinstance(ev, CheckpointRequest) and self.vm is not None:
            self.vm.request_stop()

    # -- the main loop ----------------------------------------------------------------------------------
    def step(self) -> None:
        self._adopt_primary()
        repl = self.repl
        if repl is not None and not repl.alive(self.cfg.heartbeat_timeout) and not repl.closed:
            self.primary_lost(f"the primary was silent for more than {self.cfg.heartbeat_timeout} s")
            return
        got = self.next_event(0.05)
        if got is None:
            return
        link, ev = got
        if link is not self.repl:
            return  # a late event from a link we already dropped
        try:
            self.on_replication(ev)
        except PrimaryLost as e:
            self.primary_lost(str(e))
        except (StateError, ToyVMError, ColoError) as e:
            self._bad_input_or_loss(e)

    def run_hybrid(self) -> None:
        """Hybrid mode between checkpoints: run our own VM on the mirrored inputs, as the primary does."""
        try:
            self.serve(0.05, lambda link, ev: self.on_replication(ev) if link is self.repl else None)
            repl = self.repl
            if repl is not None and not repl.alive(self.cfg.heartbeat_timeout) and not repl.closed:
                raise PrimaryLost(f"the primary was silent for more than {self.cfg.heartbeat_timeout} s")
        except PrimaryLost as e:
            self.primary_lost(str(e))
        except (StateError, ToyVMError, ColoError) as e:
            self._bad_input_or_loss(e)

    def _finish_checkpoint(self) -> None:
        """Hybrid: after checkpoint-reply our VM stays stopped; take the rest of the checkpoint here."""
        while self.in_checkpoint:
            repl = self.repl
            if repl is None:
                return
            if not repl.alive(self.cfg.heartbeat_timeout):
                raise PrimaryLost("the primary went silent during a checkpoint")
            got = self.next_event(self.cfg.heartbeat_timeout)
            if got is not None and got[0] is repl:
                self.on_replication(got[1])

    def on_replication(self, ev: Event) -> None:
        repl = self.repl
        assert repl is not None
        proto = repl.proto
        if isinstance(ev, InitialChunk) or isinstance(ev, VmstateChunk):
            self._chunks.append(ev.data)
            if isinstance(ev, VmstateChunk) and len(self._chunks) == 1:
                self.faults.reach("mid-receive", ev.epoch)
        elif isinstance(ev, InitialSize):
            self.load_initial(b"".join(self._chunks))
            self._chunks = []
            if self.hybrid:
                self.resync()
            repl.send(CheckpointReady(proto.epoch))
            self.state = "secondary (hybrid: running)" if self.hybrid else "secondary"
        elif isinstance(ev, CheckpointRequest):
            self.faults.reach("after-request", ev.epoch)
            self.in_checkpoint = True  # hybrid: our VM is stopped (between slices) until vmstate-loaded
            repl.send(CheckpointReply(ev.epoch))
            self.faults.reach("after-reply", ev.epoch)
            if self.hybrid:
                self._finish_checkpoint()
        elif isinstance(ev, VmstateSend):
            self._chunks = []
        elif isinstance(ev, VmstateSize):
            self.faults.reach("after-size", ev.epoch)
            assert self.vm is not None
            blob, self._chunks = b"".join(self._chunks), []
            self.complete = vmstate.decode(blob, self.vm, epoch=ev.epoch)  # verified, staged, not applied
            repl.send(VmstateReceived(ev.epoch))
            self.faults.reach("after-received", ev.epoch)
            self.apply_complete()
            self.in_checkpoint = False
            if self.hybrid:
                self.resync()
            repl.send(VmstateLoaded(ev.epoch))
            self.faults.reach("after-loaded", ev.epoch)
        elif isinstance(ev, Heartbeat):
            pass
        elif isinstance(ev, ErrorMessage):
            raise PrimaryLost(f"the primary reported an error: {ev.reason}")
        elif isinstance(ev, (Closed, ConnectionClosed)):
            raise PrimaryLost("the primary closed the connection" if isinstance(ev, ConnectionClosed)
                              else ev.reason)

    def load_initial(self, blob: bytes) -> None:
        ram = vmstate.peek_ram_size(blob)
        vm = self.vm if self.vm is not None and self.vm.ram.size == ram else Machine(ram, hooks=self.cfg.hooks)
        staged = vmstate.decode(blob, vm, epoch=0)
        vmstate.apply(vm, staged)
        self.vm, self.applied, self.complete = vm, staged, None
        self.epoch_outputs = []
        self.backlog = {e[0]: Input(*e) for e in staged.inputs}
        if self.hybrid:
            self.cache = vm.ram.view.copy()
        self.state_log.write(vm, 0)

    def apply_complete(self) -> None:
        if self.complete is not None and self.vm is not None:
            if self.hybrid:
                vmstate.apply_hybrid(self.vm, self.cache, self.complete)
            else:
                vmstate.apply(self.vm, self.complete)
                self.backlog = {e[0]: Input(*e) for e in self.complete.inputs}
            self.applied, self.complete = self.complete, None
            self.state_log.write(self.vm, self.applied.epoch)

    def resync(self) -> None:
        """Hybrid: tell the gateway our VM now equals checkpoint `epoch`: our output before this point is from
        a run that no longer exists (drop it), and inputs after input_seq are what we need next."""
        staged = self.applied
        assert staged is not None and self.gw is not None and self.vm is not None
        self.vm.take_serial()
        self.vm.net.take_output()  # produced by the discarded run: never sent
        self.gw.send(Commit(staged.epoch, staged.input_seq, staged.output_seq))

    def _bad_input_or_loss(self, e: Exception) -> None:
        """A protocol error on a link that has closed is the primary dying mid-conversation, not bad input."""
        repl = self.repl
        if repl is not None and (repl.closed or repl.proto.state.name == "CLOSED"):
            self.primary_lost(f"the connection closed mid-checkpoint ({e})")
        else:
            self.drop_primary(f"bad state from the primary: {e}")

    def drop_primary(self, why: str) -> None:
        """Bad input: drop the connection, keep the last complete checkpoint, wait for a primary again."""
        log.error("secondary: %s", why)
        self.close_replication(why)
        self._chunks = []
        self.state = "waiting for the primary"

    # -- failover -----------------------------------------------------------------------------------------
    def primary_lost(self, why: str) -> None:
        log.warning("secondary: primary lost (%s): asking the gateway to promote us", why)
        self.close_replication()
        self._chunks = []  # a partial state is discarded
        if self.applied is None:
            raise NodeStop("the primary was lost before the initial copy arrived: nothing to take over", 6)
        self.state = "failover requested"
        assert self.gw is not None
        self.gw.send(FailoverRequest(why))

    def on_other_gateway_message(self, ev: Event) -> None:
        if isinstance(ev, Promote):
            if self.applied is None:
                raise NodeStop("promoted before the initial copy arrived: nothing to take over", 6)
            self.take_over(ev.reason)
        else:
            super().on_other_gateway_message(ev)

    def take_over(self, why: str) -> None:
        started = time.perf_counter()
        self.close_replication()
        rollback = self.complete is not None or not self.hybrid
        self.apply_complete()  # a complete checkpoint not yet applied: the primary may have released its output
        staged = self.applied
        assert staged is not None and self.gw is not None and self.vm is not None
        self.promoted = True
        self.state = "active (unprotected)"
        if rollback:  # we resume from checkpoint `epoch`: the gateway replays what came after it
            self.gw.send(Promoted(staged.epoch, staged.input_seq, staged.output_seq,
                                  [list(e) for e in staged.outputs]))
        else:  # hybrid: we go on from our own running state, which produced everything clients saw
            net = self.vm.net.state
            self.gw.send(Promoted(staged.epoch, net.last_input_seq, net.last_output_seq,
                                  [list(e) for e in staged.outputs]))
        log.warning("secondary: promoted (%s): resuming from checkpoint %d in %.1f ms", why, staged.epoch,
                    (time.perf_counter() - started) * 1e3)

    def serve_forever(self) -> int:
        while True:
            self.serve(1.0)
