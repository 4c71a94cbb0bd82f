#!/usr/bin/env python3
"""Checkpoint cost: what one COLO checkpoint pauses the guest for, through the real path, against its floor,
and (with --baseline REF) side by side with the same rows run on an older commit.

For each row (RAM size, N dirty pages, memtouch fill) and each variant of the code (the current tree in
pipelined and strict checkpoint mode, optionally integrity-only frames, and the --baseline tree), a real local
cluster (`benchmarks/checkpoint_row.py` running that tree's LocalCluster: gateway, secondary and primary as
separate processes, replication over TCP on loopback) runs `guests/memtouch.bin pages=N iters=0 fill=F` with a
checkpoint interval of 100 ms and a stats file until warm-up + K checkpoints are recorded; the per-checkpoint
records the primary wrote (colo.stats: dirty_pages, bytes_raw, bytes_wire, phases_ms, pause_ms, commit_ms)
give the pause (the guest stopped) and, for the current tree, the commit latency (stop to vmstate-received).
Variants run alternately, in an order rotated from row to row and round to round, so that a slow phase of a
shared machine hits all of them alike; the speedup of a variant is the baseline's median pause over its own,
per round, and the report gives its median and range over rounds.

Rows: N = 16, 256, 4096 with fill=word and fill=random (incompressible pages) in a 64 MiB VM, and N = 16 with
fill=word in a 1 GiB VM. --quick: N = 16 and 256 (word) in 64 MiB, fewer checkpoints.

In the same run it measures the physical floor for the same pages: a toyvm Machine in this process runs the
same guest with the same RAM and command line for one interval (and on until all N pages are dirty), and its
dirty pages are timed through
  copy  one numpy gather of the pages into a preallocated buffer (np.take(..., out=)): the memcpy, and
  lz4   lz4.block.compress(store_size=False) of those pages, one block per batch of up to 512 pages, one
        thread,
each the fastest of 50 timings, and reports pause median / (copy + lz4).

The machine may be shared: while each cluster runs, /proc/stat tells how many CPUs other work kept busy; runs
above 0.25 CPUs are flagged. The output names the source it measured (commit, uncommitted files, a digest of
colo/ and toyvm/) and warns when that changed during the run.

Usage: benchmarks/checkpoint_cost.py [--quick] [--checkpoints K] [--rounds R] [--baseline REF]
                                     [--modes pipelined,strict] [--integrity] [--json FILE]
                                     [--hooks auto|python|native] [--only TEXT] [--keep] [-q]
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

from colo.stats import PHASES  # noqa: E402
from colo.vmstate import BATCH_PAGES  # noqa: E402
from toyvm import Machine  # noqa: E402
from toyvm.ram import parse_size  # noqa: E402

MEMTOUCH = ROOT / "guests" / "memtouch.bin"
ROW_SCRIPT = ROOT / "benchmarks" / "checkpoint_row.py"
BASELINES = ROOT / ".baseline"  # worktrees of --baseline commits (git-ignored), reused from run to run
INTERVAL_MS = 100.0
WARMUP = 5  # checkpoints skipped at the start of every run
SAME_PAUSE_TOLERANCE = 0.10  # "the same pause in 1 GiB as in 64 MiB": medians within 10 %
BUSY_WARNING = 0.25  # CPUs of other work on average during a run that make its row suspect
# Issue 12's targets: speedup of the median pause against its reference commit (half of QEMU 7.2's pause).
SPEEDUP_TARGETS = {("64M", 16, "word"): 2.5, ("64M", 256, "word"): 2.5, ("64M", 4096, "word"): 2.4,
                   ("64M", 4096, "random"): 7.0}
SEALING_GROWTH = 0.10  # issue 8: the pause at N=4096 fill=random may grow by less than this with integrity


@dataclass(frozen=True)
class Config:
    ram: str
    pages: int
    fill: str = "word"

    @property
    def name(self) -> str:
        return f"{self.ram} N={self.pages} {self.fill}"

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.ram, self.pages, self.fill)

    @property
    def cmdline(self) -> str:
        return f"pages={self.pages} iters=0 fill={self.fill}"


FULL = [Config("64M", 16), Config("64M", 256), Config("64M", 4096), Config("64M", 16, "random"),
        Config("64M", 256, "random"), Config("64M", 4096, "random"), Config("1G", 16)]
QUICK = [Config("64M", 16), Config("64M", 256)]


@dataclass(frozen=True)
class Variant:
    """The code a row runs on, and how."""

    name: str  # as the tables show it
    tree: Path
    mode: str | None = None  # --checkpoint-mode (None: the tree has no such option)
    encrypt: bool = True

    @property
    def baseline(self) -> bool:
        return self.mode is None


# ---------------------------------------------------------------------------------------------------------------
# running a row

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


def run_row(cfg: Config, v: Variant, checkpoints: int, hooks: str | None, workdir: Path) -> dict[str, Any]:
    """One cluster of `v`'s tree running `cfg`; its records after the warm-up, and how busy the machine was."""
    d = workdir / f"{cfg.name}-{v.name}".replace(" ", "_").replace("=", "").replace(",", "")
    d.mkdir(parents=True, exist_ok=True)
    out = d / "row.json"
    cmd = [sys.executable, str(ROW_SCRIPT), "--tree", str(v.tree), "--ram", cfg.ram, "--pages", str(cfg.pages),
           "--fill", cfg.fill, "--checkpoints", str(checkpoints), "--warmup", str(WARMUP),
           "--interval", str(INTERVAL_MS), "--out", str(out), "--dir", str(d)]
    if v.mode is not None:
        cmd += ["--checkpoint-mode", v.mode]
    if not v.encrypt:
        cmd.append("--no-encrypt")
    if hooks:
        cmd += ["--hooks", hooks]
    # The cluster's processes run `python -m colo`: they must import the colo and toyvm of the variant's tree
    # (-m puts the working directory first on sys.path, so that is the tree too).
    env = {**os.environ, "PYTHONPATH": str(v.tree)}
    with LoadMeter() as load:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=v.tree)
    if done.returncode != 0:
        raise RuntimeError(f"{cfg.name} on {v.name}: {done.stderr.strip()}")
    got = json.loads(out.read_text())
    return {"records": got["records"], "seconds": got["seconds"], "cpus_busy_cluster": load.own_cpus,
            "cpus_busy_other": load.other_cpus}


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
            "copy_ms_median": statistics.median(copy_s) * 1e3, "lz4_ms_median": statistics.median(lz4_s) * 1e3}


# ---------------------------------------------------------------------------------------------------------------
# summary and report

def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else xs[0]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One (row, variant): every round's records together, and each round's median pause (the spread)."""
    med = statistics.median
    records = [r for run in runs for r in run["records"]]
    pause = [r["pause_ms"] for r in records]
    commit = [r["commit_ms"] for r in records if "commit_ms" in r]
    s = {"checkpoints": len(records), "rounds": len(runs),
         "pause_median_ms": med(pause), "pause_p99_ms": p99(pause),
         "pause_min_ms": min(pause), "pause_max_ms": max(pause),
         "pause_round_medians_ms": [med(r["pause_ms"] for r in run["records"]) for run in runs],
         "commit_median_ms": med(commit) if commit else None, "commit_p99_ms": p99(commit) if commit else None,
         "dirty_pages_median": med(r["dirty_pages"] for r in records),
         "dirty_pages_min": min(r["dirty_pages"] for r in records),
         "bytes_raw_median": med(r["bytes_raw"] for r in records),
         "bytes_wire_median": med(r["bytes_wire"] for r in records),
         "phases_median_ms": {p: med(r["phases_ms"].get(p, 0.0) for r in records)
                              for p in sorted({p for r in records for p in r["phases_ms"]})},
         "cpus_busy_other": [run["cpus_busy_other"] for run in runs],
         "modes": sorted({r.get("checkpoint_mode", "strict") for r in records})}
    s["compression_ratio"] = s["bytes_raw_median"] / s["bytes_wire_median"] if s["bytes_wire_median"] else 0.0
    return s


def speedups(base: dict[str, Any], other: dict[str, Any]) -> list[float]:
    """Per round: the baseline's median pause over the variant's (both ran in that round)."""
    return [b / o for b, o in zip(base["pause_round_medians_ms"], other["pause_round_medians_ms"], strict=True)
            if o > 0]


def fmt_bytes(n: float) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n:.0f} B"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_range(xs: list[float], fmt: Callable[[float], str] = fmt_ms) -> str:
    return f"{fmt(min(xs))}-{fmt(max(xs))}" if len(xs) > 1 else ""


def fmt_x(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.median(xs)
    return f"**{m:.2f}x**" + (f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else "")


def targets(configs: list[Config], variants: list[Variant], res: dict[tuple[str, str], dict[str, Any]]
            ) -> list[dict[str, Any]]:
    out = []
    base = next((v for v in variants if v.baseline), None)
    for v in variants:
        if v.baseline:
            continue
        for cfg in configs:
            goal = SPEEDUP_TARGETS.get(cfg.key)
            b, o = (res.get((cfg.name, base.name)) if base else None), res.get((cfg.name, v.name))
            if goal is None or b is None or o is None:
                continue
            x = speedups(b, o)
            m = statistics.median(x)
            out.append({"target": f"{cfg.name}, {v.name}: speedup >= {goal:g}x", "measured": fmt_x(x).replace("*", ""),
                        "met": m >= goal, "by": f"{m / goal:.2f}x the target"})
        small, big = res.get(("64M N=16 word", v.name)), res.get(("1G N=16 word", v.name))
        if small and big:
            a, c = small["pause_median_ms"], big["pause_median_ms"]
            out.append({"target": f"N=16, {v.name}: 1 GiB pause within {1 + SAME_PAUSE_TOLERANCE:.1f}x of 64 MiB",
                        "measured": f"{fmt_ms(c)} vs {fmt_ms(a)} ms", "met": c <= (1 + SAME_PAUSE_TOLERANCE) * a,
                        "by": f"{c / a:.2f}x"})
    for mode in ("pipelined", "strict"):
        enc = next((v for v in variants if v.mode == mode and v.encrypt), None)
        integ = next((v for v in variants if v.mode == mode and not v.encrypt), None)
        key = "64M N=4096 random"
        if base and integ and (key, base.name) in res and (key, integ.name) in res:
            b, i = res[(key, base.name)]["pause_median_ms"], res[(key, integ.name)]["pause_median_ms"]
            out.append({"target": f"{key}, {integ.name}: pause grows < {SEALING_GROWTH:.0%} over the baseline's "
                                  "plain frames", "measured": f"{fmt_ms(i)} vs {fmt_ms(b)} ms",
                        "met": i < (1 + SEALING_GROWTH) * b, "by": f"{i / b - 1:+.0%}"})
        if enc and integ and (key, enc.name) in res and (key, integ.name) in res:
            e, i = res[(key, enc.name)]["pause_median_ms"], res[(key, integ.name)]["pause_median_ms"]
            out.append({"target": f"{key}: encryption's cost ({mode})", "measured": f"{fmt_ms(e)} vs {fmt_ms(i)} ms",
                        "met": True, "by": f"{e / i - 1:+.0%} (reported as it is, no target)"})
    return out


def markdown(info: dict[str, Any], args: argparse.Namespace, configs: list[Config], variants: list[Variant],
             res: dict[tuple[str, str], dict[str, Any]], floors: dict[str, dict[str, Any]]) -> str:
    k = args.checkpoints
    lines = [f"Checkpoint cost, {info['date']}: {info['cpu']}, {info['nproc']} CPUs, Python {info['python']}, "
             f"unicorn {info['unicorn']}, lz4 {info['lz4']}, hooks {info['hooks']}; interval {INTERVAL_MS:g} ms, "
             f"{k} checkpoints per row and variant after {WARMUP} warm-up, {args.rounds} round(s)"
             f"{' (--quick)' if args.quick else ''}. Variants: "
             + "; ".join(f"{v.name} = {info['sources'][v.name]}" for v in variants) + ".", ""]
    if "source_end" in info:
        lines += [f"**Warning:** colo/ or toyvm/ changed during the run (at the end: {info['source_end']}); "
                  "rows may come from different code.", ""]
    base = next((v for v in variants if v.baseline), None)
    cur = [v for v in variants if not v.baseline]
    head = "| RAM | N | fill | dirty pages (median) | "
    head += (f"{base.name}: pause median (ms) | " if base else "")
    head += " | ".join(f"{v.name}: pause median (ms) | " + ("speedup | " if base else "") + "commit median (ms)"
                       for v in cur)
    head += " | bytes on wire (current) | floor: copy + lz4 (ms) |"
    cols = head.count("|") - 1
    lines += [head, "|---|---:|---|" + "---:|" * (cols - 3)]
    for cfg in configs:
        first = res.get((cfg.name, cur[0].name)) if cur else None
        if first is None:
            continue
        row = f"| {cfg.ram} | {cfg.pages} | {cfg.fill} | {first['dirty_pages_median']:g} | "
        if base:
            b = res.get((cfg.name, base.name))
            row += (f"{fmt_ms(b['pause_median_ms'])} ({fmt_range(b['pause_round_medians_ms'])}) | " if b else "- | ")
        for v in cur:
            o = res.get((cfg.name, v.name))
            if o is None:
                row += "- | " + ("- | " if base else "") + "- | "
                continue
            spread = fmt_range(o["pause_round_medians_ms"])
            row += f"**{fmt_ms(o['pause_median_ms'])}**" + (f" ({spread})" if spread else "") + " | "
            if base:
                b = res.get((cfg.name, base.name))
                row += (fmt_x(speedups(b, o)) if b else "-") + " | "
            row += f"{fmt_ms(o['commit_median_ms'])} | "
        f = floors.get(cfg.name)
        row += f"{fmt_bytes(first['bytes_wire_median'])} ({first['compression_ratio']:.1f}x) | "
        row += (f"{fmt_ms(f['floor_ms'])} ({fmt_ms(f['copy_ms'])} + {fmt_ms(f['lz4_ms'])}) |" if f else "- |")
        lines.append(row)
    lines += ["", "Phase medians (ms) and p99 of the pause, per variant (the phases of pipelined checkpoints after "
              "collect run while the guest runs; the pause is measured on its own):", "",
              "| RAM | N | fill | variant | " + " | ".join(PHASES) + " | pause p99 | other load (CPUs) |",
              "|---|---:|---|---|" + "---:|" * (len(PHASES) + 2)]
    for cfg in configs:
        for v in variants:
            o = res.get((cfg.name, v.name))
            if o is None:
                continue
            ph = o["phases_median_ms"]
            names = PHASES if not v.baseline else tuple(ph)
            cells = [fmt_ms(ph.get(p)) if p in ph else "-" for p in PHASES] if not v.baseline else \
                ["(" + ", ".join(f"{p} {fmt_ms(ph[p])}" for p in names) + ")"] + [""] * (len(PHASES) - 1)
            busy = o["cpus_busy_other"]
            lines.append(f"| {cfg.ram} | {cfg.pages} | {cfg.fill} | {v.name} | " + " | ".join(cells)
                         + f" | {fmt_ms(o['pause_p99_ms'])} | {max(busy):.2f} |")
    short = [(cfg, o) for (name, vn), o in res.items() for cfg in configs
             if cfg.name == name and o["dirty_pages_median"] < cfg.pages]
    if short:
        lines += ["", "**Note:** the guest did not rewrite all its N pages in every interval in "
                  + ", ".join(sorted({f"{c.name} (median {o['dirty_pages_median']:g})" for c, o in short}))
                  + ": those checkpoints carried fewer pages than N (the floor is timed on all N)."]
    busy_rows = sorted({f"{name} on {vn} ({max(o['cpus_busy_other']):.2f})" for (name, vn), o in res.items()
                        if max(o["cpus_busy_other"]) > BUSY_WARNING})
    if busy_rows:
        lines += ["", "**Warning:** other work kept more than "
                  f"{BUSY_WARNING} of {info['nproc']} CPUs busy during " + ", ".join(busy_rows)
                  + " (CPUs busy with work other than this benchmark and its cluster, from /proc/stat)."]
    t = targets(configs, variants, res)
    if t:
        lines += ["", "| target | measured | met | by how much |", "|---|---:|---|---|"]
        lines += [f"| {x['target']} | {x['measured']} | {'yes' if x['met'] else '**no**'} | {x['by']} |" for x in t]
    lines += ["", "Pause: the guest stopped for the checkpoint (`pause_ms`); commit: from the stop until "
              "vmstate-received (`commit_ms`, the earliest its output may reach a client). Medians over every "
              "checkpoint of every round; in brackets the range of the per-round medians. Speedup: the baseline's "
              "median pause over the variant's, per round (median, range). p99: "
              "`statistics.quantiles(n=100, method='inclusive')`. Floor: the same guest run for one "
              f"interval in a toyvm Machine in this process; its dirty pages gathered with one numpy copy into a "
              f"preallocated buffer, then lz4.block.compress per batch of {BATCH_PAGES} pages on one thread; "
              "the fastest of repeated timings."]
    return "\n".join(lines)


def source_info(tree: Path) -> str:
    """The commit measured, and whether colo/ or toyvm/ differ from it (the tree may be edited meanwhile)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "colo", "toyvm"], cwd=tree,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return (head or "unknown") + (f" + uncommitted {', '.join(changed)}" if changed else "") + \
        f" (sources {source_digest(tree)})"


def source_digest(tree: Path) -> str:
    """A digest of colo/ and toyvm/ as they are on disk: it tells whether they changed during the run."""
    h = hashlib.sha256()
    for path in sorted([*tree.glob("colo/**/*.py"), *tree.glob("toyvm/**/*.py"), *tree.glob("toyvm/**/*.c")]):
        h.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def baseline_tree(ref: str) -> Path:
    """A worktree of commit `ref` (made once, under .baseline/, and reused)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    if sha.returncode != 0:
        raise SystemExit(f"checkpoint_cost: --baseline {ref}: not a commit of this repository")
    tree = BASELINES / sha.stdout.strip()[:12]
    if not (tree / "colo").is_dir():
        BASELINES.mkdir(exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha.stdout.strip()], cwd=ROOT,
                       check=True, capture_output=True, timeout=120)
    return tree


def machine_info(hooks: str, variants: list[Variant]) -> dict[str, Any]:
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
            "platform": platform.platform(), "hooks": hooks,
            "sources": {v.name: source_info(v.tree) for v in variants},
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="COLO checkpoint pause through the real path (local cluster, "
                                             "loopback TCP) against the copy + lz4 floor, and against an older "
                                             "commit with --baseline. Prints Markdown.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N = 16 and 256 (word) in 64 MiB only, 15 checkpoints each")
    ap.add_argument("--checkpoints", type=int, default=None, metavar="K",
                    help=f"checkpoints measured per row, variant and round, after {WARMUP} warm-up (default 100; "
                         "15 with --quick)")
    ap.add_argument("--rounds", type=int, default=1, metavar="R",
                    help="rounds over every row and variant, in rotated orders (default 1); the spread is the "
                         "range of the per-round medians")
    ap.add_argument("--baseline", metavar="REF",
                    help="also run every row on a worktree of commit REF (made under .baseline/), alternately "
                         "with the current code, and report the speedup per row")
    ap.add_argument("--modes", default="pipelined,strict",
                    help="the current code's checkpoint modes to run (default pipelined,strict)")
    ap.add_argument("--integrity", action="store_true",
                    help="also run the current code with integrity-only frames (--no-encrypt), beside encrypted")
    ap.add_argument("--json", metavar="FILE", help="also write every record and timing to FILE")
    ap.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                    help="toyvm hook engine for the clusters and the floor VM (default: toyvm's choice)")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="run only the rows whose name (e.g. '64M N=16 word') contains TEXT (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the clusters' working folder (stats, logs)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.checkpoints is None:
        args.checkpoints = 15 if args.quick else 100
    if args.checkpoints < 1 or args.rounds < 1:
        ap.error("--checkpoints and --rounds must be at least 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("pipelined", "strict") for m in modes):
        ap.error("--modes takes pipelined, strict or both, comma-separated")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if not MEMTOUCH.exists():
        print(f"checkpoint_cost: {MEMTOUCH.relative_to(ROOT)} is not built (make guests)", file=sys.stderr)
        return 2
    if not args.quick and args.checkpoints < 50:
        log(f"note: {args.checkpoints} checkpoints per row: fewer than 50, the p99 means little")
    variants: list[Variant] = []
    if args.baseline:
        variants.append(Variant(f"baseline {args.baseline}", baseline_tree(args.baseline)))
    for m in modes:
        variants.append(Variant(m, ROOT, m))
        if args.integrity:
            variants.append(Variant(f"{m}, integrity only", ROOT, m, encrypt=False))
    hooks = Machine(2 << 20, hooks=args.hooks).hooks
    info = machine_info(hooks, variants)
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = [c for c in configs if any(t in c.name for t in args.only)]
        if not configs:
            ap.error(f"--only {args.only} matches none of {[c.name for c in (QUICK if args.quick else FULL)]}")
    workdir = Path(tempfile.mkdtemp(prefix="checkpoint-cost-"))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    floors: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    try:
        turn = 0
        for r in range(args.rounds):
            for cfg in configs:
                order = variants[turn % len(variants):] + variants[:turn % len(variants)]
                turn += 1
                for v in order:
                    log(f"round {r + 1}: {cfg.name} on {v.name}")
                    got = run_row(cfg, v, args.checkpoints, args.hooks, workdir / f"round{r + 1}")
                    pauses = sorted(x["pause_ms"] for x in got["records"])
                    log(f"  pause median {statistics.median(pauses):.2f} ms in {got['seconds']:.1f} s; other load "
                        f"{got['cpus_busy_other']:.2f} CPUs")
                    runs.setdefault((cfg.name, v.name), []).append(got)
        for cfg in configs:
            floors[cfg.name] = time_floor(cfg, args.hooks, 10 if args.quick else 50)
    finally:
        if args.keep:
            log(f"working folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"total {time.monotonic() - t0:.0f} s")
    end = {v.name: source_info(v.tree) for v in variants}
    if end != info["sources"]:
        info["source_end"] = end
        log(f"warning: colo/ or toyvm/ changed during the run: {info['sources']} -> {end}")
    res = {key: summarize(rs) for key, rs in runs.items()}
    print(markdown(info, args, configs, variants, res, floors))
    if args.json:
        doc = {"machine": info, "interval_ms": INTERVAL_MS, "warmup": WARMUP, "checkpoints": args.checkpoints,
               "rounds": args.rounds, "quick": args.quick,
               "variants": [{"name": v.name, "tree": str(v.tree), "mode": v.mode, "encrypt": v.encrypt}
                            for v in variants],
               "targets": targets(configs, variants, res), "floors": floors,
               "rows": {f"{name} | {vn}": {"summary": s, "records": [x for run in runs[(name, vn)]
                                                                      for x in run["records"]]}
                        for (name, vn), s in res.items()}}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
