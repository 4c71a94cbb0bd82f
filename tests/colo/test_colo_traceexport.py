"""The exports of a recorded event stream (colo.traceexport), on a real recording: golden files, and the structure
that makes them readable: times increase, slices nest, every flow has both ends, diagrams parse.

The recording (golden/failover.trace.jsonl) is a real LocalCluster run (kvstore, 300 ms interval, --no-encrypt,
frames in hex): a SET and a GET, the primary SIGKILLed, the promotion, a new spare copied. Heartbeats and status
polls were left out to keep it small. COLO_UPDATE_GOLDEN=1 rewrites the expected outputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from colo import events, traceexport
from traceshape import check_mermaid, check_perfetto

GOLDEN = Path(__file__).parent / "golden"
RECORDING = GOLDEN / "failover.trace.jsonl"


@pytest.fixture(scope="module")
def evs() -> list[dict[str, Any]]:
    return events.read(RECORDING)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("COLO_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed (COLO_UPDATE_GOLDEN=1 rewrites it; then read the diff)"


# -- Perfetto -----------------------------------------------------------------------------------------------------
def test_perfetto_structure(evs: list[dict[str, Any]]) -> None:
    doc = traceexport.perfetto(evs)
    check_perfetto(doc)
    body = doc["traceEvents"]
    names = {e["args"]["name"] for e in body if e["ph"] == "M" and e["name"] == "process_name"}
    assert "gateway" in names and any(n.startswith("primary ") for n in names)
    assert any(n.startswith("spare -> secondary -> primary ") for n in names)  # the promoted node: one process
    checkpoints = [e for e in body if e["ph"] == "X" and e["cat"] == "checkpoint" and "trigger" in e["args"]]
    assert len(checkpoints) == len(traceexport.epochs(evs))
    first = checkpoints[0]
    phases = [e for e in body if e["ph"] == "X" and e["cat"] == "phase" and e["pid"] == first["pid"]
              and first["ts"] <= e["ts"] <= first["ts"] + first["dur"]]
    assert [p["name"] for p in phases][:7] == ["suspend", "collect", "compress", "send", "received", "loaded",
                                               "resume"]
    secondary = [e for e in body if e["ph"] == "X" and e["cat"] == "phase" and e["name"] == "verify"]
    assert secondary, "the secondary's phases, read off its messages"
    counters = {e["name"] for e in body if e["ph"] == "C"}
    assert counters == {"held outputs", "dirty pages"}
    flows = [e for e in body if e["ph"] == "s"]
    assert {e["name"] for e in flows} >= {"checkpoint-request", "vmstate-received", "commit", "input", "output",
                                          "promote", "promoted", "initial-chunk"}


def test_perfetto_golden(evs: list[dict[str, Any]]) -> None:
    golden("failover.perfetto.json", json.dumps(traceexport.perfetto(evs), indent=None, sort_keys=True) + "\n")


def test_perfetto_of_nothing() -> None:
    assert traceexport.perfetto([]) == {"traceEvents": [], "displayTimeUnit": "ms"}


def test_a_checkpoint_cut_short_is_drawn_as_far_as_it_went() -> None:
    base = {"role": "primary", "node": "p", "pid": 7}
    evs = [{**base, "t": 1.0, "kind": "phase", "side": "primary", "epoch": 4, "phase": "suspend", "start": 0.9,
            "end": 1.0},
           {**base, "t": 1.1, "kind": "phase", "side": "primary", "epoch": 4, "phase": "compress", "start": 1.0,
            "end": 1.1}]
    doc = traceexport.perfetto(evs)
    check_perfetto(doc)
    slices = [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"]
    assert slices == ["checkpoint 4 (incomplete)", "suspend", "compress"]


# -- Mermaid ------------------------------------------------------------------------------------------------------
def released_epoch(evs: list[dict[str, Any]]) -> int:
    """The checkpoint whose commit released the SET's reply (output 1)."""
    return int(next(e["epoch"] for e in evs if e.get("event") == "output" and e.get("action") == "released"
                    and e.get("seq") == 1))


def test_mermaid_epoch(evs: list[dict[str, Any]]) -> None:
    epoch = released_epoch(evs)
    text = traceexport.mermaid_epoch(evs, epoch)
    arrows = check_mermaid(text)
    names = [a[2].split()[0] for a in arrows]
    for msg in ("checkpoint-request", "checkpoint-reply", "vmstate-send", "vmstate-size", "vmstate-received",
                "vmstate-loaded", "commit"):
        assert msg in names
    assert names.index("checkpoint-request") < names.index("checkpoint-reply") < names.index("vmstate-received")
    # the story of output commit: the reply was produced before the checkpoint and released after its commit
    out = next(i for i, a in enumerate(arrows) if a[:2] == ("P", "G") and a[2].startswith("output"))
    release = next(i for i, a in enumerate(arrows) if a[:2] == ("G", "C") and "out" in a[2])
    assert out < names.index("checkpoint-request") < names.index("commit") < release
    golden("epoch.mmd", text)


def test_mermaid_failover(evs: list[dict[str, Any]]) -> None:
    text = traceexport.mermaid_failover(evs)
    arrows = check_mermaid(text)
    names = [a[2].split()[0] for a in arrows]
    assert names.index("promote") < names.index("promoted") < names.index("protect") < names.index("initial-chunk")
    assert "Note over G: lost " in text and "then primary" in text
    golden("failover.mmd", text)


def test_mermaid_refuses_what_is_not_there(evs: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="no checkpoint 999"):
        traceexport.mermaid_epoch(evs, 999)
    with pytest.raises(ValueError, match="no failover"):
        traceexport.mermaid_failover([e for e in evs if e.get("event") != "promote"])


def test_mermaid_escapes_what_would_break_a_line() -> None:
    assert traceexport._escape("a;b#c<d>") == "a#59;b#35;c#60;d#62;"


def test_the_recording_is_consistent(evs: list[dict[str, Any]]) -> None:
    """What the exports rely on, checked on the real stream: one send per flow, a receipt never before its send
    (one host: one clock), the handshake in order on both sides."""
    sends = traceexport.sends_by_flow(evs)
    recvs = traceexport.recvs_by_flow(evs)
    assert len(sends) == sum(1 for e in evs if e["kind"] == "send")
    for flow, r in recvs.items():
        if flow in sends:
            assert sends[flow]["t"] <= r["t"], (sends[flow], r)
    order = [e["msg"] for e in evs if e["kind"] == "send" and e.get("link") == "replication"
             and (e.get("fields") or {}).get("epoch") == 3]
    assert order == ["checkpoint-request", "checkpoint-reply", "vmstate-send", "vmstate-chunk", "vmstate-size",
                     "vmstate-received", "vmstate-loaded"]
