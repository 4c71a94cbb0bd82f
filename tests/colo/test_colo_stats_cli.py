"""Checkpoint records carry their run; `colo stats` summarises and plots a --stats file."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from colo import statsview
from colo.cli import main
from colo.errors import ColoError
from colo.stats import PHASES, CheckpointRecord, StatsWriter

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def _record(epoch: int, t: float, pause: float, **extra: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "epoch": epoch, "trigger": "timer", "time": t, "pause_ms": pause, "dirty_pages": epoch,
        "zero_pages": 0, "bytes_raw": 4096 * epoch, "bytes_wire": 512 * epoch, "compression_ratio": 8.0,
        "phases_ms": {p: pause / len(PHASES) for p in PHASES}}
    rec.update(extra)
    return rec


def write_sample(path: Path) -> None:
    """A file with one stamped run, two older runs written before records had run ids, and a torn last line."""
    lines = [_record(i, T0 + 0.1 * (i - 1), float(i), run_id="aaaa1111", mode="periodic", interval_ms=100.0,
                     trigger="manual" if i == 4 else "timer", commit_ms=2.0 * i,
                     checkpoint_mode="strict" if i == 1 else "pipelined") for i in range(1, 11)]
    lines += [_record(i, T0 + 100 + i, 2.0) for i in (1, 2, 3)]
    lines += [_record(i, T0 + 200 + i, 3.0) for i in (1, 2)]
    lines += [_record(1, T0 + 300, 1.0, run_id="bbbb2222", mode="hybrid", interval_ms=2000.0, trigger="mismatch")]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines) + '{"epoch": 3, "pau')


def test_writer_stamps_every_record(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    w = StatsWriter(path, mode="hybrid", interval_ms=2000.0)
    for epoch in (1, 2):
        w.write(CheckpointRecord(epoch, "mismatch", pause_ms=1.5))
    w.close()
    other = StatsWriter(path, run_id="fixed", mode="periodic", interval_ms=0.07 * 1000)
    other.write(CheckpointRecord(1, "timer"))
    other.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert re.fullmatch(r"[0-9a-f]{8}", recs[0]["run_id"]) and recs[0]["run_id"] == recs[1]["run_id"]
    assert [(r["mode"], r["interval_ms"]) for r in recs] == [("hybrid", 2000.0), ("hybrid", 2000.0),
                                                              ("periodic", 70.0)]
    assert recs[2]["run_id"] == "fixed"
    assert StatsWriter(None).run_id != StatsWriter(None).run_id  # a fresh id per writer


def test_runs_are_grouped_by_id_and_old_records_by_epoch(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    write_sample(path)
    records, skipped = statsview.load(path)
    runs = statsview.group_runs(records)
    assert skipped == 1
    assert [(r.label, len(r.records), r.mode, r.interval_ms) for r in runs] == [
        ("aaaa1111", 10, "periodic", 100.0), ("unlabelled-1", 3, None, None), ("unlabelled-2", 2, None, None),
        ("bbbb2222", 1, "hybrid", 2000.0)]
    assert [r.label for r in statsview.select(runs, "bb")] == ["bbbb2222"]
    with pytest.raises(ColoError, match="several runs match 'unlabelled'"):
        statsview.select(runs, "unlabelled")
    with pytest.raises(ColoError, match="no run matches 'zz'"):
        statsview.select(runs, "zz")


def test_summary_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.jsonl"
    write_sample(path)
    assert main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    expected_first_run = f"""\
{path}: 16 checkpoints in 4 runs; 1 line skipped (not a checkpoint record)
run aaaa1111: periodic, interval 100 ms
  checkpoints   10 over 0.9 s (10.0/s), 2023-11-14 22:13:20 to 22:13:20
  triggers      timer 9, manual 1
  pause ms      p50 5.50  p90 9.10  p99 9.91  max 10.00  (mean 5.50; the guest stopped)
  commit ms     p50 11.00  p90 18.20  p99 19.82  max 20.00  (mean 11.00; stop to vmstate-received; pipelined 9, strict 1)
  bytes raw     220.0 KiB total, 22.0 KiB per checkpoint (max 40.0 KiB)
  bytes wire    27.5 KiB total, 2.8 KiB per checkpoint (max 5.0 KiB), 8.0x smaller
  dirty pages   median 5.5, max 10
  phase ms      request 0.92  collect 0.92  send 0.92  received 0.92  loaded 0.92  resume 0.92  (medians)
run unlabelled-1: mode not recorded
  checkpoints   3 over 2.0 s (1.0/s), 2023-11-14 22:15:01 to 22:15:03
  triggers      timer 3
  pause ms      p50 2.00  p90 2.00  p99 2.00  max 2.00  (mean 2.00; the guest stopped)
  bytes raw"""
    assert out.startswith(expected_first_run), out
    assert "run bbbb2222: hybrid, backstop 2000 ms\n  checkpoints   1 over 0.0 s, 2023-11-14 22:18:20" in out
    assert "  triggers      mismatch 1\n  pause ms      p50 1.00  p90 1.00  p99 1.00  max 1.00" in out


def test_summary_json_and_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.jsonl"
    write_sample(path)
    assert main(["stats", str(path), "--json", "--run", "aaaa"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["run_id"] == "aaaa1111" and s["checkpoints"] == 10 and s["triggers"] == {"timer": 9, "manual": 1}
    assert s["pause_ms"]["p99"] == pytest.approx(9.91) and s["bytes_wire"]["total"] == 512 * 55
    assert s["dirty_pages"] == {"median": 5.5, "max": 10} and s["span_s"] == pytest.approx(0.9)


def test_empty_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["stats", str(empty)]) == 0
    assert capsys.readouterr().out == f"{empty}: 0 checkpoints\n"
    assert main(["stats", str(tmp_path / "none.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path, out = tmp_path / "s.jsonl", tmp_path / "s.png"
    write_sample(path)
    assert main(["stats", str(path), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"plot written to {out}" in capsys.readouterr().out
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps(_record(1, T0 + i, 1.0, run_id=f"r{i}")) + "\n" for i in range(6)))
    assert main(["stats", str(many), "--plot", str(tmp_path / "m.png")]) == 2
    assert "choose one with --run" in capsys.readouterr().err


def test_a_run_of_one_checkpoint_is_plotted_on_a_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not one bar across the whole panel: a second either side of it."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(_record(1, T0, 1.0, run_id="r1")) + "\n")
    assert main(["stats", str(path), "--plot", str(tmp_path / "one.png")]) == 0
    (fig,) = figures
    assert [ax.get_xlim() for ax in fig.axes] == [(-1.0, 1.0)] * 3  # the three panels share the run's time axis


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = tmp_path / "s.jsonl"
    write_sample(path)
    assert main(["stats", str(path), "--plot", str(tmp_path / "s.png")]) == 2
    captured = capsys.readouterr()
    assert "pip install 'toyvm-colo[bench]'" in captured.err and not (tmp_path / "s.png").exists()
    assert captured.out == ""  # it fails before doing any work
