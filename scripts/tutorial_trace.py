#!/usr/bin/env python3
"""Record the traces docs/tutorial.md quotes, from a real pair: one SET and its checkpoint, then a failover with
the primary SIGKILLed at a chosen point of a checkpoint (step mode holds the handshake there).

    scripts/tutorial_trace.py OUT.jsonl [--kill-before MSG]   record (MSG: the message the primary dies before
                                                             it is sent or answered, default vmstate-received)
    scripts/tutorial_trace.py --frames OUT.jsonl [EPOCH]      print the frames of the checkpoint that released
                                                             the first SET's +OK (or EPOCH's), annotated

The pair runs with --no-encrypt and records each frame's first 512 bytes in hex, so the payloads read; the
frames are sealed all the same (each carries its sequence number and two GCM tags).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from colo import events  # noqa: E402
from colo.view.session import ViewSession  # noqa: E402


def record(out: Path, kill_before: str) -> None:
    d = Path(tempfile.mkdtemp(prefix="colo-tutorial-"))
    v = ViewSession("kvstore", interval_ms=1000, ram="16M", encrypt=False, trace_hex=512, directory=d)
    v.start()
    try:
        time.sleep(1.2)
        print("SET k v:", v.redis("SET k v")["reply"])
        time.sleep(2.5)
        v.set_step(True)
        while not (v.waiting() and v.waiting()[0]["msg"] == "checkpoint-request"):
            if v.waiting():
                v.step_once()
            time.sleep(0.05)
        res: dict[str, Any] = {}
        t = threading.Thread(target=lambda: res.update(v.redis("SET k w")))
        t.start()
        time.sleep(0.3)
        requests = 0
        while True:  # this checkpoint whole, then the next one up to `kill_before`
            w = v.waiting()
            if not w:
                time.sleep(0.05)
                continue
            requests += w[0]["msg"] == "checkpoint-request"
            if requests == 2 and w[0]["msg"] == kill_before:
                break
            v.step_once()
            time.sleep(0.1)
        print(v.kill("primary"))
        time.sleep(2.5)
        v.set_step(False)
        t.join(30)
        print("SET k w:", res.get("reply"), "GET k:", v.redis("GET k")["reply"])
        time.sleep(3)
    finally:
        v.stop()
    shutil.copy(v.trace_path, out)
    shutil.rmtree(d, ignore_errors=True)


def annotate(hexs: str) -> str:
    """A sealed frame's fields (colo.wire): magic, version, length, sequence number, header tag, body, frame tag."""
    b = bytes.fromhex(hexs)
    n = int.from_bytes(b[5:9], "big")
    rows = [("magic", b[0:4]), ("version", b[4:5]), ("length", b[5:9]), ("seq", b[9:17]), ("header tag", b[17:33]),
            ("body", b[33:33 + n]), ("frame tag", b[33 + n:33 + n + 16])]
    out = []
    for name, part in rows:
        if not part:
            continue
        h = part.hex(" ")
        if len(h) > 96:
            h = h[:96] + " ..."
        note = ""
        if name == "length":
            note = f"  ({n} bytes)"
        elif name == "seq":
            note = f"  (frame {int.from_bytes(part, 'big')} in this direction)"
        elif name == "version":
            note = "  (2: sealed, not encrypted)" if part == b"\x02" else "  (3: encrypted)"
        elif name == "body" and b[4] == 2 and len(part) == n:
            try:
                note = f"\n{'':14}= {msgpack.unpackb(part, raw=False)!r}"[:400]
            except ValueError:
                pass
        out.append(f"  {name:<11} {h}{note}")
    return "\n".join(out)


def frames(path: Path, epoch: int | None) -> None:
    evs = events.read(path)
    if epoch is None:
        epoch = next(e["epoch"] for e in evs if e.get("event") == "output" and e.get("action") == "released")
    done = {e["epoch"]: e for e in evs if e["kind"] == "checkpoint"}
    lo, hi = done[epoch - 1]["end"], done[epoch]["end"] + 0.01
    for e in evs:
        if lo <= e["t"] <= hi and e["kind"] == "send" and "hex" in e and e["msg"] not in events.QUIET_MESSAGES:
            print(f"{events.format_event(e)}\n{annotate(e['hex'])}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("epoch", type=int, nargs="?")
    ap.add_argument("--kill-before", default="vmstate-received")
    ap.add_argument("--frames", action="store_true", help="print the frames of a recorded trace")
    args = ap.parse_args()
    if args.frames:
        frames(args.out, args.epoch)
    else:
        record(args.out, args.kill_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
