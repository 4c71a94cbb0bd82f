"""How a role asks Linux to schedule it (`--sched`; docs/decisions.md, "The roles run as SCHED_BATCH").

The gateway and the nodes hand every request to one another. Under the default policy each hand-off lets the
woken process preempt the one that woke it, so on a busy machine a node's send of one slice's outputs stops the
node until the gateway has handled them, and every batch shrinks to what one wake-up brings. SCHED_BATCH keeps
the normal priority and time share, and only gives up that preemption on wake-up: the sender finishes its turn
and the receiver finds more work waiting. An idle CPU still runs a woken role at once.
"""
from __future__ import annotations

import os

POLICIES = ("batch", "normal")
DEFAULT = "batch"


def apply(policy: str) -> str | None:
    """Give every thread of this process `policy` (threads started later inherit it from the one that starts
    them); None, or why it could not."""
    if policy not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if not hasattr(os, "sched_setscheduler"):
        return "this system cannot set a scheduling policy"
    number = os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER
    try:  # the policy is a thread's: the calling one, and those libraries started at import (numpy's BLAS)
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setscheduler(tid, number, os.sched_param(0))
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
        except OSError as e:
            return f"cannot set the scheduling policy {policy}: {e.strerror or e}"
    return None


def current() -> str:
    """The calling thread's policy, as `--sched` names it ("batch", "normal", or the kernel's number)."""
    if not hasattr(os, "sched_getscheduler"):
        return "normal"
    number = os.sched_getscheduler(0)
    return {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal"}.get(number, str(number))
