"""A role started by `colo up` (or any LocalCluster) ends when its starter ends, however that ends.

Two mechanisms, because either alone has a gap:
- the lifeline: a pipe whose write end only the starter holds; the role reads the other end (`--lifeline FD`)
  and sees EOF the moment the starter is gone, SIGKILL included. It then stops the way SIGTERM stops it (the
  role's own clean path), and if that has not ended the process within GRACE seconds, ends it hard.
- PR_SET_PDEATHSIG (Linux): the kernel sends SIGTERM when the starter dies; a backstop for a role whose watcher
  thread cannot run (a wedged interpreter). The kernel ties it to the starting *thread*: start roles from a
  thread that lives as long as the cluster (LocalCluster spawns from its caller's thread).
The roles run in their own sessions (start_new_session: Ctrl-C in a terminal reaches only the starter), so
neither the terminal nor the process group can do this for them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("colo.lifeline")
GRACE = 10.0  # seconds a role may take to stop cleanly once its starter is gone
PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 1


class Lifeline:
    """The starter's end: a pipe whose read end every role it starts gets (`args`, `pass_fds`) and whose write end
    only the starter holds. Both ends are close-on-exec, so nothing else the starter runs keeps the roles alive."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = os.pipe()

    @property
    def open(self) -> bool:
        return self._fds is not None

    def args(self) -> list[str]:
        """The role's command-line options (none once closed: a role started then is not tied to anything)."""
        return ["--lifeline", str(self._fds[0])] if self._fds is not None else []

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """For subprocess.Popen: the one descriptor the role inherits."""
        return (self._fds[0],) if self._fds is not None else ()

    def close(self) -> None:
        """Let go of the roles: any still running stops on its own now. Idempotent."""
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send us `sig` when our parent dies (Linux only; False elsewhere or on failure)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def watch(fd: int, role: str) -> threading.Thread:
    """Stop this process when the lifeline `fd` reaches EOF. A starter that died before this call closed the
    lifeline already, so the first read sees EOF: no window is left open."""
    set_parent_death_signal()
    t = threading.Thread(target=_wait, args=(fd, role), name="lifeline", daemon=True)
    t.start()
    return t


def _wait(fd: int, role: str) -> None:
    try:
        while os.read(fd, 4096):
            pass  # nobody writes; bytes would mean nothing
    except OSError:
        pass
    log.warning("%s: the process that started us is gone (the lifeline closed): stopping", role)
    os.kill(os.getpid(), signal.SIGTERM)  # the role's own handler: the same clean stop as `kill PID`
    time.sleep(GRACE)
    log.error("%s: still running %.0f s after the lifeline closed: exiting now", role, GRACE)
    os._exit(EXIT_ORPHANED)
