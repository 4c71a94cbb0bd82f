"""The kvstore guest against the real Redis tools: redis-cli and redis-benchmark talk to a guest program in the
emulated machine through `toyvm run --net-listen`, with every reply checked.

One VM per hook mode serves the whole module (started once, stopped with SIGTERM at the end, which must end it
cleanly), so every test works in its own key namespace and measures DBSIZE as a difference.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HOOK_MODES, ROOT, guest

REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(REDIS_CLI is None or REDIS_BENCHMARK is None,
                       reason="needs redis-cli and redis-benchmark (Debian redis-tools; scripts/need-redis-tools)"),
]

HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # until the VM prints its listening address
STOP_TIMEOUT = 15.0  # SIGTERM to exit
CMD_TIMEOUT = 15.0  # one redis-cli run
BENCH_TIMEOUT = 40.0  # one redis-benchmark run
SOCK_TIMEOUT = 10.0  # any single socket wait
LISTENING = re.compile(rb"toyvm: listening on (\S+):(\d+)")


# ---------------------------------------------------------------------------------------------------------------
# The VM under test
# ---------------------------------------------------------------------------------------------------------------

class KvServer:
    """`python -m toyvm run guests/kvstore.bin --net-listen 127.0.0.1:0` as a subprocess."""

    def __init__(self, image: Path, hooks: str, workdir: Path) -> None:
        self.hooks = hooks
        self.serial_path = workdir / f"serial-{hooks}.out"
        env = dict(os.environ, TOYVM_HOOKS=hooks)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._serial = open(self.serial_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toyvm", "run", str(image), "--net-listen", f"{HOST}:0"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._serial, stderr=subprocess.PIPE)
        self._stderr: list[bytes] = []
        self._ports: queue.Queue[int | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stderr, name=f"toyvm-stderr-{hooks}", daemon=True)
        self._reader.start()
        try:
            port = self._ports.get(timeout=START_TIMEOUT)
        except queue.Empty:
            port = None
        if port is None:
            self._kill()
            pytest.fail(f"toyvm ({hooks} hooks) did not report its listening address within {START_TIMEOUT:.0f} s;"
                        f" exit {self.proc.returncode}; stderr:\n{self.stderr}")
        self.port: int = port

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        announced = False
        for line in self.proc.stderr:  # keeps draining to EOF, so the VM never blocks on a full pipe
            self._stderr.append(line)
            m = LISTENING.search(line)
            if m and not announced:
                announced = True
                self._ports.put(int(m.group(2)))
        if not announced:
            self._ports.put(None)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    @property
    def serial(self) -> str:
        if not self._serial.closed:
            self._serial.flush()
        return self.serial_path.read_bytes().decode(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"the VM died (exit {self.proc.returncode}); stderr:\n{self.stderr}")

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._reader.join(timeout=STOP_TIMEOUT)
        self._serial.close()

    def stop(self) -> int:
        """SIGTERM; returns the exit status. Kills the VM (and fails) if it does not stop in time."""
        if self.proc.poll() is not None:
            self._kill()
            pytest.fail(f"the VM was already gone (exit {self.proc.returncode}); stderr:\n{self.stderr}")
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail(f"the VM ignored SIGTERM for {STOP_TIMEOUT:.0f} s and was killed; stderr:\n{self.stderr}")
        self._reader.join(timeout=STOP_TIMEOUT)
        self._serial.close()
        return rc


@pytest.fixture(scope="module", params=HOOK_MODES)
def kv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvServer]:
    hooks = str(request.param)
    if hooks == "native":
        from toyvm import native
        if native.load() is None:
            pytest.skip(f"native hooks unavailable: {native.error()}")
    server = KvServer(guest("kvstore"), hooks, tmp_path_factory.mktemp(f"kvstore-{hooks}"))
    yield server
    rc = server.stop()
    err = server.stderr
    assert rc == 128 + signal.SIGTERM, f"exit {rc} after SIGTERM; stderr:\n{err}"
    assert f"toyvm: stopped by signal {int(signal.SIGTERM)}" in err, err
    assert "Traceback" not in err and "VM fault" not in err, err
    assert "kvstore: ready" in server.serial, server.serial


@pytest.fixture
def port(kv: KvServer) -> Iterator[int]:
    kv.check_alive()
    yield kv.port
    kv.check_alive()


@pytest.fixture
def ns() -> str:
    """A key prefix no other test (or earlier run against the same VM) uses."""
    return f"t{uuid.uuid4().hex[:10]}:"


# ---------------------------------------------------------------------------------------------------------------
# Clients: redis-cli, and a small RESP2 client over a plain socket
# ---------------------------------------------------------------------------------------------------------------

def cli_raw(port: int, *args: str, stdin: Path | None = None, timeout: float = CMD_TIMEOUT) -> bytes:
    """redis-cli's stdout; `stdin` is a file fed to it (as `redis-cli ... < file`)."""
    with open(stdin if stdin is not None else os.devnull, "rb") as f:
        p = subprocess.run([REDIS_CLI, "-h", HOST, "-p", str(port), *args], stdin=f,  # type: ignore[list-item]
                           capture_output=True, timeout=timeout)
    assert p.returncode == 0, f"redis-cli {args}: exit {p.returncode}\n{p.stdout!r}\n{p.stderr!r}"
    return p.stdout


def cli(port: int, *args: str) -> str:
    """One command through redis-cli; its reply as redis-cli prints it (raw mode, since stdout is not a tty)."""
    return cli_raw(port, *args).decode().rstrip("\n")


def encode(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class ErrorReply(str):
    pass


class Resp:
    """A blocking RESP2 connection with a bounded wait on every read."""

    def __init__(self, port: int, timeout: float = SOCK_TIMEOUT) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return ErrorReply(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.recv_exact(n + 2)
            assert data[-2:] == b"\r\n", data[-10:]
            return data[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise AssertionError(f"not a RESP2 reply: {line!r}")

    def call(self, *args: str | bytes) -> Any:
        self.sock.sendall(encode(*args))
        return self.reply()

    def assert_silent(self, seconds: float = 0.3) -> None:
        """Nothing arrives for `seconds` (the server is still waiting for the rest of a request)."""
        assert not self.buf, bytes(self.buf)
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(SOCK_TIMEOUT)
        raise AssertionError(f"a reply came before the request was complete: {data!r}")


def bulk(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return b"$%d\r\n%s\r\n" % (len(b), b)


# ---------------------------------------------------------------------------------------------------------------
# redis-cli: the commands, one at a time
# ---------------------------------------------------------------------------------------------------------------

def test_ping(port: int) -> None:
    assert cli(port, "PING") == "PONG"
    assert cli(port, "PING", "hello world") == "hello world"
    assert cli(port, "ping") == "PONG"  # command names ignore case
    assert cli(port, "ECHO", "echoed back") == "echoed back"  # redis-cli --pipe relies on it


def test_set_get(port: int, ns: str) -> None:
    assert cli(port, "SET", ns + "k", "v") == "OK"
    assert cli(port, "GET", ns + "k") == "v"
    assert cli(port, "SET", ns + "k", "second value") == "OK"  # overwrite
    assert cli(port, "GET", ns + "k") == "second value"
    assert cli(port, "set", ns + "k", "") == "OK"  # empty value: exists, and is empty
    assert cli_raw(port, "GET", ns + "k") == b"\n"
    assert cli(port, "EXISTS", ns + "k") == "1"
    assert cli(port, "GET", ns + "missing") == ""  # nil prints as an empty line in raw mode
    with Resp(port) as r:
        assert r.call("GET", ns + "k") == b""
        assert r.call("GET", ns + "missing") is None


def test_incr(port: int, ns: str) -> None:
    for i in range(1, 26):
        assert cli(port, "INCR", ns + "counter") == str(i)
    assert cli(port, "GET", ns + "counter") == "25"
    assert cli(port, "SET", ns + "neg", "-3") == "OK"
    assert [cli(port, "INCR", ns + "neg") for _ in range(5)] == ["-2", "-1", "0", "1", "2"]
    assert cli(port, "SET", ns + "big", str(2**63 - 2)) == "OK"
    assert cli(port, "INCR", ns + "big") == str(2**63 - 1)
    assert cli(port, "INCR", ns + "big") == "ERR increment or decrement would overflow"
    assert cli(port, "GET", ns + "big") == str(2**63 - 1)  # unchanged by the failed INCR


def test_del_and_exists_count(port: int, ns: str) -> None:
    a, b, c = ns + "a", ns + "b", ns + "c"
    assert cli(port, "SET", a, "1") == "OK"
    assert cli(port, "SET", b, "2") == "OK"
    assert cli(port, "EXISTS", a, b, c) == "2"
    assert cli(port, "EXISTS", a, a, a) == "3"  # as Redis: every named key counts, repeats too
    assert cli(port, "EXISTS", c) == "0"
    assert cli(port, "DEL", a, c) == "1"
    assert cli(port, "DEL", a, b, c) == "1"
    assert cli(port, "DEL", a, b, c) == "0"
    assert cli(port, "EXISTS", a, b, c) == "0"
    assert cli(port, "GET", a) == ""


def test_dbsize_counts_keys(port: int, ns: str) -> None:
    before = int(cli(port, "DBSIZE"))
    keys = [f"{ns}key{i}" for i in range(7)]
    for k in keys:
        assert cli(port, "SET", k, "x") == "OK"
    assert int(cli(port, "DBSIZE")) == before + 7
    assert cli(port, "SET", keys[0], "overwritten") == "OK"  # overwriting adds no key
    assert cli(port, "INCR", ns + "ctr") == "1"  # INCR creates one
    assert int(cli(port, "DBSIZE")) == before + 8
    assert cli(port, "DEL", *keys, ns + "ctr") == "8"
    assert int(cli(port, "DBSIZE")) == before


def test_binary_safe_value(port: int, ns: str, tmp_path: Path) -> None:
    value = bytes(range(256)) * 4 + b"\r\n*3\r\n$3\r\nSET\r\n\x00\r\n-ERR\r\n"  # looks like RESP, is a value
    f = tmp_path / "value.bin"
    f.write_bytes(value)
    assert cli_raw(port, "-x", "SET", ns + "bin", stdin=f) == b"OK\n"
    assert cli_raw(port, "GET", ns + "bin") == value + b"\n"  # raw mode: the bytes, then a newline
    key = ns.encode() + b"key\x00with\r\nbinary\xff"  # keys are binary-safe too
    with Resp(port) as r:
        assert r.call("GET", ns + "bin") == value
        assert r.call("SET", key, b"\x00") == "OK"
        assert r.call("GET", key) == b"\x00"
        assert r.call("EXISTS", key, key[:-1]) == 1


def test_large_value_via_redis_cli(port: int, ns: str, tmp_path: Path) -> None:
    value = os.urandom(100 * 1024)
    f = tmp_path / "big.bin"
    f.write_bytes(value)
    assert cli_raw(port, "-x", "SET", ns + "big", stdin=f) == b"OK\n"
    assert cli_raw(port, "GET", ns + "big") == value + b"\n"
    with Resp(port) as r:
        r.sock.sendall(encode("GET", ns + "big"))
        assert r.recv_exact(len(bulk(value))) == bulk(value)


@pytest.mark.parametrize("size", [65535, 65536, 65537, 300_000, 512 * 1024])
def test_value_sizes_around_buffer_limits(port: int, ns: str, size: int) -> None:
    """Around the guest's 64 KiB receive buffer and one SEND, up to its 512 KiB largest value."""
    value = os.urandom(size)
    with Resp(port) as r:
        assert r.call("SET", ns + "v", value) == "OK"
        assert r.call("GET", ns + "v") == value
        assert r.call("DEL", ns + "v") == 1


def test_value_over_the_limit_is_a_protocol_error(port: int) -> None:
    with Resp(port) as r:
        r.sock.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (512 * 1024 + 1))
        assert r.reply() == "ERR Protocol error: invalid bulk length"
        assert r.sock.recv(1) == b""  # then the server hangs up, as Redis does
    assert cli(port, "PING") == "PONG"  # and goes on serving everyone else


@pytest.mark.parametrize("args,name", [
    (["GET"], "get"), (["GET", "a", "b"], "get"), (["SET", "k"], "set"), (["SET", "k", "v", "x"], "set"),
    (["INCR"], "incr"), (["INCR", "a", "b"], "incr"), (["DEL"], "del"), (["EXISTS"], "exists"),
    (["DBSIZE", "x"], "dbsize"), (["PING", "a", "b"], "ping"), (["ECHO"], "echo"), (["gEt"], "get"),
])
def test_wrong_arity_is_an_error(port: int, args: list[str], name: str) -> None:
    assert cli(port, *args) == f"ERR wrong number of arguments for '{name}' command"


def test_incr_on_non_integer_is_an_error(port: int, ns: str) -> None:
    for text in ("abc", "1.5", " 1", "007", "", "99999999999999999999", "-"):
        assert cli(port, "SET", ns + "s", text) == "OK"
        assert cli(port, "INCR", ns + "s") == "ERR value is not an integer or out of range", text
        assert cli_raw(port, "GET", ns + "s") == text.encode() + b"\n"  # the value is untouched


def test_unknown_command_is_an_error(port: int) -> None:
    reply = cli(port, "NOSUCHCOMMAND", "arg")
    assert reply.startswith("ERR unknown command 'NOSUCHCOMMAND'"), reply
    with Resp(port) as r:
        reply = r.call("FLUSHALL")
        assert isinstance(reply, ErrorReply) and reply.startswith("ERR unknown command"), reply
        assert r.call("PING") == "PONG"  # the connection stays usable


# ---------------------------------------------------------------------------------------------------------------
# Pipelining and request framing
# ---------------------------------------------------------------------------------------------------------------

def test_redis_cli_pipe_mode(port: int, ns: str) -> None:
    n = 3000
    payload = b"".join(encode("SET", f"{ns}p{i}", f"value-{i}-{'x' * (i % 50)}") for i in range(n))
    # redis-cli --pipe ends the stream with an ECHO of a random marker and waits until that marker comes back.
    p = subprocess.run([REDIS_CLI, "-h", HOST, "-p", str(port), "--pipe", "--pipe-timeout", "10"],  # type: ignore[list-item]
                       input=payload,
                       capture_output=True, timeout=CMD_TIMEOUT + 10)
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, out + err
    assert f"errors: 0, replies: {n}" in out, out + err
    assert "Last reply received from server." in out, out
    with Resp(port) as r:
        for i in [0, 1, 2, 999, 1500, n - 2, n - 1, *range(100, n, 97)]:
            assert r.call("GET", f"{ns}p{i}") == f"value-{i}-{'x' * (i % 50)}".encode(), i
        assert r.call("EXISTS", *[f"{ns}p{i}" for i in range(0, n, 10)]) == n // 10


def test_hundred_pipelined_commands_in_one_send(port: int, ns: str) -> None:
    cmds: list[bytes] = []
    want: list[bytes] = []

    def add(req: bytes, reply: bytes) -> None:
        cmds.append(req)
        want.append(reply)

    for i in range(25):
        add(encode("SET", f"{ns}k{i}", f"v{i}" * (i + 1)), b"+OK\r\n")
    for i in range(25):
        add(encode("GET", f"{ns}k{i}"), bulk(f"v{i}" * (i + 1)))
    for i in range(1, 21):
        add(encode("INCR", ns + "ctr"), b":%d\r\n" % i)
    for i in range(10):
        add(encode("EXISTS", f"{ns}k{i}", ns + "missing", f"{ns}k{i}"), b":2\r\n")
    add(encode("GET", ns + "missing"), b"$-1\r\n")
    add(encode("PING"), b"+PONG\r\n")
    add(encode("PING", "pipelined"), bulk("pipelined"))
    add(encode("INCR", ns + "k0"), b"-ERR value is not an integer or out of range\r\n")
    add(encode("GET"), b"-ERR wrong number of arguments for 'get' command\r\n")
    add(encode("NOPE"), b"-ERR unknown command 'NOPE'\r\n")
    add(f"SET {ns}inline hello\r\n".encode(), b"+OK\r\n")  # an inline command amid multibulk ones
    add(f"GET {ns}inline\r\n".encode(), bulk("hello"))
    add(encode("DEL", f"{ns}k0", f"{ns}k1", ns + "missing"), b":2\r\n")
    add(encode("EXISTS", f"{ns}k0", f"{ns}k1", f"{ns}k2"), b":1\r\n")
    for i in range(2, 12):
        add(encode("DEL", f"{ns}k{i}"), b":1\r\n")
    assert len(cmds) == 100
    expected = b"".join(want)
    with Resp(port) as r:
        r.sock.sendall(b"".join(cmds))
        assert r.recv_exact(len(expected)) == expected
        assert r.call("PING") == "PONG"  # nothing extra was queued before this reply


def test_request_sent_byte_by_byte(port: int, ns: str) -> None:
    value = b"a\r\nb\x00*1\r\n$4\r\n"
    request = (encode("SET", ns + "bb", value) + encode("GET", ns + "bb") + b"PING\r\n"
               + encode("INCR", ns + "n") + encode("INCR", ns + "n") + f"EXISTS {ns}bb {ns}nope\r\n".encode())
    expected = b"+OK\r\n" + bulk(value) + b"+PONG\r\n:1\r\n:2\r\n:1\r\n"
    first = len(encode("SET", ns + "bb", value))
    with Resp(port) as r:
        for i in range(len(request)):
            r.sock.sendall(request[i:i + 1])
            time.sleep(0.002)  # give the bridge time to hand every byte to the guest as its own event
            if i == first - 2:
                r.assert_silent()  # one byte short of the first command: no reply yet
        assert r.recv_exact(len(expected)) == expected


def test_request_split_at_every_position(port: int, ns: str) -> None:
    request = encode("SET", ns + "split", "some value") + encode("GET", ns + "split")
    expected = b"+OK\r\n" + bulk("some value")
    with Resp(port) as r:
        for cut in range(1, len(request)):
            r.sock.sendall(request[:cut])
            time.sleep(0.003)
            r.sock.sendall(request[cut:])
            assert r.recv_exact(len(expected)) == expected, cut


def test_half_closed_client_gets_every_reply(port: int, ns: str) -> None:
    n = 20000
    payload = b"".join(encode("SET", f"{ns}h{i}", "x") for i in range(n))
    got = bytearray()
    with Resp(port) as r:
        def read_all() -> None:
            try:
                while chunk := r.sock.recv(1 << 16):
                    got.extend(chunk)
            except OSError:
                pass

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        r.sock.sendall(payload)
        r.sock.shutdown(socket.SHUT_WR)  # "that is all I will send": Redis answers everything, then closes
        reader.join(timeout=30)
        assert not reader.is_alive(), "the connection was not closed after the replies"
    assert cli(port, "EXISTS", f"{ns}h0", f"{ns}h{n - 1}") == "2"  # every command ran...
    assert got.count(b"+OK\r\n") == n  # ...and every reply should arrive before the close


def test_many_connections_at_once(port: int, ns: str) -> None:
    conns = [Resp(port) for _ in range(200)]
    try:
        for i, c in enumerate(conns):
            c.sock.sendall(encode("SET", f"{ns}c{i}", str(i)))
        for c in conns:
            assert c.reply() == "OK"
        for i, c in enumerate(reversed(conns)):
            assert c.call("GET", f"{ns}c{len(conns) - 1 - i}") == str(len(conns) - 1 - i).encode()
    finally:
        for c in conns:
            c.sock.close()
    assert cli(port, "EXISTS", *[f"{ns}c{i}" for i in range(200)]) == "200"


# ---------------------------------------------------------------------------------------------------------------
# Concurrency: correctness under 50 clients, and redis-benchmark
# ---------------------------------------------------------------------------------------------------------------

def test_fifty_concurrent_clients_are_consistent(port: int, ns: str) -> None:
    clients, rounds = 50, 40
    barrier = threading.Barrier(clients, timeout=SOCK_TIMEOUT)
    errors: list[str] = []

    def worker(w: int) -> None:
        try:
            with Resp(port) as r:
                barrier.wait()
                for j in range(rounds):
                    got = r.call("INCR", ns + "shared")
                    if not isinstance(got, int) or not 1 <= got <= clients * rounds:
                        errors.append(f"client {w}: INCR answered {got!r}")
                    mine = f"client-{w}-round-{j}".encode()
                    if (got := r.call("SET", f"{ns}own{w}", mine)) != "OK":
                        errors.append(f"client {w}: SET answered {got!r}")
                    if (got := r.call("GET", f"{ns}own{w}")) != mine:
                        errors.append(f"client {w}: GET answered {got!r}, wanted {mine!r}")
        except Exception as e:  # noqa: BLE001 - reported below, with the client's number
            errors.append(f"client {w}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 45
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "some clients did not finish in time"
    assert errors == [], errors[:10]
    assert cli(port, "GET", ns + "shared") == str(clients * rounds)
    with Resp(port) as r:
        for w in range(clients):
            assert r.call("GET", f"{ns}own{w}") == f"client-{w}-round-{rounds - 1}".encode()


RPS = re.compile(r"^\s*([A-Z_]+): ([\d.]+) requests per second", re.MULTILINE)


def benchmark(port: int, *args: str) -> dict[str, float]:
    p = subprocess.run([REDIS_BENCHMARK, "-h", HOST, "-p", str(port), "-q", *args], capture_output=True,  # type: ignore[list-item]
                       timeout=BENCH_TIMEOUT)
    out = p.stdout.decode(errors="replace").replace("\r", "\n")  # -q redraws a progress line with \r
    assert p.returncode == 0, f"redis-benchmark {args}: exit {p.returncode}\n{out}\n{p.stderr!r}"
    return {name: float(rps) for name, rps in RPS.findall(out)}


def test_redis_benchmark_fifty_clients(port: int) -> None:
    rps = benchmark(port, "-c", "50", "-n", "5000", "-t", "set,get,incr")
    assert set(rps) == {"SET", "GET", "INCR"}, rps
    assert all(v > 0 for v in rps.values()), rps
    assert cli(port, "PING") == "PONG"  # still serving afterwards


def test_redis_benchmark_pipelined(port: int) -> None:
    rps = benchmark(port, "-c", "20", "-n", "20000", "-P", "16", "-t", "set,get,incr")
    assert set(rps) == {"SET", "GET", "INCR"}, rps
    assert all(v > 0 for v in rps.values()), rps
    assert cli(port, "PING") == "PONG"
