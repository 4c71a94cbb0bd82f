#!/usr/bin/env python3
"""Record the traces docs/tutorial.md quotes, from a real pair: one SET and its checkpoint, then a failover with
the primary SIGKILLed at a chosen point of a checkpoint (step mode holds the handshake there), then the live copy
to the next secondary.

    scripts/tutorial_trace.py OUT.jsonl [--kill-before MSG]   record (MSG: the message the primary dies before
                                                             it is sent or answered, default vmstate-received)
    scripts/tutorial_trace.py --frames OUT.jsonl [EPOCH]      print the frames of the checkpoint that released
                                                             the first SET's +OK (or EPOCH's), annotated, with
                                                             the state's pieces (head, page batches) decoded
    scripts/tutorial_trace.py --copy OUT.jsonl                print the frames of the copy after the failover,
                                                             with its records and their pieces decoded

The pair runs with --no-encrypt and records each frame's first 4096 bytes in hex, so the payloads read; the
frames are sealed all the same (each carries its sequence number and two GCM tags).
"""
from __future__ import annotations

import argparse
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lz4.block  # noqa: E402
import msgpack  # noqa: E402

from colo import events, livecopy, vmstate  # noqa: E402
from colo.view.session import ViewSession  # noqa: E402

HEX_BYTES = 4096  # a small checkpoint's head and batches whole


def record(out: Path, kill_before: str) -> None:
    d = Path(tempfile.mkdtemp(prefix="colo-tutorial-"))
    v = ViewSession("kvstore", interval_ms=1000, ram="16M", encrypt=False, trace_hex=HEX_BYTES, directory=d)
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
        # The SET came while the request waited in the gate (the guest was stopped); once the request goes, the
        # guest runs until the reply and answers it: this checkpoint covers the reply. Step it up to `kill_before`.
        while True:
            w = v.waiting()
            if not w:
                time.sleep(0.05)
                continue
            if w[0]["msg"] == kill_before:
                break
            v.step_once()
            time.sleep(0.1)
        print(v.kill("primary"))
        time.sleep(2.5)
        v.set_step(False)
        t.join(30)
        print("SET k w:", res.get("reply"), "GET k:", v.redis("GET k")["reply"])
        time.sleep(3)  # the next spare's copy, then a checkpoint or two
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
                body = msgpack.unpackb(part, raw=False)
                if isinstance(body, dict) and isinstance(body.get("data"), bytes) and len(body["data"]) > 48:
                    body["data"] = Said(f"<{len(body['data'])} bytes: see below>")
                note = f"\n{'':14}= {body!r}"[:400]
            except ValueError:
                pass
        out.append(f"  {name:<11} {h}{note}")
    if b[4] == 2:
        name, data = chunk_data(b[33:33 + n])
        if name == "vmstate-chunk":
            out.append("  the piece (colo.vmstate):")
            out += piece_lines(data, "    ")
        elif name == "initial-chunk":
            out += record_lines(data)
    return "\n".join(out)


def chunk_data(body: bytes) -> tuple[str, bytes]:
    """A chunk message's name and data, from its msgpack body, which the recording may have cut short: the
    data's bin header says where the bytes start (msgpack's bin 8/16/32: c4/c5/c6 and the length)."""
    for name in ("vmstate-chunk", "initial-chunk"):
        if msgpack.packb(name) in body[:40]:
            break
    else:
        return "", b""
    at = body.find(b"\xa4data")
    if at < 0 or at + 6 > len(body):
        return "", b""
    at += 5
    width = {0xc4: 1, 0xc5: 2, 0xc6: 4}.get(body[at], 0)
    if not width:
        return "", b""
    return name, body[at + 1 + width:]


class Said(str):
    """A placeholder printed as it is, without quotes, among the values of a decoded map."""

    def __repr__(self) -> str:
        return str(self)


def _hex(b: bytes, limit: int = 32) -> str:
    return b[:limit].hex(" ") + (" ..." if len(b) > limit else "")


def piece_lines(p: bytes, ind: str, whole: bool = True) -> list[str]:
    """One piece of a state: a head (CVH2: length, CRC, the msgpack map) or a page batch (CVB2), checked as the
    secondary checks it (the CRC; the lz4 block decompresses to exactly its pages). `whole`: False when the
    recording cut the piece short (then only its fields are read)."""
    magic = p[:4]
    if magic == vmstate.HEAD_MAGIC and len(p) >= 12:
        _, length, crc = struct.unpack_from("<4sII", p)
        head = p[12:]
        ok = "CRC ok" if len(head) == length and zlib.crc32(head) == crc else "CRC not checked: cut short"
        rows = [f"{ind}{_hex(magic):<28} {magic.decode()!r}: the head",
                f"{ind}{_hex(p[4:8]):<28} head length {length} (u32, little-endian)",
                f"{ind}{_hex(p[8:12]):<28} CRC-32 of the head ({ok})",
                f"{ind}{_hex(head)}"]
        if len(head) == length:
            m = msgpack.unpackb(head, raw=False)
            vm = m.get("vm")
            if isinstance(vm, bytes):
                m["vm"] = Said(f"<toyvm's machine state, {len(vm)} bytes>")
            rows.append(f"{ind}{'':28} = {m!r}")
        return rows
    if magic == vmstate.BATCH_MAGIC and len(p) >= 20:
        _, number, n, flags, crc = struct.unpack_from("<4sIIII", p)
        pages = list(struct.unpack_from(f"<{n}I", p, 20)) if len(p) >= 20 + 4 * n else []
        block = p[20 + 4 * n:]
        checks = " (cut short by the recording: not checked)"
        if whole and pages:
            crc_ok = zlib.crc32(p[20:], zlib.crc32(p[:16])) == crc
            try:
                size = len(lz4.block.decompress(block, uncompressed_size=n * 4096))
            except lz4.block.LZ4BlockError:
                size = -1
            checks = f" (CRC {'ok' if crc_ok else 'WRONG'}; decompresses to {size} bytes)"
        return [f"{ind}{_hex(magic):<28} {magic.decode()!r}: a page batch",
                f"{ind}{_hex(p[4:8]):<28} batch {number}",
                f"{ind}{_hex(p[8:12]):<28} {n} pages",
                f"{ind}{_hex(p[12:16]):<28} flags {flags}{' (delta)' if flags & vmstate.DELTA else ''}",
                f"{ind}{_hex(p[16:20]):<28} CRC-32 of the rest of the piece",
                f"{ind}{_hex(p[20:20 + 4 * n], 24):<28} page numbers {pages if pages else '(cut short)'}",
                f"{ind}{_hex(block, 24)}",
                f"{ind}{'':28} one lz4 block{'' if whole else ', starting'}: {len(block)} bytes{checks}"]
    return [f"{ind}{_hex(p)}  (not a piece of a state)"]


def record_lines(data: bytes) -> list[str]:
    """The start of a copy's record stream (colo.livecopy) in one initial-chunk: kind, length, then each piece
    after its u32 length (big-endian). A frame cut short by the recording ends the listing."""
    rows, at = [], 0
    while at + 5 <= len(data):
        kind, length = struct.unpack_from(">BI", data, at)
        name = {livecopy.ROUND: "ROUND (pages only)", livecopy.FINAL: "FINAL (last pages and the machine)"}
        rows.append(f"  record      {data[at:at + 1].hex()} {data[at + 1:at + 5].hex(' ')}"
                    f"   kind {kind}: {name.get(kind, '?')}, {length} bytes")
        at, end = at + 5, at + 5 + length
        while at + 4 <= min(end, len(data)):
            (size,) = struct.unpack_from(">I", data, at)
            rows.append(f"    piece     {data[at:at + 4].hex(' ')}   {size} bytes:")
            piece = data[at + 4:at + 4 + size]
            rows += piece_lines(piece, "      ", whole=len(piece) == size)
            at += 4 + size
        at = end
    return rows


def frames(path: Path, epoch: int | None) -> None:
    evs = events.read(path)
    if epoch is None:
        epoch = next(e["epoch"] for e in evs if e.get("event") == "output" and e.get("action") == "released")
    done: dict[int, dict[str, Any]] = {}
    for e in evs:
        if e["kind"] == "checkpoint":
            done.setdefault(e["epoch"], e)  # the first: after a failover the epochs of a generation go on
    lo = done[epoch - 1]["end"]
    # Up to the loss of the primary, if it died before (or in) this epoch's checkpoint.
    lost = next((e["t"] for e in evs if e.get("event") == "lost" and e["t"] > lo), float("inf"))
    hi = min(done[epoch]["end"] + 0.01 if epoch in done else lost, lost)
    quiet = events.QUIET_MESSAGES | {"step", "step-command", "command-result"}  # step mode's own traffic
    for e in evs:
        if lo <= e["t"] <= hi and e["kind"] == "send" and "hex" in e and e["msg"] not in quiet:
            print(f"{events.format_event(e)}\n{annotate(e['hex'])}\n")


def copy_frames(path: Path) -> None:
    """The frames of the first copy after a failover: initial-chunk ..., initial-size, checkpoint-ready."""
    evs = events.read(path)
    lost = next(e["t"] for e in evs if e.get("event") == "lost")
    for e in evs:
        if e["t"] >= lost and e["kind"] == "send" and e["msg"] in ("initial-chunk", "initial-size",
                                                                    "checkpoint-ready"):
            print(f"{events.format_event(e)}\n{annotate(e['hex'])}\n" if "hex" in e else events.format_event(e))
            if e["msg"] == "checkpoint-ready":
                return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("epoch", type=int, nargs="?")
    ap.add_argument("--kill-before", default="vmstate-received")
    ap.add_argument("--frames", action="store_true", help="print the frames of a recorded trace")
    ap.add_argument("--copy", action="store_true", help="print the frames of the copy after the failover")
    args = ap.parse_args()
    if args.frames:
        frames(args.out, args.epoch)
    elif args.copy:
        copy_frames(args.out)
    else:
        record(args.out, args.kill_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
