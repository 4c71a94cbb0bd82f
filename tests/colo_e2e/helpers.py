"""Helpers for the end-to-end tests of colo: processes, status, state logs, Redis clients and a write ledger.

Everything here is bounded in time: every wait has a deadline and every socket a timeout, so a broken
replication layer makes a test fail, never hang.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from colo.auth import generate_key, load_key
from colo.cluster import ask_gateway
from colo.lifeline import Lifeline
from colo.messages import StatusReply, StatusRequest
from colo.session import SessionCodec
from conftest import ROOT

T = TypeVar("T")
HOST = "127.0.0.1"
START_TIMEOUT = 30.0


# -- waiting ---------------------------------------------------------------------------------------------------
def wait_for(pred: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05,
             context: Callable[[], str] | None = None) -> T:
    """Poll `pred` until it returns something truthy (returned) or fail the test after `timeout` seconds; the
    failure quotes `context()` (the roles' logs, say), read only then."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            got = pred()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - a transient failure of the probe: keep polling
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            if context is not None:
                extra += f":\n{context()}"
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}{extra}")
        time.sleep(interval)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COLO_FAULT", None)
    env.pop("COLO_STATE_LOG", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def status_of(gateway: tuple[str, int], key: bytes, timeout: float = 5.0, encrypt: bool = True) -> dict[str, Any]:
    """The gateway's status dict, asked over an authenticated control link (what `colo status` does)."""
    reply: StatusReply = ask_gateway(gateway, key, StatusRequest(), StatusReply, timeout, encrypt)
    return dict(reply.info)


def events_named(status: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in status.get("events", []) if e.get("event") == name]


def wait_active(status: Callable[[], dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
    """Until the gateway has chosen the node that serves ("active"). Clients must not connect before: a fresh
    gateway that has heard no primary within its learning grace (two heartbeat timeouts; a primary slow to start
    on a busy machine) says the service is down and refuses them at once, which is right for it and not what a
    test of a failover under load means to try."""
    return wait_for(lambda: st if events_named(st := status(), "active") else None, timeout,
                    "the gateway to choose the active node")


# -- processes -------------------------------------------------------------------------------------------------
class Procs:
    """The colo roles as local processes, each with its own stdout and stderr file, as `LocalCluster` starts them
    (`python -m colo ROLE ...`), but any subset of them, so a test can play a role itself. Like LocalCluster's, every
    role holds a lifeline to the test run (colo.lifeline): a pytest that is killed or times out leaves no role
    behind to disturb the next run's tests."""

    def __init__(self, directory: Path, *, heartbeat_timeout: float = 0.8, env: dict[str, dict[str, str]] | None = None,
                 key: bytes | None = None, mode: str = "periodic", common: tuple[str, ...] = ()) -> None:
        self.mode = mode
        self.common = common  # options every role gets (e.g. --no-encrypt)
        # Options every node gets, before a test's own. Hybrid: kvstore's replies match, so only the backstop
        # checkpoints, 2 s by default: waits for "protected, N checkpoints" would take N times that.
        self.node_common: tuple[str, ...] = ("--backstop", "200") if mode == "hybrid" else ()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key_file = self.dir / "key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key or generate_key())
        self.key = load_key(self.key_file)
        self.heartbeat_timeout = heartbeat_timeout
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[Any] = []
        self.gateway: tuple[str, int] = ("", 0)
        self.service: tuple[str, int] = ("", 0)
        self.secondary: tuple[str, int] = ("", 0)
        self._lifeline = Lifeline()

    def spawn(self, role: str, *args: str, command: str | None = None) -> subprocess.Popen[bytes]:
        """Start `python -m colo COMMAND ...` (COMMAND defaults to the role's name) with its own output files;
        a role name may be new ("gateway-2", "secondary-2"), the command is one of colo's."""
        out = open(self.dir / f"{role}.out", "ab")
        err = open(self.dir / f"{role}.err", "ab")
        self._files += [out, err]
        (self.dir / f"{role}.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "colo", command or role, *args, "--key-file", str(self.key_file),
               "--heartbeat-timeout", str(self.heartbeat_timeout), "--ready-file", str(self.dir / f"{role}.json"),
               "--mode", self.mode, *self.common]
        if not self._lifeline.open:  # stopped before and used again
            self._lifeline = Lifeline()
        cmd += self._lifeline.args()
        proc = subprocess.Popen(cmd, env=child_env(self.env.get(role)), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True, pass_fds=self._lifeline.pass_fds)
        self.procs[role] = proc
        return proc

    def wait_ready(self, role: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        path = self.dir / f"{role}.json"

        def ready() -> dict[str, Any] | None:
            if path.exists():
                return dict(json.loads(path.read_text()))
            if self.procs[role].poll() is not None:
                raise AssertionError(f"the {role} exited with {self.procs[role].returncode} while starting:\n"
                                     f"{self.stderr(role)}")
            return None
        return wait_for(ready, timeout, f"the {role} to start")

    def start_gateway(self, *extra: str, role: str = "gateway", listen: tuple[str, int] = (HOST, 0),
                      service: tuple[str, int] = (HOST, 0)) -> None:
        """A gateway (again on the same addresses, to play one restarted on its host)."""
        self.spawn(role, "--listen", "%s:%d" % listen, "--service", "%s:%d" % service, "--state-file",
                   str(self.dir / "gateway-state.json"), *extra, command="gateway")
        g = self.wait_ready(role)
        self.gateway, self.service = tuple(g["listen"]), tuple(g["service"])

    def start_secondary(self, role: str = "secondary", *, interval_ms: float = 30,
                        extra: tuple[str, ...] = ()) -> tuple[str, int]:
        """A node that registers with the gateway as a spare; the gateway pairs it with the primary."""
        self.spawn(role, "--gateway", "%s:%d" % self.gateway, "--listen", f"{HOST}:0", "--interval",
                   str(interval_ms), *self.node_common, *extra, command="secondary")
        address = tuple(self.wait_ready(role)["listen"])
        if role == "secondary":
            self.secondary = address
        return address

    def start_primary(self, guest: str | Path, *, ram: str = "16M", cmdline: str = "", interval_ms: float = 30,
                      extra: tuple[str, ...] = (), gateway: tuple[str, int] | None = None) -> None:
        """`gateway`: where the primary is told the gateway is (a relay in front of it, say)."""
        args = [str(guest), "--gateway", "%s:%d" % (gateway or self.gateway), "--ram", ram, "--cmdline", cmdline,
                "--interval", str(interval_ms), *self.node_common, *extra]
        self.spawn("primary", *args)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return status_of(self.gateway, self.key, timeout, encrypt="--no-encrypt" not in self.common)

    def cli_status(self, timeout: float = 20.0) -> dict[str, Any]:
        """`colo status --json` as an operator runs it, against this gateway."""
        r = subprocess.run([sys.executable, "-m", "colo", "status", "--json", "--gateway", "%s:%d" % self.gateway,
                            "--key-file", str(self.key_file)], cwd=ROOT, env=child_env(), capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"colo status failed ({r.returncode}): {r.stderr}"
        return dict(json.loads(r.stdout))

    def alive(self, role: str) -> bool:
        return self.procs[role].poll() is None

    def stdout(self, role: str) -> bytes:
        return (self.dir / f"{role}.out").read_bytes()

    def stderr(self, role: str) -> str:
        return (self.dir / f"{role}.err").read_text(errors="replace")

    def stop(self, timeout: float = 5.0) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for role, p in self.procs.items():
            try:
                codes[role] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[role] = p.wait(timeout)
        for f in self._files:
            f.close()
        self._files.clear()
        self._lifeline.close()
        return codes


# -- state logs (COLO_STATE_LOG) -------------------------------------------------------------------------------
def read_state_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def digest_of(entry: dict[str, Any]) -> tuple[str, str, str]:
    return entry["ram"], entry["cpu"], entry["devices"]


def by_epoch(entries: list[dict[str, Any]]) -> dict[Any, tuple[str, str, str]]:
    """epoch -> digest; fails if one epoch was logged twice with different digests."""
    out: dict[Any, tuple[str, str, str]] = {}
    for e in entries:
        d = digest_of(e)
        assert out.setdefault(e["epoch"], d) == d, f"epoch {e['epoch']} logged twice with different digests"
    return out


# -- the RESP client: colo's own (colo/resp.py), shared with `colo demo` ---------------------------------------
from colo.resp import Resp, RespError  # noqa: E402 - re-exported for the tests

__all__ = ["Resp", "RespError"]


def redis_cli(address: tuple[str, int], *args: str, timeout: float = 20.0) -> tuple[int, str]:
    """One `redis-cli` process, one command (a fresh connection each time); (exit code, stripped stdout)."""
    p = subprocess.run(["redis-cli", "-h", address[0], "-p", str(address[1]), *args], capture_output=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace").strip()


# -- the write workload and its ledger -------------------------------------------------------------------------
@dataclass
class ClientRecord:
    name: str
    persistent: bool
    sets: dict[str, str] = field(default_factory=dict)  # acknowledged SETs: key -> value
    incr_key: str = ""
    incr_replies: list[int] = field(default_factory=list)  # every INCR reply seen, in order
    incr_times: list[float] = field(default_factory=list)  # when each arrived (time.monotonic)
    unacked_incrs: int = 0  # INCRs sent whose reply never came (redis-cli clients only)
    unacked_after_last_ack: int = 0
    big: bool = False  # pipelines large incompressible SETs: checkpoints of several chunks
    errors: list[str] = field(default_factory=list)  # violations and broken connections
    soft_failures: list[str] = field(default_factory=list)  # redis-cli runs that got no reply
    conn: Resp | None = None


class Workload:
    """Client threads that keep writing through the gateway and record every write that got its reply.

    Persistent clients keep one TCP connection for the whole test (they must never need to reconnect) and
    alternate `SET <unique key> <unique value>` and `INCR <own counter>`: each INCR reply must be exactly the
    previous one plus 1 (nothing lost, nothing answered twice). redis-cli clients run one real `redis-cli`
    process per command (a new connection each time) and do the same.
    """

    def __init__(self, address: tuple[str, int], *, persistent: int = 2, cli: int = 2, big: int = 0,
                 tag: str = "") -> None:
        self.address = address
        self.tag = tag or uuid.uuid4().hex[:8]
        self.clients = [ClientRecord(f"p{i}", True) for i in range(persistent)] + \
            [ClientRecord(f"c{i}", False) for i in range(cli)] + \
            [ClientRecord(f"b{i}", True, big=True) for i in range(big)]
        for c in self.clients:
            c.incr_key = f"{self.tag}:ctr:{c.name}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Workload:
        for c in self.clients:
            run = self._run_big if c.big else self._run_persistent if c.persistent else self._run_cli
            t = threading.Thread(target=run, args=(c,),
                                 name=f"client-{c.name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"client threads did not finish: {hung}"

    def acks(self, since: float = 0.0) -> int:
        return sum(1 for c in self.clients for t in c.incr_times if t >= since)

    def acks_by(self, since: float = 0.0) -> dict[str, int]:
        return {c.name: sum(1 for t in c.incr_times if t >= since) for c in self.clients}

    def errors(self) -> list[str]:
        return [f"{c.name}: {e}" for c in self.clients for e in c.errors]

    def wait_replies(self, at_least: int, what: str, *, since: float = 0.0, timeout: float = 20.0,
                     context: Callable[[], str] | None = None) -> None:
        """Until every client has had `at_least` INCRs answered since `since`; a failure quotes the counts and the
        clients' errors as they are at the deadline (and `context()`, the gateway's status say)."""
        def quote() -> str:
            return f"got {self.acks_by(since)}; errors {self.errors()}" + (f"; {context()}" if context else "")
        wait_for(lambda: all(n >= at_least for n in self.acks_by(since).values()), timeout, what, context=quote)

    def _run_persistent(self, c: ClientRecord) -> None:
        try:
            c.conn = Resp(self.address, timeout=20.0)
        except OSError as e:
            c.errors.append(f"cannot connect: {e!r}")
            return
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                key, value = f"{self.tag}:{c.name}:{n}", f"v{n}-{uuid.uuid4().hex}"
                reply = c.conn.call("SET", key, value)
                if reply != "OK":
                    c.errors.append(f"SET {key} answered {reply!r}")
                    return
                c.sets[key] = value
                got = c.conn.call("INCR", c.incr_key)
                want = (c.incr_replies[-1] if c.incr_replies else 0) + 1
                c.incr_replies.append(got)
                c.incr_times.append(time.monotonic())
                if got != want:
                    c.errors.append(f"INCR {c.incr_key} #{len(c.incr_replies)} answered {got!r}, expected {want} "
                                    f"(previous replies ...{c.incr_replies[-5:-1]})")
                    return
        except (OSError, ConnectionError, RespError, ValueError) as e:
            c.errors.append(f"persistent connection broke after {len(c.incr_replies)} INCRs: {e!r}")

    BIG_VALUE = 256 << 10
    BIG_BATCH = 4
    BIG_KEYS = 8

    def _run_big(self, c: ClientRecord) -> None:
        """Pipelines BIG_BATCH SETs of BIG_VALUE random bytes (over BIG_KEYS keys, so memory stays bounded), then an
        INCR; the ledger keeps the last acknowledged value of each key (hex of the random bytes)."""
        try:
            c.conn = Resp(self.address, timeout=20.0)
        except OSError as e:
            c.errors.append(f"cannot connect: {e!r}")
            return
        n = 0
        try:
            while not self._stop.is_set():
                batch = []
                for _ in range(self.BIG_BATCH):
                    n += 1
                    batch.append((f"{self.tag}:{c.name}:{n % self.BIG_KEYS}", os.urandom(self.BIG_VALUE // 2).hex()))
                replies = c.conn.pipeline([("SET", k, v) for k, v in batch] + [("INCR", c.incr_key)])
                for (k, v), r in zip(batch, replies, strict=False):  # the last reply is the INCR's
                    if r != "OK":
                        c.errors.append(f"SET {k} (big) answered {r!r}")
                        return
                    c.sets[k] = v
                got, want = replies[-1], (c.incr_replies[-1] if c.incr_replies else 0) + 1
                c.incr_replies.append(got)
                c.incr_times.append(time.monotonic())
                if got != want:
                    c.errors.append(f"INCR {c.incr_key} answered {got!r}, expected {want}")
                    return
        except (OSError, ConnectionError, RespError, ValueError) as e:
            c.errors.append(f"persistent connection broke after {len(c.incr_replies)} batches: {e!r}")

    def _run_cli(self, c: ClientRecord) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            key, value = f"{self.tag}:{c.name}:{n}", f"v{n}-{uuid.uuid4().hex}"
            try:
                code, out = redis_cli(self.address, "SET", key, value)
            except subprocess.TimeoutExpired:
                c.soft_failures.append(f"SET {key}: redis-cli timed out")
                continue
            if code == 0 and out == "OK":
                c.sets[key] = value
            else:
                c.soft_failures.append(f"SET {key}: exit {code}, {out!r}")
            try:
                code, out = redis_cli(self.address, "INCR", c.incr_key)
            except subprocess.TimeoutExpired:
                code, out = -1, "timeout"
            if code == 0 and out.lstrip("-").isdigit():
                got = int(out)
                last = c.incr_replies[-1] if c.incr_replies else 0
                # Each redis-cli waits for its reply before the next one starts: replies only grow, by one more
                # than the INCRs that went unanswered in between (they may or may not have been applied).
                if not last < got <= last + 1 + c.unacked_after_last_ack:
                    c.errors.append(f"INCR {c.incr_key} answered {got}, previous reply {last}, "
                                    f"{c.unacked_after_last_ack} unanswered in between")
                c.incr_replies.append(got)
                c.incr_times.append(time.monotonic())
                c.unacked_after_last_ack = 0
            else:
                c.unacked_incrs += 1
                c.unacked_after_last_ack += 1
                c.soft_failures.append(f"INCR {c.incr_key}: exit {code}, {out!r}")

    def close(self) -> None:
        for c in self.clients:
            if c.conn is not None:
                c.conn.close()


def verify_ledger(w: Workload, address: tuple[str, int], *, allow_cli_failures: bool = False) -> dict[str, int]:
    """After the workload stopped: every acknowledged write is readable, every counter is where its replies say,
    and the persistent connections are still open with nothing extra queued on them. Returns counts."""
    problems = list(w.errors())
    if not allow_cli_failures:
        problems += [f"{c.name}: {f}" for c in w.clients for f in c.soft_failures]
    for c in w.clients:
        if c.persistent and c.conn is not None and not c.errors:
            try:
                extra = c.conn.pending_bytes(0.2)
                if extra:
                    problems.append(f"{c.name}: unexpected bytes after its last reply (a reply twice?): {extra[:80]!r}")
                pong = c.conn.call("PING")
                if pong != "PONG":
                    problems.append(f"{c.name}: PING on the old connection answered {pong!r}")
            except (OSError, ConnectionError, RespError) as e:
                problems.append(f"{c.name}: persistent connection unusable at the end: {e!r}")
    checker = Resp(address, timeout=20.0)
    keys = [(c, key, value) for c in w.clients for key, value in c.sets.items()]
    try:
        got_sets = checker.pipeline([("GET", key) for _, key, _ in keys])
        got_ctrs = checker.pipeline([("GET", c.incr_key) for c in w.clients])
    finally:
        checker.close()
    for (_, key, value), got in zip(keys, got_sets, strict=True):
        if got != value.encode():
            problems.append(f"acknowledged SET {key}={value} reads back {got!r}")
    for c, final in zip(w.clients, got_ctrs, strict=True):
        final_n = int(final) if final is not None else 0
        last = c.incr_replies[-1] if c.incr_replies else 0
        if c.persistent:
            if final_n != last:
                problems.append(f"{c.incr_key}: final value {final_n}, but the last INCR reply on the persistent "
                                f"connection was {last}")
        else:
            if not last <= final_n <= last + c.unacked_after_last_ack:
                problems.append(f"{c.incr_key}: final value {final_n}, last acknowledged reply {last}, "
                                f"{c.unacked_after_last_ack} unanswered after it")
            if final_n < len(c.incr_replies):
                problems.append(f"{c.incr_key}: final value {final_n} < {len(c.incr_replies)} acknowledged INCRs")
    sets = len(keys)
    assert not problems, "ledger violations:\n  " + "\n  ".join(problems[:40])
    return {"sets": sets, "incrs": sum(len(c.incr_replies) for c in w.clients)}


# -- a hand-driven peer --------------------------------------------------------------------------------------
class PeerLink:
    """An authenticated connection driven by a test: a reader thread queues what arrives (messages, then
    `Closed`); `send` writes at once. With `protocol`, a checkpoint state machine checks both ways, as on a real
    replication link. For playing a node, a control client or a fake primary against the real processes."""

    def __init__(self, address: tuple[str, int], key: bytes, role: str, peer_role: str,
                 protocol: Callable[[Any], Any] | None = None, max_payload: int | None = None,
                 encrypt: bool = True) -> None:
        from colo.link import authenticate, connect

        self.sock = connect(address)
        hs = authenticate(self.sock, key, role, peer_role, encrypt=encrypt)
        self.proto = protocol(hs) if protocol is not None else None
        self._decoder: SessionCodec | None = None
        if self.proto is None:
            self._decoder = hs.session(max_payload=max_payload) if max_payload else hs.session()
        # seals hand-made frames
        self.codec: SessionCodec = self.proto.codec if self.proto is not None else self._plain()
        self.events: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()  # the protocol object, shared with the reader thread
        self._send_lock = threading.Lock()
        self.closed = False
        self._drain()
        threading.Thread(target=self._read, daemon=True).start()

    def _plain(self) -> SessionCodec:
        """The codec of a link without a protocol object (set whenever `proto` is None)."""
        assert self._decoder is not None
        return self._decoder

    def _drain(self) -> None:
        from colo.protocol import ConnectionClosed

        while True:
            ev = self.proto.next_event() if self.proto is not None else self._plain().next_message()
            if ev is None:
                return
            self.events.put(ev)
            if isinstance(ev, ConnectionClosed):
                return

    def _read(self) -> None:
        from colo.link import Closed

        reason = "closed by peer"
        try:
            while True:
                data = self.sock.recv(1 << 20)
                with self._lock:
                    if self.proto is not None:
                        self.proto.receive_data(data)
                    elif data:
                        self._plain().feed(data)
                    self._drain()
                if not data:
                    break
        except Exception as e:  # noqa: BLE001 - a protocol or wire error, or the socket closed under us
            reason = f"{type(e).__name__}: {e}"
        self.closed = True
        self.events.put(Closed(reason))

    def send(self, msg: Any) -> None:
        # Sealed and written under one lock: a heartbeat thread sending beside the test's thread must not put
        # frame N+1 on the wire before frame N (the peer rejects a gap in the sequence as an attack). Not under
        # `_lock` alone: the reader would wait for a sendall that waits for the peer.
        with self._send_lock:
            with self._lock:
                frame = self.proto.send(msg) if self.proto is not None else self._plain().encode(msg)
            self.sock.sendall(frame)

    def raw(self, data: bytes) -> None:
        """Bytes straight to the socket, past the codec (tests of what the peer does with them)."""
        self.sock.sendall(data)

    def heartbeat(self) -> None:
        from colo.messages import Heartbeat

        self.send(Heartbeat())

    def get(self, timeout: float | None = None) -> Any:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Blackhole:
    """A TCP relay (between two nodes, or a node and the gateway) that can be cut like a network partition: after
    `cut()` it forwards nothing more but keeps both connections open, so each side only sees silence; after
    `heal()` it forwards again (what was sent meanwhile is lost)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server((HOST, 0))
        self.address = self.server.getsockname()[:2]
        self.cut_event = threading.Event()
        self.socks: list[socket.socket] = []
        self._ended: list[socket.socket] = []  # connections whose other side ended during the cut
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            b = socket.create_connection(self.upstream)
            self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.cut_event.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        # One side ended: the other learns it (as TCP would), once the cut heals if it is cut now.
        if self.cut_event.is_set():
            self._ended.append(dst)
        else:
            self._end(dst)

    @staticmethod
    def _end(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cut(self) -> None:
        self.cut_event.set()

    def heal(self) -> None:
        self.cut_event.clear()
        while self._ended:
            self._end(self._ended.pop())

    def close(self) -> None:
        self.server.close()
        for s in self.socks:
            s.close()
