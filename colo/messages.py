"""The message vocabulary of the replication link.

The seven checkpoint messages carry QEMU's names exactly (migration/colo.c, COLOMessage):
checkpoint-ready, checkpoint-request, checkpoint-reply, vmstate-send, vmstate-size,
vmstate-received, vmstate-loaded. Around them: heartbeat and error, which either side may send;
vmstate-chunk, our addition, which carries the state bytes inside QEMU's vmstate-send window; and
auth-challenge / auth-proof, used only by the handshake in `colo.auth`.

Messages are frozen dataclasses that validate their fields on construction, so a message that
exists is well formed: the wire decoder builds messages through the same constructors and thereby
rejects ill-typed fields with the same rules. Who may send what, and when, is not decided here:
that is the transition table in `colo.protocol`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from colo.errors import WireError

NONCE_SIZE = 32  # bytes of a handshake nonce
MAC_SIZE = 32  # bytes of an HMAC-SHA256 proof
MAX_ROLE_LENGTH = 32  # characters of a role name in auth-challenge


class Role(enum.Enum):
    """Which end of the checkpoint conversation a side is. The transition table is keyed by it."""

    PRIMARY = "primary"
    SECONDARY = "secondary"

    @property
    def peer(self) -> Role:
        return Role.SECONDARY if self is Role.PRIMARY else Role.PRIMARY


class Trigger(enum.StrEnum):
    """Why the primary asked for a checkpoint (recorded per checkpoint for observability)."""

    TIMER = "timer"  # periodic mode: the checkpoint interval elapsed
    MISMATCH = "mismatch"  # hybrid mode: the gateway saw the two VMs' outputs differ
    TIMEOUT = "timeout"  # hybrid mode: output stayed unmatched too long
    MANUAL = "manual"  # an operator asked


# One rule per field name, shared by every message that has the field, so "epoch" means the same
# thing everywhere. A rule returns None when the value is fine, else what is wrong with it.
# `type(v) is int` on purpose: bool is a subclass of int and True is not an epoch.
def _epoch_rule(v: object) -> str | None:
    return None if type(v) is int and v >= 1 else f"must be an int >= 1, got {v!r}"


def _size_rule(v: object) -> str | None:
    return None if type(v) is int and v >= 0 else f"must be an int >= 0, got {v!r}"


def _bytes_rule(v: object) -> str | None:
    return None if type(v) is bytes else f"must be bytes, got {type(v).__name__}"


def _fixed_bytes_rule(size: int) -> Callable[[object], str | None]:
    def rule(v: object) -> str | None:
        if type(v) is bytes and len(v) == size:
            return None
        got = f"{len(v)} bytes" if isinstance(v, bytes) else type(v).__name__
        return f"must be exactly {size} bytes, got {got}"

    return rule


def _trigger_rule(v: object) -> str | None:
    choices = ", ".join(t.value for t in Trigger)
    return None if isinstance(v, Trigger) else f"must be one of {choices}, got {v!r}"


def _text_rule(v: object) -> str | None:
    return None if type(v) is str else f"must be a str, got {type(v).__name__}"


def _role_rule(v: object) -> str | None:
    ok = type(v) is str and 1 <= len(v) <= MAX_ROLE_LENGTH and v.isascii() and v.isprintable()
    return None if ok else f"must be 1..{MAX_ROLE_LENGTH} printable ASCII characters, got {v!r}"


_FIELD_RULES: dict[str, Callable[[object], str | None]] = {
    "epoch": _epoch_rule,
    "size": _size_rule,
    "data": _bytes_rule,
    "trigger": _trigger_rule,
    "reason": _text_rule,
    "role": _role_rule,
    "nonce": _fixed_bytes_rule(NONCE_SIZE),
    "mac": _fixed_bytes_rule(MAC_SIZE),
}


class Message:
    """Base of all messages: `NAME` is the wire name; fields are validated on construction."""

    __slots__ = ()
    NAME: ClassVar[str]

    def __post_init__(self) -> None:
        for name in field_names(type(self)):
            problem = _FIELD_RULES[name](getattr(self, name))
            if problem is not None:
                raise WireError(f"{self.NAME}: field {name!r} {problem}")


@dataclass(frozen=True, slots=True)
class CheckpointReady(Message):
    """S->P, once: the secondary holds the full initial copy and is ready for checkpoint `epoch`."""

    NAME: ClassVar[str] = "checkpoint-ready"
    epoch: int


@dataclass(frozen=True, slots=True)
class CheckpointRequest(Message):
    """P->S: the primary has suspended its VM and starts checkpoint `epoch`."""

    NAME: ClassVar[str] = "checkpoint-request"
    epoch: int
    trigger: Trigger = Trigger.TIMER


@dataclass(frozen=True, slots=True)
class CheckpointReply(Message):
    """S->P: the secondary is ready to receive (in hybrid mode: it has suspended its VM)."""

    NAME: ClassVar[str] = "checkpoint-reply"
    epoch: int


@dataclass(frozen=True, slots=True)
class VmstateSend(Message):
    """P->S: the state of checkpoint `epoch` follows, as vmstate-chunk messages."""

    NAME: ClassVar[str] = "vmstate-send"
    epoch: int


@dataclass(frozen=True, slots=True, repr=False)
class VmstateChunk(Message):
    """P->S, zero or more times between vmstate-send and vmstate-size: a piece of the state.

    Our addition: QEMU streams the state raw inside the vmstate-send window; we frame it so the
    decoder stays bounded and the receiver can count the bytes.
    """

    NAME: ClassVar[str] = "vmstate-chunk"
    epoch: int
    data: bytes

    def __repr__(self) -> str:  # the data may be megabytes: never dump it into a log
        return f"VmstateChunk(epoch={self.epoch}, data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class VmstateSize(Message):
    """P->S: the total byte count of the chunks just sent; the secondary checks it."""

    NAME: ClassVar[str] = "vmstate-size"
    epoch: int
    size: int


@dataclass(frozen=True, slots=True)
class VmstateReceived(Message):
    """S->P: the whole state arrived and verified: checkpoint `epoch` is complete.

    The primary may now release the output this checkpoint covers.
    """

    NAME: ClassVar[str] = "vmstate-received"
    epoch: int


@dataclass(frozen=True, slots=True)
class VmstateLoaded(Message):
    """S->P: the secondary applied checkpoint `epoch`; the next checkpoint may start."""

    NAME: ClassVar[str] = "vmstate-loaded"
    epoch: int


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Either way, in any live state: "I am still here". Changes no checkpoint state."""

    NAME: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True)
class ErrorMessage(Message):
    """Either way: the sender gives up on this connection, for `reason`."""

    NAME: ClassVar[str] = "error"
    reason: str


@dataclass(frozen=True, slots=True)
class AuthChallenge(Message):
    """Handshake only: the sender's role and a fresh random nonce."""

    NAME: ClassVar[str] = "auth-challenge"
    role: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class AuthProof(Message):
    """Handshake only: HMAC(key, context, own role, own nonce, peer nonce); see colo.auth."""

    NAME: ClassVar[str] = "auth-proof"
    mac: bytes


CHECKPOINT_MESSAGES: tuple[type[Message], ...] = (
    CheckpointReady,
    CheckpointRequest,
    CheckpointReply,
    VmstateSend,
    VmstateSize,
    VmstateReceived,
    VmstateLoaded,
)

_OTHER_MESSAGES: tuple[type[Message], ...] = (
    VmstateChunk,
    Heartbeat,
    ErrorMessage,
    AuthChallenge,
    AuthProof,
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.NAME: cls for cls in CHECKPOINT_MESSAGES + _OTHER_MESSAGES
}


def field_names(cls: type[Message]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cast(Any, cls)))


def epoch_of(msg: Message) -> int | None:
    """The epoch a message carries, or None for messages that carry none."""
    epoch = getattr(msg, "epoch", None)
    return epoch if isinstance(epoch, int) else None


def describe(msg: Message) -> str:
    """Short text for error messages: "vmstate-size epoch 3"."""
    epoch = epoch_of(msg)
    return msg.NAME if epoch is None else f"{msg.NAME} epoch {epoch}"


def to_fields(msg: Message) -> dict[str, object]:
    """The message's fields as plain msgpack-able values (enums become their string values)."""
    out: dict[str, object] = {}
    for name in field_names(type(msg)):
        value = getattr(msg, name)
        out[name] = value.value if isinstance(value, enum.Enum) else value
    return out


def from_fields(name: object, fields: Mapping[str, object]) -> Message:
    """Build the message called `name` from plain values; WireError names anything wrong."""
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError(f"unknown message name {name!r}")
    wanted = set(field_names(cls))
    missing = sorted(wanted - fields.keys())
    extra = sorted(fields.keys() - wanted, key=repr)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(map(repr, extra))}"] if extra else []
        )
        raise WireError(f"{name}: bad fields: {'; '.join(parts)}")
    values = dict(fields)
    if "trigger" in values:
        try:
            values["trigger"] = Trigger(cast(str, values["trigger"]))
        except (ValueError, TypeError):
            pass  # leave it as it came: the field rule then names the bad value
    return cls(**values)
