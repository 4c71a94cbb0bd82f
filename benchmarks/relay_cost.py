"""What relaying one request costs the gateway in hybrid mode, in one process and without sockets.

The gateway's share of a hybrid request (issue 12, item 6) is measured here on its own, so that a change to the
relay can be judged in seconds and without the noise of a three-process cluster on a shared machine:

  witness   colo.witness in hybrid mode, protected and comparing, fed what the gateway feeds it for one round
            of C clients: each client's request (`ClientData`), the primary's and the secondary's reply
            (`NodeMessage` of an `Output`, as the gateway unpacks an `outputs` frame), the primary's progress,
            and a tick; it answers with the inputs for both nodes and the released replies.
  frames    the relay's frames of that round, sealed and opened as on the links (colo.session, encrypted):
            an `inputs` frame of C requests to each node and an `outputs` frame of C replies from each, so
            both ends' work (the gateway seals the inputs and opens the outputs, a node the reverse).

Each row prints microseconds per request (the median of interleaved rounds) and the Python function calls per
request (from one profiled round). What it leaves out: the system calls (about 2.9 a request: a client's
receive and send, the batched frames, `perf stat` on a real cluster) and the gateway's event loop around the
witness; BENCHMARKS.md compares this with a real cluster's CPU per request.

    .venv/bin/python benchmarks/relay_cost.py [--clients 10] [--requests 20000] [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colo.messages import (
    Inputs,
    NodeHello,
    Output,
    Outputs,
    Progress,
    Protection,
    ProtectionState,
    Resynced,
    Welcome,
)
from colo.netevents import KIND_DATA
from colo.witness import (
    AcceptClient,
    ClientConnected,
    ClientData,
    NodeAttached,
    NodeMessage,
    Send,
    Tick,
    ToClient,
    Witness,
    WitnessConfig,
)

# The sibling script's handshaken pair of session ends (this folder is on sys.path: the script's own).
session_pair: Callable[[bool], Any] = importlib.import_module("frame_cost").session_pair
REQUEST = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000000042\r\n$3\r\nxxx\r\n"  # what redis-benchmark -t set sends
REPLY = b"+OK\r\n"
PRIMARY, SECONDARY = 2, 1  # link ids


class HybridRelay:
    """A witness in hybrid mode with a primary and a mirroring secondary, and C clients connected."""

    def __init__(self, clients: int) -> None:
        self.w = Witness(WitnessConfig(mode="hybrid", gateway_id="bench"))
        self.now = 0.0
        self.gen = {PRIMARY: 0, SECONDARY: 0}
        self._do(Tick(self.now, 1000.0))
        self._do(NodeAttached(SECONDARY, NodeHello("spare", "s", 0, 0, 0, 0, [], "", "127.0.0.1:7001", "", {})))
        self._do(NodeAttached(PRIMARY, NodeHello("primary", "p", 0, 0, 0, 0, [], "", "", "", {})))
        self._do(NodeMessage(PRIMARY, Protection(self.gen[PRIMARY], ProtectionState.PROTECTED, 0,
                                                 self.w.input_seq, self.w.released_seq, "s", "",
                                                 self.w.protect_attempt)))
        self._do(NodeMessage(SECONDARY, Resynced(self.gen[SECONDARY], 0, self.w.input_seq, 0)))
        if not (self.w.protected and self.w.mirror == "s"):
            raise SystemExit(f"relay_cost: the witness is not comparing (service {self.w.service})")
        self.conns = [self._connect(token) for token in range(1, clients + 1)]
        self.output_seq = 0

    def _do(self, event: Any) -> list[Any]:
        actions = self.w.handle(event)
        for a in actions:  # a node obeys the generation it is told
            if isinstance(a, Send) and isinstance(a.msg, Welcome):
                self.gen[a.link] = a.msg.generation
        return actions

    def _connect(self, token: int) -> int:
        accepted = [a for a in self._do(ClientConnected(token)) if isinstance(a, AcceptClient)]
        if not accepted:
            raise SystemExit("relay_cost: the witness refused a client")
        return accepted[0].conn

    def round(self) -> tuple[int, int]:
        """One request and its reply on every connection; returns (inputs sent to nodes, replies released)."""
        handle, sent, released = self.w.handle, 0, 0
        for conn in self.conns:
            sent += len(handle(ClientData(conn, REQUEST)))
        first = self.output_seq + 1
        for link in (PRIMARY, SECONDARY):
            gen = self.gen[link]
            for i, conn in enumerate(self.conns):
                for a in handle(NodeMessage(link, Output.checked_already(gen, first + i, KIND_DATA, conn, REPLY))):
                    released += isinstance(a, ToClient)
        self.output_seq += len(self.conns)
        handle(NodeMessage(PRIMARY, Progress(self.gen[PRIMARY], self.w.input_seq)))  # credit back
        self.now += 0.001
        handle(Tick(self.now, 1000.0 + self.now))
        return sent, released


def time_witness(relay: HybridRelay, requests: int) -> float:
    rounds = max(1, requests // len(relay.conns))
    t = time.perf_counter()
    for _ in range(rounds):
        sent, released = relay.round()
        if released != len(relay.conns) or sent != 2 * len(relay.conns):
            raise SystemExit(f"relay_cost: a round sent {sent} inputs and released {released} replies")
    return (time.perf_counter() - t) / (rounds * len(relay.conns))


def frame_round(clients: int) -> Callable[[], None]:
    """One round's frames: an `inputs` frame to each node and an `outputs` frame from each, sealed and opened."""
    (to_p, at_p), (to_s, at_s) = session_pair(True), session_pair(True)
    (from_p, gw_p), (from_s, gw_s) = session_pair(True), session_pair(True)
    seq = iter(range(1, 1 << 62))

    def run() -> None:
        base = next(seq) * clients
        ins = Inputs.checked_already([[base + i, KIND_DATA, i, REQUEST] for i in range(clients)])
        outs = Outputs(1, [[base + i, KIND_DATA, i, REPLY] for i in range(clients)])
        for enc, dec, msg in ((to_p, at_p, ins), (to_s, at_s, ins), (from_p, gw_p, outs), (from_s, gw_s, outs)):
            dec.feed(enc.encode(msg))
            if dec.next_message() is None:
                raise SystemExit("relay_cost: a frame did not decode")
    return run


def time_frames(run: Callable[[], None], clients: int, requests: int) -> float:
    rounds = max(1, requests // clients)
    t = time.perf_counter()
    for _ in range(rounds):
        run()
    return (time.perf_counter() - t) / (rounds * clients)


def calls_per_request(f: Callable[[], object], requests: int) -> float:
    prof = cProfile.Profile()
    prof.runcall(f)
    return float(pstats.Stats(prof).total_calls) / requests  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10, help="connections, one request each per round (10)")
    ap.add_argument("--requests", type=int, default=20000, help="requests per row and round (20000)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed (5)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.clients < 1 or args.requests < args.clients or args.rounds < 1:
        ap.error("need --clients >= 1, --requests >= --clients and --rounds >= 1")

    relay, frames = HybridRelay(args.clients), frame_round(args.clients)
    time_witness(relay, args.requests // 10)  # warm-up: the comparer's and codecs' first allocations
    time_frames(frames, args.clients, args.requests // 10)
    rows: dict[str, Callable[[], float]] = {
        "witness": lambda: time_witness(relay, args.requests),
        "frames": lambda: time_frames(frames, args.clients, args.requests),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):  # interleaved: a busy moment of a shared machine hits every row
        for name, run in rows.items():
            times[name].append(run())
    n = args.requests
    calls = {"witness": calls_per_request(lambda: time_witness(relay, n), n),
             "frames": calls_per_request(lambda: time_frames(frames, args.clients, n), n)}

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; hybrid mode, {args.clients} clients, "
          f"{args.requests} requests per row and round, {args.rounds} rounds, medians")
    print(f"{'part':10s} {'us/request':>11s} {'range':>15s} {'calls/request':>14s}")
    result: dict[str, Any] = {"clients": args.clients, "requests": args.requests, "rounds": args.rounds,
                              "python": platform.python_version(), "rows": {}}
    total = 0.0
    for name, ts in times.items():
        med = statistics.median(ts) * 1e6
        total += med
        print(f"{name:10s} {med:11.2f} {min(ts) * 1e6:7.2f}-{max(ts) * 1e6:<7.2f} {calls[name]:14.0f}")
        result["rows"][name] = {"us_per_request": med, "min": min(ts) * 1e6, "max": max(ts) * 1e6,
                                "calls_per_request": calls[name]}
    print(f"{'both':10s} {total:11.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
