"""`colo view --checkpoint-mode`: the pair the page shows checkpoints the way it was asked to (strict: the guest
stays stopped until the secondary has loaded the state), as the event stream the page draws from says."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from colo.errors import ColoError
from colo.view.session import ViewSession

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["strict", "pipelined"])
def test_the_view_runs_the_checkpoint_mode_it_was_given(tmp_path: Path, mode: str) -> None:
    view = ViewSession("kvstore", interval_ms=100, directory=tmp_path, respawn=False, checkpoint_mode=mode)
    try:
        view.start()
        deadline = time.monotonic() + 30
        seen: list[str] = []
        while time.monotonic() < deadline and len(seen) < 3:
            with view.cond:
                seen = [e["mode"] for e in view.events if e.get("kind") == "checkpoint"]
            time.sleep(0.1)
        assert len(seen) >= 3, f"no checkpoints in the view's stream within 30 s: {seen}"
        assert set(seen) == {mode}, seen
    finally:
        view.stop()


def test_a_role_that_fails_to_start_says_why(tmp_path: Path) -> None:
    """The roles share one log file: the error quotes its last lines (here the primary's own complaint)."""
    view = ViewSession("kvstore", ram="banana", directory=tmp_path, respawn=False)
    try:
        with pytest.raises(ColoError) as e:
            view.start(timeout=30)
        text = str(e.value)
        assert "the primary exited with status 2" in text and "roles.log" in text, text
        assert "argument --ram: bad size 'banana'" in text, text
    finally:
        view.stop()
