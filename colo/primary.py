"""The primary: runs the guest, serves it through the gateway, and checkpoints it to the secondary.

`checkpoint()` is the whole transaction in one straight line, as QEMU's colo_do_checkpoint_transaction:
request, reply, collect, compress, send, received (output may now be released), loaded, resume.
Any trouble with the secondary (silence, an error, a protocol violation) makes the primary go on unprotected:
it tells the gateway, which releases everything it held for us.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colo import vmstate
from colo.errors import ColoError
from colo.faults import FaultPlan
from colo.link import Closed, Event, Link, ProtocolLink, authenticate, connect
from colo.messages import (
    CheckpointNow,
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    Commit,
    ErrorMessage,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Message,
    Protection,
    ProtectionState,
    Trigger,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
)
from colo.node import GuestExited, Node, NodeConfig, NodeStop
from colo.protocol import ConnectionClosed, PrimaryProtocol
from colo.stats import CheckpointRecord, PhaseClock, StatsWriter
from colo.wire import DEFAULT_CHUNK_SIZE
from toyvm import Machine

log = logging.getLogger("colo.primary")
CONNECT_ATTEMPTS_S = 10.0  # how long the primary keeps trying to reach the secondary at start
REPLY_TIMEOUT_FACTOR = 4  # wait this many heartbeat timeouts for a reply inside a checkpoint


class SecondaryLost(Exception):
    pass


@dataclass
class PrimaryConfig(NodeConfig):
    guest: str = ""
    ram: int = 64 << 20
    cmdline: str = ""
    secondary: tuple[str, int] | None = None
    interval: float = 0.1  # periodic: the checkpoint interval; hybrid: the backstop interval
    stats: str | None = None
    mode: str = "periodic"


class PrimaryNode(Node):
    ROLE = "primary"

    def __init__(self, cfg: PrimaryConfig) -> None:
        super().__init__(cfg)
        self.pcfg = cfg
        self.epoch = 1  # the next checkpoint's number
        self.checkpoints = 0
        self.triggers: dict[str, int] = {}
        self.last_pause_ms = 0.0
        self.protected = False
        self.stats = StatsWriter(cfg.stats, mode=cfg.mode, interval_ms=cfg.interval * 1000)
        self.faults = FaultPlan()

    def status_info(self) -> dict[str, Any]:
        info = super().status_info()
        info.update(epoch=self.epoch - 1, checkpoints=self.checkpoints, triggers=dict(self.triggers),
                    protected=self.protected, last_pause_ms=round(self.last_pause_ms, 3),
                    interval_ms=round(self.pcfg.interval * 1e3, 3), mode=self.pcfg.mode)
        return info

    # -- start ------------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.pcfg
        self.vm = Machine(cfg.ram, hooks=cfg.hooks)
        self.vm.boot(Path(cfg.guest), cfg.cmdline)
        self.connect_gateway()
        assert self.gw is not None
        self.gw.on_arrival = self._stop_vm_for_request
        self.state = "unprotected"
        if cfg.secondary is not None:
            self.protect(cfg.secondary)
        try:
            while True:
                started = time.perf_counter()
                self.serve(cfg.interval)
                if self.repl is None:
                    self.requested_trigger = None  # nobody to checkpoint to: a late request means nothing
                    continue
                trigger = self.requested_trigger or Trigger.TIMER
                self.requested_trigger = None
                self.checkpoint(trigger, suspended_at=started + cfg.interval)
        except GuestExited as e:
            # The service ended by itself: nothing to fail over to. Say so before going.
            log.warning("primary: %s", e)
            if self.gw is not None:
                self.gw.try_send(Protection(ProtectionState.UNPROTECTED))
            return e.exit_code
        except NodeStop as e:
            log.warning("primary: %s", e)
            return e.exit_code
        finally:
            self.stats.close()
            self.stop()

    def held_inputs(self) -> list[list[Any]]:
        return [[e.seq, e.kind, e.conn, e.data] for _, e in sorted(self.backlog.items())]

    def _stop_vm_for_request(self, ev: Event) -> None:
        """Reader thread: the gateway asks for a checkpoint (hybrid mismatch, timeout, manual): stop the VM at
        its next exact point instead of finishing the slice."""
        if isinstance(ev, CheckpointNow) and self.vm is not None:
            self.vm.request_stop()

    def protect(self, address: tuple[str, int]) -> None:
        """Connect to the secondary and give it the whole VM; on success checkpoints start."""
        try:
            sock = self._connect_secondary(address)
            hs = authenticate(sock, self.cfg.key, "primary", "secondary")
            self.repl = ProtocolLink(sock, PrimaryProtocol(hs, first_epoch=self.epoch), name="secondary",
                                     tracer=self.tracer, inbox=self.inbox)
            self.initial_copy()
        except (OSError, ColoError, SecondaryLost) as e:
            self._unprotect(f"cannot protect the VM: {e}")
            return
        self.protected = True
        self.state = "protected"
        assert self.gw is not None
        self.gw.send(Protection(ProtectionState.PROTECTED))
        log.info("primary: protected by the secondary at %s:%d", *address)

    def _connect_secondary(self, address: tuple[str, int]) -> socket.socket:
        deadline = time.monotonic() + CONNECT_ATTEMPTS_S
        while True:
            try:
                return connect(address)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                self.check_gateway()
                time.sleep(0.1)

    def initial_copy(self) -> None:
        vm = self.vm
        assert vm is not None and self.repl is not None
        self.forward_outputs()  # what the guest said before protection belongs to the unprotected past
        self.epoch_outputs.clear()
        vm.collect_dirty()
        blob, _ = vmstate.encode(vm, vm.ram.nonzero_pages(), epoch=0, full=True, inputs=self.held_inputs())
        self.state_log.write(vm, 0)
        for lo in range(0, len(blob), DEFAULT_CHUNK_SIZE):
            self.repl.send(InitialChunk(blob[lo:lo + DEFAULT_CHUNK_SIZE]))
        self.repl.send(InitialSize(len(blob)))
        self.expect(CheckpointReady, timeout=max(30.0, len(blob) / 50e6))

    # -- the checkpoint transaction -------------------------------------------------------------------------
    def checkpoint(self, trigger: Trigger, suspended_at: float) -> None:
        vm, repl, gw = self.vm, self.repl, self.gw
        assert vm is not None and repl is not None and gw is not None
        epoch = self.epoch
        clock = PhaseClock(min(suspended_at, time.perf_counter()))
        rec = CheckpointRecord(epoch, trigger.value)
        try:
            self.faults.reach("before-request", epoch)
            repl.send(CheckpointRequest(epoch, trigger))
            self.faults.reach("after-request", epoch)
            self.expect(CheckpointReply)
            # suspend: from the end of the VM's last slice through the request/reply round trip
            clock.mark("suspend")
            self.faults.reach("after-reply", epoch)
            outputs = self.epoch_outputs
            self.epoch_outputs = []
            pages = vm.collect_dirty()
            blob, st = vmstate.encode(vm, pages, epoch=epoch, full=False, outputs=outputs,
                                      inputs=self.held_inputs())
            self.state_log.write(vm, epoch)
            clock.mark("compress")  # collect (dirty log, page runs, machine state) + compress: split them
            clock.phases["collect"] = clock.phases["compress"] - st.compress_s * 1e3
            clock.phases["compress"] = st.compress_s * 1e3
            repl.send(VmstateSend(epoch))
            chunks = range(0, len(blob), DEFAULT_CHUNK_SIZE)
            for n, lo in enumerate(chunks):
                if n == len(chunks) // 2:
                    self.faults.reach("mid-send", epoch)
                repl.send(VmstateChunk(epoch, blob[lo:lo + DEFAULT_CHUNK_SIZE]))
            repl.send(VmstateSize(epoch, len(blob)))
            clock.mark("send")
            self.faults.reach("after-size", epoch)
            self.expect(VmstateReceived)
            clock.mark("received")
            self.faults.reach("after-received", epoch)
            net = vm.net.state
            gw.send(Commit(epoch, net.last_input_seq, net.last_output_seq))  # output commit: release
            self.faults.reach("after-commit", epoch)
            self.expect(VmstateLoaded)
            clock.mark("loaded")
            self.faults.reach("after-loaded", epoch)
        except (SecondaryLost, ColoError, OSError) as e:
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

    def expect(self, cls: type[Message], timeout: float | None = None) -> Message:
        """Wait for `cls` from the secondary (colo_receive_check_message): heartbeats are skipped; anything
        else the protocol would already have refused; silence, loss or an error message lose the secondary."""
        limit = timeout if timeout is not None else self.cfg.heartbeat_timeout * REPLY_TIMEOUT_FACTOR
        deadline = time.monotonic() + limit
        repl = self.repl
        assert repl is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not repl.alive(self.cfg.heartbeat_timeout):
                raise SecondaryLost(f"no {cls.NAME} from the secondary within {limit:.1f} s")
            got = self.next_event(min(left, self.cfg.heartbeat_interval))  # wake to notice silence
            if got is None:
                continue
            link, ev = got
            if link is not repl:
                continue
            if isinstance(ev, cls):
                return ev
            if isinstance(ev, Heartbeat):
                continue
            raise SecondaryLost(self._describe_loss(ev))

    @staticmethod
    def _describe_loss(ev: Event) -> str:
        if isinstance(ev, ErrorMessage):
            return f"the secondary reported an error: {ev.reason}"
        if isinstance(ev, (Closed, ConnectionClosed)):
            return "the secondary closed the connection"
        return f"unexpected {ev!r}"

    def on_replication_event(self, link: Link, ev: Event) -> None:
        """Between checkpoints only heartbeats may come from the secondary."""
        if link is self.repl and not isinstance(ev, Heartbeat):
            self._unprotect(self._describe_loss(ev))

    def serve(self, seconds: float, on_replication_event: Any = None) -> None:
        super().serve(seconds, on_replication_event or self.on_replication_event)
        if self.repl is not None and not self.repl.alive(self.cfg.heartbeat_timeout):
            self._unprotect(f"the secondary was silent for more than {self.cfg.heartbeat_timeout} s")

    def _unprotect(self, why: str) -> None:
        """Go on alone: the gateway releases what it held and everything from now on."""
        log.warning("primary: running unprotected: %s", why)
        self.close_replication(why)
        self.protected = False
        self.state = "unprotected"
        self.epoch_outputs.clear()
        if self.gw is not None:
            self.gw.try_send(Protection(ProtectionState.UNPROTECTED))
