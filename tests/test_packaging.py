"""What ships: the package list is complete, and a wheel built from the sdist works from any directory."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

BUILD_TIMEOUT = 120.0


def test_every_package_is_listed_in_pyproject() -> None:
    # pyproject.toml lists packages by hand (it maps guests/ in as data): a new subpackage must be added there.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("toyvm", "colo", "tcpclients")
             for p in (ROOT / top).rglob("__init__.py")}
    assert listed == found | {"toyvm.guest_images"}


def _clean_env() -> dict[str, str]:
    """No trace of this checkout or of the test venv: the installed wheel must stand on its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.pop("COLO_KEY", None)
    return env


def _run(argv: list[str], cwd: Path, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_built_wheel_runs_the_guests_outside_the_repository(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="needs the `build` package (the test extra)")
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # `python -m build` makes the sdist, then the wheel from the unpacked sdist: both are what users get.
    r = _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("LICENSE", "README.md", "Makefile", "guests/Makefile", "guests/runtime/runtime.c",
                 "tests/conftest.py", "docs/machine.md"):
        assert name in names, name
    for guest in ("hello", "counter", "memtouch", "kvstore", "noisy"):
        assert {f"guests/{guest}.c", f"guests/{guest}.bin", f"guests/{guest}.elf"} <= names, guest
    assert not any(n.startswith("guests/build/") or "__pycache__" in n for n in names)

    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
    assert {"toyvm/guest_images/hello.bin", "toyvm/guest_images/kvstore.bin", "toyvm/native/hooks.c"} <= files
    assert not any(n.startswith("toyvm/guest_images/") and n.endswith(".c") for n in files)
    assert any(n.endswith("licenses/LICENSE") for n in files)

    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path).returncode == 0
    r = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    r = _run([str(venv / "bin" / "python"), "-c", "import toyvm, colo; print(toyvm.__file__, colo.__file__)"],
             cwd=elsewhere)
    assert r.returncode == 0 and str(ROOT) not in r.stdout and str(venv) in r.stdout, r.stdout + r.stderr
    r = _run([str(venv / "bin" / "toyvm"), "run", "hello", "--cmdline", "from=wheel"], cwd=elsewhere, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from a toyvm guest!\ncmdline: from=wheel\n"
    r = _run([str(venv / "bin" / "colo"), "--version"], cwd=elsewhere, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("colo 0."), r.stdout + r.stderr
    r = _run([str(venv / "bin" / "colo"), "demo", "--seconds", "4", "--clients", "2"], cwd=elsewhere, timeout=90)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
