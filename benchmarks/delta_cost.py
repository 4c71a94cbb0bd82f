#!/usr/bin/env python3
"""Delta pages (`--delta`): what XOR against the previous content saves or costs, side by side with plain pages.

For each workload, a real local cluster (gateway, secondary, primary; TCP on loopback; 100 ms interval,
`--stats`) runs once with `--delta` and once without, alternately, for R rounds:
  kvstore   guests/kvstore.bin under `redis-benchmark -c 10 -t set -r 100000 -d 64` for S seconds (a SET
            changes a few bytes of a page: the case delta is for)
  memtouch  guests/memtouch.bin pages=256 iters=0 fill=word, then fill=random (whole pages rewritten each
            iteration: the case it is not for)
From the primary's records inside the load it reports, per workload and setting, the median pause, the median
commit latency, and the bytes sent per checkpoint (median and total), and delta's ratio of each to plain.
The machine may be shared: /proc/stat tells how many CPUs other work kept busy during each run.

Usage: benchmarks/delta_cost.py [--rounds R] [--seconds S] [--only TEXT] [--json FILE] [-q]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.checkpoint_cost import LoadMeter, machine_info, source_info  # noqa: E402
from colo.cluster import LocalCluster  # noqa: E402
from colo.stats import read_records  # noqa: E402
from toyvm.cli import positive_float, positive_int  # noqa: E402

INTERVAL_MS = 100.0
WORKLOADS = {
    "kvstore SET -d 64": ("kvstore.bin", "16M", ""),
    "memtouch 256 word": ("memtouch.bin", "64M", "pages=256 iters=0 fill=word"),
    "memtouch 256 random": ("memtouch.bin", "64M", "pages=256 iters=0 fill=random"),
}


def run_one(name: str, delta: bool, seconds: float, work: Path) -> dict[str, Any]:
    guest, ram, cmdline = WORKLOADS[name]
    d = work / f"{name.replace(' ', '_')}-{'delta' if delta else 'plain'}-{time.monotonic_ns()}"
    d.mkdir(parents=True)
    stats = d / "stats.jsonl"
    cluster = LocalCluster(str(ROOT / "guests" / guest), ram=ram, cmdline=cmdline, interval_ms=INTERVAL_MS,
                           stats=str(stats), directory=d, delta=delta, logs=True)
    with LoadMeter() as meter:  # the whole life of the cluster: its processes are reaped inside
        try:
            cluster.start(stdout=subprocess.DEVNULL)
            cluster.wait_protected(timeout=30)
            time.sleep(0.5)  # the first checkpoints after the copy
            began = time.time()
            if guest == "kvstore.bin":
                _timed_load(cluster.service_address[1], seconds)
            else:
                time.sleep(seconds)
            ended = time.time()
        finally:
            cluster.stop()
    busy = meter.other_cpus
    recs = [r for r in read_records(stats) if began <= r["time"] <= ended]
    if len(recs) < 5:
        raise RuntimeError(f"{name} ({'delta' if delta else 'plain'}): only {len(recs)} checkpoints in the load")
    shutil.rmtree(d, ignore_errors=True)
    return {"workload": name, "delta": delta, "checkpoints": len(recs), "busy": busy,
            "pause_ms": statistics.median(r["pause_ms"] for r in recs),
            "commit_ms": statistics.median(r.get("commit_ms", 0.0) for r in recs),
            "bytes_median": statistics.median(r["bytes_wire"] for r in recs),
            "bytes_total": sum(r["bytes_wire"] for r in recs),
            "dirty_median": statistics.median(r["dirty_pages"] for r in recs)}


def _timed_load(port: int, seconds: float) -> None:
    """redis-benchmark SETs for `seconds` (it is stopped then: the records inside count, not its own figures)."""
    p = subprocess.Popen(["redis-benchmark", "-p", str(port), "-c", "10", "-t", "set", "-r", "100000", "-d", "64",
                          "-n", "100000000", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.terminate()
        p.wait(10)
    else:
        raise RuntimeError(f"redis-benchmark ended early with status {p.returncode}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="--delta against plain pages, side by side (prints Markdown)")
    ap.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--seconds", type=positive_float, default=6.0, help="load per run (default 6)")
    ap.add_argument("--json", type=Path, help="also write every run here")
    ap.add_argument("--only", default="", metavar="TEXT", help="only workloads whose name contains TEXT")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if shutil.which("redis-benchmark") is None:
        print("delta_cost: redis-benchmark is missing (apt-get install redis-tools)", file=sys.stderr)
        return 2
    names = [n for n in WORKLOADS if args.only in n]
    work = Path(tempfile.mkdtemp(prefix="delta-"))
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for name in names:
                for delta in ((False, True) if rnd % 2 == 0 else (True, False)):
                    r = run_one(name, delta, args.seconds, work)
                    runs.append(r)
                    if not args.quiet:
                        print(f"round {rnd + 1}: {name} {'delta' if delta else 'plain'}: pause "
                              f"{r['pause_ms']:.2f} ms, commit {r['commit_ms']:.2f} ms, "
                              f"{r['bytes_median'] / 1024:.1f} KiB per checkpoint ({r['checkpoints']}), "
                              f"other load {r['busy']:.2f} CPUs", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = {**machine_info("auto", []), "source": source_info(ROOT)}
    print(f"Delta pages, {info['date']}: {info['cpu']}, {info['nproc']} CPUs, source {info['source']}; interval "
          f"{INTERVAL_MS:.0f} ms, {args.rounds} round(s) of {args.seconds:g} s per workload and setting.\n")
    print("| workload | setting | dirty pages | pause median (ms) | commit median (ms) | KiB per checkpoint "
          "(median) | MiB in all | delta / plain: pause, commit, bytes | other load (CPUs) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name in names:
        rows = {d: [r for r in runs if r["workload"] == name and r["delta"] is d] for d in (False, True)}
        med = {d: {k: statistics.median(r[k] for r in rs) for k in
                   ("pause_ms", "commit_ms", "bytes_median", "bytes_total", "dirty_median", "busy")}
               for d, rs in rows.items()}
        for d in (False, True):
            m = med[d]
            ratio = ""
            if d:
                p = med[False]
                ratio = (f"{m['pause_ms'] / p['pause_ms']:.2f}x, {m['commit_ms'] / p['commit_ms']:.2f}x, "
                         f"{m['bytes_median'] / p['bytes_median']:.2f}x")
            print(f"| {name} | {'delta' if d else 'plain'} | {m['dirty_median']:.0f} | {m['pause_ms']:.2f} | "
                  f"{m['commit_ms']:.2f} | {m['bytes_median'] / 1024:.1f} | {m['bytes_total'] / 2**20:.1f} | "
                  f"{ratio} | {m['busy']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
