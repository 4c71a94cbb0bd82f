"""The closing line of a run that skipped tests for want of a tool (tests/skipsummary.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skipsummary import summary_line

HERE = Path(__file__).resolve().parent


def skipped(reason: str, *markers: str) -> pytest.TestReport:
    return pytest.TestReport("t.py::x", ("t.py", 1, "x"), dict.fromkeys(["x", *markers], 1), "skipped",
                             ("t.py", 1, f"Skipped: {reason}"), "setup")


def test_the_line_counts_each_need_and_names_the_command() -> None:
    reports = [skipped("needs redis-cli (Debian redis-tools)"), skipped("whatever", "redis"),
               skipped("needs gcc and make"), skipped("not today")]
    assert summary_line(reports, root=True) == ("3 tests skipped (2 need redis-tools, 1 need a C compiler); to run "
                                                "them: apt-get install redis-tools gcc libc6-dev make binutils")
    line = summary_line(reports[:1], root=False)
    assert line is not None and line.startswith("1 test skipped (1 need redis-tools); to run them: sudo apt-get "
                                                "install redis-tools (or run `make test` as root")
    assert summary_line([skipped("not today")]) is None and summary_line([]) is None


def test_the_line_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skip(reason='needs redis-cli (Debian redis-tools)')\n"
        "def test_a():\n    pass\n\n"
        "def test_b():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "skipsummary", "-ra", "-p", "no:cacheprovider",
                        "test_x.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SKIPPED [1] test_x.py:3: needs redis-cli" in r.stdout  # -ra's summary is still there, before it
    assert lines[-2].startswith("1 test skipped (1 need redis-tools); to run them:"), lines[-3:]
    assert "1 passed, 1 skipped" in lines[-1]
