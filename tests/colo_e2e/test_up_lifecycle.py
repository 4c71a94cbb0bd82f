"""`colo up` from start to end: it fails fast (and starts nothing) on a bad guest or option, with toyvm's messages;
it ends with the guest's exit code (125 and the fault on a VM fault); every way `colo up` can end ends its roles
(SIGHUP, SIGINT, SIGTERM: cleanly, with 128+N; SIGKILL: through the lifeline); the lifeline and the parent-death
signal each stop a role on their own; --key-file, -q and the console reach the roles.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colo.lifeline import Lifeline
from colo_e2e.helpers import child_env, wait_for
from colo_e2e.up import Up, colo, wait_gone
from conftest import ROOT, asm, guest, toyvm_cli

FAULT_LOOP = 200_000  # iterations before the bad store: the guest runs a little first, as a real one would


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (the roles carry their run directory in --key-file)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def toyvm_message(*args: str) -> str:
    """What `toyvm run` says after "toyvm: error: " for the same guest."""
    r = toyvm_cli("run", *args)
    err = r.stderr.decode()
    assert r.returncode == 125 and "toyvm: error: " in err, err
    return err.split("toyvm: error: ", 1)[1].strip()


# -- fail fast ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guest_arg", ["nonexistent.bin", "guests", "/bin/ls"])
def test_a_guest_that_cannot_run_fails_fast_with_toyvms_message(guest_arg: str, tmp_path: Path) -> None:
    if not Path("/bin/ls").exists() and guest_arg == "/bin/ls":
        pytest.skip("no /bin/ls")
    expected = toyvm_message(guest_arg)
    t0 = time.monotonic()
    r = colo(tmp_path / "run", "up", guest_arg)
    took = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip() == f"colo up: error: {expected}", r.stderr
    assert "replicated" not in r.stdout and "Traceback" not in r.stderr
    assert took < 10, f"colo up took {took:.1f} s to refuse"
    assert not (tmp_path / "run").exists() or not [d for d in (tmp_path / "run").iterdir() if d.is_dir()]
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.parametrize("args, message", [
    (["--ram", "banana"], "argument --ram: bad size 'banana': expected e.g. 64M, 1G or a byte count"),
    (["--ram", "1M"], "argument --ram: RAM size 1 MiB is outside the supported 2 MiB .. 4 GiB"),
    (["--interval", "0"], "argument --interval: must be a positive number, got 0"),
    (["--backstop", "-5"], "argument --backstop: must be a positive number, got -5"),
    (["--heartbeat-timeout", "-1"], "argument --heartbeat-timeout: must be a positive number, got -1"),
    (["--interval", "nan"], "argument --interval: expected a number, got nan"),
    (["--respawn", "-1"], "argument --respawn: must be 0 or more, got -1"),
    (["--name", "a/b"], "argument --name: bad cluster name 'a/b'"),
    (["--stats", "/nonexistent-dir/s.jsonl"], "argument --stats: directory '/nonexistent-dir' does not exist"),
    (["--key-file", "/nonexistent-key"], "cannot read key file '/nonexistent-key'"),
    (["--cmdline", "x" * 5000], "command line is 5000 bytes; the limit is 4000"),
])
def test_a_bad_option_fails_fast_and_starts_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    r = colo(tmp_path / "run", "up", str(guest("hello")), *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr and "colo up: error: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "replicated" not in r.stdout
    assert processes_mentioning(str(tmp_path)) == []


def test_a_role_that_cannot_start_ends_colo_up_with_its_error(tmp_path: Path) -> None:
    """The service port is taken: the gateway cannot start; colo up says what the gateway said, and why it ends."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = colo(tmp_path / "run", "up", str(guest("kvstore")), "--ram", "16M", "--service", f"127.0.0.1:{port}")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert f"colo gateway: error: cannot listen on 127.0.0.1:{port}: Address already in use" in lines, r.stderr
    assert lines[-1] == "colo up: error: the gateway exited with status 2 while starting", r.stderr
    assert "replicated" not in r.stdout
    assert processes_mentioning(str(tmp_path)) == []
    assert not [d for d in (tmp_path / "run").iterdir() if d.is_dir()]


def test_the_toyvm_option_messages_are_the_same() -> None:
    """The shared option types: what `toyvm run --slice-ms 0` says is what `colo up --interval 0` says."""
    r = toyvm_cli("run", "hello", "--slice-ms", "0")
    assert "argument --slice-ms: must be a positive number, got 0" in r.stderr.decode()


# -- the guest ends --------------------------------------------------------------------------------------------
def test_a_guest_that_powers_off_ends_colo_up_with_its_output_and_code(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = colo(tmp_path / "run", "up", str(guest("hello")), "--ram", "16M", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.count("Hello from a toyvm guest!") == 1, r.stdout
    assert "colo up: the guest powered off with exit code 0" in r.stderr, r.stderr
    assert took < 20, f"colo up took {took:.1f} s for hello"
    assert not [d for d in (tmp_path / "run").iterdir() if d.is_dir()], "the run directory was left behind"
    assert processes_mentioning(str(tmp_path)) == []


def test_the_guest_exit_code_is_colo_ups(tmp_path: Path) -> None:
    image = tmp_path / "exit7.bin"
    image.write_bytes(asm("mov rcx, 1000\n1: dec rcx\njnz 1b\nmov eax, 7\nmov dx, 0x500\nout dx, eax\nhlt\n"))
    r = colo(tmp_path / "run", "up", str(image), "--ram", "16M", timeout=60)
    assert r.returncode == 7, (r.returncode, r.stderr)
    assert "colo up: the guest powered off with exit code 7" in r.stderr, r.stderr


def test_a_faulting_guest_ends_colo_up_with_125_and_the_fault(tmp_path: Path) -> None:
    image = tmp_path / "fault.bin"
    image.write_bytes(asm(f"mov rcx, {FAULT_LOOP}\n1: dec rcx\njnz 1b\n"
                          "mov rax, 0x40000000\nmov qword ptr [rax], 1\nhlt\n"))
    expected = toyvm_cli("run", str(image), "--ram", "16M")
    assert expected.returncode == 125
    fault = expected.stderr.decode().strip().removeprefix("toyvm: ")
    assert fault.startswith("VM fault: ") and "0x40000000" in fault, fault
    r = colo(tmp_path / "run", "up", str(image), "--ram", "16M", timeout=60)
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert f"colo up: {fault}" in r.stderr.splitlines(), r.stderr
    assert processes_mentioning(str(tmp_path)) == []


# -- every way colo up ends, ends its roles --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_stops_the_cluster_cleanly(sig: signal.Signals, tmp_path: Path) -> None:
    up = Up(tmp_path / "run", tmp_path)
    try:
        pids = up.wait_up()["pids"]
        assert set(pids) == {"gateway", "primary", "secondary"}
        up.proc.send_signal(sig)
        assert up.wait(20) == 128 + sig, up.stderr()
        assert f"colo up: stopped by {sig.name}" in up.stderr()
        wait_gone(pids, 5, f"after {sig.name}")
        assert not (tmp_path / "run" / "kvstore").exists()
        # Stopped through the gateway: no failover started, no node was lost.
        assert "promote" not in up.stderr() and "lost" not in up.stderr(), up.stderr()
    finally:
        up.close()


@pytest.mark.slow
def test_sigkill_of_colo_up_ends_every_role(tmp_path: Path) -> None:
    up = Up(tmp_path / "run", tmp_path)
    try:
        pids = up.wait_up()["pids"]
        up.proc.kill()
        up.wait(5)
        took = wait_gone(pids, 5, "after SIGKILL of colo up")
        print(f"roles gone {took:.2f} s after SIGKILL of colo up")
        # Its run directory is left behind (nothing ran to remove it) and is recognised as dead.
        assert (tmp_path / "run" / "kvstore" / "up.json").exists()
        r = colo(tmp_path / "run", "status", "-v")
        assert r.returncode == 2 and "no `colo up` is running" in r.stderr, r.stderr
        assert "removed" in r.stderr and "the cluster 'kvstore' is dead" in r.stderr, r.stderr
        assert not (tmp_path / "run" / "kvstore").exists()
    finally:
        up.close()


def _lifeline_gateway(tmp_path: Path, lifeline: int, middle: bool = False) -> subprocess.Popen[bytes]:
    key = tmp_path / "key"
    colo(tmp_path, "keygen", str(key))
    ready = tmp_path / "gateway.json"
    cmd = [sys.executable, "-m", "colo", "gateway", "--key-file", str(key), "--lifeline", str(lifeline),
           "--ready-file", str(ready)]
    if middle:  # started by a middle process that we can kill, while we keep the lifeline open
        cmd = [sys.executable, "-c", "import subprocess, sys, time; "
               f"subprocess.Popen({cmd!r}, pass_fds=({lifeline},)); time.sleep(120)"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), pass_fds=(lifeline,), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gateway.err", "wb"),
                         start_new_session=True)
    wait_for(ready.exists, 20, "the gateway to start")
    return p


def test_the_lifeline_alone_stops_a_role(tmp_path: Path) -> None:
    life = Lifeline()  # the starter's end, as LocalCluster holds it
    p = _lifeline_gateway(tmp_path, life.pass_fds[0])
    try:
        assert p.poll() is None and life.args() == ["--lifeline", str(life.pass_fds[0])]
        life.close()  # as if its starter died: the lifeline reaches EOF; its parent (us) lives on
        life.close()  # letting go twice is harmless
        assert not life.open and life.args() == [] and life.pass_fds == ()
        assert p.wait(5) == 0  # the gateway's own clean stop (SIGTERM)
        assert "the lifeline closed" in (tmp_path / "gateway.err").read_text()
    finally:
        if p.poll() is None:
            p.kill()


def test_the_parent_death_signal_alone_stops_a_role(tmp_path: Path) -> None:
    r, w = os.pipe()
    middle = _lifeline_gateway(tmp_path, r, middle=True)
    os.close(r)
    try:
        gw = int(json.loads((tmp_path / "gateway.json").read_text())["pid"])
        middle.kill()  # its parent dies; the lifeline stays open (we hold its write end)
        middle.wait(5)
        wait_gone({"gateway": gw}, 5, "after its parent was killed")
    finally:
        os.close(w)
        if middle.poll() is None:
            middle.kill()


@pytest.mark.slow
def test_colo_up_stops_with_its_lifeline(tmp_path: Path) -> None:
    """The tests' `Up` ties `colo up` to the test run: when that end closes (a killed pytest), `colo up` stops as
    SIGTERM stops it, roles included."""
    up = Up(tmp_path / "run", tmp_path, "--name", "tied")
    try:
        pids = up.wait_up()["pids"]
        up.let_go()
        assert up.wait(20) == 143, up.stderr()
        wait_gone(pids, 10, "after the lifeline of colo up closed")
        assert "the lifeline closed" in up.stderr(), up.stderr()
    finally:
        up.close()


# -- what reaches the roles ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_key_file_and_quiet_reach_the_roles(tmp_path: Path) -> None:
    key = tmp_path / "my.key"
    assert colo(tmp_path, "keygen", str(key)).returncode == 0
    up = Up(tmp_path / "run", tmp_path, "--key-file", str(key), "-q", "--name", "q")
    try:
        info = up.wait_up()
        assert info["key_file"] == str(key) and not (tmp_path / "run" / "q" / "key").exists()
        for role, pid in info["pids"].items():
            args = cmdline(pid)
            assert args[args.index("--key-file") + 1] == str(key) and "-q" in args, (role, args)
            assert "--lifeline" in args, (role, args)
        st = up.status("--key-file", str(key))
        assert st["gateway"]["protected"]
        assert up.stderr() == "", up.stderr()  # -q: nothing but errors
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(20) == 143
        assert up.stderr() == "", up.stderr()
        assert key.exists(), "colo up removed a key file it did not make"
    finally:
        up.close()


@pytest.mark.slow
def test_hybrid_mode_prints_the_console_once(tmp_path: Path) -> None:
    """Both VMs run counter; only the active node prints: each line once, as `toyvm run counter` prints it."""
    args = ["--cmdline", "count=10 interval_ms=150"]
    expected = toyvm_cli("run", "counter", *args).stdout.decode()
    r = colo(tmp_path / "run", "up", str(guest("counter")), "--mode", "hybrid", "--ram", "16M", *args, timeout=90)
    assert r.returncode == 0, (r.returncode, r.stderr)
    def ticks(text: str) -> list[str]:
        return re.findall(r"^tick \d+", text, re.MULTILINE)
    assert ticks(r.stdout) == ticks(expected) and len(ticks(expected)) == 10, r.stdout
