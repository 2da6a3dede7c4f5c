"""The trace file: written crash-safe, read back into numpy, followed while it grows."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.records import Action, Applied, Event
from tuner.trace import (
    SCHEMA_VERSION,
    TraceError,
    TraceFollower,
    TraceWriter,
    default_trace_path,
    make_header,
    read_trace,
)


def header() -> dict:
    return make_header(
        probes={"cpu": {"available": True, "reason": None, "metrics": {"a_bytes": "bytes"}}}, interval_s=0.1
    )


def write_sample_trace(path: Path, n: int = 10) -> None:
    with TraceWriter(path, header()) as w:
        for i in range(n):
            values = {"a_bytes": float(i * 100), "b_ratio": 0.5 if i % 2 else None}
            w.tick(i * 0.1, values, {123: {"rss_bytes": i}})
            w.flush()
        w.event(Event(0.55, "request", {"ttft_s": 0.1}))
        w.action(Applied(0.6, Action("cleanup", "cleanup", ["gc"], "leak"), "applied", result={"bytes": 5}))
        w.note(0.7, "hello", "warn")
        w.skip(0.8, 2)
        w.end(1.0, exit_code=3)


def test_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    write_sample_trace(p)
    d = read_trace(p)
    assert d.header["schema"] == SCHEMA_VERSION
    assert d.times.tolist() == pytest.approx([i * 0.1 for i in range(10)])
    assert d.column("a_bytes").tolist() == [i * 100.0 for i in range(10)]
    b = d.column("b_ratio")
    assert np.isnan(b[0]) and b[1] == 0.5
    assert np.isnan(d.column("never_there_bytes")).all()
    assert d.events[0].kind == "request" and d.events[0].data["ttft_s"] == 0.1
    assert d.actions[0]["result"] == {"bytes": 5} and d.actions[0]["reason"] == "leak"
    assert d.notes[0]["msg"] == "hello"
    assert d.skipped == 2
    assert d.end is not None and d.end["exit_code"] == 3
    assert d.duration == 1.0
    assert d.procs[0][1]["123"]["rss_bytes"] == 0


def test_file_is_private(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    write_sample_trace(p, 1)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_nan_becomes_null(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    with TraceWriter(p, header()) as w:
        w.tick(0.0, {"x_bytes": float("nan"), "y_bytes": float("inf")})
        w.write({"k": "note", "t": 0.0, "level": "info", "msg": "m", "data": {"v": float("nan")}})
    for line in p.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_torn_last_line_is_skipped_with_warning(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    write_sample_trace(p)
    with open(p, "ab") as f:
        f.write(b'{"k":"tick","t":2.0,"m":{"a_by')
    d = read_trace(p)
    assert len(d.times) == 10
    assert any("incomplete" in w for w in d.warnings)


def test_corrupt_middle_line_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    write_sample_trace(p)
    lines = p.read_bytes().split(b"\n")
    lines[3] = b"garbage{"
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(TraceError, match="line 4") as ei:
        read_trace(p)
    assert "\n" not in str(ei.value)
    d = read_trace(p, skip_bad=True)
    assert len(d.times) == 9
    assert any("line 4" in w for w in d.warnings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"\n\n", "empty file"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "not an inference-tuner trace"),
        (b'{"hello": 1}\n', "not an inference-tuner trace"),
        (b"[1,2,3]\n", "not an inference-tuner trace"),
        (b'{"k":"header","tool":"inference-tuner","schema":999}\n', "schema version 999"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(TraceError, match=message) as ei:
        read_trace(p)
    assert "\n" not in str(ei.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="directory"):
        read_trace(tmp_path)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=3000))
def test_random_corruption_never_raises_anything_but_trace_error(
    tmp_path_factory: pytest.TempPathFactory, junk: bytes, at: int
) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    write_sample_trace(p, 20)
    data = bytearray(p.read_bytes())
    at = min(at, len(data))
    data[at : at + len(junk)] = junk
    p.write_bytes(bytes(data))
    for skip_bad in (False, True):
        try:
            d = read_trace(p, skip_bad=skip_bad)
        except TraceError as exc:
            assert "\n" not in str(exc)
        else:
            assert len(d.times) <= 21


def test_follower_sees_growth_and_waits_for_newline(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    w = TraceWriter(p, header())
    f = TraceFollower(p)
    recs = f.poll()
    assert [r["k"] for r in recs] == ["header"]
    w.tick(0.1, {"a_bytes": 1.0})
    w.flush()
    assert [r["t"] for r in f.poll()] == [0.1]
    with open(p, "ab") as raw:
        raw.write(b'{"k":"tick","t":0.2,')
    assert f.poll() == []
    with open(p, "ab") as raw:
        raw.write(b'"m":{}}\n')
    assert [r["t"] for r in f.poll()] == [0.2]
    f.close()
    w.close()


def test_follower_rejects_foreign_file(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"foo": 1}\n')
    with TraceFollower(p) as f, pytest.raises(TraceError):
        f.poll()


def test_listener_gets_every_record_and_a_failing_one_is_dropped(tmp_path: Path) -> None:
    got: list[str] = []
    w = TraceWriter(tmp_path / "t.jsonl", header())
    w.add_listener(lambda r: got.append(r["k"]))

    def boom(r: object) -> None:
        raise RuntimeError("observer bug")

    w.add_listener(boom)
    w.tick(0.0, {})
    w.note(0.1, "x")
    w.close()
    assert got == ["tick", "note"]
    assert len(read_trace(tmp_path / "t.jsonl").times) == 1


def test_default_trace_path_names_the_command(tmp_path: Path) -> None:
    p = default_trace_path(["python", "-u", "serve.py", "--port", "1"], tmp_path)
    assert p.parent == tmp_path and p.name.endswith("-serve.jsonl")
    p.write_text("")
    assert default_trace_path(["python", "-u", "serve.py"], tmp_path) != p


DISK_FULL_CHILD = r"""
import os, resource, signal, sys, json
sys.path.insert(0, sys.argv[2])
from tuner.trace import TraceWriter, make_header
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
w = TraceWriter(path, make_header(probes={}, interval_s=0.1))
size = os.path.getsize(path)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, hard))
results = []
for i in range(50):
    w.tick(i * 0.1, {"v_bytes": float(i)})
    results.append(w.flush())
err = w.error
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
w.tick(5.0, {"v_bytes": 50.0})
ok = w.flush()
w.close()
print(json.dumps({"first": results[0], "any_failed": not all(results), "error": err, "ok_after": ok,
                  "dropped": w.dropped}))
"""


def test_disk_full_keeps_records_and_resumes(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: writes fail with EFBIG, then space 'returns'."""
    p = tmp_path / "t.jsonl"
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(p), root], capture_output=True, text=True, timeout=60, check=True
    )
    res = json.loads(out.stdout)
    assert res["any_failed"] and res["error"] and "cannot write trace" in res["error"]
    assert res["ok_after"] and res["dropped"] == 0
    d = read_trace(p)
    assert d.column("v_bytes").tolist() == [float(i) for i in range(51)]
    assert os.path.getsize(p) > 300
