"""``tuner export``: CSV and Parquet round-trip the values; the Perfetto file is structurally valid."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner
from tests.test_report import make_trace
from tuner.trace import read_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trace(tmp_path_factory.mktemp("exp") / "t.jsonl", seconds=40)


def test_csv_round_trips_every_value(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    cp = tuner("export", str(trace), "--to", "csv", str(out))
    assert cp.returncode == 0, cp.stderr
    assert str(out) in cp.stderr
    data = read_trace(trace)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["t", *sorted(data.columns)]
    assert len(rows) == 1 + len(data.times)
    got = np.array([[float(c) if c else np.nan for c in r] for r in rows[1:]])
    np.testing.assert_array_equal(got[:, 0], data.times)
    for j, key in enumerate(rows[0][1:], start=1):
        np.testing.assert_array_equal(got[:, j], data.columns[key], err_msg=key)  # NaN == NaN here
    assert any(not r[rows[0].index("tree_fds")] for r in rows[1:])  # missing stays empty


def test_parquet_round_trips_ticks_and_events(trace: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "t.parquet"
    cp = tuner("export", str(trace), "--to", "parquet", str(out))
    assert cp.returncode == 0, cp.stderr
    data = read_trace(trace)
    tab = pq.read_table(out)
    assert tab.column_names == ["t", *sorted(data.columns)]
    np.testing.assert_array_equal(tab.column("t").to_numpy(), data.times)
    for key, col in data.columns.items():
        arr = tab.column(key)
        assert arr.null_count == int(np.isnan(col).sum()), key
        np.testing.assert_array_equal(arr.to_numpy(zero_copy_only=False).astype(float), col, err_msg=key)
    ev = pq.read_table(tmp_path / "t.events.parquet").to_pylist()
    assert len(ev) == len(data.events) + len(data.actions) + len(data.notes)
    assert [r["t"] for r in ev] == sorted(r["t"] for r in ev)
    reqs = [r for r in ev if r["k"] == "event" and r["kind"] == "request"]
    assert json.loads(reqs[0]["data"]) == dict(data.requests()[0].data)
    acts = [r for r in ev if r["k"] == "action"]
    assert {r["kind"] for r in acts} == {"batch_size", "temperature"}
    assert json.loads(acts[0]["data"])["outcome"] == "applied"


def test_perfetto_file_is_a_valid_chrome_trace(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    cp = tuner("export", str(trace), "--to", "perfetto", str(out))
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(out.read_text())
    assert doc["displayTimeUnit"] == "ms"
    evs = doc["traceEvents"]
    data = read_trace(trace)
    for e in evs:
        assert {"ph", "ts", "pid", "name"} <= set(e), e
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        assert e["ph"] in {"C", "X", "i", "M"}
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) and math.isfinite(v) for v in e["args"].values())
        if e["ph"] == "X":
            assert e["dur"] >= 0 and "tid" in e
        if e["ph"] == "i":
            assert e.get("s") in {"g", "p", "t"}
    by_ph: dict[str, list[dict]] = {}
    for e in evs:
        by_ph.setdefault(e["ph"], []).append(e)
    # counters: devices grouped under one name, timestamps in microseconds
    gpu = [e for e in by_ph["C"] if e["name"] == "gpu_util_ratio"]
    assert len(gpu) == len(data.times) and set(gpu[0]["args"]) == {"0"}
    assert gpu[5]["ts"] == pytest.approx(data.times[5] * 1e6)
    cores = [e for e in by_ph["C"] if e["name"] == "sys_core_cpu_ratio"]
    assert set(cores[0]["args"]) == {"0", "1"}
    # requests: one slice each, ending at the event time, ttft in args
    slices = by_ph["X"]
    reqs = data.requests()
    assert len(slices) == len(reqs)
    by_id = {e["args"]["id"]: e for e in slices}
    for r in reqs:
        sl = by_id[r.data["id"]]
        assert sl["ts"] + sl["dur"] == pytest.approx(r.t * 1e6, abs=1)
        assert sl["ts"] == pytest.approx(max(0.0, r.t - r.data["e2e_seconds"]) * 1e6, abs=1)
        assert sl["args"]["ttft_seconds"] == r.data["ttft_seconds"]
    # no two slices on one lane overlap
    lanes: dict[int, list[tuple[float, float]]] = {}
    for e in slices:
        lanes.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in lanes.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-3 for a, b in itertools.pairwise(spans))
    # actions as instants with their reasons; names for process and threads
    acts = [e for e in by_ph["i"] if e.get("cat") == "action"]
    assert len(acts) == len(data.actions) and acts[0]["args"]["reason"]
    proc = [e for e in by_ph["C"] if e["pid"] == 4242]
    assert {e["name"] for e in proc} == {"rss_bytes"} and len(proc) == len(data.times)
    assert proc[3]["args"]["value"] == data.procs[3][1]["4242"]["rss_bytes"]
    names = {e["args"]["name"] for e in by_ph["M"]}
    assert "python (4242)" in names
    assert "metrics" in names and "actions" in names and any(n.startswith("requests") for n in names)


def test_export_bad_inputs_are_one_line_errors(trace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x00\x01binary")
    assert "not an inference-tuner trace" in assert_one_line_error(tuner("export", str(bad), "--to", "csv", "x.csv"))
    err = assert_one_line_error(tuner("export", str(trace), "--to", "csv", str(tmp_path)))
    assert "is a directory" in err
    cp = tuner("export", str(trace), "--to", "xml", str(tmp_path / "x"))
    assert_one_line_error(cp)
