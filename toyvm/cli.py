"""`toyvm`: run a guest, save it at the stop, resume it later."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from . import state as state_file
from .contract import DEFAULT_RAM
from .errors import GuestFault, ToyVMError
from .guests import bundled_names, resolve
from .machine import Machine
from .netbridge import TcpBridge
from .ram import parse_size
from .runner import RunEnd, run
from .stateview import describe, to_json
from .version import version_line

EXIT_USAGE = 2  # argparse's own status for a bad command line
EXIT_LIMIT = 124  # stopped by --max-instructions / --max-seconds (as timeout(1) does)
EXIT_ERROR = 125  # toyvm could not run the guest: a fault, a bad binary, a bad state file
EXIT_IDLE = 126  # the guest waits for input and nothing can send it any
DEFAULT_SLICE_MS = 10.0


# -- option types: a bad value is a usage error (exit 2) before anything runs ----------------------------------
def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if isinstance(value, float) and math.isnan(value):
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(_number(text, float))
    if value <= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(_number(text, float))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def writable_file(text: str) -> str:
    """A file we can create or replace: checked up front, so a long run never ends in an unwritable --save."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(folder)!r} does not exist")
    # The state is written to FILE.tmp, then renamed: that needs write and search permission on the folder.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {str(folder)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
    return text


# -- the parser -----------------------------------------------------------------------------------------------
def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net-listen", metavar="HOST:PORT",
                   help="accept TCP clients here; each becomes a network-device connection (port 0: any free port)")
    p.add_argument("--max-instructions", type=positive_int, metavar="N",
                   help="stop after exactly N guest instructions (slices run counted: slower)")
    p.add_argument("--max-seconds", type=non_negative_float, metavar="SECONDS",
                   help="stop after SECONDS of host time")
    p.add_argument("--save", type=writable_file, metavar="FILE", help="at the stop, save the whole VM state to FILE")
    p.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                   help="dirty tracking and slicing: native C hooks or pure Python (default: native when a C "
                        "compiler is available; env TOYVM_HOOKS)")
    p.add_argument("--slice-ms", type=positive_float, default=DEFAULT_SLICE_MS, metavar="MS",
                   help=f"length of an execution slice in milliseconds (default: {DEFAULT_SLICE_MS:g})")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the machine does to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toyvm", description="An x86-64 machine on the Unicorn emulator (contract: docs/machine.md).",
        epilog=f"Exit status: the guest's exit code after power-off; {EXIT_USAGE} on a bad command line; "
               f"{EXIT_LIMIT} when a limit stopped it; {EXIT_ERROR} on a VM fault or bad input; {EXIT_IDLE} "
               "when the guest waits for input no one can send; 128+N when stopped by signal N.")
    parser.add_argument("--version", action="version", version=version_line("toyvm"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="boot a guest image (flat or ELF64) and run it",
                       description="Boot a guest and run it; its serial output goes to stdout.")
    p.add_argument("guest", metavar="GUEST",
                   help="guest image: a flat binary (loaded at 0x100000) or an ELF64 executable, or the name of "
                        f"a bundled guest ({', '.join(bundled_names())})")
    p.add_argument("--ram", default=f"{DEFAULT_RAM >> 20}M", metavar="SIZE",
                   help=f"RAM size, e.g. 64M or 1G, from 2M to 4G (default: {DEFAULT_RAM >> 20}M)")
    p.add_argument("--cmdline", default="", metavar="TEXT", help="command line passed to the guest, e.g. 'pages=256'")
    _add_run_options(p)
    r = sub.add_parser("resume", help="resume a VM saved with --save",
                       description="Restore a saved VM state into a fresh machine and run it on.")
    r.add_argument("state", metavar="STATE", help="a state file written by --save")
    _add_run_options(r)
    i = sub.add_parser("inspect", help="print what a saved state holds",
                       description="Check a state file and describe what it holds.")
    i.add_argument("state", metavar="STATE", help="a state file written by --save")
    i.add_argument("--json", action="store_true",
                   help="print the whole state as JSON (short byte strings as hex, long ones and RAM summarised)")
    return parser


def _inspect(path: str, as_json: bool) -> int:
    payload = state_file.read_file(path)
    print(json.dumps(to_json(payload), indent=2) if as_json else describe(path, payload))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="toyvm: %(message)s", stream=sys.stderr)
    try:
        if args.command == "inspect":
            return _inspect(args.state, args.json)
        if args.command == "run":
            image = resolve(args.guest)
            logging.info("guest image %s", image)
            vm = Machine(parse_size(args.ram), hooks=args.hooks)
            vm.boot(image, args.cmdline)
        else:
            vm = Machine.from_state(state_file.read_file(args.state), hooks=args.hooks)
        return _run(vm, args)
    except GuestFault as e:
        print(f"toyvm: VM fault: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ToyVMError as e:
        print(f"toyvm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as e:
        print(f"toyvm: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _run(vm: Machine, args: argparse.Namespace) -> int:
    bridge = TcpBridge(vm.net, args.net_listen) if args.net_listen else None
    if bridge is not None:
        print(f"toyvm: listening on {bridge.address[0]}:{bridge.address[1]}", file=sys.stderr, flush=True)
    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        vm.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        end = run(vm, serial_out=sys.stdout.buffer, bridge=bridge, max_instructions=args.max_instructions,
                  max_seconds=args.max_seconds, slice_seconds=args.slice_ms / 1000)
    finally:
        if bridge is not None:
            bridge.close()
    if args.save:
        state_file.write_file(args.save, vm.save_state())
        print(f"toyvm: state saved to {args.save} (RIP {vm.rip():#x})", file=sys.stderr)
    if end is RunEnd.POWER_OFF:
        assert vm.exit_code is not None
        return vm.exit_code
    if end is RunEnd.INTERRUPTED:
        print(f"toyvm: stopped by signal {signals[0] if signals else '?'}", file=sys.stderr)
        return 128 + (signals[0] if signals else signal.SIGINT)
    if end is RunEnd.IDLE:
        print("toyvm: the guest is waiting for input and has no input source (try --net-listen)", file=sys.stderr)
        return EXIT_IDLE
    print(f"toyvm: stopped: {end.value} reached", file=sys.stderr)
    return EXIT_LIMIT


if __name__ == "__main__":
    sys.exit(main())
