#!/usr/bin/env python3
"""What the event stream (colo.events) costs the checkpoint pause: off (no sink: the default) against on (every
role appending to one trace file, as `colo view` runs it), and on with the --trace printer too.

Each round starts a real LocalCluster (gateway, secondary, primary as processes over loopback TCP) running
`memtouch pages=N iters=0` (N pages dirtied per epoch) with a checkpoint interval of 100 ms and a --stats file,
records K checkpoints after a warm-up, and stops. The three configurations are interleaved round by round so
that a change in the machine's load falls on all of them alike. Reported: the pause (the guest stopped) median,
p90 and mean per configuration, and the events a checkpoint writes. A micro-benchmark gives the cost of one
`send` event (JSON line, one write) and of the check a call site makes when the stream is off.

Usage: benchmarks/trace_overhead.py [--rounds R] [--checkpoints K] [--pages N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from colo.cluster import LocalCluster  # noqa: E402
from colo.stats import read_records  # noqa: E402
from toyvm.cli import positive_int  # noqa: E402

CONFIGS = ("off", "file", "file+print")


def one_round(config: str, pages: int, checkpoints: int, d: Path) -> dict[str, Any]:
    stats = d / "stats.jsonl"
    cluster = LocalCluster("memtouch", cmdline=f"pages={pages} iters=0", interval_ms=100.0, stats=str(stats),
                           directory=d, trace=config == "file+print")
    if config != "off":
        cluster.trace_file = str(d / "trace.jsonl")
    log = open(d / "log.txt", "wb")
    try:
        cluster.start(stderr=log, stdout=log)
        cluster.wait_protected(60)
        warm = 10
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if stats.exists() and len(read_records(stats)) >= warm + checkpoints:
                break
            time.sleep(0.1)
    finally:
        cluster.stop()
        log.close()
    recs = read_records(stats)[warm:warm + checkpoints]
    n_events = 0
    if config != "off":
        n_events = sum(1 for _ in open(d / "trace.jsonl"))
    return {"pauses": [r["pause_ms"] for r in recs], "checkpoints": len(read_records(stats)), "events": n_events}


def micro() -> dict[str, float]:
    from colo.events import STREAM, FileSink
    from colo.messages import Commit
    from colo.trace import message_fields
    n = 20000
    STREAM.reset()
    t0 = time.perf_counter()
    for _ in range(n):
        if STREAM.active:
            pass
    off_ns = (time.perf_counter() - t0) / n * 1e9
    with tempfile.TemporaryDirectory() as d:
        sink = FileSink(Path(d) / "t.jsonl")
        STREAM.attach(sink)
        msg = Commit(1, 3, 41, 17)
        t0 = time.perf_counter()
        for i in range(n):
            STREAM.emit("send", msg="commit", link="gateway", to="gateway", peer="gateway", flow=f"abcd:primary:{i}",
                        frame=103, fields=message_fields(msg))
        on_us = (time.perf_counter() - t0) / n * 1e6
        STREAM.reset()
        sink.close()
    return {"check_when_off_ns": round(off_ns, 1), "send_event_us": round(on_us, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--checkpoints", type=positive_int, default=60,
                    help="checkpoints recorded per configuration and round, after a warm-up (default 60)")
    ap.add_argument("--pages", type=positive_int, default=64, help="pages memtouch dirties per epoch (default 64)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args()
    got: dict[str, list[float]] = {c: [] for c in CONFIGS}
    events: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for c in CONFIGS:
            with tempfile.TemporaryDirectory(prefix="colo-trace-bench-") as d:
                res = one_round(c, args.pages, args.checkpoints, Path(d))
            got[c] += res["pauses"]
            if res["events"]:
                events[c].append(res["events"] / max(1, res["checkpoints"]))
            print(f"round {r + 1} {c:<10} pause median {statistics.median(res['pauses']):6.2f} ms "
                  f"({len(res['pauses'])} checkpoints)", flush=True)
    out: dict[str, Any] = {"pages": args.pages, "interval_ms": 100, "micro": micro(), "configs": {}}
    for c in CONFIGS:
        p = sorted(got[c])
        out["configs"][c] = {"n": len(p), "median_ms": round(statistics.median(p), 3),
                             "p90_ms": round(p[int(0.9 * (len(p) - 1))], 3), "mean_ms": round(statistics.mean(p), 3),
                             "events_per_checkpoint": round(statistics.mean(events[c]), 1) if events[c] else 0}
    base = out["configs"]["off"]["median_ms"]
    print(f"\nmemtouch pages={args.pages}, 100 ms interval, {args.rounds} interleaved rounds of "
          f"{args.checkpoints} checkpoints")
    print(f"{'stream':<12}{'median':>9}{'p90':>9}{'mean':>9}{'vs off':>9}{'events/ckpt':>13}")
    for c, s in out["configs"].items():
        print(f"{c:<12}{s['median_ms']:>8.2f}m{s['p90_ms']:>8.2f}m{s['mean_ms']:>8.2f}m"
              f"{s['median_ms'] - base:>+8.2f}m{s['events_per_checkpoint']:>13}")
    print(f"one send event: {out['micro']['send_event_us']} us; the check when off: "
          f"{out['micro']['check_when_off_ns']} ns")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
