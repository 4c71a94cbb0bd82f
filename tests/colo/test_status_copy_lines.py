"""`colo status` says how far a copy to a new secondary is, what the last one cost, and which copies are void."""
from __future__ import annotations

from typing import Any

from colo.cli import format_status


def status(primary: dict[str, Any]) -> dict[str, Any]:
    return {"gateway": {"id": "g", "generation": 3, "protected": False, "service_state": "unprotected",
                        "failovers": 2},
            "nodes": {"primary": {"id": "p1", "connected": True, "state": "protecting", **primary},
                      "secondary": {}},
            "spares": [], "lost": [], "events": []}


def test_a_copy_under_way() -> None:
    text = format_status(status({"copy": {"round": 1, "pages_left": 1200, "mb_s": 210.5, "seconds": 0.8,
                                          "secondary": "s9"}}))
    assert "copy to s9: round 2, 1200 pages left in it, 210.5 MB/s, 0.8 s so far" in text
    assert "generation 3, 2 failovers" in text


def test_the_last_copy() -> None:
    text = format_status(status({"last_copy": {"live": True, "rounds": 4, "mb": 70.2, "seconds": 0.31,
                                               "stop_ms": 12.9, "final_pages": 780, "stalled": True}}))
    assert "last copy: live, 4 rounds, 70.2 MB in 0.31 s, guest stopped 12.9 ms at the end (780 pages), " \
           "did not converge" in text
    assert "copy to" not in text


def test_no_copy_no_line() -> None:
    assert "copy" not in format_status(status({}))


def test_the_status_names_voided_copies() -> None:
    info = status({})
    assert "voided" not in format_status(info)
    info["gateway"]["voided"] = {"a1b2c3": 2}
    assert "voided copies (never promoted): a1b2c3 (generation 2)" in format_status(info)
