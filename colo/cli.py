"""`colo`: run the gateway, the primary and the secondary (each may be on its own host), or all three locally."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from colo.auth import load_key
from colo.cluster import LocalCluster, ask_gateway
from colo.errors import ColoError
from colo.messages import CommandResult, FailoverCommand, StatusReply, StatusRequest
from colo.node import DEFAULT_HEARTBEAT_TIMEOUT
from tcpclients import parse_address
from toyvm.errors import ToyVMError
from toyvm.guests import argument as guest_argument
from toyvm.ram import parse_size
from toyvm.version import version_line

EXIT_ERROR = 2
# `colo --help` and the README show this table; the node codes come from colo.node (NodeStop and its kinds).
EXIT_CODES = """\
exit status:
  0    stopped cleanly: SIGINT or SIGTERM (Ctrl-C), or the command did what it was asked
  1    colo failover: the gateway refused; colo demo: a write was lost or a connection broke
  2    a bad command line, or an error that stopped the command (the message says which)
  3    primary or secondary: lost the gateway, stopped so that there is never a second active copy
  4    primary or secondary: fenced by the gateway (another node is active)
  6    secondary: promoted, or lost the primary, before the initial copy arrived: nothing to take over
  N    primary, or a promoted secondary: the guest powered off with exit code N
"""


def run_dir() -> Path:
    """Where `colo up` keeps its key and addresses, so `colo status` needs no arguments on this host."""
    base = os.environ.get("COLO_RUN_DIR") or os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
                                                         f"colo-{os.getuid()}")
    return Path(base)


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key(args: argparse.Namespace) -> bytes:
    if getattr(args, "key_file", None):
        return load_key(args.key_file)
    if os.environ.get("COLO_KEY"):
        return load_key()
    up = run_dir() / "key"
    if up.exists():
        return load_key(up)
    return load_key()  # raises: names both ways to give a key


def _write_ready(path: str | None, info: dict[str, Any]) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", help="shared key file (else $COLO_KEY, else the key of `colo up` on this host)")
    p.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="S",
                   help=f"a peer silent this long is lost (default {DEFAULT_HEARTBEAT_TIMEOUT} s)")
    p.add_argument("--trace", action="store_true", help="print every protocol message with a timestamp")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")
    loud.add_argument("-q", "--quiet", action="store_true", help="log only errors to stderr")
    _encrypt_option(p)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)  # `colo up` learns the chosen ports from it


def _encrypt_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encrypt", action=argparse.BooleanOptionalAction, default=True,
                   help="encrypt every frame (AES-256-GCM) besides authenticating it; both ends of a connection "
                        "must agree (default: on; --no-encrypt: authenticated only)")


def _mode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("periodic", "hybrid"), default="periodic",
                   help="periodic: checkpoint every --interval, the secondary VM waits; hybrid (COLO): both VMs "
                        "run, outputs are compared, a mismatch triggers a checkpoint (default periodic)")


def _vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", default="64M", help="guest RAM, e.g. 64M or 1G (default 64M)")
    p.add_argument("--cmdline", default="", help="command line passed to the guest")
    _checkpoint_options(p)


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=100.0, metavar="MS",
                   help="periodic mode: checkpoint interval in milliseconds (default 100)")
    p.add_argument("--backstop", type=float, default=2000.0, metavar="MS",
                   help="hybrid mode: checkpoint at least this often, in milliseconds (default 2000)")
    _mode_option(p)
    p.add_argument("--checkpoint-mode", choices=("strict", "pipelined"), default="pipelined",
                   help="pipelined (default): the guest resumes as soon as the state is copied, which is sent "
                        "while it runs; strict: the guest stays stopped until the secondary has loaded it")
    p.add_argument("--delta", action="store_true",
                   help="send each dirty page XOR its content at the previous checkpoint (fewer bytes for guests "
                        "that change parts of pages, such as kvstore; more for ones that rewrite whole pages; the "
                        "primary keeps a copy of guest RAM)")
    p.add_argument("--stats", metavar="FILE", help="append one JSON line per checkpoint to FILE")
    p.add_argument("--hooks", choices=("auto", "python", "native"), default=None,
                   help="toyvm hook engine (default: native when a C compiler exists)")


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
    g.add_argument("--compare-timeout", type=float, default=200.0, metavar="MS",
                   help="hybrid mode: output left unmatched this long triggers a checkpoint (default 200)")
    _mode_option(g)
    _common(g)

    p = sub.add_parser("primary", help="run the primary VM and checkpoint it to the secondary",
                       description="Boot GUEST, serve it through the gateway, checkpoint it to the secondary.")
    p.add_argument("guest", type=guest_argument, metavar="GUEST",
                   help="guest image (flat binary or ELF64) or a bundled guest's name, e.g. kvstore")
    p.add_argument("--gateway", type=_address, required=True, metavar="HOST:PORT", help="the gateway's --listen")
    _vm_options(p)
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
    _checkpoint_options(s)
    _common(s)

    u = sub.add_parser("up", help="start gateway, secondary and primary locally; Ctrl-C stops them",
                       description="Start the three roles as separate local processes with a fresh key.")
    u.add_argument("guest", type=guest_argument, metavar="GUEST",
                   help="guest image (flat binary or ELF64) or a bundled guest's name, e.g. kvstore")
    u.add_argument("--service", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="where clients connect (default: a free port on 127.0.0.1)")
    _vm_options(u)
    _common(u)

    st = sub.add_parser("status", help="show each role, its state and checkpoints",
                        description="Ask the gateway for the state of every role.")
    st.add_argument("--gateway", type=_address, metavar="HOST:PORT", help="default: the `colo up` on this host")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    st.add_argument("--key-file", help="shared key file (default: as for the other commands)")
    _encrypt_option(st)

    f = sub.add_parser("failover", help="force a failover to the secondary now",
                       description="Fence the primary and promote the secondary.")
    f.add_argument("--gateway", type=_address, metavar="HOST:PORT", help="default: the `colo up` on this host")
    f.add_argument("--key-file", help="shared key file")
    _encrypt_option(f)
    f.add_argument("--reason", default="operator request", help="recorded with the failover")

    d = sub.add_parser("demo", help="the key-value guest survives a SIGKILLed primary (no arguments needed)",
                       description="Replicate the key-value guest, write to it, kill the primary, check that no "
                                   "acknowledged write was lost.")
    d.add_argument("--seconds", type=float, default=12.0, help="how long the client workload runs (default 12)")
    d.add_argument("--clients", type=int, default=8, help="concurrent writers (default 8)")

    k = sub.add_parser("keygen", help="write a fresh shared key file (mode 0600) for roles on several hosts",
                       description="Write a fresh random key to FILE, readable by its owner only. Copy it to "
                                   "each host and pass it to every role with --key-file.")
    k.add_argument("file", metavar="FILE", help="where to write the key")
    k.add_argument("--force", action="store_true", help="replace FILE if it exists")

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


def _setup_logging(args: argparse.Namespace) -> None:
    level = (logging.ERROR if getattr(args, "quiet", False) else
             logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    # Local wall-clock time to the millisecond: lines from roles on several hosts can be merged and compared.
    logging.basicConfig(level=level, format="%(asctime)s.%(msecs)03d colo %(message)s",  # messages start with the role
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr)


def _on_term(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        if args.command == "gateway":
            return cmd_gateway(args)
        if args.command == "primary":
            return cmd_primary(args)
        if args.command == "secondary":
            return cmd_secondary(args)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "failover":
            return cmd_failover(args)
        if args.command == "demo":
            from colo.demo import run_demo
            return run_demo(args)
        if args.command == "keygen":
            return cmd_keygen(args)
        if args.command == "stats":
            return cmd_stats(args)
    except (ColoError, ToyVMError, OSError, ValueError) as e:
        print(f"colo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR


def cmd_gateway(args: argparse.Namespace) -> int:
    from colo.gateway import Gateway, GatewayConfig
    gw = Gateway(GatewayConfig(_key(args), args.listen, args.service, args.heartbeat_timeout, args.trace,
                               mode=args.mode, compare_timeout=args.compare_timeout / 1000, encrypt=args.encrypt))
    _on_term(lambda *_: gw.stop())
    print(f"colo gateway: nodes and control on {gw.listen_address[0]}:{gw.listen_address[1]}, "
          f"clients on {gw.service_address[0]}:{gw.service_address[1]}", file=sys.stderr, flush=True)
    _write_ready(args.ready_file, {"listen": list(gw.listen_address), "service": list(gw.service_address),
                                   "pid": os.getpid()})
    gw.run()
    return 0


def _node_config(args: argparse.Namespace, **extra: Any) -> Any:
    from colo.node import NodeConfig
    if args.interval <= 0 or args.backstop <= 0:
        raise ValueError("--interval and --backstop must be positive")
    return NodeConfig(key=_key(args), gateway=args.gateway, heartbeat_timeout=args.heartbeat_timeout,
                      trace=args.trace, hooks=args.hooks, mode=args.mode, interval=args.interval / 1000,
                      backstop=args.backstop / 1000, stats=args.stats, encrypt=args.encrypt,
                      checkpoint_mode=args.checkpoint_mode, delta=args.delta, **extra)


def cmd_primary(args: argparse.Namespace) -> int:
    from colo.node import Mode, Node
    from colo.primary import PrimaryRole
    cfg = _node_config(args, guest=args.guest, ram=parse_size(args.ram), cmdline=args.cmdline)
    node = Node(cfg, Mode.PRIMARY)
    role = PrimaryRole.boot(node)
    _on_term(lambda *_: node.request_shutdown())
    _write_ready(args.ready_file, {"pid": os.getpid(), "node": node.id})
    return node.run(role)


def cmd_secondary(args: argparse.Namespace) -> int:
    from colo.node import Mode, Node
    from colo.secondary import SecondaryRole

    def ready(address: tuple[str, int]) -> None:
        print(f"colo secondary: waiting for a primary on {address[0]}:{address[1]}", file=sys.stderr, flush=True)
        _write_ready(args.ready_file, {"listen": list(address), "pid": os.getpid(), "node": node.id})

    cfg = _node_config(args, listen=args.listen, advertise=args.advertise, on_listening=ready)
    node = Node(cfg, Mode.SECONDARY)
    _on_term(lambda *_: node.request_shutdown())
    return node.run(SecondaryRole(node))


# -- control commands ----------------------------------------------------------------------------------------
def _gateway_address(args: argparse.Namespace) -> tuple[str, int]:
    if args.gateway is not None:
        return tuple(args.gateway)  # type: ignore[return-value]
    up = run_dir() / "up.json"
    if not up.exists():
        raise ColoError(f"no --gateway given and no `colo up` is running on this host ({up} not found)")
    return tuple(json.loads(up.read_text())["gateway"])  # type: ignore[return-value]


def cmd_status(args: argparse.Namespace) -> int:
    reply: StatusReply = ask_gateway(_gateway_address(args), _key(args), StatusRequest(), StatusReply,
                                     encrypt=args.encrypt)
    info = reply.info
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(format_status(info))
    return 0


def format_status(info: dict[str, Any]) -> str:
    """The status as an aligned table: one row per role, then the service line and the recent events."""
    g = info["gateway"]
    rows = [("role", "node", "gen", "pid", "address", "state", "epoch", "checkpoints", "triggers")]
    rows.append(("gateway", g.get("id", "-"), str(g.get("generation", "-")), str(g.get("pid", "-")),
                 g.get("listen", "-"), f"{g.get('service_state', '?')}, clients on {g.get('service', '?')}", "", "",
                 ""))

    def row(role: str, n: dict[str, Any]) -> tuple[str, ...]:
        if not n.get("connected") and not n.get("id"):
            return (role, "-", "", "", "", "none", "", "", "")
        state = n.get("state", "?") + (" [active]" if n.get("active") else "")
        if n.get("lost"):
            state = f"lost: {n['lost']}"
        elif n.get("silent"):
            state += " (silent)"
        triggers = ", ".join(f"{k} {v}" for k, v in sorted(n.get("triggers", {}).items()))
        return (role, n.get("id", "?"), str(n.get("generation", "")), str(n.get("pid", "?")),
                n.get("address") or "-", state, str(n.get("epoch", "")), str(n.get("checkpoints", "")), triggers)

    rows.append(row("primary", info["nodes"].get("primary", {})))
    rows.append(row("secondary", info["nodes"].get("secondary", {})))
    rows += [row("spare", n) for n in info.get("spares", [])]
    rows += [row("lost", n) for n in info.get("lost", [])[-3:]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 6, 7}  # numbers
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.append(f"service: {g.get('service_state', '?')} ({'protected' if g.get('protected') else 'not protected'}), "
                 f"{g.get('mode', 'periodic')} mode, generation {g.get('generation', '?')}, "
                 f"{g.get('failovers', 0)} failovers, {g.get('clients', 0)} clients, input seq {g.get('input_seq')}, "
                 f"output released up to {g.get('released_output_seq')}, {g.get('held_outputs', 0)} held, "
                 f"{g.get('logged_inputs', 0)} inputs logged")
    for ev in info.get("events", [])[-6:]:
        details = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("time", "event"))
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(ev['time']))} {ev['event']} {details}")
    return "\n".join(lines)


def cmd_failover(args: argparse.Namespace) -> int:
    res: CommandResult = ask_gateway(_gateway_address(args), _key(args), FailoverCommand(args.reason), CommandResult,
                                     encrypt=args.encrypt)
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


# -- colo up ---------------------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    d = run_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster = LocalCluster(args.guest, ram=args.ram, cmdline=args.cmdline, interval_ms=args.interval,
                           service=args.service, stats=args.stats, trace=args.trace,
                           heartbeat_timeout=args.heartbeat_timeout, hooks=args.hooks, directory=d,
                           verbose=args.verbose, mode=args.mode, backstop_ms=args.backstop, encrypt=args.encrypt,
                           checkpoint_mode=args.checkpoint_mode, delta=args.delta)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    _on_term(on_signal)
    code = 0
    try:
        cluster.start()
        up = {"gateway": list(cluster.gateway), "service": list(cluster.service_address),
              "pids": {r: p.pid for r, p in cluster.procs.items()}, "key_file": str(cluster.key_file),
              "stats": args.stats}
        _write_ready(str(d / "up.json"), up)
        host, port = cluster.service_address
        print(f"colo up: {Path(args.guest).name} is replicated ({args.mode} mode); clients connect to "
              f"{host}:{port}\n"
              f"  e.g. redis-cli -p {port} PING      (kvstore)\n"
              f"  colo status   shows the roles; colo failover forces a failover; Ctrl-C stops everything",
              flush=True)
        while not stopping:
            if cluster.procs["gateway"].poll() is not None:
                print("colo up: the gateway exited", file=sys.stderr)
                code = 1
                break
            ended = _service_ended(cluster)
            if ended is not None:
                code, why = ended
                print(f"colo up: {why}", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        codes = cluster.stop()
        (d / "up.json").unlink(missing_ok=True)
        print(f"colo up: stopped ({', '.join(f'{r} {c}' for r, c in codes.items())})", file=sys.stderr)
    return code


def _service_ended(cluster: LocalCluster) -> tuple[int, str] | None:
    """(exit code, why) once the guest has ended: powered off, or faulted (125, as `toyvm run`)."""
    try:
        info = cluster.status(timeout=2.0)
    except (ColoError, OSError):
        return None
    g = info["gateway"]
    if g.get("service_state") != "ended":
        return None
    why = next((e.get("reason", "") for e in reversed(info.get("events", [])) if e.get("event") == "guest-ended"),
               "the guest ended")
    return int(g.get("ended_code") or 0), why


if __name__ == "__main__":
    sys.exit(main())
