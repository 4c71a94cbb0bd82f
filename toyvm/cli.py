"""`toyvm`: run a guest, save it at the stop, resume it later."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from . import state as state_file
from .contract import DEFAULT_RAM
from .errors import GuestFault, ToyVMError
from .machine import Machine
from .netbridge import TcpBridge
from .ram import parse_size
from .runner import RunEnd, run

EXIT_LIMIT = 124  # stopped by --max-instructions / --max-seconds (as timeout(1) does)
EXIT_ERROR = 125  # toyvm could not run the guest: a fault, a bad binary, a bad state file
EXIT_IDLE = 126  # the guest waits for input and nothing can send it any


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net-listen", metavar="HOST:PORT",
                   help="accept TCP clients here; each becomes a network-device connection (port 0: any free port)")
    p.add_argument("--max-instructions", type=int, metavar="N",
                   help="stop after exactly N guest instructions (slices run counted: slower)")
    p.add_argument("--max-seconds", type=float, metavar="S", help="stop after S seconds of host time")
    p.add_argument("--save", metavar="FILE", help="at the stop, save the whole VM state to FILE")
    p.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                   help="dirty tracking and slicing: native C hooks or pure Python (default: native if a C "
                        "compiler is available; env TOYVM_HOOKS)")
    p.add_argument("--slice-ms", type=float, default=10.0, help="length of an execution slice (default 10 ms)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the machine does to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toyvm", description="An x86-64 machine on the Unicorn emulator (contract: docs/machine.md).",
        epilog=f"Exit status: the guest's exit code after power-off; {EXIT_LIMIT} when a limit stopped it; "
               f"{EXIT_ERROR} on a VM fault or bad input; {EXIT_IDLE} when the guest waits for input no one can send.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="boot a guest binary (flat or ELF64) and run it",
                       description="Boot a guest and run it; its serial output goes to stdout.")
    p.add_argument("guest", help="guest image: a flat binary (loaded at 0x100000) or an ELF64 executable")
    p.add_argument("--ram", default=str(DEFAULT_RAM >> 20) + "M", help="RAM size, e.g. 64M or 1G (default 64M)")
    p.add_argument("--cmdline", default="", help="command line passed to the guest, e.g. 'pages=256'")
    _add_run_options(p)
    r = sub.add_parser("resume", help="resume a VM saved with --save",
                       description="Restore a saved VM state into a fresh machine and run it on.")
    r.add_argument("state", help="a state file written by --save")
    _add_run_options(r)
    i = sub.add_parser("inspect", help="print what a saved state holds", description="Check and describe a state file.")
    i.add_argument("state")
    return parser


def _inspect(path: str) -> int:
    payload = state_file.read_file(path)
    m = payload["machine"]
    regs = payload["cpu"]["regs"]
    pages = len(payload.get("ram", {}).get("pages", b"")) // 4
    print(f"{path}: toyvm state version {payload['version']}")
    print(f"  RAM {m['ram_size'] >> 20} MiB, {pages} non-zero pages; cmdline {m['cmdline']!r}")
    print(f"  RIP {regs['rip']:#x}  RSP {regs['rsp']:#x}  exit code {m.get('exit_code')}")
    for name, dev in payload["devices"].items():
        print(f"  {name}: {dev}" if name != "net" else
              f"  net: {len(dev['rx'])} queued inputs, last input seq {dev['last_input_seq']}, "
              f"last output seq {dev['last_output_seq']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="toyvm: %(message)s", stream=sys.stderr)
    try:
        if args.command == "inspect":
            return _inspect(args.state)
        if args.command == "run":
            vm = Machine(parse_size(args.ram), hooks=args.hooks)
            vm.boot(args.guest, args.cmdline)
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
    if args.max_instructions is not None and args.max_instructions <= 0:
        raise ValueError("--max-instructions must be positive")
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
