"""One record per checkpoint: what it carried and what each phase cost. Written as JSON lines."""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from colo.events import STREAM

# request   checkpoint-request sent -> checkpoint-reply received: the guest runs meanwhile (as in QEMU)
# collect   the stop -> the state staged: dirty log, machine state, and (pipelined) the pages copied
# send      vmstate-send -> vmstate-size sent: each batch compressed and sent as it is ready
# received  vmstate-size sent -> vmstate-received: the secondary verifies the state
# loaded    vmstate-received -> vmstate-loaded: the secondary applies it
# resume    what is left until the guest runs again
# Strict checkpoints run them in that order with the guest stopped from the stop to resume; pipelined ones
# resume the guest after collect, and send, received and loaded follow while it runs. Older records (before
# the guest ran during the round trip) have suspend and compress phases instead of request.
PHASES = ("request", "collect", "send", "received", "loaded", "resume")
MODES = ("strict", "pipelined")


@dataclass
class CheckpointRecord:
    epoch: int
    trigger: str
    dirty_pages: int = 0
    zero_pages: int = 0
    bytes_raw: int = 0
    bytes_wire: int = 0
    phases_ms: dict[str, float] = field(default_factory=dict)
    pause_ms: float = 0.0  # the guest stopped for the checkpoint
    commit_ms: float = 0.0  # from the stop until vmstate-received: output of the epoch may go from then on
    checkpoint_mode: str = "strict"  # or "pipelined"
    time: float = field(default_factory=time.time)
    # Which run wrote it: one --stats file may collect several runs (the writer appends). StatsWriter stamps these.
    run_id: str = ""
    mode: str | None = None  # "periodic" or "hybrid"
    interval_ms: float | None = None  # the checkpoint timer: the periodic interval, or the hybrid backstop

    @property
    def ratio(self) -> float:
        return self.bytes_raw / self.bytes_wire if self.bytes_wire else 0.0

    def to_json(self) -> str:
        d: dict[str, Any] = asdict(self)
        d["compression_ratio"] = round(self.ratio, 2)
        d["phases_ms"] = {k: round(v, 3) for k, v in self.phases_ms.items()}
        d["pause_ms"] = round(self.pause_ms, 3)
        d["commit_ms"] = round(self.commit_ms, 3)
        if self.interval_ms is not None:
            d["interval_ms"] = round(self.interval_ms, 3)
        return json.dumps(d, sort_keys=True)


class PhaseClock:
    """Times consecutive phases: clock.mark('collect') closes the phase that started at the previous mark."""

    def __init__(self, start: float | None = None) -> None:
        self.t0 = self.last = start if start is not None else time.perf_counter()
        self.phases: dict[str, float] = {}
        self._trace: tuple[str, int] | None = None

    def trace_as(self, side: str, epoch: int) -> None:
        """Emit each phase as it ends on the event stream (colo.events), as `side`'s phases of `epoch`."""
        self._trace = (side, epoch)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = (now - self.last) * 1e3
        if self._trace is not None and STREAM.active:
            STREAM.emit("phase", side=self._trace[0], epoch=self._trace[1], phase=phase,
                        start=round(STREAM.at(self.last), 6), end=round(STREAM.at(now), 6))
        self.last = now

    def total_ms(self) -> float:
        return (self.last - self.t0) * 1e3


def new_run_id() -> str:
    """A short random id: enough to tell apart the runs appended to one file."""
    return secrets.token_hex(4)


class StatsWriter:
    """Appends one JSON line per checkpoint to `path` (nothing when it is None), each stamped with the run."""

    def __init__(self, path: str | Path | None, *, run_id: str | None = None, mode: str | None = None,
                 interval_ms: float | None = None) -> None:
        self._f: IO[str] | None = open(path, "a", buffering=1) if path else None
        self._lock = threading.Lock()
        self.run_id = run_id or new_run_id()
        self.mode = mode
        self.interval_ms = interval_ms

    def write(self, rec: CheckpointRecord) -> None:
        if self._f is not None:
            rec.run_id, rec.mode, rec.interval_ms = self.run_id, self.mode, self.interval_ms
            with self._lock:
                self._f.write(rec.to_json() + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
