"""Test-only fault injection: a process kills itself with SIGKILL when it reaches a named phase.

Set COLO_FAULT=PHASE or PHASE@EPOCH (the phase at that epoch or later), e.g. `after-size@3`. The phases
a side passes are listed in PRIMARY_PHASES and SECONDARY_PHASES. Nothing happens when the variable is unset.
"""
from __future__ import annotations

import os
import signal

PRIMARY_PHASES = ("before-request", "after-request", "after-reply", "mid-send", "after-size", "after-received",
                  "after-commit", "after-loaded")
# mid-copy (epoch: the copy's): the primary, once the first part of a live copy went out (halfway through a
# stop-and-copy); the secondary, once the first part of a copy came in
COPY_PHASES = ("mid-copy",)
SECONDARY_PHASES = ("after-request", "after-reply", "mid-receive", "after-size", "after-received",
                    "after-loaded")
ENV = "COLO_FAULT"


class FaultPlan:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        phase, _, epoch = spec.partition("@")
        self.phase = phase.strip()
        self.epoch = int(epoch) if epoch.strip() else 1

    def reach(self, phase: str, epoch: int) -> None:
        """Die here, now, as a crashed host would (no cleanup, no goodbye), if this is the planned phase."""
        if self.phase == phase and epoch >= self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
