"""What sealing costs per frame: encode + decode of 1 MiB vmstate-chunk frames, in one process.

Rows: today's plain frames (colo.wire, what the seed sent after the handshake), the session's
integrity-only frames and its encrypted frames (colo.session): the time to encode a 1 MiB
vmstate-chunk and to decode it (feed + next_message), and MB/s of payload through both, the median
of interleaved rounds; "+ms/16MiB" is what sealing adds to a checkpoint of 4096 incompressible
pages (both sides together; in the cluster they are two processes and overlap in part). Below them, the primitives alone
on the same 1 MiB, including the two this design did not pick (HMAC-SHA256, ChaCha20-Poly1305),
so the choice in docs/decisions.md can be checked on any machine.

    .venv/bin/python benchmarks/frame_cost.py [--rounds 7] [--frames 64] [--default-malloc] [--json out.json]

Like the nodes, it first raises glibc's mmap threshold (colo.memory), so that large buffers are
reused rather than page-faulted in anew; --default-malloc leaves glibc as it is (then every row
pays page faults, and which row pays more depends on allocation order more than on the sealing).
"""
from __future__ import annotations

import argparse
import hmac
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from colo.auth import Handshake
from colo.memory import keep_buffers_on_heap
from colo.messages import VmstateChunk
from colo.session import SessionCodec
from colo.wire import FrameDecoder, encode_frame
from toyvm.cli import positive_int

MIB = 1 << 20
CHECKPOINT_MIB = 16  # N = 4096 pages, fill=random: 16 MiB on the wire (BENCHMARKS.md)


def session_pair(encrypt: bool) -> tuple[SessionCodec, SessionCodec]:
    key = os.urandom(32).hex().encode()
    a = Handshake(key, "primary", "secondary", encrypt=encrypt)
    b = Handshake(key, "secondary", "primary", encrypt=encrypt)
    ca, cb = a.start(), b.start()
    pa, pb = a.receive_data(cb), b.receive_data(ca)
    a.receive_data(pb)
    b.receive_data(pa)
    return a.session(), b.session()


def plain_codecs() -> tuple[Callable[[VmstateChunk], bytes], FrameDecoder]:
    return encode_frame, FrameDecoder()


def sealed_codecs(encrypt: bool) -> tuple[Callable[[VmstateChunk], bytes], SessionCodec]:
    enc, dec = session_pair(encrypt)
    return enc.encode, dec


def one_round(codecs: tuple[Callable[[VmstateChunk], bytes], FrameDecoder | SessionCodec],
              msgs: list[VmstateChunk]) -> tuple[float, float]:
    """(encode, decode) seconds for all of `msgs`. The sides run one after the other, not
    interleaved: in the cluster they are two processes, each with its own allocator."""
    encode, decoder = codecs
    t = time.perf_counter()
    frames = [encode(m) for m in msgs]
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    for f in frames:
        decoder.feed(f)
        assert decoder.next_message() is not None
    return t_enc, time.perf_counter() - t


def primitive(f: Callable[[], object], n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds; medians are printed (7)")
    ap.add_argument("--frames", type=positive_int, default=64, help="1 MiB frames per round and row (64)")
    ap.add_argument("--default-malloc", action="store_true", help="do not raise glibc's mmap threshold")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    heap = False if args.default_malloc else keep_buffers_on_heap()

    data = os.urandom(MIB)  # incompressible, like fill=random pages after lz4
    msgs = [VmstateChunk(1, data) for _ in range(args.frames)]
    rows: dict[str, Callable[[], tuple[float, float]]] = {
        "plain (today)": lambda: one_round(plain_codecs(), msgs),
        "integrity (GMAC)": lambda: one_round(sealed_codecs(False), msgs),
        "encrypted (AES-256-GCM)": lambda: one_round(sealed_codecs(True), msgs),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(args.rounds):  # interleaved: a busy moment on this shared machine hits every row
        for name, run in rows.items():
            enc, dec = run()
            times[name].append((enc / args.frames, dec / args.frames))

    print(f"python {platform.python_version()}, cryptography {cryptography.__version__}, "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.frames} frames of 1 MiB; medians; "
          f"buffers kept on the heap: {'yes' if heap else 'no'}")
    print(f"{'frames':26s} {'encode':>8s} {'decode':>8s} {'MB/s':>8s} {'+encode':>8s} {'+decode':>8s} "
          f"{'+ms/16MiB':>10s}")
    print(f"{'':26s} {'ms/MiB':>8s} {'ms/MiB':>8s} {'enc+dec':>8s} {'ms/MiB':>8s} {'ms/MiB':>8s} "
          f"{'enc+dec':>10s}")
    med = {name: (statistics.median(e for e, _ in ts), statistics.median(d for _, d in ts))
           for name, ts in times.items()}
    base_e, base_d = med["plain (today)"]
    result: dict[str, dict[str, object]] = {"frames": {}, "primitives": {}}
    for name, (e, d) in med.items():
        print(f"{name:26s} {e * 1e3:8.3f} {d * 1e3:8.3f} {MIB / (e + d) / 1e6:8.0f} {(e - base_e) * 1e3:8.3f} "
              f"{(d - base_d) * 1e3:8.3f} {(e + d - base_e - base_d) * CHECKPOINT_MIB * 1e3:10.2f}")
        result["frames"][name] = {"encode_ms_per_mib": e * 1e3, "decode_ms_per_mib": d * 1e3,
                                  "mb_s": MIB / (e + d) / 1e6}

    key, nonce = os.urandom(32), bytes(12)
    gcm, chacha = AESGCM(key), ChaCha20Poly1305(key)
    prims: dict[str, Callable[[], object]] = {
        "HMAC-SHA256": lambda: hmac.digest(key, data, "sha256"),
        "GMAC (AES-GCM, data as AAD)": lambda: gcm.encrypt(nonce, b"", data),
        "Poly1305 (ChaCha20-Poly1305, AAD)": lambda: chacha.encrypt(nonce, b"", data),
        "AES-256-GCM encrypt": lambda: gcm.encrypt(nonce, data, b""),
        "ChaCha20-Poly1305 encrypt": lambda: chacha.encrypt(nonce, data, b""),
        "memcpy (bytes concat)": lambda: b"x" + data,
    }
    print(f"\n{'primitive on 1 MiB':36s} {'MB/s':>8s} {'ms/MiB':>8s}")
    for name, f in prims.items():
        per = statistics.median(primitive(f, 40) for _ in range(args.rounds))
        print(f"{name:36s} {MIB / per / 1e6:8.0f} {per * 1e3:8.3f}")
        result["primitives"][name] = {"mb_s": MIB / per / 1e6}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
