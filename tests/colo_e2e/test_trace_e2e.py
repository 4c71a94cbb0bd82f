"""The event stream of a real pair (three processes over TCP): `--trace` prints one line per message, in order,
with every field; the merged trace file matches every receipt to its send and exports cleanly; `colo up`'s log
tail puts trace lines in time order among the roles' log lines."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from colo import events, traceexport
from colo.cluster import LocalCluster
from colo.resp import Resp
from colo.up import LogTail
from colo_e2e.helpers import child_env, wait_for
from conftest import ROOT
from traceshape import check_mermaid, check_perfetto

pytestmark = pytest.mark.slow


def test_trace_one_line_per_message_in_order(tmp_path: Path) -> None:
    cluster = LocalCluster("kvstore", ram="16M", interval_ms=200, directory=tmp_path, trace=True)
    trace_file = cluster.trace_file = str(tmp_path / "trace.jsonl")
    err = open(tmp_path / "stderr.txt", "wb")
    try:
        cluster.start(stderr=err, stdout=subprocess.DEVNULL)
        cluster.wait_protected(30)
        with Resp(cluster.service_address, timeout=10) as r:
            assert r.call("SET", "k", "v") == "OK"
            assert r.call("GET", "k") == b"v"
        wait_for(lambda: len(traceexport.epochs(events.read(trace_file))) >= 6, 20, "six checkpoints")
    finally:
        cluster.stop()
        err.close()
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    msg_lines = [ln for ln in lines if re.match(r"\d{4}-\d\d-\d\d \S+ \S+ +-> ", ln)]
    assert msg_lines and not [ln for ln in lines if " <- " in ln and "client" not in ln]  # senders only
    evs = events.read(trace_file)
    for epoch in traceexport.epochs(evs)[:5]:
        def where(name: str) -> int:
            found = [i for i, ln in enumerate(msg_lines) if f" {name} epoch={epoch} " in ln + " "]
            assert len(found) == 1, (name, epoch, found)  # one line per message, not one per side
            return found[0]
        order = [where(m) for m in ("checkpoint-request", "checkpoint-reply", "vmstate-send", "vmstate-size",
                                    "vmstate-received", "vmstate-loaded")]
        assert order == sorted(order), (epoch, order)  # printed before the send: a reply never precedes
    commits = [ln for ln in msg_lines if " commit " in ln]
    assert commits and all(re.search(r"epoch=\d+ input_seq=\d+ output_seq=\d+", ln) for ln in commits)

    # the file: every replication message received is matched to its send, and no receipt precedes its send
    sends, recvs = traceexport.sends_by_flow(evs), traceexport.recvs_by_flow(evs)
    repl = [e for e in sends.values() if e["link"] == "replication"]
    assert repl and all(e["flow"] in recvs for e in repl[:-2])
    assert all(sends[f]["t"] <= r["t"] for f, r in recvs.items() if f in sends)
    kinds = {e["kind"] for e in evs}
    assert {"send", "recv", "phase", "checkpoint", "pages", "witness", "client", "state", "start"} <= kinds
    held = [e for e in evs if e.get("event") == "output" and e.get("action") == "held" and e["event_kind"] == 2]
    released = [e for e in evs if e.get("event") == "output" and e.get("action") == "released"
                and e["event_kind"] == 2]
    assert [e["seq"] for e in held] == [e["seq"] for e in released] == [1, 2]
    assert all(h["epoch"] == r["epoch"] for h, r in zip(held, released, strict=True))  # as the witness said
    check_perfetto(traceexport.perfetto(evs))
    check_mermaid(traceexport.mermaid_epoch(evs, released[0]["epoch"]))

    # the command line reads the same file
    out = subprocess.run([sys.executable, "-m", "colo", "trace", "show", trace_file, "--filter", "commit"],
                         capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.count(" commit ") >= 5


def test_colo_up_log_tail_orders_trace_lines(tmp_path: Path) -> None:
    (tmp_path / "gateway.log").write_text(
        "2026-12-01 10:00:00.100 colo gateway: lost (node=a)\n"
        "2026-12-01 10:00:00.100900 gateway   -> secondary promote generation=2\n")
    (tmp_path / "secondary.log").write_text(
        "2026-12-01 10:00:00.100400 secondary -> gateway   failover-request generation=1\n"
        "2026-12-01 10:00:00.101200 primary   -> gateway   promoted generation=2\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        LogTail(tmp_path, f).pump(final=True)
    got = [ln.split()[2] for ln in out.read_text().splitlines()]
    assert got == ["colo", "secondary", "gateway", "primary"]
