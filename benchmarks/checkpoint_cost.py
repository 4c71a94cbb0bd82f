#!/usr/bin/env python3
"""Checkpoint cost: what one COLO checkpoint pauses the guest for, through the real path, against its floor.

For each configuration (RAM size, N dirty pages, memtouch fill) this starts a real local cluster
(`colo.cli.LocalCluster`: gateway, secondary and primary as separate processes, replication over TCP on
loopback) running `guests/memtouch.bin pages=N iters=0 fill=F` with a checkpoint interval of 100 ms and a
stats file, lets it run until warm-up + K checkpoints are recorded, stops it, and reads the per-checkpoint
records the primary wrote (colo.stats: dirty_pages, bytes_raw, bytes_wire, phases_ms, pause_ms).

Configurations: N = 16, 256, 4096 with fill=word in a 64 MiB VM; N = 4096 with fill=random (incompressible
pages) in 64 MiB; N = 16 with fill=word in a 1 GiB VM. --quick: N = 16 and 256 in 64 MiB, fewer checkpoints.

In the same run it measures the physical floor for the same pages: a toyvm Machine in this process runs the
same guest with the same RAM and command line for one interval (and on until all N pages are dirty), and its
dirty pages are timed through
  copy  one numpy gather of the pages into a preallocated buffer (np.take(..., out=)): the memcpy, and
  lz4   lz4.block.compress(store_size=False) of those pages, one block per batch of up to 512 pages, one
        thread (as colo.vmstate.encode compresses them; it spreads batches over 2 threads when there are >1),
each the fastest of 50 timings, and reports pause median / (copy + lz4). The anchor printed beside our
numbers is QEMU 7.2 COLO under TCG on this kind of machine: median pause 4.0 ms at N = 16, 4.0 ms at
N = 256, 16 ms at N = 4096.

The machine may be shared: while each cluster runs, /proc/stat tells how many CPUs other work kept busy; rows
above 0.25 CPUs are flagged, and --retries R runs such a configuration again (keeping the quietest run).
The output names the source it measured (commit, uncommitted files, a digest of colo/ and toyvm/) and warns
when that changed during the run.

Usage: benchmarks/checkpoint_cost.py [--quick] [--checkpoints K] [--json FILE] [--hooks auto|python|native]
                                     [--retries R] [--only TEXT] [--keep] [-q]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import lz4  # noqa: E402
import lz4.block  # noqa: E402
import numpy as np  # noqa: E402
import unicorn  # noqa: E402

from colo.cluster import LocalCluster  # noqa: E402
from colo.stats import PHASES, read_records  # noqa: E402
from colo.vmstate import BATCH_PAGES  # noqa: E402
from toyvm import Machine  # noqa: E402
from toyvm.ram import parse_size  # noqa: E402

MEMTOUCH = ROOT / "guests" / "memtouch.bin"
INTERVAL_MS = 100.0
WARMUP = 5  # checkpoints skipped at the start of every run
ANCHOR_MS = {16: 4.0, 256: 4.0, 4096: 16.0}  # QEMU 7.2 COLO under TCG, median pause, fill=word
SAME_PAUSE_TOLERANCE = 0.10  # "the same pause in 1 GiB as in 64 MiB": medians within 10 %
BUSY_WARNING = 0.25  # CPUs of other work on average during a run that make its row suspect


@dataclass(frozen=True)
class Config:
    ram: str
    pages: int
    fill: str = "word"

    @property
    def name(self) -> str:
        return f"{self.ram} N={self.pages} {self.fill}"

    @property
    def cmdline(self) -> str:
        return f"pages={self.pages} iters=0 fill={self.fill}"


FULL = [Config("64M", 16), Config("64M", 256), Config("64M", 4096), Config("64M", 4096, "random"),
        Config("1G", 16)]
QUICK = [Config("64M", 16), Config("64M", 256)]


# ---------------------------------------------------------------------------------------------------------------
# the real path: a local cluster with a stats file

def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (zeros where it is missing)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / hz, total / hz


class LoadMeter:
    """How busy the machine was with work other than this benchmark while the cluster ran: the rest of the
    machine's busy time, minus this process and its reaped children (the cluster), in CPUs on average."""

    def __enter__(self) -> LoadMeter:
        self.t0 = time.monotonic()
        self.busy0, _ = machine_cpu_seconds()
        self.own0 = self._own()
        return self

    @staticmethod
    def _own() -> float:
        ru_self, ru_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        busy = machine_cpu_seconds()[0] - self.busy0
        own = self._own() - self.own0
        self.own_cpus = own / wall if wall > 0 else 0.0
        self.other_cpus = max(0.0, busy - own) / wall if wall > 0 else 0.0


def run_cluster(cfg: Config, checkpoints: int, hooks: str | None, workdir: Path,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the cluster until WARMUP + `checkpoints` records exist; return those after the warm-up."""
    want = WARMUP + checkpoints
    d = workdir / cfg.name.replace(" ", "_").replace("=", "")
    d.mkdir(parents=True, exist_ok=True)
    stats, logfile = d / "stats.jsonl", d / "processes.log"
    cluster = LocalCluster(str(MEMTOUCH), ram=cfg.ram, cmdline=cfg.cmdline, interval_ms=INTERVAL_MS,
                           stats=str(stats), hooks=hooks, directory=d)
    t0 = time.monotonic()
    last_n, last_change = 0, t0
    with open(logfile, "ab") as err:
        try:
            cluster.start(stderr=err, stdout=err)  # the guest's serial console must not land in our Markdown
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
                        raise RuntimeError(f"{cfg.name}: the {role} exited with status {p.returncode} after "
                                           f"{n} checkpoints\n{tail(logfile)}")
                if now - last_change > 60:
                    raise RuntimeError(f"{cfg.name}: no checkpoint for 60 s (after {n})\n{tail(logfile)}")
        finally:
            cluster.stop()
    records = read_records(stats)
    if len(records) < want:
        raise RuntimeError(f"{cfg.name}: {len(records)} records, expected {want}")
    log(f"  {cfg.name}: {want} checkpoints in {time.monotonic() - t0:.1f} s (with start-up)")
    return records[WARMUP:want]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------------
# the floor: copy + lz4 of the same pages

def floor_pages(cfg: Config, hooks: str | None) -> tuple[Machine, np.ndarray]:
    """The pages the guest dirties in one checkpoint interval, from a Machine running the same guest."""
    vm = Machine(parse_size(cfg.ram), hooks=hooks)
    vm.boot(MEMTOUCH, cfg.cmdline)
    vm.run_slice(0.3)  # past start-up: the buffer is written at least once
    vm.collect_dirty()
    end = time.perf_counter() + INTERVAL_MS / 1e3
    while (left := end - time.perf_counter()) > 0:
        vm.run_slice(min(0.01, left))  # as the primary serves: 10 ms slices
    # fill=random takes about an interval per pass over 4096 pages (less on a busy machine): go on until the
    # whole buffer was written, so the floor is timed on every page the checkpoint would carry.
    end = time.perf_counter() + 5.0
    while len(vm.ram.peek_dirty()) < cfg.pages and time.perf_counter() < end:
        vm.run_slice(0.01)
    pages = vm.collect_dirty()
    vm.take_serial()
    return vm, pages


def time_floor(cfg: Config, hooks: str | None, reps: int) -> dict[str, Any]:
    vm, pages = floor_pages(cfg, hooks)
    src = vm.ram.pages
    idx = np.asarray(pages, dtype=np.intp)
    buf = np.empty((len(idx), src.shape[1]), dtype=np.uint8)
    batches = [buf[lo:lo + BATCH_PAGES] for lo in range(0, len(idx), BATCH_PAGES)]

    def copy() -> None:
        np.take(src, idx, axis=0, out=buf, mode="clip")  # "raise" buffers out= (slower)

    def compress() -> int:
        return sum(len(lz4.block.compress(b, store_size=False)) for b in batches)

    copy()
    wire = compress()
    copy_s, lz4_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        copy()
        t1 = time.perf_counter()
        compress()
        t2 = time.perf_counter()
        copy_s.append(t1 - t0)
        lz4_s.append(t2 - t1)
    # The floor is what this machine can do: the fastest timing (the median is in the JSON too).
    c, z = min(copy_s) * 1e3, min(lz4_s) * 1e3
    return {"pages": len(idx), "batches": len(batches), "lz4_bytes": wire, "reps": reps,
            "copy_ms": c, "lz4_ms": z, "floor_ms": c + z,
            "copy_ms_median": statistics.median(copy_s) * 1e3, "lz4_ms_median": statistics.median(lz4_s) * 1e3,
            "copy_ms_all": [round(x * 1e3, 4) for x in copy_s], "lz4_ms_all": [round(x * 1e3, 4) for x in lz4_s]}


# ---------------------------------------------------------------------------------------------------------------
# summary and report

def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else xs[0]


def summarize(records: list[dict[str, Any]], floor: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median
    pause = [r["pause_ms"] for r in records]
    s = {"checkpoints": len(records),
         "pause_median_ms": med(pause), "pause_p99_ms": p99(pause),
         "pause_min_ms": min(pause), "pause_max_ms": max(pause),
         "dirty_pages_median": med(r["dirty_pages"] for r in records),
         "dirty_pages_min": min(r["dirty_pages"] for r in records),
         "dirty_pages_max": max(r["dirty_pages"] for r in records),
         "zero_pages_median": med(r["zero_pages"] for r in records),
         "bytes_raw_median": med(r["bytes_raw"] for r in records),
         "bytes_wire_median": med(r["bytes_wire"] for r in records),
         "phases_median_ms": {p: med(r["phases_ms"].get(p, 0.0) for r in records) for p in PHASES},
         "floor": floor}
    s["compression_ratio"] = s["bytes_raw_median"] / s["bytes_wire_median"] if s["bytes_wire_median"] else 0.0
    s["pause_over_floor"] = s["pause_median_ms"] / floor["floor_ms"] if floor["floor_ms"] else float("inf")
    return s


def fmt_bytes(n: float) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n:.0f} B"


def fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def anchor_of(cfg: Config) -> float | None:
    return ANCHOR_MS.get(cfg.pages) if cfg.fill == "word" else None


def targets(results: list[tuple[Config, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for cfg, s in results:
        a = anchor_of(cfg)
        if a is None:
            continue
        m = s["pause_median_ms"]
        out.append({"target": f"{cfg.ram} N={cfg.pages}: median pause <= {a:g} ms (QEMU 7.2 COLO, TCG)",
                    "measured": f"{fmt_ms(m)} ms", "met": m <= a,
                    "by": f"{abs(m - a):.2f} ms {'under' if m <= a else 'over'} ({m / a:.2f}x the anchor)"})
    by = {(c.ram, c.pages, c.fill): s for c, s in results}
    small, big = by.get(("64M", 16, "word")), by.get(("1G", 16, "word"))
    if small and big:
        a, b = small["pause_median_ms"], big["pause_median_ms"]
        out.append({"target": f"N=16: same median pause in 1 GiB as in 64 MiB (within {SAME_PAUSE_TOLERANCE:.0%})",
                    "measured": f"{fmt_ms(b)} ms vs {fmt_ms(a)} ms",
                    "met": abs(b - a) <= SAME_PAUSE_TOLERANCE * a,
                    "by": f"1 GiB is {b - a:+.2f} ms ({(b / a - 1):+.0%})"})
    return out


def markdown(info: dict[str, Any], args: argparse.Namespace, results: list[tuple[Config, dict[str, Any]]]) -> str:
    k = results[0][1]["checkpoints"] if results else 0
    lines = [f"Checkpoint cost, {info['date']}: {info['cpu']}, {info['nproc']} CPUs, Python {info['python']}, "
             f"unicorn {info['unicorn']}, lz4 {info['lz4']}, hooks {info['hooks']}; source {info['source']}; interval "
             f"{INTERVAL_MS:g} ms, {k} checkpoints per row after {WARMUP} warm-up"
             f"{' (--quick)' if args.quick else ''}.", ""]
    if "source_end" in info:
        lines += [f"**Warning:** colo/ or toyvm/ changed during the run (at the end: {info['source_end']}); "
                  "rows may come from different code.", ""]
    lines += ["| RAM | N | fill | dirty pages (median) | pause median (ms) | pause p99 (ms) | QEMU 7.2 anchor (ms) | "
              "bytes raw | bytes on wire | compression | floor: copy + lz4 (ms) | pause / floor |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg, s in results:
        f = s["floor"]
        a = anchor_of(cfg)
        lines.append(
            f"| {cfg.ram} | {cfg.pages} | {cfg.fill} | {s['dirty_pages_median']:g} | "
            f"**{fmt_ms(s['pause_median_ms'])}** | {fmt_ms(s['pause_p99_ms'])} | {f'{a:g}' if a else '-'} | "
            f"{fmt_bytes(s['bytes_raw_median'])} | "
            f"{fmt_bytes(s['bytes_wire_median'])} | {s['compression_ratio']:.1f}x | "
            f"{fmt_ms(f['floor_ms'])} ({fmt_ms(f['copy_ms'])} + {fmt_ms(f['lz4_ms'])}) | "
            f"{s['pause_over_floor']:.0f}x |")
    lines += ["", "Phase medians (ms), as the primary records them; the pause is measured on its own, so the "
              "medians need not add up to it exactly.", "",
              "| RAM | N | fill | " + " | ".join(PHASES) + " | sum of medians | pause median | other load (CPUs) |",
              "|---|---:|---|" + "---:|" * (len(PHASES) + 3)]
    for cfg, s in results:
        ph = s["phases_median_ms"]
        lines.append(f"| {cfg.ram} | {cfg.pages} | {cfg.fill} | " + " | ".join(fmt_ms(ph[p]) for p in PHASES)
                     + f" | {fmt_ms(sum(ph.values()))} | {fmt_ms(s['pause_median_ms'])} | "
                     f"{s.get('cpus_busy_other', 0):.2f}"
                     + (f" (quietest of {s['attempts']} runs)" if s.get("attempts", 1) > 1 else "") + " |")
    lines += growth(results)
    short = [(cfg, s) for cfg, s in results if s["dirty_pages_median"] < cfg.pages]
    if short:
        lines += ["", "**Note:** the guest did not rewrite all its N pages in every interval in "
                  + ", ".join(f"{c.name} (median {s['dirty_pages_median']:g} dirty pages)" for c, s in short)
                  + ": those checkpoints carried fewer pages than N (the floor is timed on all N)."]
    busy = [(cfg, s["cpus_busy_other"]) for cfg, s in results if s.get("cpus_busy_other", 0) > BUSY_WARNING]
    if busy:
        lines += ["", "**Warning:** other work kept the machine busy during "
                  + ", ".join(f"{c.name} ({b:.2f} CPUs on average)" for c, b in busy)
                  + f" of {info['nproc']} CPUs (other load: CPUs busy with work other than this benchmark "
                  "and its cluster, from /proc/stat): those rows are not a quiet-machine measurement."]
    t = targets(results)
    if t:
        lines += ["", "| target | measured | met | by how much |", "|---|---:|---|---|"]
        lines += [f"| {x['target']} | {x['measured']} | {'yes' if x['met'] else '**no**'} | {x['by']} |" for x in t]
    lines += ["", "p99: `statistics.quantiles(n=100, method='inclusive')`. Floor: the same guest run for one "
              f"interval in a toyvm Machine in this process; its dirty pages gathered with one numpy copy into a "
              f"preallocated buffer, then lz4.block.compress per batch of {BATCH_PAGES} pages on one thread; "
              "the fastest of repeated timings. Compression = bytes raw / bytes on wire (medians)."]
    return "\n".join(lines)


def source_info() -> str:
    """The commit measured, and whether colo/ or toyvm/ differ from it (the tree may be edited meanwhile)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "colo", "toyvm"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return (head or "unknown") + (f" + uncommitted {', '.join(changed)}" if changed else "") + \
        f" (sources {source_digest()})"


def source_digest() -> str:
    """A digest of colo/ and toyvm/ as they are on disk: it tells whether they changed during the run."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("colo/**/*.py"), *ROOT.glob("toyvm/**/*.py"), *ROOT.glob("toyvm/**/*.c")]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def growth(results: list[tuple[Config, dict[str, Any]]]) -> list[str]:
    """Per phase: the fixed part (its median at N = 16) and what it grows by per 1000 dirty pages (the
    difference between N = 16 and N = 4096, divided by the difference in median dirty pages)."""
    by = {(c.ram, c.pages, c.fill): s for c, s in results}
    base = by.get(("64M", 16, "word"))
    if base is None:
        return []
    rows = [("fixed: N=16 (ms)", {p: base["phases_median_ms"][p] for p in PHASES},
             base["pause_median_ms"])]
    for fill in ("word", "random"):
        big = by.get(("64M", 4096, fill))
        if big is None:
            continue
        dn = (big["dirty_pages_median"] - base["dirty_pages_median"]) / 1000
        if dn <= 0:
            continue
        rows.append((f"per 1000 pages, fill={fill} (ms)",
                     {p: (big["phases_median_ms"][p] - base["phases_median_ms"][p]) / dn for p in PHASES},
                     (big["pause_median_ms"] - base["pause_median_ms"]) / dn))
    if len(rows) < 2:
        return []
    out = ["", "Fixed and per-page parts of each phase (64 MiB): the N=16 medians, and the growth from N=16 to "
           "N=4096 per 1000 dirty pages.", "",
           "| | " + " | ".join(PHASES) + " | pause |", "|---|" + "---:|" * (len(PHASES) + 1)]
    for label, ph, pause in rows:
        out.append(f"| {label} | " + " | ".join(f"{ph[p]:.3f}" for p in PHASES) + f" | {pause:.3f} |")
    return out


def machine_info(hooks: str) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "unicorn": unicorn.__version__, "lz4": lz4.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "hooks": hooks, "source": source_info(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="COLO checkpoint pause through the real path (local cluster, "
                                             "loopback TCP) against the copy + lz4 floor. Prints Markdown.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N = 16 and 256 in 64 MiB only, 15 checkpoints each")
    ap.add_argument("--checkpoints", type=int, default=None, metavar="K",
                    help=f"checkpoints measured per configuration, after {WARMUP} warm-up (default 100; 15 "
                         "with --quick)")
    ap.add_argument("--json", metavar="FILE", help="also write every record and timing to FILE")
    ap.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                    help="toyvm hook engine for the cluster and the floor VM (default: toyvm's choice)")
    ap.add_argument("--retries", type=int, default=0, metavar="R",
                    help=f"on a shared machine: run a configuration up to R more times while other work kept more "
                         f"than {BUSY_WARNING} CPUs busy, and keep the quietest run (default 0)")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="run only the configurations whose name (e.g. '64M N=16 word') contains TEXT "
                         "(repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster's working folder (stats, logs)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.checkpoints is None:
        args.checkpoints = 15 if args.quick else 100
    if args.checkpoints < 1:
        ap.error("--checkpoints must be at least 1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if not MEMTOUCH.exists():
        print(f"checkpoint_cost: {MEMTOUCH.relative_to(ROOT)} is not built (make guests)", file=sys.stderr)
        return 2
    if not args.quick and args.checkpoints < 50:
        log(f"note: {args.checkpoints} checkpoints per configuration: fewer than 50, the p99 means little")
    # The cluster's processes run `python -m colo`: make them import the colo and toyvm beside this script.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    hooks = Machine(2 << 20, hooks=args.hooks).hooks
    info = machine_info(hooks)
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = [c for c in configs if any(t in c.name for t in args.only)]
        if not configs:
            ap.error(f"--only {args.only} matches none of {[c.name for c in (QUICK if args.quick else FULL)]}")
    workdir = Path(tempfile.mkdtemp(prefix="checkpoint-cost-"))
    results: list[tuple[Config, dict[str, Any]]] = []
    raw: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        for cfg in configs:
            log(f"{cfg.name}: cluster, interval {INTERVAL_MS:g} ms, {WARMUP} + {args.checkpoints} checkpoints")
            best: tuple[LoadMeter, list[dict[str, Any]]] | None = None
            for attempt in range(1 + args.retries):
                with LoadMeter() as load:
                    got = run_cluster(cfg, args.checkpoints, args.hooks, workdir / f"attempt{attempt}", log)
                log(f"  CPUs busy on average: {load.own_cpus:.2f} this benchmark and its cluster, "
                    f"{load.other_cpus:.2f} anything else")
                if best is None or load.other_cpus < best[0].other_cpus:
                    best = (load, got)
                if load.other_cpus <= BUSY_WARNING:
                    break
                if attempt < args.retries:
                    log("  the machine was busy: running this configuration again")
            assert best is not None
            load, records = best
            attempts = attempt + 1
            floor = time_floor(cfg, args.hooks, 10 if args.quick else 50)
            log(f"  floor: {floor['pages']} pages, copy {floor['copy_ms']:.3f} ms + lz4 {floor['lz4_ms']:.3f} ms")
            s = summarize(records, floor)
            s["cpus_busy_cluster"], s["cpus_busy_other"] = load.own_cpus, load.other_cpus
            s["attempts"] = attempts
            results.append((cfg, s))
            raw[cfg.name] = {"ram": cfg.ram, "pages": cfg.pages, "fill": cfg.fill, "cmdline": cfg.cmdline,
                             "summary": s, "records": records}
    finally:
        if args.keep:
            log(f"working folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"total {time.monotonic() - t0:.0f} s")
    end = source_info()
    if end != info["source"]:
        info["source_end"] = end
        log(f"warning: colo/ or toyvm/ changed during the run: {info['source']} -> {end}")
    print(markdown(info, args, results))
    if args.json:
        doc = {"machine": info, "interval_ms": INTERVAL_MS, "warmup": WARMUP, "checkpoints": args.checkpoints,
               "quick": args.quick, "anchor_ms": ANCHOR_MS, "targets": targets(results), "configs": raw}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
