"""`colo up` as an operator runs it: a real process in its own session, its stdout and stderr in files, its run
directory found through COLO_RUN_DIR, every process it started checked by pid at the end.

Every wait has a deadline; `close` kills whatever is left (a test that failed half-way leaves nothing running), and
`colo up` holds a lifeline to the test run (colo.lifeline), so a pytest that is killed leaves nothing either.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from colo.lifeline import Lifeline
from colo.rundir import proc_alive
from colo_e2e.helpers import child_env, wait_for
from conftest import ROOT, guest

UP_TIMEOUT = 40.0  # seconds from `colo up` to a protected pair (two cores shared with other test runs)


def pid_running(pid: int) -> bool:
    """True if the process exists and is not a zombie (a fenced role stays a zombie until `colo up` reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pids: dict[str, int], timeout: float, what: str) -> float:
    """Wait until none of `pids` runs; returns how long that took."""
    t0 = time.monotonic()
    wait_for(lambda: not [n for n, p in pids.items() if pid_running(p)], timeout,
             f"{what}: every process to end (still running: "
             f"{ {n: p for n, p in pids.items() if pid_running(p)} })")
    return time.monotonic() - t0


def colo(run_dir: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """One `python -m colo ...` with this run root."""
    env = child_env({"COLO_RUN_DIR": str(run_dir)})
    env.pop("COLO_KEY", None)
    return subprocess.run([sys.executable, "-m", "colo", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Up:
    """One `colo up GUEST --ram 16M --interval 30 ARGS...` process."""

    def __init__(self, run_dir: Path, workdir: Path, *args: str, image: str | Path | None = None,
                 tag: str = "up") -> None:
        self.run_dir, self.workdir, self.tag = run_dir, workdir, tag
        self.env = child_env({"COLO_RUN_DIR": str(run_dir)})
        self.env.pop("COLO_KEY", None)
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = workdir / f"{tag}.out", workdir / f"{tag}.err"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.argv = [sys.executable, "-m", "colo", "up", str(image or guest("kvstore")), "--ram", "16M",
                     "--interval", "30", *args]
        # Tied to the test run as `colo up` ties its roles to itself: a killed pytest leaves no cluster running.
        self._lifeline = Lifeline()
        self.proc = subprocess.Popen([*self.argv, *self._lifeline.args()], cwd=ROOT, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                     start_new_session=True, pass_fds=self._lifeline.pass_fds)
        self.info: dict[str, Any] = {}
        self.seen: dict[str, dict[str, Any]] = {}  # every process the cluster recorded ({pid, start}), for close()

    # -- the run directory ------------------------------------------------------------------------------------
    def cluster_dir(self) -> Path | None:
        """Ours: the run directory whose up.json names our pid."""
        if not self.run_dir.is_dir():
            return None
        for d in self.run_dir.iterdir():
            info = self._read(d)
            if info and info.get("procs", {}).get("up", {}).get("pid") == self.proc.pid:
                return d
        return None

    @staticmethod
    def _read(d: Path) -> dict[str, Any] | None:
        try:
            return dict(json.loads((d / "up.json").read_text()))
        except (OSError, ValueError):
            return None

    def read(self) -> dict[str, Any]:
        d = self.cluster_dir()
        info = self._read(d) if d is not None else None
        if info:
            self.info = info
            self.seen.update(info.get("procs", {}))
        return self.info

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def pids(self) -> dict[str, int]:
        return dict(self.info.get("pids", {}))

    def wait_up(self, timeout: float = UP_TIMEOUT) -> dict[str, Any]:
        """Until the banner: up.json says protected."""
        def ready() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"colo up exited with {self.proc.returncode}:\n{self.stderr()}"
            info = self.read()
            return info if info.get("state") == "protected" else None
        try:
            return wait_for(ready, timeout, "colo up to protect its guest")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def logs(self) -> str:
        """colo up's stderr and, while its run directory exists, every role's log (for a failure message)."""
        parts = [f"-- colo up stderr:\n{self.stderr()[-3000:]}"]
        d = self.cluster_dir()
        for log in sorted(d.glob("*.log")) if d is not None else []:
            parts.append(f"-- {log.name}:\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # -- commands ---------------------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return colo(self.run_dir, *args, timeout=timeout)

    def status(self, *args: str) -> dict[str, Any]:
        r = self.cli("status", "--json", *args)
        assert r.returncode == 0, f"colo status --json {' '.join(args)} failed ({r.returncode}): {r.stderr}"
        return dict(json.loads(r.stdout))

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"colo up did not exit within {timeout} s:\n{self.stderr()[-3000:]}") from None

    def let_go(self) -> None:
        """Close the test run's end of the lifeline, as a killed pytest would: `colo up` stops on its own."""
        self._lifeline.close()

    def close(self) -> None:
        self.read()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for p in self.seen.values():  # never leave a role behind, even if `colo up` was killed
            if proc_alive(int(p["pid"]), p.get("start")):
                os.kill(int(p["pid"]), signal.SIGKILL)
        self.let_go()
        self._out.close()
        self._err.close()
