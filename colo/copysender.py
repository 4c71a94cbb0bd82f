"""The primary's side of a copy to a new secondary (the record stream and the planner: colo.livecopy).

A live copy is driven by the primary's loop, one `step` between two short guest slices. A step sends records of
the current round for at most STEP_SECONDS, so that the guest never stops longer than about that for the copy,
and sends nothing while the link still holds COPY_QUEUE bytes (the secondary sets the pace). The first round
scans RAM for non-zero pages a window at a time as it goes (a scan of 1 GiB at once would be a stop of its own);
dirty logging starts before it, so a page written after it went out goes again in the next round. When a round
ends the planner says: another round of what was dirtied meanwhile, or the final stop.

A stop-and-copy (`--copy stop`, or a guest that has not run yet) is the final stop alone, with every page. The
final stop too sends records of bounded size, the machine state in the last one.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from colo import trace, vmstate
from colo.errors import ColoError
from colo.events import STREAM
from colo.livecopy import FINAL, ROUND, RoundPlanner, pack_pieces, record
from colo.messages import CheckpointReady, InitialChunk, InitialSize
from colo.wire import DEFAULT_CHUNK_SIZE
from toyvm.contract import PAGE_SIZE

if TYPE_CHECKING:
    from colo.primary import PrimaryRole

log = logging.getLogger("colo")

# A step and the guest's turn are short and equal: the longest step is a copy's longest stall of the guest. At
# 3 ms / 256-page records / 16 MiB scan windows the longest step was 5-10 ms (a window's scan alone took 2-3 ms);
# at these values 2-4 ms, with the same time until protected (64 MiB and 1 GiB, benchmarks/reprotect.py).
STEP_SECONDS = 0.001  # the longest the guest waits for one step of a round (a record may overrun it a little)
GUEST_SLICE = 0.001  # the guest's turn between two steps: about half the CPU each, while a copy goes on
RECORD_PAGES = 128  # pages per record of a round (512 KiB before compression)
STOP_RECORD_PAGES = 2048  # pages per record while the guest is stopped (8 MiB: compressed on two threads)
SCAN_PAGES = 1024  # RAM the first round scans for non-zero pages at a time (4 MiB)
COPY_QUEUE = 4 << 20  # bytes the link may hold unsent before a step waits for the secondary
FINAL_STOP_SECONDS = 0.02  # a remainder that goes out in this long ends the rounds (about one checkpoint)
STOP_PAGES_AT_LEAST = 256


class CopySender:
    """One copy of the VM to the secondary the role just connected to."""

    def __init__(self, role: PrimaryRole, *, live: bool, reply_timeout: float) -> None:
        self.role, self.live, self.reply_timeout = role, live, reply_timeout
        self.stager = vmstate.Stager()  # its own: the checkpoints' one may still be sending a state
        vm = role.node.vm
        assert vm is not None
        self.vm = vm
        self.epoch = role.epoch - 1  # the copy is this node's state as of its last checkpoint's number
        self.planner = RoundPlanner(stop_pages=STOP_PAGES_AT_LEAST)
        self.started = time.perf_counter()
        self.bytes_sent = 0
        self.pages_sent = 0
        self.busy_s = 0.0  # time the guest waited for steps of rounds
        self.longest_step_ms = 0.0
        self.round_pages = 0  # pages sent in the current round
        self.round_started = self.started
        self.queue: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)  # pages of the round still to send
        self.at = 0  # how many of `queue` went out
        self.scan_at: int | None = 0  # the first round: the next page to scan (None: no scan, or done)
        self.faulted = False
        role.node.forward_outputs()  # what the guest said before belongs to the unprotected past
        vm.collect_dirty()  # from here, the dirty log says what changed since a page was sent
        log.info("primary: copying the VM to %s %s (%d MiB of RAM)", role.secondary_id,
                 "while the guest serves" if live else "in one stop", vm.ram.size >> 20)
        if STREAM.active:
            trace.failover("copy", secondary=role.secondary_id, epoch=self.epoch, live=live)

    def progress(self) -> dict[str, Any]:
        return {"round": len(self.planner.rounds), "pages_left": self._left_in_round(),
                "pages_sent": self.pages_sent, "mb_s": round(self.bytes_sent / max(self.busy_s, 1e-6) / 1e6, 1),
                "seconds": round(time.perf_counter() - self.started, 2), "secondary": self.role.secondary_id}

    def _left_in_round(self) -> int:
        left = len(self.queue) - self.at
        if self.scan_at is not None:  # not yet scanned: at most the rest of RAM
            left += self.vm.ram.npages - self.scan_at
        return left

    # -- a live copy -------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Between two guest slices: records of the current round for up to STEP_SECONDS; at the round's end,
        plan the next one or take the final stop."""
        repl = self.role.repl
        assert repl is not None
        t = time.perf_counter()
        while repl.queued <= COPY_QUEUE and time.perf_counter() - t < STEP_SECONDS:
            pages = self._next_pages()
            if pages is None:
                if repl.queued:  # the round is on its way: plan once it is on the wire, so that the final
                    break        # stop does not wait for it
                self._end_round()
                return
            if not len(pages):
                continue  # a window of zero pages: scan the next, time permitting
            self._send(ROUND, pages)
            self.round_pages += len(pages)
            self.pages_sent += len(pages)
            if not self.faulted:  # a primary that dies here leaves the secondary a part of a copy
                self.faulted = True
                self.role.faults.reach("mid-copy", self.epoch)
        took = time.perf_counter() - t
        self.busy_s += took
        self.longest_step_ms = max(self.longest_step_ms, took * 1e3)

    def _next_pages(self) -> npt.NDArray[np.int64] | None:
        """The next record's pages of this round (none, after scanning a window of zero pages: one window per
        call, so that a step stays short in a large, mostly empty RAM); None when the round has sent everything."""
        ram = self.vm.ram
        if self.at >= len(self.queue):
            if self.scan_at is None or self.scan_at >= ram.npages:
                self.scan_at = None
                return None
            lo, hi = self.scan_at, min(self.scan_at + SCAN_PAGES, ram.npages)
            words = ram.view.view(np.uint64).reshape(ram.npages, PAGE_SIZE // 8)[lo:hi]
            self.queue, self.at = lo + np.flatnonzero(words.any(axis=1)), 0
            self.scan_at = hi
        pages = self.queue[self.at:self.at + RECORD_PAGES]
        self.at += len(pages)
        return pages

    def _end_round(self) -> None:
        self.planner.sent(self.round_pages)
        self.round_pages = 0
        left = self.vm.collect_dirty()
        # Pages a second from the round's start until all of it was on the wire (guest slices included: a
        # rate of the copy alone would leave out the secondary, which may still be reading the last records).
        now = time.perf_counter()
        rate = self.planner.rounds[-1] / max(now - self.round_started, 1e-6)
        self.round_started = now
        self.planner.stop_pages = max(STOP_PAGES_AT_LEAST, int(rate * FINAL_STOP_SECONDS))
        decision = self.planner.plan(len(left))
        if decision == "round":
            self.queue, self.at = left, 0
            return
        if decision == "stall":
            log.warning("primary: the copy does not converge (rounds of %s pages: the guest dirties pages as fast "
                        "as they go out): stopping the guest for the last %d", self.planner.rounds, len(left))
        self.final_stop(left)

    # -- the end of every copy -------------------------------------------------------------------------------
    def final_stop(self, pages: npt.NDArray[np.int64] | None = None) -> None:
        """The guest stays stopped for the last pages, the CPU and the devices, until checkpoint-ready."""
        role, node, vm = self.role, self.role.node, self.vm
        repl = role.repl
        assert repl is not None
        t = time.perf_counter()
        if pages is None:  # a stop-and-copy: every page, now
            vm.collect_dirty()
            pages = vm.ram.nonzero_pages()
        else:  # what the last round left, and anything written since (nothing: the guest has not run)
            both = np.zeros(vm.ram.npages, dtype=np.bool_)  # (not np.union1d: its first call costs ~6 ms)
            both[pages] = True
            both[vm.collect_dirty()] = True
            pages = np.flatnonzero(both)
        node.forward_outputs()  # released at once: the copy's state comes after them
        node.epoch_outputs.clear()
        # Still records of bounded size (the last one FINAL, with the machine): one giant record would hold
        # either side's interpreter for seconds (a starved I/O thread misses heartbeats), and the secondary
        # applies each record while the next one comes.
        parts = range(0, max(len(pages), 1), STOP_RECORD_PAGES)
        for n, lo in enumerate(parts):
            last = n == len(parts) - 1
            self._send(FINAL if last else ROUND, pages[lo:lo + STOP_RECORD_PAGES], machine=last,
                       fault_midway=not self.live and n == len(parts) // 2)
            if not repl.flush(self.reply_timeout, below=0 if last else COPY_QUEUE):
                raise ColoError(f"the copy could not be sent: {repl.closed_reason or 'the link is stuck'}")
        repl.send(InitialSize(self.bytes_sent))
        role.expect(CheckpointReady, timeout=max(30.0, self.bytes_sent / 50e6))
        node.state_log.write(vm, self.epoch, node.generation)
        stop_ms = (time.perf_counter() - t) * 1e3
        if STREAM.active:
            trace.failover("copied", secondary=role.secondary_id, epoch=self.epoch, bytes=self.bytes_sent,
                           rounds=len(self.planner.rounds) + 1, stop_ms=round(stop_ms, 1))
        role.copied({"live": self.live, "rounds": len(self.planner.rounds) + 1,
                     "pages": self.pages_sent + len(pages), "final_pages": len(pages),
                     "stop_ms": round(stop_ms, 1), "longest_step_ms": round(self.longest_step_ms, 1),
                     "seconds": round(time.perf_counter() - self.started, 3), "mb": round(self.bytes_sent / 1e6, 1),
                     "stalled": self.planner.stalled})

    def _send(self, kind: int, pages: npt.NDArray[np.int64], *, machine: bool = False,
              fault_midway: bool = False) -> None:
        """One record, in chunks queued on the link (the I/O thread writes them out)."""
        role, node = self.role, self.role.node
        repl = role.repl
        assert repl is not None
        staged = self.stager.stage(self.vm, pages, epoch=self.epoch, full=False, copy=False,
                                   inputs=role.held_inputs() if machine else None, generation=node.generation,
                                   node=node.id, conns=sorted(node.conns_open))
        data = record(kind, pack_pieces([bytes(p) for p in self.stager.pieces(staged)]))
        starts = range(0, len(data), DEFAULT_CHUNK_SIZE)
        for n, lo in enumerate(starts):
            if fault_midway and n == len(starts) // 2:
                role.faults.reach("mid-copy", self.epoch)
            if not repl.send(InitialChunk(data[lo:lo + DEFAULT_CHUNK_SIZE])):
                raise ColoError(f"the copy could not be sent: {repl.closed_reason or 'the link is closed'}")
        self.bytes_sent += len(data)
