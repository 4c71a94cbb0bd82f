"""A pytest plugin (loaded by conftest.py): the run ends with one line counting the tests skipped for want of a
tool, and the command that installs it, so a run that silently skipped a hundred tests cannot pass unnoticed."""
from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Need:
    what: str  # as the line names it
    words: tuple[str, ...]  # any of these in a skip reason means this need
    apt: tuple[str, ...] = ()  # Debian packages that satisfy it
    pip: str = ""  # or the pip command that does


NEEDS = (
    Need("redis-tools", ("redis-cli", "redis-benchmark", "redis-tools"), apt=("redis-tools",)),
    Need("a C compiler", ("needs gcc", "native hooks unavailable", "binutils"),
         apt=("gcc", "libc6-dev", "make", "binutils")),
    Need("the test extra", ("could not import", "the test extra"),
         pip=f"{sys.executable} -m pip install -e '.[test]'"),
)


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def need_of(report: pytest.TestReport) -> Need | None:
    if "redis" in report.keywords:  # the marker says it even when the reason does not
        return NEEDS[0]
    reason = _reason(report)
    return next((n for n in NEEDS if any(w in reason for w in n.words)), None)


def summary_line(skipped: Iterable[pytest.TestReport], root: bool | None = None) -> str | None:
    counts = Counter(n for n in map(need_of, skipped) if n is not None)
    if not counts:
        return None
    root = os.geteuid() == 0 if root is None else root
    needs = [n for n in NEEDS if n in counts]
    apt = [p for n in needs for p in n.apt]
    commands = [f"{'' if root else 'sudo '}apt-get install {' '.join(apt)}"] if apt else []
    commands += [n.pip for n in needs if n.pip]
    total = sum(counts.values())
    detail = ", ".join(f"{counts[n]} need {n.what}" for n in needs)
    return (f"{total} test{'s' if total != 1 else ''} skipped ({detail}); to run them: {' && '.join(commands)}"
            + (" (or run `make test` as root, which installs redis-tools)" if not root and NEEDS[0] in counts else ""))


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: after the -ra short summary, before the totals line
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None]:
    result = yield
    line = summary_line(r for r in terminalreporter.stats.get("skipped", []) if isinstance(r, pytest.TestReport))
    if line:
        terminalreporter.write_line(line, yellow=True, bold=True)
    return result
