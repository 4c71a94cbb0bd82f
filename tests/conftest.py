"""Shared test helpers: an assembler for small guests, paths, and a CLI runner."""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from skipsummary import pytest_terminal_summary  # noqa: F401  (a hook: pytest finds it here by name)

# `make test` and CI draw the same examples every run: a property that only a rare random draw breaks must not
# fail one landing in thirty; finding those is what HYPOTHESIS_PROFILE=explore (new examples each run) is for.
# Loaded here, before the test modules build their own settings on top of it.
hypothesis_settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
HOOK_MODES = ["python", "native"]


@functools.cache
def asm(src: str, org: int = 0x100000) -> bytes:
    """Assemble Intel-syntax x86-64 source into a flat binary linked at `org` (binutils: as, ld, objcopy)."""
    with tempfile.TemporaryDirectory(prefix="toyvm-asm-") as d:
        p = Path(d)
        (p / "g.s").write_text(".intel_syntax noprefix\n.globl _start\n.text\n_start:\n" + src + "\n")
        subprocess.run(["as", "--64", str(p / "g.s"), "-o", str(p / "g.o")], check=True, capture_output=True)
        subprocess.run(["ld", f"-Ttext={org:#x}", "-e", "_start", "--build-id=none", "-static", "-nostdlib",
                        str(p / "g.o"), "-o", str(p / "g.elf")], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(p / "g.elf"), str(p / "g.bin")], check=True,
                       capture_output=True)
        return (p / "g.bin").read_bytes()


def guest(name: str) -> Path:
    path = GUESTS / f"{name}.bin"
    if not path.exists():
        pytest.skip(f"{path} is not built")
    return path


def toyvm_cli(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m toyvm ...` in a fresh process."""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT))
    done: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
        [sys.executable, "-m", "toyvm", *args], capture_output=True, timeout=timeout, cwd=ROOT, env=env, **kw)
    return done


def ram_digest(vm: object) -> str:
    return hashlib.sha256(vm.ram.view.tobytes()).hexdigest()  # type: ignore[attr-defined]


@pytest.fixture(params=HOOK_MODES)
def hooks(request: pytest.FixtureRequest) -> str:
    return str(request.param)
