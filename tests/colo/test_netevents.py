"""colo.netevents: the one-expression check of a good event agrees with the per-field rules that name what is
wrong, for every value, good, bad or at a bound."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from colo import netevents
from colo.netevents import MAX_CONN, MAX_SEQ, event_problem, events_problem

# Values at and around every bound, of the right type and of look-alike types (bool is an int; 2.0 == 2).
_INTS = st.sampled_from([-1, 0, 1, 2, 3, 4, MAX_CONN, MAX_CONN + 1, MAX_SEQ, MAX_SEQ + 1]) | st.integers()
_VALUES = _INTS | st.booleans() | st.floats(allow_nan=False) | st.binary(max_size=4) | st.text(max_size=2) \
    | st.none() | st.just(bytearray(b"x"))
_EVENTS = st.lists(_VALUES, min_size=3, max_size=5) | st.tuples(_INTS, _INTS, _INTS, st.binary()) | _VALUES


def _by_the_rules(v: object) -> bool:
    """True when the per-field rules find nothing wrong (the slow path, which names the problem)."""
    return netevents._what_is_wrong(v) is None


@given(_EVENTS)
def test_fast_check_agrees_with_the_rules(v: object) -> None:
    problem = event_problem(v)
    assert (problem is None) == _by_the_rules(v)
    if problem is not None:
        assert problem == netevents._what_is_wrong(v)  # the same words as before the fast path


@given(st.lists(_EVENTS, max_size=6))
def test_a_list_is_refused_at_its_first_bad_event(events: list[object]) -> None:
    bad = [i for i, e in enumerate(events) if not _by_the_rules(e)]
    problem = events_problem(events, limit=10)
    if not bad:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(f"has a bad event at index {bad[0]}: ")


def test_good_events_of_every_kind() -> None:
    for kind in (1, 2, 3):
        assert event_problem([1, kind, 0, b""]) is None
        assert event_problem([MAX_SEQ, kind, MAX_CONN, b"data"]) is None
    assert event_problem([True, 2, 0, b""]) == "'seq' must be an int >= 1, got True"
    assert event_problem([1, 2, 0, bytearray(b"x")]) == "'data' must be bytes, got bytearray"
