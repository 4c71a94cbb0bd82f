"""One record per checkpoint: what it carried and what each phase cost. Written as JSON lines."""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

PHASES = ("suspend", "collect", "compress", "send", "received", "loaded", "resume")


@dataclass
class CheckpointRecord:
    epoch: int
    trigger: str
    dirty_pages: int = 0
    zero_pages: int = 0
    bytes_raw: int = 0
    bytes_wire: int = 0
    phases_ms: dict[str, float] = field(default_factory=dict)
    pause_ms: float = 0.0
    time: float = field(default_factory=time.time)

    @property
    def ratio(self) -> float:
        return self.bytes_raw / self.bytes_wire if self.bytes_wire else 0.0

    def to_json(self) -> str:
        d: dict[str, Any] = asdict(self)
        d["compression_ratio"] = round(self.ratio, 2)
        d["phases_ms"] = {k: round(v, 3) for k, v in self.phases_ms.items()}
        d["pause_ms"] = round(self.pause_ms, 3)
        return json.dumps(d, sort_keys=True)


class PhaseClock:
    """Times consecutive phases: clock.mark('collect') closes the phase that started at the previous mark."""

    def __init__(self, start: float | None = None) -> None:
        self.t0 = self.last = start if start is not None else time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = (now - self.last) * 1e3
        self.last = now

    def total_ms(self) -> float:
        return (self.last - self.t0) * 1e3


class StatsWriter:
    """Appends records to a JSON-lines file, each stamped with `meta` (the run id, mode, interval)."""

    def __init__(self, path: str | Path | None, **meta: Any) -> None:
        self._f: IO[str] | None = open(path, "a", buffering=1) if path else None
        self._lock = threading.Lock()
        self.meta = {"run_id": secrets.token_hex(4), **meta}

    def write(self, rec: CheckpointRecord) -> None:
        if self._f is not None:
            d = json.loads(rec.to_json())
            d.update(self.meta)
            with self._lock:
                self._f.write(json.dumps(d, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
