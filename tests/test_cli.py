"""The toyvm command: help, exit statuses, signals."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, guest, toyvm_cli


@pytest.mark.parametrize("args", [[], ["run"], ["resume"], ["inspect"]])
def test_help_on_every_command(args: list[str]) -> None:
    r = toyvm_cli(*args, "--help")
    assert r.returncode == 0 and b"usage: toyvm" in r.stdout


def test_hello_prints_and_exits_with_its_code() -> None:
    r = toyvm_cli("run", str(guest("hello")), "--cmdline", "x=1")
    assert r.returncode == 0
    assert r.stdout == b"Hello from a toyvm guest!\ncmdline: x=1\n"


def test_hello_as_elf_gives_the_same_output() -> None:
    flat = toyvm_cli("run", str(guest("hello")))
    elf = toyvm_cli("run", str(guest("hello")).replace(".bin", ".elf"))
    assert elf.returncode == 0 and elf.stdout == flat.stdout


def test_idle_guest_without_input_source() -> None:
    r = toyvm_cli("run", str(guest("kvstore")), timeout=30)
    assert r.returncode == 126 and b"waiting for input" in r.stderr


def test_limits() -> None:
    r = toyvm_cli("run", str(guest("memtouch")), "--cmdline", "pages=4", "--max-seconds", "0.5")
    assert r.returncode == 124 and b"time-limit" in r.stderr
    r = toyvm_cli("run", str(guest("memtouch")), "--cmdline", "pages=4", "--max-instructions", "100000")
    assert r.returncode == 124 and b"instruction-limit" in r.stderr


def test_sigterm_stops_exactly_and_saves(tmp_path: Path) -> None:
    state = tmp_path / "t.state"
    p = subprocess.Popen([sys.executable, "-m", "toyvm", "run", str(guest("memtouch")), "--cmdline",
                          "pages=8 iters=0", "--save", str(state)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert b"state saved" in err and state.exists()
    r = toyvm_cli("resume", str(state), "--max-seconds", "0.3")
    assert r.returncode == 124


def test_ram_from_2_mib_to_1_gib() -> None:
    r = toyvm_cli("run", str(guest("hello")), "--ram", "2M")
    assert r.returncode == 0 and r.stdout.startswith(b"Hello from a toyvm guest!"), r.stderr
    r = toyvm_cli("run", str(guest("memtouch")), "--ram", "1G", "--cmdline", "pages=8 iters=1000")
    assert r.returncode == 0, r.stderr
    assert b"memtouch done: 1000 iterations, 8 pages" in r.stdout
