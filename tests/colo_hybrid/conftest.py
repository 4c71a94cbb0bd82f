"""Fixtures for the hybrid-mode end-to-end tests: every cluster a test starts is stopped when it ends."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from colo_hybrid.cluster import HybridRun


@pytest.fixture
def hybrid(tmp_path: Path) -> Iterator[Callable[..., HybridRun]]:
    """hybrid(guest_name, **options) -> a HybridRun (not started yet), closed at the end of the test."""
    runs: list[HybridRun] = []

    def make(name: str, **kw: Any) -> HybridRun:
        run = HybridRun(tmp_path / f"run{len(runs)}", name, **kw)
        runs.append(run)
        return run
    yield make
    for run in runs:
        run.close()
