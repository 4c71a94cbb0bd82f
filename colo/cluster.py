"""A replicated guest on this host: the gateway and two nodes as separate local processes over real TCP.

`LocalCluster` is the one harness for `colo up`, `colo demo`, the tests and the benchmarks. It writes a fresh key
into its directory, starts `python -m colo gateway`, then a node as a spare (`colo secondary`), then the primary
(`colo primary GUEST`); the gateway pairs them, the primary copies its VM to the spare, and the pair is protected.
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
from typing import Any

from colo.auth import generate_key, load_key
from colo.errors import ColoError
from colo.link import Client
from colo.messages import CommandResult, ShutdownCommand, StatusReply, StatusRequest
from colo.node import DEFAULT_HEARTBEAT_TIMEOUT

ROLES = ("gateway", "secondary", "primary")


def write_key(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(generate_key())


def ask_gateway(address: tuple[str, int], key: bytes, request: Any, reply: type, timeout: float = 5.0,
                encrypt: bool = True) -> Any:
    """One control request to a gateway, and its reply."""
    with Client(address, key, timeout=timeout, encrypt=encrypt) as c:
        return c.ask(request, reply, timeout)


class LocalCluster:
    """The three roles as local processes, sharing a fresh key."""

    def __init__(self, guest: str, *, ram: str = "64M", cmdline: str = "", interval_ms: float = 100.0,
                 service: tuple[str, int] = ("127.0.0.1", 0), stats: str | None = None, trace: bool = False,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, hooks: str | None = None,
                 directory: Path | None = None, env: dict[str, dict[str, str]] | None = None,
                 verbose: bool = False, mode: str = "periodic", backstop_ms: float = 2000.0,
                 key_file: Path | None = None, encrypt: bool = True, checkpoint_mode: str = "pipelined",
                 delta: bool = False) -> None:
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
        self.verbose = verbose
        self.mode, self.backstop_ms = mode, backstop_ms
        self.encrypt = encrypt
        self.checkpoint_mode = checkpoint_mode
        self.delta = delta
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway: tuple[str, int] = ("", 0)
        self.service_address: tuple[str, int] = ("", 0)
        self.secondary_address: tuple[str, int] = ("", 0)

    @property
    def key(self) -> bytes:
        return load_key(self.key_file)

    def common_args(self, role: str) -> list[str]:
        args = ["--key-file", str(self.key_file), "--heartbeat-timeout", str(self.heartbeat_timeout),
                "--ready-file", str(self.dir / f"{role}.json"), "--mode", self.mode]
        if self.trace:
            args.append("--trace")
        if self.verbose:
            args.append("-v")
        if not self.encrypt:
            args.append("--no-encrypt")
        return args

    def node_args(self) -> list[str]:
        """What both nodes need: a promoted secondary checkpoints like the primary it replaces."""
        args = ["--gateway", "%s:%d" % self.gateway, "--interval", str(self.interval_ms),
                "--backstop", str(self.backstop_ms), "--checkpoint-mode", self.checkpoint_mode]
        if self.delta:
            args.append("--delta")
        if self.stats:
            args += ["--stats", self.stats]
        if self.hooks:
            args += ["--hooks", self.hooks]
        return args

    def command(self, role: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "colo", role, *args, *self.common_args(role)]

    def _spawn(self, role: str, *args: str, stderr: Any = None, stdout: Any = None) -> subprocess.Popen[bytes]:
        (self.dir / f"{role}.json").unlink(missing_ok=True)  # a ready file from an earlier run is stale
        env = dict(os.environ)
        env.pop("COLO_FAULT", None)
        env.update(self.env.get(role, {}))
        proc = subprocess.Popen(self.command(role, *args), env=env, stderr=stderr, stdout=stdout,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[role] = proc
        return proc

    def _wait_ready(self, role: str, timeout: float = 30.0) -> dict[str, Any]:
        path = self.dir / f"{role}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return dict(json.loads(path.read_text()))
            if self.procs[role].poll() is not None:
                raise ColoError(f"the {role} exited with status {self.procs[role].returncode} while starting")
            time.sleep(0.02)
        raise ColoError(f"the {role} did not start within {timeout:.0f} s")

    def start(self, stderr: Any = None, stdout: Any = None) -> None:
        """Start gateway, secondary, primary. `stderr` gets their logs, `stdout` the guest's serial console
        (each node prints it); both default to ours."""
        self._spawn("gateway", "--service", "%s:%d" % self.service, stderr=stderr, stdout=stdout)
        g = self._wait_ready("gateway")
        self.gateway, self.service_address = tuple(g["listen"]), tuple(g["service"])  # type: ignore[assignment]
        self._spawn("secondary", *self.node_args(), stderr=stderr, stdout=stdout)
        self.secondary_address = tuple(self._wait_ready("secondary")["listen"])  # type: ignore[assignment]
        self._spawn("primary", self.guest, *self.node_args(), "--ram", self.ram, "--cmdline", self.cmdline,
                    stderr=stderr, stdout=stdout)

    def node_id(self, role: str, timeout: float = 30.0) -> str:
        """The node id of the process started as `role` (it names the node in the gateway's status and events)."""
        return str(self._wait_ready(role, timeout)["node"])

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
                    raise ColoError(f"the {role} exited with status {p.returncode}")
            time.sleep(0.05)
        raise ColoError(f"the primary was not protected within {timeout:.0f} s")

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        self.procs[role].send_signal(sig)

    def stop(self, timeout: float = 5.0) -> dict[str, int | None]:
        """Stop cleanly: ask the gateway to shut the service down (so no failover starts and no loss is logged);
        then SIGTERM whatever is left, then SIGKILL."""
        codes: dict[str, int | None] = {}
        gw = self.procs.get("gateway")
        if gw is not None and gw.poll() is None and self.gateway[1]:
            try:
                ask_gateway(self.gateway, self.key, ShutdownCommand("colo up is stopping"), CommandResult, 2.0,
                            self.encrypt)
            except (ColoError, OSError):
                pass
        deadline = time.monotonic() + timeout
        for role in ("secondary", "primary", "gateway"):
            p = self.procs.get(role)
            if p is None:
                continue
            try:
                codes[role] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                try:
                    codes[role] = p.wait(2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes[role] = p.wait()
        return codes
