#!/usr/bin/env python3
"""`make demo`: the kvstore guest, running inside toyvm's emulated x86-64 machine, serving real Redis clients.

It boots guests/kvstore.bin with `python -m toyvm run ... --net-listen 127.0.0.1:0`, talks to it with the real
redis-cli, measures it with redis-benchmark, then stops the VM with SIGTERM and shows how it exited.
With --keep it leaves the VM running for you to try by hand (Ctrl-C stops it).
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "guests" / "kvstore.bin"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LISTENING = re.compile(r"toyvm: listening on (\S+):(\d+)")
RPS = re.compile(r"^\s*([A-Z_]+): ([\d.]+) requests per second", re.MULTILINE)


def say(text: str = "") -> None:
    print(text, flush=True)


class VM:
    """The toyvm process, with its serial output (stdout) and log (stderr) drained by two threads."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.argv = [sys.executable, "-m", "toyvm", "run", str(IMAGE.relative_to(ROOT)), "--net-listen", f"{HOST}:0"]
        # Its own session: a Ctrl-C in the terminal reaches only this script, which then stops the VM with SIGTERM.
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.serial: list[str] = []
        self.log: list[str] = []
        self._ports: queue.Queue[int | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.serial, False), daemon=True).start()
        self._log_reader = threading.Thread(target=self._drain, args=(self.proc.stderr, self.log, True), daemon=True)
        self._log_reader.start()
        self.port = self._wait_for_port()

    def _drain(self, stream, lines: list[str], watch_for_port: bool) -> None:  # type: ignore[no-untyped-def]
        announced = False
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            m = LISTENING.search(line) if watch_for_port and not announced else None
            if m:
                announced = True
                self._ports.put(int(m.group(2)))
        if watch_for_port and not announced:
            self._ports.put(None)

    def _wait_for_port(self) -> int:
        try:
            port = self._ports.get(timeout=START_TIMEOUT)
        except queue.Empty:
            port = None
        if port is None:
            self.stop()
            raise SystemExit("demo: toyvm did not start listening:\n  " + "\n  ".join(self.log or ["(no output)"]))
        return port

    def wait_for_serial(self, text: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.serial):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def stop(self) -> int:
        """SIGTERM, then wait; a VM that ignores it is killed. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say(f"  toyvm did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self._log_reader.join(timeout=STOP_TIMEOUT)
        return self.proc.returncode


def redis_cli(port: int, *args: str) -> tuple[str, bool]:
    """Run redis-cli and return what it prints, formatted as in a terminal (--no-raw), and whether it worked."""
    try:
        p = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), "--no-raw", *args], capture_output=True,
                           text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "(no reply within 10 s)", False
    out = (p.stdout + p.stderr).rstrip("\n")
    return out, p.returncode == 0


def show_commands(port: int) -> tuple[int, int]:
    """Run a few commands, print each with its reply; returns (commands run, replies as expected)."""
    steps: list[tuple[list[str], str]] = [  # (arguments, the reply redis-cli should print)
        (["PING"], "PONG"),
        (["SET", "demo:greeting", "hello from inside the VM"], "OK"),
        (["GET", "demo:greeting"], '"hello from inside the VM"'),
        (["INCR", "demo:visits"], "(integer) 1"),
        (["INCR", "demo:visits"], "(integer) 2"),
        (["INCR", "demo:visits"], "(integer) 3"),
        (["SET", "demo:temporary", "soon gone"], "OK"),
        (["EXISTS", "demo:greeting", "demo:visits", "demo:nothing"], "(integer) 2"),
        (["DBSIZE"], "(integer) 3"),
        (["DEL", "demo:temporary", "demo:nothing"], "(integer) 1"),
        (["GET", "demo:temporary"], "(nil)"),
        (["DBSIZE"], "(integer) 2"),
        (["INCR", "demo:greeting"], "(error) ERR value is not an integer or out of range"),
    ]
    good = 0
    for args, want in steps:
        shown = " ".join(a if re.fullmatch(r"[\w:.-]+", a) else f'"{a}"' for a in args)
        got, ok = redis_cli(port, *args)
        ok = ok and got == want
        good += ok
        say(f"  $ redis-cli -p {port} {shown}")
        say(f"  {got}" + ("" if ok else f"    <-- unexpected: wanted {want}"))
    return len(steps), good


def run_benchmark(port: int) -> tuple[dict[str, float], bool]:
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "set,get", "-n", "10000", "-q"]
    say(f"  $ {' '.join(argv[:1] + argv[3:])}")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        say("  redis-benchmark did not finish within 60 s")
        return {}, False
    # -q redraws a progress line with carriage returns; keep the final line of each test, and any warning.
    for line in (p.stdout + p.stderr).replace("\r", "\n").splitlines():
        if RPS.match(line) or line.startswith(("WARNING", "ERROR", "Error")):
            say(f"  {line.strip()}")
    if "Could not fetch server CONFIG" in p.stderr:
        say("  (redis-benchmark first asks for the server's CONFIG; the guest does not implement CONFIG, so it")
        say("  warns and goes on: harmless)")
    rps = {name: float(v) for name, v in RPS.findall(p.stdout.replace("\r", "\n"))}
    return rps, p.returncode == 0 and set(rps) == {"SET", "GET"} and all(v > 0 for v in rps.values())


def keep_running(vm: VM) -> None:
    say()
    say("The VM keeps running. Try it from another terminal:")
    say(f"  redis-cli -p {vm.port}")
    say(f"  redis-benchmark -p {vm.port} -q -t set,get,incr -c 50")
    say("Press Ctrl-C here to stop it.")
    try:
        while vm.proc.poll() is None:
            time.sleep(0.2)
        say(f"toyvm exited by itself (status {vm.proc.returncode})")
    except KeyboardInterrupt:
        say()


def describe_exit(status: int) -> str:
    if status == 128 + signal.SIGTERM:
        return f"exit status {status} = 128 + SIGTERM: toyvm caught the signal, stopped the guest and exited cleanly"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit status {status}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--keep", action="store_true", help="leave the VM running afterwards (Ctrl-C stops it)")
    args = ap.parse_args(argv)

    missing = [tool for tool in ("redis-cli", "redis-benchmark") if shutil.which(tool) is None]
    if missing:
        print(f"demo: {' and '.join(missing)} not found. Install Debian's redis-tools "
              "(sudo apt-get install redis-tools), or run scripts/need-redis-tools.", file=sys.stderr)
        return 1
    if not IMAGE.exists():
        print(f"demo: {IMAGE.relative_to(ROOT)} is not built: run `make guests` first.", file=sys.stderr)
        return 1

    say("=" * 78)
    say("toyvm demo: a Redis-compatible key-value store running as a guest program")
    say("=" * 78)
    say(f"guests/kvstore.bin is a freestanding C program ({IMAGE.stat().st_size} bytes, no OS underneath). toyvm")
    say("boots it in an x86-64 machine emulated in Python on Unicorn. The guest has no sockets: it sees a")
    say("network device through I/O ports, and toyvm turns every real TCP client into a connection of that")
    say("device. So the unmodified redis-cli and redis-benchmark below are talking to code running in the VM.")
    say()
    started = time.monotonic()
    say(f"Starting: python -m toyvm run {IMAGE.relative_to(ROOT)} --net-listen {HOST}:0  (port 0: any free port)")
    vm = VM()
    total = good = 0
    rps: dict[str, float] = {}
    bench_ok = interrupted = False
    try:
        ready = vm.wait_for_serial("kvstore: ready")
        say(f"  toyvm: listening on {HOST}:{vm.port}")
        for line in vm.serial:
            say(f"  guest serial: {line}")
        if not ready:
            say("  (the guest has not reported ready yet)")
        say()
        say("1. redis-cli, one command at a time:")
        total, good = show_commands(vm.port)
        say()
        say("2. redis-benchmark, 50 parallel clients (its default), 10000 requests per test:")
        rps, bench_ok = run_benchmark(vm.port)
        say()
        if args.keep:
            keep_running(vm)
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted")
    finally:
        status = vm.stop()
    elapsed = time.monotonic() - started
    clean = status == 128 + signal.SIGTERM
    say("3. Stopping the VM with SIGTERM:")
    for line in vm.log:
        if "listening on" not in line:
            say(f"  {line}")
    say(f"  {describe_exit(status)}")
    say()
    say("Summary")
    say(f"  redis-cli:       {good}/{total} replies as expected")
    if rps:
        say("  redis-benchmark: " + ", ".join(f"{name} {v:,.0f} requests/s" for name, v in rps.items()))
    else:
        say("  redis-benchmark: no results")
    say(f"  VM stop:         {'clean' if clean else 'NOT clean'}; whole demo took {elapsed:.1f} s")
    ok = good == total and bench_ok and clean and not interrupted
    if not ok:
        say("demo: something did not work as expected (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
