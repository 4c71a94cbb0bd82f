"""`colo view`: one page, served by the standard library, that shows a real replicated pair live.

GET  /                      the page (static/index.html, view.js, view.css: plain JavaScript and SVG, nothing loaded
                            from anywhere else)
GET  /events?from=N         Server-Sent Events: every event of the run from number N on, then as they come
GET  /api/state             the run, the mode, the gateway's status, the messages held in step mode
GET  /api/export?format=perfetto | format=mermaid&epoch=N | format=mermaid&failover=1   a download
POST /api/kill              {"role": "primary"|"secondary"}: SIGKILL that process
POST /api/checkpoint        a checkpoint now (trigger manual)
POST /api/step              {"on": bool} step mode; {"delay_ms": N} slow motion
POST /api/step/once         let the message that waited longest go
POST /api/redis             {"command": "SET k v"}: through the gateway, as a client; answers when the reply comes
POST /api/mode              {"mode": "periodic"|"hybrid"}: a new pair in that mode
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlparse

from colo import traceexport
from colo.errors import ColoError
from colo.events import merge
from colo.view.session import ViewSession
from tcpclients import ListenError

log = logging.getLogger("colo.view")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/view.js": ("view.js", "text/javascript"),
          "/view.css": ("view.css", "text/css")}
KEEPALIVE = 10.0  # seconds between SSE comments on a quiet stream


def static_file(name: str) -> bytes:
    return (resources.files("colo.view") / "static" / name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("view: %s", format % args)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the page went away (a reload, a closed tab)

    def _json(self, obj: Any, code: int = 200) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        if not n:
            return {}
        data = json.loads(self.rfile.read(min(n, 1 << 16)))
        return data if isinstance(data, dict) else {}

    # -- routes -----------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        view = self.server.view
        if url.path in STATIC:
            name, ctype = STATIC[url.path]
            self._send(200, static_file(name), ctype)
        elif url.path == "/events":
            self._events(int(q.get("from", self.headers.get("Last-Event-ID") or 0) or 0))
        elif url.path == "/api/state":
            self._json(view.state())
        elif url.path == "/api/export":
            self._export(q)
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        view = self.server.view
        path = urlparse(self.path).path
        try:
            body = self._body()
            if path == "/api/kill":
                text = view.kill(str(body.get("role", "")))
            elif path == "/api/checkpoint":
                text = view.checkpoint()
            elif path == "/api/step":
                text = view.set_step(body.get("on"), body.get("delay_ms"))
            elif path == "/api/step/once":
                text = view.step_once()
            elif path == "/api/redis":
                self._json({"ok": True, **view.redis(str(body.get("command", "")))})
                return
            elif path == "/api/mode":
                mode = str(body.get("mode", ""))
                if mode not in ("periodic", "hybrid"):
                    raise ValueError("mode must be periodic or hybrid")
                # Answer first: the restart takes seconds, and the page follows it on its event stream.
                threading.Thread(target=self.server.restart, args=(mode,), daemon=True).start()
                text = f"restarting the pair in {mode} mode"
            else:
                self._send(404, b"not found\n", "text/plain")
                return
        except (ColoError, OSError, ValueError) as e:
            self._json({"ok": False, "error": str(e)}, HTTPStatus.CONFLICT)
            return
        self._json({"ok": True, "message": text})

    def _events(self, first: int) -> None:
        view = self.server.view
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        run = view.run_no
        self.close_connection = True
        try:
            self.wfile.write(f"event: run\ndata: {json.dumps(view.state())}\n\n".encode())
            n = first
            while not self.server.stopping:
                if view.run_no != run:  # a restart: the page starts over
                    self.wfile.write(f"event: reset\ndata: {view.run_no}\n\n".encode())
                    self.wfile.flush()
                    return
                fresh = view.since(n, KEEPALIVE)
                if not fresh:
                    self.wfile.write(b": keepalive\n\n")
                else:
                    out = [f"id: {e['i'] + 1}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n" for e in fresh]
                    self.wfile.write("".join(out).encode())
                    n = fresh[-1]["i"] + 1
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return

    def _export(self, q: dict[str, str]) -> None:
        view = self.server.view
        evs = merge([dict(e) for e in view.events])
        try:
            if q.get("format") == "perfetto":
                body = json.dumps(traceexport.perfetto(evs), separators=(",", ":")).encode()
                name, ctype = f"colo-run{view.run_no}.perfetto.json", "application/json"
            elif q.get("format") == "mermaid":
                if q.get("failover"):
                    text, name = traceexport.mermaid_failover(evs), f"colo-run{view.run_no}-failover.mmd"
                else:
                    done = traceexport.epochs(evs)
                    epoch = int(q["epoch"]) if q.get("epoch") else (done[-1] if done else 1)
                    text, name = traceexport.mermaid_epoch(evs, epoch), f"colo-run{view.run_no}-epoch{epoch}.mmd"
                body, ctype = text.encode(), "text/plain; charset=utf-8"
            else:
                raise ValueError("format must be perfetto or mermaid")
        except ValueError as e:
            self._json({"ok": False, "error": str(e)}, HTTPStatus.CONFLICT)
            return
        self._send(200, body, ctype, {"Content-Disposition": f'attachment; filename="{name}"'})


class ViewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], view: ViewSession) -> None:
        super().__init__(address, Handler)
        self.view = view
        self.stopping = False
        self._restart_lock = threading.Lock()

    def restart(self, mode: str) -> None:
        with self._restart_lock:
            try:
                self.view.restart(mode)
            except (ColoError, OSError) as e:
                self.view.error = f"restart failed: {e}"
                log.error("view: %s", self.view.error)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/" if isinstance(host, str) else f"http://{host.decode()}:{port}/"

    def shutdown_all(self) -> None:
        self.stopping = True
        with self.view.cond:
            self.view.cond.notify_all()
        self.shutdown()


def run_view(args: argparse.Namespace) -> int:
    from colo.up import check_guest  # what `colo up` checks first: a guest that cannot boot fails here, clearly
    check_guest(args.guest, args.ram, args.cmdline, args.hooks)
    view = ViewSession(args.guest, mode=args.mode, interval_ms=args.interval, backstop_ms=args.backstop,
                       ram=args.ram, cmdline=args.cmdline, encrypt=args.encrypt,
                       heartbeat_timeout=args.heartbeat_timeout, hooks=args.hooks, trace_hex=args.trace_hex,
                       checkpoint_mode=args.checkpoint_mode)
    try:
        server = ViewServer((args.listen[0], args.listen[1]), view)
    except OSError as e:
        with contextlib.suppress(OSError):
            view.base.rmdir()  # the session's folder, still empty: nothing ran
        raise ListenError.of(args.listen, e, "serve the page on",
                             "another colo view? --listen HOST:0 takes any free port") from None
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        threading.Thread(target=server.shutdown_all, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="view-http", daemon=True)
    thread.start()
    print(f"colo view: starting the pair ({args.mode} mode, {args.checkpoint_mode} checkpoints); the page is at "
          f"{server.url}", file=sys.stderr,
          flush=True)
    try:
        view.start()
        print(f"colo view: {server.url}  (events: {view.trace_path}; Ctrl-C stops)", flush=True)
        if args.ready_file:
            from pathlib import Path
            Path(args.ready_file).write_text(json.dumps({"url": server.url, "dir": str(view.base)}))
        if not args.no_browser:
            webbrowser.open(server.url)
        while thread.is_alive() and not stopping:
            thread.join(0.5)
    finally:
        server.shutdown_all() if not stopping else None
        view.stop()
        server.server_close()
    return 0
