"""CPU lists (`--cpus`, colo/sched.py) and which CPUs a local cluster gives its nodes (LocalCluster's `pin`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colo import cluster as cluster_module
from colo import sched
from colo.cli import build_parser
from colo.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]


@given(st.sets(st.integers(0, 300), min_size=1))
def test_a_cpu_list_reads_back_as_the_cpus_it_names(cpus: set[int]) -> None:
    text = sched.format_cpus(cpus)
    assert sched.parse_cpus(text) == sorted(cpus)
    assert "--" not in text and not text.startswith(",")


def test_cpu_lists_as_taskset_writes_them() -> None:
    assert sched.parse_cpus("0") == [0]
    assert sched.parse_cpus("2-3") == [2, 3]
    assert sched.parse_cpus("0,2-4, 7") == [0, 2, 3, 4, 7]
    assert sched.format_cpus([5, 0, 1, 2]) == "0-2,5"
    for bad in ("", "a", "1-", "-1", "3-1", "1,,2", "1.5"):
        with pytest.raises(ValueError):
            sched.parse_cpus(bad)


def test_the_nodes_get_two_equal_disjoint_halves() -> None:
    assert sched.node_halves([]) is None and sched.node_halves([3]) is None
    assert sched.node_halves([0, 1]) == ([0], [1])
    assert sched.node_halves([0, 1, 2]) == ([0], [1])  # the odd one: for the gateway and clients
    assert sched.node_halves([0, 1, 4, 5]) == ([0, 1], [4, 5])


def test_pinning_to_a_cpu_the_process_may_not_use_is_refused_and_changes_nothing() -> None:
    before = sched.allowed_cpus()
    problem = sched.pin([max(before) + 1000])
    assert problem is not None and "is not one this process may use" in problem, problem
    assert sched.allowed_cpus() == before


def test_a_role_with_a_bad_cpu_list_says_so_and_exits_2() -> None:
    for cpus, why in (("x", "is not a CPU list"), ("4096", "is not one this process may use")):
        done = subprocess.run([sys.executable, "-m", "colo", "gateway", "--cpus", cpus], capture_output=True,
                              text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        assert why in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_every_role_and_colo_up_take_cpus_and_up_takes_pin() -> None:
    p = build_parser()
    for cmd in (["gateway"], ["primary", "kvstore", "--gateway", "127.0.0.1:1"],
                ["secondary", "--gateway", "127.0.0.1:1"], ["up", "kvstore"]):
        assert p.parse_args(cmd).cpus is None
        assert p.parse_args([*cmd, "--cpus", "0-1"]).cpus == [0, 1]
    assert p.parse_args(["up", "kvstore"]).pin == "auto"
    assert p.parse_args(["up", "kvstore", "--pin", "off"]).pin == "off"


class _Proc:
    def __init__(self, alive: bool = True) -> None:
        self.alive = alive

    def poll(self) -> int | None:
        return None if self.alive else -9


def _cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: list[int], mode: str = "periodic",
             pin: str = "auto") -> LocalCluster:
    monkeypatch.setattr(cluster_module, "allowed_cpus", lambda: cpus)
    return LocalCluster("kvstore", directory=tmp_path, lifeline=False, mode=mode, pin=pin)


def _start(c: LocalCluster, name: str) -> list[int]:
    """The CPUs `_spawn` gives node `name` (its --cpus), and a process that stands for it."""
    args = c._pin_node(name)
    c.procs[name] = _Proc()  # type: ignore[assignment]
    assert args == (["--cpus", sched.format_cpus(c.node_cpus[name])] if args else [])
    return sched.parse_cpus(args[1]) if args else []


def test_a_hybrid_cluster_gives_each_live_node_its_own_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _cluster(tmp_path, monkeypatch, [0, 1, 2, 3], mode="hybrid")
    assert _start(c, "secondary") == [0, 1]
    assert _start(c, "primary") == [2, 3]
    assert _start(c, "secondary-2") == []  # a third node while both halves are taken: anywhere
    c.procs["primary"].alive = False  # type: ignore[attr-defined]
    assert _start(c, "secondary-3") == [2, 3]  # the replacement takes the half the dead node had


def test_no_pinning_in_periodic_mode_with_pin_off_or_on_one_cpu(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert _start(_cluster(tmp_path, monkeypatch, [0, 1]), "secondary") == []  # periodic: the default mode
    assert _start(_cluster(tmp_path, monkeypatch, [0, 1], mode="hybrid", pin="off"), "secondary") == []
    assert _start(_cluster(tmp_path, monkeypatch, [0], mode="hybrid"), "secondary") == []
    with pytest.raises(ValueError, match="pin must be one of auto, off"):
        LocalCluster("kvstore", directory=tmp_path, lifeline=False, pin="always")
