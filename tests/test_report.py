"""``tuner report``: summary numbers against an independent numpy computation, leak verdicts, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner
from tuner.outputs.report import render_text, summarize
from tuner.records import Action, Applied, Event
from tuner.trace import TraceWriter, make_header, read_trace

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


def make_trace(
    path: Path,
    *,
    seconds: float = 120.0,
    hz: float = 10.0,
    leak_bytes_per_s: float = 0.0,
    sawtooth: bool = False,
    requests: bool = True,
    gpu: bool = True,
    memory: bool = True,
    knobs: bool = True,
    seed: int = 0,
    end: bool = True,
) -> Path:
    """A realistic recording written with the real ``TraceWriter``: CPU tree metrics, per-core CPU, one GPU,
    request events (batch size and temperature vary), knob columns and a few actions."""
    rng = np.random.default_rng(seed)
    units = {"tree_rss_bytes": "bytes", "tree_cpu_ratio": "ratio", "gpu_util_ratio/0": "ratio"}
    hdr = make_header(
        probes={"cpu": {"available": True, "reason": None, "metrics": units}},
        interval_s=1 / hz,
        command=["python", "serve.py"],
        pid=4242,
    )
    n = round(seconds * hz)
    with TraceWriter(path, hdr) as w:
        batch, temp, req_id = 4, 0.7, 0
        next_req = 0.5
        for i in range(n):
            t = i / hz
            if knobs and i and i % int(30 * hz) == 0:  # every 30 s the policy moves a knob
                old_batch = batch
                batch = batch * 2 if batch < 16 else 4
                w.action(
                    Applied(
                        t,
                        Action("batch", "batch_size", batch, f"queue grew at {t:.0f} s", {"q": 3}),
                        "applied",
                        old_batch,
                    )
                )
                old_temp = temp
                temp = round(temp - 0.1, 2) if temp > 0.4 else 0.9
                w.action(Applied(t, Action("rep", "temperature", temp, "repetition high", {}), "applied", old_temp))
            values: dict[str, Any] = {
                "tree_cpu_ratio": float(abs(1.0 + 0.3 * rng.standard_normal())),
                "tree_threads": float(12 + (i % 3)),
            }
            if memory:
                rss = 800 * MiB + leak_bytes_per_s * t + rng.normal(scale=4 * MiB)
                if sawtooth:
                    rss += 300 * MiB * ((t % 6.0) / 6.0)
                values["tree_rss_bytes"] = float(rss)
            for c in range(2):
                values[f"sys_core_cpu_ratio/{c}"] = float(rng.uniform(0, 1))
            if gpu:
                values["gpu_util_ratio/0"] = float(rng.uniform(0.2, 0.9))
                values["gpu_mem_used_bytes/0"] = float(4000 * MiB + (i % 50) * MiB) if memory else None
            if knobs:
                values["knob_batch_size"] = float(batch)
                values["knob_temperature"] = temp
            if i % 7 == 3:
                values["tree_fds"] = None  # missing now and then
            w.tick(t, values, {4242: {"name": "python", "rss_bytes": values.get("tree_rss_bytes")}})
            if i == n // 2:
                w.skip(t + 0.05, 2)
            while requests and next_req <= t:
                req_id += 1
                tokens = int(rng.integers(20, 200))
                tps = 40.0 * batch**0.5 + rng.normal(scale=2)
                e2e = tokens / tps
                rep = float(np.clip(0.05 + 0.3 * (1 - temp) + rng.normal(scale=0.02), 0, 1))
                w.event(
                    Event(
                        next_req,
                        "request",
                        {
                            "id": f"r{req_id}",
                            "pid": 4242,
                            "prompt_tokens": 50,
                            "tokens": tokens,
                            "queue_seconds": float(rng.uniform(0, 0.05)),
                            "ttft_seconds": float(rng.uniform(0.05, 0.3)),
                            "tpot_seconds": 1 / tps,
                            "e2e_seconds": e2e,
                            "tokens_per_second": tps,
                            "seq_rep_4": rep,
                            "rep_32": rep / 2,
                            "loop": bool(rep > 0.3),
                            "batch_size": batch,
                            "temperature": temp,
                            "precision": "fp32",
                        },
                    )
                )
                next_req += 0.25
            w.flush()
        w.note(n / hz / 2, "cpu probe slowed to 5 Hz", "warn")
        if end:
            w.end(n / hz, exit_code=0, ticks=n, skipped=2)
    return path


def test_summary_numbers_equal_an_independent_numpy_computation(tmp_path: Path) -> None:
    path = make_trace(tmp_path / "t.jsonl", seconds=60)
    s = summarize(read_trace(path))

    # Independent: parse the JSON lines ourselves.
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    ticks = [r for r in recs if r["k"] == "tick"]
    reqs = [r["data"] for r in recs if r["k"] == "event" and r["kind"] == "request"]
    assert s["ticks"] == len(ticks) == 600
    assert s["skipped_ticks"] == 2
    assert s["duration_s"] == pytest.approx(60.0)
    assert s["exit_code"] == 0 and s["ended"] is True
    assert s["metrics"]["tree_fds"] == {
        "unit": "count",
        "samples": 0,
        "min": None,
        "median": None,
        "p95": None,
        "max": None,
    }
    for key in ("tree_rss_bytes", "tree_cpu_ratio", "gpu_util_ratio/0", "sys_core_cpu_ratio/1"):
        vals = np.array([r["m"][key] for r in ticks if r["m"].get(key) is not None], dtype=float)
        m = s["metrics"][key]
        assert m["samples"] == vals.size
        assert m["min"] == pytest.approx(vals.min())
        assert m["median"] == pytest.approx(np.median(vals))
        assert m["p95"] == pytest.approx(np.percentile(vals, 95))
        assert m["max"] == pytest.approx(vals.max())
    rss = np.array([r["m"]["tree_rss_bytes"] for r in ticks])
    assert s["peak_rss_bytes"] == pytest.approx(rss.max())
    assert s["peak_memory_bytes"]["gpu_mem_used_bytes/0"] == pytest.approx(
        max(r["m"]["gpu_mem_used_bytes/0"] for r in ticks)
    )
    q = s["requests"]
    assert q["count"] == len(reqs)
    assert q["output_tokens"] == sum(d["tokens"] for d in reqs)
    for fld in ("ttft_seconds", "tpot_seconds", "e2e_seconds", "queue_seconds", "tokens_per_second", "seq_rep_4"):
        vals = np.array([d[fld] for d in reqs])
        assert q[fld]["p50"] == pytest.approx(np.percentile(vals, 50)), fld
        assert q[fld]["p95"] == pytest.approx(np.percentile(vals, 95)), fld
    assert q["loop_share"] == pytest.approx(np.mean([d["loop"] for d in reqs]))
    assert s["actions"] == 2 * 1 and s["actions_by_outcome"] == {"applied": 2}
    assert any("slowed" in w for w in s["warnings"])
    json.dumps(s, allow_nan=False)  # strict JSON


def test_leaking_trace_is_a_leak_per_minute_and_per_1000_requests(tmp_path: Path) -> None:
    s = summarize(read_trace(make_trace(tmp_path / "leak.jsonl", seconds=120, leak_bytes_per_s=2 * MiB)))
    pm = s["memory_trend"]["per_minute"]["tree_rss_bytes"]
    assert pm["verdict"] == "leak", pm
    assert pm["slope"] == pytest.approx(120 * MiB, rel=0.1)
    pk = s["memory_trend"]["per_1k_requests"]["tree_rss_bytes"]
    assert pk["verdict"] == "leak", pk
    # 4 requests/s: 1,000 requests take 250 s, so 2 MiB/s is ~500 MiB per 1,000 requests
    assert pk["slope"] == pytest.approx(500 * MiB, rel=0.15)
    assert pk["unit"] == "bytes/1k requests"
    leak_warnings = [w for w in s["warnings"] if "possible leak" in w]
    assert leak_warnings == [leak_warnings[0]] and "MiB/min" in leak_warnings[0] and "1k requests" in leak_warnings[0]


def test_sawtooth_trace_is_no_leak(tmp_path: Path) -> None:
    s = summarize(read_trace(make_trace(tmp_path / "saw.jsonl", seconds=120, sawtooth=True)))
    assert s["memory_trend"]["per_minute"]["tree_rss_bytes"]["verdict"] == "no leak"
    assert s["memory_trend"]["per_1k_requests"]["tree_rss_bytes"]["verdict"] == "no leak"


def test_trailing_zero_rss_after_exit_does_not_hide_a_leak(tmp_path: Path) -> None:
    """The CPU probe reads 0 for a tree whose process exited (or is a zombie); the floor must not drop to it."""
    path = make_trace(tmp_path / "t.jsonl", seconds=60, leak_bytes_per_s=2 * MiB, requests=False, end=False)
    with open(path, "a") as f:
        for i in range(80):  # a zombie its parent did not reap for 8 s
            f.write(json.dumps({"k": "tick", "t": 60.0 + i * 0.1, "m": {"tree_rss_bytes": 0, "tree_procs": 1}}))
            f.write("\n")
    s = summarize(read_trace(path))
    assert s["metrics"]["tree_rss_bytes"]["min"] == 0  # the table still shows what was recorded
    assert s["memory_trend"]["per_minute"]["tree_rss_bytes"]["verdict"] == "leak"


def test_missing_parts_are_said_not_crashed(tmp_path: Path) -> None:
    s = summarize(
        read_trace(
            make_trace(
                tmp_path / "bare.jsonl", seconds=0.1, requests=False, memory=False, gpu=False, knobs=False, end=False
            )
        )
    )
    assert s["ticks"] == 1
    assert s["requests"] is None and s["peak_rss_bytes"] is None
    assert s["memory_trend"]["per_minute"]["tree_rss_bytes"]["verdict"] == "not recorded"
    text = render_text(s)
    assert "requests  not recorded" in text
    assert "peak RSS  not recorded" in text
    assert "no end record" in text


# -- the CLI as a user meets it --------------------------------------------------------------------


def test_report_cli_prints_the_table(tmp_path: Path) -> None:
    path = make_trace(tmp_path / "leak.jsonl", seconds=90, leak_bytes_per_s=2 * MiB)
    cp = tuner("report", str(path))
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert "duration  90 s, 900 ticks every 100 ms, 2 skipped" in out
    assert re.search(r"tree_rss_bytes\s+\+\d.*MiB/min\s+leak", out), out
    assert "time to first token" in out
    assert "actions   4 (4 applied)" in out
    # each action as a line: when, which policy, the change, its outcome and the reason
    assert re.search(r"^\s+30\.0 s\s+batch\s+batch_size \d+ -> \d+\s+applied\s+queue grew at 30 s$", out, re.M), out
    assert re.search(r"^\s+60\.0 s\s+rep\s+temperature 0\.\d+ -> 0\.\d+\s+applied\s+repetition high$", out, re.M), out


def _doc_keys() -> set[str]:
    doc = (ROOT / "docs" / "report-json.md").read_text()
    return set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M))


def test_report_json_keys_are_stable_and_documented(tmp_path: Path) -> None:
    cp = tuner("report", "--json", str(make_trace(tmp_path / "t.jsonl", seconds=40)))
    assert cp.returncode == 0, cp.stderr
    s = json.loads(cp.stdout)
    documented = _doc_keys()
    top = set(s)
    assert top == {k for k in documented if "." not in k}, top ^ {k for k in documented if "." not in k}
    for k in s["requests"]:
        assert f"requests.{k}" in documented, k
    for k in s["metrics"]["tree_rss_bytes"]:
        assert f"metrics.KEY.{k}" in documented, k
    for k in s["memory_trend"]["per_minute"]["tree_rss_bytes"]:
        assert f"memory_trend.per_minute.KEY.{k}" in documented, k


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"", "empty file"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00" * 40, "not an inference-tuner trace"),
        (b'{"k":"header","tool":"inference-tuner","sch', "not an inference-tuner trace"),
    ],
    ids=["empty", "binary", "truncated-header"],
)
def test_report_on_bad_files_is_one_line_error(tmp_path: Path, content: bytes, expect: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    err = assert_one_line_error(tuner("report", str(p)))
    assert expect in err


def test_report_on_truncated_trace_reads_what_is_there(tmp_path: Path) -> None:
    path = make_trace(tmp_path / "t.jsonl", seconds=5, end=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # torn last line, as after a crash
    cp = tuner("report", "--json", str(path))
    assert cp.returncode == 0, cp.stderr
    assert "incomplete (torn write)" in cp.stderr
    assert json.loads(cp.stdout)["ended"] is False


def test_report_corrupt_middle_line_needs_skip_bad(tmp_path: Path) -> None:
    path = make_trace(tmp_path / "t.jsonl", seconds=5)
    lines = path.read_text().splitlines()
    lines[10] = "{garbage"
    path.write_text("\n".join(lines) + "\n")
    err = assert_one_line_error(tuner("report", str(path)))
    assert "line 11" in err and "--skip-bad" in err
    cp = tuner("report", "--skip-bad", "--json", str(path))
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["ticks"] == 49


def test_report_on_missing_file_and_directory(tmp_path: Path) -> None:
    assert "no such file" in assert_one_line_error(tuner("report", str(tmp_path / "nope.jsonl")))
    assert "is a directory" in assert_one_line_error(tuner("report", str(tmp_path)))


GROW = """
import time
held = []
t0 = time.monotonic()
while time.monotonic() - t0 < 30:
    held.append(b"x" * 100_000)  # 1 MB/s, written so it is resident
    time.sleep(0.1)
"""

SAWTOOTH = """
import time
t0 = time.monotonic()
while time.monotonic() - t0 < 30:
    held = []
    for _ in range(10):  # 40 MB over 1 s, then all freed for 1 s
        held.append(b"x" * 4_000_000)
        time.sleep(0.1)
    del held
    time.sleep(1.0)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("code", "expect"), [(GROW, "leak"), (SAWTOOTH, "no leak")], ids=["grow", "sawtooth"])
def test_real_child_leak_verdict_through_tuner_run(tmp_path: Path, code: str, expect: str) -> None:
    import sys

    trace = tmp_path / "run.jsonl"
    cp = tuner("run", "--quiet", "--trace", str(trace), "--", sys.executable, "-c", code, timeout=90)
    assert cp.returncode == 0, cp.stderr
    cp = tuner("report", "--json", str(trace))
    assert cp.returncode == 0, cp.stderr
    v = json.loads(cp.stdout)["memory_trend"]["per_minute"]["tree_rss_bytes"]
    assert v["verdict"] == expect, v
    if expect == "leak":
        assert v["slope"] == pytest.approx(60e6, rel=0.3)  # 1 MB/s
