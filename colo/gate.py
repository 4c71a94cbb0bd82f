"""Step mode and slow motion, for teaching: a node holds each checkpoint-handshake message before it sends it.

The gate sits in the send path of every link of a node (`colo.link.Conn.send` calls it, in the sending thread:
the VM thread, which runs the checkpoint). It holds only the handshake (`GATED`): the seven checkpoint messages
after the copy, the state's chunks and the primary's commit; heartbeats, input and output pass. The gateway
relays what the view asks (`step-command` on the control link, `step` on each node's gateway link); the node's
I/O thread applies it (`update`), while the VM thread may be waiting here.

- slow motion: each held message waits `delay_ms` first;
- step mode: each held message waits for a grant; the gateway grants one message to one node per Step.

While either is on, nothing is judged by how long it waited: the node's I/O thread does not call a link silent,
the checkpoint code does not time out waiting for its peer (`holding`), and the witness stops counting silence.
A held message is let go when the link closes (its peer died: the sender learns it at once, as it would have
without the gate), when the mode is turned off, or when the node stops.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from colo.events import STREAM
from colo.messages import Message, field_names

GATED = frozenset({"checkpoint-request", "checkpoint-reply", "vmstate-send", "vmstate-chunk", "vmstate-size",
                   "vmstate-received", "vmstate-loaded", "commit"})
MAX_DELAY_MS = 10_000


class Gate:
    def __init__(self) -> None:
        self.stepping = False
        self.delay = 0.0  # seconds
        self.grants = 0
        self.waiting: str | None = None  # the message held now (for the status)
        self._cond = threading.Condition()
        self._stopped = False

    @property
    def holding(self) -> bool:
        """Step mode or slow motion is on: liveness timeouts are suspended."""
        return self.stepping or self.delay > 0

    def update(self, on: bool, delay_ms: int, grant: int) -> None:
        """From the node's I/O thread: the mode the gateway relays, and `grant` more messages may go."""
        with self._cond:
            self.stepping = on
            self.delay = min(max(delay_ms, 0), MAX_DELAY_MS) / 1e3
            self.grants = self.grants + grant if on else 0
            self._cond.notify_all()

    def release_all(self) -> None:
        """The node stops (a signal, a fence, a shutdown): nothing may wait any more."""
        with self._cond:
            self._stopped = True
            self.stepping, self.delay, self.grants = False, 0.0, 0
            self._cond.notify_all()

    def __call__(self, conn: Any, msg: Message) -> None:
        if not (self.stepping or self.delay) or msg.NAME not in GATED or self._stopped:
            return
        epoch = getattr(msg, "epoch", None)
        if self.delay:
            deadline = time.monotonic() + self.delay
            with self._cond:
                while conn.open and not self._stopped and self.delay and time.monotonic() < deadline:
                    self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        if not self.stepping:
            return
        fields = {name: _plain(getattr(msg, name)) for name in field_names(type(msg)) if name != "data"}
        if STREAM.active:
            STREAM.emit("gate", state="waiting", msg=msg.NAME, epoch=epoch, to=conn.peer_role, fields=fields)
        with self._cond:
            self.waiting = msg.NAME
            while self.stepping and self.grants == 0 and conn.open and not self._stopped:
                self._cond.wait(0.05)
            if self.stepping and self.grants > 0:
                self.grants -= 1
            self.waiting = None
        if STREAM.active:
            STREAM.emit("gate", state="released", msg=msg.NAME, epoch=epoch, to=conn.peer_role)


def _plain(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v
