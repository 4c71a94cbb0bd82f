"""When `colo up` may start a replacement secondary (colo.supervise.RespawnPolicy): a limit per hour, back-off."""
from __future__ import annotations

from colo.supervise import RespawnPolicy


def test_the_limit_counts_the_last_hour() -> None:
    p = RespawnPolicy(limit=2)
    assert p.blocked(0.0) is None
    assert p.started(0.0) == 1 and p.started(10.0) == 2
    assert p.blocked(20.0) == "limit"
    assert p.blocked(3599.0) == "limit"
    assert p.blocked(3600.5) is None  # the first one left the window
    assert p.started(3600.5) == 2


def test_no_respawn_is_a_limit_of_zero() -> None:
    assert RespawnPolicy(limit=0).blocked(0.0) == "limit"


def test_back_off_doubles_while_replacements_fail_and_resets_when_one_protects() -> None:
    p = RespawnPolicy(limit=100, first=1.0, cap=8.0)
    delays = []
    now = 0.0
    for _ in range(6):
        assert p.blocked(now) is None
        p.started(now)
        d = p.failed(now)
        delays.append(d)
        assert p.blocked(now + d - 0.01) == "backoff"
        now += d
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    p.proven()
    assert p.blocked(now) is None and p.failed(now) == 1.0
