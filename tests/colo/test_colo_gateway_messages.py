"""The gateway-link and control vocabulary: registration, round trips, field rules.

These messages never pass through the checkpoint state machine, so their only guard is the field
validation: every rule is exercised here with bad values, through the constructor (what a sender
builds) and through the decoder (what a peer sends).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo.errors import WireError
from colo.messages import (
    CONTROL_MESSAGES,
    GATEWAY_MESSAGES,
    KIND_CLOSE,
    KIND_DATA,
    KIND_OPEN,
    MAX_CONN,
    MAX_EVENTS,
    MAX_INFO_DEPTH,
    MAX_INFO_KEYS,
    MESSAGE_TYPES,
    CheckpointNow,
    CommandResult,
    Commit,
    FailoverCommand,
    FailoverRequest,
    Fence,
    Input,
    Message,
    NodeHello,
    NodeStatus,
    Output,
    Promote,
    Promoted,
    Protection,
    ProtectionState,
    StatusReply,
    StatusRequest,
    Trigger,
    describe,
    field_names,
    from_fields,
    to_fields,
)
from colo.wire import FrameDecoder, decode_frame, encode_frame

NEW_MESSAGES = GATEWAY_MESSAGES + CONTROL_MESSAGES
SETTINGS = settings(database=None, deadline=None, max_examples=60)


def packed(obj: object) -> bytes:
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    return b"COLO\x01" + len(payload).to_bytes(4, "big") + payload


def fields_of(msg: Message) -> dict[str, object]:
    return {name: getattr(msg, name) for name in field_names(type(msg))}


# One well-formed example of each message; the bad-value tests change one field of it.
EXAMPLES: dict[type[Message], Message] = {
    NodeHello: NodeHello("secondary", {"vm": "guest.img", "pid": 4242, "ram": 64 << 20}),
    NodeStatus: NodeStatus({"epoch": 17, "state": "IDLE", "lag": 0.25, "peer": None}),
    Input: Input(1, KIND_OPEN, 0, b""),
    Output: Output(9, KIND_DATA, MAX_CONN, b"HTTP/1.0 200 OK\r\n"),
    Commit: Commit(3, 120, 57),
    Protection: Protection(ProtectionState.UNPROTECTED),
    CheckpointNow: CheckpointNow(Trigger.MISMATCH),
    FailoverRequest: FailoverRequest("no heartbeat from the primary for 3.0 s"),
    Promote: Promote("primary fenced"),
    Promoted: Promoted(3, 120, 57, [[56, KIND_DATA, 4, b"tail"], [57, KIND_CLOSE, 4, b""]]),
    Fence: Fence("the secondary was promoted"),
    StatusRequest: StatusRequest(),
    StatusReply: StatusReply({"active": "primary", "nodes": {"primary": {"epoch": 3}}}),
    FailoverCommand: FailoverCommand("maintenance on host a"),
    CommandResult: CommandResult(False, "no secondary with a complete checkpoint"),
}


def test_names_and_groups() -> None:
    assert [cls.NAME for cls in GATEWAY_MESSAGES] == [
        "node-hello",
        "node-status",
        "input",
        "output",
        "commit",
        "protection",
        "checkpoint-now",
        "failover-request",
        "promote",
        "promoted",
        "fence",
    ]
    assert [cls.NAME for cls in CONTROL_MESSAGES] == [
        "status-request",
        "status-reply",
        "failover-command",
        "command-result",
    ]
    for cls in NEW_MESSAGES:
        assert MESSAGE_TYPES[cls.NAME] is cls  # registered: the FrameDecoder decodes it
    assert set(EXAMPLES) == set(NEW_MESSAGES)


def test_fields_are_the_documented_ones() -> None:
    assert {cls.NAME: field_names(cls) for cls in NEW_MESSAGES} == {
        "node-hello": ("role", "info"),
        "node-status": ("info",),
        "input": ("seq", "kind", "conn", "data"),
        "output": ("seq", "kind", "conn", "data"),
        "commit": ("epoch", "input_seq", "output_seq"),
        "protection": ("state",),
        "checkpoint-now": ("trigger",),
        "failover-request": ("reason",),
        "promote": ("reason",),
        "promoted": ("epoch", "input_seq", "output_seq", "events"),
        "fence": ("reason",),
        "status-request": (),
        "status-reply": ("info",),
        "failover-command": ("reason",),
        "command-result": ("ok", "reason"),
    }


@pytest.mark.parametrize("cls", NEW_MESSAGES, ids=lambda c: c.NAME)
def test_one_line_docstring_with_the_direction(cls: type[Message]) -> None:
    doc = cls.__doc__ or ""
    assert "\n" not in doc.strip() and "->" in doc.split(":")[0], doc


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXAMPLES[Commit].epoch = 4  # type: ignore[attr-defined]


# -- round trips ---------------------------------------------------------------------------------

seqs = st.integers(min_value=1, max_value=2**64 - 1)
counts = st.integers(min_value=0, max_value=2**64 - 1)
kinds = st.sampled_from([KIND_OPEN, KIND_DATA, KIND_CLOSE])
conns = st.integers(min_value=0, max_value=MAX_CONN)
texts = st.text(max_size=60)
roles = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=32)
# what msgpack decodes to (NaN left out only because NaN != NaN would fail the equality)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | texts
    | st.binary(max_size=40)
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(texts | st.binary(max_size=8), inner, max_size=4),
    max_leaves=12,
)
infos = st.dictionaries(texts, values, max_size=6)
events = st.lists(st.tuples(seqs, kinds, conns, st.binary(max_size=40)).map(list), max_size=8)

STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    NodeHello: st.builds(NodeHello, roles, infos),
    NodeStatus: st.builds(NodeStatus, infos),
    Input: st.builds(Input, seqs, kinds, conns, st.binary(max_size=200)),
    Output: st.builds(Output, seqs, kinds, conns, st.binary(max_size=200)),
    Commit: st.builds(Commit, st.integers(1, 2**63), counts, counts),
    Protection: st.builds(Protection, st.sampled_from(ProtectionState)),
    CheckpointNow: st.builds(CheckpointNow, st.sampled_from(Trigger)),
    FailoverRequest: st.builds(FailoverRequest, texts),
    Promote: st.builds(Promote, texts),
    Promoted: st.builds(Promoted, st.integers(1, 2**63), counts, counts, events),
    Fence: st.builds(Fence, texts),
    StatusRequest: st.just(StatusRequest()),
    StatusReply: st.builds(StatusReply, infos),
    FailoverCommand: st.builds(FailoverCommand, texts),
    CommandResult: st.builds(CommandResult, st.booleans(), texts),
}


@pytest.mark.parametrize("cls", NEW_MESSAGES, ids=lambda c: c.NAME)
@SETTINGS
@given(data=st.data())
def test_round_trip_through_the_frame_decoder(cls: type[Message], data: st.DataObject) -> None:
    msgs = data.draw(st.lists(STRATEGIES[cls], min_size=1, max_size=4), label="messages")
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    points = sorted({0, len(stream), *cuts})
    decoder = FrameDecoder()
    out: list[Message] = []
    for a, b in itertools.pairwise(points):
        decoder.feed(stream[a:b])
        while (m := decoder.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert all(type(m) is cls for m in out)
    assert decoder.buffered == 0


@pytest.mark.parametrize("msg", EXAMPLES.values(), ids=lambda m: m.NAME)
def test_examples_round_trip(msg: Message) -> None:
    assert decode_frame(encode_frame(msg)) == msg
    assert from_fields(msg.NAME, to_fields(msg)) == msg


def test_protection_state_travels_as_text() -> None:
    msg = Protection(ProtectionState.PROTECTED)
    assert to_fields(msg) == {"state": "protected"}
    decoded = decode_frame(packed({"msg": "protection", "state": "unprotected"}))
    assert decoded == Protection(ProtectionState.UNPROTECTED)
    with pytest.raises(WireError, match="protection: field 'state' must be one of protected, "
                                        "unprotected, got 'protected'"):
        Protection("protected")  # type: ignore[arg-type]  # a plain str is not the enum


def test_checkpoint_now_trigger_travels_as_text() -> None:
    assert decode_frame(packed({"msg": "checkpoint-now", "trigger": "timeout"})) == CheckpointNow(
        Trigger.TIMEOUT
    )


def test_describe_and_reprs_never_dump_data() -> None:
    assert describe(EXAMPLES[Commit]) == "commit epoch 3"
    assert describe(EXAMPLES[Fence]) == "fence"
    assert repr(Input(5, KIND_DATA, 7, b"s3cret" * 1000)) == (
        "Input(seq=5, kind=data, conn=7, data=<6000 bytes>)"
    )
    assert repr(Output(6, KIND_CLOSE, 7, b"")) == (
        "Output(seq=6, kind=close, conn=7, data=<0 bytes>)"
    )
    big = Promoted(2, 10, 20, [[i, KIND_DATA, 1, b"s3cret"] for i in range(1, 21)])
    assert repr(big) == "Promoted(epoch=2, input_seq=10, output_seq=20, events=<20 events>)"


def test_the_largest_promoted_round_trips() -> None:
    events = [[i, KIND_DATA, i % 7, b"x"] for i in range(1, MAX_EVENTS + 1)]
    msg = Promoted(9, 1, MAX_EVENTS, events)
    assert decode_frame(encode_frame(msg)) == msg


# -- field rules ---------------------------------------------------------------------------------

DEEP: Any = 1
for _ in range(MAX_INFO_DEPTH + 1):
    DEEP = [DEEP]
CYCLE: list[object] = []
CYCLE.append(CYCLE)
TOO_DEEP = rf"value at 'a'(\[0\]){{{MAX_INFO_DEPTH}}}: nested deeper than {MAX_INFO_DEPTH} lists"
SHAPE = r"\[seq, kind, conn, data\]"
AT_0, AT_1 = "has a bad event at index 0", "has a bad event at index 1"
TOO_MANY_EVENTS = [[1, 2, 3, b""]] * (MAX_EVENTS + 1)
TOO_MANY_KEYS = {str(i): i for i in range(MAX_INFO_KEYS + 1)}

# (field, bad value, what the error says after "field '<name>' ", whether msgpack can carry it
# to a decoder unchanged: a tuple or a set cannot, a too-large int cannot be packed at all).
BAD_VALUES: list[tuple[str, object, str, bool]] = [
    ("seq", 0, "must be an int >= 1, got 0", True),
    ("seq", -1, "must be an int >= 1, got -1", True),
    ("seq", True, "must be an int >= 1, got True", True),
    ("seq", 1.0, "must be an int >= 1, got 1.0", True),
    ("seq", "1", "must be an int >= 1, got '1'", True),
    ("seq", None, "must be an int >= 1, got None", True),
    ("kind", 0, r"must be one of 1 \(open\), 2 \(data\), 3 \(close\), got 0", True),
    ("kind", 4, r"must be one of 1 \(open\), 2 \(data\), 3 \(close\), got 4", True),
    ("kind", True, "must be one of .* got True", True),
    ("kind", 2.0, "must be one of .* got 2.0", True),
    ("kind", "data", "must be one of .* got 'data'", True),
    ("conn", -1, f"must be an int in 0..{MAX_CONN}, got -1", True),
    ("conn", 2**32, f"must be an int in 0..{MAX_CONN}, got {2**32}", True),
    ("conn", False, "must be an int in .* got False", True),
    ("conn", 1.5, "must be an int in .* got 1.5", True),
    ("data", "text", "must be bytes, got str", True),
    ("data", bytearray(b"x"), "must be bytes, got bytearray", False),
    ("data", None, "must be bytes, got NoneType", True),
    ("input_seq", -1, "must be an int >= 0, got -1", True),
    ("input_seq", True, "must be an int >= 0, got True", True),
    ("input_seq", "0", "must be an int >= 0, got '0'", True),
    ("output_seq", -1, "must be an int >= 0, got -1", True),
    ("output_seq", 0.0, "must be an int >= 0, got 0.0", True),
    ("output_seq", None, "must be an int >= 0, got None", True),
    ("epoch", -1, "must be an int >= 0, got -1", True),
    ("epoch", True, "must be an int >= 0, got True", True),
    ("events", None, rf"must be a list of at most 100000 {SHAPE} lists, got NoneType", True),
    ("events", {}, "must be a list of .* got dict", True),
    ("events", ((1, 2, 3, b""),), "must be a list of .* got tuple", False),
    ("events", TOO_MANY_EVENTS, f"must be .* got {MAX_EVENTS + 1} events", True),
    ("events", [5], rf"{AT_0}: must be a {SHAPE} list, got int", True),
    ("events", [[1, 2, 3, b""], (2, 2, 3, b"")], f"{AT_1}: must be .* got tuple", False),
    ("events", [[1, 2, 3]], f"{AT_0}: must be .* list, got 3 items", True),
    ("events", [[1, 2, 3, b"", 5]], f"{AT_0}: must be .* list, got 5 items", True),
    ("events", [[0, 2, 3, b""]], f"{AT_0}: 'seq' must be an int >= 1, got 0", True),
    ("events", [[1, 2, 3, b""], [2, 9, 3, b""]], f"{AT_1}: 'kind' must be one of .* got 9", True),
    ("events", [[1, 2, -3, b""]], f"{AT_0}: 'conn' must be an int in 0..", True),
    ("events", [[1, 2, 3, "text"]], f"{AT_0}: 'data' must be bytes, got str", True),
    ("info", None, "must be a dict of at most 1000 str keys, got NoneType", True),
    ("info", [["k", 1]], "must be a dict of .* got list", True),
    ("info", TOO_MANY_KEYS, f"must be a dict of .* got {MAX_INFO_KEYS + 1} keys", True),
    ("info", {b"epoch": 1}, r"must have str keys, got key b'epoch'", True),
    ("info", {"ok": 1, 7: "x"}, "must have str keys, got key 7", False),
    ("info", {"a": (1, 2)}, "value at 'a': tuple is not a msgpack type", False),
    ("info", {"a": {"b": [1, {3}]}}, r"value at 'a'\['b'\]\[1\]: set is not a msgpack type", False),
    ("info", {"a": {"b": {1: 2}}}, r"value at 'a'\['b'\]: map key 1 is not str or bytes", False),
    ("info", {"a": 2**64}, "value at 'a': int 18446744073709551616 does not fit msgpack", False),
    ("info", {"a": DEEP}, TOO_DEEP, True),
    ("info", {"a": CYCLE}, TOO_DEEP, False),
    ("state", "on", "must be one of protected, unprotected, got 'on'", True),
    ("state", 1, "must be one of protected, unprotected, got 1", True),
    ("state", None, "must be one of protected, unprotected, got None", True),
    ("ok", 1, "must be a bool, got 1", True),
    ("ok", "true", "must be a bool, got 'true'", True),
    ("ok", None, "must be a bool, got None", True),
    ("role", "", "must be 1..32 printable ASCII characters, got ''", True),
    ("role", "x" * 33, "must be 1..32 printable ASCII characters", True),
    ("role", "prim\u00e4ry", "must be 1..32 printable ASCII characters", True),
    ("role", "a\nb", "must be 1..32 printable ASCII characters", True),
    ("reason", b"bytes", "must be a str, got bytes", True),
    ("reason", 3, "must be a str, got int", True),
    ("trigger", "cron", "must be one of timer, mismatch, timeout, manual, got 'cron'", True),
]

CASES = [
    (cls, field, value, pattern, on_wire)
    for cls in NEW_MESSAGES
    for field, value, pattern, on_wire in BAD_VALUES
    if field in field_names(cls)
]


def _case_id(case: tuple[type[Message], str, object, str, bool]) -> str:
    cls, field, value, _, _ = case
    return f"{cls.NAME}-{field}-{type(value).__name__}-{BAD_VALUES.index(case[1:])}"


def test_every_field_of_the_new_messages_has_bad_values() -> None:
    tested = {field for field, *_ in BAD_VALUES}
    for cls in NEW_MESSAGES:
        assert set(field_names(cls)) <= tested, cls.NAME


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_field_is_refused_by_the_constructor(
    case: tuple[type[Message], str, object, str, bool],
) -> None:
    cls, field, value, pattern, _ = case
    fields = {**fields_of(EXAMPLES[cls]), field: value}
    with pytest.raises(WireError, match=f"^{cls.NAME}: field '{field}' {pattern}"):
        cls(**fields)


WIRE_CASES = [c for c in CASES if c[4]]


@pytest.mark.parametrize("case", WIRE_CASES, ids=[_case_id(c) for c in WIRE_CASES])
def test_bad_field_is_refused_by_the_decoder(
    case: tuple[type[Message], str, object, str, bool],
) -> None:
    cls, field, value, pattern, _ = case
    fields = {**to_fields(EXAMPLES[cls]), field: value}
    frame = packed({"msg": cls.NAME, **fields})
    decoder = FrameDecoder()
    decoder.feed(frame)
    with pytest.raises(WireError, match=f"^{cls.NAME}: field '{field}' {pattern}"):
        decoder.next_message()
    with pytest.raises(WireError, match="decoder stopped after an earlier error"):
        decoder.next_message()


def test_events_with_one_bad_element_are_refused() -> None:
    good = [[i, KIND_DATA, 1, b"ok"] for i in range(1, 6)]
    bad = [*good[:3], [4, KIND_DATA, MAX_CONN + 1, b"ok"], *good[4:]]
    fields = to_fields(Promoted(1, 0, 5, good))
    with pytest.raises(WireError) as info:
        decode_frame(packed({"msg": "promoted", **fields, "events": bad}))
    assert str(info.value) == (
        f"promoted: field 'events' has a bad event at index 3: 'conn' must be an int in "
        f"0..{MAX_CONN}, got {MAX_CONN + 1}"
    )


def test_info_with_non_str_keys_is_refused() -> None:
    with pytest.raises(WireError, match=r"^status-reply: field 'info' must have str keys, got key"):
        StatusReply({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(WireError, match=r"^node-status: field 'info' must have str keys, got key b"):
        decode_frame(packed({"msg": "node-status", "info": {b"k": 1}}))
    with pytest.raises(WireError, match="undecodable msgpack payload"):  # msgpack refuses int keys
        decode_frame(packed({"msg": "node-status", "info": {1: 1}}))
    # deeper down, bytes keys are what msgpack gives back and are fine
    assert NodeStatus({"k": {b"raw": [1, None]}}).info == {"k": {b"raw": [1, None]}}


def test_info_bounds_are_inclusive() -> None:
    nested: Any = "leaf"
    for _ in range(MAX_INFO_DEPTH):
        nested = {"x": nested}
    msg = StatusReply({"deep": nested, **{str(i): i for i in range(MAX_INFO_KEYS - 1)}})
    assert decode_frame(encode_frame(msg)) == msg
