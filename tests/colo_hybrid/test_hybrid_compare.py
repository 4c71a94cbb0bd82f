"""Hybrid (COLO) mode: the gateway compares the two VMs' outputs and checkpoints only when they differ.

kvstore is deterministic: under a real client load (redis-benchmark, redis-cli, persistent RESP connections) the
two VMs answer alike, so the comparer releases every reply as soon as both produced it and asks for no
checkpoint: only the backstop timer takes them. Every reply is correct.

noisy answers TIME, RANDOM and GET from the host clock and host randomness: every such answer differs between the
VMs, so each one costs a checkpoint with trigger "mismatch", and deterministic requests (PING, ECHO, SET) cost
none. Whatever the comparer does, a client only ever sees an answer one VM produced for its request: a clock
reading taken while the request was in flight, hex digits of the right length.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Callable

import pytest

from colo_e2e.helpers import Resp, redis_cli
from colo_hybrid.cluster import HybridRun, Noisy

REDIS_BENCHMARK = shutil.which("redis-benchmark")
RPS = re.compile(r"^\s*([A-Z_]+): ([\d.]+) requests per second", re.MULTILINE)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(REDIS_BENCHMARK is None or shutil.which("redis-cli") is None,
                    reason="needs redis-cli and redis-benchmark (Debian redis-tools)")
def test_kvstore_needs_no_checkpoint_but_the_backstop(hybrid: Callable[..., HybridRun]) -> None:
    run = hybrid("kvstore", backstop_ms=1000, state_logs=False)
    run.start()
    host, port = run.service
    bench = subprocess.run([str(REDIS_BENCHMARK), "-h", host, "-p", str(port), "-q", "-c", "4", "-n", "3000",
                            "-t", "set,get,incr"], capture_output=True, timeout=120)
    out = bench.stdout.decode(errors="replace").replace("\r", "\n")
    assert bench.returncode == 0, f"redis-benchmark: exit {bench.returncode}\n{out}\n{bench.stderr!r}"
    assert set(dict(RPS.findall(out))) == {"SET", "GET", "INCR"}, out

    # Every reply is the right one, on one connection and through redis-cli.
    r = Resp(run.service)
    try:
        for i in range(150):
            assert r.call("SET", f"k{i}", f"value-{i}") == "OK"
            assert r.call("INCR", "hybrid:ctr") == i + 1
            assert r.call("GET", f"k{i}") == f"value-{i}".encode()
        assert r.call("EXISTS", "k0", "k149", "nope") == 2
        assert r.call("DEL", "k0", "nope") == 1
        assert r.call("GET", "k0") is None
        bench_value = r.call("GET", "key:__rand_int__")  # redis-benchmark's SET (-d 3: 3 bytes)
        assert isinstance(bench_value, bytes) and len(bench_value) == 3, bench_value
        assert r.call("PING") == "PONG"
        for args, want in ((("SET", "cli:key", "cli-value"), "OK"), (("GET", "cli:key"), "cli-value"),
                           (("INCR", "hybrid:ctr"), "151"), (("PING",), "PONG")):
            assert redis_cli(run.service, *args) == (0, want), args
        dbsize = r.call("DBSIZE")
        assert r.call("INCR", "hybrid:ctr") == 152
        assert r.call("DBSIZE") == dbsize
        assert r.pending_bytes(0.2) == b""
    finally:
        r.close()

    st = run.settled_status()
    triggers = st["nodes"]["primary"]["triggers"]
    assert triggers.get("mismatch", 0) == 0, f"the deterministic kvstore caused mismatch checkpoints: {triggers}"
    # Unmatched for 200 ms can happen when the secondary is starved of CPU, but must stay rare.
    assert triggers.get("timeout", 0) <= 3, f"kvstore caused timeout checkpoints: {triggers}"
    assert set(triggers) <= {"timer", "timeout"}, triggers
    assert st["gateway"]["compare_held_bytes"] == 0, st["gateway"]
    assert st["gateway"]["mode"] == "hybrid"
    asked = [e for e in st["events"] if e["event"] == "checkpoint-asked"]
    assert len(asked) <= 3, asked


def test_noisy_checkpoints_on_every_differing_answer(hybrid: Callable[..., HybridRun]) -> None:
    run = hybrid("noisy", backstop_ms=60_000, state_logs=False)  # no backstop checkpoint during the test
    run.start()
    c = Noisy(run.service)
    differing = 0
    try:
        seen_random: set[bytes] = set()
        for i in range(8):
            c.time()
            r = c.random(16)
            assert r not in seen_random, "RANDOM repeated itself"
            seen_random.add(r)
            c.get(f"key{i}")
            differing += 3
            # deterministic requests in between: no checkpoint for them
            c.ping()
            c.echo(f"round {i}")
            assert c.r.call("SET", "k", "v") == "OK"
            assert c.r.call("DBSIZE") == 0
        c.random(0)  # an empty bulk string: the same on both VMs
        big = c.random(5000)  # 10000 hex digits: the comparer releases the common prefix, then the rest
        assert len(big) == 10000
        differing += 1
        c.nothing_pending()
    finally:
        c.close()

    counts = run.trigger_counts()
    asked = counts["mismatch"] + counts["timeout"]
    assert counts["mismatch"] >= differing * 0.8, f"{differing} differing answers, checkpoints {counts}"
    assert differing <= asked <= differing + 2, f"{differing} differing answers, checkpoints {counts}"
    assert counts["timer"] <= 1, counts  # at most the first one, taken when protection starts
    st = run.settled_status()
    assert st["nodes"]["primary"]["triggers"].get("mismatch") == counts["mismatch"], st["nodes"]["primary"]
    reasons = [e["reason"] for e in st["events"] if e["event"] == "checkpoint-asked" and e["trigger"] == "mismatch"]
    assert reasons and all("differs" in why for why in reasons), reasons


def test_noisy_concurrent_clients_only_see_answers_a_vm_gave(hybrid: Callable[..., HybridRun]) -> None:
    """Several connections at once: the comparer matches, releases and checkpoints per connection; every client
    still sees exactly one well-formed answer per request, from the clock while its request was in flight."""
    run = hybrid("noisy", backstop_ms=500, state_logs=False)
    run.start()
    errors: list[str] = []
    done = [0] * 4

    def client(i: int) -> None:
        try:
            c = Noisy(run.service, timeout=20.0)
            try:
                last = 0
                for n in range(12):
                    c.echo(f"c{i}-{n}")
                    t = c.time()
                    assert t > last, f"TIME went backwards on one connection: {t} after {last}"
                    last = t
                    c.random(3 + i)
                    c.get(f"c{i}")
                    done[i] += 1
                c.nothing_pending()
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001 - reported below with the client's number
            errors.append(f"client {i} after {done[i]} rounds: {e!r}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), f"clients hung: rounds done {done}\n{run.stderr()[-2000:]}"
    assert not errors, errors
    counts = run.trigger_counts()
    assert counts["mismatch"] >= 5, counts
    st = run.status()
    assert st["gateway"]["compare_held_bytes"] == 0, st["gateway"]
    assert run.alive("primary") and run.alive("secondary"), run.stderr()[-2000:]
