"""Pure converters of a recorded event stream (colo.events): Chrome trace-event JSON for Perfetto, and Mermaid
sequence diagrams of one epoch or one failover. Events in, text or JSON out: no files, no clocks.

Perfetto (ui.perfetto.dev, "Open trace file"): one process per node process and one for the gateway, named by
role; on each, a "checkpoint" track (each checkpoint a slice, its phases nested inside; the secondary's phases are
read off its messages: reply, receive, verify, apply), a "messages" track (each message a slice where it is sent
and where it is received, joined by a flow arrow), an "events" track (the witness's decisions, state changes,
failover steps) and counters: the outputs the gateway holds, the dirty pages of each epoch.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from colo.events import QUIET_MESSAGES, fields_text

TID_CHECKPOINT, TID_MESSAGES, TID_EVENTS, TID_CLIENTS = 1, 2, 3, 4
THREADS = {TID_CHECKPOINT: "checkpoint", TID_MESSAGES: "messages", TID_EVENTS: "events", TID_CLIENTS: "clients"}
# The secondary's side of a checkpoint, read off its messages: (phase, starts at, ends at); (dir, message).
SECONDARY_PHASES = (
    ("reply", ("recv", "checkpoint-request"), ("send", "checkpoint-reply")),
    ("receive", ("send", "checkpoint-reply"), ("recv", "vmstate-size")),
    ("verify", ("recv", "vmstate-size"), ("send", "vmstate-received")),
    ("apply", ("send", "vmstate-received"), ("send", "vmstate-loaded")),
)


def _epoch(ev: dict[str, Any], sends: dict[str, dict[str, Any]]) -> int | None:
    """The epoch a message event carries (a receipt: its send's)."""
    src = ev if ev.get("kind") == "send" else sends.get(str(ev.get("flow")), {})
    e = (src.get("fields") or {}).get("epoch")
    return e if isinstance(e, int) else None


def sends_by_flow(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(e["flow"]): e for e in events if e.get("kind") == "send" and "flow" in e}


def recvs_by_flow(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(e["flow"]): e for e in events if e.get("kind") == "recv" and "flow" in e}


# -- Perfetto -----------------------------------------------------------------------------------------------------
def perfetto(events: list[dict[str, Any]], *, quiet: bool = False) -> dict[str, Any]:
    """Chrome trace-event JSON ({"traceEvents": [...]}) for the events (merged and sorted, as colo.events.read
    gives them). `quiet`: include heartbeats and status messages too."""
    evs = [e for e in events if "t" in e]
    if not evs:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    t0 = min(min(float(e["t"]), float(e.get("start", e["t"]))) for e in evs)  # phases start before they are told

    def us(t: float) -> float:
        return round((float(t) - t0) * 1e6, 3)

    out: list[dict[str, Any]] = []
    roles: dict[int, list[str]] = {}
    nodes: dict[int, str] = {}
    for e in evs:
        pid = int(e.get("pid", 0))
        rl = roles.setdefault(pid, [])
        if e.get("role") and (not rl or rl[-1] != e["role"]):
            rl.append(str(e["role"]))
        nodes.setdefault(pid, str(e.get("node", "")))
    order = sorted(roles, key=lambda p: (roles[p][:1] != ["gateway"], min(us(e["t"]) for e in evs
                                                                         if int(e.get("pid", 0)) == p)))
    for rank, pid in enumerate(order):
        name = " -> ".join(dict.fromkeys(roles[pid])) or "?"
        label = f"{name} {nodes[pid]}".strip() if roles[pid][:1] != ["gateway"] else "gateway"
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": rank}})
        for tid, tname in THREADS.items():
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}})

    body: list[dict[str, Any]] = []
    body += _primary_checkpoints(evs, us)
    body += _secondary_checkpoints(evs, us)
    body += _messages(evs, us, quiet)
    for e in evs:
        pid, kind = int(e.get("pid", 0)), e.get("kind")
        if kind == "witness":
            if e.get("level") != "trace" or e.get("event") in ("takeover", "step"):
                body.append(_instant(e, us, str(e.get("event")), TID_EVENTS))
            if e.get("event") == "output" and isinstance(e.get("held"), int):
                body.append({"ph": "C", "name": "held outputs", "pid": pid, "tid": 0, "ts": us(e["t"]),
                             "args": {"held": e["held"]}})
        elif kind in ("state", "failover", "gate", "checkpoint-failed"):
            name = {"state": f"state: {e.get('now')}", "failover": f"failover: {e.get('step')}",
                    "gate": f"gate: {e.get('state')} {e.get('msg')}"}.get(str(kind), str(kind))
            body.append(_instant(e, us, name, TID_EVENTS))
        elif kind == "pages" and e.get("what") == "dirty":
            body.append({"ph": "C", "name": "dirty pages", "pid": pid, "tid": 0, "ts": us(e["t"]),
                         "args": {"pages": e.get("count", 0)}})
        elif kind == "client":
            body.append(_instant(e, us, f"client {e.get('conn')} {e.get('dir')}", TID_CLIENTS))
    body.sort(key=lambda x: (x["ts"], 0 if x["ph"] == "X" else 1))
    return {"traceEvents": out + body, "displayTimeUnit": "ms",
            "otherData": {"source": "colo trace export", "t0": t0}}


def _args(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k not in ("t", "pid", "kind")}


def _instant(e: dict[str, Any], us: Any, name: str, tid: int) -> dict[str, Any]:
    return {"ph": "i", "s": "t", "name": name, "cat": str(e.get("kind")), "pid": int(e.get("pid", 0)), "tid": tid,
            "ts": us(e["t"]), "args": _args(e)}


def _slice(pid: int, tid: int, name: str, start: float, end: float, cat: str,
           args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": start,
            "dur": round(max(0.0, end - start), 3), "args": args or {}}


def _nested(pid: int, parent: tuple[str, float, float], children: list[tuple[str, float, float]], cat: str,
            args: dict[str, Any]) -> list[dict[str, Any]]:
    """A slice and its children, clamped inside it (rounding must never make a child stick out)."""
    name, lo, hi = parent
    out = [_slice(pid, TID_CHECKPOINT, name, lo, hi, cat, args)]
    last = lo
    for cname, a, b in children:
        a = min(max(a, last, lo), hi)
        b = min(max(b, a), hi)
        out.append(_slice(pid, TID_CHECKPOINT, cname, a, b, "phase"))
        last = b
    return out


def _primary_checkpoints(evs: list[dict[str, Any]], us: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    done: set[tuple[int, int]] = set()
    for e in evs:
        if e.get("kind") != "checkpoint":
            continue
        pid, epoch = int(e.get("pid", 0)), int(e.get("epoch", 0))
        done.add((pid, epoch))
        args = {k: e.get(k) for k in ("epoch", "trigger", "pause_ms", "dirty_pages", "bytes_raw", "bytes_wire")}
        phases = [(str(n), us(a), us(b)) for n, a, b in e.get("phases", [])]
        out += _nested(pid, (f"checkpoint {epoch} ({e.get('trigger')})", us(e["start"]), us(e["end"])), phases,
                       "checkpoint", args)
    # A checkpoint that never completed (a killed peer, a failure): its phases as far as they went.
    partial: dict[tuple[int, int], list[tuple[str, float, float]]] = {}
    for e in evs:
        if e.get("kind") == "phase" and e.get("side") == "primary":
            key = (int(e.get("pid", 0)), int(e.get("epoch", 0)))
            if key not in done:
                partial.setdefault(key, []).append((str(e.get("phase")), us(e["start"]), us(e["end"])))
    for (pid, epoch), phases in partial.items():
        out += _nested(pid, (f"checkpoint {epoch} (incomplete)", phases[0][1], phases[-1][2]), phases,
                       "checkpoint", {"epoch": epoch, "complete": False})
    return out


def _secondary_checkpoints(evs: list[dict[str, Any]], us: Any) -> list[dict[str, Any]]:
    sends = sends_by_flow(evs)
    marks: dict[tuple[int, int], dict[tuple[str, str], float]] = {}
    for e in evs:
        if e.get("kind") not in ("send", "recv") or e.get("link") != "replication" or e.get("role") == "primary":
            continue
        epoch = _epoch(e, sends)
        if epoch is None:
            continue
        marks.setdefault((int(e.get("pid", 0)), epoch), {}).setdefault((str(e["kind"]), str(e["msg"])), us(e["t"]))
    out: list[dict[str, Any]] = []
    for (pid, epoch), m in sorted(marks.items()):
        if ("recv", "checkpoint-request") not in m:
            continue
        phases = [(name, m[a], m[b]) for name, a, b in SECONDARY_PHASES if a in m and b in m]
        if not phases:
            continue
        out += _nested(pid, (f"checkpoint {epoch}", phases[0][1], phases[-1][2]), phases, "checkpoint",
                       {"epoch": epoch, "complete": ("send", "vmstate-loaded") in m})
    return out


def _messages(evs: list[dict[str, Any]], us: Any, quiet: bool) -> list[dict[str, Any]]:
    recvs = recvs_by_flow(evs)
    points: list[tuple[int, float, str, str, dict[str, Any], int | None]] = []  # pid, ts, name, dir, args, flow
    flow_ids: dict[str, int] = {}
    for e in evs:
        if e.get("kind") != "send" or (not quiet and e.get("msg") in QUIET_MESSAGES):
            continue
        flow = str(e.get("flow"))
        r = recvs.get(flow)
        fid = None
        if r is not None:
            fid = flow_ids.setdefault(flow, len(flow_ids) + 1)
            points.append((int(r.get("pid", 0)), us(r["t"]), str(e["msg"]), "in",
                           {"from": e.get("role"), "flow": flow, "state": r.get("state")}, fid))
        points.append((int(e.get("pid", 0)), us(e["t"]), str(e["msg"]), "out",
                       {"to": e.get("to"), "fields": e.get("fields"), "frame": e.get("frame"), "flow": flow,
                        "state": e.get("state")}, fid))
    points.sort(key=lambda p: (p[0], p[1]))
    out: list[dict[str, Any]] = []
    for i, (pid, ts, name, d, args, fid) in enumerate(points):
        nxt = points[i + 1] if i + 1 < len(points) and points[i + 1][0] == pid else None
        dur = 1.0 if nxt is None else max(0.0, min(1.0, nxt[1] - ts))  # never overlapping the next one
        out.append({"ph": "X", "name": name, "cat": "message", "pid": pid, "tid": TID_MESSAGES, "ts": ts,
                    "dur": round(dur, 3), "args": {"dir": d, **{k: v for k, v in args.items() if v is not None}}})
        if fid is not None:
            arrow: dict[str, Any] = {"ph": "s" if d == "out" else "f", "id": fid, "name": name, "cat": "message",
                                     "pid": pid, "tid": TID_MESSAGES, "ts": ts}
            if d == "in":
                arrow["bp"] = "e"  # bound to the enclosing slice: the receipt
            out.append(arrow)
    return out


# -- Mermaid ------------------------------------------------------------------------------------------------------
ROLE_ALIAS = {"client": "C", "gateway": "G", "primary": "P", "secondary": "S", "spare": "N", "control": "O"}
MAX_LINES = 400


def epochs(events: Iterable[dict[str, Any]]) -> list[int]:
    """The epochs whose checkpoint completed, in order."""
    return sorted({int(e["epoch"]) for e in events if e.get("kind") == "checkpoint"})


def mermaid_epoch(events: list[dict[str, Any]], epoch: int) -> str:
    """The run of `epoch` and its checkpoint: from the end of the checkpoint before (the guest resumed) to the
    release of the output it covers."""
    done = {int(e["epoch"]): e for e in events if e.get("kind") == "checkpoint"}
    sends = sends_by_flow(events)
    starts = [float(e["t"]) for e in events if e.get("kind") == "send" and e.get("msg") == "checkpoint-request"
              and _epoch(e, sends) == epoch]
    if epoch not in done and not starts:
        have = ", ".join(map(str, epochs(events))) or "none"
        raise ValueError(f"the trace has no checkpoint {epoch} (it has {have})")
    lo = float(done[epoch - 1]["end"]) if epoch - 1 in done else (starts[0] if starts else float(done[epoch]["start"]))
    ends = [float(e["t"]) for e in events if e.get("kind") == "recv" and _epoch(e, sends) == epoch
            and e.get("msg") in ("vmstate-loaded", "commit")]
    if epoch in done:
        ends.append(float(done[epoch]["end"]))
    hi = max(ends) if ends else lo + 1.0
    # the release of what the commit covers follows it at once (same gateway turn)
    hi = max([hi] + [float(e["t"]) for e in events if e.get("kind") == "witness" and e.get("event") == "output"
                     and e.get("action") == "released" and e.get("epoch") == epoch])
    hi = max([hi] + [float(e["t"]) for e in events if e.get("kind") == "client" and e.get("dir") == "out"
                     and hi < float(e["t"]) <= hi + 0.002])
    title = f"checkpoint {epoch}"
    if epoch in done:
        title += f" ({done[epoch].get('trigger')}): pause {done[epoch].get('pause_ms')} ms, " \
                 f"{done[epoch].get('dirty_pages')} dirty pages, {done[epoch].get('bytes_wire')} bytes"
    return _mermaid(events, lo, hi, by_node=False, title=title, phases_of=epoch)


def failover_window(events: list[dict[str, Any]]) -> tuple[float, float]:
    """From the first sign the active node is lost to the end of the re-protection that follows (or 2 s)."""
    first = next((e for e in events if e.get("kind") == "witness" and e.get("event") == "promote"), None)
    if first is None:
        raise ValueError("the trace has no failover (no promote)")
    tp = float(first["t"])
    lead = [float(e["t"]) for e in events if tp - 5.0 <= float(e["t"]) <= tp and (
        (e.get("kind") == "witness" and e.get("event") in ("silent", "lost")) or
        (e.get("kind") == "failover" and e.get("step") == "primary-lost"))]
    lo = min(lead) if lead else tp - 0.05
    later = [float(e["t"]) for e in events if float(e["t"]) > tp and e.get("kind") == "witness"
             and e.get("event") == "protected"]
    done = [float(e["t"]) for e in events if float(e["t"]) > tp and e.get("kind") == "witness"
            and e.get("event") == "promoted"]
    hi = min(later) if later else (min(done) + 0.5 if done else tp + 2.0)
    return lo - 0.001, min(hi, tp + 30.0) + 0.001


def mermaid_failover(events: list[dict[str, Any]]) -> str:
    lo, hi = failover_window(events)
    return _mermaid(events, lo, hi, by_node=True, title="failover")


def _escape(text: str) -> str:
    """Message text Mermaid shows as is (its entity codes for what would end or mark up a line)."""
    codes = {"#": "#35;", ";": "#59;", "<": "#60;", ">": "#62;", "\n": " ", "\r": " "}
    return "".join(codes.get(c, c) for c in text)


def _short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _mermaid(events: list[dict[str, Any]], lo: float, hi: float, *, by_node: bool, title: str,
             phases_of: int | None = None) -> str:
    window = [e for e in events if lo <= float(e["t"]) <= hi]
    recvs = recvs_by_flow(events)
    parts: dict[str, str] = {}  # alias -> label, in order of first use
    roles_of: dict[str, list[str]] = {}

    def who(role: str, node: str) -> str:
        if not by_node or role in ("client", "gateway", "control") or not node:
            alias = ROLE_ALIAS.get(role, role[:1].upper() or "X")
            parts.setdefault(alias, role)
            return alias
        alias = "N" + node[:6]
        seen = roles_of.setdefault(alias, [])
        if role not in seen:
            seen.append(role)
        parts.setdefault(alias, node)
        return alias

    lines: list[tuple[float, str]] = []
    t_first = float(window[0]["t"]) if window else lo
    pending_chunks: dict[tuple[str, str, str], list[Any]] = {}  # (from, to, msg) -> [count, bytes, t, line index]

    def at(t: float) -> str:
        return f"+{(t - t_first) * 1e3:.3f} ms"

    for e in window:
        kind, t = e.get("kind"), float(e["t"])
        if kind == "send" and e.get("msg") not in QUIET_MESSAGES:
            src = who(str(e.get("role")), str(e.get("node", "")))
            r = recvs.get(str(e.get("flow")))
            dst = who(str(r.get("role")), str(r.get("node", ""))) if r else who(str(e.get("to")), "")
            if dst == src:
                continue
            msg = str(e["msg"])
            if msg in ("initial-chunk", "vmstate-chunk"):
                size = (e.get("fields") or {}).get("data", {}).get("len", 0)
                key = (src, dst, msg)
                if key in pending_chunks:
                    acc = pending_chunks[key]
                    acc[0] += 1
                    acc[1] += size
                    lines[acc[3]] = (acc[2], f"    {src}->>{dst}: {msg} x{acc[0]} ({acc[1]} bytes) {at(acc[2])}")
                    continue
                pending_chunks[key] = [1, size, t, len(lines)]
                lines.append((t, f"    {src}->>{dst}: {msg} ({size} bytes) {at(t)}"))
                continue
            pending_chunks.clear()
            text = _short(f"{msg} {fields_text(e.get('fields') or {})}".strip())
            arrow = "->>" if r is not None else "-x"
            lines.append((t, f"    {src}{arrow}{dst}: {_escape(text)} {at(t)}"))
        elif kind == "client" and e.get("dir") in ("in", "out", "open", "close"):
            c, g = who("client", ""), who("gateway", "")
            d = str(e.get("dir"))
            data = (e.get("data") or {}).get("text", "")
            text = _short(f"conn {e.get('conn')} {d}" + (f' "{data}"' if data else "") +
                          (f" (output {e['seq']})" if e.get("seq") else ""))
            lines.append((t, f"    {c if d in ('in', 'open') else g}->>{g if d in ('in', 'open') else c}: "
                             f"{_escape(text)} {at(t)}"))
        elif kind == "witness" and (e.get("level") != "trace" or e.get("event") in ("output", "takeover")):
            g = who("gateway", "")
            if e.get("event") == "output":
                text = f"output {e.get('seq', '')} {e.get('action')}" + (
                    f" (covered by checkpoint {e['epoch']})" if e.get("epoch") is not None else "")
            else:
                rest = {k: v for k, v in e.items() if k not in ("t", "t_local", "role", "node", "pid", "kind",
                                                                "event", "level")}
                text = f"{e.get('event')} {fields_text(rest)}"
            lines.append((t, f"    Note over {g}: {_escape(_short(text))}"))
        elif kind in ("failover", "state", "checkpoint-failed") and by_node:
            n = who(str(e.get("role")), str(e.get("node", "")))
            text = {"failover": f"{e.get('step')}", "state": f"state: {e.get('now')}"}.get(str(kind), str(kind))
            rest = {k: v for k, v in e.items() if k in ("epoch", "reason", "generation", "rollback", "took_ms")}
            lines.append((t, f"    Note over {n}: {_escape(_short((text + ' ' + fields_text(rest)).strip()))}"))
    for e in events:  # its phases (the summary is emitted as the checkpoint ends, after the window)
        if e.get("kind") == "checkpoint" and phases_of is not None and e.get("epoch") == phases_of:
            p = who(str(e.get("role")), str(e.get("node", "")))
            for name, a, b in e.get("phases", []):
                lines.append((float(a), f"    Note over {p}: {name} {(float(b) - float(a)) * 1e3:.3f} ms"))
    lines.sort(key=lambda x: x[0])
    body = [line for _, line in lines]
    if len(body) > MAX_LINES:
        body = [*body[:MAX_LINES], f"    Note over {next(iter(parts), 'G')}: ... {len(body) - MAX_LINES} more lines"]
    order = [a for a in ROLE_ALIAS.values() if a in parts] + [a for a in parts if a not in ROLE_ALIAS.values()]
    head = ["sequenceDiagram", f"    title {_escape(title)}"]
    for alias in order:
        label = parts[alias]
        if alias in roles_of:
            label = f"{' then '.join(roles_of[alias])} {label}"
        head.append(f"    participant {alias} as {_escape(label)}")
    return "\n".join(head + body) + "\n"
