"""`colo stats`: summarise or plot a `--stats` file (one JSON line per checkpoint, colo.stats), run by run.

The primary appends to its stats file, so one file may hold several runs: records are grouped by their run id.
Records written before runs were stamped have no id; they are split into runs where the epoch stops
increasing (a new primary starts again at epoch 1). The summary needs only the standard library; the plot
needs matplotlib, an optional extra.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colo.errors import ColoError
from colo.stats import PHASES

PLOT_HINT = "pip install 'toyvm-colo[bench]'"
MAX_PLOT_RUNS = 4  # columns in one figure; past that the runs are too narrow to read


@dataclass
class Run:
    label: str  # the run id, or "unlabelled-N" for records that carry none
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mode(self) -> str | None:
        return next((r["mode"] for r in self.records if r.get("mode")), None)

    @property
    def interval_ms(self) -> float | None:
        return next((float(r["interval_ms"]) for r in self.records if r.get("interval_ms") is not None), None)


def load(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a stats file, and how many lines were not records (e.g. a line cut short by a kill)."""
    records: list[dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(rec, dict) and "epoch" in rec and "pause_ms" in rec:
                records.append(rec)
            else:
                skipped += 1
    return records, skipped


def group_runs(records: list[dict[str, Any]]) -> list[Run]:
    """Runs in the order they first appear in the file."""
    runs: dict[str, Run] = {}
    unlabelled = 0
    last_epoch: int | None = None
    for rec in records:
        run_id = rec.get("run_id") or ""
        if not run_id:
            epoch = int(rec.get("epoch", 0))
            if last_epoch is None or epoch <= last_epoch:
                unlabelled += 1
            last_epoch = epoch
            run_id = f"unlabelled-{unlabelled}"
        runs.setdefault(run_id, Run(run_id)).records.append(rec)
    return list(runs.values())


def select(runs: list[Run], wanted: str | None) -> list[Run]:
    """All runs, or the one whose id is `wanted` (a unique prefix is enough)."""
    if wanted is None:
        return runs
    exact = [r for r in runs if r.label == wanted]
    matches = exact or [r for r in runs if r.label.startswith(wanted)]
    if len(matches) != 1:
        raise ColoError(f"{'no run matches' if not matches else 'several runs match'} {wanted!r} "
                        f"(runs: {', '.join(r.label for r in runs) or 'none'})")
    return matches


# -- numbers ---------------------------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """The p-th percentile, interpolated between the nearest ranks (numpy's default, "linear")."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(p) - 1] if p < 100 else ordered[-1]


def summarize(run: Run) -> dict[str, Any]:
    """One run's figures, as plain values (what `colo stats --json` prints)."""
    recs = run.records
    n = len(recs)
    times = [float(r.get("time", 0.0)) for r in recs]
    pauses = [float(r["pause_ms"]) for r in recs]
    commits = [float(r["commit_ms"]) for r in recs if "commit_ms" in r]  # records since pipelining have it
    raw = [int(r.get("bytes_raw", 0)) for r in recs]
    wire = [int(r.get("bytes_wire", 0)) for r in recs]
    dirty = [int(r.get("dirty_pages", 0)) for r in recs]
    names = [p for p in PHASES if any(p in r.get("phases_ms", {}) for r in recs)]
    names += sorted({p for r in recs for p in r.get("phases_ms", {})} - set(names))
    span = max(times) - min(times) if times else 0.0
    return {
        "run_id": run.label, "mode": run.mode, "interval_ms": run.interval_ms, "checkpoints": n,
        "first": min(times), "last": max(times), "span_s": span,
        "per_second": (n - 1) / span if span > 0 else None,
        "triggers": dict(Counter(str(r.get("trigger", "?")) for r in recs).most_common()),
        "pause_ms": {"p50": percentile(pauses, 50), "p90": percentile(pauses, 90), "p99": percentile(pauses, 99),
                     "max": max(pauses), "mean": statistics.fmean(pauses)},
        "commit_ms": {"p50": percentile(commits, 50), "p90": percentile(commits, 90),
                      "p99": percentile(commits, 99), "max": max(commits),
                      "mean": statistics.fmean(commits)} if commits else None,
        "checkpoint_modes": dict(Counter(str(r["checkpoint_mode"]) for r in recs
                                         if "checkpoint_mode" in r).most_common()),
        "bytes_raw": {"total": sum(raw), "per_checkpoint": sum(raw) / n, "max": max(raw)},
        "bytes_wire": {"total": sum(wire), "per_checkpoint": sum(wire) / n, "max": max(wire)},
        "dirty_pages": {"median": statistics.median(dirty), "max": max(dirty)},
        "phases_ms_median": {p: statistics.median(float(r.get("phases_ms", {}).get(p, 0.0)) for r in recs)
                             for p in names},
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(first: float, last: float) -> str:
    a, b = time.localtime(first), time.localtime(last)
    start = time.strftime("%Y-%m-%d %H:%M:%S", a)
    return f"{start} to {time.strftime('%H:%M:%S' if a[:3] == b[:3] else '%Y-%m-%d %H:%M:%S', b)}"


def format_run(s: dict[str, Any]) -> str:
    mode = s["mode"] or "mode not recorded"
    if s["interval_ms"] is not None:
        mode += f", {'backstop' if s['mode'] == 'hybrid' else 'interval'} {s['interval_ms']:g} ms"
    rate = f" ({s['per_second']:.1f}/s)" if s["per_second"] else ""
    p, raw, wire = s["pause_ms"], s["bytes_raw"], s["bytes_wire"]
    ratio = f", {raw['total'] / wire['total']:.1f}x smaller" if wire["total"] else ""
    lines = [
        f"run {s['run_id']}: {mode}",
        f"  checkpoints   {s['checkpoints']} over {s['span_s']:.1f} s{rate}, {_when(s['first'], s['last'])}",
        "  triggers      " + ", ".join(f"{k} {v}" for k, v in s["triggers"].items()),
        f"  pause ms      p50 {p['p50']:.2f}  p90 {p['p90']:.2f}  p99 {p['p99']:.2f}  max {p['max']:.2f}"
        f"  (mean {p['mean']:.2f}; the guest stopped)",
    ]
    c = s.get("commit_ms")
    if c:
        modes = ", ".join(f"{k} {v}" for k, v in s.get("checkpoint_modes", {}).items())
        lines.append(f"  commit ms     p50 {c['p50']:.2f}  p90 {c['p90']:.2f}  p99 {c['p99']:.2f}  max {c['max']:.2f}"
                     f"  (mean {c['mean']:.2f}; stop to vmstate-received{'; ' + modes if modes else ''})")
    lines += [
        f"  bytes raw     {human_bytes(raw['total'])} total, {human_bytes(raw['per_checkpoint'])} per checkpoint "
        f"(max {human_bytes(raw['max'])})",
        f"  bytes wire    {human_bytes(wire['total'])} total, {human_bytes(wire['per_checkpoint'])} per checkpoint "
        f"(max {human_bytes(wire['max'])}){ratio}",
        f"  dirty pages   median {s['dirty_pages']['median']:g}, max {s['dirty_pages']['max']}",
        "  phase ms      " + "  ".join(f"{k} {v:.2f}" for k, v in s["phases_ms_median"].items()) + "  (medians)",
    ]
    return "\n".join(lines)


def report(path: str | Path, runs: list[Run], skipped: int) -> str:
    total = sum(len(r.records) for r in runs)
    head = f"{path}: {total} checkpoints" + (f" in {len(runs)} runs" if len(runs) > 1 else "")
    if skipped:
        head += f"; {skipped} line{'s' if skipped > 1 else ''} skipped (not a checkpoint record)"
    if not runs:
        return head
    return "\n".join([head, *(format_run(summarize(r)) for r in runs)])


# -- the plot --------------------------------------------------------------------------------------------------
def require_matplotlib() -> None:
    """Fail before any work when the plot cannot be drawn, naming what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ColoError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None


def plot(runs: list[Run], out: str | Path, title: str = "") -> None:
    """Pause (and commit) over time, the phases of each checkpoint stacked, and dirty pages: one column per run."""
    require_matplotlib()
    if len(runs) > MAX_PLOT_RUNS:
        raise ColoError(f"{len(runs)} runs are too many for one plot: choose one with --run "
                        f"(runs: {', '.join(r.label for r in runs)})")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(runs), figsize=(max(8.0, 5.0 * len(runs)), 9.0), sharex="col", sharey="row",
                             squeeze=False)
    for col, run in enumerate(runs):
        recs = run.records
        t0 = min(float(r.get("time", 0.0)) for r in recs)
        x = [float(r.get("time", 0.0)) - t0 for r in recs]
        gaps = [b - a for a, b in itertools.pairwise(x) if b > a]
        # Bars as wide as the usual spacing, but never so wide that a sparse (hybrid) run shows slabs.
        width = 0.8 * min(statistics.median(gaps), max(x) / 20) if gaps else 0.1
        pause_ax, phase_ax, dirty_ax = axes[0][col], axes[1][col], axes[2][col]
        pause_ax.plot(x, [float(r["pause_ms"]) for r in recs], marker=".", linewidth=0.8, label="pause")
        if any("commit_ms" in r for r in recs):
            pause_ax.plot(x, [float(r.get("commit_ms", math.nan)) for r in recs], marker=".", linewidth=0.8,
                          label="commit (stop to vmstate-received)")
            pause_ax.legend(loc="upper right", fontsize="small")
        pause_ax.set_title(f"run {run.label}" + (f" ({run.mode})" if run.mode else ""))
        bottom = [0.0] * len(recs)
        for phase in summarize(run)["phases_ms_median"]:
            height = [float(r.get("phases_ms", {}).get(phase, 0.0)) for r in recs]
            phase_ax.bar(x, height, width=width, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, height, strict=True)]
        dirty_ax.bar(x, [int(r.get("dirty_pages", 0)) for r in recs], width=width, color="tab:gray")
        dirty_ax.set_xlabel("seconds since the run's first checkpoint")
        if not gaps:  # one checkpoint (or all at one time): a second either side, not one bar across the panel
            dirty_ax.set_xlim(-1.0, 1.0)
    axes[0][0].set_ylabel("pause, commit (ms)")
    axes[1][0].set_ylabel("phases (ms)")
    axes[2][0].set_ylabel("dirty pages")
    axes[1][0].legend(loc="upper right", fontsize="small", ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
