"""The relay in batches (issue 12, hybrid throughput): the gateway sends what it numbered for a node in one turn as
one `inputs` frame, a node sends a slice's outputs as one `outputs` frame; the order of everything on a link, and
what the witness and the VM see, are as if every event had its own frame."""
from __future__ import annotations

from typing import Any

import pytest

from colo import node as node_module
from colo.auth import generate_key
from colo.gateway import Gateway, GatewayConfig
from colo.messages import (
    BATCH_BYTES,
    KIND_CLOSE,
    KIND_DATA,
    KIND_OPEN,
    Fence,
    Input,
    Inputs,
    Message,
    Output,
    Outputs,
)
from colo.netevents import NetEvent
from colo.node import Mode, Node, NodeConfig
from colo.witness import NodeMessage, Send


class Recorder:
    """Stands in for a node's Conn in the gateway's table: records what is queued and written."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.flushes = 0
        self.closed = False
        self.queued = 0
        self.closed_reason = ""

    def send(self, msg: Message, flush: bool = True) -> bool:
        self.sent.append(msg)
        return True

    def flush_now(self) -> bool:
        self.flushes += 1
        return True

    def close_after_flush(self, why: str) -> None:
        self.sent.append(Fence(f"closed: {why}"))

    def release(self, why: str) -> None:
        pass


@pytest.fixture
def gw() -> Any:
    g = Gateway(GatewayConfig(generate_key()))
    yield g
    g._close()


def test_a_turns_inputs_leave_as_one_frame_ahead_of_what_follows_them(gw: Any) -> None:
    rec = Recorder()
    gw.conns[5] = rec
    for seq in (1, 2):
        gw._act(Send(5, Input(seq, KIND_DATA, 3, b"x%d" % seq)))
    gw._act(Send(5, Fence("stale")))  # sent after them: leaves after them
    gw._act(Send(5, Input(3, KIND_CLOSE, 3, b"")))
    assert rec.sent == [Inputs([[1, KIND_DATA, 3, b"x1"], [2, KIND_DATA, 3, b"x2"]]), Fence("stale")]
    gw._flush_links()
    assert rec.sent[2:] == [Input(3, KIND_CLOSE, 3, b"")]  # one alone goes as it is
    assert rec.flushes == 1  # one write for the turn


def test_inputs_for_a_link_that_is_closed_go_before_the_close(gw: Any) -> None:
    from colo.witness import CloseLink
    rec = Recorder()
    gw.conns[5] = rec
    gw._act(Send(5, Input(1, KIND_OPEN, 3, b"")))
    gw._act(CloseLink(5, "fenced"))
    assert rec.sent == [Input(1, KIND_OPEN, 3, b""), Fence("closed: fenced")]


def test_a_large_turn_is_cut_into_frames_of_bounded_size(gw: Any) -> None:
    rec = Recorder()
    gw.conns[5] = rec
    chunk = b"y" * (16 << 10)
    n = 3 * BATCH_BYTES // len(chunk) + 1
    for seq in range(1, n + 1):
        gw._act(Send(5, Input(seq, KIND_DATA, 3, chunk)))
    gw._flush_links()
    frames = [m for m in rec.sent if isinstance(m, (Inputs, Input))]
    assert len(frames) >= 3
    seqs = [e[0] for m in frames for e in (m.events if isinstance(m, Inputs) else [[m.seq]])]
    assert seqs == list(range(1, n + 1))
    assert all(sum(len(e[3]) for e in m.events) <= BATCH_BYTES for m in frames if isinstance(m, Inputs))


def test_the_witness_takes_a_frame_of_outputs_one_by_one(gw: Any) -> None:
    rec = Recorder()
    gw.conns[5] = rec
    gw.attached.add(5)
    gw._message(5, rec, Outputs(2, [[7, KIND_DATA, 3, b"+OK\r\n"], [8, KIND_CLOSE, 3, b""]]))
    assert list(gw._events) == [NodeMessage(5, Output(2, 7, KIND_DATA, 3, b"+OK\r\n")),
                                NodeMessage(5, Output(2, 8, KIND_CLOSE, 3, b""))]


@pytest.fixture
def node() -> Any:
    n = Node(NodeConfig(generate_key(), ("127.0.0.1", 9)), Mode.SECONDARY)
    n.attached = True
    sent: list[Message] = []

    def send_gateway(msg: Message, block: float | None = None, flush: bool = True) -> bool:
        sent.append(msg)
        return True
    n.send_gateway = send_gateway  # type: ignore[method-assign]
    n.sent = sent  # type: ignore[attr-defined]
    return n


def test_a_node_takes_a_frame_of_inputs_as_the_inputs_one_by_one(node: Any) -> None:
    node.on_gateway_event(Inputs([[4, KIND_OPEN, 2, b""], [5, KIND_DATA, 2, b"GET k"]]))
    assert node.received_seq == 5
    assert node.backlog == {4: NetEvent(4, KIND_OPEN, 2, b""), 5: NetEvent(5, KIND_DATA, 2, b"GET k")}


def test_a_slices_outputs_leave_in_bounded_frames_in_order(node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "BATCH_BYTES", 10)
    outs: list[list[Any]] = [[seq, KIND_DATA, 1, b"abcd"] for seq in range(1, 8)]
    node.send_outputs(outs)
    frames = node.sent
    assert [type(m) for m in frames] == [Outputs, Outputs, Output]  # 3 + 3 events reach 10 bytes; 1 left
    seqs = [e[0] for m in frames for e in (m.events if isinstance(m, Outputs) else [[m.seq]])]
    assert seqs == list(range(1, 8))
    for m in frames:  # built without a second check, yet what the checking constructor makes of the same values
        assert m == (Outputs(m.generation, m.events) if isinstance(m, Outputs)
                     else Output(m.generation, m.seq, m.kind, m.conn, m.data))
    node.sent.clear()
    node.send_outputs(outs[:1])
    assert node.sent == [Output(node.generation, 1, KIND_DATA, 1, b"abcd")]
    node.sent.clear()
    node.send_outputs([[1, KIND_DATA, 1, b"x" * 20], *outs[1:3]])  # one over the bound alone: an output
    assert [type(m) for m in node.sent] == [Output, Outputs]
    node.sent.clear()
    monkeypatch.setattr(node_module, "BATCH_EVENTS", 2)
    node.send_outputs([[seq, KIND_CLOSE, seq, b""] for seq in range(1, 6)])  # no bytes: the count bounds them
    assert [len(m.events) if isinstance(m, Outputs) else 1 for m in node.sent] == [2, 2, 1]


def test_the_outputs_taken_from_the_device_are_the_epochs_and_close_their_connections(node: Any) -> None:
    from toyvm import Machine
    node.vm = Machine(ram_size=2 << 20)
    node.conns_open = {3, 4}
    node.vm.net.state.tx = [[1, KIND_DATA, 3, b"+OK\r\n"], [2, KIND_CLOSE, 3, b""]]
    out = node.take_outputs()
    assert out == [[1, KIND_DATA, 3, b"+OK\r\n"], [2, KIND_CLOSE, 3, b""]]
    assert node.epoch_outputs == out and node.conns_open == {4}
    assert node.vm.net.state.tx == [] and node.take_outputs() == []  # handed over once


def test_a_message_of_values_checked_already_equals_the_checked_one() -> None:
    fast = Output.checked_already(2, 7, KIND_DATA, 3, b"+OK\r\n")
    assert fast == Output(2, 7, KIND_DATA, 3, b"+OK\r\n") and hash(fast) == hash(Output(2, 7, KIND_DATA, 3, b"+OK\r\n"))
    assert Inputs.checked_already([[1, KIND_OPEN, 3, b""]]) == Inputs([[1, KIND_OPEN, 3, b""]])
    with pytest.raises(TypeError, match="'kind', 'conn', and 'data'"):
        Output.checked_already(2, 7)  # every field, or it is not the message
