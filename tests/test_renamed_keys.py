"""Metric keys renamed to the naming rules (``tuner.records.RENAMED``): traces written before the rename
read with today's names through every reader — ``read_trace`` (with and without its columnar companion),
``iter_records`` (``tuner replay``), ``TraceFollower`` (the live view) — and what the tuner shows of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli import tuner
from tuner.records import RENAMED, UNIT_SUFFIXES, renamed, unit_of
from tuner.trace import TraceFollower, TraceWriter, columns_path, iter_records, make_header, read_trace

ROOT = Path(__file__).resolve().parents[1]
PRE_RENAME = ROOT / "tests" / "data" / "pre-rename.jsonl"
OLD_TICK = {
    "tree_rss_bytes": 1e9,
    "tree_threads_count": 7,
    "tree_fds_count": 12,
    "tree_procs_count": 2,
    "req_done_count": 3.0,
    "req_active_count": 1.0,
    "chan_clients_count": 1.0,
    "chan_dropped_count": 0.0,
}
OLD_PROC = {"name": "python", "rss_bytes": 5, "cpu_ratio": 0.5, "threads_count": 4, "fds_count": 9}
NEW_NAMES = ["tree_rss_bytes", "tree_threads", "tree_fds", "tree_procs", "req_done_total", "req_active",
             "chan_clients", "chan_dropped_total"]  # fmt: skip


def old_trace(p: Path, ticks: int = 30) -> None:
    """A trace as the tuner wrote it before the rename (same writer, old keys, old units in the header)."""
    units = {k: ("bytes" if k.endswith("_bytes") else "count") for k in OLD_TICK}
    hdr = make_header(probes={"cpu": {"available": True, "reason": None, "metrics": units}}, interval_s=0.1)
    with TraceWriter(p, hdr) as w:
        for i in range(ticks):
            w.tick(i * 0.1, {**OLD_TICK, "req_done_count": float(i)}, {42: dict(OLD_PROC)})


def test_no_key_breaks_the_rules() -> None:
    """``_count`` is gone from the names and the units; every new name follows the rules it was renamed for."""
    assert all(not s.endswith("_count") for s, _ in UNIT_SUFFIXES)
    assert all(new not in RENAMED and not new.endswith("_count") for new in RENAMED.values())
    assert unit_of("tree_threads") == "count" and unit_of("req_done_total") == "count"
    assert unit_of("tree_cpu_seconds_total") == "seconds" and unit_of("gpu_energy_joules/0") == "joules"
    assert unit_of("knob_temperature") == "value"
    m = {"a_bytes": 1}
    assert renamed(m) is m  # nothing to rename: the same dict, no copy
    assert list(renamed({"a_bytes": 1, "tree_threads_count": 2, "z": 3})) == ["a_bytes", "tree_threads", "z"]


@pytest.mark.parametrize("companion", [True, False])
def test_read_trace_gives_old_traces_todays_names(tmp_path: Path, companion: bool) -> None:
    p = tmp_path / "old.jsonl"
    old_trace(p)
    assert columns_path(p).exists()
    if not companion:
        columns_path(p).unlink()
    d = read_trace(p)
    assert list(d.columns) == NEW_NAMES
    assert d.column("req_done_total").tolist() == [float(i) for i in range(30)]
    assert (d.column("tree_threads") == 7).all()
    assert not any(k in d.columns for k in RENAMED)
    assert set(d.header["units"]) == set(NEW_NAMES) == set(d.header["probes"]["cpu"]["metrics"])
    assert d.procs[0][1]["42"] == {"name": "python", "rss_bytes": 5, "cpu_ratio": 0.5, "threads": 4, "fds": 9}
    assert len(d.procs) == 30


def test_iter_records_and_the_follower_give_todays_names(tmp_path: Path) -> None:
    p = tmp_path / "old.jsonl"
    old_trace(p, ticks=3)
    for recs in (list(iter_records(p)), TraceFollower(p).poll()):
        assert set(recs[0]["units"]) == set(NEW_NAMES)
        ticks = [r for r in recs if r["k"] == "tick"]
        assert len(ticks) == 3
        for r in ticks:
            assert list(r["m"]) == NEW_NAMES
            assert r["p"]["42"]["threads"] == 4 and r["p"]["42"]["fds"] == 9 and "threads_count" not in r["p"]["42"]


def test_a_new_trace_is_read_as_written(tmp_path: Path) -> None:
    """A key that is not renamed passes through untouched, a tick without ``p`` gets none."""
    p = tmp_path / "new.jsonl"
    with TraceWriter(p, make_header(probes={}, interval_s=0.1)) as w:
        w.tick(0.0, {"tree_threads": 3, "x_ratio": 0.5})
    rec = next(r for r in iter_records(p) if r["k"] == "tick")
    assert rec == {"k": "tick", "t": 0.0, "m": {"tree_threads": 3, "x_ratio": 0.5}}
    assert list(read_trace(p).columns) == ["tree_threads", "x_ratio"]


def test_a_real_recording_from_before_the_rename_reads_with_new_names() -> None:
    """``tests/data/pre-rename.jsonl``: the first 80 lines of a real ``tuner demo`` recording made before the
    rename (``traces/example-demo.jsonl`` as of dc5f652): CPU probe, output probe, processes, requests."""
    raw = PRE_RENAME.read_bytes()
    assert b'"tree_threads_count"' in raw and b'"threads_count"' in raw and b'"req_done_count"' in raw
    d = read_trace(PRE_RENAME)
    assert not any(k in d.columns for k in RENAMED) and not any(k in d.header["units"] for k in RENAMED)
    done = d.column("req_done_total")
    assert np.nanmax(done) >= 6 and (np.diff(done[np.isfinite(done)]) >= 0).all()
    assert np.nanmin(d.column("tree_threads")) >= 1 and np.nanmax(d.column("tree_procs")) >= 1
    fields = {f for _, p in d.procs for v in p.values() for f in v}
    assert {"threads", "fds"} <= fields and not fields & set(RENAMED)
    ticks = [r for r in iter_records(PRE_RENAME) if r["k"] == "tick"]
    assert len(ticks) == len(d.times) and all("req_done_total" in r["m"] for r in ticks)


def test_report_and_export_of_an_old_trace_use_the_new_names(tmp_path: Path) -> None:
    p = tmp_path / "old.jsonl"
    old_trace(p)
    cp = tuner("report", str(p), "--json")
    assert cp.returncode == 0, cp.stderr
    metrics = json.loads(cp.stdout)["metrics"]
    assert set(metrics) == set(NEW_NAMES)
    assert metrics["tree_threads"]["unit"] == "count" and metrics["tree_threads"]["max"] == 7
    out = tmp_path / "old.csv"
    cp = tuner("export", "--to", "csv", str(p), str(out))
    assert cp.returncode == 0, cp.stderr
    head = out.read_text().splitlines()[0]
    assert "req_done_total" in head and "_count" not in head


def test_replay_of_an_old_recording_writes_the_new_names(tmp_path: Path) -> None:
    """``tuner replay --out`` over a recording from before the rename: the policies are fed, and the
    counterfactual trace is written, with today's names."""
    out = tmp_path / "cf.jsonl"
    cp = tuner("replay", str(PRE_RENAME), "--policy", "offline", "--out", str(out))
    assert cp.returncode == 0, cp.stderr
    raw = out.read_bytes()
    assert b'"req_done_total"' in raw and b'"tree_threads"' in raw
    assert not any(f'"{old}"'.encode() in raw for old in RENAMED)
