"""The checkpoint state machines, two of them joined by an in-memory link.

Legal runs: every interleaving a hypothesis run can find (deliveries cut at arbitrary byte
boundaries, the initial copy and each state cut into arbitrary chunks, heartbeats anywhere).
Illegal runs: every message from every role in every state that the table does not allow, wrong
epochs, size mismatches, the initial copy out of place; each error must name what was expected
and what came, and leave the side in ERROR for good.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo.auth import Handshake
from colo.errors import AuthError, ProtocolError, WireError
from colo.messages import (
    NONCE_SIZE,
    AuthChallenge,
    CheckpointReady,
    CheckpointReply,
    CheckpointRequest,
    Commit,
    ErrorMessage,
    Heartbeat,
    InitialChunk,
    InitialSize,
    Input,
    Message,
    NodeHello,
    Protection,
    ProtectionState,
    Role,
    StatusRequest,
    Trigger,
    VmstateChunk,
    VmstateLoaded,
    VmstateReceived,
    VmstateSend,
    VmstateSize,
    describe,
    field_names,
)
from colo.protocol import (
    CHECKPOINT_TRANSITIONS,
    LIVE_STATES,
    TRANSITIONS,
    ConnectionClosed,
    Event,
    PrimaryProtocol,
    ProtocolSide,
    SecondaryProtocol,
    State,
)
from colo.wire import SEALED_HEADER_SIZE, encode_frame

P, S = Role.PRIMARY, Role.SECONDARY
KEY = b"test-key-0123456789abcdef"


def handshakes() -> tuple[Handshake, Handshake]:
    hp, hs = Handshake(KEY, "primary", "secondary"), Handshake(KEY, "secondary", "primary")
    to_s, to_p = hp.start(), hs.start()
    proof_p, proof_s = hp.receive_data(to_p), hs.receive_data(to_s)
    hp.receive_data(proof_s)
    hs.receive_data(proof_p)
    return hp, hs


class Link:
    """Two sides and the bytes in flight to each of them."""

    def __init__(self, **options: int) -> None:
        hp, hs = handshakes()
        self.sides: dict[Role, ProtocolSide] = {
            P: PrimaryProtocol(hp, **options),
            S: SecondaryProtocol(hs, **options),
        }
        self.pending: dict[Role, bytearray] = {P: bytearray(), S: bytearray()}  # keyed by reader
        self.sent: dict[Role, list[Message]] = {P: [], S: []}

    @property
    def primary(self) -> ProtocolSide:
        return self.sides[P]

    @property
    def secondary(self) -> ProtocolSide:
        return self.sides[S]

    def send(self, who: Role, msg: Message) -> None:
        self.pending[who.peer] += self.sides[who].send(msg)
        self.sent[who].append(msg)

    def deliver(self, to: Role, n: int | None = None) -> list[Event]:
        """Hand `to` the next n bytes in flight to it (all by default) and drain its events."""
        buf = self.pending[to]
        n = len(buf) if n is None else n
        piece = bytes(buf[:n])
        del buf[:n]
        side = self.sides[to]
        side.receive_data(piece)
        events = []
        while (ev := side.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, ErrorMessage):
                break  # the side is in ERROR now: every further call raises
        return events

    def forge(self, who: Role, msg: Message) -> bytes:
        """The frame `who` would send for `msg`, sealed with its keys but past its own checks:
        what a buggy or hostile peer that holds the key can send."""
        return self.sides[who].codec.encode(msg)

    def step(self, who: Role, msg: Message) -> None:
        self.send(who, msg)
        assert self.deliver(who.peer) == [msg]

    def states(self) -> tuple[State, State]:
        return self.primary.state, self.secondary.state


def initial_copy(data: bytes = b"the whole vm") -> list[tuple[Role, Message]]:
    return [(P, InitialChunk(data)), (P, InitialSize(len(data)))]


def one_checkpoint(epoch: int, data: bytes = b"abc") -> list[tuple[Role, Message]]:
    return [
        (P, CheckpointRequest(epoch, Trigger.TIMER)),
        (S, CheckpointReply(epoch)),
        (P, VmstateSend(epoch)),
        (P, VmstateChunk(epoch, data)),
        (P, VmstateSize(epoch, len(data))),
        (S, VmstateReceived(epoch)),
        (S, VmstateLoaded(epoch)),
    ]


def drive_to(state: State, *, full_checkpoints: int = 0) -> Link:
    """A link whose two sides are both in `state`, reached legally."""
    link = Link()
    if state is State.WAIT_READY:
        return link
    for who, msg in initial_copy():
        link.step(who, msg)
    if state is State.INITIAL_RECEIVED:
        return link
    link.step(S, CheckpointReady(1))
    for epoch in range(1, full_checkpoints + 1):
        for who, msg in one_checkpoint(epoch):
            link.step(who, msg)
    for who, msg in one_checkpoint(full_checkpoints + 1):
        if link.states() == (state, state):
            break
        link.step(who, msg)
    assert link.states() == (state, state)
    return link


def message_for(cls: type[Message], side: ProtocolSide) -> Message:
    """An instance of `cls` with the epoch (and size) the side expects: only the type is wrong."""
    e = side.epoch
    makers: dict[type[Message], Callable[[], Message]] = {
        InitialChunk: lambda: InitialChunk(b"x"),
        InitialSize: lambda: InitialSize(side.initial_bytes),
        CheckpointReady: lambda: CheckpointReady(e),
        CheckpointRequest: lambda: CheckpointRequest(e),
        CheckpointReply: lambda: CheckpointReply(e),
        VmstateSend: lambda: VmstateSend(e),
        VmstateChunk: lambda: VmstateChunk(e, b"x"),
        VmstateSize: lambda: VmstateSize(e, side.vmstate_bytes),
        VmstateReceived: lambda: VmstateReceived(e),
        VmstateLoaded: lambda: VmstateLoaded(e),
    }
    return makers[cls]()


CONVERSATION = [
    InitialChunk,
    InitialSize,
    CheckpointReady,
    CheckpointRequest,
    CheckpointReply,
    VmstateSend,
    VmstateChunk,
    VmstateSize,
    VmstateReceived,
    VmstateLoaded,
]


def expected_names(state: State) -> str:
    return " or ".join(cls.NAME for (st, _, cls) in CHECKPOINT_TRANSITIONS if st is state)


def expected_text(state: State, epoch: int) -> str:
    """What a side in `state` names as expected: the epoch, unless only the initial copy is."""
    if state is State.WAIT_READY:
        return "expected initial-chunk or initial-size from the primary"
    return f"expected {expected_names(state)} for epoch {epoch}"


def assert_stuck_in_error(side: ProtocolSide) -> None:
    assert side.state is State.ERROR
    with pytest.raises(ProtocolError, match="is in ERROR"):
        side.send(Heartbeat())
    with pytest.raises(ProtocolError, match="is in ERROR"):
        side.receive_data(encode_frame(Heartbeat()))
    with pytest.raises(ProtocolError, match="is in ERROR"):
        side.next_event()


# -- legal runs ---------------------------------------------------------------------------------


def test_full_checkpoints_for_several_epochs() -> None:
    link = drive_to(State.IDLE)
    for epoch in range(1, 6):
        for who, msg in one_checkpoint(epoch, bytes([epoch]) * (100 * epoch)):
            link.step(who, msg)
        assert link.states() == (State.IDLE, State.IDLE)
        for side in link.sides.values():
            assert side.epoch == epoch + 1
            assert side.completed_epoch == side.loaded_epoch == epoch
            assert side.vmstate_bytes == 100 * epoch


def test_state_progression_is_the_documented_one() -> None:
    link = Link()
    assert link.states() == (State.WAIT_READY, State.WAIT_READY)
    seen = []
    for who, msg in [*initial_copy(), (S, CheckpointReady(1)), *one_checkpoint(1)]:
        link.step(who, msg)
        seen.append(link.states()[0])
        assert link.states()[0] is link.states()[1]
    assert seen == [
        State.WAIT_READY,
        State.INITIAL_RECEIVED,
        State.IDLE,
        State.REQUESTED,
        State.REPLIED,
        State.SENDING,
        State.SENDING,
        State.SIZE_SENT,
        State.RECEIVED,
        State.IDLE,
    ]


def test_initial_copy_in_several_chunks() -> None:
    link = Link()
    pieces = [b"pages", b"", b"cpu", b"devices"]
    for piece in pieces:
        link.step(P, InitialChunk(piece))
        assert link.states() == (State.WAIT_READY, State.WAIT_READY)
    assert link.primary.initial_bytes == link.secondary.initial_bytes == 15
    link.step(P, InitialSize(15))
    assert link.states() == (State.INITIAL_RECEIVED, State.INITIAL_RECEIVED)
    link.step(S, CheckpointReady(1))
    assert link.states() == (State.IDLE, State.IDLE)
    # the initial copy is not a checkpoint: no epoch completed, none loaded, none used up
    for side in link.sides.values():
        assert (side.epoch, side.completed_epoch, side.loaded_epoch) == (1, 0, 0)
        assert side.vmstate_bytes == 0


def test_initial_bytes_stay_while_checkpoints_count_their_own() -> None:
    link = drive_to(State.IDLE, full_checkpoints=2)
    for side in link.sides.values():
        assert side.initial_bytes == len(b"the whole vm")
        assert side.vmstate_bytes == len(b"abc")


def test_empty_initial_copy_is_a_zero_byte_state() -> None:
    link = Link()
    link.step(P, InitialSize(0))
    assert link.states() == (State.INITIAL_RECEIVED, State.INITIAL_RECEIVED)


def test_completed_before_loaded() -> None:
    link = drive_to(State.SIZE_SENT)
    link.step(S, VmstateReceived(1))
    assert link.primary.completed_epoch == 1 and link.primary.loaded_epoch == 0


def test_no_chunks_is_a_zero_byte_state() -> None:
    link = drive_to(State.SENDING)
    link.step(P, VmstateSize(1, 0))
    assert link.states() == (State.SIZE_SENT, State.SIZE_SENT)


@pytest.mark.parametrize("state", LIVE_STATES)
@pytest.mark.parametrize("who", [P, S])
def test_heartbeat_in_every_live_state_changes_nothing(state: State, who: Role) -> None:
    link = drive_to(state)

    def snapshot() -> tuple[object, ...]:
        sec = link.secondary
        return (link.states(), link.primary.epoch, sec.vmstate_bytes, sec.initial_bytes)

    before = snapshot()
    for _ in range(3):
        link.step(who, Heartbeat())
    assert snapshot() == before


@pytest.mark.parametrize("state", LIVE_STATES)
@pytest.mark.parametrize("who", [P, S])
def test_error_in_every_live_state_ends_both_sides(state: State, who: Role) -> None:
    link = drive_to(state)
    link.send(who, ErrorMessage("giving up"))
    assert link.sides[who].state is State.ERROR
    assert link.deliver(who.peer) == [ErrorMessage("giving up")]
    assert_stuck_in_error(link.sides[who.peer])


def test_one_side_moves_the_conversation_in_each_live_state() -> None:
    for state in LIVE_STATES:
        movers = {who for (st, who, _) in CHECKPOINT_TRANSITIONS if st is state}
        assert len(movers) == 1, (state, movers)
        for who in Role:
            assert TRANSITIONS[(state, who, Heartbeat)] is state
            assert TRANSITIONS[(state, who, ErrorMessage)] is State.ERROR


def test_first_epoch_can_continue_a_numbering() -> None:
    hp, hs = handshakes()
    primary, secondary = PrimaryProtocol(hp, first_epoch=41), SecondaryProtocol(hs, first_epoch=41)
    secondary.receive_data(primary.send(InitialChunk(b"vm")) + primary.send(InitialSize(2)))
    assert secondary.next_event() == InitialChunk(b"vm")
    assert secondary.next_event() == InitialSize(2)
    primary.receive_data(secondary.send(CheckpointReady(41)))
    assert primary.next_event() == CheckpointReady(41)
    assert primary.send(CheckpointRequest(41))
    with pytest.raises(ValueError, match="first_epoch"):
        PrimaryProtocol(handshakes()[0], first_epoch=0)


def test_a_secondary_can_learn_the_first_epoch_from_its_copy() -> None:
    """A secondary that joins a running service does not know the epoch: its copy says where it ends, and its
    checkpoint-ready names the next one; the primary's side still checks it."""
    hp, hs = handshakes()
    primary, secondary = PrimaryProtocol(hp, first_epoch=41), SecondaryProtocol(hs, first_epoch=None)
    secondary.receive_data(primary.send(InitialChunk(b"vm")) + primary.send(InitialSize(2)))
    assert secondary.next_event() == InitialChunk(b"vm")
    assert secondary.next_event() == InitialSize(2)
    primary.receive_data(secondary.send(CheckpointReady(41)))
    assert secondary.epoch == 41 and secondary.loaded_epoch == 40
    assert primary.next_event() == CheckpointReady(41)
    secondary.receive_data(primary.send(CheckpointRequest(41)))
    assert secondary.next_event() == CheckpointRequest(41)
    hp, hs = handshakes()
    primary, secondary = PrimaryProtocol(hp, first_epoch=41), SecondaryProtocol(hs, first_epoch=None)
    secondary.receive_data(primary.send(InitialSize(0)))
    assert secondary.next_event() == InitialSize(0)
    primary.receive_data(secondary.send(CheckpointReady(7)))  # a wrong epoch is still refused by the primary
    with pytest.raises(ProtocolError, match="expected checkpoint-ready for epoch 41"):
        primary.next_event()


def test_protocol_takes_over_bytes_pipelined_behind_the_handshake() -> None:
    hp, hs = Handshake(KEY, "primary", "secondary"), Handshake(KEY, "secondary", "primary")
    to_s, to_p = hp.start(), hs.start()
    proof_p, proof_s = hp.receive_data(to_p), hs.receive_data(to_s)
    hp.receive_data(proof_s)
    primary = PrimaryProtocol(hp)
    early = primary.send(InitialChunk(b"vm")) + primary.send(InitialSize(2))
    hs.receive_data(proof_p + early)  # the initial copy rides with the proof
    secondary = SecondaryProtocol(hs)
    assert secondary.next_event() == InitialChunk(b"vm")
    assert secondary.next_event() == InitialSize(2)
    assert secondary.state is State.INITIAL_RECEIVED


@settings(database=None, deadline=None, max_examples=150)
@given(st.data())
def test_every_legal_interleaving(data: st.DataObject) -> None:
    """Both sides react as real nodes would; the scheduler (hypothesis) picks which direction
    gets bytes next and how many, where the state is cut into chunks, and where heartbeats go."""
    epochs = data.draw(st.integers(min_value=1, max_value=4), label="epochs")
    initial = data.draw(st.binary(max_size=400), label="initial copy")
    blobs = [data.draw(st.binary(max_size=200), label=f"state {e}") for e in range(1, epochs + 1)]
    link = Link()
    staged = bytearray()
    received: list[bytes] = []

    def maybe_heartbeat() -> None:
        if data.draw(st.integers(0, 3), label="heartbeat?") == 3:  # shrinks to "no heartbeat"
            link.send(data.draw(st.sampled_from([P, S]), label="from"), Heartbeat())

    def pieces(blob: bytes) -> list[bytes]:
        cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6), label="chunk cuts")
        points = sorted({0, len(blob), *cuts})
        return [blob[a:b] for a, b in itertools.pairwise(points)]

    def send_initial_copy() -> None:
        for piece in pieces(initial):
            link.send(P, InitialChunk(piece))
            maybe_heartbeat()
        link.send(P, InitialSize(len(initial)))

    def send_state(epoch: int) -> None:
        blob = blobs[epoch - 1]
        link.send(P, VmstateSend(epoch))
        for piece in pieces(blob):
            link.send(P, VmstateChunk(epoch, piece))
            maybe_heartbeat()
        link.send(P, VmstateSize(epoch, len(blob)))

    def react(to: Role, ev: Event) -> None:
        assert not isinstance(ev, ConnectionClosed)
        if to is P:
            if isinstance(ev, CheckpointReady):
                link.send(P, CheckpointRequest(1, Trigger.TIMER))
            elif isinstance(ev, CheckpointReply):
                send_state(ev.epoch)
            elif isinstance(ev, VmstateLoaded) and ev.epoch < epochs:
                link.send(P, CheckpointRequest(ev.epoch + 1, Trigger.MISMATCH))
        else:
            if isinstance(ev, InitialChunk):
                staged.extend(ev.data)
            elif isinstance(ev, InitialSize):
                assert ev.size == len(staged)  # the machine already checked it
                received.append(bytes(staged))
                maybe_heartbeat()
                link.send(S, CheckpointReady(1))
            elif isinstance(ev, CheckpointRequest):
                link.send(S, CheckpointReply(ev.epoch))
            elif isinstance(ev, VmstateSend):
                staged.clear()
            elif isinstance(ev, VmstateChunk):
                staged.extend(ev.data)
            elif isinstance(ev, VmstateSize):
                assert ev.size == len(staged)  # the machine already checked it
                received.append(bytes(staged))
                link.send(S, VmstateReceived(ev.epoch))
                maybe_heartbeat()
                link.send(S, VmstateLoaded(ev.epoch))

    got: dict[Role, list[Event]] = {P: [], S: []}
    maybe_heartbeat()
    send_initial_copy()
    while link.pending[P] or link.pending[S]:
        to = data.draw(st.sampled_from([r for r in (P, S) if link.pending[r]]), label="to")
        n = len(link.pending[to])  # shrinks to "deliver everything", the simplest schedule
        if data.draw(st.booleans(), label="cut?"):
            n = data.draw(st.integers(1, n), label="bytes")
        for ev in link.deliver(to, n):
            got[to].append(ev)
            react(to, ev)
        maybe_heartbeat()

    assert received == [initial, *blobs]
    assert got[P] == link.sent[S] and got[S] == link.sent[P]
    assert link.states() == (State.IDLE, State.IDLE)
    assert link.primary.initial_bytes == link.secondary.initial_bytes == len(initial)
    assert link.primary.epoch == link.secondary.epoch == epochs + 1
    assert link.secondary.completed_epoch == link.primary.loaded_epoch == epochs


def test_large_state_in_many_chunks_and_small_reads() -> None:
    link = drive_to(State.REPLIED)
    blob = bytes(range(256)) * 8192  # 2 MiB
    link.send(P, VmstateSend(1))
    for i in range(0, len(blob), 65536):
        link.send(P, VmstateChunk(1, blob[i : i + 65536]))
    link.send(P, VmstateSize(1, len(blob)))
    staged = bytearray()
    while link.pending[S]:
        for ev in link.deliver(S, 4096):
            if isinstance(ev, VmstateChunk):
                staged += ev.data
    assert staged == blob and link.secondary.state is State.SIZE_SENT


# -- illegal runs -------------------------------------------------------------------------------

ILLEGAL = [
    (state, who, cls)
    for state in LIVE_STATES
    for who in (P, S)
    for cls in CONVERSATION
    if (state, who, cls) not in TRANSITIONS
]


def _id(case: tuple[State, Role, type[Message]]) -> str:
    state, who, cls = case
    return f"{state.name}-{who.value}-{cls.NAME}"


@pytest.mark.parametrize("case", ILLEGAL, ids=[_id(c) for c in ILLEGAL])
def test_illegal_send_is_refused(case: tuple[State, Role, type[Message]]) -> None:
    state, who, cls = case
    link = drive_to(state)
    side = link.sides[who]
    msg = message_for(cls, side)
    with pytest.raises(ProtocolError) as info:
        side.send(msg)
    text = str(info.value)
    assert f"{who.value} in {state.name} (sending)" in text
    assert expected_text(state, side.epoch) in text
    assert f"got {describe(msg)} from the {who.value}" in text
    assert info.value.got == f"{describe(msg)} from the {who.value}"
    assert_stuck_in_error(side)


@pytest.mark.parametrize("case", ILLEGAL, ids=[_id(c) for c in ILLEGAL])
def test_illegal_receive_is_refused(case: tuple[State, Role, type[Message]]) -> None:
    # The peer (`who`) sends what the table forbids: forge its frame past its own checks.
    state, who, cls = case
    link = drive_to(state)
    receiver = link.sides[who.peer]
    msg = message_for(cls, receiver)
    receiver.receive_data(link.forge(who, msg))
    with pytest.raises(ProtocolError) as info:
        receiver.next_event()
    text = str(info.value)
    assert f"{who.peer.value} in {state.name} (receiving)" in text
    assert expected_text(state, receiver.epoch) in text
    assert f"got {describe(msg)} from the {who.value}" in text
    assert_stuck_in_error(receiver)


LEGAL = list(CHECKPOINT_TRANSITIONS)


# Each legal step that carries an epoch (the initial copy does not), with the epoch one too low
# and one too high (for checkpoint-ready the expected epoch is 1 and epoch 0 cannot even be
# constructed), on the sending and on the receiving side.
EPOCH_CASES = [
    (case, delta, direction)
    for case in LEGAL
    for delta in (-1, +1)
    for direction in ("send", "receive")
    if "epoch" in field_names(case[2]) and not (case[2] is CheckpointReady and delta == -1)
]


@pytest.mark.parametrize(
    ("case", "delta", "direction"),
    EPOCH_CASES,
    ids=[f"{_id(c)}-{d:+d}-{how}" for c, d, how in EPOCH_CASES],
)
def test_wrong_epoch_is_refused(
    case: tuple[State, Role, type[Message]], delta: int, direction: str
) -> None:
    state, who, cls = case
    link = drive_to(state, full_checkpoints=2)  # ignored before IDLE
    side = link.sides[who] if direction == "send" else link.sides[who.peer]
    right = message_for(cls, side)
    wrong = type(right)(**{**vars_of(right), "epoch": side.epoch + delta})
    with pytest.raises(ProtocolError) as info:
        if direction == "send":
            side.send(wrong)
        else:
            side.receive_data(link.forge(who, wrong))
            side.next_event()
    assert f"expected {cls.NAME}" in str(info.value) or state is State.SENDING
    assert f"for epoch {side.epoch} from the {who.value}," in str(info.value)
    assert f"got {cls.NAME} epoch {side.epoch + delta} from the {who.value}" in str(info.value)
    assert_stuck_in_error(side)


def vars_of(msg: Message) -> dict[str, object]:
    return {name: getattr(msg, name) for name in field_names(type(msg))}


def test_wrong_epoch_example_from_the_design() -> None:
    link = drive_to(State.SENDING, full_checkpoints=2)
    link.secondary.receive_data(link.forge(P, CheckpointRequest(4)))
    with pytest.raises(ProtocolError) as info:
        link.secondary.next_event()
    assert str(info.value) == (
        "secondary in SENDING (receiving): expected vmstate-chunk or vmstate-size for epoch 3 "
        "from the primary, got checkpoint-request epoch 4 from the primary"
    )
    assert info.value.expected == "vmstate-chunk or vmstate-size for epoch 3 from the primary"


@pytest.mark.parametrize("claimed", [2, 4, 0])
def test_size_mismatch_on_the_receiving_side(claimed: int) -> None:
    link = drive_to(State.SENDING)
    link.step(P, VmstateChunk(1, b"ab"))
    link.step(P, VmstateChunk(1, b"c"))
    link.secondary.receive_data(link.forge(P, VmstateSize(1, claimed)))
    with pytest.raises(ProtocolError) as info:
        link.secondary.next_event()
    assert "expected vmstate-size 3 for epoch 1" in str(info.value)
    assert f"got vmstate-size {claimed}" in str(info.value)
    assert_stuck_in_error(link.secondary)


def test_size_mismatch_on_the_sending_side() -> None:
    link = drive_to(State.SENDING)
    link.step(P, VmstateChunk(1, b"abc"))
    with pytest.raises(ProtocolError, match=r"expected vmstate-size 3 for epoch 1 .* got vmstate-size 4"):
        link.primary.send(VmstateSize(1, 4))
    assert_stuck_in_error(link.primary)


def test_byte_count_restarts_each_epoch() -> None:
    link = drive_to(State.IDLE, full_checkpoints=1)  # epoch 1 carried 3 bytes
    for who, msg in one_checkpoint(2)[:3]:
        link.step(who, msg)
    link.secondary.receive_data(link.forge(P, VmstateSize(2, 3)))
    with pytest.raises(ProtocolError, match="expected vmstate-size 0 for epoch 2"):
        link.secondary.next_event()


def test_state_larger_than_the_bound_is_refused() -> None:
    link = Link(max_state_bytes=10)
    for who, msg in [*initial_copy(b"0123456789"), (S, CheckpointReady(1))]:
        link.step(who, msg)
    for who, msg in one_checkpoint(1)[:3]:
        link.step(who, msg)
    link.step(P, VmstateChunk(1, b"x" * 10))
    link.secondary.receive_data(link.forge(P, VmstateChunk(1, b"y")))
    with pytest.raises(ProtocolError, match="expected at most 10 bytes of state for epoch 1, got 11"):
        link.secondary.next_event()


# -- the initial copy, illegally -------------------------------------------------------------------


def test_checkpoint_ready_before_the_initial_copy() -> None:
    link = Link()
    with pytest.raises(ProtocolError) as info:
        link.secondary.send(CheckpointReady(1))
    assert str(info.value) == (
        "secondary in WAIT_READY (sending): expected initial-chunk or initial-size from the "
        "primary, got checkpoint-ready epoch 1 from the secondary"
    )
    assert info.value.expected == "initial-chunk or initial-size from the primary"
    assert_stuck_in_error(link.secondary)


def test_checkpoint_ready_before_initial_size_is_refused_on_receipt() -> None:
    link = Link()
    link.step(P, InitialChunk(b"half of the vm"))
    link.primary.receive_data(link.forge(S, CheckpointReady(1)))
    with pytest.raises(ProtocolError) as info:
        link.primary.next_event()
    assert str(info.value) == (
        "primary in WAIT_READY (receiving): expected initial-chunk or initial-size from the "
        "primary, got checkpoint-ready epoch 1 from the secondary"
    )
    assert_stuck_in_error(link.primary)


@pytest.mark.parametrize("claimed", [0, 7, 9, 2**40])
def test_initial_size_mismatch_on_the_receiving_side(claimed: int) -> None:
    link = Link()
    link.step(P, InitialChunk(b"abcde"))
    link.step(P, InitialChunk(b"fgh"))
    link.secondary.receive_data(link.forge(P, InitialSize(claimed)))
    with pytest.raises(ProtocolError) as info:
        link.secondary.next_event()
    assert str(info.value) == (
        "secondary in WAIT_READY (receiving): expected initial-size 8 (the bytes of "
        f"initial-chunk data sent), got initial-size {claimed}"
    )
    assert_stuck_in_error(link.secondary)


def test_initial_size_mismatch_on_the_sending_side() -> None:
    link = Link()
    link.step(P, InitialChunk(b"abc"))
    with pytest.raises(ProtocolError, match=r"expected initial-size 3 .* got initial-size 2"):
        link.primary.send(InitialSize(2))
    assert_stuck_in_error(link.primary)


def test_initial_chunk_after_initial_size() -> None:
    link = drive_to(State.INITIAL_RECEIVED)
    link.secondary.receive_data(link.forge(P, InitialChunk(b"late")))
    with pytest.raises(ProtocolError) as info:
        link.secondary.next_event()
    assert str(info.value) == (
        "secondary in INITIAL_RECEIVED (receiving): expected checkpoint-ready for epoch 1 from "
        "the secondary, got initial-chunk from the primary"
    )
    with pytest.raises(ProtocolError, match=r"primary in INITIAL_RECEIVED .*got initial-size"):
        link.primary.send(InitialSize(link.primary.initial_bytes))  # a second size, same count


@pytest.mark.parametrize("state", [State.IDLE, State.SENDING, State.RECEIVED])
def test_initial_copy_once_the_checkpoints_run(state: State) -> None:
    link = drive_to(state, full_checkpoints=1)
    link.secondary.receive_data(link.forge(P, InitialChunk(b"again")))
    with pytest.raises(ProtocolError) as info:
        link.secondary.next_event()
    assert f"secondary in {state.name} (receiving)" in str(info.value)
    assert info.value.got == "initial-chunk from the primary"
    assert_stuck_in_error(link.secondary)
    with pytest.raises(ProtocolError, match=f"primary in {state.name} .*got initial-size"):
        link.primary.send(InitialSize(0))


def test_initial_copy_larger_than_the_bound_is_refused() -> None:
    link = Link(max_state_bytes=10)
    link.step(P, InitialChunk(b"x" * 6))
    link.step(P, InitialChunk(b"x" * 4))
    link.secondary.receive_data(link.forge(P, InitialChunk(b"y")))
    with pytest.raises(ProtocolError) as info:
        link.secondary.next_event()
    assert info.value.expected == "at most 10 bytes of initial state"
    assert info.value.got == "11 bytes of initial-chunk"
    assert_stuck_in_error(link.secondary)
    with pytest.raises(ProtocolError, match="expected at most 10 bytes of initial state, got 11"):
        link.primary.send(InitialChunk(b"y"))


def test_the_initial_copy_bound_is_separate_from_each_checkpoints() -> None:
    link = Link(max_state_bytes=10)
    for who, msg in [*initial_copy(b"0123456789"), (S, CheckpointReady(1))]:
        link.step(who, msg)
    for who, msg in one_checkpoint(1, b"0123456789"):  # a full bound again, per epoch
        link.step(who, msg)
    assert link.states() == (State.IDLE, State.IDLE)


# -- the rest ------------------------------------------------------------------------------------


def test_duplicate_checkpoint_ready() -> None:
    link = drive_to(State.IDLE)
    with pytest.raises(ProtocolError) as info:
        link.secondary.send(CheckpointReady(1))
    assert "expected checkpoint-request for epoch 1 from the primary" in str(info.value)
    assert "got checkpoint-ready epoch 1 from the secondary" in str(info.value)
    link.primary.receive_data(link.forge(S, CheckpointReady(1)))
    with pytest.raises(ProtocolError, match=r"primary in IDLE .*got checkpoint-ready epoch 1"):
        link.primary.next_event()


def test_auth_messages_are_not_part_of_the_protocol() -> None:
    link = drive_to(State.IDLE)
    link.primary.receive_data(link.forge(S, AuthChallenge("secondary", bytes(NONCE_SIZE))))
    with pytest.raises(ProtocolError, match=r"expected checkpoint-request .* got auth-challenge"):
        link.primary.next_event()


@pytest.mark.parametrize(
    "msg",
    [
        NodeHello("primary", "n1", 1, 0, 0, 0, [], "", "", "", {}),
        Input(1, 2, 3, b"x"),
        Commit(1, 1, 0, 0),
        Protection(1, ProtectionState.PROTECTED, 0, 0, 0, "n2", ""),
        StatusRequest(),
    ],
    ids=lambda m: m.NAME,
)
def test_gateway_and_control_messages_are_not_part_of_the_protocol(msg: Message) -> None:
    link = drive_to(State.IDLE)
    with pytest.raises(ProtocolError, match=f"expected checkpoint-request .* got {msg.NAME}"):
        link.primary.send(msg)
    link.secondary.receive_data(link.forge(P, msg))
    with pytest.raises(ProtocolError, match=f"got {msg.NAME}"):
        link.secondary.next_event()


def test_bad_frame_puts_the_side_in_error() -> None:
    link = drive_to(State.REQUESTED)
    with pytest.raises(WireError, match="bad magic"):
        link.primary.receive_data(b"garbage!!!")
    assert_stuck_in_error(link.primary)
    link.secondary.receive_data(link.forge(P, Heartbeat())[:SEALED_HEADER_SIZE + 1])
    # the header is good: the decoder waits for the rest of the payload, no error yet
    assert link.secondary.next_event() is None


def test_peer_error_ends_the_connection() -> None:
    link = drive_to(State.SENDING)
    link.send(S, ErrorMessage("staging area full"))
    assert link.secondary.state is State.ERROR
    assert link.deliver(P) == [ErrorMessage("staging area full")]
    with pytest.raises(ProtocolError, match=r"primary is in ERROR \(the secondary sent error: staging"):
        link.primary.send(VmstateChunk(1, b"x"))


def test_error_is_not_legal_after_error() -> None:
    link = drive_to(State.IDLE)
    link.send(P, ErrorMessage("bye"))
    with pytest.raises(ProtocolError, match="is in ERROR"):
        link.primary.send(ErrorMessage("again"))


@pytest.mark.parametrize(
    ("state", "unparsed"), [(State.IDLE, 0), (State.SENDING, 0), (State.RECEIVED, 5)]
)
def test_peer_closing_reports_where(state: State, unparsed: int) -> None:
    link = drive_to(state)
    link.primary.receive_data(link.forge(S, Heartbeat())[:unparsed] if unparsed else b"")
    if unparsed:
        link.primary.receive_data(b"")
    event = link.primary.next_event()
    assert event == ConnectionClosed(state, unparsed)
    assert link.primary.state is State.CLOSED
    assert link.primary.next_event() == event  # idempotent, like h11
    with pytest.raises(ProtocolError, match="CLOSED"):
        link.primary.send(Heartbeat())
    with pytest.raises(ProtocolError, match="CLOSED"):
        link.primary.receive_data(b"x")


def test_messages_before_end_of_stream_come_first() -> None:
    link = drive_to(State.IDLE)
    link.primary.receive_data(link.forge(S, Heartbeat()))
    link.primary.receive_data(b"")
    assert link.primary.next_event() == Heartbeat()
    assert isinstance(link.primary.next_event(), ConnectionClosed)


def test_local_close_refuses_everything() -> None:
    link = drive_to(State.IDLE)
    link.primary.close()
    assert link.primary.state is State.CLOSED
    with pytest.raises(ProtocolError, match="primary: the connection is CLOSED"):
        link.primary.next_event()


def test_no_protocol_without_a_completed_handshake() -> None:
    hp = Handshake(KEY, "primary", "secondary")
    hp.start()
    with pytest.raises(AuthError, match="primary: the handshake is not complete"):
        PrimaryProtocol(hp)
    hp, _ = handshakes()
    with pytest.raises(ValueError, match="needs a handshake as 'secondary' with 'primary'"):
        SecondaryProtocol(hp)


def test_bad_bytes_behind_the_handshake_fail_the_side_not_the_constructor() -> None:
    hp, hs = Handshake(KEY, "primary", "secondary"), Handshake(KEY, "secondary", "primary")
    to_s, to_p = hp.start(), hs.start()
    hp.receive_data(to_p)
    proof_s = hs.receive_data(to_s)
    hp.receive_data(proof_s + b"NOTAFRAME")
    primary = PrimaryProtocol(hp)
    assert primary.state is State.ERROR
    with pytest.raises(ProtocolError, match="bad magic"):
        primary.next_event()
