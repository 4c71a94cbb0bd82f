"""What makes an exported trace readable, checked the same way by the export tests and the browser tests."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

from colo import traceexport


def check_perfetto(doc: dict[str, Any]) -> None:
    """What Perfetto needs to draw it right, and what the brief promises: every process named, times that never go
    back, slices that nest on each track, and every flow with its start and its end."""
    evs = doc["traceEvents"]
    json.loads(json.dumps(doc))
    meta = [e for e in evs if e["ph"] == "M"]
    body = [e for e in evs if e["ph"] != "M"]
    named = {e["pid"] for e in meta if e["name"] == "process_name"}
    assert {e["pid"] for e in body} <= named
    ts = [e["ts"] for e in body]
    assert ts == sorted(ts) and min(ts) >= 0
    tracks: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in body:
        if e["ph"] == "X":
            assert e["dur"] >= 0
            tracks[(e["pid"], e["tid"])].append(e)
    ns = 1e-3  # Perfetto keeps nanoseconds: what rounds to the same nanosecond is the same time
    for track in tracks.values():
        open_ends: list[float] = []  # a stack of the enclosing slices' ends
        for s in sorted(track, key=lambda e: (e["ts"], -e["dur"])):
            while open_ends and s["ts"] >= open_ends[-1] - ns:
                open_ends.pop()
            end = s["ts"] + s["dur"]
            assert not open_ends or end <= open_ends[-1] + ns, f"{s['name']} sticks out of its parent"
            open_ends.append(end)
    flows: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for e in body:
        if e["ph"] in ("s", "f"):
            flows[e["id"]][e["ph"]].append(e)
    for fid, ends in flows.items():
        assert len(ends["s"]) == 1 and len(ends["f"]) == 1, f"flow {fid}: {dict(ends)}"
        assert ends["f"][0]["bp"] == "e"
        slices = {(x["pid"], x["ts"]) for x in tracks[(ends["s"][0]["pid"], traceexport.TID_MESSAGES)]}
        assert (ends["s"][0]["pid"], ends["s"][0]["ts"]) in slices  # bound to the message's slice


ARROW = re.compile(r"^    (\w+)(->>|-x)(\w+): (.+)$")
NOTE = re.compile(r"^    Note over (\w+): (.+)$")
PART = re.compile(r"^    participant (\w+) as (.+)$")


def check_mermaid(text: str) -> list[tuple[str, str, str]]:
    """A sequence diagram Mermaid reads: the header, participants declared before they are used, and every other
    line an arrow or a note whose text has nothing that would end or mark up the line. Returns the arrows."""
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "sequenceDiagram" and lines[1].startswith("    title ")
    declared: set[str] = set()
    arrows: list[tuple[str, str, str]] = []
    for line in lines[2:]:
        if m := PART.match(line):
            assert not arrows, "participants come first"
            declared.add(m[1])
            continue
        if m := ARROW.match(line):
            assert {m[1], m[3]} <= declared, line
            arrows.append((m[1], m[3], m[4]))
            text = m[4]
        elif m := NOTE.match(line):
            assert m[1] in declared, line
            text = m[2]
        else:
            raise AssertionError(f"not a diagram line: {line!r}")
        assert not set(text) & set(";<>") and "#" not in text.replace("#35;", "").replace("#59;", "").replace(
            "#60;", "").replace("#62;", ""), line
    return arrows
