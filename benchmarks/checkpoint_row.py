#!/usr/bin/env python3
"""One row of benchmarks/checkpoint_cost.py, run against the colo of any source tree.

Runs `guests/memtouch.bin pages=N iters=0 fill=F` of TREE under TREE's own LocalCluster (gateway, secondary,
primary as processes, TCP on loopback, `--stats`) until WARMUP + K checkpoints are recorded, and writes those
after the warm-up, as JSON, to OUT. It imports nothing from the tree it lives in: checkpoint_cost.py runs it with
`--tree` pointing at the current checkout or at a worktree of an older commit (`--baseline`), whose LocalCluster
lives in colo.cluster or, before that module existed, colo.cli. Options the tree's LocalCluster does not know
(checkpoint_mode, encrypt) are refused rather than silently dropped.

Usage: checkpoint_row.py --tree PATH --ram 64M --pages N --fill word|random --checkpoints K --warmup W
                         --interval MS --out FILE --dir DIR [--checkpoint-mode M] [--no-encrypt] [--hooks H]
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True)
    ap.add_argument("--ram", required=True)
    ap.add_argument("--pages", type=int, required=True)
    ap.add_argument("--fill", required=True)
    ap.add_argument("--checkpoints", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--interval", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--checkpoint-mode")
    ap.add_argument("--no-encrypt", action="store_true")
    ap.add_argument("--hooks")
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    try:
        from colo.cluster import LocalCluster  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        from colo.cli import LocalCluster  # type: ignore[no-redef, attr-defined, unused-ignore]
    known = inspect.signature(LocalCluster).parameters
    extra: dict[str, Any] = {}
    if args.checkpoint_mode:
        extra["checkpoint_mode"] = args.checkpoint_mode
    if args.no_encrypt:
        extra["encrypt"] = False
    unknown = sorted(set(extra) - set(known))
    if unknown:
        print(f"checkpoint_row: the LocalCluster of {tree} has no {', '.join(unknown)}", file=sys.stderr)
        return 2
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    stats, logfile = d / "stats.jsonl", d / "processes.log"
    want = args.warmup + args.checkpoints
    cluster = LocalCluster(str(tree / "guests" / "memtouch.bin"), ram=args.ram,
                           cmdline=f"pages={args.pages} iters=0 fill={args.fill}", interval_ms=args.interval,
                           stats=str(stats), hooks=args.hooks, directory=d, **extra)
    t0 = time.monotonic()
    last_n, last_change = 0, t0
    with open(logfile, "ab") as err:
        try:
            cluster.start(stderr=err, stdout=err)  # the guest's serial console must not land in the report
            while True:
                time.sleep(0.1)
                n = count_lines(stats)
                now = time.monotonic()
                if n >= want:
                    break
                if n != last_n:
                    last_n, last_change = n, now
                for role, p in cluster.procs.items():
                    if p.poll() is not None:
                        print(f"the {role} exited with status {p.returncode} after {n} checkpoints\n"
                              f"{tail(logfile)}", file=sys.stderr)
                        return 1
                if now - last_change > 60:
                    print(f"no checkpoint for 60 s (after {n})\n{tail(logfile)}", file=sys.stderr)
                    return 1
        finally:
            cluster.stop()
    with open(stats) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if len(records) < want:
        print(f"{len(records)} records, expected {want}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps({"records": records[args.warmup:want],
                                          "seconds": time.monotonic() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
