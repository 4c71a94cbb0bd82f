"""`colo keygen`: a fresh key, mode 0600, never overwriting by accident."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from colo.auth import load_key
from colo.cli import main


def test_keygen_writes_a_private_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "colo.key"
    assert main(["keygen", str(path)]) == 0
    assert f"wrote a new key to {path} (mode 0600)" in capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert re.fullmatch(rb"[0-9a-f]{64}", key)

    assert main(["keygen", str(path)]) == 2  # never overwrites by accident
    err = capsys.readouterr().err
    assert "already exists" in err and "use --force" in err
    assert load_key(path) == key

    path.chmod(0o644)
    assert main(["keygen", "--force", str(path)]) == 0
    assert load_key(path) != key and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colo.key"]  # no temporary file left


def test_keygen_refuses_a_symlink_and_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "link.key").symlink_to(victim)
    assert main(["keygen", str(tmp_path / "link.key")]) == 2
    assert victim.read_text() == "keep me"
    assert main(["keygen", str(tmp_path / "no" / "such" / "dir.key")]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_keygen_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert main(["keygen", str(tmp_path / "k")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
