"""`toyvm inspect`: a saved state as a short text summary or as JSON.

JSON keeps the state format's own keys (docs/machine.md, "State format"). msgpack has byte strings and JSON has
not, so a byte string of up to HEX_LIMIT bytes (XMM registers, a serial receive buffer, a small network
payload) becomes its lowercase hex, and a longer one a {"length", "sha256"} summary: enough to compare two
states without printing megabytes. RAM is summarised as runs of non-zero pages and its sizes.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .contract import PAGE_SIZE

HEX_LIMIT = 256


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        return b.hex() if len(b) <= HEX_LIMIT else {"length": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def page_runs(pages: bytes) -> list[list[int]]:
    """Little-endian u32 page indices -> [[first, last], ...] runs of consecutive pages (inclusive)."""
    idx = np.sort(np.frombuffer(pages, dtype="<u4").astype(np.int64))
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]]))
    return [[int(a), int(b)] for a, b in zip(starts, ends, strict=True)]


def ram_summary(ram: dict[str, Any]) -> dict[str, Any]:
    pages = bytes(ram.get("pages", b""))
    return {"nonzero_pages": len(pages) // 4, "page_runs": page_runs(pages),
            "raw_bytes": int(ram.get("raw_size", len(pages) // 4 * PAGE_SIZE)),
            "compressed_bytes": len(ram.get("data", b""))}


def to_json(payload: dict[str, Any]) -> dict[str, Any]:
    """A state payload as JSON-ready values (see the module docstring for bytes and RAM)."""
    out: dict[str, Any] = {k: _plain(v) for k, v in payload.items() if k != "ram"}
    if "ram" in payload:
        out["ram"] = ram_summary(payload["ram"])
    return out


def describe(path: str, payload: dict[str, Any]) -> str:
    """The human summary: RAM, the registers that matter, each device."""
    m = payload["machine"]
    regs = payload["cpu"]["regs"]
    pages = len(payload.get("ram", {}).get("pages", b"")) // 4
    lines = [f"{path}: toyvm state version {payload['version']}",
             f"  RAM {m['ram_size'] >> 20} MiB, {pages} non-zero pages; cmdline {m['cmdline']!r}",
             f"  RIP {regs['rip']:#x}  RSP {regs['rsp']:#x}  exit code {m.get('exit_code')}"]
    for name, dev in payload["devices"].items():
        lines.append(f"  {name}: {dev}" if name != "net" else
                     f"  net: {len(dev['rx'])} queued inputs, last input seq {dev['last_input_seq']}, "
                     f"last output seq {dev['last_output_seq']}")
    return "\n".join(lines)
