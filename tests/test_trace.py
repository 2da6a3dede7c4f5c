"""The trace file: written crash-safe, read back into numpy, followed while it grows."""

from __future__ import annotations

import errno
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

import tuner.trace as trace_mod
import tuner.trace.writer as trace_writer
from tuner.records import Action, Applied, Event
from tuner.trace import (
    SCHEMA_VERSION,
    TraceError,
    TraceFollower,
    TraceWriter,
    columns_path,
    default_trace_path,
    encode_record,
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


def test_line_listener_gets_the_bytes_written_to_the_file(tmp_path: Path) -> None:
    got: list[tuple[bytes, str]] = []
    w = TraceWriter(tmp_path / "t.jsonl", header())
    w.add_line_listener(lambda line, kind: got.append((line, kind)))
    w.add_line_listener(lambda line, kind: 1 / 0)  # removed on its first failure; the trace goes on
    w.tick(0.0, {"tree_rss_bytes": 5, "x_ratio": float("nan")})
    w.note(0.1, "x")
    w.close()
    lines = (tmp_path / "t.jsonl").read_bytes().splitlines()
    assert [k for _, k in got][:2] == ["tick", "note"]
    assert [line for line, _ in got] == lines[1 : 1 + len(got)]
    assert json.loads(got[0][0])["m"] == {"tree_rss_bytes": 5, "x_ratio": None}


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


# -- encoding: orjson lines are the same JSON as the standard library's --------------------------------------

_json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "é€😀", "a\nb", '"\\']),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


def _stdlib_line(rec: dict) -> bytes:
    """What the writer produced before orjson: json.dumps, compact, NaN/inf as null."""
    text = json.dumps(rec, default=str)
    return json.dumps(json.loads(text, parse_constant=lambda _: None), separators=(",", ":")).encode()


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=10), _json_value, max_size=6))
def test_encoded_lines_parse_to_what_the_stdlib_encoding_parses_to(data: dict) -> None:
    rec = {"k": "note", "t": 1.5, **data}
    line = encode_record(rec)
    assert b"\n" not in line
    assert json.loads(line) == json.loads(_stdlib_line(rec))
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_a_trace_written_by_the_stdlib_encoder_reads_the_same(tmp_path: Path) -> None:
    """Older traces (json.dumps: \\u escapes, escaped lone surrogates) read exactly as before."""
    p = tmp_path / "old.jsonl"
    recs = [
        header(),
        {"k": "tick", "t": 0.0, "m": {"a_bytes": 1.0, "b_ratio": None}, "p": {"7": {"name": "caf\u00e9"}}},
        {"k": "event", "t": 0.05, "kind": "request", "data": {"text": "\ud800 and \u20ac", "n": 2**70}},
        {"k": "tick", "t": 0.1, "m": {"a_bytes": 2.5e-7, "b_ratio": 1e16}},
        {"k": "end", "t": 0.2, "exit_code": 0},
    ]
    p.write_bytes(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in recs))
    d = read_trace(p)
    assert d.column("a_bytes").tolist() == [1.0, 2.5e-7]
    assert d.column("b_ratio")[1] == 1e16
    assert d.procs[0][1]["7"]["name"] == "café"
    assert d.events[0].data == {"text": "\ud800 and €", "n": 2**70}
    assert d.end == recs[-1]


def test_columns_with_changing_key_layouts(tmp_path: Path) -> None:
    """Keys that come and go (USS every few ticks, a device that appears) land in the right rows."""
    p = tmp_path / "t.jsonl"
    with TraceWriter(p, header()) as w:
        for i in range(12):
            m: dict = {"a_bytes": float(i)}
            if i % 3 == 0:
                m["uss_bytes"] = float(10 * i)
            if i >= 8:
                m = {"gpu_ratio/0": 0.5, **m}
            if i == 5:
                m["a_bytes"] = "oops"  # not a number: NaN, like a missing value
            w.tick(i * 0.1, m)
    d = read_trace(p)
    a = d.column("a_bytes")
    assert np.isnan(a[5]) and [a[i] for i in range(12) if i != 5] == [float(i) for i in range(12) if i != 5]
    uss = d.column("uss_bytes")
    assert [i for i in range(12) if not np.isnan(uss[i])] == [0, 3, 6, 9] and uss[9] == 90.0
    assert np.isnan(d.column("gpu_ratio/0")[:8]).all() and (d.column("gpu_ratio/0")[8:] == 0.5).all()


def test_numpy_values_and_int_pids_are_written_as_plain_json(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    with TraceWriter(p, header()) as w:
        w.tick(0.0, {"a_bytes": np.float64(3.5), "n_items": np.int64(4)}, {99: {"rss_bytes": np.int64(7)}})
    rec = json.loads(p.read_bytes().splitlines()[1])
    assert rec == {"k": "tick", "t": 0.0, "m": {"a_bytes": 3.5, "n_items": 4}, "p": {"99": {"rss_bytes": 7}}}


# -- privacy -----------------------------------------------------------------------------------------------


def test_existing_file_becomes_private_and_new_directories_are_0700(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text("x")
    old.chmod(0o644)
    TraceWriter(old, header()).close()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    deep = tmp_path / "a" / "b" / "t.jsonl"
    TraceWriter(deep, header()).close()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE(deep.stat().st_mode) == 0o600


# -- a failing disk, a removed file -----------------------------------------------------------------------


class FlakyDisk:
    """Stands in for ``os.write``: takes ``room`` more bytes (a partial write at the edge), then ENOSPC."""

    def __init__(self, room: int | None = None) -> None:
        self.room = room

    def __call__(self, fd: int, data: object) -> int:
        view = memoryview(data)  # type: ignore[arg-type]
        if self.room is None:
            return os.write(fd, view)
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, view[: self.room])
        self.room -= n
        return n


def test_full_disk_half_written_line_is_completed_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FlakyDisk()
    monkeypatch.setattr(trace_writer, "_os_write", disk)
    p = tmp_path / "t.jsonl"
    w = TraceWriter(p, header())
    w.tick(0.0, {"a_bytes": 0.0})
    assert w.flush()
    disk.room = 25  # the next line is cut in the middle
    results = []
    for i in range(1, 6):
        w.tick(i * 0.1, {"a_bytes": float(i)})
        results.append(w.flush())
    assert results == [False] * 5 and w.error and "No space left on device" in w.error
    d = read_trace(p)  # meanwhile: readable, the torn last line skipped with a warning
    assert d.column("a_bytes").tolist() == [0.0] and any("incomplete" in x for x in d.warnings)
    disk.room = None
    w.tick(0.6, {"a_bytes": 6.0})
    assert w.flush() and w.error is None
    w.close()
    d = read_trace(p)
    assert d.column("a_bytes").tolist() == [float(i) for i in range(7)] and not d.warnings


def test_full_disk_buffer_is_bounded_oldest_dropped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FlakyDisk()
    monkeypatch.setattr(trace_writer, "_os_write", disk)
    monkeypatch.setattr(trace_writer, "BUFFER_LIMIT", 2000)
    p = tmp_path / "t.jsonl"
    w = TraceWriter(p, header())
    disk.room = 10  # part of the first tick goes out, then the disk is full
    for i in range(300):
        w.tick(i * 0.1, {"a_bytes": float(i)})
        assert not w.flush()
        assert w.buffered_bytes <= 2000 + 100
    assert w.dropped > 200
    disk.room = None
    w.close()
    d = read_trace(p)
    a = d.column("a_bytes").tolist()
    assert not d.warnings and a[0] == 0.0  # the half-written first tick was completed, not torn
    assert a[1:] == [float(i) for i in range(300 - len(a) + 1, 300)]  # then the newest ones, in order
    assert len(a) - 1 + w.dropped == 299


def test_unwritable_header_is_an_error_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_writer, "_os_write", FlakyDisk(room=0))
    with pytest.raises(OSError):
        TraceWriter(tmp_path / "t.jsonl", header())
    assert not (tmp_path / "t.jsonl").exists()


def test_trace_removed_while_recording_is_created_again(tmp_path: Path) -> None:
    d = tmp_path / "traces"
    p = d / "t.jsonl"
    w = TraceWriter(p, header())
    w.tick(0.0, {"a_bytes": 0.0})
    assert w.flush()
    p.unlink()
    columns_path(p).unlink()  # the trace's columnar companion goes with it
    d.rmdir()
    d.write_text("now a file")  # the directory cannot come back yet
    w.tick(0.1, {"a_bytes": 1.0})
    assert not w.flush() and w.error and "t.jsonl" in w.error
    d.unlink()
    w.tick(0.2, {"a_bytes": 2.0})
    assert w.flush() and w.reopened == 1
    w.close()
    data = read_trace(p)
    assert data.column("a_bytes").tolist() == [1.0, 2.0]
    assert "removed while recording" in data.notes[0]["msg"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(p.stat().st_mode) == 0o600


def test_tuner_run_default_trace_directory_is_0700_and_trace_0600(tmp_path: Path) -> None:
    from tests.cli import tuner

    cp = tuner("run", "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    (trace,) = (tmp_path / "traces").glob("*.jsonl")
    assert sorted((tmp_path / "traces").iterdir()) == [trace, columns_path(trace)]  # the trace and its companion
    assert stat.S_IMODE((tmp_path / "traces").stat().st_mode) == 0o700
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600
    assert stat.S_IMODE(columns_path(trace).stat().st_mode) == 0o600
    assert len(read_trace(trace).times) >= 1


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=3000), st.integers(min_value=1, max_value=700))
def test_follower_on_corrupted_growing_file_raises_only_trace_error(
    tmp_path_factory: pytest.TempPathFactory, junk: bytes, at: int, step: int
) -> None:
    """What the TUI reads: a corrupted file fed in arbitrary pieces never breaks the follower."""
    src = tmp_path_factory.mktemp("follow") / "src.jsonl"
    write_sample_trace(src, 20)
    data = bytearray(src.read_bytes())
    data[at : at + len(junk)] = junk
    p = src.with_name("t.jsonl")
    p.write_bytes(b"")
    got = 0
    with TraceFollower(p) as f:
        try:
            for i in range(0, len(data), step):
                with open(p, "ab") as out:
                    out.write(data[i : i + step])
                got += len(f.poll(max_bytes=step))
            got += len(f.poll())
        except TraceError as exc:
            assert "\n" not in str(exc) and f.header is None
        else:
            if not junk:  # nothing corrupted: every record arrives, however the bytes were cut
                assert got == 26 and f.bad_lines == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=1, max_value=6), st.none() | st.integers(0, 400)), max_size=25))
def test_any_pattern_of_disk_failures_keeps_order_and_counts_every_drop(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, int | None]]
) -> None:
    """Bursts of ticks, each followed by a flush with the disk taking ``room`` more bytes (None: all):
    once space is back the file is whole JSONL, in order, and written + dropped = everything."""
    disk = FlakyDisk()
    p = tmp_path_factory.mktemp("flaky") / "t.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setattr(trace_writer, "_os_write", disk)
    mp.setattr(trace_writer, "BUFFER_LIMIT", 1500)
    try:
        w = TraceWriter(p, header())
        n = 0
        for burst, room in steps:
            disk.room = room
            for _ in range(burst):
                w.tick(n * 0.1, {"a_bytes": float(n)})
                n += 1
            w.flush()
        disk.room = None
        w.close()
    finally:
        mp.undo()
    d = read_trace(p)
    assert not d.warnings
    got = d.column("a_bytes").tolist()
    assert got == sorted(got) and len(set(got)) == len(got)
    assert len(got) + w.dropped == n


def test_unencodable_record_becomes_an_error_note_not_a_crash(tmp_path: Path) -> None:
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no str")

    loop: dict = {}
    loop["self"] = loop
    p = tmp_path / "t.jsonl"
    with TraceWriter(p, header()) as w:
        w.tick(0.5, {"a_bytes": 1.0})
        w.write({"k": "event", "t": 0.6, "kind": "x", "data": loop})
        w.note(0.7, "odd", data=Bad())
        w.tick(0.8, {"a_bytes": 2.0})
    d = read_trace(p)
    assert d.column("a_bytes").tolist() == [1.0, 2.0]
    assert [n["level"] for n in d.notes] == ["error", "error"]
    assert "'event' record could not be encoded" in d.notes[0]["msg"] and d.notes[0]["t"] == 0.5


def test_integer_times_and_an_absurd_time_in_a_run_of_ticks(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    with TraceWriter(p, header()) as w:
        for i in range(5):
            w.tick(i, {"a_bytes": float(i)}, {1: {"rss_bytes": i}})  # int times are written as ints
    d = read_trace(p)
    assert d.times.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and d.procs[2] == (2.0, {"1": {"rss_bytes": 2}})
    assert all(type(t) is float for t, _ in d.procs)
    lines = p.read_bytes().split(b"\n")
    lines[3] = b'{"k":"tick","t":1' + b"0" * 400 + b',"m":{"a_bytes":9.0}}'
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(TraceError, match="line 4: a 'tick' record is malformed"):
        read_trace(p)
    assert read_trace(p, skip_bad=True).times.tolist() == [0.0, 1.0, 3.0, 4.0]


def test_header_only_trace_reads_as_empty(tmp_path: Path) -> None:
    """A recording killed right after it started: no ticks, not an error."""
    p = tmp_path / "t.jsonl"
    TraceWriter(p, header()).close()
    d = read_trace(p)
    assert len(d.times) == 0 and d.columns == {} and d.end is None and not d.warnings
    assert [r["k"] for r in trace_mod.iter_records(p)] == ["header"]
