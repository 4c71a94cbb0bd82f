"""A guest is given by path or by a bundled guest's name, for toyvm and colo alike (toyvm.guests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GUESTS, ROOT
from toyvm import guests
from toyvm.errors import LoadError

NAMES = ["counter", "hello", "kvstore", "memtouch", "noisy"]


def test_a_checkout_uses_the_repository_guests() -> None:
    assert guests.bundled_dir() == GUESTS
    assert guests.bundled_names() == NAMES
    assert guests.resolve("kvstore") == GUESTS / "kvstore.bin"
    assert guests.resolve("hello.elf") == GUESTS / "hello.elf"
    assert guests.bundled("noisy") == GUESTS / "noisy.bin"


def test_an_installed_package_uses_its_own_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "guest_images").mkdir()
    (tmp_path / "guest_images" / "solo.bin").write_bytes(b"\xf4")
    monkeypatch.setattr(guests, "_HERE", tmp_path)
    assert guests.bundled_names() == ["solo"]
    assert guests.resolve("solo") == tmp_path / "guest_images" / "solo.bin"
    with pytest.raises(LoadError, match=r"bundled guests: solo\)"):
        guests.resolve("hello")


def test_an_existing_file_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hello").write_bytes(b"\xf4")
    (tmp_path / "kvstore").mkdir()  # a directory is not a guest: the name still means the bundled one
    assert guests.resolve("hello") == Path("hello")
    assert guests.resolve("kvstore") == GUESTS / "kvstore.bin"
    assert guests.resolve(tmp_path) == tmp_path  # an existing non-file path: the loader says what is wrong


@pytest.mark.parametrize("text", ["nope", "Makefile", "runtime", "../guests/hello", "", "hello.c", "./hello"])
def test_unknown_names_list_the_bundled_guests(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if text == "":
        with pytest.raises(LoadError):
            guests.bundled(text)
        return
    with pytest.raises(LoadError) as e:
        guests.resolve(text)
    assert f"bundled guests: {', '.join(NAMES)}" in str(e.value)


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", tool, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=60)


def test_toyvm_run_by_name_from_anywhere(tmp_path: Path) -> None:
    r = _run("toyvm", "run", "hello", "--cmdline", "by=name", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "Hello from a toyvm guest!\ncmdline: by=name\n", r.stderr
    r = _run("toyvm", "run", "hellp", cwd=tmp_path)
    assert r.returncode == 125 and "cannot read guest hellp" in r.stderr and "hello, kvstore" in r.stderr


def test_colo_guest_arguments_take_names(tmp_path: Path) -> None:
    from colo.cli import build_parser

    assert build_parser().parse_args(["primary", "kvstore", "--gateway", "127.0.0.1:7000"]).guest == \
        str(GUESTS / "kvstore.bin")
    # `colo up` resolves and boots the guest itself, before any role starts (the same messages as toyvm run)
    r = _run("colo", "up", "nope.bin", cwd=tmp_path)
    assert r.returncode == 2 and "cannot read guest nope.bin" in r.stderr, r.stderr
