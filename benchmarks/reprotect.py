#!/usr/bin/env python3
"""Re-protection: what giving a running primary a new secondary costs, live copy against stop-and-copy.

For each configuration (RAM size, N pages memtouch writes per iteration, fill) and each copy (`--copy live` and
`--copy stop`, one after the other in the same run) this starts a real local cluster without a secondary
(`colo.cluster.LocalCluster`: gateway and primary as processes, replication over TCP on loopback), running
`guests/memtouch.bin pages=N fill=F serve=1 resident=R` (R: half the RAM, filled once with incompressible bytes,
so that the copy has a VM in use to carry), so that the guest echoes network messages between iterations. An
echo client sends a small message through the gateway, waits for it to come back, and does it again, the whole
time. Once the guest has served for a moment a secondary is started; the gateway pairs it with the primary and
the primary copies its VM. Then the cluster runs until K checkpoints of the same dirty set are recorded.

Reported per row:
  time to protect  from the copy's start to checkpoint-ready (the primary's own measure, "seconds"), and its
                   ratio to the stop-and-copy of the same configuration; target: live <= 3x stop
  longest stall    the longest the guest waited for the copy: a step of a round or the final stop (live), the
                   one stop (stop-and-copy); target: no longer than one checkpoint pause of the same dirty set,
                   the median pause of the K checkpoints after the copy, measured in the same cluster
  client gap       the longest an echo sent during the copy waited for its answer, and the same before the
                   copy (memtouch answers only between iterations: that is the guest's own gap). Echoes sent
                   at the end of a copy wait for the first checkpoint as well (output is held from there on)
  rounds, MB, final pages, stalled (the rounds stopped shrinking: memtouch rewrites its N pages every iteration)

The machine may be shared: /proc/stat tells how many CPUs other work kept busy while each cluster ran; rows above
0.25 CPUs are flagged.

Usage: benchmarks/reprotect.py [--quick] [--checkpoints K] [--json FILE] [--only TEXT] [--keep] [-q]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from benchmarks import checkpoint_cost  # noqa: E402
from benchmarks.checkpoint_cost import BUSY_WARNING, LoadMeter, machine_info, source_info  # noqa: E402
from colo.cluster import LocalCluster  # noqa: E402
from colo.errors import ColoError  # noqa: E402
from colo.stats import read_records  # noqa: E402
from toyvm.cli import positive_int  # noqa: E402
from toyvm.ram import parse_size  # noqa: E402

MEMTOUCH = ROOT / "guests" / "memtouch.bin"
INTERVAL_MS = 100.0
STALL_TARGET = 1.0  # the longest stall, in checkpoint pauses of the same dirty set
TIME_TARGET = 3.0  # time to protect, live / stop-and-copy
WARM_S = 1.0  # the guest serves alone this long before the secondary comes
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) ")


@dataclass(frozen=True)
class Config(checkpoint_cost.Config):
    """A row of checkpoint_cost.py's kind, with half the RAM resident (what a copy carries)."""

    @property
    def cmdline(self) -> str:
        resident = parse_size(self.ram) // 2 >> 20  # half the RAM in use: what the copy carries
        return f"pages={self.pages} fill={self.fill} serve=1 resident={resident}"


CONFIGS = [Config(ram, n, fill) for ram in ("64M", "256M", "1G")
           for n, fill in ((16, "word"), (256, "word"), (4096, "word"), (4096, "random"))]
QUICK = [Config("64M", 16), Config("64M", 4096, "random")]


class EchoClient:
    """Through the gateway to memtouch and back, one message at a time: (sent, answered) wall-clock times."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.times: list[tuple[float, float]] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EchoClient:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                msg = b"echo %08d\n" % n
                sent = time.time()
                self.sock.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    more = self.sock.recv(len(msg) - len(got))
                    if not more:
                        raise ConnectionError("the service closed the connection")
                    got += more
                if got != msg:
                    raise ValueError(f"sent {msg!r}, got {got!r} back")
                self.times.append((sent, time.time()))
                time.sleep(0.001)
        except (OSError, ValueError) as e:
            if not self._stop.is_set():
                self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(10)

    def longest_wait(self, start: float, end: float) -> float:
        """The longest an echo that was under way at some time in [start, end] waited, in ms (0: none was)."""
        waits = [answered - sent for sent, answered in self.times if sent <= end and answered >= start]
        return max(waits, default=0.0) * 1e3


def logged_at(log: str, text: str) -> float:
    for line in log.splitlines():
        m = LOG_TIME.match(line)
        if m and text in line:
            return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    raise ColoError(f"the primary did not log {text!r}")


def run_one(cfg: Config, copy: str, checkpoints: int, workdir: Path) -> dict[str, Any]:
    stats, console = workdir / "stats.jsonl", workdir / "console.txt"
    cluster = LocalCluster(str(MEMTOUCH), ram=cfg.ram, cmdline=cfg.cmdline, interval_ms=INTERVAL_MS,
                           stats=str(stats), directory=workdir, verbose=True, copy=copy, logs=True)
    client: EchoClient | None = None
    # The meter spans the cluster's whole life: its processes must be reaped inside it, or their CPU time would
    # count as other work.
    with LoadMeter() as load:
        try:
            with contextlib.ExitStack() as stack:
                out = stack.enter_context(open(console, "wb"))  # the secondaries started later print here too
                cluster.start(secondary=False, stdout=out)
                deadline = time.monotonic() + 120
                while b"memtouch: " not in console.read_bytes():  # it prints once its resident RAM is filled
                    if time.monotonic() > deadline or cluster.procs["primary"].poll() is not None:
                        raise ColoError("the guest did not start: " + cluster.log_tail("primary"))
                    time.sleep(0.05)
                client = EchoClient(cluster.service_address).start()
                time.sleep(WARM_S)
                before = time.time()
                cluster.add_secondary()
                joined = time.monotonic()
                deadline = time.monotonic() + 300
                while True:
                    primary = cluster.status()["nodes"]["primary"]
                    if (primary.get("last_copy") and primary.get("checkpoints", 0) >= checkpoints + 2
                            and time.monotonic() - joined > WARM_S + primary["last_copy"]["seconds"]):
                        break
                    if time.monotonic() > deadline or client.error:
                        raise ColoError(f"not protected with {checkpoints} checkpoints within 300 s {client.error}")
                    time.sleep(0.1)
                client.stop()
        finally:
            if client is not None:
                client.stop()
            cluster.stop()
    log = cluster.log_path("primary").read_text(errors="replace")
    summary = primary["last_copy"]
    ended = logged_at(log, "primary: protected by")
    began = ended - summary["seconds"]
    records = read_records(stats)[2:]  # the first checkpoints after a copy carry what the final stop began
    pauses = [r["pause_ms"] for r in records]
    assert client is not None
    stall = max(summary["stop_ms"], summary.get("longest_step_ms", 0.0))
    return {"config": cfg.name, "copy": copy, **summary, "stall_ms": stall,
            "checkpoint_pause_ms": statistics.median(pauses) if pauses else None,
            "checkpoint_pause_max_ms": max(pauses, default=None),
            "client_gap_ms": client.longest_wait(began, ended),
            "client_gap_before_ms": client.longest_wait(before - WARM_S, before),
            "client_gap_after_ms": client.longest_wait(ended + 0.5, ended + WARM_S),
            "echoes": len(client.times), "other_cpus": round(load.other_cpus, 2)}


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(info: dict[str, Any], rows: list[tuple[dict[str, Any], dict[str, Any]]], checkpoints: int) -> str:
    out = [f"Measured {info['date']} on {info['cpu']} ({info['nproc']} CPUs), Python {info['python']}, "
           f"unicorn {info['unicorn']}, source {info['source']}. Checkpoint interval {INTERVAL_MS:.0f} ms; "
           f"checkpoint pause: median of {checkpoints} checkpoints after the copy, same cluster.", "",
           "| config | copy | time to protect (s) | live/stop | rounds | MB | final pages | longest step (ms) | "
           "final stop (ms) | checkpoint pause median, max (ms) | stall / median pause | "
           "client gap before / during / after (ms) | stalled | busy |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for live, stop in rows:
        for r in (live, stop):
            ratio = f"{r['seconds'] / stop['seconds']:.2f}" if r is live and stop["seconds"] > 0 else ""
            pause = r["checkpoint_pause_ms"]
            per_pause = f"{r['stall_ms'] / pause:.2f}" if pause else "-"
            busy = f"{r['other_cpus']:.2f}" + (" (busy)" if r["other_cpus"] > BUSY_WARNING else "")
            step = fmt(r["longest_step_ms"]) if r["live"] else "-"
            gaps = " / ".join(fmt(r[k]) for k in ("client_gap_before_ms", "client_gap_ms", "client_gap_after_ms"))
            pauses = f"{fmt(pause)}, {fmt(r['checkpoint_pause_max_ms'])}"
            out.append(f"| {r['config']} | {r['copy']} | {r['seconds']:.3f} | {ratio} | {r['rounds']} | {r['mb']} | "
                       f"{r['final_pages']} | {step} | {fmt(r['stop_ms'])} | {pauses} | {per_pause} | {gaps} | "
                       f"{'yes' if r['stalled'] else ''} | {busy} |")
    out += ["", "Targets (live copy): " + "; ".join(targets(rows))]
    return "\n".join(out)


def targets(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    time_ok = [live["seconds"] <= TIME_TARGET * stop["seconds"] for live, stop in rows]
    stall_ok = [live["checkpoint_pause_ms"] is not None
                and live["stall_ms"] <= STALL_TARGET * live["checkpoint_pause_ms"] for live, _ in rows]
    return [f"time to protect <= {TIME_TARGET:.0f}x stop-and-copy in {sum(time_ok)} of {len(rows)} configurations",
            f"longest stall <= one checkpoint pause in {sum(stall_ok)} of {len(rows)}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two configurations in 64 MiB (a smoke run)")
    ap.add_argument("--checkpoints", type=positive_int, default=10, help="checkpoints after the copy (default 10)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--only", default="", help="only configurations whose name contains this, e.g. '1G'")
    ap.add_argument("--keep", action="store_true", help="keep the clusters' directories (logs, stats)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    args = ap.parse_args(argv)
    if not MEMTOUCH.exists():
        print(f"reprotect: {MEMTOUCH} is missing (make guests)", file=sys.stderr)
        return 2
    configs = [c for c in (QUICK if args.quick else CONFIGS) if args.only in c.name]
    info = {**machine_info("auto", []), "source": source_info(ROOT)}
    work = Path(tempfile.mkdtemp(prefix="reprotect-"))
    rows: list[tuple[dict[str, Any], dict[str, Any]]] = []
    try:
        for cfg in configs:
            pair = []
            for copy in ("live", "stop"):
                if not args.quiet:
                    print(f"reprotect: {cfg.name}, {copy} copy ...", file=sys.stderr, flush=True)
                r = run_one(cfg, copy, args.checkpoints, work / f"{cfg.name.replace(' ', '_')}-{copy}")
                if not args.quiet:
                    print(f"  protected in {r['seconds']:.3f} s, longest stall {r['stall_ms']:.1f} ms (step "
                          f"{r.get('longest_step_ms', 0):.1f}, final {r['stop_ms']:.1f}) "
                          f"(checkpoint pause {fmt(r['checkpoint_pause_ms'])} ms), client gap "
                          f"{r['client_gap_ms']:.1f} ms", file=sys.stderr, flush=True)
                pair.append(r)
            rows.append((pair[0], pair[1]))
    finally:
        if args.keep:
            print(f"reprotect: the clusters' directories are in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(info, rows, args.checkpoints))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": [r for pair in rows for r in pair]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
