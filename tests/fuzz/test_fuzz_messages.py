"""Every message constructor, fuzzed through `from_fields` (what a decoder calls with whatever a
payload held): arbitrary names and field values only ever give a WireError, and a message that does
get built can always be sent and comes back the same."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo.errors import WireError
from colo.messages import MESSAGE_TYPES, Message, field_names, from_fields, to_fields
from colo.wire import decode_frame, decode_payload, encode_frame, encode_payload

FUZZ = settings(database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
NAMES = sorted(MESSAGE_TYPES)
FIELDS = sorted({f for cls in MESSAGE_TYPES.values() for f in field_names(cls)})

# Values: what msgpack can decode to, plus things only a Python caller could pass (tuples, sets,
# huge ints, enums' strings, NaN), nested.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from([-(2**63) - 1, -(2**63), 2**32, 2**63, 2**64 - 1, 2**64, 2**70]),  # msgpack's edges
    st.text(max_size=40), st.binary(max_size=64), st.sampled_from(["timer", "manual", "protected", "x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4), st.integers()), inner, max_size=4),
    ),
    max_leaves=20,
)


@st.composite
def fields_for(draw: st.DrawFn, name: str) -> dict[Any, Any]:
    """Mostly the message's own fields (so the field rules are what gets tested), sometimes more
    or fewer, with arbitrary values."""
    cls = MESSAGE_TYPES.get(name)
    own = list(field_names(cls)) if cls is not None else []
    chosen = [f for f in own if draw(st.integers(0, 9)) > 0]  # usually all of them
    chosen += draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=2))
    return {f: draw(values) for f in chosen}


def check_sendable(msg: Message) -> None:
    frame = encode_frame(msg)
    again = decode_frame(frame)
    assert type(again) is type(msg)
    assert encode_frame(again) == frame  # byte-equal: NaN-safe


@FUZZ
@given(data=st.data())
def test_from_fields_with_arbitrary_values(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(NAMES) | st.text(max_size=12) | values)
    fields = data.draw(fields_for(name) if isinstance(name, str) else st.just({}))
    try:
        msg = from_fields(name, fields)
    except WireError:
        return
    check_sendable(msg)


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.data())
def test_every_constructor_with_one_field_replaced(name: str, data: st.DataObject) -> None:
    # Start from a valid message of this type and replace one field: hits each field rule with
    # near-valid neighbours of every type.
    cls = MESSAGE_TYPES[name]
    names = field_names(cls)
    if not names:
        check_sendable(from_fields(name, {}))
        return
    base = VALID[name]
    field = data.draw(st.sampled_from(names))
    fields = {**to_fields(base), field: data.draw(values)}
    try:
        msg = from_fields(name, fields)
    except WireError:
        return
    check_sendable(msg)


EDGES: list[object] = [
    None, True, False, 0, 1, -1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1,
    0.0, 1.0, float("nan"), float("inf"), "", "timer", "x" * 40, "\u00e9", b"", b"x" * 32, b"x" * 33,
    [], (), {}, [[1, 2, 7, b"x"]], [(1, 2, 7, b"x")], [[2**64, 2, 7, b""]], {"a": 2**64}, {1: 2}, {"a": {"b": ()}},
]
CASES = [(name, f) for name, cls in sorted(MESSAGE_TYPES.items()) for f in field_names(cls)]


@pytest.mark.parametrize(("name", "field"), CASES, ids=[f"{n}.{f}" for n, f in CASES])
def test_every_field_of_every_message_at_the_edges(name: str, field: str) -> None:
    for value in EDGES:
        try:
            msg = from_fields(name, {**to_fields(VALID[name]), field: value})
        except WireError:
            continue
        check_sendable(msg)


@FUZZ
@given(obj=values)
def test_payload_decoder_on_arbitrary_msgpack(obj: Any) -> None:
    try:
        packed = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return  # not encodable: nothing a peer could send
    try:
        msg = decode_payload(packed)
    except WireError:
        return
    assert decode_payload(encode_payload(msg)) is not None


VALID: dict[str, Message] = {}


def _valid_examples() -> None:
    samples: dict[str, object] = {
        "epoch": 1, "size": 3, "data": b"abc", "trigger": "timer", "reason": "why", "role": "primary",
        "nonce": bytes(32), "mac": bytes(32), "seq": 1, "kind": 2, "conn": 7, "input_seq": 0,
        "output_seq": 0, "events": [[1, 2, 7, b"x"]], "info": {"a": 1}, "state": "protected", "ok": True,
        "flags": 0, "generation": 2, "taken": 5, "attempt": 1, "node": "n1", "gateway": "g1", "peer": "",
        "address": "h:1",
        "conns": [7], "code": 0, "swap": False, "on": True, "delay_ms": 100, "grant": 1, "target": "n1",
    }
    for name, cls in MESSAGE_TYPES.items():
        VALID[name] = from_fields(name, {f: samples[f] for f in field_names(cls)})


_valid_examples()
