"""A replicated guest on this host: the gateway and the nodes as separate local processes over real TCP.

`LocalCluster` is the one harness for `colo up`, `colo demo`, the tests and the benchmarks. It writes a fresh key
into its directory (or uses the key file it is given), starts `python -m colo gateway`, then a node as a spare
(`colo secondary`), waits until the gateway knows the spare, then starts the primary (`colo primary GUEST`): the
gateway pairs them, the primary copies its VM to the spare before the guest's first instruction, and the pair
is protected. `add_secondary` starts one more spare at any time (a replacement after a failure): the gateway
pairs it with the active node whenever that node is unprotected.

Processes are named by how they were started ("gateway", "primary", "secondary", "secondary-2", ...). A name is
not a role: roles are modes, and after a failover the process named "secondary" is the primary. The gateway's
status says who is what, by node id; `node_id(name)` maps a process to its node.

Every role holds a lifeline to this process (colo.lifeline): when the process that owns the LocalCluster ends,
however it ends, the roles stop.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from colo.auth import generate_key, load_key
from colo.errors import ColoError
from colo.lifeline import Lifeline
from colo.link import (
    DEFAULT_HEARTBEAT_TIMEOUT,  # not from colo.node: the control side needs no emulator
    Client,
)
from colo.messages import CommandResult, ShutdownCommand, StatusReply, StatusRequest
from colo.sched import DEFAULT as DEFAULT_SCHED
from colo.sched import allowed_cpus, format_cpus, node_halves

ROLES = ("gateway", "secondary", "primary")
SPARE_WAIT = 10.0  # seconds to wait for the first spare to reach the gateway before starting the primary
TAIL_LINES = 12  # lines of a failed role's log quoted in the error
PIN_CHOICES = ("auto", "off")  # LocalCluster(pin=...), colo up --pin


def write_key(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask, or an older file's mode
        f.write(generate_key())


def ask_gateway(address: tuple[str, int], key: bytes, request: Any, reply: type, timeout: float = 5.0,
                encrypt: bool = True) -> Any:
    """One control request to a gateway, and its reply."""
    with Client(address, key, timeout=timeout, encrypt=encrypt) as c:
        return c.ask(request, reply, timeout)


def file_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def quoted_tail(tail: str, where: str = "") -> str:
    """A log tail to end an error with: ' (WHERE):' or ':', then its lines indented ('' for no lines)."""
    if not tail:
        return ""
    return (f" ({where}):" if where else ":") + "\n" + "\n".join(f"  {ln}" for ln in tail.splitlines())


def exit_text(code: int | None) -> str:
    """"exited with status 2" or "was killed by SIGKILL", for a Popen returncode."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class LocalCluster:
    """The roles as local processes, sharing one key."""

    # The event stream (colo.events): every role appends to `trace_file` (one merged stream; "{role}" in it makes
    # one file per process instead), `trace_hex` leading bytes of each frame in hex. Set before start().
    trace_file: str | None = None
    trace_filter: str = ""
    trace_hex: int = 0

    def __init__(self, guest: str, *, ram: str = "64M", cmdline: str = "", interval_ms: float = 100.0,
                 service: tuple[str, int] = ("127.0.0.1", 0), stats: str | None = None, trace: bool = False,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, hooks: str | None = None,
                 directory: Path | None = None, env: dict[str, dict[str, str]] | None = None,
                 verbose: bool = False, mode: str = "periodic", backstop_ms: float = 2000.0,
                 key_file: Path | None = None, encrypt: bool = True, quiet: bool = False,
                 console: str = "active", logs: bool = False, lifeline: bool = True, copy: str = "live",
                 checkpoint_mode: str = "pipelined", delta: bool = False, sched: str = DEFAULT_SCHED,
                 pin: str = "auto") -> None:
        """`logs`: each process's stderr goes to DIR/NAME.log (else where `start` is told); `console`: the
        nodes' --console (active: only the active node prints the guest's console); `pin`: "auto" gives each
        node of a hybrid cluster its own half of the CPUs (`node_cpus`), "off" lets every role run anywhere."""
        if pin not in PIN_CHOICES:
            raise ValueError(f"pin must be one of {', '.join(PIN_CHOICES)}, not {pin!r}")
        self.dir = directory or Path(tempfile.mkdtemp(prefix="colo-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        if key_file is None:
            self.key_file = self.dir / "key"
            write_key(self.key_file)
        else:
            self.key_file = key_file
        self.guest, self.ram, self.cmdline, self.interval_ms = guest, ram, cmdline, interval_ms
        self.service, self.stats, self.trace, self.hooks = service, stats, trace, hooks
        self.heartbeat_timeout = heartbeat_timeout
        self.env = env or {}
        self.verbose, self.quiet = verbose, quiet
        self.mode, self.backstop_ms = mode, backstop_ms
        self.encrypt = encrypt
        self.console, self.logs = console, logs
        self.copy = copy
        self.checkpoint_mode = checkpoint_mode
        self.delta = delta
        self.sched = sched
        self.pin = pin
        self.node_cpus: dict[str, list[int]] = {}  # the CPUs each node process was started on (--cpus)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}  # monotonic start time of each process
        self.gateway: tuple[str, int] = ("", 0)
        self.service_address: tuple[str, int] = ("", 0)
        self.secondary_address: tuple[str, int] = ("", 0)
        self._out: tuple[Any, Any] = (None, None)  # start()'s stderr and stdout, for later processes
        self._spares = 1
        self.quote_logs = True  # errors quote the last lines of a failed process's log file
        self._lifeline = Lifeline() if lifeline else None

    @property
    def key(self) -> bytes:
        return load_key(self.key_file)

    # -- command lines ----------------------------------------------------------------------------------------
    def common_args(self, name: str) -> list[str]:
        args = ["--key-file", str(self.key_file), "--heartbeat-timeout", str(self.heartbeat_timeout),
                "--ready-file", str(self.ready_path(name)), "--mode", self.mode, "--sched", self.sched]
        if self.trace:
            args.append("--trace")
        args += self.trace_args(name)
        if self.verbose:
            args.append("-v")
        elif self.quiet:
            args.append("-q")
        if not self.encrypt:
            args.append("--no-encrypt")
        return args + (self._lifeline.args() if self._lifeline is not None else [])

    def trace_args(self, name: str) -> list[str]:
        args = ["--trace-file", self.trace_file.replace("{role}", name)] if self.trace_file else []
        args += ["--trace-hex", str(self.trace_hex)] if self.trace_hex else []
        return args + (["--trace-filter", self.trace_filter] if self.trace_filter else [])

    def node_args(self) -> list[str]:
        """What every node needs: a promoted secondary checkpoints like the primary it replaces."""
        args = ["--gateway", "%s:%d" % self.gateway, "--interval", str(self.interval_ms),
                "--backstop", str(self.backstop_ms), "--console", self.console, "--copy", self.copy,
                "--checkpoint-mode", self.checkpoint_mode]
        if self.delta:
            args.append("--delta")
        if self.stats:
            args += ["--stats", self.stats]
        if self.hooks:
            args += ["--hooks", self.hooks]
        return args

    def replacement_args(self) -> list[str]:
        """Extra options of the secondaries `add_secondary` starts (none: a test may break them on purpose)."""
        return []

    def command(self, role: str, *args: str, name: str | None = None) -> list[str]:
        return [sys.executable, "-m", "colo", role, *args, *self.common_args(name or role)]

    @property
    def state_file(self) -> Path:
        """The gateway's durable state (colo.durable): a gateway started again for this cluster reads it."""
        return self.dir / "gateway-state.json"

    def ready_path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    # -- processes ---------------------------------------------------------------------------------------------
    def _spawn(self, role: str, *args: str, stderr: Any = None, stdout: Any = None,
               name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or role
        if role in ("primary", "secondary"):
            args += tuple(self._pin_node(name))
        self.ready_path(name).unlink(missing_ok=True)  # a ready file from an earlier run is stale
        env = dict(os.environ)
        env.pop("COLO_FAULT", None)
        env.update(self.env.get(name, {}))
        log_file: IO[bytes] | None = None
        if stderr is None and self.logs:
            stderr = log_file = open(self.log_path(name), "wb")
        try:
            proc = subprocess.Popen(self.command(role, *args, name=name), env=env, stderr=stderr, stdout=stdout,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    pass_fds=self._lifeline.pass_fds if self._lifeline is not None else ())
        finally:
            if log_file is not None:
                log_file.close()  # the child has its own copy
        self.procs[name] = proc
        self.started[name] = time.monotonic()
        return proc

    def _pin_node(self, name: str) -> list[str]:
        """The `--cpus` of node `name`, about to start (remembered in `node_cpus`): in hybrid mode (`pin` auto),
        the half of this host's CPUs that no live node runs on; none (every CPU) otherwise, or when both halves
        are taken."""
        halves = node_halves(allowed_cpus()) if self.pin == "auto" and self.mode == "hybrid" else None
        if halves is None:
            return []
        taken = [cpus for node, cpus in self.node_cpus.items()
                 if node in self.procs and self.procs[node].poll() is None]
        cpus = next((half for half in halves if half not in taken), [])
        if not cpus:
            return []
        self.node_cpus[name] = cpus
        return ["--cpus", format_cpus(cpus)]

    def _wait_ready(self, role: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.ready_info(role)
            if info is not None:
                return info
            if self.procs[role].poll() is not None:
                raise ColoError(self.exit_message(role, "while starting"))
            time.sleep(0.02)
        raise ColoError(f"the {role} did not start within {timeout:.0f} s"
                        f"{self._tail_text(role) if self.quote_logs else ''}")

    def ready_info(self, name: str) -> dict[str, Any] | None:
        """What the process wrote once it was up (pid, node id, addresses), or None if not yet."""
        try:
            return dict(json.loads(self.ready_path(name).read_text()))
        except (OSError, ValueError):
            return None

    def start(self, stderr: Any = None, stdout: Any = None, *, secondary: bool = True) -> None:
        """Start gateway, secondary, primary. `stderr` gets their logs (default: ours, or one file per process
        with `logs`), `stdout` the guest's serial console (the active node prints it; default: ours). Without
        `secondary` the primary runs unprotected until `add_secondary`."""
        self._out = (stderr, stdout)
        self._spawn("gateway", "--service", "%s:%d" % self.service, "--state-file", str(self.state_file),
                    stderr=stderr, stdout=stdout)
        g = self._wait_ready("gateway")
        self.gateway, self.service_address = (str(g["listen"][0]), int(g["listen"][1])), \
            (str(g["service"][0]), int(g["service"][1]))
        if secondary:
            self._spawn("secondary", *self.node_args(), stderr=stderr, stdout=stdout)
            sec = self._wait_ready("secondary")
            self.secondary_address = (str(sec["listen"][0]), int(sec["listen"][1]))
            self._wait_spare(str(sec.get("node", "")))
        self._spawn("primary", self.guest, *self.node_args(), "--ram", self.ram, "--cmdline", self.cmdline,
                    stderr=stderr, stdout=stdout)

    def _wait_spare(self, node: str) -> None:
        """The spare registers with the gateway before the primary starts, so the copy comes before the guest's
        first instruction (else the guest runs unprotected until the spare arrives: correct, but not what a
        user who asked for a replicated guest expects to see)."""
        deadline = time.monotonic() + SPARE_WAIT
        while time.monotonic() < deadline:
            for role in ("gateway", "secondary"):
                if self.procs[role].poll() is not None:
                    raise ColoError(self.exit_message(role, "while starting"))
            try:
                info = self.status(timeout=2.0)
            except (ColoError, OSError):
                info = {}
            if any(n.get("id") == node for n in info.get("spares", [])):
                return
            time.sleep(0.02)

    def add_secondary(self) -> str:
        """Start one more secondary (it registers as a spare); returns its process name, e.g. "secondary-2"."""
        self._spares += 1
        name = f"secondary-{self._spares}"
        stderr, stdout = self._out
        self._spawn("secondary", *self.node_args(), "--listen", "127.0.0.1:0", *self.replacement_args(),
                    stderr=stderr, stdout=stdout, name=name)
        return name

    def node_id(self, role: str, timeout: float = 30.0) -> str:
        """The node id of the process started as `role` (it names the node in the gateway's status and events)."""
        return str(self._wait_ready(role, timeout)["node"])

    def alive(self) -> dict[str, int]:
        """The processes that still run, by name: their pids."""
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def log_tail(self, name: str, lines: int = TAIL_LINES) -> str:
        """The last lines of the process's log file ('' without `logs`)."""
        return file_tail(self.log_path(name), lines)

    def _tail_text(self, name: str) -> str:
        return quoted_tail(self.log_tail(name))

    def exit_message(self, name: str, when: str = "", tail: bool = True) -> str:
        """"the primary exited with status 2 while starting:" and the last lines of its log."""
        text = f"the {name} {exit_text(self.procs[name].poll())}{' ' + when if when else ''}"
        return text + (self._tail_text(name) if tail and self.quote_logs else "")

    # -- the gateway's view ------------------------------------------------------------------------------------
    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        reply: StatusReply = ask_gateway(self.gateway, self.key, StatusRequest(), StatusReply, timeout, self.encrypt)
        return dict(reply.info)

    def wait_protected(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.status()
            if info["gateway"]["protected"] and info["nodes"]["primary"].get("checkpoints", 0) >= 1:
                return info
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise ColoError(self.exit_message(role))
            time.sleep(0.05)
        raise ColoError(f"the primary was not protected within {timeout:.0f} s")

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        self.procs[role].send_signal(sig)

    def stop(self, timeout: float = 5.0) -> dict[str, int | None]:
        """Stop cleanly: ask the gateway to shut the service down (so no failover starts and no loss is logged);
        then SIGTERM whatever is left, then SIGKILL. Without a gateway to ask, the nodes get SIGTERM at once.
        Returns each process's exit status."""
        codes: dict[str, int | None] = {}
        gw = self.procs.get("gateway")
        told = False
        if gw is not None and gw.poll() is None and self.gateway[1]:
            try:
                ask_gateway(self.gateway, self.key, ShutdownCommand("colo up is stopping"), CommandResult, 2.0,
                            self.encrypt)
                told = True
            except (ColoError, OSError):
                pass
        deadline = time.monotonic() + timeout
        nodes = [n for n in self.procs if n != "gateway"]
        if not told:  # no gateway tells the nodes to stop: waiting for them would only spend the deadline
            for name in nodes:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
        for name in [*sorted(nodes, key=lambda n: n == "primary"), "gateway"]:
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                codes[name] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                try:
                    codes[name] = p.wait(2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes[name] = p.wait()
        if self._lifeline is not None:
            self._lifeline.close()  # any role still running stops on its own now
        return codes
