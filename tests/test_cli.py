"""The toyvm command: help, exit statuses, signals."""
from __future__ import annotations

import hashlib
import json
import os
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


def test_version() -> None:
    from toyvm.version import version

    r = toyvm_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"toyvm {version()} (unicorn ".encode()), r.stdout


@pytest.mark.parametrize("option, value, message", [
    ("--slice-ms", "0", "must be a positive number"),
    ("--slice-ms", "-5", "must be a positive number"),
    ("--slice-ms", "nan", "expected a number"),
    ("--max-seconds", "-1", "must be zero or more"),
    ("--max-seconds", "soon", "expected a number"),
    ("--max-instructions", "0", "must be a positive integer"),
    ("--max-instructions", "1.5", "expected an integer"),
])
def test_bad_option_values_are_usage_errors(option: str, value: str, message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from toyvm.cli import main

    for command in (["run", "guests/hello.bin"], ["resume", "x.state"]):
        with pytest.raises(SystemExit) as e:
            main([*command, option, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: {message}" in err, err


def test_save_is_checked_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toyvm.cli import main

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = [(tmp_path / "missing" / "s.state", "does not exist"), (tmp_path, "is a directory")]
    if os.geteuid() != 0:  # root may write anywhere
        cases.append((locked / "s.state", "is not writable"))
    for path, message in cases:
        with pytest.raises(SystemExit) as e:
            # memtouch iters=0 runs forever: only a check before the run can return here
            main(["run", str(guest("memtouch")), "--cmdline", "iters=0", "--save", str(path)])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "h.state"
    assert toyvm_cli("run", str(guest("hello")), "--ram", "4M", "--cmdline", "j=1", "--save", str(path)).returncode == 0
    r = toyvm_cli("inspect", "--json", str(path))
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    assert state["format"] == "toyvm-state" and state["version"] == 1
    assert state["machine"] == {"ram_size": 4 << 20, "cmdline": "j=1", "exit_code": 0}
    regs = state["cpu"]["regs"]
    assert isinstance(regs["rip"], int) and regs["xmm0"] == "00" * 16  # short byte strings are hex
    ram = state["ram"]
    assert ram["nonzero_pages"] == sum(b - a + 1 for a, b in ram["page_runs"]) > 0
    assert ram["raw_bytes"] == ram["nonzero_pages"] * 4096 and 0 < ram["compressed_bytes"] < ram["raw_bytes"]
    assert any(a <= 0x100000 // 4096 <= b for a, b in ram["page_runs"])  # the image, loaded at 1 MiB


def test_inspect_json_summarises_long_byte_strings() -> None:
    from toyvm.stateview import HEX_LIMIT, page_runs, to_json

    payload = {"devices": {"serial": {"rx": b"ab"}, "net": {"rx": [[1, 2, 3, b"x" * (HEX_LIMIT + 1)]]}},
               "ram": {"pages": bytes.fromhex("05000000" "06000000" "09000000"), "data": b"zz", "raw_size": 3 * 4096}}
    out = to_json(payload)
    assert out["devices"]["serial"]["rx"] == "6162"
    assert out["devices"]["net"]["rx"][0][3] == {"length": HEX_LIMIT + 1,
                                                 "sha256": hashlib.sha256(b"x" * (HEX_LIMIT + 1)).hexdigest()}
    assert out["ram"] == {"nonzero_pages": 3, "page_runs": [[5, 6], [9, 9]], "raw_bytes": 3 * 4096,
                          "compressed_bytes": 2}
    assert page_runs(b"") == []
