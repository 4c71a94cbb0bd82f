"""The message vocabulary of the replication link, the gateway links and the control link.

The seven checkpoint messages carry QEMU's names exactly (migration/colo.c, COLOMessage):
checkpoint-ready, checkpoint-request, checkpoint-reply, vmstate-send, vmstate-size,
vmstate-received, vmstate-loaded. Around them: heartbeat and error, which either side may send;
vmstate-chunk, our addition, which carries the state bytes inside QEMU's vmstate-send window;
initial-chunk and initial-size, our additions, which carry the initial full copy of the VM before
checkpoint-ready; and auth-challenge / auth-proof, used only by the handshake in `colo.auth`.

Two more vocabularies travel on their own authenticated connections and never through the
checkpoint state machine: `GATEWAY_MESSAGES` between the gateway and the nodes (network input and
output, output commit, failover), `CONTROL_MESSAGES` between a control client and the gateway.

Messages are frozen dataclasses that validate their fields on construction, so a message that
exists is well formed: the wire decoder builds messages through the same constructors and thereby
rejects ill-typed fields with the same rules. Who may send what, and when, is not decided here:
that is the transition table in `colo.protocol` for the replication link, and the gateway and
node code for the other two.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

from colo.errors import WireError
from colo.netevents import (
    EVENT_KINDS,
    KIND_CLOSE,
    KIND_DATA,
    KIND_OPEN,
    MAX_CONN,
    NetEvent,
    conn_problem,
    data_problem,
    events_problem,
    kind_problem,
    seq_problem,
)

NONCE_SIZE = 32  # bytes of a handshake nonce
MAC_SIZE = 32  # bytes of an HMAC-SHA256 proof
MAX_ROLE_LENGTH = 32  # characters of a role name in auth-challenge
MAX_EVENTS = 100_000  # events in one promoted message
MAX_INFO_KEYS = 1000  # top-level keys of an info dict
MAX_INFO_DEPTH = 64  # lists and maps nested inside one info value (msgpack's own limits are higher)

MAX_ID_LENGTH = 64  # characters of a node or gateway id
MAX_ADDRESS_LENGTH = 300  # characters of a "host:port" address
MAX_EXIT_CODE = 255
__all__ = ["EVENT_KINDS", "KIND_CLOSE", "KIND_DATA", "KIND_OPEN", "MAX_CONN"]  # re-exported from colo.netevents

# Handshake options, the bits of auth-challenge's `flags`. Both ends must send the same flags; the
# proofs cover them, so a man in the middle cannot change them (no downgrade).
FLAG_ENCRYPT = 1  # the session after the handshake is encrypted (colo.session), not only authenticated
KNOWN_FLAGS = FLAG_ENCRYPT


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


class ProtectionState(enum.StrEnum):
    """Whether the primary's VM is replicated to a secondary: the `state` of `protection`."""

    PROTECTED = "protected"  # a secondary holds the last complete checkpoint; output is held
    UNPROTECTED = "unprotected"  # no secondary: output is released as it comes


# One rule per field name, shared by every message that has the field, so "epoch" means the same
# thing everywhere. A rule returns None when the value is fine, else what is wrong with it.
# `type(v) is int` on purpose: bool is a subclass of int and True is not an epoch.
MAX_U64 = 2**64 - 1  # the largest int msgpack carries: a message that exists must be sendable


def _count_rule(low: int) -> Callable[[object], str | None]:
    def rule(v: object) -> str | None:
        if type(v) is not int or v < low:
            return f"must be an int >= {low}, got {v!r}"
        return None if v <= MAX_U64 else f"must fit 64 bits (at most {MAX_U64}), got {v}"

    return rule


_epoch_rule = _size_rule = _count_rule(0)
_seq_rule = _count_rule(1)


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


def _id_rule(empty_ok: bool) -> Callable[[object], str | None]:
    def rule(v: object) -> str | None:
        ok = type(v) is str and (empty_ok or v) and len(v) <= MAX_ID_LENGTH and v.isascii() and (
            v.isprintable())
        what = "0" if empty_ok else "1"
        return None if ok else f"must be {what}..{MAX_ID_LENGTH} printable ASCII characters, got {v!r}"

    return rule


def _address_rule(v: object) -> str | None:
    if type(v) is str and len(v) <= MAX_ADDRESS_LENGTH and v.isascii() and v.isprintable() and (
            not v or (":" in v and v.rpartition(":")[2].isdigit())):
        return None
    return f"must be \"\" or a HOST:PORT address of at most {MAX_ADDRESS_LENGTH} characters, got {v!r}"


def _conns_rule(v: object) -> str | None:
    if type(v) is not list or len(v) > MAX_EVENTS:
        got = f"{len(v)} items" if type(v) is list else type(v).__name__
        return f"must be a list of at most {MAX_EVENTS} connection ids, got {got}"
    for i, conn in enumerate(v):
        problem = conn_problem(conn)
        if problem is not None:
            return f"has a bad connection id at index {i}: {problem}"
    return None


def _code_rule(v: object) -> str | None:
    ok = type(v) is int and 0 <= v <= MAX_EXIT_CODE
    return None if ok else f"must be an int in 0..{MAX_EXIT_CODE}, got {v!r}"


def _protection_rule(v: object) -> str | None:
    choices = ", ".join(s.value for s in ProtectionState)
    return None if isinstance(v, ProtectionState) else f"must be one of {choices}, got {v!r}"


def _flags_rule(v: object) -> str | None:
    # Unknown bits are refused, not ignored: a peer asking for an option we lack must not be
    # answered as if we had it.
    ok = type(v) is int and 0 <= v and not v & ~KNOWN_FLAGS
    return None if ok else f"must be an int made of the known bits {KNOWN_FLAGS:#x}, got {v!r}"


def _bool_rule(v: object) -> str | None:
    return None if type(v) is bool else f"must be a bool, got {v!r}"


MAX_DELAY_MS = 10_000  # slow motion: the longest wait before each handshake message
MAX_GRANT = 1000  # step mode: messages one step-command may let go


def _delay_rule(v: object) -> str | None:
    ok = type(v) is int and 0 <= v <= MAX_DELAY_MS
    return None if ok else f"must be an int in 0..{MAX_DELAY_MS}, got {v!r}"


def _grant_rule(v: object) -> str | None:
    ok = type(v) is int and 0 <= v <= MAX_GRANT
    return None if ok else f"must be an int in 0..{MAX_GRANT}, got {v!r}"


def _events_rule(v: object) -> str | None:
    return events_problem(v, MAX_EVENTS)


_MSGPACK_INT = range(-(2**63), 2**64)  # what msgpack can encode
_Path = tuple[Any, object]  # (parent path or None, key or index): where a value sits in an info


def _render(path: _Path) -> str:
    keys: list[object] = []
    node: _Path | None = path
    while node is not None:
        node, key = node
        keys.append(key)
    first, *rest = reversed(keys)
    return repr(first) + "".join(f"[{k!r}]" for k in rest)


def _info_rule(v: object) -> str | None:
    if type(v) is not dict or len(v) > MAX_INFO_KEYS:
        got = f"{len(v)} keys" if type(v) is dict else type(v).__name__
        return f"must be a dict of at most {MAX_INFO_KEYS} str keys, got {got}"
    bad_key = next((k for k in v if type(k) is not str), None)
    if bad_key is not None:
        return f"must have str keys, got key {bad_key!r}"
    # The values: anything msgpack decodes to, and nothing else, so that every info that exists
    # can be encoded and comes back equal. Checked without recursion (and bounded in depth, which
    # also stops a cyclic structure): a hostile frame cannot exhaust the Python stack. Paths are
    # linked (parent, key) pairs, rendered only for an error text.
    todo: list[tuple[object, _Path, int]] = [(val, (None, key), 1) for key, val in v.items()]
    while todo:
        value, path, depth = todo.pop()
        t = type(value)
        if value is None or t in (bool, float, str, bytes):
            continue
        if t is int and cast(int, value) in _MSGPACK_INT:
            continue
        where = f"value at {_render(path)}"
        if t is int:
            return f"{where}: int {value} does not fit msgpack's 64 bits"
        if t is not list and t is not dict:
            return f"{where}: {t.__name__} is not a msgpack type"
        if depth > MAX_INFO_DEPTH:
            return f"{where}: nested deeper than {MAX_INFO_DEPTH} lists and maps"
        items: list[tuple[object, object]]
        if t is list:
            items = list(enumerate(cast(list[object], value)))
        else:
            mapping = cast(dict[object, object], value)
            bad = next((k for k in mapping if type(k) is not str and type(k) is not bytes), None)
            if bad is not None:
                return f"{where}: map key {bad!r} is not str or bytes"
            items = list(mapping.items())
        todo.extend((item, (path, key), depth + 1) for key, item in items)
    return None


_FIELD_RULES: dict[str, Callable[[object], str | None]] = {
    "epoch": _epoch_rule,
    "size": _size_rule,
    "data": data_problem,
    "trigger": _trigger_rule,
    "reason": _text_rule,
    "role": _role_rule,
    "nonce": _fixed_bytes_rule(NONCE_SIZE),
    "mac": _fixed_bytes_rule(MAC_SIZE),
    "seq": seq_problem,
    "kind": kind_problem,
    "conn": conn_problem,
    "input_seq": _size_rule,
    "output_seq": _size_rule,
    "events": _events_rule,
    "info": _info_rule,
    "state": _protection_rule,
    "ok": _bool_rule,
    "swap": _bool_rule,
    "generation": _size_rule,
    "taken": _size_rule,
    "attempt": _size_rule,
    "node": _id_rule(empty_ok=False),
    "gateway": _id_rule(empty_ok=True),
    "peer": _id_rule(empty_ok=True),
    "address": _address_rule,
    "conns": _conns_rule,
    "code": _code_rule,
    "flags": _flags_rule,
    # step mode (teaching): colo.gate
    "on": _bool_rule,
    "delay_ms": _delay_rule,
    "grant": _grant_rule,
    "target": _id_rule(empty_ok=True),
}

# Fields whose values travel as strings but live as enums: from_fields converts them.
_ENUM_FIELDS: dict[str, type[enum.Enum]] = {"trigger": Trigger, "state": ProtectionState}


def _buffer_rule(v: object) -> str | None:
    """The state chunks' data: bytes, or a flat byte view of a buffer (sent or received without a copy)."""
    if type(v) is bytes:
        return None
    if type(v) is memoryview and v.format in ("B", "b", "c") and v.ndim == 1 and v.c_contiguous:
        return None
    return f"must be bytes, got {type(v).__name__}"


_M = TypeVar("_M", bound="Message")


class Message:
    """Base of all messages: `NAME` is the wire name; fields are validated on construction."""

    __slots__ = ()
    NAME: ClassVar[str]
    BUFFER_DATA: ClassVar[bool] = False  # `data` may be a memoryview (the state chunks)

    def __post_init__(self) -> None:
        for name in field_names(type(self)):
            rule = _buffer_rule if name == "data" and self.BUFFER_DATA else _FIELD_RULES[name]
            problem = rule(getattr(self, name))
            if problem is not None:
                raise WireError(f"{self.NAME}: field {name!r} {problem}")

    @classmethod
    def checked_already(cls: type[_M], *values: Any) -> _M:
        """The message of these field values, which passed this class's rules already (the relay's hot path: an
        output taken out of a verified `outputs`, inputs the witness built one by one regrouped): not checked
        again. Anything else goes through the constructor. TypeError unless every field is given."""
        try:
            make = _UNCHECKED[cls]
        except KeyError:
            make = _UNCHECKED[cls] = _unchecked_factory(cls)
        return cast(_M, make(*values))


# Per message class, a function that fills a new message's slots with its arguments, one assignment each (half
# the constructor's time: the relay builds three messages a request this way).
_UNCHECKED: dict[type, Callable[..., Any]] = {}


def _unchecked_factory(cls: type[Message]) -> Callable[..., Any]:
    names = field_names(cls)  # the parameters' names: a missing one is named in the TypeError
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def {cls.__name__}({', '.join(names)}):", "    _m = _new(_cls)"]
    for i, name in enumerate(names):
        scope[f"_set{i}"] = cls.__dict__[name].__set__  # the slot's own setter: frozen dataclasses refuse setattr
        lines.append(f"    _set{i}(_m, {name})")
    lines.append("    return _m")
    exec("\n".join(lines), scope)
    make: Callable[..., Any] = scope[cls.__name__]
    return make


@dataclass(frozen=True, slots=True, repr=False)
class InitialChunk(Message):
    """P->S, zero or more times before initial-size: a piece of the initial full copy of the VM.

    Our addition, like vmstate-chunk: QEMU sends the initial copy as an ordinary migration stream
    before COLO starts; we frame it. It carries no epoch: it comes before the first checkpoint.
    """

    NAME: ClassVar[str] = "initial-chunk"
    BUFFER_DATA: ClassVar[bool] = True
    data: bytes | memoryview

    def __repr__(self) -> str:  # the whole VM: never dump it into a log
        return f"InitialChunk(data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class InitialSize(Message):
    """P->S, once: the total byte count of the initial-chunk data; the secondary checks it."""

    NAME: ClassVar[str] = "initial-size"
    size: int


@dataclass(frozen=True, slots=True)
class CheckpointReady(Message):
    """S->P, once: the secondary applied the initial copy and is ready for checkpoint `epoch`."""

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
    BUFFER_DATA: ClassVar[bool] = True
    epoch: int
    data: bytes | memoryview

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
    """Handshake only: the sender's role, a fresh random nonce and its options (FLAG_ENCRYPT)."""

    NAME: ClassVar[str] = "auth-challenge"
    role: str
    nonce: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class AuthProof(Message):
    """Handshake only: HMAC(key, context, own role, both nonces, both flags); see colo.auth."""

    NAME: ClassVar[str] = "auth-proof"
    mac: bytes


# -- the gateway links (gateway <-> node) --------------------------------------------------------
# Network events are numbered: the gateway numbers input (`seq` of input), each node numbers the
# output its VM produces (`seq` of output). Output commit is by these numbers. Every message a node
# sends carries its `generation`: the witness obeys only the highest generation it has seen (a
# fencing token, like a Raft term). See docs/protocol.md, "The gateway and control links".


@dataclass(frozen=True, slots=True, repr=False)
class NodeHello(Message):
    """Node->gateway, first: who this node is and what it holds (a new gateway learns the cluster)."""

    NAME: ClassVar[str] = "node-hello"
    role: str  # its mode now: primary, secondary (holds a copy) or spare (holds none)
    node: str  # its id, stable for the life of the process
    generation: int
    epoch: int  # the last checkpoint it holds complete
    input_seq: int  # the highest input it has received
    output_seq: int  # the last output its VM produced
    conns: list[int]  # the connections its VM has open
    gateway: str  # the id of the gateway it was last attached to ("" never)
    address: str  # where a primary reaches this secondary ("" for a primary)
    peer: str  # the node it replicates with ("" none)
    info: dict[str, Any]  # anything else, for display only

    def __repr__(self) -> str:
        return (f"NodeHello(role={self.role!r}, node={self.node!r}, generation={self.generation}, "
                f"epoch={self.epoch}, input_seq={self.input_seq}, output_seq={self.output_seq}, "
                f"conns=<{len(self.conns)}>, gateway={self.gateway!r}, address={self.address!r}, "
                f"peer={self.peer!r})")


@dataclass(frozen=True, slots=True)
class NodeStatus(Message):
    """Node->gateway, periodically: the node's state in `info` (for display); doubles as its heartbeat."""

    NAME: ClassVar[str] = "node-status"
    generation: int
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Gateway->node, the answer to node-hello: the gateway's id and the generation it obeys."""

    NAME: ClassVar[str] = "welcome"
    gateway: str
    generation: int


@dataclass(frozen=True, slots=True, repr=False)
class Input(Message):
    """Gateway->node: input event `seq`: open, data or close of client connection `conn`."""

    NAME: ClassVar[str] = "input"
    seq: int
    kind: int
    conn: int
    data: bytes

    @property
    def event(self) -> NetEvent:
        return NetEvent(self.seq, self.kind, self.conn, self.data)

    def __repr__(self) -> str:
        return _event_repr(self, self.seq, self.kind, self.conn, self.data)


# How much one `inputs` or `outputs` frame carries at most (about: the event that crosses the bound is in it)
BATCH_BYTES = 256 << 10
BATCH_EVENTS = 4096


@dataclass(frozen=True, slots=True, repr=False)
class Inputs(Message):
    """Gateway->node: several input events in order, in one frame (a turn of the gateway loop); each as one input."""

    NAME: ClassVar[str] = "inputs"
    events: list[list[Any]]  # [[seq, kind, conn, data], ...]

    def __repr__(self) -> str:
        return f"Inputs(<{len(self.events)} events, seq {self.events[0][0] if self.events else '-'}...>)"


@dataclass(frozen=True, slots=True)
class InputFloor(Message):
    """Gateway->node: inputs up to `input_seq` will never come (a gone gateway's): take the next one."""

    NAME: ClassVar[str] = "input-floor"
    input_seq: int


@dataclass(frozen=True, slots=True)
class Progress(Message):
    """Active node->gateway: its VM has taken every input up to `taken` (the gateway's credit)."""

    NAME: ClassVar[str] = "progress"
    generation: int
    taken: int


@dataclass(frozen=True, slots=True, repr=False)
class Output(Message):
    """Node->gateway: output event `seq` of the node's VM; the gateway holds it until committed."""

    NAME: ClassVar[str] = "output"
    generation: int
    seq: int
    kind: int
    conn: int
    data: bytes

    @property
    def event(self) -> NetEvent:
        return NetEvent(self.seq, self.kind, self.conn, self.data)

    def __repr__(self) -> str:
        return _event_repr(self, self.seq, self.kind, self.conn, self.data)


@dataclass(frozen=True, slots=True, repr=False)
class Outputs(Message):
    """Node->gateway: several output events of its VM in order, in one frame (a slice's worth); each as one output."""

    NAME: ClassVar[str] = "outputs"
    generation: int
    events: list[list[Any]]  # [[seq, kind, conn, data], ...]

    def __repr__(self) -> str:
        return (f"Outputs(generation={self.generation}, <{len(self.events)} events, seq "
                f"{self.events[0][0] if self.events else '-'}...>)")


@dataclass(frozen=True, slots=True)
class Commit(Message):
    """Primary->gateway: checkpoint `epoch` is complete: release output, trim the input log."""

    NAME: ClassVar[str] = "commit"
    generation: int
    epoch: int
    input_seq: int  # input with seq <= input_seq is inside the checkpoint: drop it from the log
    output_seq: int  # output with seq <= output_seq is covered: release it to the clients


@dataclass(frozen=True, slots=True)
class Protection(Message):
    """Primary->gateway: protected by secondary `peer` from checkpoint `epoch` on, or unprotected."""

    NAME: ClassVar[str] = "protection"
    generation: int
    state: ProtectionState
    epoch: int
    input_seq: int
    output_seq: int
    peer: str
    reason: str
    attempt: int = 0  # the protect it answers (0: the primary had none to answer)


@dataclass(frozen=True, slots=True)
class Resynced(Message):
    """Hybrid secondary->gateway: my VM now equals checkpoint `epoch`; my earlier output is void."""

    NAME: ClassVar[str] = "resynced"
    generation: int
    epoch: int
    input_seq: int
    output_seq: int


@dataclass(frozen=True, slots=True)
class GuestEnded(Message):
    """Active node->gateway: the guest powered off (exit `code`) or faulted (125): the service ended."""

    NAME: ClassVar[str] = "guest-ended"
    generation: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CheckpointNow(Message):
    """Gateway->primary: take a checkpoint now, for `trigger` (hybrid mode: mismatch or timeout)."""

    NAME: ClassVar[str] = "checkpoint-now"
    trigger: Trigger


@dataclass(frozen=True, slots=True)
class Protect(Message):
    """Gateway->primary: protect the VM with secondary `node`, which listens at `address`."""

    NAME: ClassVar[str] = "protect"
    node: str
    address: str
    attempt: int = 0  # echoed in the primary's protection reports, so a report of an abandoned copy is known stale


@dataclass(frozen=True, slots=True)
class Unprotect(Message):
    """Gateway->primary: stop checkpointing to your secondary (the witness no longer counts on it)."""

    NAME: ClassVar[str] = "unprotect"
    reason: str


@dataclass(frozen=True, slots=True)
class FailoverRequest(Message):
    """Secondary->gateway: the primary is lost (`reason`); promote me."""

    NAME: ClassVar[str] = "failover-request"
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class Promote(Message):
    """Gateway->secondary: the primary is fenced; resume as the primary of the new `generation`."""

    NAME: ClassVar[str] = "promote"
    generation: int
    reason: str


@dataclass(frozen=True, slots=True, repr=False)
class Promoted(Message):
    """Secondary->gateway: resumed from checkpoint `epoch`; `events`: the outputs it covers."""

    NAME: ClassVar[str] = "promoted"
    generation: int
    epoch: int
    input_seq: int
    output_seq: int
    events: list[list[Any]]  # [[seq, kind, conn, data], ...]: outputs with seq <= output_seq
    conns: list[int]

    def __repr__(self) -> str:  # up to 100000 events: never dump them into a log
        return (
            f"Promoted(generation={self.generation}, epoch={self.epoch}, input_seq={self.input_seq}, "
            f"output_seq={self.output_seq}, events=<{len(self.events)} events>, conns=<{len(self.conns)}>)"
        )


@dataclass(frozen=True, slots=True)
class Fence(Message):
    """Gateway->node: stop serving and exit: you are no longer part of the service, for `reason`."""

    NAME: ClassVar[str] = "fence"
    reason: str


@dataclass(frozen=True, slots=True)
class Handover(Message):
    """Gateway->primary: take a checkpoint now, then hold still: the secondary takes over from it."""

    NAME: ClassVar[str] = "handover"
    reason: str


@dataclass(frozen=True, slots=True)
class HandedOver(Message):
    """Primary->gateway: checkpoint `epoch` is complete and applied, and my guest holds still after it."""

    NAME: ClassVar[str] = "handed-over"
    generation: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Demote(Message):
    """Gateway->primary, after a switchover: you are not the primary now: wait as a spare (copied anew)."""

    NAME: ClassVar[str] = "demote"
    reason: str


@dataclass(frozen=True, slots=True)
class Reset(Message):
    """Gateway->secondary: discard your copy (it is of a past the service left) and wait as a spare."""

    NAME: ClassVar[str] = "reset"
    reason: str


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """Gateway->node: the service is being stopped on purpose (`reason`): exit cleanly."""

    NAME: ClassVar[str] = "shutdown"
    reason: str


@dataclass(frozen=True, slots=True)
class Step(Message):
    """Gateway->node (teaching): step mode `on`, slow motion `delay_ms`; `grant` held messages may go (colo.gate)."""

    NAME: ClassVar[str] = "step"
    on: bool
    delay_ms: int
    grant: int


# -- the control link (control client <-> gateway) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    """Control->gateway: send me the status of the pair (`colo status`)."""

    NAME: ClassVar[str] = "status-request"


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """Gateway->control: the status of the gateway and the nodes, in `info`."""

    NAME: ClassVar[str] = "status-reply"
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FailoverCommand(Message):
    """Control->gateway: an operator forces a failover (`colo failover`), for `reason`."""

    NAME: ClassVar[str] = "failover-command"
    reason: str


@dataclass(frozen=True, slots=True)
class SwitchoverCommand(Message):
    """Control->gateway: move the service to the secondary at a checkpoint (`colo switchover`)."""

    NAME: ClassVar[str] = "switchover-command"
    swap: bool  # the old primary then becomes a spare (copied anew) instead of leaving
    reason: str


@dataclass(frozen=True, slots=True)
class ShutdownCommand(Message):
    """Control->gateway: stop the whole service cleanly (`colo down`, Ctrl-C of `colo up`)."""

    NAME: ClassVar[str] = "shutdown-command"
    reason: str


@dataclass(frozen=True, slots=True)
class CheckpointCommand(Message):
    """Control->gateway: ask the active primary for a checkpoint now (trigger `manual`), for `reason`."""

    NAME: ClassVar[str] = "checkpoint-command"
    reason: str


@dataclass(frozen=True, slots=True)
class StepCommand(Message):
    """Control->gateway (teaching): step mode, slow motion; node `target` may send `grant` held messages."""

    NAME: ClassVar[str] = "step-command"
    on: bool
    delay_ms: int
    target: str
    grant: int


@dataclass(frozen=True, slots=True)
class CommandResult(Message):
    """Gateway->control: whether the command succeeded (`ok`), and why or why not (`reason`)."""

    NAME: ClassVar[str] = "command-result"
    ok: bool
    reason: str


def _event_repr(msg: Message, seq: int, kind: int, conn: int, data: bytes) -> str:
    kind_name = EVENT_KINDS.get(kind, kind)
    name = type(msg).__name__
    return f"{name}(seq={seq}, kind={kind_name}, conn={conn}, data=<{len(data)} bytes>)"


CHECKPOINT_MESSAGES: tuple[type[Message], ...] = (
    CheckpointReady,
    CheckpointRequest,
    CheckpointReply,
    VmstateSend,
    VmstateSize,
    VmstateReceived,
    VmstateLoaded,
)

# The initial full copy, on the replication link before checkpoint-ready.
INITIAL_MESSAGES: tuple[type[Message], ...] = (InitialChunk, InitialSize)

GATEWAY_MESSAGES: tuple[type[Message], ...] = (
    NodeHello,
    NodeStatus,
    Welcome,
    Input,
    Inputs,
    InputFloor,
    Progress,
    Output,
    Outputs,
    Commit,
    Protection,
    Resynced,
    GuestEnded,
    CheckpointNow,
    Protect,
    Unprotect,
    FailoverRequest,
    Promote,
    Promoted,
    Fence,
    Reset,
    Shutdown,
    Handover,
    HandedOver,
    Demote,
    Step,
)

CONTROL_MESSAGES: tuple[type[Message], ...] = (
    StatusRequest,
    StatusReply,
    FailoverCommand,
    SwitchoverCommand,
    ShutdownCommand,
    CommandResult,
    CheckpointCommand,
    StepCommand,
)

_OTHER_MESSAGES: tuple[type[Message], ...] = (
    VmstateChunk,
    Heartbeat,
    ErrorMessage,
    AuthChallenge,
    AuthProof,
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.NAME: cls
    for group in (
        CHECKPOINT_MESSAGES,
        INITIAL_MESSAGES,
        _OTHER_MESSAGES,
        GATEWAY_MESSAGES,
        CONTROL_MESSAGES,
    )
    for cls in group
}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # asked for every message built, sent and received: a hot path


def field_names(cls: type[Message]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cast(Any, cls)))
    return names


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
    for name, enum_type in _ENUM_FIELDS.items():
        if name in values:
            try:
                values[name] = enum_type(values[name])
            except (ValueError, TypeError):
                pass  # leave it as it came: the field rule then names the bad value
    return cls(**values)
