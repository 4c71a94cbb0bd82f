"""The checkpoint protocol as a sans-I/O state machine, one object per side (the h11 pattern).

    proto.send(msg)          -> bytes to write      (checks the side may send msg now)
    proto.receive_data(b)    bytes read; b"" = the peer closed the stream
    proto.next_event()       -> Message | ConnectionClosed | None (None: need more bytes)

Before the first checkpoint the primary sends the whole VM (initial-chunk ..., initial-size),
as QEMU's initial migration does; only once the secondary has it does it send checkpoint-ready.

Both sides walk through the same states, because both apply the one table below: a side applies
it to what it sends (sender = its own role) and to what it receives (sender = the peer's role).
In every live state exactly one side may move the checkpoint forward; the other may only send a
heartbeat or an error. So the two sides can never disagree about the state for longer than the
message between them is in flight, and any message outside the table is a bug or an attack.

Every frame goes through the handshake's session (colo.session): sealed when sent, verified
before it is parsed when received.

Any error (an illegal message, a wrong epoch, a size mismatch, a bad or forged frame) puts the
side in ERROR for good: every later call raises. After that the socket layer may tell the peer why
with `proto.error_frame(str(exc))`, then must drop the connection.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NoReturn, TypeVar

from colo.auth import Handshake
from colo.errors import AuthError, ColoError, ProtocolError
from colo.messages import (
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    ErrorMessage,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Message,
    Role,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
    describe,
    epoch_of,
    field_names,
)
from colo.session import SessionCodec
from colo.wire import MAX_PAYLOAD, check_max_payload

# The largest state one checkpoint (or the initial copy) may carry by default: above any RAM size
# toyvm supports plus lz4's worst-case growth, but finite, so a runaway peer cannot make the
# secondary stage forever.
MAX_STATE_BYTES = 16 * 1024**3


class State(enum.Enum):
    """Where the conversation is. Names describe the last step taken, by either side."""

    WAIT_READY = "WAIT_READY"  # connected; initial-chunk data flows until initial-size
    INITIAL_RECEIVED = "INITIAL_RECEIVED"  # the initial copy arrived whole; secondary applies it
    IDLE = "IDLE"  # between checkpoints: the primary's VM runs
    REQUESTED = "REQUESTED"  # checkpoint-request sent; waiting for checkpoint-reply
    REPLIED = "REPLIED"  # checkpoint-reply sent; waiting for vmstate-send
    SENDING = "SENDING"  # vmstate-send sent; vmstate-chunk data flows until vmstate-size
    SIZE_SENT = "SIZE_SENT"  # vmstate-size sent; the secondary verifies the state
    RECEIVED = "RECEIVED"  # vmstate-received sent: checkpoint complete; waiting for loaded
    ERROR = "ERROR"  # something went wrong; terminal
    CLOSED = "CLOSED"  # the stream ended; terminal


PRIMARY, SECONDARY = Role.PRIMARY, Role.SECONDARY

# (state, who sends, message) -> next state: the whole checkpoint conversation, in order.
CHECKPOINT_TRANSITIONS: dict[tuple[State, Role, type[Message]], State] = {
    (State.WAIT_READY, PRIMARY, InitialChunk): State.WAIT_READY,
    (State.WAIT_READY, PRIMARY, InitialSize): State.INITIAL_RECEIVED,
    (State.INITIAL_RECEIVED, SECONDARY, CheckpointReady): State.IDLE,
    (State.IDLE, PRIMARY, CheckpointRequest): State.REQUESTED,
    (State.REQUESTED, SECONDARY, CheckpointReply): State.REPLIED,
    (State.REPLIED, PRIMARY, VmstateSend): State.SENDING,
    (State.SENDING, PRIMARY, VmstateChunk): State.SENDING,
    (State.SENDING, PRIMARY, VmstateSize): State.SIZE_SENT,
    (State.SIZE_SENT, SECONDARY, VmstateReceived): State.RECEIVED,
    (State.RECEIVED, SECONDARY, VmstateLoaded): State.IDLE,
}

LIVE_STATES = tuple(s for s in State if s not in (State.ERROR, State.CLOSED))

# The table the sides use: the conversation, plus heartbeat (legal everywhere live, changes
# nothing) and error (legal everywhere live, ends the connection), from either side.
TRANSITIONS: dict[tuple[State, Role, type[Message]], State] = {
    **CHECKPOINT_TRANSITIONS,
    **{(s, who, Heartbeat): s for s in LIVE_STATES for who in Role},
    **{(s, who, ErrorMessage): State.ERROR for s in LIVE_STATES for who in Role},
}


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Event: the peer closed the stream. `state` is where the side was when that happened
    (the failover logic needs it: RECEIVED means the last checkpoint is complete);
    `unparsed_bytes` counts a frame cut off mid-way."""

    state: State
    unparsed_bytes: int


Event = Message | ConnectionClosed
_T = TypeVar("_T")


class ProtocolSide:
    """The state machine of one side; use `PrimaryProtocol` or `SecondaryProtocol`.

    Public attributes, read-only for callers:
      state            the current State
      epoch            the epoch of the checkpoint in progress, or of the next one when IDLE
      completed_epoch  the last epoch whose state arrived whole and verified (vmstate-received)
      loaded_epoch     the last epoch the secondary applied (vmstate-loaded)
      vmstate_bytes    vmstate-chunk bytes seen so far in the current epoch
      initial_bytes    initial-chunk bytes seen so far (after initial-size: the whole initial copy)
      codec            the connection's SessionCodec (frame counters; tests forge frames with the
                       peer's)
    """

    ROLE: ClassVar[Role]

    def __init__(
        self,
        handshake: Handshake,
        *,
        first_epoch: int | None = 1,
        max_payload: int = MAX_PAYLOAD,
        max_state_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        # Nothing is accepted before authentication: a side exists only on top of a handshake
        # that completed, for this side's role.
        if not handshake.done:
            raise AuthError(f"{self.ROLE.value}: the handshake is not complete")
        if (handshake.role, handshake.peer_role) != (self.ROLE.value, self.ROLE.peer.value):
            raise ValueError(
                f"{type(self).__name__} needs a handshake as {self.ROLE.value!r} with "
                f"{self.ROLE.peer.value!r}, got {handshake.role!r} with {handshake.peer_role!r}"
            )
        # None (a secondary): the copy says where it ends, and our checkpoint-ready names the next epoch.
        self._epoch_from_ready = first_epoch is None
        if first_epoch is None:
            first_epoch = 1
        if type(first_epoch) is not int or first_epoch < 1:
            raise ValueError(f"first_epoch must be an int >= 1 or None, got {first_epoch!r}")
        if type(max_state_bytes) is not int or max_state_bytes < 0:
            raise ValueError(f"max_state_bytes must be an int >= 0, got {max_state_bytes!r}")
        self.max_payload = check_max_payload(max_payload)
        self.max_state_bytes = max_state_bytes
        self.state = State.WAIT_READY
        self.epoch = first_epoch  # a re-protected pair may go on from the primary's epoch
        self.completed_epoch = first_epoch - 1
        self.loaded_epoch = first_epoch - 1
        self.vmstate_bytes = 0
        self.initial_bytes = 0
        self._why_error = ""
        self._peer_closed = False
        self._closed_event: ConnectionClosed | None = None
        # The session is fed with the bytes the peer pipelined behind its proof; a bad one fails
        # the side, not __init__.
        self.codec: SessionCodec = handshake.session(max_payload=max_payload)
        if self.codec.error is not None:
            self.state = State.ERROR
            self._why_error = str(self.codec.error)

    # -- the three calls ---------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Check that this side may send `msg` now, advance, and return the frame to write."""
        self._check_usable()
        return self._guarded(lambda: self._send(msg))

    def send_parts(self, msg: Message) -> list[bytes | bytearray | memoryview]:
        """As `send`, but the frame as buffers to write in order (a large state chunk's data is one of them,
        not copied: keep it unchanged until the frame is written)."""
        self._check_usable()
        return self._guarded(lambda: self._send_parts(msg))

    def read_target(self) -> memoryview | None:
        """Where the socket layer should read the next bytes to (see SessionCodec.read_target), or None."""
        if self.state in (State.ERROR, State.CLOSED) or self._peer_closed:
            return None
        return self.codec.read_target()

    def filled(self, n: int) -> None:
        """`n` bytes were read into `read_target()`."""
        self._check_usable()
        self._guarded(lambda: self.codec.filled(n))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the peer; b"" means the peer closed its end."""
        self._check_usable()
        if self._peer_closed:
            self._fail(ProtocolError(f"{self.ROLE.value}: receive_data after end of stream"))
        if not data:
            self._peer_closed = True
            return
        self._guarded(lambda: self.codec.feed(data))

    def next_event(self) -> Event | None:
        """The next event from the peer, or None until more bytes arrive.

        After an `ErrorMessage` event the side is in ERROR, so the next call raises: stop there.
        """
        if self._closed_event is not None:
            return self._closed_event
        self._check_usable()
        return self._guarded(self._next_event)

    def error_frame(self, reason: str) -> bytes:
        """A sealed `error` frame telling the peer why we give up, outside the table: for the
        socket layer after a failure, just before it drops the connection (works in ERROR)."""
        return self.codec.encode(ErrorMessage(reason))

    def close(self) -> None:
        """We are closing the connection: every later call is refused (ERROR stays ERROR)."""
        if self.state is not State.ERROR:
            self.state = State.CLOSED

    # -- internals -----------------------------------------------------------------------------

    def _send(self, msg: Message) -> bytes:
        self._advance(self.ROLE, msg)
        return self.codec.encode(msg)

    def _send_parts(self, msg: Message) -> list[bytes | bytearray | memoryview]:
        self._advance(self.ROLE, msg)
        return self.codec.encode_parts(msg)

    def _next_event(self) -> Event | None:
        msg = self.codec.next_message()
        if msg is not None:
            self._advance(self.ROLE.peer, msg)
            return msg
        if self._peer_closed:
            self._closed_event = ConnectionClosed(self.state, self.codec.buffered)
            self.state = State.CLOSED
            return self._closed_event
        return None

    def _advance(self, sender: Role, msg: Message) -> None:
        """Apply the table to `msg` from `sender`, with the epoch and byte-count checks."""
        nxt = TRANSITIONS.get((self.state, sender, type(msg)))
        epoch = epoch_of(msg)
        if (isinstance(msg, CheckpointReady) and self._epoch_from_ready and nxt is not None
                and epoch is not None and epoch >= 1):
            self.epoch, self._epoch_from_ready = epoch, False
            self.completed_epoch = self.loaded_epoch = epoch - 1
        if nxt is None or (epoch is not None and epoch != self.epoch):
            raise self._unexpected(sender, msg)
        if isinstance(msg, VmstateSend):
            self.vmstate_bytes = 0
        elif isinstance(msg, InitialChunk):
            if self.initial_bytes + len(msg.data) > self.max_state_bytes:
                raise self._error(
                    sender,
                    f"at most {self.max_state_bytes} bytes of initial state",
                    f"{self.initial_bytes + len(msg.data)} bytes of initial-chunk",
                )
            self.initial_bytes += len(msg.data)
        elif isinstance(msg, InitialSize) and msg.size != self.initial_bytes:
            raise self._error(
                sender,
                f"initial-size {self.initial_bytes} (the bytes of initial-chunk data sent)",
                f"initial-size {msg.size}",
            )
        elif isinstance(msg, VmstateChunk):
            if self.vmstate_bytes + len(msg.data) > self.max_state_bytes:
                raise self._error(
                    sender,
                    f"at most {self.max_state_bytes} bytes of state for epoch {self.epoch}",
                    f"{self.vmstate_bytes + len(msg.data)} bytes of vmstate-chunk",
                )
            self.vmstate_bytes += len(msg.data)
        elif isinstance(msg, VmstateSize) and msg.size != self.vmstate_bytes:
            raise self._error(
                sender,
                f"vmstate-size {self.vmstate_bytes} for epoch {self.epoch} "
                "(the bytes of vmstate-chunk data sent)",
                f"vmstate-size {msg.size}",
            )
        elif isinstance(msg, ErrorMessage):
            self._why_error = f"the {sender.value} sent error: {msg.reason}"
        self.state = nxt
        if isinstance(msg, VmstateReceived):
            self.completed_epoch = self.epoch
        elif isinstance(msg, VmstateLoaded):
            self.loaded_epoch = self.epoch
            self.epoch += 1

    def _unexpected(self, sender: Role, msg: Message) -> ProtocolError:
        legal = [(who, cls) for (st, who, cls) in CHECKPOINT_TRANSITIONS if st is self.state]
        senders = sorted({who.value for who, _ in legal})
        names = " or ".join(cls.NAME for _, cls in legal)
        # "for epoch N" only where what is expected carries one (not the initial copy)
        with_epoch = any("epoch" in field_names(cls) for _, cls in legal)
        epoch = f" for epoch {self.epoch}" if with_epoch else ""
        expected = f"{names}{epoch} from the {' or '.join(senders)}"
        return self._error(sender, expected, f"{describe(msg)} from the {sender.value}")

    def _error(self, sender: Role, expected: str, got: str) -> ProtocolError:
        verb = "sending" if sender is self.ROLE else "receiving"
        text = f"{self.ROLE.value} in {self.state.name} ({verb}): expected {expected}, got {got}"
        return ProtocolError(text, expected=expected, got=got)

    def _guarded(self, step: Callable[[], _T]) -> _T:
        """Run `step`; any ColoError puts the side in ERROR for good before it propagates."""
        try:
            return step()
        except ColoError as exc:
            self._fail(exc)

    def _fail(self, exc: ColoError) -> NoReturn:
        if self.state is not State.ERROR:
            self.state = State.ERROR
            self._why_error = str(exc)
        raise exc

    def _check_usable(self) -> None:
        if self.state is State.ERROR:
            raise ProtocolError(
                f"{self.ROLE.value} is in ERROR ({self._why_error}): drop the connection"
            )
        if self.state is State.CLOSED:
            raise ProtocolError(f"{self.ROLE.value}: the connection is CLOSED")


class PrimaryProtocol(ProtocolSide):
    """The primary's side: sends initial-chunk, initial-size, then per checkpoint
    checkpoint-request, vmstate-send, vmstate-chunk, vmstate-size."""

    ROLE = Role.PRIMARY


class SecondaryProtocol(ProtocolSide):
    """The secondary's side: sends checkpoint-ready, checkpoint-reply, vmstate-received,
    vmstate-loaded."""

    ROLE = Role.SECONDARY
