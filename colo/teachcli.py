"""`colo trace show|export` and `colo view`: the readers of the event stream that have a command of their own."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from colo import events, traceexport


def run(args: argparse.Namespace) -> int:
    if args.command == "view":
        from colo.view.server import run_view
        return run_view(args)
    evs = _read(args.files)
    if args.trace_command == "show":
        flt = events.EventFilter(args.filter)
        for ev in evs:
            if flt(ev):
                print(events.format_event(ev))
        return 0
    if args.format == "perfetto":
        text = json.dumps(traceexport.perfetto(evs), separators=(",", ":"))
    elif args.failover:
        text = traceexport.mermaid_failover(evs)
    else:
        done = traceexport.epochs(evs)
        epoch = args.epoch if args.epoch is not None else (done[-1] if done else 1)
        text = traceexport.mermaid_epoch(evs, epoch)
    if args.output:
        Path(args.output).write_text(text)
        print(f"colo trace export: wrote {args.output} ({len(evs)} events)", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _read(files: list[str]) -> list[dict[str, Any]]:
    """The files' events, merged; a file with lines that are not events says so (a wrong file is not silence)."""
    found: list[dict[str, Any]] = []
    for path in files:
        evs, skipped = events.read_file(path)
        if skipped:
            print(f"colo trace: {path}: {skipped} line{'s' if skipped != 1 else ''} skipped (not events)",
                  file=sys.stderr)
        found.extend(evs)
    if not found:
        raise ValueError(f"no events in {', '.join(files)}: record some with --trace-file FILE (any role, or colo up)")
    return events.merge(found)
