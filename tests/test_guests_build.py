"""The committed guest binaries are exactly what the sources build (guests/Makefile `check`)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import GUESTS


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc and make")
def test_committed_binaries_match_their_sources() -> None:
    r = subprocess.run(["make", "-s", "-C", str(GUESTS), "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "match their sources" in r.stdout
