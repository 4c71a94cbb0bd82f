"""`colo status` shows the CPUs each role may run on (a hybrid cluster pins each node to its own half)."""
from __future__ import annotations

from colo.cli import format_status


def test_each_role_row_shows_its_cpus() -> None:
    info = {"gateway": {"id": "g", "pid": 10, "cpus": "0-3", "listen": "127.0.0.1:7000", "service_state": "protecting"},
            "nodes": {"primary": {"id": "p1", "pid": 11, "cpus": "0-1", "connected": True, "state": "protecting"},
                      "secondary": {"id": "s1", "pid": 12, "cpus": "2-3", "connected": True, "state": "protected"}},
            "spares": [], "lost": [], "events": []}
    lines = format_status(info).splitlines()
    header = lines[0].split()
    assert header[:5] == ["role", "node", "gen", "pid", "cpus"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["gateway"][3:5] == ["10", "0-3"]
    assert rows["primary"][2:4] == ["11", "0-1"]  # no generation given: that column is blank
    assert rows["secondary"][2:4] == ["12", "2-3"]


def test_a_role_from_an_older_version_shows_a_dash() -> None:
    info = {"gateway": {"id": "g"}, "nodes": {"primary": {"id": "p1", "connected": True, "state": "running"},
                                              "secondary": {}},
            "spares": [], "lost": [], "events": []}
    primary = next(line for line in format_status(info).splitlines() if line.startswith("primary"))
    assert primary.split()[2:4] == ["?", "-"]
