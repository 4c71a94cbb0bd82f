"""`colo demo` (`make demo`): the key-value guest, replicated, survives a SIGKILLed primary without losing a write.

It starts the gateway, the secondary and the primary as three local processes (LocalCluster) running
guests/kvstore.bin checkpointed every 100 ms, lets a few clients write to it over TCP, kills the primary with
SIGKILL part-way through, shows the gateway promoting the secondary, and then reads back every write that was
acknowledged. It exits 0 only if the secondary took over and every acknowledged write is still there (and no
client lost its connection).

The clients speak the Redis protocol (RESP) directly, over one persistent socket each: the point is that their
TCP connections, which the gateway owns, outlive the primary.
"""
from __future__ import annotations

import argparse
import itertools
import math
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colo.cluster import LocalCluster
from colo.errors import ColoError
from colo.resp import Resp, RespError
from colo.stats import read_records
from toyvm.guests import bundled

ROOT = Path(__file__).resolve().parent.parent  # the repository: colo/ sits at its top
IMAGE = bundled("kvstore")  # the package's copy, so the demo also runs from an installed wheel
INTERVAL_MS = 100.0
KILL_AT = 0.4  # kill the primary this far into the workload
TICK = 0.5  # seconds between live lines
REPLY_TIMEOUT = 10.0  # a reply may wait for a failover, but never longer than this
READBACK_BATCH = 256  # GETs per pipelined batch
INDENT = " " * 11  # continuation lines under "  12.3 s  "
WIDTH = 104


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the workload ---------------------------------------------------------------------------------------------
@dataclass
class Ack:
    key: str
    value: str
    sent: float  # time.monotonic()
    acked: float


@dataclass
class Writer:
    """One client: its own connection and keys, and the ledger of the writes the server acknowledged."""
    cid: int
    address: tuple[str, int]
    stop: threading.Event
    uses_counter: bool
    ledger: list[Ack] = field(default_factory=list)  # SETs answered +OK, in order
    incr_acks: list[tuple[float, float]] = field(default_factory=list)  # (sent, acked) of each answered INCR
    counter_last: int | None = None  # what the last answered INCR returned
    counter_unanswered: int = 0  # INCRs lost with a broken connection: they may or may not have happened
    broken: int = 0  # connections that broke (and were reopened)
    errors: list[str] = field(default_factory=list)

    @property
    def counter_key(self) -> str:
        return f"demo:counter:{self.cid}"

    def run(self) -> None:
        tag = secrets.token_hex(3)  # fresh values each run: a leftover of another run cannot pass the check
        conn: Resp | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = Resp(self.address, timeout=REPLY_TIMEOUT)
                n += 1
                key, value = f"demo:c{self.cid}:{n}", f"{tag}-{self.cid}-{n}"
                sent = time.monotonic()
                if conn.call("SET", key, value) == "OK":
                    self.ledger.append(Ack(key, value, sent, time.monotonic()))
                if self.uses_counter and n % 2 == 0:
                    sent = time.monotonic()
                    self.counter_unanswered += 1
                    got = conn.call("INCR", self.counter_key)
                    self.counter_unanswered -= 1
                    if isinstance(got, int):
                        self.counter_last = got
                        self.incr_acks.append((sent, time.monotonic()))
            except RespError as e:
                self.errors.append(f"error reply: {e}")
            except OSError as e:  # ConnectionError and socket.timeout are OSErrors
                self.broken += 1
                self.errors.append(f"connection broke: {type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
        if conn is not None:
            conn.close()

    def ack_times(self) -> list[tuple[float, float]]:
        return [(a.sent, a.acked) for a in self.ledger] + self.incr_acks


def read_back(address: tuple[str, int], writers: list[Writer]) -> tuple[int, int, list[str]]:
    """GET every acknowledged key (pipelined) and every counter: (values checked, lost or wrong, examples)."""
    conn = Resp(address, timeout=REPLY_TIMEOUT)
    checked = bad = 0
    examples: list[str] = []

    def wrong(text: str) -> None:
        nonlocal bad
        bad += 1
        if len(examples) < 5:
            examples.append(text)

    try:
        entries = [a for w in writers for a in w.ledger]
        for lo in range(0, len(entries), READBACK_BATCH):
            batch = entries[lo:lo + READBACK_BATCH]
            conn.send(*(Resp.encode("GET", a.key) for a in batch))
            for a in batch:
                got = conn.reply()
                checked += 1
                if got != a.value.encode():
                    wrong(f"{a.key}: acknowledged {a.value!r}, now {got!r}")
        for w in writers:
            if w.counter_last is None:
                continue
            got = conn.call("GET", w.counter_key)
            checked += 1
            value = int(got) if isinstance(got, bytes) and got.isdigit() else None
            # Each client is its counter's only writer and has stopped: the value is its last INCR's reply.
            if value is None or not w.counter_last <= value <= w.counter_last + w.counter_unanswered:
                wrong(f"{w.counter_key}: the last INCR returned {w.counter_last}, GET gives {got!r}")
    finally:
        conn.close()
    return checked, bad, examples


# -- helpers -----------------------------------------------------------------------------------------------------
def active_role(info: dict[str, Any], ids: dict[str, str]) -> str:
    """Which process serves: roles are modes, so after a failover the process started as the secondary is the
    primary (of a new generation)."""
    act = info["nodes"].get("primary", {})
    if not act.get("active"):
        return "none (failing over)"
    name = "primary" if act.get("id") == ids.get("primary") else "the former secondary"
    if act.get("id") != ids.get("primary"):
        name += f" (generation {act.get('generation')})"
    return name + ("" if info["gateway"].get("protected") else ", unprotected")


def find_event(info: dict[str, Any], name: str, node: str) -> dict[str, Any] | None:
    for ev in info.get("events", []):
        if ev.get("event") == name and ev.get("node") == node:
            return ev
    return None


def longest_gap_ms(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1e3


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def describe_code(role: str, code: int | None) -> str:
    if code == -signal.SIGKILL and role == "primary":
        return f"{code} (SIGKILL: the one we killed)"
    if code == 3:  # colo.node.GatewayLost: a node cut off from the gateway stops serving
        return "3 (it lost the gateway)"
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name}" + (", ours)" if code == -signal.SIGTERM else ")")
        except ValueError:
            pass
    return str(code)


def redis_cli_get(port: int, key: str) -> None:
    """Optional: the same read through the real redis-cli, when Debian's redis-tools is installed."""
    if shutil.which("redis-cli") is None:
        return
    say(f"  $ redis-cli -p {port} GET {key}")
    try:
        p = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "GET", key], capture_output=True,
                           text=True, timeout=10)
        say(f"  {(p.stdout + p.stderr).strip()}")
    except subprocess.TimeoutExpired:
        say("  (no reply within 10 s)")


# -- the demo ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What happened, for the summary and the verdict."""
    writers: list[Writer] = field(default_factory=list)
    t0: float = 0.0
    killed_at: float | None = None
    detect_ms: float | None = None  # from the kill to the gateway noticing
    promoted: dict[str, Any] | None = None
    stuck: int = 0
    checked: int = 0
    bad: int = 0

    @property
    def sets(self) -> int:
        return sum(len(w.ledger) for w in self.writers)

    @property
    def incrs(self) -> int:
        return sum(len(w.incr_acks) for w in self.writers)

    @property
    def broken(self) -> int:
        return sum(w.broken for w in self.writers)


def start(cluster: LocalCluster, logs: Any, started: float) -> dict[str, Any]:
    # The roles' stderr (their logs) and stdout (the guest's serial console) go to the log file, not into
    # this narration.
    cluster.start(stderr=logs, stdout=logs)
    host, port = cluster.service_address
    pids = {role: p.pid for role, p in cluster.procs.items()}
    say(f"  gateway    pid {pids['gateway']:<7}  owns the clients' connections: they connect to {host}:{port}")
    say(f"  secondary  pid {pids['secondary']:<7}  waits for the primary on %s:%d" % cluster.secondary_address)
    say(f"  primary    pid {pids['primary']:<7}  boots the guest and copies the whole VM to the secondary")
    info = cluster.wait_protected()
    info["ids"] = {role: cluster.node_id(role) for role in ("primary", "secondary")}
    say(f"  protected: the secondary has the whole VM ({time.monotonic() - started:.1f} s after start); from now "
        "on only changes travel")
    return info


def workload(cluster: LocalCluster, run: Run, seconds: float, nclients: int, info: dict[str, Any]) -> None:
    stop = threading.Event()
    run.writers = [Writer(i + 1, cluster.service_address, stop, uses_counter=i % 2 == 1) for i in range(nclients)]
    counters = sum(w.uses_counter for w in run.writers)
    say(f"Workload: {nclients} clients, one TCP connection each, for {seconds:g} s. Each SETs keys of its own "
        "(demo:c<client>:<n>),")
    say(f"{counters} of them also INCR a counter of their own. A write is *acknowledged* when its reply arrives;")
    say("only then does it go into the ledger that is checked at the end.")
    threads = [threading.Thread(target=w.run, name=f"client-{w.cid}", daemon=True) for w in run.writers]
    run.t0 = t0 = time.monotonic()
    for t in threads:
        t.start()

    killed_wall = 0.0
    ids = info["ids"]
    checkpoints = info["nodes"]["primary"].get("checkpoints", 0)
    next_line = t0 + TICK
    while (now := time.monotonic()) < t0 + seconds:
        if run.killed_at is None and now >= t0 + KILL_AT * seconds:
            pid = cluster.procs["primary"].pid
            killed_wall, run.killed_at = time.time(), time.monotonic()
            cluster.kill("primary")
            say(f"  {now - t0:5.1f} s  killing the primary (pid {pid}) with SIGKILL")
        failing_over = run.killed_at is not None and run.promoted is None
        if failing_over or now >= next_line:
            info = cluster.status()
            if info["nodes"]["primary"].get("id") == ids["primary"]:
                checkpoints = info["nodes"]["primary"].get("checkpoints", checkpoints)
        if failing_over and (promoted := find_event(info, "promoted", ids["secondary"])) is not None:
            run.promoted = promoted
            lost = find_event(info, "lost", ids["primary"])
            if lost is not None:
                run.detect_ms = max(0.0, (lost["time"] - killed_wall) * 1e3)
                seen = (f"the gateway lost the primary ({lost['reason']}) {run.detect_ms:.0f} ms after the kill "
                        "and promoted")
            else:
                seen = "the gateway promoted"
            text = (f"failover: {seen} the secondary, which resumed from checkpoint {promoted['epoch']} in "
                    f"{promoted['failover_ms']} ms as the primary of generation {promoted['generation']}; the "
                    f"{promoted['replayed']} client inputs that came after that checkpoint were replayed to it. "
                    "It now serves alone (unprotected): replies no longer wait for a checkpoint, so they come "
                    "much faster.")
            say(textwrap.fill(text, WIDTH, initial_indent=f"  {time.monotonic() - t0:5.1f} s  ",
                              subsequent_indent=INDENT))
        if now >= next_line:
            acked = sum(len(w.ledger) + len(w.incr_acks) for w in run.writers)
            say(f"  {now - t0:5.1f} s  writes acknowledged {acked:6d}   checkpoints {checkpoints:4d}   "
                f"active: {active_role(info, ids)}")
            next_line += TICK * max(1, math.ceil((time.monotonic() - next_line) / TICK))
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(REPLY_TIMEOUT + 1)
    run.stuck = sum(t.is_alive() for t in threads)
    say(f"  {time.monotonic() - t0:5.1f} s  workload stopped: {run.sets + run.incrs} writes acknowledged, "
        f"{run.broken} connections broken")
    for w in run.writers:
        for e in w.errors[:3]:
            say(f"{INDENT}client {w.cid}: {e}")
    if run.promoted is None and run.killed_at is not None:  # the run ended first: one last look
        run.promoted = find_event(cluster.status(), "promoted", ids["secondary"])


def check(cluster: LocalCluster, run: Run) -> None:
    counters = sum(1 for w in run.writers if w.counter_last is not None)
    say(f"Reading back all {run.sets} acknowledged SETs (pipelined GETs) and {counters} counters from the "
        "survivor:")
    run.checked, run.bad, examples = read_back(cluster.service_address, run.writers)
    say(f"  {run.checked} values checked, {run.bad} lost or wrong")
    for e in examples:
        say(f"    {e}")
    if run.killed_at is not None:
        before = [a for w in run.writers for a in w.ledger if a.acked < run.killed_at]
        if before and shutil.which("redis-cli"):
            last = max(before, key=lambda a: a.acked)
            say(f"  {last.key} was the last write acknowledged before the kill; through the real redis-cli:")
            redis_cli_get(cluster.service_address[1], last.key)


def summary(run: Run, stats_path: Path) -> None:
    recs = read_records(stats_path) if stats_path.exists() else []
    pauses = [r["pause_ms"] for r in recs]
    sizes = [r["bytes_wire"] for r in recs]
    rows = [("checkpoints taken", f"{len(recs)} (one every {INTERVAL_MS:.0f} ms while the primary lived)")]
    if recs:
        rows += [("checkpoint pause", f"median {statistics.median(pauses):.1f} ms, p99 {percentile(pauses, 99):.1f} ms"
                                      " (the VM stands still meanwhile)"),
                 ("bytes per checkpoint", f"median {statistics.median(sizes) / 1024:.1f} KiB on the wire "
                                          "(dirty pages, lz4)")]
    p = run.promoted
    if p is None:
        rows.append(("failover", "did NOT happen"))
    else:
        rows.append(("failover", f"{p['failover_ms']} ms in the gateway to promote the secondary, {p['replayed']} "
                                 "inputs replayed"))
        if run.detect_ms is not None:
            rows.append(("", f"(after {run.detect_ms:.0f} ms to notice that the primary was gone)"))
    if run.killed_at is not None:
        acks = sorted(a for w in run.writers for _, a in w.ack_times())
        gap = longest_gap_ms([a for a in acks if a >= run.killed_at - 1.0])
        usual = longest_gap_ms([a for a in acks if run.t0 + 1.0 <= a < run.killed_at - 0.2])
        in_flight = sum(1 for w in run.writers for s, a in w.ack_times() if s < run.killed_at < a)
        rows += [("client-visible gap", f"{gap:.0f} ms with no write acknowledged around the kill (up to "
                                        f"{usual:.0f} ms before it,"),
                 ("", f"as replies leave once per checkpoint); {in_flight} writes in flight at the kill were "
                      "answered")]
    before = "" if run.killed_at is None else \
        f", {sum(1 for w in run.writers for _, a in w.ack_times() if a < run.killed_at)} of them before the kill"
    rows += [("writes acknowledged", f"{run.sets + run.incrs} ({run.sets} SETs, {run.incrs} INCRs){before}"),
             ("writes lost", f"{run.bad}" + (" (every acknowledged value read back as written)" if not run.bad
                                             else "  <-- should be 0")),
             ("connections broken", f"{run.broken}" + (" (the clients' TCP connections outlived the primary)"
                                                       if not run.broken else "  <-- should be 0"))]
    say("Summary")
    for name, value in rows:
        say(f"  {name:<21} {value}")


def run_demo(args: argparse.Namespace) -> int:
    seconds = float(getattr(args, "seconds", 12.0))
    nclients = int(getattr(args, "clients", 8))
    if seconds <= 0 or nclients <= 0:
        print("colo demo: --seconds and --clients must be positive", file=sys.stderr)
        return 2
    if not IMAGE.exists():
        print(f"colo demo: {IMAGE} is not built: run `make guests` first", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="colo-demo-"))
    stats_path, logs_path = work / "checkpoints.jsonl", work / "roles.log"

    say("=" * 78)
    say("colo demo: a replicated key-value store survives the loss of its primary")
    say("=" * 78)
    say("guests/kvstore.bin, a Redis-compatible server, runs in a toyvm VM on a *primary* process. Every")
    say(f"{INTERVAL_MS:.0f} ms the primary pauses the VM and sends what changed to a *secondary* process, and a reply")
    say("reaches a client only once the secondary holds the state that produced it. A *gateway* process owns")
    say("the clients' TCP connections. Clients write to the store, the primary is killed with SIGKILL")
    say("mid-run, and then every write the store acknowledged is read back.")
    say()
    say("Starting three local processes (their logs and the checkpoint records go to")
    say(f"{work}, which is kept only if something fails):")
    cluster = LocalCluster(str(IMAGE), interval_ms=INTERVAL_MS, stats=str(stats_path), directory=work / "run")
    # The roles run in sessions of their own: on Ctrl-C or SIGTERM we stop them ourselves.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    run = Run()
    failed = ""
    with open(logs_path, "wb") as logs:
        try:
            info = start(cluster, logs, started)
            say()
            workload(cluster, run, seconds, nclients, info)
            say()
            check(cluster, run)
            say()
            summary(run, stats_path)
        except (ColoError, OSError) as e:
            failed = f"{type(e).__name__}: {e}"
            say(f"colo demo: error: {failed}")
        except KeyboardInterrupt:
            failed = "interrupted"
            say("\ncolo demo: interrupted")
        finally:
            codes = cluster.stop()
            signal.signal(signal.SIGTERM, previous)
    say("  stopped               " + ", ".join(f"{role} {describe_code(role, c)}" for role, c in codes.items()))
    say(f"  whole demo took       {time.monotonic() - started:.1f} s")

    problems = [failed] if failed else []
    if not failed:
        if run.promoted is None:
            problems.append("the secondary was never promoted")
        if run.sets + run.incrs == 0:
            problems.append("no write was acknowledged")
        if run.bad:
            problems.append(f"{run.bad} acknowledged writes were lost or wrong")
        if run.broken:
            problems.append(f"{run.broken} client connections broke")
        if run.stuck:
            problems.append(f"{run.stuck} clients never finished")
    if problems:
        say(f"colo demo: FAILED: {'; '.join(problems)}. The roles' logs: {logs_path}")
        return 1
    shutil.rmtree(work, ignore_errors=True)  # kept only when something went wrong
    say("colo demo: OK: the primary was killed, the secondary took over, and no acknowledged write was lost.")
    return 0
