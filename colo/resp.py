"""A small Redis (RESP2) client: what `colo demo` and the tests use to talk to the key-value guest.

One persistent TCP connection; commands go out as arrays of bulk strings; replies are parsed in order:
a simple string as str ("OK", "PONG"), a bulk string as bytes (None when nil), an integer as int, an array as a
list; an error reply raises `RespError` (the connection stays usable). Every read is bounded by the socket
timeout, so a silent server makes the caller fail (an OSError), never hang.
"""
from __future__ import annotations

import socket
from typing import Any

Arg = str | bytes | int


class RespError(Exception):
    """The server answered with an error reply (-ERR ...)."""


class Resp:
    def __init__(self, address: tuple[str, int], timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()

    @staticmethod
    def encode(*args: Arg) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(parts)

    def send(self, *commands: bytes) -> None:
        """Encoded commands (`encode`), sent at once: the replies come back in order (a pipeline)."""
        self.sock.sendall(b"".join(commands))

    def call(self, *args: Arg) -> Any:
        self.sock.sendall(self.encode(*args))
        return self.read_reply()

    def pipeline(self, commands: list[tuple[Arg, ...]], batch: int = 200) -> list[Any]:
        """Many requests, their replies in order (error replies are returned, not raised): one round trip per
        `batch`, which matters when every reply waits for a checkpoint to commit it."""
        replies: list[Any] = []
        for lo in range(0, len(commands), batch):
            part = commands[lo:lo + batch]
            self.sock.sendall(b"".join(self.encode(*c) for c in part))
            for _ in part:
                try:
                    replies.append(self.read_reply())
                except RespError as e:
                    replies.append(e)
        return replies

    def read_reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read_reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line[:40]!r}")

    reply = read_reply

    def pending_bytes(self, wait: float = 0.3) -> bytes:
        """Whatever arrives within `wait` seconds without a request (normally nothing: no reply twice)."""
        extra = bytes(self.buf)
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                extra += data
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(self.timeout)
        return extra

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)  # raises socket.timeout (an OSError) after `timeout`
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line
