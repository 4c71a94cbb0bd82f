"""What `colo view` runs behind its page: a real replicated pair (LocalCluster) with the event stream on, the stream
read back as it grows, and the controls (kill, checkpoint, step, slow motion, Redis commands, mode).

The three roles append to one trace file (a merged stream, colo.events); a thread tails it and keeps every event
of the run in memory, numbered, so that the page can ask for "everything from N on" (Server-Sent Events resume,
an epoch replayed). Heartbeats and status polls are dropped on the way in: they are many and say nothing the page
shows. A replacement spare is started after a node is lost, so that re-protection (the copy to the next
secondary) can be watched too.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from colo.cluster import LocalCluster, ask_gateway, file_tail, quoted_tail
from colo.errors import ColoError
from colo.events import QUIET_MESSAGES, read_lines
from colo.messages import CheckpointCommand, CommandResult, StepCommand
from colo.resp import Resp, RespError

log = logging.getLogger("colo.view")
TAIL_EVERY = 0.05  # seconds between reads of the trace file
STATUS_EVERY = 0.5  # seconds between status polls of the gateway
RESPAWN_AFTER = 1.5  # seconds after a node is lost before a replacement spare starts
REDIS_TIMEOUT = 600.0  # a reply may wait a long time in step mode
T = TypeVar("T")


class Starter:
    """One thread that starts every process of the view, for as long as the view runs: each role's parent-death
    signal is tied to the thread that started it (colo.lifeline), so a start from a short-lived thread (an HTTP
    request's, a restart's) would stop the roles when that thread ends."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        threading.Thread(target=self._run, name="view-starter", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                fut.set_exception(e)

    def call(self, fn: Callable[[], T]) -> T:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        return fut.result()


class ViewSession:
    def __init__(self, guest: str, *, mode: str = "periodic", interval_ms: float = 1000.0,
                 backstop_ms: float = 5000.0, ram: str = "16M", cmdline: str = "", encrypt: bool = True,
                 heartbeat_timeout: float = 0.8, hooks: str | None = None, trace_hex: int = 64,
                 directory: Path | None = None, respawn: bool = True, checkpoint_mode: str = "pipelined") -> None:
        self.guest, self.ram, self.cmdline, self.hooks = guest, ram, cmdline, hooks
        self.checkpoint_mode = checkpoint_mode  # strict shows the guest stopped until vmstate-loaded
        self.interval_ms, self.backstop_ms, self.encrypt = interval_ms, backstop_ms, encrypt
        self.heartbeat_timeout, self.trace_hex, self.respawn = heartbeat_timeout, trace_hex, respawn
        self.mode = mode
        self.base = directory or Path(tempfile.mkdtemp(prefix="colo-view-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.run_no = 0
        self.cluster: LocalCluster | None = None
        self.dir = self.base
        self.trace_path = self.base / "trace.jsonl"
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.status: dict[str, Any] = {}
        self.step_on = False
        self.delay_ms = 0
        self.error = ""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._respawned = 0  # spares started to replace lost nodes (LocalCluster.add_secondary)
        self._starter = Starter()
        self._lost_at: float | None = None
        self._redis: Resp | None = None
        self._redis_lock = threading.Lock()
        self._log: Any = None

    # -- the pair ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self._starter.call(lambda: self._start(timeout))

    def _start(self, timeout: float) -> None:
        self.run_no += 1
        self.dir = self.base / f"run-{self.run_no}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.dir / "trace.jsonl"
        with self.cond:
            self.events = []
            self.status = {}
            self.step_on, self.delay_ms = False, 0
            self.cond.notify_all()
        c = LocalCluster(self.guest, ram=self.ram, cmdline=self.cmdline, interval_ms=self.interval_ms,
                         backstop_ms=self.backstop_ms, mode=self.mode, encrypt=self.encrypt,
                         heartbeat_timeout=self.heartbeat_timeout, hooks=self.hooks, directory=self.dir,
                         checkpoint_mode=self.checkpoint_mode)
        c.trace_file = str(self.trace_path)
        c.trace_hex = self.trace_hex
        self._log = open(self.dir / "roles.log", "ab")
        self.cluster = c
        self._stop.clear()
        self._threads = [threading.Thread(target=self._tail, name="view-tail", daemon=True),
                         threading.Thread(target=self._watch, name="view-status", daemon=True)]
        for t in self._threads:
            t.start()
        try:
            c.start(stderr=self._log, stdout=self._log)
            c.wait_protected(timeout)
        except ColoError as e:  # the roles share one log: its last lines say why one of them stopped
            log_file = self.dir / "roles.log"
            raise ColoError(f"{e}{quoted_tail(file_tail(log_file, 8), str(log_file))}") from None

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        self._close_redis()
        c, self.cluster = self.cluster, None
        if c is not None:
            try:
                c.stop()
            except (ColoError, OSError) as e:
                log.warning("view: stopping the pair: %s", e)
        self._respawned = 0
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, mode: str | None = None) -> None:
        """The switch between periodic and hybrid: a new pair (and a new run of events)."""
        self.stop()
        if mode is not None:
            self.mode = mode
        self.start()

    # -- the stream -------------------------------------------------------------------------------------------
    def _tail(self) -> None:
        path, pos, rest = self.trace_path, 0, ""
        while not self._stop.is_set():
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except FileNotFoundError:
                chunk = ""
            if chunk:
                text = rest + chunk
                lines = text.split("\n")
                rest = lines.pop()  # a line still being written
                fresh = [e for e in read_lines(lines) if not _quiet(e)]
                if fresh:
                    with self.cond:
                        for e in fresh:
                            e["i"] = len(self.events)
                            self.events.append(e)
                        self.cond.notify_all()
            self._stop.wait(TAIL_EVERY)

    def since(self, first: int, timeout: float) -> list[dict[str, Any]]:
        """Events numbered `first` on, waiting up to `timeout` for one when there are none yet."""
        with self.cond:
            if len(self.events) <= first:
                self.cond.wait(timeout)
            return self.events[first:]

    def _watch(self) -> None:
        while not self._stop.wait(STATUS_EVERY):
            c = self.cluster
            if c is None or not c.gateway[1]:
                continue
            try:
                st = c.status(timeout=2.0)
            except (ColoError, OSError):
                continue
            st["view"] = {"mode": self.mode, "step": self.step_on, "delay_ms": self.delay_ms, "run": self.run_no,
                          "interval_ms": self.interval_ms, "trace": str(self.trace_path)}
            self.status = st
            self._maybe_respawn(st)

    def _maybe_respawn(self, st: dict[str, Any]) -> None:
        """A node was lost and none waits as a spare: start one (the next secondary to copy to)."""
        if not self.respawn or self.cluster is None:
            return
        g, nodes = st.get("gateway", {}), st.get("nodes", {})
        has_pair = nodes.get("secondary", {}).get("connected") or st.get("spares")
        serving = g.get("service_state") in ("unprotected",)
        if has_pair or not serving:
            self._lost_at = None
            return
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        elif now - self._lost_at > RESPAWN_AFTER and self._respawned < 8:
            self._lost_at = None
            self._respawned += 1
            cluster = self.cluster
            self._starter.call(cluster.add_secondary)

    # -- controls ---------------------------------------------------------------------------------------------
    def _ask(self, msg: Any) -> CommandResult:
        c = self.cluster
        if c is None:
            raise ColoError("no pair is running")
        res: CommandResult = ask_gateway(c.gateway, c.key, msg, CommandResult, 5.0, c.encrypt)
        return res

    def kill(self, role: str) -> str:
        """SIGKILL the process that is `role` now (roles are modes: after a failover that is another process)."""
        node = self.status.get("nodes", {}).get(role, {})
        pid = node.get("pid")
        if not node.get("connected") or not isinstance(pid, int):
            raise ColoError(f"there is no {role} to kill")
        os.kill(pid, signal.SIGKILL)
        return f"sent SIGKILL to the {role} (pid {pid}, node {node.get('id')})"

    def checkpoint(self) -> str:
        res = self._ask(CheckpointCommand("the view's Checkpoint button"))
        if not res.ok:
            raise ColoError(res.reason)
        return res.reason

    def set_step(self, on: bool | None = None, delay_ms: int | None = None) -> str:
        if on is not None:
            self.step_on = on
        if delay_ms is not None:
            self.delay_ms = max(0, min(int(delay_ms), 10_000))
        res = self._ask(StepCommand(self.step_on, self.delay_ms, "", 0))
        return res.reason

    def waiting(self) -> list[dict[str, Any]]:
        """The handshake messages held now: gate events "waiting" not followed by their "released"."""
        held: dict[tuple[str, str], dict[str, Any]] = {}
        with self.cond:
            evs = list(self.events)
        for e in evs:
            if e.get("kind") != "gate":
                continue
            key = (str(e.get("node")), str(e.get("msg")))
            if e.get("state") == "waiting":
                held[key] = e
            else:
                held.pop(key, None)
        lost = {n.get("id") for n in self.status.get("lost", [])}
        return sorted((e for e in held.values() if e.get("node") not in lost), key=lambda e: float(e["t"]))

    def step_once(self) -> str:
        """Let the message that has waited longest go."""
        waiting = self.waiting()
        if not waiting:
            raise ColoError("no handshake message is waiting for a step")
        e = waiting[0]
        res = self._ask(StepCommand(True, self.delay_ms, str(e["node"]), 1))
        if not res.ok:
            raise ColoError(res.reason)
        return f"released {e.get('msg')} from the {e.get('role')}"

    def redis(self, command: str) -> dict[str, Any]:
        """One command to the service, through the gateway as any client: the reply arrives when it is released."""
        args = shlex.split(command)
        if not args:
            raise ValueError("type a command, e.g. SET k v")
        c = self.cluster
        if c is None:
            raise ColoError("no pair is running")
        with self._redis_lock:
            sent = time.time()
            for attempt in (1, 2):
                try:
                    if self._redis is None:
                        self._redis = Resp(c.service_address, timeout=REDIS_TIMEOUT)
                    reply = self._redis.call(*args)
                    break
                except RespError as e:
                    return {"reply": f"(error) {e}", "sent": sent, "received": time.time()}
                except OSError as e:
                    self._close_redis()
                    if attempt == 2:
                        raise ColoError(f"the service did not answer: {e}") from None
        return {"reply": _reply_text(reply), "sent": sent, "received": time.time()}

    def _close_redis(self) -> None:
        if self._redis is not None:
            try:
                self._redis.close()
            except OSError:
                pass
            self._redis = None

    def state(self) -> dict[str, Any]:
        return {"run": self.run_no, "mode": self.mode, "interval_ms": self.interval_ms, "step": self.step_on,
                "delay_ms": self.delay_ms, "guest": Path(self.guest).name, "ram": self.ram,
                "trace": str(self.trace_path), "status": self.status, "events": len(self.events),
                "waiting": self.waiting()}


def _quiet(e: dict[str, Any]) -> bool:
    return e.get("kind") in ("send", "recv") and e.get("msg") in QUIET_MESSAGES


def _reply_text(reply: Any) -> str:
    """A reply as redis-cli shows it."""
    if reply is None:
        return "(nil)"
    if isinstance(reply, bytes):
        return json.dumps(reply.decode(errors="replace"))
    if isinstance(reply, int):
        return f"(integer) {reply}"
    if isinstance(reply, list):
        return "\n".join(f"{i}) {_reply_text(r)}" for i, r in enumerate(reply, 1)) or "(empty array)"
    return f"+{reply}"  # a simple string, in RESP's own notation (+OK)
