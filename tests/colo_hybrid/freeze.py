"""Run a colo role (`python freeze.py ROLE ARGS...`, as `python -m colo ROLE ARGS...`) whose COLO_FAULT phase
freezes the process with SIGSTOP instead of killing it: a hung host rather than a crashed one. Its connections
stay open, so its peers only notice it by its silence (the heartbeat timeout), and in the meantime the other node
goes on with whatever it had. Test-only: colo.faults itself always SIGKILLs."""
from __future__ import annotations

import os
import signal
import sys

from colo import faults


def _freeze(self: faults.FaultPlan, phase: str, epoch: int) -> None:
    if self.phase == phase and epoch >= self.epoch:
        os.kill(os.getpid(), signal.SIGSTOP)  # stops every thread of the process, heartbeats included


faults.FaultPlan.reach = _freeze  # type: ignore[method-assign]

if __name__ == "__main__":
    from colo.cli import main
    sys.exit(main(sys.argv[1:]))
