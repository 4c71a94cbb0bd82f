"""`colo up` (a replicated guest on this host, kept protected) and `colo down` (stop one from another terminal).

`colo up` checks everything it can before it starts a process (the guest loads, every option is valid, the
name is free), claims its run directory (colo.rundir), starts the roles through LocalCluster with one log file
per role, copies the roles' log lines to its stderr as they come, prints the banner once the pair is protected,
then supervises (colo.supervise) until the guest ends, the service is lost or stopped, or a signal comes. It
always stops its roles on the way out (the roles' lifeline covers the ways out it cannot run code on: SIGKILL).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

from colo import rundir
from colo.auth import load_key
from colo.cluster import LocalCluster, ask_gateway
from colo.errors import ColoError
from colo.messages import CommandResult, ShutdownCommand
from colo.supervise import Outcome, RespawnPolicy, Supervisor, service_outcome
from toyvm import Machine
from toyvm.guests import resolve
from toyvm.ram import parse_size

log = logging.getLogger("colo.up")
START_TIMEOUT = 60.0  # seconds from the first role's start until the pair must be protected
POLL = 0.2  # seconds between looks at the cluster
DOWN_TIMEOUT = 20.0
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}(\d{3})? ")  # colo's log lines start so (--trace: to the us)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_guest(guest: str, ram: str, cmdline: str, hooks: str | None) -> Path:
    """Boot the guest as `toyvm run` would (same checks, same messages), in this process and at once, so that a
    guest that cannot run fails before any role starts."""
    image = resolve(guest)
    vm = Machine(parse_size(ram), hooks=hooks)
    vm.boot(image, cmdline)
    return image.absolute()


class LogTail:
    """Copies the lines the roles (and `colo up` itself) write to the log files in `directory` to `out` as they
    come, in time order: the roles log at `colo up`'s own level (-q, -v), so these are its warnings and errors."""

    def __init__(self, directory: Path, out: IO[str]) -> None:
        self.dir, self.out = directory, out
        self.offsets: dict[Path, int] = {}
        self.last_stamp: dict[Path, str] = {}  # a line without a time (a traceback) goes with the line before it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-tail", daemon=True)

    def start(self) -> LogTail:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.pump()

    def pump(self, final: bool = False) -> None:
        lines: list[tuple[str, int, str]] = []
        for path in sorted(self.dir.glob("*.log")):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            cut = len(data) if final else data.rfind(b"\n") + 1  # whole lines only, until the end
            if cut <= 0:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + cut
            for line in data[:cut].decode(errors="replace").splitlines():
                if m := STAMP.match(line):
                    self.last_stamp[path] = m.group(0).rstrip().ljust(26, "0")  # to the us: --trace lines
                lines.append((self.last_stamp.get(path, ""), len(lines), line))
        if not lines:
            return
        try:
            self.out.write("".join(line + "\n" for _, _, line in sorted(lines)))
            self.out.flush()
        except OSError:
            pass  # our stderr is gone (a closed terminal): the files still have it all

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self.pump(final=True)


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Our own log lines go to `path` meanwhile, so the tail puts them in time order among the roles' lines."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.FileHandler(path)
    if saved:
        handler.setFormatter(saved[0].formatter)
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


def _say(text: str, out: IO[str] = sys.stderr) -> None:
    try:
        print(text, file=out, flush=True)
    except OSError:
        pass  # a closed terminal (SIGHUP): nothing to tell


def cmd_up(args: argparse.Namespace) -> int:
    image = check_guest(args.guest, args.ram, args.cmdline, args.hooks)
    if args.key_file:
        load_key(args.key_file)  # a missing or bad key file fails here, not in three roles
    me = {"pid": os.getpid(), "start": rundir.proc_start(os.getpid())}
    info: dict[str, Any] = {"guest": str(image), "mode": args.mode, "state": "starting", "procs": {"up": me},
                            "encrypt": args.encrypt, "stats": args.stats}
    run = rundir.claim(str(image), args.name, info)
    info["name"] = run.name
    log.info("up: cluster %r in %s", run.name, run.dir)

    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stopping:  # the first one interrupts whatever we wait for; later ones: we are stopping already
            stopping.append(signum)
            raise Interrupted(signum)

    outcome: Outcome | None = None
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)
        with _logging_to(run.dir / "up.log"):
            tail = LogTail(run.dir, sys.stderr).start()
            try:
                outcome = _run(args, image, run, info, stopping)
            finally:
                tail.stop()
    except Interrupted:  # a signal just before _run's own stop began: _run stopped the cluster on its way out
        outcome = Outcome(128 + stopping[0], f"stopped by {signal.Signals(stopping[0]).name}")
    finally:
        rundir.remove(run.dir)
    assert outcome is not None
    by_signal = bool(stopping) and stopping[0] != 0 and outcome.code == 128 + stopping[0]
    if not (args.quiet and (outcome.code == 0 or by_signal)):  # -q: only what went wrong
        _say(f"colo up: {outcome.message}")
    return outcome.code


def _run(args: argparse.Namespace, image: Path, run: rundir.Cluster, info: dict[str, Any],
         stopping: list[int]) -> Outcome:
    """Start the cluster, wait for protection, supervise; always stop the cluster on the way out."""
    cluster = LocalCluster(str(image), ram=args.ram, cmdline=args.cmdline, interval_ms=args.interval,
                           service=args.service, stats=args.stats, trace=args.trace,
                           heartbeat_timeout=args.heartbeat_timeout, hooks=args.hooks, directory=run.dir,
                           verbose=args.verbose, quiet=args.quiet, mode=args.mode, backstop_ms=args.backstop,
                           copy=args.copy, checkpoint_mode=args.checkpoint_mode, delta=args.delta,
                           encrypt=args.encrypt, key_file=Path(args.key_file).absolute() if args.key_file else None,
                           logs=True, sched=args.sched, pin=args.pin)
    cluster.quote_logs = False  # the tail shows every line the roles write already
    cluster.trace_file, cluster.trace_filter, cluster.trace_hex = args.trace_file, args.trace_filter, args.trace_hex
    me = info["procs"]["up"]

    def record(state: str | None = None) -> None:
        if state is not None:
            info["state"] = state
        info.update(key_file=str(cluster.key_file), gateway=list(cluster.gateway) if cluster.gateway[1] else None,
                    service=list(cluster.service_address) if cluster.service_address[1] else None)
        alive = cluster.alive()
        info["pids"] = alive
        info["procs"] = {"up": me, **{n: {"pid": p, "start": rundir.proc_start(p)} for n, p in alive.items()}}
        info["nodes"] = {n: r["node"] for n in cluster.procs if (r := cluster.ready_info(n)) and r.get("node")}
        rundir.write_info(run.dir, info)

    try:
        cluster.start()
        record()
        outcome = _wait_protected(cluster)
        if outcome is not None:
            return outcome
        record("protected")
        _banner(image, args.mode, run.name, cluster)
        respawn = 0 if args.no_respawn else args.respawn
        hint = "add one with: colo secondary --gateway %s:%d --key-file %s" % (*cluster.gateway, cluster.key_file)
        sup = Supervisor(cluster, RespawnPolicy(respawn), on_change=record, hint=hint)
        while outcome is None:
            time.sleep(POLL)
            outcome = sup.poll()
        return outcome
    except Interrupted as e:
        return Outcome(128 + e.signum, f"stopped by {signal.Signals(e.signum).name}")
    finally:
        stopping.append(0)  # from here on a signal changes nothing: we are stopping
        codes = cluster.stop()
        log.info("up: stopped (%s)", ", ".join(f"{n} {c}" for n, c in codes.items()))


def _wait_protected(cluster: LocalCluster) -> Outcome | None:
    """Wait until the pair is protected (None), or the guest ended first (hello.bin may end in microseconds:
    its outcome); a role that dies first is an error."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        ended, info = _look(cluster)
        if ended is not None:
            return ended
        if info is not None and info["gateway"].get("protected"):
            return None
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                ended, _ = _look(cluster)  # the primary leaves right after telling the gateway its guest ended
                if ended is not None:
                    return ended
                raise ColoError(cluster.exit_message(name, "before the service was protected", tail=False))
        if time.monotonic() > deadline:
            raise ColoError(f"the service was not protected within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _look(cluster: LocalCluster) -> tuple[Outcome | None, dict[str, Any] | None]:
    try:
        info = cluster.status(timeout=2.0)
    except (ColoError, OSError):
        return None, None
    return service_outcome(info), info


def _banner(image: Path, mode: str, name: str, cluster: LocalCluster) -> None:
    host, port = cluster.service_address
    others = len(rundir.live_clusters()) > 1
    sel = f" --name {name}" if others else ""
    lines = [f"colo up: {image.name} is replicated ({mode} mode) as cluster {name!r}; clients "
             f"connect to {host}:{port}"]
    if image.stem == "kvstore":
        lines.append(f"  e.g. redis-cli -p {port} PING")
    lines.append(f"  colo status{sel} shows the roles; colo failover{sel} forces a failover; "
                 f"colo down{' ' + name if others else ''} (or Ctrl-C) stops everything")
    _say("\n".join(lines), sys.stdout)


# -- colo down ---------------------------------------------------------------------------------------------------
def cmd_down(args: argparse.Namespace, key_for: Any) -> int:
    """Shut the cluster's service down through its gateway (no failover, no loss logged), wait for every process
    it recorded to go; SIGTERM, then SIGKILL, what outlives `--timeout`."""
    c = rundir.select(args.name)
    before = c.live_procs()
    sent = False
    if c.gateway is not None:
        try:
            res: CommandResult = ask_gateway(c.gateway, key_for(c), ShutdownCommand("colo down"), CommandResult,
                                             encrypt=c.info.get("encrypt", True) if args.encrypt is None
                                             else args.encrypt)
            sent = res.ok
        except (ColoError, OSError) as e:
            log.warning("down: the gateway of %s does not answer (%s): signalling colo up", c.name, e)
    up = c.procs.get("up")
    if not sent and up is not None and rundir.proc_alive(int(up["pid"]), up.get("start")):
        os.kill(int(up["pid"]), signal.SIGTERM)
    left = _wait_gone(c, args.timeout)
    forced: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        for n, pid in left.items():
            try:
                os.kill(pid, sig)
                forced.append(f"{n} {sig.name}")
            except ProcessLookupError:
                pass
        left = _wait_gone(c, 5.0)
    pids = ", ".join(f"{n} {p}" for n, p in before.items())
    if left:
        print(f"colo down: {c.name}: still running after SIGKILL: {left}", file=sys.stderr)
        return 1
    rundir.remove(c.dir)  # colo up removes it when it stops itself; not when it was killed
    print(f"colo down: stopped {c.name} ({pids}){'; had to send ' + ', '.join(forced) if forced else ''}")
    return 0


def _wait_gone(c: rundir.Cluster, timeout: float) -> dict[str, int]:
    """Wait for every process the cluster recorded to end; what still runs at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        now = rundir.read(c.dir)  # colo up records the replacements it starts meanwhile
        if now is not None:
            c.info["procs"] = {**c.procs, **now.procs}
        left = c.live_procs()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
