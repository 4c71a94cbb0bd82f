"""Run a colo role (`python freeze.py ROLE ARGS...`, as `python -m colo ROLE ARGS...`) whose COLO_FAULT phase
freezes the process with SIGSTOP instead of killing it: a hung host rather than a crashed one. Its connections
stay open, so its peers only notice it by its silence (the heartbeat timeout), and in the meantime the other node
goes on with whatever it had. Test-only: colo.faults itself always SIGKILLs."""
from __future__ import annotations

import signal
import sys
import threading

from colo import faults


def _freeze(self: faults.FaultPlan, phase: str, epoch: int) -> None:
    if self.phase == phase and epoch >= self.epoch:
        # Stops every thread of the process, heartbeats included. Sent to the calling thread itself: a phase may be
        # reached in a thread other than the main one (the checkpoint sender, the I/O thread), and with a signal to
        # the process the kernel may pick another thread to start the stop, letting this one finish its next
        # system call (a frame sent past the phase) before it stops.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


faults.FaultPlan.reach = _freeze  # type: ignore[method-assign]

if __name__ == "__main__":
    from colo.cli import main
    sys.exit(main(sys.argv[1:]))
