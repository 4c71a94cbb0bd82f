"""colo's command-line conventions: --version, the exit-code table, timestamped logs, -v/-q."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
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


def _options(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif action.option_strings:
            yield path, action


def test_every_option_says_what_it_does() -> None:
    """`--help` of every command explains every option it shows (hidden ones are for the harness only)."""
    from toyvm.cli import build_parser as toyvm_parser
    silent = [f"{path} {a.option_strings[-1]}" for parser, name in ((build_parser(), "colo"), (toyvm_parser(), "toyvm"))
              for path, a in _options(parser, name) if not a.help]
    assert silent == []


@pytest.mark.parametrize("args, message", [
    (["--ram", "banana"], "argument --ram: bad size 'banana'"),
    (["--ram", "1K"], "argument --ram: RAM size 1024 is not a multiple of the 4096-byte page"),
    (["--interval", "0"], "argument --interval: must be a positive number, got 0"),
    (["--backstop", "-5"], "argument --backstop: must be a positive number, got -5"),
    (["--heartbeat-timeout", "0"], "argument --heartbeat-timeout: must be a positive number, got 0"),
    (["--trace-hex", "-3"], "argument --trace-hex: must be 0 or more, got -3"),
    (["--trace-hex", "x"], "argument --trace-hex: expected an integer, got 'x'"),
])
def test_view_refuses_a_bad_option_before_it_starts_anything(args: list[str], message: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["view", "kvstore", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_view_says_why_a_guest_cannot_boot_before_it_starts_anything(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """As `colo up` does: toyvm's own message, not "the primary exited with status 2" from a role."""
    from colo.cli import main
    bad = tmp_path / "bad.elf"
    bad.write_bytes((ROOT / "guests" / "hello.elf").read_bytes()[:100])
    assert main(["view", str(bad), "--no-browser", "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "colo view: error: " in err and "truncated ELF" in err and "starting the pair" not in err, err
    assert main(["view", "hello", "--no-browser", "--listen", "127.0.0.1:0", "--cmdline", "x" * 5000]) == 2
    assert "command line is 5000 bytes; the limit is 4000" in capsys.readouterr().err


def test_view_names_a_page_address_it_cannot_listen_on(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from colo.cli import main
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the session's folder: removed again, as nothing ran
    monkeypatch.setattr(tempfile, "tempdir", None)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["view", "hello", "--no-browser", "--listen", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"colo view: error: cannot serve the page on 127.0.0.1:{port}: Address already in use" in err, err
    assert list(tmp_path.iterdir()) == []
