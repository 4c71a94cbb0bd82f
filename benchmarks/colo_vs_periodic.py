#!/usr/bin/env python3
"""COLO vs periodic checkpointing: what replication costs a client, and why hybrid (COLO) mode exists.

Two guests get the same client load: `guests/kvstore.bin` (a deterministic Redis-protocol server: both VMs
answer alike) and `guests/noisy.bin` (same protocol, but its GET replies carry the host clock and random
bytes, so the two VMs' answers differ on purpose; its SET replies are a constant `+OK`). Each guest runs in

  alone            `python -m toyvm run GUEST --net-listen 127.0.0.1:0`: no replication at all
  periodic 20 ms   a real `colo.cli.LocalCluster` (gateway, secondary, primary as separate processes, TCP on
  periodic 50 ms   loopback), checkpoint every 20 / 50 / 100 ms; replies are held until the checkpoint that
  periodic 100 ms  covers them is received by the secondary (output commit)
  hybrid           the same cluster in hybrid (COLO) mode: both VMs run, the gateway compares their output,
                   releases what matches and asks for a checkpoint on a mismatch or on output unmatched for
                   the compare timeout (the gateway's default, 200 ms); backstop checkpoint every 2 s; each
                   node on its own half of the CPUs (LocalCluster's pin="auto", on 2 or more CPUs)
  hybrid pin=off   the same, every role free to run on every CPU: what the pinning is worth
  hybrid sched=normal  the same, with the roles under the kernel's default scheduling policy instead of
                   SCHED_BATCH (`--sched normal`): what the policy is worth

The load is `redis-benchmark -c C -t set --csv` then `-t get` (separate runs, so checkpoints can be counted
for each operation: noisy's SETs are deterministic, its GETs are not). `-n` is sized per configuration from
the throughput measured so far (a short warm-up run first), so that each operation runs about --seconds.
Measured per operation:
  ops/s        redis-benchmark's requests per second
  p50, p99     redis-benchmark's own per-request latency percentiles (ms, from its --csv output: the time from
               sending a request to receiving its whole reply, on every one of the C connections)
  checkpoints  records of the primary's --stats file (colo.stats, one JSON line per checkpoint, with its
               trigger) whose time lies inside the redis-benchmark run, divided by the run's wall time
  CPU          each process's CPU time over the run (every thread, /proc) and redis-benchmark's (its rusage),
               per request; the machine's busy CPUs (/proc/stat); for hybrid kvstore, the ceiling that puts on
               the rate: CPUs / (CPU per request), at that cost per request

Rounds are interleaved: every round runs every (guest, configuration) in an order rotated from round to round;
the tables show medians over rounds (min-max of ops/s in the JSON). Every process's stderr goes to a log; errors
there (tracebacks, lost nodes, a primary that went unprotected during the load) are reported under the table.

Usage: benchmarks/colo_vs_periodic.py [--quick] [--rounds R] [--seconds S] [--clients C] [--json FILE]
                                      [--plot FILE | --no-plot] [--hooks auto|python|native] [--keep] [-q]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import platform
import re
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

import unicorn  # noqa: E402

from colo.cluster import LocalCluster  # noqa: E402
from colo.stats import read_records  # noqa: E402
from toyvm.cli import positive_float, positive_int  # noqa: E402

GUESTS = {"kvstore": ROOT / "guests" / "kvstore.bin", "noisy": ROOT / "guests" / "noisy.bin"}
TESTS = ("set", "get")
BACKSTOP_MS = 2000.0
DEFAULT_PLOT = ROOT / "benchmarks" / "colo_vs_periodic.png"
BUSY_WARNING = 0.25  # CPUs of other work on average during a run that make its row suspect
# Lines of the processes' stderr worth reporting during the load (anything else is start-up chatter) ...
TROUBLE = re.compile(r"Traceback|[Ee]rror|unprotected|was lost|no ready secondary|exited|timed out")
# ... and at the stop, where the nodes are stopped before the gateway, so "lost" and "unprotected" are expected.
STOP_TROUBLE = re.compile(r"Traceback|\b\w*Error\b|[Ee]xception")


@dataclass(frozen=True)
class Config:
    name: str  # as the tables show it
    mode: str  # alone, periodic, hybrid
    interval_ms: float = 0.0
    sched: str = "batch"  # the roles' --sched (colo/sched.py)
    pin: str = "auto"  # LocalCluster(pin=...): in hybrid mode each node on its own half of the CPUs

    @property
    def key(self) -> str:
        return self.name.replace(" ", "-")


CONFIGS = [Config("alone", "alone"), Config("periodic 20 ms", "periodic", 20.0),
           Config("periodic 50 ms", "periodic", 50.0), Config("periodic 100 ms", "periodic", 100.0),
           Config("hybrid", "hybrid"), Config("hybrid pin=off", "hybrid", pin="off"),
           Config("hybrid sched=normal", "hybrid", sched="normal")]


# ---------------------------------------------------------------------------------------------------------------
# the services: the guest alone, or a local cluster

class Service:
    """One guest serving clients on a local port, replicated or not. `log` collects every process's output."""

    def __init__(self, guest: str, cfg: Config, hooks: str, d: Path) -> None:
        self.guest, self.cfg, self.hooks, self.dir = guest, cfg, hooks, d
        self.log = d / "processes.log"
        self.stats = d / "stats.jsonl"
        self.cluster: LocalCluster | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        if self.cfg.mode == "alone":
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "toyvm", "run", self.guest, "--net-listen", "127.0.0.1:0",
                     "--hooks", self.hooks], stdout=out, stderr=out, cwd=ROOT, start_new_session=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                m = re.search(r"toyvm: listening on [^\s:]+:(\d+)", self.log.read_text(errors="replace"))
                if m:
                    self.port = int(m.group(1))
                    return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"toyvm run exited with status {self.proc.returncode}\n{tail(self.log)}")
                time.sleep(0.02)
            raise RuntimeError(f"toyvm run did not listen within 30 s\n{tail(self.log)}")
        self.cluster = LocalCluster(self.guest, mode=self.cfg.mode, interval_ms=self.cfg.interval_ms or 100.0,
                                    backstop_ms=BACKSTOP_MS, stats=str(self.stats), hooks=self.hooks,
                                    directory=self.dir, sched=self.cfg.sched, pin=self.cfg.pin)
        with open(self.log, "ab") as err:
            self.cluster.start(stderr=err, stdout=err)  # the guest's serial console must not land in our Markdown
        self.cluster.wait_protected(timeout=60)  # hybrid: the first checkpoint comes after the 2 s backstop
        self.port = self.cluster.service_address[1]

    def check(self) -> str | None:
        """Why the service is not in the state the measurement needs (None: all fine)."""
        if self.proc is not None:
            return None if self.proc.poll() is None else f"toyvm run exited with status {self.proc.returncode}"
        assert self.cluster is not None
        for role, p in self.cluster.procs.items():
            if p.poll() is not None:
                return f"the {role} exited with status {p.returncode}"
        try:
            info = self.cluster.status()
        except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
            return f"colo status failed: {e}"
        if not info["gateway"].get("protected"):
            return "the primary was not protected at the end of the load"
        mode = info["gateway"].get("mode", "periodic")
        if mode != self.cfg.mode:
            return f"the gateway runs in {mode} mode, expected {self.cfg.mode}"
        return None

    def stop(self) -> dict[str, int | None]:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                return {"toyvm": self.proc.wait(10)}
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return {"toyvm": self.proc.wait()}
        if self.cluster is not None:
            return self.cluster.stop()
        return {}

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.stats) if self.stats.exists() else []

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each process of the service (toyvm, or the cluster's roles)."""
        procs = {"toyvm": self.proc} if self.proc is not None else dict(self.cluster.procs) if self.cluster else {}
        out = {}
        for role, p in procs.items():
            used = process_cpu_seconds(p.pid) if p is not None and p.poll() is None else None
            if used is not None:
                out[role] = used
        return out


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def trouble(text: str, pattern: re.Pattern[str] = TROUBLE) -> list[str]:
    return [line for line in text.splitlines() if pattern.search(line)]


# ---------------------------------------------------------------------------------------------------------------
# the load

def redis_benchmark(port: int, test: str, n: int, clients: int, timeout: float) -> dict[str, Any]:
    """One redis-benchmark run; its CSV row, the wall-clock window it ran in, and what went wrong if anything."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(n), "-t", test,
           "--csv"]
    t0, m0 = time.time(), time.monotonic()
    child0, busy0 = children_cpu_seconds(), machine_cpu_seconds()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"redis-benchmark timed out after {timeout:.0f} s", None
    wall = time.monotonic() - m0
    res: dict[str, Any] = {"test": test, "n": n, "start": t0, "end": t0 + wall, "wall_s": wall, "returncode": rc,
                           # redis-benchmark's own CPU (it is reaped by now), and how busy the whole machine was:
                           # together with the service's CPU they say whether a run was bound by the CPUs.
                           "client_cpu_s": children_cpu_seconds() - child0,
                           "machine_busy_cpus": (machine_cpu_seconds() - busy0) / wall if wall > 0 else 0.0}
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r.get("test", "").lower() == test]
    if rc != 0 or not rows:
        res["error"] = (err.strip().splitlines() or [f"exit status {rc}, no CSV row"])[-1][:300]
        return res
    r = rows[-1]
    res.update(ops_s=float(r["rps"]), avg_ms=float(r["avg_latency_ms"]), p50_ms=float(r["p50_latency_ms"]),
               p95_ms=float(r["p95_latency_ms"]), p99_ms=float(r["p99_latency_ms"]),
               max_ms=float(r["max_latency_ms"]))
    return res


def checkpoints_in(records: list[dict[str, Any]], start: float, end: float) -> dict[str, int]:
    by: dict[str, int] = {}
    for r in records:
        if start <= r["time"] <= end:
            by[r["trigger"]] = by.get(r["trigger"], 0) + 1
    return by


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far, from /proc/stat (0 where it is missing)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds a live process has used, all its threads: the scheduler's nanoseconds on a CPU per thread
    (/proc/PID/task/*/schedstat), else utime + stime in clock ticks; None if unreadable."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children."""
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return b.ru_utime + b.ru_stime


def own_cpu_seconds() -> float:
    """This process and its reaped children (the services and redis-benchmark, once waited for)."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime + children_cpu_seconds()


class Runner:
    def __init__(self, args: argparse.Namespace, hooks: str, workdir: Path, log: Callable[[str], None]) -> None:
        self.args, self.hooks, self.workdir, self.log = args, hooks, workdir, log
        self.rates: dict[tuple[str, str, str], list[float]] = {}  # measured ops/s so far, per guest/config/test

    def size(self, guest: str, cfg: Config, test: str, warm: dict[str, Any]) -> int:
        """-n for about --seconds of load: from the medians measured in earlier rounds, else the warm-up."""
        seen = self.rates.get((guest, cfg.key, test))
        rate = statistics.median(seen) if seen else warm.get("ops_s", 0.0)
        c = self.args.clients
        return int(min(max(rate * self.args.seconds, 10 * c), 2_000_000))

    def run(self, rnd: int, guest: str, cfg: Config) -> dict[str, Any]:
        d = self.workdir / f"r{rnd}-{guest}-{cfg.key}"
        d.mkdir(parents=True, exist_ok=True)
        svc = Service(str(GUESTS[guest]), cfg, self.hooks, d)
        res: dict[str, Any] = {"round": rnd, "guest": guest, "config": cfg.name, "tests": {}, "problems": []}
        busy0, own0, t0 = machine_cpu_seconds(), own_cpu_seconds(), time.monotonic()
        load_end_offset = 0
        try:
            svc.start()
            res["start_s"] = round(time.monotonic() - t0, 3)
            c = self.args.clients
            for test in TESTS:
                warm = redis_benchmark(svc.port, test, self.args.warmup * c, c, timeout=120)
                if "error" in warm:
                    res["problems"].append(f"{test} warm-up: {warm['error']}")
                    res["tests"][test] = {"warmup": warm, "error": warm["error"]}
                    continue
                if (not self.rates.get((guest, cfg.key, test)) and warm["wall_s"] < 0.25
                        and self.args.seconds >= 2):
                    # First round, and the warm-up was too short to size from: one probe of about 0.5 s.
                    probe = redis_benchmark(svc.port, test, int(max(warm["ops_s"] * 0.5, 4 * warm["n"])), c,
                                            timeout=120)
                    if "error" not in probe:
                        warm = {**warm, "ops_s": probe["ops_s"], "probe": probe}
                n = self.size(guest, cfg, test, warm)
                cpu0 = svc.cpu()
                run = redis_benchmark(svc.port, test, n, c, timeout=max(120.0, 10 * self.args.seconds))
                cpu1 = svc.cpu()
                if run.get("n"):  # where the CPU time of a request goes, by process of the service
                    run["cpu_us_per_request"] = {r: round((cpu1[r] - cpu0[r]) / run["n"] * 1e6, 1)
                                                 for r in cpu1 if r in cpu0}
                    run["client_cpu_us_per_request"] = round(run["client_cpu_s"] / run["n"] * 1e6, 1)
                run["warmup"] = warm
                by = checkpoints_in(svc.records(), run["start"], run["end"])
                run["checkpoints"] = by
                run["checkpoints_per_s"] = sum(by.values()) / run["wall_s"]
                run["checkpoints_per_s_by_trigger"] = {k: v / run["wall_s"] for k, v in by.items()}
                if "error" in run:
                    res["problems"].append(f"{test}: {run['error']}")
                else:
                    self.rates.setdefault((guest, cfg.key, test), []).append(run["ops_s"])
                res["tests"][test] = run
            why = svc.check()
            if why:
                res["problems"].append(why)
            load_end_offset = svc.log.stat().st_size if svc.log.exists() else 0
        except Exception as e:  # noqa: BLE001 - one broken configuration must not lose the others
            res["problems"].append(f"{type(e).__name__}: {e}".splitlines()[0][:300])
            load_end_offset = svc.log.stat().st_size if svc.log.exists() else 0
        finally:
            res["exit_codes"] = svc.stop()
        wall = time.monotonic() - t0
        res["wall_s"] = round(wall, 3)
        res["cpus_busy_other"] = round(max(0.0, machine_cpu_seconds() - busy0 - (own_cpu_seconds() - own0))
                                       / wall, 3)
        text = svc.log.read_bytes().decode(errors="replace") if svc.log.exists() else ""
        cut = len(svc.log.read_bytes()[:load_end_offset].decode(errors="replace"))
        res["stderr_during_load"] = trouble(text[:cut])
        res["stderr_at_stop"] = trouble(text[cut:], STOP_TROUBLE)
        bad = {r: code for r, code in res["exit_codes"].items() if code not in (0, -15, 128 + 15)}
        if bad:
            res["problems"].append(f"exit codes at stop: {bad}")
        recs = svc.records()
        res["checkpoints_total"] = len(recs)
        pauses = sorted(r["pause_ms"] for r in recs)
        res["pause_median_ms"] = statistics.median(pauses) if pauses else None
        for t in res["tests"].values():
            w = [r for r in recs if t.get("start", 0) <= r["time"] <= t.get("end", 0)]
            if w:
                t["pause_median_ms"] = statistics.median(r["pause_ms"] for r in w)
                t["dirty_pages_median"] = statistics.median(r["dirty_pages"] for r in w)
        if not self.args.keep:
            shutil.rmtree(d, ignore_errors=True)
        return res


# ---------------------------------------------------------------------------------------------------------------
# summary, Markdown, plot

def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per guest / configuration / test."""
    out: dict[str, Any] = {}
    for guest in GUESTS:
        for cfg in CONFIGS:
            mine = [r for r in runs if r["guest"] == guest and r["config"] == cfg.name]
            s: dict[str, Any] = {}
            for test in TESTS:
                ok = [r["tests"][test] for r in mine if test in r["tests"] and "ops_s" in r["tests"][test]]
                if not ok:
                    s[test] = {"rounds": 0}
                    continue
                med = statistics.median
                triggers = sorted({k for t in ok for k in t["checkpoints"]})
                s[test] = {"rounds": len(ok), "ops_s": med(t["ops_s"] for t in ok),
                           "ops_s_min": min(t["ops_s"] for t in ok), "ops_s_max": max(t["ops_s"] for t in ok),
                           "p50_ms": med(t["p50_ms"] for t in ok), "p99_ms": med(t["p99_ms"] for t in ok),
                           "p99_ms_min": min(t["p99_ms"] for t in ok), "p99_ms_max": max(t["p99_ms"] for t in ok),
                           "n": [t["n"] for t in ok], "wall_s": [round(t["wall_s"], 2) for t in ok],
                           "checkpoints_per_s": med(t["checkpoints_per_s"] for t in ok),
                           "checkpoints_per_s_min": min(t["checkpoints_per_s"] for t in ok),
                           "checkpoints_per_s_max": max(t["checkpoints_per_s"] for t in ok),
                           "by_trigger": {k: med(t["checkpoints_per_s_by_trigger"].get(k, 0.0) for t in ok)
                                          for k in triggers}}
                cps = s[test]["checkpoints_per_s"]
                s[test]["requests_per_checkpoint"] = s[test]["ops_s"] / cps if cps else None
                roles = sorted({r for t in ok for r in t.get("cpu_us_per_request", {})})
                s[test]["cpu_us_per_request"] = {
                    r: med(t["cpu_us_per_request"][r] for t in ok if r in t.get("cpu_us_per_request", {}))
                    for r in roles}
                client = [t["client_cpu_us_per_request"] for t in ok if "client_cpu_us_per_request" in t]
                s[test]["client_cpu_us_per_request"] = med(client) if client else None
                s[test]["machine_busy_cpus"] = med(t["machine_busy_cpus"] for t in ok)
            s["problems"] = sorted({p for r in mine for p in r["problems"]})
            out[f"{guest}/{cfg.name}"] = s
    return out


def cpu_bounds(summary: dict[str, Any], nproc: int) -> list[str]:
    """Per hybrid row of kvstore: the throughput the machine's CPUs cap it at, from the CPU each request cost."""
    out = []
    for cfg in CONFIGS:
        if cfg.mode != "hybrid":
            continue
        alone, hybrid = summary["kvstore/alone"], summary[f"kvstore/{cfg.name}"]
        for test in TESTS:
            a, h = alone[test], hybrid[test]
            client = h.get("client_cpu_us_per_request")
            if not (a["rounds"] and h["rounds"] and a["ops_s"] and h.get("cpu_us_per_request")
                    and client is not None):
                continue
            service = sum(h["cpu_us_per_request"].values())
            per = service + client
            if per <= 0:
                continue
            ceiling = nproc / (per * 1e-6)
            target = 0.5 * a["ops_s"]
            out.append(f"kvstore {cfg.name} {test.upper()}: {per:.0f} us a request ({service:.0f} service + "
                       f"{client:.0f} redis-benchmark), {h['machine_busy_cpus']:.2f} of {nproc} CPUs busy at "
                       f"{fmt_rate(h['ops_s'])} ops/s; ceiling {fmt_rate(ceiling)} ops/s = "
                       f"{ceiling / a['ops_s']:.2f}x alone; 0.5x ({fmt_rate(target)} ops/s) needs at most "
                       f"{nproc / target * 1e6:.0f} us a request here, or {target * per * 1e-6:.1f} CPUs kept busy "
                       "at today's cost")
    return out


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def fmt_ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_ckpt(s: dict[str, Any], cfg: Config) -> str:
    if cfg.mode == "alone":
        return "-"
    if not s["by_trigger"]:
        return "0"
    return " + ".join(f"{fmt_rate(v)} {k}" for k, v in sorted(s["by_trigger"].items(), key=lambda kv: -kv[1])
                      if v > 0) or "0"


def markdown(info: dict[str, Any], args: argparse.Namespace, summary: dict[str, Any],
             runs: list[dict[str, Any]]) -> str:
    rounds = args.rounds
    lines = [f"COLO vs periodic, {info['date']}: {info['cpu']}, {info['nproc']} CPUs, Python {info['python']}, "
             f"unicorn {info['unicorn']}, {info['redis_benchmark']}, hooks {info['hooks']}; source {info['source']}. "
             f"Load: redis-benchmark -c {args.clients} -t set, then -t get, about {args.seconds:g} s each "
             f"(-n sized per configuration); median of {rounds} interleaved round{'s' if rounds > 1 else ''}"
             f"{' (--quick)' if args.quick else ''}.", "",
             "| guest | configuration | SET ops/s | GET ops/s | SET p50 / p99 (ms) | GET p50 / p99 (ms) | "
             "checkpoints/s during SET | checkpoints/s during GET | GET requests per checkpoint |",
             "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for guest in GUESTS:
        for cfg in CONFIGS:
            s = summary[f"{guest}/{cfg.name}"]
            cells = []
            for what in ("ops", "lat"):
                for test in TESTS:
                    t = s[test]
                    if not t["rounds"]:
                        cells.append("error")
                    elif what == "ops":
                        cells.append(f"**{fmt_rate(t['ops_s'])}**")
                    else:
                        cells.append(f"{fmt_ms(t['p50_ms'])} / {fmt_ms(t['p99_ms'])}")
            for test in TESTS:
                cells.append(fmt_ckpt(s[test], cfg) if s[test]["rounds"] else "error")
            g = s["get"]
            rpc = g["requests_per_checkpoint"] if g["rounds"] and cfg.mode != "alone" else None
            cells.append("-" if not rpc else f"{rpc:,.0f}" if rpc >= 100 else f"{rpc:.1f}")
            lines.append(f"| {guest} | {cfg.name} | " + " | ".join(cells) + " |")
    lines += ["", "ops/s and latency: redis-benchmark's own (--csv; latency from sending a request to its whole "
              "reply). Checkpoints/s: the primary's stats records timed inside the redis-benchmark run, by trigger "
              "(timer = periodic interval or hybrid backstop; mismatch / timeout = asked for by the gateway's "
              "output comparison). Hybrid: compare timeout 200 ms (the gateway's default), backstop "
              f"{BACKSTOP_MS / 1000:g} s."]
    ratios = []
    for guest in GUESTS:
        alone = summary[f"{guest}/alone"]
        for cfg in CONFIGS:
            if cfg.mode != "hybrid":
                continue
            hybrid = summary[f"{guest}/{cfg.name}"]
            parts = [f"{test.upper()} {hybrid[test]['ops_s'] / alone[test]['ops_s']:.2f}x" for test in TESTS
                     if hybrid[test]["rounds"] and alone[test]["rounds"] and alone[test]["ops_s"]]
            if parts:
                ratios.append(f"{guest} {cfg.name} {', '.join(parts)}")
    if ratios:
        lines += ["", "Hybrid throughput against the guest alone, medians of this run: " + "; ".join(ratios) +
                  " (issue 12 asks 0.5x or more of kvstore)."]
    cpu_rows = []
    for guest in GUESTS:
        for cfg in CONFIGS:
            if cfg.mode not in ("alone", "hybrid"):
                continue
            s = summary[f"{guest}/{cfg.name}"]
            cells = []
            for test in TESTS:
                per = s[test].get("cpu_us_per_request") if s[test]["rounds"] else None
                client = s[test].get("client_cpu_us_per_request") if s[test]["rounds"] else None
                cells.append(", ".join(f"{r} {v:.0f}" for r, v in per.items()) + f" (all {sum(per.values()):.0f})"
                             + (f"; redis-benchmark {client:.0f}" if client is not None else "") if per else "-")
            cpu_rows.append(f"| {guest} | {cfg.name} | " + " | ".join(cells) + " |")
    if cpu_rows:
        lines += ["", "CPU time per request, by process (us; every thread; the service's processes, then the "
                  "client's):", "", "| guest | configuration | SET | GET |", "|---|---|---|---|", *cpu_rows]
    bounds = cpu_bounds(summary, info["nproc"])
    if bounds:
        lines += ["", f"What the CPUs allow: {info['nproc']} CPUs, all busy, serve at most {info['nproc']} / (CPU "
                  "per request, service and client) requests a second, whatever the relay's latency, while a request "
                  "costs what it cost here; the ratio is that ceiling over the guest alone's measured rate, and the "
                  "last part says what 0.5x of it would take:", ""] + [f"- {b}" for b in bounds]
    notes = problem_notes(runs)
    busy = [r["cpus_busy_other"] for r in runs if r["cpus_busy_other"] > BUSY_WARNING]
    if busy:
        notes.append(f"Other work (not this benchmark) kept the machine busy during {len(busy)} of {len(runs)} "
                     f"runs: {statistics.median(busy):.2f} CPUs on average in the median such run, "
                     f"{max(busy):.2f} at most, of {info['nproc']}; per run in the JSON (`cpus_busy_other`).")
    if notes:
        lines += ["", "Problems seen:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def problem_notes(runs: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in runs:
        where = f"{r['guest']} {r['config']} (round {r['round'] + 1})"
        for p in r["problems"]:
            notes.append(f"{where}: {p}")
        if r["stderr_during_load"]:
            notes.append(f"{where}: during the load, the processes' stderr had {len(r['stderr_during_load'])} "
                         f"line(s) of trouble, first: `{r['stderr_during_load'][0].strip()[:200]}`")
        if r["stderr_at_stop"]:
            last = [x for x in r["stderr_at_stop"] if "Traceback" not in x][-1:] or r["stderr_at_stop"][-1:]
            notes.append(f"{where}: at the stop (after the measurement), stderr had "
                         f"{sum('Traceback' in x for x in r['stderr_at_stop'])} traceback(s), last error: "
                         f"`{last[0].strip()[:200]}`")
    return notes


def plot(summary: dict[str, Any], args: argparse.Namespace, info: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [("kvstore", "set", "#9ecae1", "kvstore SET (deterministic)"),
              ("kvstore", "get", "#2171b5", "kvstore GET (deterministic)"),
              ("noisy", "set", "#fdae6b", "noisy SET (deterministic +OK)"),
              ("noisy", "get", "#d94801", "noisy GET (differs between the VMs)")]
    x = np.arange(len(CONFIGS))
    w = 0.2
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    panels = [("ops_s", "ops_s_min", "ops_s_max", "client throughput (ops/s, log scale)"),
              ("p99_ms", "p99_ms_min", "p99_ms_max", "client latency: p99 bars, p50 ticks (ms, log scale)"),
              ("checkpoints_per_s", "checkpoints_per_s_min", "checkpoints_per_s_max",
               "checkpoints per second during the load (log scale)")]
    for ax, (key, lo_key, hi_key, title) in zip(axes, panels, strict=True):
        zeros = []
        for i, (guest, test, color, label) in enumerate(series):
            vals, lo, hi, p50 = [], [], [], []
            for cfg in CONFIGS:
                t = summary[f"{guest}/{cfg.name}"][test]
                v = t.get(key) if t["rounds"] else None
                if key == "checkpoints_per_s" and cfg.mode == "alone":
                    v = None
                vals.append(v if v else np.nan)
                lo.append(v - t[lo_key] if v else 0)
                hi.append(t[hi_key] - v if v else 0)
                p50.append(t["p50_ms"] if t["rounds"] else np.nan)
                if v == 0:
                    zeros.append(x[len(vals) - 1] + (i - 1.5) * w)
            pos = x + (i - 1.5) * w
            ax.bar(pos, vals, w, color=color, label=label, yerr=[lo, hi] if args.rounds > 1 else None,
                   error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444444"})
            if key == "p99_ms":
                ax.scatter(pos, p50, marker="_", s=90, color="black", linewidths=1.5, zorder=3,
                           label="p50" if i == 0 else None)
            for p, v, h in zip(pos, vals, hi, strict=True):
                if np.isfinite(v):  # above the whisker, if any
                    top = v + h if args.rounds > 1 else v
                    ax.annotate(fmt_ms(v) if key == "p99_ms" else fmt_rate(v), (p, top), xytext=(0, 4),
                                textcoords="offset points", ha="center", va="bottom", fontsize=6.5, rotation=90)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, [c.name.replace("periodic ", "periodic\n").replace(" sched=", "\nsched=")
                       .replace(" pin=", "\npin=") for c in CONFIGS],
                      fontsize=8.5)
        ax.grid(axis="y", which="major", alpha=0.3)
        ymin, ymax = ax.get_ylim()
        if key == "checkpoints_per_s":
            ymin = min(ymin, 0.1)
            for p in zeros:
                ax.annotate("0", (p, ymin), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
            ax.text(0, ymin * 3, "no\nreplication", ha="center", va="bottom", fontsize=8, color="#666666")
        ax.set_ylim(ymin, ymax * 4)  # room for the labels above the bars
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8.5, frameon=False)
    fig.suptitle(f"COLO (hybrid) vs periodic checkpointing: redis-benchmark -c {args.clients} (one request at a "
                 f"time per connection), median of {args.rounds} round{'s' if args.rounds > 1 else ''}"
                 f"{' (whiskers: min-max)' if args.rounds > 1 else ''}; {info['nproc']} CPUs, {info['date']}",
                 fontsize=10.5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# machine and source

def source_info() -> str:
    """The commit measured and the uncommitted files of colo/ and toyvm/ (the tree may be edited meanwhile)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "colo", "toyvm"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return (head or "unknown") + (f" + uncommitted {', '.join(changed)}" if changed else "")


def machine_info(hooks: str) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        rb = subprocess.run(["redis-benchmark", "--version"], capture_output=True, text=True,
                            timeout=10).stdout.split()
        rb_version = " ".join(rb[:2]) if rb else "redis-benchmark ?"
    except (OSError, subprocess.SubprocessError):
        rb_version = "redis-benchmark ?"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "unicorn": unicorn.__version__, "redis_benchmark": rb_version, "platform": platform.platform(),
            "hooks": hooks, "source": source_info(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def resolve_hooks(requested: str | None) -> str:
    """The hook engine toyvm would pick, passed explicitly to every process so all configurations agree."""
    from toyvm import native
    if requested in ("python", "native"):
        return requested
    env = os.environ.get("TOYVM_HOOKS", "auto").lower()
    if env in ("python", "native"):
        return env
    return "native" if native.load() is not None else "python"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Client throughput, latency and checkpoint rate of kvstore "
                                             "(deterministic) and noisy (divergent) alone, under periodic "
                                             "checkpointing at 20/50/100 ms and in hybrid (COLO) mode. "
                                             "Prints Markdown.")
    ap.add_argument("--quick", action="store_true", help="smoke run: ~0.5 s of load per operation, 1 round, "
                                                         "no plot unless --plot is given")
    ap.add_argument("--rounds", type=positive_int, default=None, metavar="R", help="interleaved rounds (default 3; 1 "
                                                                           "with --quick)")
    ap.add_argument("--seconds", type=positive_float, default=None, metavar="S",
                    help="load per operation (SET, GET) per configuration, in seconds (default 6; 0.5 with "
                         "--quick)")
    ap.add_argument("--clients", type=positive_int, default=10, metavar="C", help="redis-benchmark -c (default 10)")
    ap.add_argument("--warmup", type=positive_int, default=None, metavar="K",
                    help="warm-up requests per client before each measured run (default 5; 2 with --quick)")
    ap.add_argument("--json", metavar="FILE", help="also write every run's raw results to FILE")
    ap.add_argument("--plot", metavar="FILE", help=f"write the PNG here (default {DEFAULT_PLOT.relative_to(ROOT)};"
                                                   " none with --quick)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    ap.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                    help="toyvm hook engine for every VM (default: toyvm's choice)")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: print the table and draw the plot from "
                                                         "an earlier run's --json FILE")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (stats, process logs)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.seconds = args.seconds or (0.5 if args.quick else 6.0)
    args.warmup = args.warmup or (2 if args.quick else 5)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    plot_path = None if args.no_plot else Path(args.plot) if args.plot else None if args.quick else DEFAULT_PLOT
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("colo_vs_periodic: matplotlib is missing (pip install -e '.[bench]'): no plot")
            plot_path = None

    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        for name in ("rounds", "clients", "seconds", "quick"):
            setattr(args, name, doc["args"][name])
        print(markdown(doc["machine"], args, doc["summary"], doc["runs"]))
        if plot_path is not None:
            plot(doc["summary"], args, doc["machine"], plot_path)
            log(f"plot: {plot_path}")
        return 0

    if shutil.which("redis-benchmark") is None:
        print("colo_vs_periodic: redis-benchmark not found (Debian: apt-get install redis-tools)", file=sys.stderr)
        return 2
    missing = [str(p) for p in GUESTS.values() if not p.exists()]
    if missing:
        print(f"colo_vs_periodic: missing guests {', '.join(missing)} (make guests)", file=sys.stderr)
        return 2
    hooks = resolve_hooks(args.hooks)
    info = machine_info(hooks)
    workdir = Path(tempfile.mkdtemp(prefix="colo-vs-periodic-"))
    runner = Runner(args, hooks, workdir, log)
    combos = [(g, c) for c in CONFIGS for g in GUESTS]
    runs: list[dict[str, Any]] = []
    t_all = time.monotonic()
    try:
        for rnd in range(args.rounds):
            k = (rnd * 3) % len(combos)  # rotate the order from round to round
            for guest, cfg in combos[k:] + combos[:k]:
                r = runner.run(rnd, guest, cfg)
                runs.append(r)
                parts = []
                for test in TESTS:
                    t = r["tests"].get(test, {})
                    if "ops_s" in t:
                        parts.append(f"{test.upper()} {t['ops_s']:,.0f} ops/s p99 {t['p99_ms']:.1f} ms "
                                     f"n={t['n']} {t['wall_s']:.1f}s ckpt {sum(t['checkpoints'].values())}")
                    else:
                        parts.append(f"{test.upper()} error")
                log(f"  round {rnd + 1}/{args.rounds} {guest:<7} {cfg.name:<15} " + "; ".join(parts)
                    + (f"  [problems: {'; '.join(r['problems'])}]" if r["problems"] else ""))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"working folder kept: {workdir}")
    info["total_s"] = round(time.monotonic() - t_all, 1)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    summary = summarize(runs)
    print(markdown(info, args, summary, runs))
    if plot_path is not None:
        plot(summary, args, info, plot_path)
        log(f"plot: {plot_path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "summary": summary,
                                               "runs": runs}, indent=1, sort_keys=True, default=str))
    log(f"total {info['total_s']:.0f} s")
    failed = [k for k, s in summary.items() if any(not s[t]["rounds"] for t in TESTS)]
    if failed:
        print(f"colo_vs_periodic: no result for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
