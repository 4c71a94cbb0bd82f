"""The event stream (colo.events, colo.trace): one schema, one clock, cheap when off; `--trace` reads it; the
link layer's events match a send to its receipt; the witness's per-output records; the step gate."""
from __future__ import annotations

import io
import json
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from colo import events, trace
from colo.events import STREAM, ClockOffsets, EventFilter, FileSink, PrintSink, format_event, jsonable, merge
from colo.gate import Gate
from colo.link import Conn, Opened
from colo.messages import (
    CheckpointCommand,
    CheckpointNow,
    CheckpointReply,
    CheckpointRequest,
    CommandResult,
    Commit,
    Heartbeat,
    NodeHello,
    NodeStatus,
    Output,
    Protect,
    Protection,
    ProtectionState,
    Resynced,
    Step,
    StepCommand,
    Trigger,
    VmstateChunk,
)
from colo.netevents import KIND_DATA
from colo.wire import SEALED_OVERHEAD, encode_payload
from colo.witness import (
    AcceptClient,
    ClientConnected,
    ClientData,
    ControlRequest,
    NodeAttached,
    NodeMessage,
    Record,
    Send,
    Tick,
    ToClient,
    Witness,
    WitnessConfig,
)

KEY = b"events-test-key-0123456789abcdef"
BOTH = selectors.EVENT_READ | selectors.EVENT_WRITE


@pytest.fixture
def sink() -> Iterator[list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []
    STREAM.reset()
    STREAM.attach(got.append)
    saved = STREAM.role, STREAM.node, STREAM.role_of
    STREAM.role, STREAM.node, STREAM.role_of = "test", "n1", None
    yield got
    STREAM.reset()
    STREAM.role, STREAM.node, STREAM.role_of = saved


# -- the stream ---------------------------------------------------------------------------------------------------
def test_off_by_default_and_emit_is_a_no_op() -> None:
    STREAM.reset()
    assert not STREAM.active
    STREAM.emit("send", msg="x")  # nothing to do, nothing raised


def test_every_event_has_the_schema(sink: list[dict[str, Any]]) -> None:
    before = time.time()
    STREAM.emit("state", was="a", now="b")
    (ev,) = sink
    assert set(ev) == {"t", "role", "node", "pid", "kind", "was", "now"}
    assert (ev["role"], ev["node"], ev["kind"]) == ("test", "n1", "state")
    assert before - 0.5 <= ev["t"] <= time.time() + 0.5  # the common clock: wall time, monotonic in between
    assert ev["kind"] in events.KINDS


def test_the_clock_never_runs_backwards(sink: list[dict[str, Any]]) -> None:
    for _ in range(200):
        STREAM.emit("x")
    ts = [e["t"] for e in sink]
    assert ts == sorted(ts)


def test_a_node_stamps_its_role_at_the_time() -> None:
    role = ["spare"]
    got: list[dict[str, Any]] = []
    STREAM.reset()
    STREAM.attach(got.append)
    STREAM.role_of = lambda: role[0]
    try:
        STREAM.emit("a")
        role[0] = "primary"
        STREAM.emit("b")
    finally:
        STREAM.reset()
        STREAM.role_of = None
    assert [e["role"] for e in got] == ["spare", "primary"]


def test_values_become_json() -> None:
    assert jsonable(b"+OK\r\n") == {"len": 5, "text": "+OK\\r\\n"}
    big = jsonable(bytes(range(256)) * 4)
    assert big["len"] == 1024 and big["more"] is True and big["text"].startswith("\\x00\\x01")
    assert jsonable(Trigger.MANUAL) == "manual" and type(jsonable(Trigger.MANUAL)) is str
    assert jsonable(list(range(40)))[-1] == {"more": 8}
    assert jsonable({"a": [b"x"]}) == {"a": [{"len": 1, "text": "x"}]}


def test_page_runs() -> None:
    assert events.page_runs([1, 2, 3, 7, 9, 10]) == [[1, 3], [7, 7], [9, 10]]
    assert trace.runs_of([10, 9, 1, 3, 2, 7]) == [[1, 3], [7, 7], [9, 10]]
    assert trace.runs_of([]) == []


def test_file_sink_lines_from_many_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    sinks = [FileSink(path), FileSink(path)]  # two "processes" appending to one merged stream

    def work(s: FileSink, who: int) -> None:
        for i in range(300):
            s({"t": float(i), "kind": "x", "who": who, "pad": "y" * 3000})

    threads = [threading.Thread(target=work, args=(sinks[i % 2], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 1200 and all(json.loads(line)["pad"] == "y" * 3000 for line in lines)
    assert len(events.read(path)) == 1200


def test_a_cut_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"t": 1, "kind": "a"}\n{"t": 2, "ki')
    assert [e["kind"] for e in events.read(path)] == ["a"]


# -- the clock across hosts ---------------------------------------------------------------------------------------
def test_offset_estimate_is_the_minimum_over_the_window() -> None:
    c = ClockOffsets(window=4)
    assert c.sample("n", 100.0, 105.003) == pytest.approx(5.003)
    for delay in (0.004, 0.002, 0.009):
        c.sample("n", 200.0, 205.0 + delay)
    assert c.offset("n") == pytest.approx(5.002)
    for _ in range(4):
        c.sample("n", 300.0, 305.01)  # the good samples left the window
    assert c.offset("n") == pytest.approx(5.01)


def test_a_node_under_our_kernel_reads_our_clock_however_late_its_heartbeats() -> None:
    c = ClockOffsets()
    assert c.sample("n", 100.0, 100.004, same_kernel=True) == 0.0  # a starting node's 4 ms queueing is not an offset
    assert c.sample("n", 101.0, 101.003, same_kernel=True) is None  # reported once
    assert c.offset("n") is None and c.samples("n") == 0
    assert events.kernel_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_the_gateway_reports_offset_zero_for_a_node_on_its_kernel(sink: list[dict[str, Any]],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_clocks", ClockOffsets())
    STREAM.role = "gateway"
    for node, kernel in (("here", events.kernel_id()), ("there", "another-kernel")):
        # what trace.received reads of a gateway's link to a node
        conn: Any = SimpleNamespace(id=node, proto=None, _codec=None, name="node", peer_role="spare",
                                    hs=SimpleNamespace(role="gateway", connection_id="c0"))
        trace.received(conn, NodeHello("spare", node, 0, 0, 0, 0, [], "", "", "", {}))
        trace.received(conn, NodeStatus(0, {"sent_at": STREAM.now() - 0.005, "kernel": kernel}))  # 5 ms late
    clocks = {e["of"]: e for e in sink if e["kind"] == "clock"}
    assert clocks["here"]["offset"] == 0.0 and clocks["here"]["samples"] == 0
    assert clocks["there"]["offset"] >= 0.005 and clocks["there"]["samples"] == 1


def test_merge_applies_large_offsets_and_ignores_a_heartbeats_delay() -> None:
    evs = [
        {"t": 10.0, "role": "gateway", "node": "g", "kind": "clock", "of": "far", "offset": 3.0},
        {"t": 10.0, "role": "gateway", "node": "g", "kind": "clock", "of": "near", "offset": 0.0004},
        {"t": 10.0005, "role": "gateway", "node": "g", "kind": "recv", "flow": "1"},
        {"t": 7.0002, "role": "primary", "node": "far", "kind": "send", "flow": "1"},
        {"t": 10.0001, "role": "secondary", "node": "near", "kind": "send", "flow": "2"},
    ]
    out = merge(evs)
    far = next(e for e in out if e["node"] == "far")
    near = next(e for e in out if e["node"] == "near" and e["kind"] == "send")
    assert far["t"] == pytest.approx(10.0002) and far["t_local"] == 7.0002
    assert near["t"] == 10.0001 and "t_local" not in near  # one host: one clock
    assert [e["t"] for e in out] == sorted(e["t"] for e in out)


# -- the --trace printer ------------------------------------------------------------------------------------------
def _ev(kind: str, **kw: Any) -> dict[str, Any]:
    return {"t": 1796000000.25, "role": "primary", "node": "n", "pid": 1, "kind": kind, **kw}


def test_default_filter_one_line_per_message() -> None:
    f = EventFilter("")
    assert f(_ev("send", msg="checkpoint-request"))
    assert not f(_ev("recv", msg="checkpoint-request"))  # the sender's line is the message's line
    assert not f(_ev("send", msg="heartbeat")) and not f(_ev("send", msg="status-reply"))
    assert not f(_ev("phase")) and not f(_ev("witness", event="output", level="trace"))
    assert f(_ev("witness", event="promote", level="warning"))


def test_filter_patterns() -> None:
    f = EventFilter("commit,vmstate-*,-secondary")
    assert f(_ev("send", msg="commit")) and f(_ev("send", msg="vmstate-size"))
    assert not f(_ev("send", msg="checkpoint-request"))
    assert not f({**_ev("send", msg="vmstate-received"), "role": "secondary"})
    assert EventFilter("heartbeat")(_ev("send", msg="heartbeat"))  # named: shown although quiet
    assert EventFilter("output")(_ev("witness", event="output", level="trace"))


def test_a_message_line_names_every_field() -> None:
    line = format_event(_ev("send", msg="commit", to="gateway", frame=103,
                            fields={"generation": 1, "epoch": 3, "input_seq": 41, "output_seq": 17}))
    assert line.endswith("primary   -> gateway   commit generation=1 epoch=3 input_seq=41 output_seq=17 [103 B]")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} primary ", line)  # dated as the log lines, to the us
    chunk = format_event(_ev("send", msg="vmstate-chunk", to="secondary",
                             fields={"epoch": 3, "data": jsonable(bytes(5000))}))
    assert "data=<5000 bytes>" in chunk


def test_print_sink_prints_what_passes() -> None:
    out = io.StringIO()
    p = PrintSink(EventFilter(""), out)
    p(_ev("send", msg="commit", to="gateway", fields={}))
    p(_ev("recv", msg="commit"))
    assert out.getvalue().count("\n") == 1


# -- the link layer: a send and its receipt, matched ----------------------------------------------------------------
def _pump(*conns: Conn, until: Any, timeout: float = 5.0) -> list[Any]:
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in conns:
            seen += c.on_ready(BOTH)
        if until(seen):
            return seen
        time.sleep(0.002)
    raise AssertionError(f"timed out: {seen}")


def _pair(encrypt: bool = True) -> tuple[Conn, Conn]:
    a, b = socket.socketpair()
    gw = Conn(a, key=KEY, role="gateway", peer_role=("primary",), name="primary", encrypt=encrypt)
    node = Conn(b, key=KEY, role="primary", peer_role="gateway", name="gateway", encrypt=encrypt)
    _pump(gw, node, until=lambda s: sum(isinstance(e, Opened) for e in s) == 2)
    return gw, node


def test_send_and_receipt_share_a_flow(sink: list[dict[str, Any]]) -> None:
    gw, node = _pair()
    msg = Commit(1, 3, 41, 17)
    assert node.send(msg)
    _pump(gw, until=lambda s: msg in s)
    node.send(Heartbeat())
    _pump(gw, until=lambda s: Heartbeat() in s)
    sends = [e for e in sink if e["kind"] == "send"]
    recvs = [e for e in sink if e["kind"] == "recv"]
    assert [e["msg"] for e in sends] == ["commit", "heartbeat"] == [e["msg"] for e in recvs]
    s, r = sends[0], recvs[0]
    assert s["flow"] == r["flow"] and s["flow"].endswith(":primary:1") and sends[1]["flow"].endswith(":primary:2")
    assert s["fields"] == {"generation": 1, "epoch": 3, "input_seq": 41, "output_seq": 17}
    assert s["link"] == "gateway" and s["to"] == "gateway" and r["from"] == "primary"
    assert s["frame"] == SEALED_OVERHEAD + len(encode_payload(msg))  # AES-GCM keeps the payload's length
    assert s["t"] <= r["t"]
    gw.close()
    node.close()


def test_frames_in_hex_when_asked(sink: list[dict[str, Any]]) -> None:
    STREAM.hex_bytes = 40
    try:
        gw, node = _pair(encrypt=False)
        node.send(Output(1, 7, KIND_DATA, 1, b"+OK\r\n"))
        _pump(gw, until=lambda s: any(isinstance(e, Output) for e in s))
    finally:
        STREAM.hex_bytes = 0
    s = next(e for e in sink if e["kind"] == "send")
    frame = bytes.fromhex(s["hex"])
    assert frame[:5] == b"COLO\x02" and len(frame) == 40  # sealed, not encrypted: the payload reads in clear
    assert int.from_bytes(frame[9:17], "big") == 1  # the frame's sequence number, the flow's last part
    gw.close()
    node.close()


def test_the_replication_link_reports_the_protocol_state(sink: list[dict[str, Any]]) -> None:
    from colo.protocol import PrimaryProtocol, SecondaryProtocol
    a, b = socket.socketpair()
    p = Conn(a, key=KEY, role="primary", peer_role="secondary", protocol=lambda hs: PrimaryProtocol(hs, first_epoch=1))
    s = Conn(b, key=KEY, role="secondary", peer_role="primary", protocol=lambda hs: SecondaryProtocol(hs,
                                                                                                      first_epoch=1))
    _pump(p, s, until=lambda x: sum(isinstance(e, Opened) for e in x) == 2)
    from colo.messages import CheckpointReady, InitialSize
    p.send(InitialSize(0))
    _pump(s, until=lambda x: InitialSize(0) in x)
    s.send(CheckpointReady(1))
    _pump(p, until=lambda x: CheckpointReady(1) in x)
    p.send(CheckpointRequest(1, Trigger.TIMER))
    _pump(s, until=lambda x: any(isinstance(e, CheckpointRequest) for e in x))
    s.send(CheckpointReply(1))
    _pump(p, until=lambda x: CheckpointReply(1) in x)
    sent = [(e["msg"], e["state"]) for e in sink if e["kind"] == "send"]
    got = [(e["msg"], e["state"]) for e in sink if e["kind"] == "recv"]
    assert sent == [("initial-size", "INITIAL_RECEIVED"), ("checkpoint-ready", "IDLE"),
                    ("checkpoint-request", "REQUESTED"), ("checkpoint-reply", "REPLIED")]
    (reply,) = [e for e in sink if e["kind"] == "phase"]  # the secondary's phases, read off its messages
    assert (reply["side"], reply["phase"], reply["epoch"]) == ("secondary", "reply", 1)
    assert reply["start"] <= reply["end"]
    assert got == sent  # both sides in the same state once the message is through
    assert all(e["link"] == "replication" for e in sink if e["kind"] in ("send", "recv"))
    p.close()
    s.close()


def test_no_events_and_no_cost_when_off() -> None:
    STREAM.reset()
    gw, node = _pair()
    calls: list[Any] = []
    real = trace.sent
    trace.sent = lambda *a: calls.append(a)
    try:
        node.send(Heartbeat())
        _pump(gw, until=lambda s: Heartbeat() in s)
    finally:
        trace.sent = real
    assert calls == []
    gw.close()
    node.close()


# -- the step gate ------------------------------------------------------------------------------------------------
class _FakeConn:
    def __init__(self) -> None:
        self.open = True
        self.peer_role = "secondary"


def _in_thread(fn: Any) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_the_gate_holds_handshake_messages_until_granted(sink: list[dict[str, Any]]) -> None:
    g, c = Gate(), _FakeConn()
    g(c, CheckpointRequest(1, Trigger.TIMER))  # off: passes at once
    g.update(True, 0, 0)
    assert g.holding
    g(c, Heartbeat())  # not part of the handshake: passes
    g(c, Output(1, 1, KIND_DATA, 1, b"x"))
    t = _in_thread(lambda: g(c, CheckpointRequest(2, Trigger.TIMER)))
    time.sleep(0.2)
    assert t.is_alive() and g.waiting == "checkpoint-request"
    g.update(True, 0, 1)
    t.join(2)
    assert not t.is_alive() and g.grants == 0
    assert [(e["state"], e["msg"], e["epoch"]) for e in sink if e["kind"] == "gate"] == [
        ("waiting", "checkpoint-request", 2), ("released", "checkpoint-request", 2)]


def test_the_gate_lets_go_when_the_link_closes_or_the_node_stops() -> None:
    g, c = Gate(), _FakeConn()
    g.update(True, 0, 0)
    t = _in_thread(lambda: g(c, VmstateChunk(1, b"x")))
    time.sleep(0.1)
    c.open = False  # the peer died: the sender learns it as it would without the gate
    t.join(2)
    assert not t.is_alive()
    c.open = True
    t = _in_thread(lambda: g(c, Commit(1, 1, 0, 0)))
    time.sleep(0.1)
    g.release_all()
    t.join(2)
    assert not t.is_alive() and not g.holding


def test_slow_motion_delays_each_handshake_message() -> None:
    g, c = Gate(), _FakeConn()
    g.update(False, 150, 0)
    t0 = time.monotonic()
    g(c, CheckpointRequest(1, Trigger.TIMER))
    assert time.monotonic() - t0 >= 0.14
    t0 = time.monotonic()
    g(c, Heartbeat())
    assert time.monotonic() - t0 < 0.1  # not delayed (a delayed one takes 0.15 s); a loaded machine may take 0.05


# -- the witness: its decisions as events, the teaching commands -------------------------------------------------
def _hello(role: str, node: str, address: str = "") -> NodeHello:
    return NodeHello(role, node, 1 if role == "primary" else 0, 0, 0, 0, [], "", address, "", {})


def _pair_witness(trace_on: bool = True) -> tuple[Witness, list[Any]]:
    w = Witness(WitnessConfig(gateway_id="gw"))
    w.trace = trace_on
    log: list[Any] = []
    log += w.handle(Tick(0.0, 1000.0))
    log += w.handle(NodeAttached(1, _hello("spare", "s", "10.0.0.2:7000")))
    log += w.handle(NodeAttached(2, _hello("primary", "p")))
    assert any(isinstance(a, Send) and isinstance(a.msg, Protect) for a in log)
    log += w.handle(NodeMessage(2, Protection(1, ProtectionState.PROTECTED, 0, 0, 0, "s", "")))
    assert w.protected
    return w, log


def _records(actions: list[Any], level: str | None = None) -> list[dict[str, Any]]:
    return [a.entry for a in actions if isinstance(a, Record) and (level is None or a.level == level)]


def test_output_held_then_released_with_the_epoch_that_covers_it() -> None:
    w, _ = _pair_witness()
    acts = w.handle(NodeMessage(2, Output(1, 1, KIND_DATA, 5, b"+OK\r\n")))
    (held,) = [r for r in _records(acts, "trace") if r["event"] == "output"]
    assert (held["action"], held["seq"], held["conn"], held["epoch"], held["data"]) == ("held", 1, 5, 1, b"+OK\r\n")
    acts = w.handle(NodeMessage(2, Commit(1, 1, 0, 1)))
    (rel,) = [r for r in _records(acts, "trace") if r["event"] == "output"]
    assert (rel["action"], rel["seq"], rel["epoch"]) == ("released", 1, 1)


def test_trace_records_only_when_asked() -> None:
    w, log = _pair_witness(trace_on=False)
    acts = w.handle(NodeMessage(2, Output(1, 1, KIND_DATA, 5, b"+OK\r\n")))
    assert not _records(log + acts, "trace")


@pytest.mark.parametrize("trace_on", [True, False], ids=["traced", "not-traced"])
def test_hybrid_comparisons_are_traced_only_when_asked(trace_on: bool) -> None:
    """Hybrid: where the two streams stand after each VM's output, and the compared release (the teaching view's
    comparison box); nothing of it, not even its arguments, while nobody watches (every reply passes there)."""
    w = Witness(WitnessConfig(mode="hybrid", gateway_id="gw"))
    w.trace = trace_on
    w.handle(Tick(0.0, 1000.0))
    w.handle(NodeAttached(1, _hello("spare", "s", "10.0.0.2:7000")))
    w.handle(NodeAttached(2, _hello("primary", "p")))
    w.handle(NodeMessage(2, Protection(1, ProtectionState.PROTECTED, 0, 0, 0, "s", "")))
    w.handle(NodeMessage(1, Resynced(1, 0, w.input_seq, 0)))
    assert w.mirror == "s"
    (conn,) = [a.conn for a in w.handle(ClientConnected(1)) if isinstance(a, AcceptClient)]
    w.handle(ClientData(conn, b"SET k v"))
    first = w.handle(NodeMessage(2, Output(1, 1, KIND_DATA, conn, b"+OK\r\n")))
    second = w.handle(NodeMessage(1, Output(1, 1, KIND_DATA, conn, b"+OK\r\n")))
    assert [a.data for a in second if isinstance(a, ToClient)] == [b"+OK\r\n"]
    traced = [_records(acts, "trace") for acts in (first, second)]
    if not trace_on:
        assert traced == [[], []]
        return
    assert [r["event"] for r in traced[0]] == ["compare"]  # the primary's reply, held for the secondary's
    assert [(r["event"], r.get("action"), r.get("compared")) for r in traced[1]] == [
        ("output", "released", True), ("compare", None, None)]


def test_checkpoint_command_asks_the_primary_for_a_manual_checkpoint() -> None:
    w = Witness(WitnessConfig(gateway_id="gw"))
    w.handle(Tick(0.0, 1000.0))
    acts = w.handle(ControlRequest(99, CheckpointCommand("button")))
    assert [a.msg for a in acts if isinstance(a, Send)] == [
        CommandResult(False, "there is no active primary (the service is learning)")]  # nothing to checkpoint yet
    w, _ = _pair_witness()
    for _ in range(2):  # every time it is asked, not once per run
        acts = w.handle(ControlRequest(99, CheckpointCommand("button")))
        assert Send(2, CheckpointNow(Trigger.MANUAL)) in acts
        assert Send(99, CommandResult(True, "checkpoint requested")) in acts


def test_step_command_is_relayed_and_suspends_liveness() -> None:
    w, _ = _pair_witness()
    acts = w.handle(ControlRequest(99, StepCommand(True, 0, "", 0)))
    assert {(a.link, a.msg) for a in acts if isinstance(a, Send) and isinstance(a.msg, Step)} == {
        (1, Step(True, 0, 0)), (2, Step(True, 0, 0))}
    assert w.liveness_suspended
    acts = w.handle(ControlRequest(99, StepCommand(True, 0, "s", 1)))
    assert [(a.link, a.msg) for a in acts if isinstance(a, Send) and isinstance(a.msg, Step)] == [
        (1, Step(True, 0, 1))]  # one message, to the node that waits
    acts = []
    for i in range(1, 40):  # 7.8 s of nobody's heartbeat: waiting for a step is nobody's silence
        acts += w.handle(Tick(i * 0.2, 1000.0 + i * 0.2))
    assert not [r for r in _records(acts) if r["event"] in ("silent", "lost")] and w.protected
    w.handle(ControlRequest(99, StepCommand(False, 0, "", 0)))
    acts = []
    for i in range(40, 50):
        acts += w.handle(Tick(i * 0.2, 1000.0 + i * 0.2))
    assert [r for r in _records(acts) if r["event"] == "silent"]  # and counted again once off


def test_a_node_attaching_while_stepping_is_told() -> None:
    w, _ = _pair_witness()
    w.handle(ControlRequest(99, StepCommand(False, 300, "", 0)))
    acts = w.handle(NodeAttached(7, _hello("spare", "s2", "10.0.0.3:7000")))
    assert Send(7, Step(False, 300, 0)) in acts


def test_gateway_records_become_witness_events(sink: list[dict[str, Any]]) -> None:
    trace.record({"time": 1.0, "event": "promote", "node": "s", "role": "secondary", "generation": 2}, "warning")
    (ev,) = sink
    assert (ev["kind"], ev["event"], ev["who"], ev["its_role"], ev["level"]) == (
        "witness", "promote", "s", "secondary", "warning")
    assert ev["node"] == "n1"  # the stamp is the gateway's own


def test_colo_trace_says_what_it_skipped_and_refuses_a_file_without_events(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from colo.cli import main
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"t": 1.0, "kind": "state", "role": "gateway", "node": "g", "state": "up"}\nnot json\n'
                     '{"no": "event"}\n\n')
    assert main(["trace", "show", str(mixed)]) == 0
    out = capsys.readouterr()
    assert "state" in out.out and f"{mixed}: 2 lines skipped (not events)" in out.err, out
    assert events.read_file(mixed)[1] == 2
    garbage = tmp_path / "notes.txt"
    garbage.write_text("these are not events\n")
    for args in (["show", str(garbage)], ["export", str(garbage), "--format", "perfetto"]):
        assert main(["trace", *args]) == 2
        err = capsys.readouterr().err
        assert f"colo trace: error: no events in {garbage}: record some with --trace-file" in err, err
