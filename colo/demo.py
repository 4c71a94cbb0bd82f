"""`colo demo` (`make demo`): the key-value guest, replicated, survives a SIGKILLed primary without losing a write.

It starts the gateway, the secondary and the primary as three local processes (LocalCluster) running
guests/kvstore.bin, lets a few clients write to it over TCP while it is checkpointed every 100 ms, kills the
primary with SIGKILL part-way through, shows the gateway promoting the secondary, and then reads back every
write that was acknowledged. It exits 0 only if every acknowledged write is still there.

The clients speak the Redis protocol (RESP) directly over one persistent socket each: the point is that their
TCP connections, which the gateway owns, survive the failover.
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colo.cli import LocalCluster
from colo.errors import ColoError
from colo.stats import read_records

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "guests" / "kvstore.bin"
INTERVAL_MS = 100.0
KILL_AT = 0.4  # kill the primary this far into the workload
TICK = 0.5  # seconds between live lines
REPLY_TIMEOUT = 10.0  # a reply may wait for a failover; nothing waits longer than this
READBACK_BATCH = 256


def say(text: str = "") -> None:
    print(text, flush=True)


# -- a tiny Redis client ----------------------------------------------------------------------------------------
class RespError(Exception):
    """The server answered with an error reply, or something that is not RESP."""


class Resp:
    """One TCP connection speaking RESP2: commands out as arrays of bulk strings, replies parsed one by one."""

    def __init__(self, address: tuple[str, int], timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    @staticmethod
    def encode(*args: str | bytes) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def send(self, *commands: bytes) -> None:
        self.sock.sendall(b"".join(commands))

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            self._fill()

    def reply(self) -> bytes | int | None:
        """The next reply: simple strings and bulk strings as bytes, integers as int, a nil bulk as None."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data
        raise RespError(f"unexpected reply {line[:40]!r}")

    def call(self, *args: str | bytes) -> bytes | int | None:
        self.send(self.encode(*args))
        return self.reply()

    def close(self) -> None:
        self.sock.close()


# -- the workload ---------------------------------------------------------------------------------------------
@dataclass
class Writer:
    """One client: its own connection, its own keys, and the ledger of what the server acknowledged."""
    cid: int
    address: tuple[str, int]
    stop: threading.Event
    uses_counter: bool
    ledger: list[tuple[str, str]] = field(default_factory=list)  # (key, value), appended only on "+OK"
    acks: list[tuple[float, float]] = field(default_factory=list)  # (sent, acknowledged), monotonic
    counter_key: str = ""
    counter_last: int | None = None  # the last value INCR returned
    counter_acks: int = 0
    counter_unacked: int = 0  # INCRs sent whose reply never came (a broken connection): may have happened
    broken: int = 0  # connections that broke and were reopened
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counter_key = f"demo:counter:{self.cid}"

    def run(self) -> None:
        tag = secrets.token_hex(3)  # a fresh value each run: a stale copy of an old run cannot pass the check
        conn: Resp | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = Resp(self.address)
                n += 1
                key, value = f"demo:c{self.cid}:{n}", f"{tag}-{self.cid}-{n}"
                sent = time.monotonic()
                if conn.call("SET", key, value) == b"OK":
                    self.ledger.append((key, value))
                    self.acks.append((sent, time.monotonic()))
                if self.uses_counter and n % 2 == 0:
                    sent = time.monotonic()
                    self.counter_unacked += 1
                    got = conn.call("INCR", self.counter_key)
                    self.counter_unacked -= 1
                    if isinstance(got, int):
                        self.counter_last = got
                        self.counter_acks += 1
                        self.acks.append((sent, time.monotonic()))
            except (OSError, ConnectionError, RespError) as e:  # socket.timeout is an OSError
                self.broken += 1
                self.errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
        if conn is not None:
            conn.close()


# -- status helpers -------------------------------------------------------------------------------------------
def active_role(info: dict[str, Any]) -> str:
    for role in ("primary", "secondary"):
        if info["nodes"].get(role, {}).get("active"):
            return role + ("" if info["gateway"].get("protected") else " (unprotected)")
    return "none (failing over)"


def find_event(info: dict[str, Any], name: str, role: str | None = None) -> dict[str, Any] | None:
    for ev in info.get("events", []):
        if ev.get("event") == name and (role is None or ev.get("role") == role):
            return ev
    return None


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def describe_code(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


# -- read-back --------------------------------------------------------------------------------------------------
def read_back(address: tuple[str, int], writers: list[Writer]) -> tuple[int, int, list[str]]:
    """GET every acknowledged key (pipelined) and every counter; returns (checked, lost or wrong, examples)."""
    conn = Resp(address)
    checked = bad = 0
    examples: list[str] = []
    try:
        entries = [kv for w in writers for kv in w.ledger]
        for lo in range(0, len(entries), READBACK_BATCH):
            batch = entries[lo:lo + READBACK_BATCH]
            conn.send(*(Resp.encode("GET", k) for k, _ in batch))
            for key, want in batch:
                got = conn.reply()
                checked += 1
                if got != want.encode():
                    bad += 1
                    if len(examples) < 5:
                        examples.append(f"{key}: wanted {want!r}, got {got!r}")
        for w in writers:
            if w.counter_last is None:
                continue
            got = conn.call("GET", w.counter_key)
            checked += 1
            value = int(got) if isinstance(got, bytes) and got.lstrip(b"-").isdigit() else None
            # An INCR whose reply was lost with a broken connection may or may not have happened.
            if value is None or not w.counter_last <= value <= w.counter_last + w.counter_unacked:
                bad += 1
                if len(examples) < 5:
                    examples.append(f"{w.counter_key}: last INCR returned {w.counter_last}, GET gives {got!r}")
    finally:
        conn.close()
    return checked, bad, examples


def redis_cli_get(port: int, key: str) -> None:
    if shutil.which("redis-cli") is None:
        return
    say(f"  the same through the real redis-cli:  $ redis-cli -p {port} GET {key}")
    try:
        p = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "GET", key], capture_output=True,
                           text=True, timeout=10)
        say(f"  {(p.stdout + p.stderr).strip()}")
    except subprocess.TimeoutExpired:
        say("  (no reply within 10 s)")


# -- the demo ---------------------------------------------------------------------------------------------------
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
    stats_path = work / "checkpoints.jsonl"
    logs_path = work / "roles.log"

    say("=" * 78)
    say("colo demo: a replicated key-value store survives the loss of its primary")
    say("=" * 78)
    say(f"guests/kvstore.bin, a Redis-compatible server, runs inside a toyvm VM on a *primary* process. Every")
    say(f"{INTERVAL_MS:.0f} ms the primary pauses the VM and sends what changed to a *secondary* process; a reply")
    say("reaches a client only once the secondary holds the state that produced it. A *gateway* process owns")
    say("the clients' TCP connections. We write to the store, kill the primary with SIGKILL mid-run, and")
    say("then read back every write the store acknowledged.")
    say()

    cluster = LocalCluster(str(IMAGE), interval_ms=INTERVAL_MS, stats=str(stats_path), directory=work / "run")
    logs = open(logs_path, "wb")
    codes: dict[str, int | None] = {}
    try:
        say(f"Starting three local processes (logs and checkpoint records in {work}):")
        # The roles' stderr (their logs) and stdout (the guest's serial console) go to a file, not over our
        # narration: children inherit fd 1, so point it at the file while they start.
        sys.stdout.flush()
        saved_stdout = os.dup(1)
        os.dup2(logs.fileno(), 1)
        try:
            cluster.start(stderr=logs)
        finally:
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
        host, port = cluster.service_address
        pids = {role: p.pid for role, p in cluster.procs.items()}
        say(f"  gateway    pid {pids['gateway']:<7} clients connect to {host}:{port}")
        say(f"  secondary  pid {pids['secondary']:<7} waits for the primary on %s:%d" % cluster.secondary_address)
        say(f"  primary    pid {pids['primary']:<7} boots the guest and copies the whole VM to the secondary")
        info = cluster.wait_protected()
        say(f"  protected: the secondary has the whole VM ({time.monotonic() - started:.1f} s after start); "
            f"from now on only changes travel")
        say()

        stop = threading.Event()
        writers = [Writer(i + 1, cluster.service_address, stop, uses_counter=(i % 2 == 1)) for i in range(nclients)]
        counters = sum(w.uses_counter for w in writers)
        say(f"Workload: {nclients} clients, one TCP connection each, for {seconds:g} s. Each SETs keys of its own "
            f"(demo:c<client>:<n>)")
        say(f"and {counters} of them also INCR a counter of their own. A write is *acknowledged* when its reply "
            "arrives;")
        say("only then does it go into the ledger we check at the end.")
        threads = [threading.Thread(target=w.run, name=f"client-{w.cid}", daemon=True) for w in writers]
        t0 = time.monotonic()
        for t in threads:
            t.start()

        kill_at = t0 + KILL_AT * seconds
        killed_at: float | None = None
        killed_wall = 0.0
        promoted: dict[str, Any] | None = None
        checkpoints = info["nodes"]["primary"].get("checkpoints", 0)
        next_line = t0 + TICK
        while True:
            now = time.monotonic()
            if now >= t0 + seconds:
                break
            if killed_at is None and now >= kill_at:
                pid = cluster.procs["primary"].pid
                killed_wall, killed_at = time.time(), time.monotonic()
                cluster.kill("primary")
                say(f"  {now - t0:5.1f} s  killing the primary (pid {pid}) with SIGKILL")
            if killed_at is not None and promoted is None or now >= next_line:
                info = cluster.status()
                checkpoints = info["nodes"]["primary"].get("checkpoints", checkpoints)
                if killed_at is not None and promoted is None:
                    promoted = find_event(info, "promoted", "secondary")
                    if promoted is not None:
                        lost = find_event(info, "lost", "primary")
                        seen = (f"the gateway lost the primary ({lost['reason']}) "
                                f"{(lost['time'] - killed_wall) * 1e3:.0f} ms after the kill and promoted the"
                                if lost else "the gateway promoted the")
                        say(f"  {time.monotonic() - t0:5.1f} s  failover: {seen} secondary,")
                        say(f"           which resumed from checkpoint {promoted.get('epoch')} in "
                            f"{promoted.get('failover_ms')} ms; the {promoted.get('replayed')} client inputs "
                            "that came after")
                        say("           that checkpoint were replayed to it. From now on it serves alone "
                            "(unprotected), so")
                        say("           replies no longer wait for a checkpoint and come much faster.")
                if now >= next_line:
                    acked = sum(len(w.acks) for w in writers)
                    say(f"  {now - t0:5.1f} s  writes acknowledged {acked:6d}   checkpoints {checkpoints:5d}   "
                        f"active: {active_role(info)}")
                    next_line += TICK * max(1, math.ceil((time.monotonic() - next_line) / TICK))
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(REPLY_TIMEOUT + 1)
        stuck = sum(t.is_alive() for t in threads)
        acked = sum(len(w.ledger) for w in writers)
        incrs = sum(1 for w in writers if w.counter_last is not None)
        incr_acks = sum(w.counter_acks for w in writers)
        broken = sum(w.broken for w in writers)
        say(f"  {time.monotonic() - t0:5.1f} s  workload stopped: {acked + incr_acks} writes acknowledged, "
            f"{broken} connections broken")
        if promoted is None:  # the run ended first: one last look
            promoted = find_event(cluster.status(), "promoted", "secondary")
        say()

        # Client-visible downtime: the longest stretch with no acknowledged write, from just before the kill.
        acks = sorted(a for w in writers for _, a in w.acks)
        gap_ms = usual_ms = 0.0
        in_flight = 0
        if killed_at is not None:
            window = [a for a in acks if a >= killed_at - 1.0]
            gap_ms = max((b - a for a, b in zip(window, window[1:])), default=0.0) * 1e3
            before = [a for a in acks if t0 + 1.0 <= a < killed_at - 0.2]
            usual_ms = max((b - a for a, b in zip(before, before[1:])), default=0.0) * 1e3
            in_flight = sum(1 for w in writers for s, a in w.acks if s < killed_at < a)

        say(f"Reading back all {acked} acknowledged SETs (pipelined GETs) and {incrs} counters from the "
            "survivor:")
        checked, bad, examples = read_back(cluster.service_address, writers)
        say(f"  {checked} values checked, {bad} lost or wrong")
        for e in examples:
            say(f"    {e}")
        if killed_at is not None:
            before = [(a, k) for w in writers for (_, a), k in zip(w.acks, w.ledger) if a < killed_at]
            if before:
                key = max(before)[1][0]
                redis_cli_get(port, key)
                say(f"  ({key} was one of the last writes acknowledged before the kill)")
        say()

        recs = read_records(stats_path) if stats_path.exists() else []
        pauses = [r["pause_ms"] for r in recs]
        sizes = [r["bytes_wire"] for r in recs]
        say("Summary")
        rows: list[tuple[str, str]] = [
            ("checkpoints taken", f"{len(recs)} (every {INTERVAL_MS:.0f} ms while the primary lived)"),
        ]
        if recs:
            rows += [("checkpoint pause", f"median {statistics.median(pauses):.1f} ms, p99 "
                                          f"{percentile(pauses, 99):.1f} ms (the VM is stopped meanwhile)"),
                     ("bytes per checkpoint", f"median {statistics.median(sizes) / 1024:.1f} KiB on the wire "
                                              f"(dirty pages, lz4)")]
        rows += [
            ("failover", f"{promoted['failover_ms']} ms in the gateway (promote to promoted), "
                         f"{promoted['replayed']} inputs replayed" if promoted else "did NOT happen"),
            ("client-visible gap", f"{gap_ms:.0f} ms with no write acknowledged around the kill (before it: "
                                   f"up to {usual_ms:.0f} ms,"),
            ("", "as replies are released once per checkpoint); "
                 f"{in_flight} writes in flight at the kill were answered"),
            ("writes acknowledged", f"{acked + incr_acks} ({acked} SETs, {incr_acks} INCRs on {incrs} counters)"),
            ("writes lost", f"{bad}"),
            ("connections broken", f"{broken}" + (" (clients keep their TCP connections across the failover)"
                                                  if broken == 0 else "  <-- should be 0")),
        ]
        for name, value in rows:
            say(f"  {name:<22} {value}")
    except (ColoError, OSError) as e:
        say(f"colo demo: error: {e}")
        say(f"  the roles' logs are in {logs_path}")
        promoted, acked, bad, broken, stuck = None, 0, 1, 0, 0
    finally:
        codes = cluster.stop()
        logs.close()
    say(f"  stopped: " + ", ".join(f"{role} {describe_code(c)}" for role, c in codes.items())
        + (" (the primary was the one we killed)" if codes.get("primary") == -signal.SIGKILL else ""))
    say(f"  whole demo took {time.monotonic() - started:.1f} s")

    problems = []
    if promoted is None:
        problems.append("the secondary was never promoted")
    if acked == 0:
        problems.append("no write was acknowledged")
    if bad:
        problems.append(f"{bad} acknowledged writes were lost or wrong")
    if broken:
        problems.append(f"{broken} client connections broke")
    if stuck:
        problems.append(f"{stuck} clients never finished")
    if problems:
        say(f"colo demo: FAILED: {'; '.join(problems)} (the roles' logs: {logs_path})")
        return 1
    say("colo demo: OK: the primary was killed, the secondary took over, and no acknowledged write was lost")
    return 0
