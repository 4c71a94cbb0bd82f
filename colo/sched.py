"""How a role asks Linux to schedule it: its policy (`--sched`; docs/decisions.md, "The roles run as SCHED_BATCH")
and the CPUs it may run on (`--cpus`; "A local hybrid cluster gives each node its own CPUs").

The gateway and the nodes hand every request to one another. Under the default policy each hand-off lets the
woken process preempt the one that woke it, so on a busy machine a node's send of one slice's outputs stops the
node until the gateway has handled them, and every batch shrinks to what one wake-up brings. SCHED_BATCH keeps
the normal priority and time share, and only gives up that preemption on wake-up: the sender finishes its turn
and the receiver finds more work waiting. An idle CPU still runs a woken role at once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

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
    return _each_thread(lambda tid: os.sched_setscheduler(tid, number, os.sched_param(0)),
                        f"cannot set the scheduling policy {policy}")


def _each_thread(set_one: Callable[[int], None], failed: str) -> str | None:
    """`set_one(tid)` for every thread of this process: the policy and the CPUs are a thread's, and libraries start
    threads at import (numpy's BLAS). None, or `failed` and why."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            set_one(tid)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
        except OSError as e:
            return f"{failed}: {e.strerror or e}"
    return None


def current() -> str:
    """The calling thread's policy, as `--sched` names it ("batch", "normal", or the kernel's number)."""
    if not hasattr(os, "sched_getscheduler"):
        return "normal"
    number = os.sched_getscheduler(0)
    return {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal"}.get(number, str(number))


def parse_cpus(text: str) -> list[int]:
    """A Linux CPU list ("0", "2-3", "0,2-3", as taskset and /proc show them) as sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(f"{text!r} is not a CPU list (such as 0, 2-3 or 0,2-3)")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"{part.strip()!r}: a range goes from the lower CPU to the higher")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """The shortest CPU list for `cpus` (the inverse of parse_cpus): [0, 1, 2, 5] -> "0-2,5"."""
    ranges: list[list[int]] = []
    for c in sorted(set(cpus)):
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (empty where the system cannot say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def cpus_label() -> str:
    """The CPUs this process may run on now, as a CPU list for `colo status` ("-" where the system cannot say)."""
    return format_cpus(allowed_cpus()) or "-"


def node_halves(cpus: list[int]) -> tuple[list[int], list[int]] | None:
    """Two disjoint, equal sets of `cpus` for the two nodes of a local cluster (an odd one left to neither);
    None with fewer than two."""
    half = len(cpus) // 2
    return (cpus[:half], cpus[half:2 * half]) if half else None


def pin(cpus: list[int]) -> str | None:
    """Run every thread of this process only on `cpus` (threads started later inherit it); None, or why not."""
    if not hasattr(os, "sched_setaffinity"):
        return "this system cannot restrict a process to some CPUs"
    allowed = allowed_cpus()
    outside = sorted(set(cpus) - set(allowed))
    if outside:
        return (f"CPU {format_cpus(outside)} is not one this process may use (it may use "
                f"{format_cpus(allowed)})")
    return _each_thread(lambda tid: os.sched_setaffinity(tid, cpus), f"cannot run on CPUs {format_cpus(cpus)}")
