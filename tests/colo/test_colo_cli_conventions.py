"""colo's command-line conventions: --version, the exit-code table, timestamped logs, -v/-q."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from colo.cli import EXIT_CODES, _setup_logging, build_parser
from toyvm.version import version

ROOT = Path(__file__).resolve().parents[2]


def _colo(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "colo", *args], capture_output=True, text=True, env=env, timeout=60)


def test_version_and_exit_codes_in_help() -> None:
    r = _colo("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"colo {version()} (unicorn "), r.stdout
    r = _colo("--help")
    assert r.returncode == 0 and EXIT_CODES in r.stdout  # verbatim: the table keeps its layout
    codes = re.findall(r"^  ([\w+]+) ", EXIT_CODES, re.MULTILINE)
    assert codes == ["0", "1", "2", "4", "125", "128+N", "N"]


def test_readme_documents_the_same_exit_codes() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in ("0", "1", "2", "4", "125", "128+N"):
        assert re.search(rf"^\| `{re.escape(code)}` \|", readme, re.MULTILINE), f"README lacks exit status {code}"


@contextlib.contextmanager
def bare_root_logger() -> Iterator[logging.Logger]:
    """The root logger with no handlers (pytest's own are back afterwards), as in a fresh `colo` process."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        yield root
    finally:
        root.handlers, root.level = saved


@pytest.mark.parametrize("flags, level", [([], logging.WARNING), (["-v"], logging.INFO), (["-q"], logging.ERROR)])
def test_log_lines_have_timestamps_and_levels(flags: list[str], level: int,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["secondary", "--gateway", "127.0.0.1:7000", *flags])
    with bare_root_logger() as root:
        _setup_logging(args)
        assert root.level == level
        logging.getLogger("colo.test").error("secondary: something happened")
    line = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} colo secondary: something happened\n", line), line


def test_verbose_and_quiet_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["gateway", "-v", "-q"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_down_takes_the_name_as_its_siblings_do(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`colo status --name X`, `colo failover --name X`: so `colo down --name X` too (as well as `colo down X`)."""
    from colo.cli import main
    monkeypatch.setenv("COLO_RUN_DIR", str(tmp_path))
    assert main(["down", "--name", "web"]) == 2
    assert "no cluster named 'web' is running" in capsys.readouterr().err
    assert main(["down", "web", "--name", "db"]) == 2
    assert "two clusters named: web and --name db" in capsys.readouterr().err
