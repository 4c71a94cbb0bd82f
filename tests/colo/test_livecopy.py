"""The live copy's two pieces without I/O: when to stop the rounds, and the record stream."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colo.errors import ProtocolError
from colo.livecopy import FINAL, MAX_RECORD, ROUND, RecordReader, RoundPlanner, record


def test_a_shrinking_copy_goes_on_until_the_rest_fits_one_stop() -> None:
    plan = RoundPlanner(stop_pages=100)
    plan.sent(10_000)
    assert plan.plan(3000) == "round"
    plan.sent(3000)
    assert plan.plan(800) == "round"
    plan.sent(800)
    assert plan.plan(90) == "stop"
    assert not plan.stalled


def test_rounds_that_do_not_shrink_stop_the_copy_anyway() -> None:
    plan = RoundPlanner(stop_pages=100)
    plan.sent(10_000)
    assert plan.plan(5000) == "round"
    plan.sent(5000)
    assert plan.plan(4900) == "round"  # one flat round is not yet a stall
    plan.sent(4900)
    assert plan.plan(4800) == "stall"
    assert plan.stalled


def test_a_shrinking_round_forgives_an_earlier_flat_one() -> None:
    plan = RoundPlanner(stop_pages=10)
    for sent, left, want in [(1000, 990, "round"), (990, 400, "round"), (400, 390, "round"), (390, 100, "round")]:
        plan.sent(sent)
        assert plan.plan(left) == want


def test_the_rounds_are_bounded() -> None:
    plan = RoundPlanner(stop_pages=1, max_rounds=5)
    left = 1 << 20
    decisions = []
    while True:
        plan.sent(left)
        left //= 2  # always shrinking, never small enough
        decisions.append(plan.plan(left + 2))
        if decisions[-1] != "round":
            break
    assert decisions == ["round"] * 4 + ["stall"]


@given(st.lists(st.integers(min_value=0, max_value=1 << 18), min_size=1, max_size=60))
def test_the_planner_always_ends(remainders: list[int]) -> None:
    plan = RoundPlanner(stop_pages=16)
    plan.sent(1 << 18)
    for n, left in enumerate(remainders):
        decision = plan.plan(left)
        assert decision in ("round", "stop", "stall")
        if decision != "round":
            assert decision == "stop" or plan.stalled
            return
        assert n < plan.max_rounds
        plan.sent(left)


@given(st.lists(st.binary(max_size=300), max_size=6), st.binary(max_size=300), st.integers(1, 50))
def test_records_come_back_whatever_the_chunking(rounds: list[bytes], final: bytes, piece: int) -> None:
    stream = b"".join(record(ROUND, r) for r in rounds) + record(FINAL, final)
    reader = RecordReader()
    got = []
    for lo in range(0, len(stream), piece):
        got += reader.feed(stream[lo:lo + piece])
    assert got == [(ROUND, r) for r in rounds] + [(FINAL, final)]
    assert reader.final_seen and reader.pending == 0


def test_nothing_may_follow_the_final_record() -> None:
    reader = RecordReader()
    with pytest.raises(ProtocolError, match="after the final record"):
        reader.feed(record(FINAL, b"vm") + b"x")
    reader = RecordReader()
    reader.feed(record(FINAL, b"vm"))
    with pytest.raises(ProtocolError, match="after the final record"):
        reader.feed(b"x")


def test_garbage_records_are_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown record kind 7"):
        RecordReader().feed(b"\x07\x00\x00\x00\x01x")
    with pytest.raises(ProtocolError, match="larger than"):
        RecordReader().feed(bytes([ROUND]) + (MAX_RECORD + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError):
        record(2, b"")


def test_a_cut_record_waits_for_the_rest() -> None:
    reader = RecordReader()
    data = record(ROUND, b"pages")
    assert reader.feed(data[:3]) == [] and reader.pending == 3
    assert reader.feed(data[3:]) == [(ROUND, b"pages")] and not reader.final_seen
