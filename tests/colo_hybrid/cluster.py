"""Helpers for the end-to-end tests of hybrid (COLO) mode: a replicated guest in hybrid mode as three processes,
the nodes' state logs, the comparer's trigger counts, and clients for the deterministic (kvstore) and the
non-deterministic (noisy) guest.

The generic pieces (waiting with a deadline, a RESP client, the write workload and its ledger, state-log reading)
come from the periodic-mode e2e helpers in tests/colo_e2e/helpers.py. Every wait here has a deadline and every
socket a timeout: a broken replication layer makes a test fail, never hang.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colo.cluster import LocalCluster
from colo_e2e.helpers import Resp, RespError, Workload, by_epoch, events_named, read_state_log, wait_for
from conftest import ROOT, guest

RAM = "16M"
FREEZE = Path(__file__).with_name("freeze.py")


class HybridCluster(LocalCluster):
    """`LocalCluster` in hybrid mode, plus per-role extra command-line options (appended last, so they win over
    the common ones: e.g. a gateway with a longer --heartbeat-timeout than the nodes, or --compare-timeout)."""

    def __init__(self, *args: Any, extra: dict[str, list[str]] | None = None, freeze: tuple[str, ...] = (),
                 **kw: Any) -> None:
        super().__init__(*args, mode="hybrid", **kw)
        self.extra = extra or {}
        self.freeze = freeze  # roles whose COLO_FAULT freezes them (SIGSTOP) instead of killing them

    def _spawn(self, role: str, *args: str, stderr: Any = None, stdout: Any = None,
               name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or role  # as in LocalCluster: the process's name (its ready file, env and entry in procs)
        common = ["--key-file", str(self.key_file), "--heartbeat-timeout", str(self.heartbeat_timeout),
                  "--ready-file", str(self.dir / f"{name}.json"), "--mode", self.mode]
        if self.trace:
            common.append("--trace")
        if self._lifeline is not None:  # as LocalCluster's roles: gone when the test run is
            common += self._lifeline.args()
        env = dict(os.environ)
        env.pop("COLO_FAULT", None)
        env.pop("COLO_STATE_LOG", None)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(self.env.get(name, {}))
        program = [str(FREEZE)] if role in self.freeze else ["-m", "colo"]
        proc = subprocess.Popen([sys.executable, *program, role, *args, *common, *self.extra.get(role, [])],
                                env=env, stderr=stderr, stdout=subprocess.DEVNULL if stdout is None else stdout,
                                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                                pass_fds=self._lifeline.pass_fds if self._lifeline is not None else ())
        self.procs[name] = proc
        return proc


class HybridRun:
    """A guest replicated in hybrid mode: gateway, secondary and primary as separate processes over TCP.

    Both nodes log the digest of their VM at every checkpoint (COLO_STATE_LOG), the primary writes one JSON line
    per checkpoint (--stats, with its trigger), and all three share one stderr file. `close` always stops
    everything (SIGCONT first, in case a test froze a process)."""

    def __init__(self, directory: Path, name: str, *, cmdline: str = "", backstop_ms: float = 2000.0,
                 heartbeat_timeout: float = 0.8, env: dict[str, dict[str, str]] | None = None,
                 extra: dict[str, list[str]] | None = None, freeze: tuple[str, ...] = (), state_logs: bool = True,
                 trace: bool = False, checkpoint_mode: str = "pipelined") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plog, self.slog = self.dir / "primary.states", self.dir / "secondary.states"
        self.stats_path = self.dir / "checkpoints.jsonl"
        env = {role: dict((env or {}).get(role, {})) for role in ("gateway", "primary", "secondary")}
        if state_logs:
            env["primary"]["COLO_STATE_LOG"] = str(self.plog)
            env["secondary"]["COLO_STATE_LOG"] = str(self.slog)
        self.cluster = HybridCluster(str(guest(name)), ram=RAM, cmdline=cmdline, backstop_ms=backstop_ms,
                                     heartbeat_timeout=heartbeat_timeout, env=env, extra=extra, freeze=freeze,
                                     directory=self.dir / "cluster", stats=str(self.stats_path),
                                     trace=trace or bool(os.environ.get("COLO_HYBRID_TRACE")),
                                     checkpoint_mode=checkpoint_mode)
        self.stderr_path = self.dir / "stderr.txt"
        self._stderr = open(self.stderr_path, "wb")
        self.closed = False

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 40.0) -> dict[str, Any]:
        """Start the three roles and wait until the secondary holds the VM and the first checkpoint is done."""
        self.cluster.start(stderr=self._stderr)

        def up() -> dict[str, Any] | None:
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"the {role} exited with {p.returncode} while starting:\n"
                                         f"{self.stderr()[-3000:]}")
            st = self.status()
            # protected: the secondary holds the VM; mirroring: its copy runs and gets the inputs too
            return st if st["gateway"]["protected"] and events_named(st, "mirroring") else None
        return wait_for(up, timeout, "the secondary to hold and run the VM (protected, mirroring)")

    @property
    def service(self) -> tuple[str, int]:
        return self.cluster.service_address

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        return self.cluster.procs

    def alive(self, role: str) -> bool:
        return self.procs[role].poll() is None

    def signal(self, role: str, sig: int) -> None:
        self.procs[role].send_signal(sig)

    def frozen(self, role: str) -> bool:
        """The process is stopped (SIGSTOP): state T in /proc."""
        try:
            stat = Path(f"/proc/{self.procs[role].pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] in ("T", "t")

    def status(self) -> dict[str, Any]:
        return self.cluster.status()

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> dict[str, int | None]:
        if self.closed:
            return {}
        self.closed = True
        for name, p in self.procs.items():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
                    if name in self.cluster.freeze:  # fenced while frozen: no gateway will tell it to stop
                        p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        try:
            return self.cluster.stop(timeout=5.0)
        finally:
            for p in self.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            self._stderr.close()

    # -- what the nodes recorded --------------------------------------------------------------------------------
    def checkpoints(self) -> list[dict[str, Any]]:
        """The primary's checkpoint records (--stats), in order."""
        if not self.stats_path.exists():
            return []
        return [json.loads(line) for line in self.stats_path.read_text().splitlines() if line.strip()]

    def trigger_counts(self) -> Counter[str]:
        return Counter(r["trigger"] for r in self.checkpoints())

    def states(self) -> tuple[dict[Any, tuple[str, str, str]], dict[Any, tuple[str, str, str]]]:
        """(primary, secondary): epoch -> (RAM, CPU, devices) digest."""
        return by_epoch(read_state_log(self.plog)), by_epoch(read_state_log(self.slog))

    def settled_status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The gateway's status once the primary's reported trigger counts have caught up with its stats file
        (a node reports its status with its heartbeat, a few times a second)."""
        def caught_up() -> dict[str, Any] | None:
            st = self.status()
            reported = st["nodes"]["primary"].get("triggers", {})
            return st if reported == dict(self.trigger_counts()) else None
        return wait_for(caught_up, timeout, f"the status to report the triggers {dict(self.trigger_counts())}")


def assert_identical_at_checkpoints(run: HybridRun, *, min_epochs: int) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Every state the secondary applied equals the primary's state of that epoch (RAM, CPU and devices), and
    the secondary applied every checkpoint the primary took (but perhaps the last, cut off by the shutdown)."""
    p, s = run.states()
    p_epochs = sorted(e for e in p if isinstance(e, int))
    s_epochs = sorted(e for e in s if isinstance(e, int))
    assert 0 in s, "the secondary never applied the initial copy"
    assert len([e for e in s_epochs if e >= 1]) >= min_epochs, \
        f"only {len(s_epochs)} checkpoints applied by the secondary: {s_epochs}"
    missing = sorted(set(p_epochs) - set(s_epochs))
    assert missing in ([], [p_epochs[-1]]), f"the secondary never applied the primary's checkpoints {missing}"
    extra = sorted(set(s_epochs) - set(p_epochs))
    assert not extra, f"the secondary applied epochs {extra} the primary never took"
    for part, i in (("RAM", 0), ("CPU", 1), ("devices", 2)):
        differ = [e for e in s_epochs if s[e][i] != p[e][i]]
        assert not differ, f"after checkpoints {differ} the secondary's {part} differs from the primary's"
    return p, s


# -- faults ---------------------------------------------------------------------------------------------------------
def wait_gone(run: HybridRun, role: str, counter: Callable[[], int], *, frozen: bool = False,
              timeout: float = 30.0) -> int:
    """Wait for `role` to die (or, with `frozen`, to freeze itself) at its fault; returns what `counter` counted
    while the process certainly still ran (read before the check that found it alive)."""
    acked = 0
    deadline = time.monotonic() + timeout
    while True:
        n = counter()
        if run.frozen(role) if frozen else not run.alive(role):
            return acked
        if frozen:
            assert run.alive(role), f"the {role} exited instead of freezing:\n{run.stderr()[-3000:]}"
        acked = n
        assert time.monotonic() < deadline, f"the {role} did not reach its fault within {timeout} s:\n" \
                                            f"{run.stderr()[-3000:]}"
        time.sleep(0.01)


def abort_workload(w: Workload) -> None:
    """Stop the write clients without waiting for a reply that may never come (a failing test must end soon)."""
    w._stop.set()
    for c in w.clients:
        if c.conn is not None:
            try:
                c.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    deadline = time.monotonic() + 2  # a redis-cli still waiting ends when the cluster is stopped
    for t in w._threads:
        t.join(max(0.1, deadline - time.monotonic()))
    w.close()


def probe(address: tuple[str, int], tag: str, timeout: float) -> str | None:
    """A new client connection writes a key and reads it back: None if that worked, else what went wrong."""
    try:
        r = Resp(address, timeout=timeout)
    except OSError as e:
        return f"cannot connect: {e!r}"
    try:
        if (got := r.call("SET", f"probe:{tag}", tag)) != "OK":
            return f"SET answered {got!r}"
        if (got := r.call("GET", f"probe:{tag}")) != tag.encode():
            return f"GET answered {got!r}"
        return None
    except (OSError, ConnectionError, RespError) as e:
        return f"no answer within {timeout} s: {e!r}"
    finally:
        r.close()


# -- clients ------------------------------------------------------------------------------------------------------
TIME_RE = re.compile(rb"^\d{19}$")
GET_RE = re.compile(rb"^(\d{19}):([0-9a-f]{8})$")
HEX_RE = re.compile(rb"^[0-9a-f]*$")


class Noisy:
    """One persistent connection to the noisy guest. Every reply is checked: it must be one a VM could have
    produced for this request (TIME: the host clock between sending and receiving; RANDOM n: 2n hex digits; GET:
    clock:8 hex digits; deterministic commands: their exact answer). `calls` counts the checked replies."""

    def __init__(self, address: tuple[str, int], timeout: float = 15.0) -> None:
        self.r = Resp(address, timeout=timeout)
        self.calls = 0

    def time(self) -> int:
        t0 = time.time_ns()
        got = self.r.call("TIME")
        t1 = time.time_ns()
        assert isinstance(got, int), f"TIME answered {got!r}, not an integer"
        assert TIME_RE.match(str(got).encode()), f"TIME answered {got!r}, not a host clock in ns"
        assert t0 <= got <= t1, f"TIME answered {got}, outside the request's lifetime [{t0}, {t1}]"
        self.calls += 1
        return got

    def random(self, n: int) -> bytes:
        got = self.r.call("RANDOM", n)
        assert isinstance(got, bytes), f"RANDOM {n} answered {got!r}"
        assert len(got) == 2 * n and HEX_RE.match(got), f"RANDOM {n} answered {len(got)} bytes: {got[:80]!r}"
        self.calls += 1
        return got

    def get(self, key: str) -> int:
        t0 = time.time_ns()
        got = self.r.call("GET", key)
        t1 = time.time_ns()
        m = GET_RE.match(got) if isinstance(got, bytes) else None
        assert m, f"GET {key} answered {got!r}, not <clock>:<8 hex digits>"
        assert t0 <= int(m.group(1)) <= t1, f"GET {key} answered {got!r}, clock outside [{t0}, {t1}]"
        self.calls += 1
        return int(m.group(1))

    def echo(self, text: str) -> None:
        got = self.r.call("ECHO", text)
        assert got == text.encode(), f"ECHO {text} answered {got!r}"
        self.calls += 1

    def ping(self) -> None:
        got = self.r.call("PING")
        assert got == "PONG", f"PING answered {got!r}"
        self.calls += 1

    def nothing_pending(self) -> None:
        extra = self.r.pending_bytes(0.2)
        assert not extra, f"bytes after the last reply (a reply twice, or one nobody asked for): {extra[:80]!r}"

    def close(self) -> None:
        self.r.close()


@dataclass
class NoisyLoop:
    """Client threads on persistent connections to noisy: each round is ECHO <round>, TIME, RANDOM 8, PING, every
    reply checked (an ECHO of the round number keeps the replies aligned: a lost or doubled reply shows)."""

    address: tuple[str, int]
    clients: int = 2
    rounds: list[int] = field(default_factory=list)
    times: list[list[float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    conns: list[Noisy] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> NoisyLoop:
        self.rounds = [0] * self.clients
        self.times = [[] for _ in range(self.clients)]
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), name=f"noisy-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, i: int) -> None:
        try:
            c = Noisy(self.address, timeout=20.0)
        except OSError as e:
            self.errors.append(f"client {i}: cannot connect: {e!r}")
            return
        self.conns.append(c)
        try:
            while not self._stop.is_set():
                n = self.rounds[i] + 1
                c.echo(f"client{i}-round{n}")
                c.time()
                c.random(8)
                c.ping()
                self.rounds[i] = n
                self.times[i].append(time.monotonic())
        except (AssertionError, OSError, ConnectionError, RespError, ValueError) as e:
            self.errors.append(f"client {i} after {self.rounds[i]} rounds: {e!r}")

    def rounds_since(self, since: float) -> list[int]:
        return [sum(1 for t in ts if t >= since) for ts in self.times]

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"client threads did not finish: {hung} (errors so far: {self.errors})"

    def abort(self) -> None:
        """Stop without waiting for replies that may never come (a failing test must end quickly)."""
        self._stop.set()
        for c in self.conns:
            try:
                c.r.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.close()

    def close(self) -> None:
        for c in self.conns:
            c.close()


def colo_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`python -m colo ARGS` in a fresh process, as a user runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("COLO_KEY", None)
    return subprocess.run([sys.executable, "-m", "colo", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


__all__ = [
    "RAM",
    "HybridCluster",
    "HybridRun",
    "Noisy",
    "NoisyLoop",
    "abort_workload",
    "assert_identical_at_checkpoints",
    "colo_cli",
    "events_named",
    "probe",
    "wait_for",
    "wait_gone",
]
