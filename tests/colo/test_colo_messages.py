"""The message vocabulary: QEMU's names, the name <-> class mapping, field validation."""

from __future__ import annotations

import dataclasses

import pytest

from colo.errors import ColoError, WireError
from colo.messages import (
    CHECKPOINT_MESSAGES,
    MESSAGE_TYPES,
    CheckpointReady,
    CheckpointRequest,
    ErrorMessage,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Role,
    Trigger,
    VmstateChunk,
    VmstateSize,
    describe,
    field_names,
    from_fields,
    to_fields,
)


def test_checkpoint_names_are_qemus() -> None:
    assert [cls.NAME for cls in CHECKPOINT_MESSAGES] == [
        "checkpoint-ready",
        "checkpoint-request",
        "checkpoint-reply",
        "vmstate-send",
        "vmstate-size",
        "vmstate-received",
        "vmstate-loaded",
    ]


def test_mapping_is_a_bijection() -> None:
    extras = {"heartbeat", "error", "vmstate-chunk", "initial-chunk", "initial-size"}
    assert extras <= MESSAGE_TYPES.keys()
    for name, cls in MESSAGE_TYPES.items():
        assert cls.NAME == name
    assert len(set(MESSAGE_TYPES.values())) == len(MESSAGE_TYPES)


def test_every_checkpoint_message_carries_an_epoch() -> None:
    for cls in CHECKPOINT_MESSAGES:
        assert "epoch" in field_names(cls)
    assert field_names(VmstateSize) == ("epoch", "size")
    assert field_names(CheckpointRequest) == ("epoch", "trigger")
    assert field_names(ErrorMessage) == ("reason",)


def test_messages_are_frozen() -> None:
    msg = CheckpointReady(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.epoch = 2  # type: ignore[misc]


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
def test_epoch_must_be_a_non_negative_int(bad: object) -> None:
    """Epoch 0 is the initial full copy; the protocol, not the field rule, decides which epoch is expected."""
    with pytest.raises(WireError, match="checkpoint-ready: field 'epoch' must be an int >= 0"):
        CheckpointReady(bad)  # type: ignore[arg-type]


def test_field_errors_are_colo_errors() -> None:
    assert issubclass(WireError, ColoError)
    with pytest.raises(WireError, match="'size' must be an int >= 0, got -1"):
        VmstateSize(1, -1)
    with pytest.raises(WireError, match="'data' must be bytes, got bytearray"):
        VmstateChunk(1, bytearray(b"x"))  # type: ignore[arg-type]
    with pytest.raises(WireError, match="'trigger' must be one of timer, mismatch, timeout, manual"):
        CheckpointRequest(1, "timer")  # type: ignore[arg-type]


def test_field_round_trip_and_enum_values() -> None:
    msg = CheckpointRequest(7, Trigger.MISMATCH)
    assert to_fields(msg) == {"epoch": 7, "trigger": "mismatch"}
    assert from_fields("checkpoint-request", to_fields(msg)) == msg
    assert from_fields("heartbeat", {}) == Heartbeat()


def test_from_fields_names_every_problem() -> None:
    with pytest.raises(WireError, match="unknown message name 'checkpoint-bogus'"):
        from_fields("checkpoint-bogus", {})
    with pytest.raises(WireError, match="vmstate-size: bad fields: missing size; unexpected 'sz'"):
        from_fields("vmstate-size", {"epoch": 1, "sz": 3})
    with pytest.raises(WireError, match=r"'trigger' must be one of .* got 'cron'"):
        from_fields("checkpoint-request", {"epoch": 1, "trigger": "cron"})


def test_describe_and_roles() -> None:
    assert describe(VmstateSize(3, 10)) == "vmstate-size epoch 3"
    assert describe(Heartbeat()) == "heartbeat"
    assert Role.PRIMARY.peer is Role.SECONDARY and Role.SECONDARY.peer is Role.PRIMARY
    assert "100 bytes" in repr(VmstateChunk(1, bytes(100)))  # never dumps the data


def test_the_initial_copy_messages() -> None:
    assert field_names(InitialChunk) == ("data",) and field_names(InitialSize) == ("size",)
    assert repr(InitialChunk(b"secret" * 1000)) == "InitialChunk(data=<6000 bytes>)"
    assert describe(InitialChunk(b"x")) == "initial-chunk"  # no epoch: before the first one
    assert describe(InitialSize(5)) == "initial-size"
    assert from_fields("initial-size", {"size": 5}) == InitialSize(5)
    with pytest.raises(WireError, match="initial-size: field 'size' must be an int >= 0, got True"):
        InitialSize(True)
    # The state chunks carry their data without a copy: a flat byte view of a buffer, or bytes; nothing else.
    assert InitialChunk(memoryview(b"xy")).data == b"xy"
    with pytest.raises(WireError, match="initial-chunk: field 'data' must be bytes, got bytearray"):
        InitialChunk(bytearray(b"x"))  # type: ignore[arg-type]
    with pytest.raises(WireError, match="initial-chunk: field 'data' must be bytes, got memoryview"):
        InitialChunk(memoryview(b"xxxx").cast("I"))
