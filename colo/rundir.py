"""Where `colo up` clusters live on this host: one run directory per cluster, named, under one run root.

The run root is $COLO_RUN_DIR, else $XDG_RUNTIME_DIR/colo-UID, else TMPDIR/colo-UID. A cluster's directory is
ROOT/NAME and holds its `up.json` (who runs it: the pid of `colo up` and of every role it started, with their
start times, the gateway's addresses, the key file), its generated key, the roles' ready files and logs. Nothing
outside its own directory is ever written by a cluster.

A cluster is live while any process it recorded runs (the same pid *and* start time: a recycled pid does not
count). A directory whose processes are all gone belongs to a dead cluster (say a `colo up` killed with SIGKILL
before it could clean up): it is removed by the next command that looks.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colo.errors import ColoError

log = logging.getLogger("colo.rundir")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
UP_FILE = "up.json"


def run_root() -> Path:
    base = os.environ.get("COLO_RUN_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"colo-{os.getuid()}"


def check_name(text: str) -> str:
    """A cluster name: 1 to 64 of A-Z a-z 0-9 _ . - (it is a directory name), not '.' or '..'."""
    if not NAME_RE.fullmatch(text) or text in (".", ".."):
        raise ValueError(f"bad cluster name {text!r}: use 1 to 64 letters, digits, '_', '.' or '-'")
    return text


def name_argument(text: str) -> str:
    """An argparse `type=` for --name."""
    try:
        return check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_name(guest: str) -> str:
    """The guest's stem, made a valid name ("kvstore" for guests/kvstore.bin)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(guest).stem).strip(".")[:64]
    return stem or "colo"


# -- processes ------------------------------------------------------------------------------------------------
def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a pid from its reuse; None if
    the process is gone, is a zombie, or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of stat(5); fields[0] is field 3


def proc_alive(pid: int, start: str | None = None) -> bool:
    """The process `pid` runs, and is the one that started at `start` when that is known."""
    if pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        now = proc_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- clusters -------------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """One run directory and what its up.json says."""

    name: str
    dir: Path
    info: dict[str, Any]

    @property
    def procs(self) -> dict[str, dict[str, Any]]:
        """Every process recorded: "up" (colo up itself) and each role it started, as {"pid", "start"}."""
        return dict(self.info.get("procs", {}))

    def live_procs(self) -> dict[str, int]:
        return {name: int(p["pid"]) for name, p in self.procs.items() if proc_alive(int(p["pid"]), p.get("start"))}

    def live(self) -> bool:
        return bool(self.live_procs())

    @property
    def gateway(self) -> tuple[str, int] | None:
        g = self.info.get("gateway")
        return (str(g[0]), int(g[1])) if g else None

    @property
    def key_file(self) -> Path | None:
        k = self.info.get("key_file")
        return Path(k) if k else None

    def row(self) -> tuple[str, str, str, str]:
        """(name, guest, service address, pids) as the listing shows them."""
        service = self.info.get("service")
        pids = ", ".join(f"{n} {p}" for n, p in self.live_procs().items())
        return (self.name, Path(self.info.get("guest", "?")).name, "%s:%d" % tuple(service) if service else
                "(starting)", pids or "none")

    def describe(self) -> str:
        _, guest, service, pids = self.row()
        return f"guest {guest}, clients on {service}, pids: {pids}"


def table(clusters: list[Cluster]) -> str:
    """The clusters as aligned rows under a header."""
    rows = [("name", "guest", "service", "pids"), *(c.row() for c in clusters)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
                     for r in rows)


def read(directory: Path) -> Cluster | None:
    try:
        info = json.loads((directory / UP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return Cluster(directory.name, directory, dict(info)) if isinstance(info, dict) else None


def write_info(directory: Path, info: dict[str, Any]) -> None:
    """Replace up.json whole (a reader never sees half a file)."""
    tmp = directory / (UP_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(directory / UP_FILE)


def remove(directory: Path) -> None:
    """A stopped cluster's directory goes: its key, records and logs were for that run only."""
    shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise claiming and cleaning between `colo` processes of this user (flock: freed if one dies)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _scan(root: Path) -> list[Cluster]:
    """The live clusters under `root`; the directories of dead ones are removed (call with the lock held)."""
    live: list[Cluster] = []
    if not root.is_dir():
        return live
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or not NAME_RE.fullmatch(d.name):
            continue
        c = read(d)
        if c is not None and c.live():
            live.append(c)
            continue
        log.info("rundir: removed %s: %s", d, "no colo up record" if c is None else
                 f"the cluster {c.name!r} is dead (none of its processes runs)")
        shutil.rmtree(d, ignore_errors=True)
    return live


def live_clusters(root: Path | None = None) -> list[Cluster]:
    root = root or run_root()
    if not root.is_dir():
        return []
    with _locked(root):
        return _scan(root)


def claim(guest: str, name: str | None, info: dict[str, Any], root: Path | None = None) -> Cluster:
    """Make this process's run directory: `name`, or the guest's stem made unique with -2, -3... among live
    clusters. up.json is written at once (with our pid), so the name is ours from here on."""
    root = root or run_root()
    with _locked(root):
        live = {c.name: c for c in _scan(root)}
        if name is not None:
            if name in live:
                raise ColoError(f"a cluster named {name!r} is already running ({live[name].describe()}): pick "
                                f"another --name, or stop it with `colo down {name}`")
            chosen = name
        else:
            base = default_name(guest)
            chosen, n = base, 1
            while chosen in live or (root / chosen).exists():
                n += 1
                chosen = f"{base[:60]}-{n}"
        d = root / chosen
        shutil.rmtree(d, ignore_errors=True)  # a dead cluster's leftovers (_scan keeps none, but be sure)
        d.mkdir(mode=0o700)
        write_info(d, info)
        return Cluster(chosen, d, info)


def select(name: str | None, root: Path | None = None) -> Cluster:
    """The cluster a control command means: `name`, or the only one running; else an error that lists them."""
    root = root or run_root()
    live = live_clusters(root)
    if name is not None:
        for c in live:
            if c.name == name:
                return c
        running = f" (running: {', '.join(c.name for c in live)})" if live else ""
        raise ColoError(f"no cluster named {name!r} is running on this host{running}")
    if not live:
        raise ColoError(f"no `colo up` is running on this host (nothing in {root}); give --gateway to reach "
                        f"another gateway")
    if len(live) > 1:
        raise ColoError(f"{len(live)} clusters are running on this host: pick one with --name NAME\n{table(live)}")
    return live[0]
