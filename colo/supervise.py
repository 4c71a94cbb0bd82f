"""`colo up` after the banner: watch the cluster, say what happens, keep the service protected, and say when it ends.

`Supervisor.poll` runs every fraction of a second in `colo up`'s main thread (the roles' parent-death signal
follows the thread that started them, so spawning happens there). Each turn it asks the gateway for its status,
reports processes that exited, and when the active node runs unprotected with no secondary or spare to pair
with, starts a replacement secondary (`LocalCluster.add_secondary`); the witness pairs it with the active node,
which copies its VM to it. `RespawnPolicy` decides when a replacement may start: at most `limit` in any hour,
and with exponential back-off while replacements die before they protect anything.

Processes are tracked by name ("secondary-2") and node id (from their ready files); what each one *is* comes
from the gateway (roles are modes: the process started as "secondary" is the primary after a failover).
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from colo.cluster import LocalCluster, exit_text
from colo.errors import ColoError

log = logging.getLogger("colo.up")
WINDOW = 3600.0  # the respawn limit counts replacements started in this many seconds
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0  # seconds before the next replacement after 1, 2, 3... failed in a row
REGISTER_TIMEOUT = 30.0  # a replacement not seen by the gateway within this long is stopped (and counts as failed)
EXIT_LOST = 1  # the service is gone: no node holds the guest any more, or the gateway died


class RespawnPolicy:
    """When may the next replacement start? Sans-I/O: the caller passes the time."""

    def __init__(self, limit: int, window: float = WINDOW, first: float = BACKOFF_FIRST,
                 cap: float = BACKOFF_CAP) -> None:
        self.limit, self.window, self.first, self.cap = limit, window, first, cap
        self.starts: collections.deque[float] = collections.deque()
        self.streak = 0  # replacements in a row that died before protecting the service
        self.not_before = 0.0

    def _trim(self, now: float) -> None:
        while self.starts and self.starts[0] <= now - self.window:
            self.starts.popleft()

    def blocked(self, now: float) -> str | None:
        """Why no replacement may start now ("limit", "backoff"), or None if one may."""
        self._trim(now)
        if len(self.starts) >= self.limit:
            return "limit"
        if now < self.not_before:
            return "backoff"
        return None

    def started(self, now: float) -> int:
        """A replacement starts now; returns how many started within the window, this one included."""
        self.starts.append(now)
        self._trim(now)
        return len(self.starts)

    def failed(self, now: float) -> float:
        """A replacement died before protecting the service: the next one waits 1 s, 2 s, 4 s... (capped)."""
        self.streak += 1
        delay = min(self.cap, self.first * 2.0 ** (self.streak - 1))
        self.not_before = now + delay
        return delay

    def proven(self) -> None:
        """A replacement protects the service: the next failure starts the back-off afresh."""
        self.streak = 0
        self.not_before = 0.0


@dataclass
class Outcome:
    """How `colo up` ends: its exit code and the line that says why."""

    code: int
    message: str


@dataclass
class Replacement:
    started: float
    proven: bool = False


class Supervisor:
    def __init__(self, cluster: LocalCluster, policy: RespawnPolicy, *,
                 on_change: Callable[[], None] = lambda: None, hint: str = "") -> None:
        self.cluster = cluster
        self.policy = policy
        self.on_change = on_change  # the set of processes changed (colo up rewrites up.json)
        self.hint = hint  # how to add a secondary by hand, for when we will not
        self.ids: dict[str, str] = {}  # process name -> node id
        self.roles: dict[str, str] = {}  # process name -> what the gateway last said it is
        self.exited: set[str] = set()
        self.replacements: dict[str, Replacement] = {}
        self.unprotected_since: float | None = None
        self.said_why_not = ""
        self.last: dict[str, Any] = {}

    # -- one turn ----------------------------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> Outcome | None:
        now = time.monotonic() if now is None else now
        c = self.cluster
        try:
            info: dict[str, Any] | None = c.status(timeout=2.0)
        except (ColoError, OSError):
            info = None
        if info is not None:
            self.last = info
            ended = service_outcome(info)
            if ended is not None:
                return ended
        gw = c.procs["gateway"]
        if gw.poll() is not None:
            if gw.returncode == 0:
                return Outcome(0, "the service was stopped (the gateway was told to stop: colo down?)")
            return Outcome(EXIT_LOST, f"the gateway {exit_text(gw.returncode)}: the service is gone")
        self._learn_ids(info)
        self._reap(now)
        if info is None:
            return None
        self._track(info, now)
        lost = self._lost(info)
        if lost is not None:
            return lost
        self._maybe_respawn(info, now)
        return None

    # -- what exists ---------------------------------------------------------------------------------------------
    def _learn_ids(self, info: dict[str, Any] | None) -> None:
        for name in self.cluster.procs:
            if name != "gateway" and name not in self.ids:
                ready = self.cluster.ready_info(name)
                if ready and ready.get("node"):
                    self.ids[name] = str(ready["node"])
        if info is None:
            return
        by_id = {}
        nodes = info["nodes"]
        for role in ("primary", "secondary"):
            if nodes.get(role, {}).get("id"):
                by_id[nodes[role]["id"]] = role
        for n in info.get("spares", []):
            by_id[n["id"]] = "spare"
        for name, node in self.ids.items():
            if node in by_id:
                self.roles[name] = by_id[node]

    def _describe(self, name: str) -> str:
        role = self.roles.get(name)
        what = {"primary": "the primary", "secondary": "the secondary", "spare": "a spare"}.get(role or "", "")
        pid = self.cluster.procs[name].pid
        if not what:
            return f"{name} (pid {pid})"
        return f"{what} (pid {pid}{'' if role == name else ', started as ' + name})"

    def _reap(self, now: float) -> None:
        for name, p in self.cluster.procs.items():
            if name == "gateway" or name in self.exited or p.poll() is None:
                continue
            self.exited.add(name)
            rep = self.replacements.get(name)
            if rep is not None and not rep.proven:
                delay = self.policy.failed(now)
                log.warning("up: %s %s before protecting the service (%d in a row): next replacement in %.0f s",
                            self._describe(name), exit_text(p.returncode), self.policy.streak, delay)
            else:
                log.warning("up: %s %s", self._describe(name), exit_text(p.returncode))
            self.on_change()

    def _track(self, info: dict[str, Any], now: float) -> None:
        g, sec = info["gateway"], info["nodes"].get("secondary", {})
        if g.get("protected"):
            for name, rep in self.replacements.items():
                if not rep.proven and self.ids.get(name) == sec.get("id"):
                    rep.proven = True
                    self.policy.proven()
            if self.unprotected_since is not None:
                prim = info["nodes"].get("primary", {})
                log.warning("up: protected again after %.1f s: primary pid %s, secondary pid %s, generation %s",
                            now - self.unprotected_since, prim.get("pid", "?"), sec.get("pid", "?"),
                            g.get("generation", "?"))
                self.unprotected_since = None
                self.said_why_not = ""
        elif self.unprotected_since is None:
            self.unprotected_since = now
        for name, rep in self.replacements.items():
            p = self.cluster.procs[name]
            if p.poll() is None and name not in self.roles and now - rep.started > REGISTER_TIMEOUT:
                log.warning("up: %s did not reach the gateway within %.0f s: stopping it", name, REGISTER_TIMEOUT)
                p.terminate()

    def _lost(self, info: dict[str, Any]) -> Outcome | None:
        """The service is down and nothing that runs holds the guest: no command can bring it back."""
        if info["gateway"].get("service_state") != "down":
            return None
        holders = [n for n, p in self.cluster.procs.items()
                   if n != "gateway" and p.poll() is None and self.roles.get(n) != "spare"]
        if holders:
            return None  # e.g. a silent active node: it may speak again
        why = next((e.get("reason", "") for e in reversed(info.get("events", [])) if e.get("event") == "down"),
                   "no node holds the service")
        return Outcome(EXIT_LOST, f"the service is lost: {why}")

    # -- replacements ------------------------------------------------------------------------------------------
    def _maybe_respawn(self, info: dict[str, Any], now: float) -> None:
        g = info["gateway"]
        if g.get("service_state") != "unprotected" or info.get("spares"):
            return
        if info["nodes"].get("secondary", {}).get("connected"):
            return
        if any(self.cluster.procs[n].poll() is None and n not in self.roles for n in self.replacements):
            return  # one is on its way to the gateway
        why = self.policy.blocked(now)
        if why == "backoff":
            return  # said when the last one failed
        if why is not None:
            n = self.policy.limit
            text = ("respawn is off (--no-respawn)" if n == 0 else
                    f"the --respawn limit is reached ({n} replacement{'s' if n > 1 else ''} in the last hour)")
            if self.said_why_not != text:
                self.said_why_not = text
                log.warning("up: the service runs unprotected: %s%s", text, f"; {self.hint}" if self.hint else "")
            return
        n = self.policy.started(now)
        name = self.cluster.add_secondary()
        self.replacements[name] = Replacement(now)
        log.warning("up: starting %s (pid %d) to protect the service again (%d of at most %d replacements in an "
                    "hour)", name, self.cluster.procs[name].pid, n, self.policy.limit)
        self.on_change()


def service_outcome(info: dict[str, Any]) -> Outcome | None:
    """The guest has ended (powered off: its code; faulted: 125, "VM fault: ...", as `toyvm run`) or an operator
    stopped the service (0)."""
    g = info["gateway"]
    state = g.get("service_state")
    events = info.get("events", [])
    if state == "ended":
        why = next((e.get("reason", "") for e in reversed(events) if e.get("event") == "guest-ended"),
                   "the guest ended")
        return Outcome(int(g.get("ended_code") or 0), why)
    if state == "stopped":
        why = next((e.get("reason", "") for e in reversed(events) if e.get("event") == "shutdown"), "")
        return Outcome(0, f"the service was stopped{': ' + why if why else ''}")
    return None
