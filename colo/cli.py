"""`colo`: run the gateway, the primary and the secondary (each may be on its own host), or all three locally."""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from colo import rundir, sched
from colo.auth import load_key
from colo.cluster import PIN_CHOICES, ask_gateway
from colo.errors import ColoError
from colo.link import DEFAULT_HEARTBEAT_TIMEOUT
from colo.messages import CommandResult, FailoverCommand, StatusReply, StatusRequest
from colo.supervise import BACKOFF_CAP
from tcpclients import parse_address
from toyvm.cli import positive_float, positive_int, writable_file
from toyvm.errors import ToyVMError
from toyvm.guests import argument as guest_argument
from toyvm.ram import check_ram_size, parse_size
from toyvm.version import version_line

EXIT_ERROR = 2
# `colo --help` and the README show this table; the node codes come from colo.node (NodeStop and its kinds).
EXIT_CODES = """\
exit status:
  0    a role: stopped cleanly (SIGINT or SIGTERM); colo up: stopped by colo down; or the command did what
       it was asked
  1    colo failover: the gateway refused; colo demo: a write was lost or a connection broke; colo up: the
       service was lost (no node holds the guest) or the gateway died; colo down: a process would not stop
  2    a bad command line, or an error that stopped the command (the message says which)
  4    primary or secondary: fenced by the gateway (a newer generation exists, another node is active)
  125  colo up, primary: the guest faulted ("VM fault: ...", as toyvm run)
  128+N  colo up: stopped by signal N (129 SIGHUP, 130 SIGINT, 143 SIGTERM), after stopping its roles
  N    colo up, primary, or a promoted secondary: the guest powered off with exit code N
"""
UP_HELP = """\
Start the gateway, a secondary and the primary as separate local processes, print where clients
connect once the pair is protected, and keep it protected: when a node dies, start a replacement
secondary (the active node copies its VM to it). Only the active node prints the guest's console,
on stdout; the roles' warnings and errors (their -v/-q is ours) appear on stderr (their logs are
in the run directory while it runs). Ends with the guest's exit code when it powers off, 125 on a fault.
"""
RUN_DIR_HELP = """\
Each `colo up` is a cluster with a name (--name; default: the guest's name, with -2, -3... added while
that name is running) and a run directory ROOT/NAME holding its key, its addresses and its roles' logs.
ROOT is $COLO_RUN_DIR, else $XDG_RUNTIME_DIR/colo-UID, else the temporary directory's colo-UID. `colo
status`, `colo failover` and `colo down` find the cluster there: with no --name, the only one running.
Directories of clusters whose processes are all gone are removed by the next command that looks.
"""
DEFAULT_RESPAWN = 10


def ram_size(text: str) -> str:
    """An argparse `type=` for --ram: a size toyvm accepts (the messages are toyvm's)."""
    try:
        check_ram_size(parse_size(text))
    except ToyVMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def count(text: str) -> int:
    """An argparse `type=`: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def cpu_list(text: str) -> list[int]:
    """An argparse `type=` for --cpus: a Linux CPU list such as 0, 2-3 or 0,2-3."""
    try:
        return sched.parse_cpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key(args: argparse.Namespace, cluster: rundir.Cluster | None = None) -> bytes:
    """--key-file, else $COLO_KEY, else the key of the `colo up` cluster meant (`cluster`, or the one whose
    gateway is --gateway)."""
    if getattr(args, "key_file", None):
        return load_key(args.key_file)
    if os.environ.get("COLO_KEY"):
        return load_key()
    gateway = getattr(args, "gateway", None)
    if cluster is None and gateway is not None:
        cluster = next((c for c in rundir.live_clusters() if c.gateway == tuple(gateway)), None)
    if cluster is not None and cluster.key_file is not None:
        return load_key(cluster.key_file)
    return load_key()  # raises: names both ways to give a key


def _write_ready(path: str | None, info: dict[str, Any]) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)


def _common(p: argparse.ArgumentParser,
            key_help: str = "shared key file (else $COLO_KEY, else the key of the `colo up` whose gateway this is)"
            ) -> None:
    p.add_argument("--key-file", metavar="FILE", help=key_help)
    p.add_argument("--heartbeat-timeout", type=positive_float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="S",
                   help=f"a peer silent this long is lost (default {DEFAULT_HEARTBEAT_TIMEOUT} s)")
    _trace_options(p)
    _loudness(p)
    _encrypt_option(p)
    p.add_argument("--sched", choices=sched.POLICIES, default=sched.DEFAULT,
                   help="the Linux scheduling policy of the role's threads: batch (default) keeps its priority but "
                        "does not preempt the process that woke it, so gateway and nodes hand work over in bigger "
                        "batches; normal is the kernel's default")
    p.add_argument("--cpus", type=cpu_list, metavar="LIST",
                   help="run the role's threads only on these CPUs, a Linux CPU list such as 0, 2-3 or 0,2-3 "
                        "(default: every CPU it may use; colo up gives each node of a hybrid cluster its own, "
                        "see --pin)")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)  # `colo up` learns the chosen ports from it
    p.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)  # stop when this fd reaches EOF (colo.lifeline)


def _loudness(p: argparse.ArgumentParser) -> None:
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")
    loud.add_argument("-q", "--quiet", action="store_true", help="log only errors to stderr")


def _trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", action="store_true",
                   help="print the event stream on stderr: one line per message (its sender's), the witness's "
                        "decisions, state changes, failover steps; times on the common clock")
    p.add_argument("--trace-filter", default="", metavar="PATTERNS",
                   help="with --trace: comma-separated globs matched against role, kind and message name; -PATTERN "
                        "hides (e.g. 'primary,commit' or '-input,-output'); naming a hidden kind shows it ('output', "
                        "'heartbeat', 'phase')")
    p.add_argument("--trace-file", metavar="FILE",
                   help="append the event stream to FILE as JSON lines (every role may share one file: a merged "
                        "stream); read it with `colo trace show|export`")
    p.add_argument("--trace-hex", type=count, default=0, metavar="N",
                   help="with --trace-file: record the first N bytes of every frame in hex (default 0)")


def _trace_setup(args: argparse.Namespace, role: str) -> None:
    from colo import events
    events.configure(role, trace=args.trace, trace_file=args.trace_file, trace_filter=args.trace_filter,
                     hex_bytes=args.trace_hex)


def _encrypt_option(p: argparse.ArgumentParser, default: bool | None = True) -> None:
    p.add_argument("--encrypt", action=argparse.BooleanOptionalAction, default=default,
                   help="encrypt every frame (AES-256-GCM) besides authenticating it; both ends of a connection "
                        "must agree (default: " + ("on; --no-encrypt: authenticated only)" if default else
                                                   "as the `colo up` cluster was started, else on)"))


def _mode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("periodic", "hybrid"), default="periodic",
                   help="periodic: checkpoint every --interval, the secondary VM waits; hybrid (COLO): both VMs "
                        "run, outputs are compared, a mismatch triggers a checkpoint (default periodic)")


def _vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", type=ram_size, default="64M", metavar="SIZE",
                   help="guest RAM, e.g. 64M or 1G, from 2M to 4G (default 64M)")
    p.add_argument("--cmdline", default="", metavar="TEXT", help="command line passed to the guest")
    _checkpoint_options(p)


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=positive_float, default=100.0, metavar="MS",
                   help="periodic mode: checkpoint interval in milliseconds (default 100)")
    p.add_argument("--backstop", type=positive_float, default=2000.0, metavar="MS",
                   help="hybrid mode: checkpoint at least this often, in milliseconds (default 2000)")
    _mode_option(p)
    p.add_argument("--copy", choices=("live", "stop"), default="live",
                   help="how a new secondary gets the VM: live: rounds of pages while the guest serves, then one "
                        "short stop (pre-copy); stop: the guest stops for the whole copy (default live)")
    p.add_argument("--checkpoint-mode", choices=("strict", "pipelined"), default="pipelined",
                   help="pipelined (default): the guest resumes as soon as the state is copied, which is sent "
                        "while it runs; strict: the guest stays stopped until the secondary has loaded it")
    p.add_argument("--delta", action="store_true",
                   help="send each dirty page XOR its content at the previous checkpoint (fewer bytes for guests "
                        "that change parts of pages, such as kvstore; more for ones that rewrite whole pages; the "
                        "primary keeps a copy of guest RAM)")
    p.add_argument("--stats", type=writable_file, metavar="FILE", help="append one JSON line per checkpoint to FILE")
    p.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                   help="toyvm hook engine (default: native when a C compiler exists)")


def _console_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--console", choices=("active", "always", "off"), default="active",
                   help="the guest's serial console on stdout: active: while this node is the primary (the "
                        "default: one copy for whoever watches, in hybrid mode too), always: also a hybrid "
                        "secondary's own VM, off: never")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colo", description="COLO-style replication of toyvm guests: "
                                     "a gateway, a primary and a secondary, each may run on its own host.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line("colo"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("gateway", help="run the gateway (client-facing network and failover witness)",
                       description="Own the client sockets, hold output until checkpoints cover it, decide "
                                   "which node is active.")
    g.add_argument("--listen", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="where nodes and control commands connect (default 127.0.0.1:0)")
    g.add_argument("--service", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="where clients of the guest connect (default 127.0.0.1:0)")
    g.add_argument("--client-timeout", type=positive_float, default=30.0, metavar="S",
                   help="close a client that reads none of its unsent replies (over 1 MiB) for S seconds "
                        "(default 30)")
    g.add_argument("--compare-timeout", type=positive_float, default=200.0, metavar="MS",
                   help="hybrid mode: output left unmatched this long triggers a checkpoint (default 200)")
    g.add_argument("--state-file", metavar="FILE",
                   help="what must survive a restart of the gateway (the copies it voided: no later gateway may "
                        "promote them), written durably; give a restarted gateway the same FILE (colo up: "
                        "gateway-state.json in the run directory; default: none, a restart remembers nothing)")
    _mode_option(g)
    _common(g)

    p = sub.add_parser("primary", help="run the primary VM and checkpoint it to the secondary",
                       description="Boot GUEST, serve it through the gateway, checkpoint it to the secondary.")
    p.add_argument("guest", type=guest_argument, metavar="GUEST",
                   help="guest image (flat binary or ELF64) or a bundled guest's name, e.g. kvstore")
    p.add_argument("--gateway", type=_address, required=True, metavar="HOST:PORT", help="the gateway's --listen")
    _vm_options(p)
    _console_option(p)
    _common(p)

    s = sub.add_parser("secondary", help="run a secondary: hold a copy of the primary's VM, take over on failover",
                       description="Register with the gateway as a spare; when the gateway pairs us with a primary, "
                                   "receive its VM and its checkpoints; take over when the gateway promotes us, then "
                                   "checkpoint like a primary (hence the checkpoint options).")
    s.add_argument("--listen", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="where a primary connects (default 127.0.0.1:0)")
    s.add_argument("--advertise", type=_address, metavar="HOST:PORT",
                   help="the address primaries should connect to, if not --listen (NAT, a relay)")
    s.add_argument("--gateway", type=_address, required=True, metavar="HOST:PORT", help="the gateway's --listen")
    s.add_argument("--guest", type=guest_argument, metavar="GUEST",
                   help="protect only a primary that runs this guest image (default: any)")
    s.add_argument("--ram", metavar="SIZE", help="protect only a primary whose VM has this much RAM (default: any)")
    _checkpoint_options(s)
    _console_option(s)
    _common(s)

    u = sub.add_parser("up", help="run GUEST replicated on this host, kept protected; Ctrl-C stops it",
                       description=UP_HELP + "\n" + RUN_DIR_HELP,
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("guest", metavar="GUEST",
                   help="guest image (flat binary or ELF64) or a bundled guest's name, e.g. kvstore")
    u.add_argument("--name", type=rundir.name_argument,
                   help="the cluster's name: 1 to 64 of A-Z a-z 0-9 _ . - (default: the guest's name, made unique)")
    u.add_argument("--service", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="where clients connect (default: a free port on 127.0.0.1)")
    u.add_argument("--respawn", type=count, default=DEFAULT_RESPAWN, metavar="N",
                   help="when a node dies, start a replacement secondary, at most N in any hour; one that dies "
                        f"before protecting the service is retried after 1, 2, 4... s (at most {BACKOFF_CAP:.0f}) "
                        f"(default {DEFAULT_RESPAWN})")
    u.add_argument("--no-respawn", action="store_true", help="never start a replacement (as --respawn 0)")
    u.add_argument("--pin", choices=PIN_CHOICES, default="auto",
                   help="auto (default): in hybrid mode on 2 or more CPUs, each node runs on its own half of them "
                        "(both VMs run all the time; on one host they then never take each other's CPU); off: "
                        "every role may run on every CPU")
    _vm_options(u)
    _common(u, key_help="the shared key file for the roles (default: a fresh key, mode 0600, in the run "
                        "directory)")

    st = sub.add_parser("status", help="show each role, its state and checkpoints",
                        description="Ask the gateway for the state of every role.\n\n" + RUN_DIR_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _target_options(st)
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")

    f = sub.add_parser("failover", help="force a failover to the secondary now",
                       description="Fence the primary and promote the secondary.\n\n" + RUN_DIR_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _target_options(f)
    f.add_argument("--reason", default="operator request", help="recorded with the failover")

    sw = sub.add_parser("switchover", help="move the service to the secondary at a checkpoint (maintenance)",
                        description="A planned move: the primary takes a checkpoint and holds still, the secondary "
                                    "takes over from exactly that checkpoint. No acknowledged write is lost and no "
                                    "client connection breaks; clients see a short stall, which the gateway reports "
                                    "(`colo status`). The old primary then exits, or with --swap waits as a spare "
                                    "and is copied anew by the new primary.")
    _target_options(sw)
    sw.add_argument("--swap", action="store_true", help="keep the old primary, as the new secondary")
    sw.add_argument("--reason", default="planned switchover", help="recorded with the switchover")

    dn = sub.add_parser("down", help="stop a `colo up` cluster (from another terminal)",
                        description="Shut the cluster's service down through its gateway (no failover starts, no "
                                    "loss is logged) and wait until its processes have gone.\n\n" + RUN_DIR_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    dn.add_argument("name", nargs="?", type=rundir.name_argument, metavar="NAME",
                    help="the cluster (default: the only one running)")
    dn.add_argument("--name", dest="name_option", type=rundir.name_argument, metavar="NAME",
                    help="the same, as `colo status --name` takes it")
    dn.add_argument("--timeout", type=positive_float, default=20.0, metavar="S",
                    help="then SIGTERM, then SIGKILL, what still runs (default 20)")
    dn.add_argument("--key-file", metavar="FILE", help="shared key file (default: the cluster's)")
    _encrypt_option(dn, default=None)
    _loudness(dn)

    d = sub.add_parser("demo", help="the key-value guest survives a SIGKILLed primary (no arguments needed)",
                       description="Replicate the key-value guest, write to it, kill the primary, check that no "
                                   "acknowledged write was lost.")
    d.add_argument("--seconds", type=positive_float, default=12.0,
                   help="how long the client workload runs (default 12)")
    d.add_argument("--clients", type=positive_int, default=8, help="concurrent writers (default 8)")

    k = sub.add_parser("keygen", help="write a fresh shared key file (mode 0600) for roles on several hosts",
                       description="Write a fresh random key to FILE, readable by its owner only. Copy it to "
                                   "each host and pass it to every role with --key-file.")
    k.add_argument("file", metavar="FILE", help="where to write the key")
    k.add_argument("--force", action="store_true", help="replace FILE if it exists")

    _teaching_commands(sub)

    sts = sub.add_parser("stats", help="summarise (or plot) a --stats file",
                         description="Summarise the checkpoints of a --stats file, run by run: triggers, "
                                     "pause percentiles, bytes, dirty pages, phase medians.")
    sts.add_argument("file", metavar="FILE", help="a file written by --stats (JSON lines)")
    sts.add_argument("--run", metavar="ID", help="only the run with this id (a unique prefix is enough)")
    sts.add_argument("--json", action="store_true", help="print the summary as JSON")
    sts.add_argument("--plot", metavar="OUT.png",
                     help="also draw pause, phases and dirty pages over time (needs matplotlib: "
                          "pip install 'toyvm-colo[bench]')")
    return parser


def _teaching_commands(sub: Any) -> None:
    """`colo trace` and `colo view` (colo.teachcli runs them)."""
    t = sub.add_parser("trace", help="read a recorded event stream (--trace-file): print it, export it",
                       description="Print a recorded event stream as --trace does, or export it for Perfetto or "
                                   "as a Mermaid sequence diagram.")
    tsub = t.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")
    show = tsub.add_parser("show", help="print the events, one line each, on the common clock")
    show.add_argument("files", nargs="+", metavar="FILE", help="trace files (one merged stream or one per role)")
    show.add_argument("--filter", default="", metavar="PATTERNS", help="as --trace-filter")
    ex = tsub.add_parser("export", help="Chrome trace-event JSON for Perfetto, or a Mermaid sequence diagram",
                         description="Convert a recorded event stream. perfetto: open OUT at ui.perfetto.dev; "
                                     "mermaid: one epoch (--epoch N, default the last complete one) or the first "
                                     "failover (--failover) as a sequence diagram.")
    ex.add_argument("files", nargs="+", metavar="FILE", help="trace files (one merged stream or one per role)")
    ex.add_argument("--format", choices=("perfetto", "mermaid"), required=True,
                    help="perfetto: Chrome trace-event JSON; mermaid: a sequence diagram (Markdown)")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, metavar="N", help="mermaid: the run and checkpoint of epoch N")
    which.add_argument("--failover", action="store_true", help="mermaid: the failover window")
    ex.add_argument("-o", "--output", metavar="OUT", help="where to write (default: stdout)")

    v = sub.add_parser("view", help="the replicated guest, live and steppable, in a browser",
                       description="Start gateway, secondary and primary locally with the event stream on, and "
                                   "serve one page that shows them live: RAM, the handshake, held output, "
                                   "checkpoints, failover; with controls (kill, checkpoint, step, slow motion).")
    v.add_argument("guest", type=guest_argument, metavar="GUEST",
                   help="guest image or a bundled guest's name (kvstore answers the page's Redis box)")
    _mode_option(v)
    v.add_argument("--interval", type=positive_float, default=1000.0, metavar="MS",
                   help="periodic checkpoint interval (default 1000: slow enough to watch)")
    v.add_argument("--backstop", type=positive_float, default=5000.0, metavar="MS",
                   help="hybrid backstop (default 5000)")
    v.add_argument("--checkpoint-mode", choices=("strict", "pipelined"), default="pipelined",
                   help="pipelined (default): the guest resumes once the state is copied and runs while it is sent; "
                        "strict: it stays stopped until the secondary has loaded it (watch the two side by side)")
    v.add_argument("--ram", type=ram_size, default="16M", metavar="SIZE",
                   help="guest RAM, from 2M to 4G (default 16M: a page grid that fits a screen)")
    v.add_argument("--cmdline", default="", metavar="TEXT", help="command line passed to the guest")
    v.add_argument("--listen", type=_address, default=("127.0.0.1", 8300), metavar="HOST:PORT",
                   help="where the page is served (default 127.0.0.1:8300; port 0: any free one)")
    v.add_argument("--no-browser", action="store_true", help="do not try to open a browser")
    v.add_argument("--heartbeat-timeout", type=positive_float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="S",
                   help=f"a peer silent this long is lost (default {DEFAULT_HEARTBEAT_TIMEOUT} s)")
    v.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                   help="toyvm hook engine (default: native when a C compiler exists)")
    _loudness(v)
    v.add_argument("--trace-hex", type=count, default=64, metavar="N",
                   help="record the first N bytes of every frame in hex (default 64; with --no-encrypt they read)")
    _encrypt_option(v)
    v.add_argument("--ready-file", help=argparse.SUPPRESS)
    v.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)  # stop when this fd reaches EOF (colo.lifeline)


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", type=rundir.name_argument, help="the `colo up` cluster (default: the only one running)")
    p.add_argument("--gateway", type=_address, metavar="HOST:PORT", help="any gateway, instead of a `colo up`")
    p.add_argument("--key-file", metavar="FILE", help="shared key file (default: $COLO_KEY, else the cluster's)")
    _encrypt_option(p, default=None)
    _loudness(p)


def _setup_logging(args: argparse.Namespace) -> None:
    level = (logging.ERROR if getattr(args, "quiet", False) else
             logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    # Local wall-clock time to the millisecond: lines from roles on several hosts can be merged and compared.
    logging.basicConfig(level=level, format="%(asctime)s.%(msecs)03d colo %(message)s",  # messages start with the role
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr)


def _on_term(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    try:  # `kill -USR1 PID`: every thread's Python stack on stderr, and the role runs on (one that seems stuck)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 here, or stderr is not a file (run in-process)
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    if getattr(args, "sched", None) is not None:  # before any thread starts: they inherit it
        problem = sched.apply(args.sched)
        if problem:
            logging.getLogger("colo").warning("%s: %s; it runs with the policy it has", args.command, problem)
    if getattr(args, "cpus", None) is not None:  # as the policy: before any thread starts
        problem = sched.pin(args.cpus)
        if problem:
            print(f"colo {args.command}: error: --cpus {sched.format_cpus(args.cpus)}: {problem}", file=sys.stderr)
            return EXIT_ERROR
    if getattr(args, "lifeline", None) is not None:
        from colo import lifeline
        lifeline.watch(args.lifeline, args.command)
    try:
        if args.command == "gateway":
            return cmd_gateway(args)
        if args.command == "primary":
            return cmd_primary(args)
        if args.command == "secondary":
            return cmd_secondary(args)
        if args.command == "up":
            from colo.up import cmd_up
            return cmd_up(args)
        if args.command == "down":
            from colo.up import cmd_down
            if args.name_option is not None:
                if args.name is not None and args.name != args.name_option:
                    print(f"colo down: error: two clusters named: {args.name} and --name {args.name_option}",
                          file=sys.stderr)
                    return EXIT_ERROR
                args.name = args.name_option
            return cmd_down(args, lambda c: _key(args, c))
        if args.command == "status":
            return cmd_status(args)
        if args.command == "failover":
            return cmd_failover(args)
        if args.command == "switchover":
            return cmd_switchover(args)
        if args.command == "demo":
            from colo.demo import run_demo
            return run_demo(args)
        if args.command == "keygen":
            return cmd_keygen(args)
        if args.command == "stats":
            return cmd_stats(args)
        if args.command in ("trace", "view"):
            from colo import teachcli
            return teachcli.run(args)
    except (ColoError, ToyVMError, OSError, ValueError) as e:
        print(f"colo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR


def cmd_gateway(args: argparse.Namespace) -> int:
    from colo.gateway import Gateway, GatewayConfig
    _trace_setup(args, "gateway")
    gw = Gateway(GatewayConfig(_key(args), args.listen, args.service, args.heartbeat_timeout, args.trace,
                               mode=args.mode, compare_timeout=args.compare_timeout / 1000, encrypt=args.encrypt,
                               slow_timeout=args.client_timeout, state_file=args.state_file))
    _on_term(lambda *_: gw.stop())
    if not args.ready_file and not args.quiet:  # a harness reads the ready file; a person reads this
        print(f"colo gateway: nodes and control on {gw.listen_address[0]}:{gw.listen_address[1]}, "
              f"clients on {gw.service_address[0]}:{gw.service_address[1]}", file=sys.stderr, flush=True)
    _write_ready(args.ready_file, {"listen": list(gw.listen_address), "service": list(gw.service_address),
                                   "pid": os.getpid()})
    gw.run()
    return 0


def _node_config(args: argparse.Namespace, **extra: Any) -> Any:
    from colo.node import NodeConfig
    return NodeConfig(key=_key(args), gateway=args.gateway, heartbeat_timeout=args.heartbeat_timeout,
                      trace=args.trace, hooks=args.hooks, mode=args.mode, interval=args.interval / 1000,
                      backstop=args.backstop / 1000, stats=args.stats, encrypt=args.encrypt,
                      console=args.console, copy=args.copy,
                      checkpoint_mode=args.checkpoint_mode, delta=args.delta, **extra)


def cmd_primary(args: argparse.Namespace) -> int:
    from colo.node import Mode, Node
    from colo.primary import PrimaryRole
    cfg = _node_config(args, guest=args.guest, ram=parse_size(args.ram), cmdline=args.cmdline)
    _trace_setup(args, "primary")
    node = Node(cfg, Mode.PRIMARY)
    role = PrimaryRole.boot(node)
    _on_term(lambda *_: node.request_shutdown())
    _write_ready(args.ready_file, {"pid": os.getpid(), "node": node.id})
    return node.run(role)


def cmd_secondary(args: argparse.Namespace) -> int:
    from colo.node import Mode, Node
    from colo.secondary import SecondaryRole

    def ready(address: tuple[str, int]) -> None:
        if not args.ready_file and not args.quiet:
            print(f"colo secondary: waiting for a primary on {address[0]}:{address[1]}", file=sys.stderr,
                  flush=True)
        _write_ready(args.ready_file, {"listen": list(address), "pid": os.getpid(), "node": node.id})

    cfg = _node_config(args, listen=args.listen, advertise=args.advertise, on_listening=ready)
    _trace_setup(args, "spare")
    node = Node(cfg, Mode.SECONDARY)
    if args.guest or args.ram:  # what this spare insists on (the gateway pairs it with nothing else)
        from colo.primary import guest_identity
        wants = guest_identity(Path(args.guest), parse_size(args.ram or "64M")) if args.guest else {}
        if not args.guest:
            wants = {"ram": parse_size(args.ram)}
        elif not args.ram:
            wants.pop("ram")
        node.wants = wants
    role = SecondaryRole(node)
    role.bind()  # before the first hello (node.run starts the I/O thread)
    _on_term(lambda *_: node.request_shutdown())
    return node.run(role)


# -- control commands ----------------------------------------------------------------------------------------
def _target(args: argparse.Namespace) -> tuple[tuple[str, int], bytes, bool]:
    """The gateway a control command talks to, the key and whether to encrypt: --gateway, or a `colo up`
    cluster on this host (--name, or the only one running)."""
    if args.gateway is not None:
        if args.name is not None:
            raise ColoError("give --gateway or --name, not both")
        return tuple(args.gateway), _key(args), args.encrypt is not False  # type: ignore[return-value]
    c = rundir.select(args.name)
    if c.gateway is None:
        raise ColoError(f"the cluster {c.name!r} is still starting: try again in a moment")
    encrypt = bool(c.info.get("encrypt", True)) if args.encrypt is None else args.encrypt
    return c.gateway, _key(args, c), encrypt


def cmd_status(args: argparse.Namespace) -> int:
    gateway, key, encrypt = _target(args)
    reply: StatusReply = ask_gateway(gateway, key, StatusRequest(), StatusReply, encrypt=encrypt)
    info = reply.info
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(format_status(info))
    return 0


def format_status(info: dict[str, Any]) -> str:
    """The status as an aligned table: one row per role, then the service line and the recent events."""
    g = info["gateway"]
    rows: list[tuple[str, ...]] = [("role", "node", "gen", "pid", "cpus", "address", "state", "epoch",
                                    "checkpoints", "triggers")]
    rows.append(("gateway", g.get("id", "-"), str(g.get("generation", "-")), str(g.get("pid", "-")),
                 g.get("cpus", "-"), g.get("listen", "-"),
                 f"{g.get('service_state', '?')}, clients on {g.get('service', '?')}", "", "", ""))

    def row(role: str, n: dict[str, Any]) -> tuple[str, ...]:
        if not n.get("connected") and not n.get("id"):
            return (role, "-", "", "", "", "", "none", "", "", "")
        state = n.get("state", "?") + (" [active]" if n.get("active") else "")
        if n.get("lost"):
            state = f"lost: {n['lost']}"
        elif n.get("silent"):
            state += " (silent)"
        triggers = ", ".join(f"{k} {v}" for k, v in sorted(n.get("triggers", {}).items()))
        return (role, n.get("id", "?"), str(n.get("generation", "")), str(n.get("pid", "?")),
                n.get("cpus", "-"), n.get("address") or "-", state, str(n.get("epoch", "")),
                str(n.get("checkpoints", "")), triggers)

    rows.append(row("primary", info["nodes"].get("primary", {})))
    rows.append(row("secondary", info["nodes"].get("secondary", {})))
    rows += [row("spare", n) for n in info.get("spares", [])]
    rows += [row("lost", n) for n in info.get("lost", [])[-3:]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 7, 8}  # numbers
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]
    lines.append(f"service: {g.get('service_state', '?')} ({'protected' if g.get('protected') else 'not protected'}), "
                 f"{g.get('mode', 'periodic')} mode, generation {g.get('generation', '?')}, "
                 f"{g.get('failovers', 0)} failovers, {g.get('clients', 0)} clients, input seq {g.get('input_seq')}, "
                 f"output released up to {g.get('released_output_seq')}, {g.get('held_outputs', 0)} held, "
                 f"{g.get('logged_inputs', 0)} inputs logged")
    lines += _copy_lines(info["nodes"].get("primary", {}))
    if g.get("voided"):  # copies no gateway may promote (the primary went on without them): docs/replication.md
        lines.append("voided copies (never promoted): " + ", ".join(
            f"{node} (generation {gen})" for node, gen in sorted(g["voided"].items())))
    for ev in info.get("events", [])[-6:]:
        details = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("time", "event"))
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(ev['time']))} {ev['event']} {details}")
    return "\n".join(lines)


def _copy_lines(primary: dict[str, Any]) -> list[str]:
    """The copy to a new secondary: under way (how far), or the last one (what it cost)."""
    if primary.get("copy"):
        c = primary["copy"]
        return [f"copy to {c.get('secondary')}: round {c.get('round', 0) + 1}, {c.get('pages_left')} pages left "
                f"in it, {c.get('mb_s')} MB/s, {c.get('seconds')} s so far (the guest serves meanwhile)"]
    if primary.get("last_copy"):
        c = primary["last_copy"]
        how = "live" if c.get("live") else "stop-and-copy"
        stalled = ", did not converge" if c.get("stalled") else ""
        return [f"last copy: {how}, {c.get('rounds')} rounds, {c.get('mb')} MB in {c.get('seconds')} s, guest "
                f"stopped {c.get('stop_ms')} ms at the end ({c.get('final_pages')} pages){stalled}"]
    return []


def cmd_switchover(args: argparse.Namespace) -> int:
    from colo.messages import SwitchoverCommand
    address, key, encrypt = _target(args)
    res: CommandResult = ask_gateway(address, key, SwitchoverCommand(args.swap, args.reason), CommandResult,
                                     encrypt=encrypt)
    if not res.ok:
        print(f"colo switchover: {res.reason}", file=sys.stderr)
        return 1
    # Wait for the promotion, and say what clients saw.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info: StatusReply = ask_gateway(address, key, StatusRequest(), StatusReply, encrypt=encrypt)
        events = info.info.get("events", [])
        done = [e for e in events if e.get("event") == "promoted" and "switchover" in str(e.get("reason", ""))]
        failed = [e for e in events if e.get("event") == "switchover-failed"]
        if done:
            e = done[-1]
            print(f"colo switchover: done: node {e.get('node')} serves from checkpoint {e.get('epoch')} as the "
                  f"primary of generation {e.get('generation')}; clients stalled {e.get('failover_ms')} ms")
            return 0
        if failed:
            print(f"colo switchover: failed: {failed[-1].get('reason')}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print("colo switchover: no result within 30 s (see colo status)", file=sys.stderr)
    return 1


def cmd_failover(args: argparse.Namespace) -> int:
    gateway, key, encrypt = _target(args)
    res: CommandResult = ask_gateway(gateway, key, FailoverCommand(args.reason), CommandResult, encrypt=encrypt)
    print(f"colo failover: {res.reason}", file=sys.stderr if not res.ok else sys.stdout)
    return 0 if res.ok else 1


# -- keys and stats files --------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    from colo.keyfile import write_new_key
    path = write_new_key(args.file, force=args.force)
    print(f"colo keygen: wrote a new key to {path} (mode 0600); copy it to each host and pass --key-file {path}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from colo import statsview
    if args.plot:
        statsview.require_matplotlib()  # before reading a large file for nothing
    records, skipped = statsview.load(args.file)
    runs = statsview.select(statsview.group_runs(records), args.run)
    if args.json:
        print(json.dumps([statsview.summarize(r) for r in runs], indent=2))
    else:
        print(statsview.report(args.file, runs, skipped))
    if args.plot:
        if not runs:
            raise ColoError(f"{args.file} has no checkpoint records to plot")
        statsview.plot(runs, args.plot, title=Path(args.file).name)
        print(f"colo stats: plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
