"""A sidecar that runs for weeks (issue 18 §4): the trace in segments by size or age, closed segments
gzip-compressed, a retention bound; readers take the segments as one trace; no tick lost at a rotation; a
SIGKILL at any step of a rotation leaves a readable set."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner, tuner_env, tuner_popen
from tuner.records import Action, Applied, Event
from tuner.trace import (
    RotatingTraceWriter,
    Rotation,
    TraceData,
    TraceError,
    TraceFollower,
    TraceWriter,
    columns_path,
    iter_records,
    make_header,
    parse_rotation,
    read_trace,
    trace_files,
)
from tuner.trace.rotate import segment_info

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024


def header() -> dict[str, Any]:
    return make_header(
        probes={"cpu": {"available": True, "reason": None, "metrics": {"a_bytes": "bytes"}}}, interval_s=0.01
    )


def record_stream(w: TraceWriter, n: int, flush_every: int = 10) -> None:
    """A session's records: ticks (every 5th with processes, every 7th with a new key), request events,
    actions, notes, skips, flushed every ``flush_every`` ticks as the sampler does, then the end."""
    for i in range(n):
        t = i * 0.01
        values: dict[str, Any] = {"a_bytes": float(i * 100), "b_ratio": (i % 13) / 13 if i % 3 else None}
        if i % 7 == 0:
            values["c_items"] = i
        w.tick(t, values, {123: {"rss_bytes": float(i), "name": "x"}} if i % 5 == 0 else None)
        if i % 11 == 0:
            w.event(Event(t, "request", {"ttft_seconds": 0.01 * (i % 17), "tokens": i % 50}))
        if i % 97 == 0:
            w.action(Applied(t, Action("batch", "batch_size", 8 + i % 4, "test"), "applied", previous=8))
        if i % 53 == 0:
            w.note(t, f"note {i}")
        if i % 89 == 0:
            w.skip(t, 2)
        if i % flush_every == flush_every - 1:
            w.flush()
    w.end(n * 0.01, exit_code=0, ticks=n)


def same_data(a: TraceData, b: TraceData) -> None:
    np.testing.assert_array_equal(a.times, b.times)
    assert list(a.columns) == list(b.columns)
    for k in a.columns:
        np.testing.assert_array_equal(a.columns[k], b.columns[k], err_msg=k)
    assert a.procs == b.procs
    assert [(e.t, e.kind, e.data) for e in a.events] == [(e.t, e.kind, e.data) for e in b.events]
    assert a.actions == b.actions and a.notes == b.notes
    assert a.skipped == b.skipped and a.end == b.end


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# -- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("1GiB", (2**30, None)),
        ("500MB", (500 * 10**6, None)),
        ("6h", (None, 21600.0)),
        ("30m", (None, 1800.0)),
        ("90s", (None, 90.0)),
        ("1d", (None, 86400.0)),
        ("1GiB,6h", (2**30, 21600.0)),
        ("6h|1GiB", (2**30, 21600.0)),
        ("1.5GiB", (int(1.5 * 2**30), None)),
        ("64KiB", (65536, None)),
    ],
)
def test_parse_rotation(spec: str, expect: tuple[int | None, float | None]) -> None:
    r = parse_rotation(spec, 3)
    assert (r.max_bytes, r.max_seconds, r.keep) == (*expect, 3)


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("30M", "unknown unit 'M'"),
        ("1G", "unknown unit 'G'"),
        ("100", "is not a size"),
        ("", "give a size"),
        ("1GiB,", "give a size"),
        ("1KiB", "at least 64KiB"),
        ("0.5s", "at least 1s"),
        ("1GiB,2GiB", "two sizes"),
        ("6h,1d", "two ages"),
        ("-1h", "is not a size"),
        ("nanh", "is not a size"),
    ],
)
def test_parse_rotation_refuses(spec: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_rotation(spec)


def test_cli_refuses_bad_rotation_options_with_one_line(tmp_path: Path) -> None:
    t = str(tmp_path / "t.jsonl")
    err = assert_one_line_error(tuner("run", "--trace", t, "--trace-rotate", "30M", "--", "true"))
    assert "unknown unit 'M'" in err
    err = assert_one_line_error(tuner("run", "--trace", str(tmp_path / "t.jsonl"), "--trace-keep", "2", "--", "true"))
    assert "--trace-keep needs --trace-rotate" in err
    err = assert_one_line_error(
        tuner("run", "--trace", str(tmp_path / "t.jsonl"), "--trace-rotate", "1h", "--trace-keep", "-1", "--", "true")
    )
    assert "--trace-keep -1" in err
    err = assert_one_line_error(tuner("run", "--trace", "/dev/null", "--trace-rotate", "1h", "--", "true"))
    assert "regular file" in err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_an_earlier_rotated_recording_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    """``run.jsonl`` itself was compressed away: the name is free, but a new rotated recording there would
    rename its segments onto the old set's ``.gz`` files."""
    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB)) as w:
        record_stream(w, 4000)
    assert not p.exists() and (tmp_path / "run.jsonl.gz").exists()
    err = assert_one_line_error(tuner("run", "--trace", str(p), "--trace-rotate", "1h", "--", "true"))
    assert "an earlier rotated recording left" in err and "--overwrite" in err
    before = read_trace(p)
    cp = tuner("run", "--quiet", "--trace", str(p), "--trace-rotate", "1h", "--overwrite", "--", "true")
    assert cp.returncode == 0, cp.stderr
    assert files(tmp_path) == ["run.jsonl", "run.jsonl.cols"]  # the old set's files are gone
    after = read_trace(p)
    assert segment_info(after.header) is not None and len(after.times) < len(before.times)


# -- the writer and the readers ------------------------------------------------------------------------


def test_a_rotated_recording_reads_exactly_as_the_same_records_in_one_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    with TraceWriter(plain, header()) as w:
        record_stream(w, 6000)
    rot = tmp_path / "rot" / "run.jsonl"
    with RotatingTraceWriter(rot, header(), Rotation(max_bytes=64 * KiB)) as w:
        record_stream(w, 6000)
    names = files(rot.parent)
    closed = [n for n in names if n.endswith(".gz")]
    assert len(closed) >= 4, names
    # closed segments compressed, with no companion; the last one plain with its companion
    assert set(names) - set(closed) == {f"run.{len(closed):06d}.jsonl", f"run.{len(closed):06d}.jsonl.cols"}
    assert not any(n.endswith((".tmp", ".jsonl.gz.cols")) for n in names)
    assert "run.jsonl.gz" in names and "run.jsonl" not in names
    # each segment starts with the recording's header and its place in the set
    segs, warnings = trace_files(rot)
    assert warnings == [] and len(segs) == len(closed) + 1
    set_ids = set()
    last_t = -1.0
    for i, f in enumerate(segs):
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rb") as fh:
            lines = fh.read().splitlines()
        hdr = json.loads(lines[0])
        assert hdr["k"] == "header" and hdr["command"] == header()["command"]
        assert hdr["segment"]["index"] == i and hdr["segment"]["base"] == "run.jsonl"
        set_ids.add(hdr["segment"]["set"])
        first = json.loads(lines[1])
        assert first["t"] >= last_t and hdr["segment"]["t"] <= first["t"]
        last_t = json.loads(lines[-1])["t"]
        if f.name.endswith(".gz"):
            assert f.stat().st_size < sum(map(len, lines)) / 4  # JSON compresses well
            assert len(b"\n".join(lines)) + 1 >= 64 * KiB  # a segment ends once it holds 64 KiB
    assert len(set_ids) == 1
    for name in ("run.jsonl", "run.jsonl.gz", segs[2].name, segs[-1].name, str(rot.parent / "run*")):
        given = name if name.startswith("/") else rot.parent / name
        same_data(read_trace(given), read_trace(plain))
    assert list(iter_records(rot.parent / "run*"))[1:] == list(iter_records(plain))[1:]


def test_rotation_by_age_in_trace_time(tmp_path: Path) -> None:
    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_seconds=10.0)) as w:
        record_stream(w, 4500)  # 45 s of trace time at 100 Hz
    segs, _ = trace_files(p)
    starts = [segment_info_t(f) for f in segs]
    assert starts == pytest.approx([0.0, 10.0, 20.0, 30.0, 40.0], abs=0.1)  # rotated at the next flush after 10 s
    assert len(read_trace(p).times) == 4500


def segment_info_t(f: Path) -> float:
    opener = gzip.open if f.name.endswith(".gz") else open
    with opener(f, "rb") as fh:
        return float(json.loads(fh.readline())["segment"]["t"])


def test_retention_keeps_the_newest_closed_segments_and_readers_say_what_is_gone(tmp_path: Path) -> None:
    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB, keep=2)) as w:
        record_stream(w, 8000)
    names = [n for n in files(tmp_path) if not n.endswith(".cols")]
    assert len(names) == 3 and sum(n.endswith(".gz") for n in names) == 2, names  # 2 closed + the live one
    d = read_trace(p)  # by segment 0's name, which is gone
    first = int(names[0].split(".")[1])
    assert d.warnings == [
        f"{p}: segments 0-{first - 1} of this recording are not here (deleted by --trace-keep, or moved); "
        f"reading from segment {first}"
    ]
    assert d.end is not None and d.times[-1] == pytest.approx(79.99)
    assert np.allclose(np.diff(d.times), 0.01)  # the kept segments are contiguous


def test_keep_zero_deletes_closed_segments_without_compressing_them(tmp_path: Path) -> None:
    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB, keep=0)) as w:
        record_stream(w, 4000)
    names = files(tmp_path)
    assert len(names) == 2 and names[0].endswith(".jsonl") and names[1].endswith(".cols"), names


def test_a_segment_that_cannot_be_compressed_stays_plain_and_the_trace_says_so(tmp_path: Path) -> None:
    p = tmp_path / "run.jsonl"
    (tmp_path / "run.000001.jsonl.gz").mkdir()  # in the way of the second segment's compressed copy
    logged: list[str] = []
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB), log=logged.append) as w:
        record_stream(w, 6000)
    assert (tmp_path / "run.000001.jsonl").is_file() and (tmp_path / "run.000001.jsonl.cols").is_file()
    d = read_trace(p)
    msgs = [n["msg"] for n in d.notes if n["level"] == "warn"]
    assert msgs == ["could not compress trace segment run.000001.jsonl (run.000001.jsonl.gz exists already); "
                    "it stays uncompressed"]  # fmt: skip
    assert logged == msgs
    assert len(d.times) == 6000 and d.warnings == []  # the directory in the way is not taken for a segment


def test_a_damaged_compressed_segment_is_a_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB)) as w:
        record_stream(w, 4000)
    gz = tmp_path / "run.000001.jsonl.gz"
    data = bytearray(gz.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    gz.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"run\.000001\.jsonl\.gz: the compressed trace is damaged"):
        read_trace(p)
    err = assert_one_line_error(tuner("report", str(p)))
    assert "compressed trace is damaged" in err


def test_a_glob_must_name_one_recording(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        with RotatingTraceWriter(tmp_path / name, header(), Rotation(max_bytes=64 * KiB)) as w:
            record_stream(w, 3000)
    with pytest.raises(TraceError, match="of 2 different recordings"):
        read_trace(tmp_path / "*.jsonl*")
    with pytest.raises(TraceError, match="no file matches"):
        read_trace(tmp_path / "c*")
    assert len(read_trace(tmp_path / "a*").times) == 3000
    err = assert_one_line_error(tuner("report", str(tmp_path / "*")))
    assert "different recordings" in err


def test_follower_crosses_segments_while_they_are_written(tmp_path: Path) -> None:
    """A follower started on segment 0 reads every record once, in order, as the writer rotates,
    compresses and deletes (keep=1) behind it."""
    p = tmp_path / "run.jsonl"
    w = RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB, keep=1))
    w.flush()
    got: list[dict[str, Any]] = []
    fol = TraceFollower(p)
    done = threading.Event()

    def write() -> None:
        try:
            for chunk in range(30):
                for i in range(chunk * 200, chunk * 200 + 200):
                    w.tick(i * 0.01, {"a_bytes": float(i)})
                    if i % 10 == 9:
                        w.flush()
                time.sleep(0.02)
            w.end(60.0)
            w.close()
        finally:
            done.set()

    th = threading.Thread(target=write)
    th.start()
    try:
        while True:
            recs = fol.poll(max_bytes=16 * KiB)  # slower than the writer: it must cross segments behind it
            got += recs
            if got and got[-1]["k"] == "end":
                break
            if not recs:
                assert not (done.is_set() and fol.poll() == [] and not th.is_alive() and got[-1]["k"] != "end")
                time.sleep(0.005)
    finally:
        th.join()
        fol.close()
    ticks = [r["t"] for r in got if r["k"] == "tick"]
    assert [r["k"] for r in got].count("header") == 1 and got[0]["k"] == "header"
    assert len(ticks) == 6000 and ticks == sorted(ticks) and len(set(ticks)) == 6000
    assert fol.bad_lines == 0
    assert len(trace_files(p)[0]) == 2  # keep=1: one closed segment besides the last


def test_tui_file_source_reads_a_rotated_recording_as_one(tmp_path: Path) -> None:
    from tuner.tui.source import FileSource

    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=64 * KiB)) as w:
        record_stream(w, 3000)
    src = FileSource(str(tmp_path / "run*"))
    assert src.replay and src.describe == "replay run.jsonl.gz"
    recs: list[dict[str, Any]] = []
    while (batch := src.read(0.01)) is not None:
        recs += batch
    src.close()
    assert recs[1:] == list(iter_records(p))[1:]


# -- crash guarantees: a SIGKILL at each step of a rotation -------------------------------------------

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import tuner.trace.rotate as rotate
    import tuner.trace.writer as writer
    from tuner.trace import RotatingTraceWriter, Rotation, make_header

    path, step = Path(sys.argv[1]), sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    seen = {"n": 0}

    def second(fn, when):  # kill at the given call of fn for a segment after the first
        def wrapped(*a, **k):
            if when(*a):
                seen["n"] += 1
                if seen["n"] == 2:
                    die()
            return fn(*a, **k)
        return wrapped

    if step == "before-header":  # the next segment created, nothing in it
        _real_open = writer._open_private
        def _open(p, flags):
            fd = _real_open(p, flags)
            if ".000002" in str(p):
                die()
            return fd
        writer._open_private = _open
    elif step == "torn-header":  # half of the next segment's header written
        _real_w = writer._write_all
        def _w(fd, data):
            if data.startswith(b'{"k":"header"') and b'"index":2' in data:
                os.write(fd, data[: len(data) // 2])
                die()
            return _real_w(fd, data)
        writer._write_all = _w
    elif step == "mid-compress":  # half of the first segment compressed into its .gz.tmp
        import gzip
        _real_gw = gzip.GzipFile.write
        def _gw(self, data):
            _real_gw(self, bytes(data)[: len(data) // 2])
            self.fileobj.flush()
            die()
        gzip.GzipFile.write = _gw
    elif step == "before-rename":  # the .gz.tmp written and fsynced, not yet renamed
        rotate.os.rename = second(os.rename, lambda *a: True)
    elif step == "after-rename":  # the .gz in place, the plain segment not yet deleted
        rotate._fsync_dir = second(rotate._fsync_dir, lambda *a: True)
    elif step == "after-delete":  # the plain segment deleted, its companion not yet
        rotate._unlink = second(rotate._unlink, lambda p: str(p).endswith(".cols"))
    elif step == "retention":  # in the middle of deleting the oldest
        rotate._unlink = second(rotate._unlink, lambda p: not str(p).endswith(".cols"))
    hdr = make_header(probes={}, interval_s=0.01)
    w = RotatingTraceWriter(path, hdr, Rotation(max_bytes=64 * 1024, keep=1 if step == "retention" else None))
    for i in range(100000):
        w.tick(i * 0.01, {"a_bytes": float(i), "b_ratio": 0.5})
        if i % 10 == 9:
            w.flush()
            if step in ("mid-compress", "before-rename", "after-rename", "after-delete", "retention"):
                import time; time.sleep(0.001)  # let the background thread reach its step
    print("never killed")
    """
)


@pytest.mark.parametrize(
    "step",
    ["before-header", "torn-header", "mid-compress", "before-rename", "after-rename", "after-delete", "retention"],
)
def test_sigkill_at_each_step_of_a_rotation_leaves_a_readable_set(tmp_path: Path, step: str) -> None:
    p = tmp_path / "run.jsonl"
    cp = subprocess.run([sys.executable, "-c", _KILLER, str(p), step], capture_output=True, text=True, timeout=120,
                        env=tuner_env())  # fmt: skip
    assert cp.returncode == -signal.SIGKILL, (cp.returncode, cp.stdout, cp.stderr)
    names = files(tmp_path)
    d = read_trace(p)
    n = len(d.times)
    assert n >= 1000, (n, names)
    first = 0 if step != "retention" else int(d.column("a_bytes")[0])  # retention: the oldest deleted
    np.testing.assert_array_equal(d.column("a_bytes"), np.arange(first, first + n, dtype=float))  # each once, in order
    assert d.times == pytest.approx(np.arange(first, first + n) * 0.01)
    expect_files = {
        "before-header": lambda: "run.000002.jsonl" in names and (tmp_path / "run.000002.jsonl").stat().st_size == 0,
        "torn-header": lambda: "run.000002.jsonl" in names,
        "mid-compress": lambda: "run.jsonl.gz.tmp" in names and "run.jsonl" in names,
        "before-rename": lambda: any(x.endswith(".gz.tmp") for x in names),
        "after-rename": lambda: "run.000001.jsonl" in names and "run.000001.jsonl.gz" in names,
        "after-delete": lambda: "run.000001.jsonl.cols" in names and "run.000001.jsonl" not in names,
        "retention": lambda: True,
    }[step]
    assert expect_files(), names
    if step in ("before-header", "torn-header"):
        assert any("no complete trace header" in w for w in d.warnings), d.warnings
    # and the tools read it as well
    out = tmp_path / "out.csv"
    cp = tuner("export", str(p), "--to", "csv", str(out))
    assert cp.returncode == 0, cp.stderr
    with open(out) as f:
        assert sum(1 for _ in csv.reader(f)) == n + 1
    fol = TraceFollower(tmp_path / "run*")
    ticks = 0
    while recs := fol.poll():
        ticks += sum(r["k"] == "tick" for r in recs)
    fol.close()
    assert ticks == n


# -- the real command --------------------------------------------------------------------------------


def test_tuner_run_at_100hz_rotates_without_losing_a_tick(tmp_path: Path) -> None:
    """``tuner run --interval 0.01 --trace-rotate 64KiB``: a segment every ~half second; a follower started
    with the run reads along across segments; at the end every tick the sampler took is in the set once,
    in order, and report, export and replay read the set from its first segment or a glob."""
    p = tmp_path / "run.jsonl"
    run = tuner_popen("run", "--headless", "--interval", "0.01", "--trace", str(p), "--trace-rotate", "64KiB",
                      "--", sys.executable, "-c", "import time; time.sleep(8)")  # fmt: skip
    followed: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while not p.exists():
            assert time.monotonic() < deadline and run.poll() is None, run.communicate()
            time.sleep(0.05)
        fol = TraceFollower(p)
        deadline = time.monotonic() + 60
        while not (followed and followed[-1]["k"] == "end") and time.monotonic() < deadline:
            recs = fol.poll(max_bytes=32 * KiB)
            followed += recs
            if not recs:
                time.sleep(0.05)
        fol.close()
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    assert "Traceback" not in err
    d = read_trace(p)
    segs, warnings = trace_files(p)
    assert len(segs) >= 5 and warnings == [] and d.warnings == []
    assert all(s.name.endswith(".gz") for s in segs[:-1])
    assert d.end is not None
    assert len(d.times) == d.end["ticks"]  # every tick the sampler took, once
    assert (np.diff(d.times) > 0).all()
    assert d.skipped == d.end["skipped"]
    fticks = [r["t"] for r in followed if r["k"] == "tick"]
    assert fticks == d.times.tolist()  # the live follower crossed every segment
    assert [r["k"] for r in followed].count("header") == 1 and followed[-1]["k"] == "end"
    # the commands, on the first segment's name (now compressed away) and on a glob
    for given in (str(p), str(tmp_path / "run*")):
        cp = tuner("report", "--json", given)
        assert cp.returncode == 0, cp.stderr
        rep = json.loads(cp.stdout)
        assert rep["ticks"] == len(d.times), rep.keys()
    out_csv = tmp_path / "x.csv"
    cp = tuner("export", str(tmp_path / "run*"), "--to", "csv", str(out_csv))
    assert cp.returncode == 0, cp.stderr
    with open(out_csv) as f:
        assert sum(1 for _ in csv.reader(f)) == len(d.times) + 1
    cp = tuner("replay", str(p), "--policy", "offline")
    assert cp.returncode == 0, cp.stderr
    assert f"{len(d.times)} ticks" in cp.stdout


@pytest.mark.slow
def test_tuner_run_killed_at_random_moments_leaves_readable_sets(tmp_path: Path) -> None:
    rng = random.Random(18)
    for k in range(6):
        p = tmp_path / f"k{k}" / "run.jsonl"
        run = tuner_popen("run", "--quiet", "--interval", "0.01", "--trace", str(p), "--trace-rotate", "64KiB",
                          "--trace-keep", "3", "--", "sleep", "60", start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while not p.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0 + rng.random() * 4.0)  # 1-5 s into the recording: 2-10 rotations
        os.killpg(run.pid, signal.SIGKILL)  # the sidecar and its command, both of them started here
        run.communicate(timeout=30)
        d = read_trace(p)
        assert len(d.times) > 50 and (np.diff(d.times) > 0).all(), (k, files(p.parent))
        assert d.end is None  # killed: no end record, like an unrotated trace
        assert not [w for w in d.warnings if "missing" in w], d.warnings


def test_companion_is_used_for_the_plain_segments(tmp_path: Path) -> None:
    """The last segment (and any plain one) keeps its columnar companion, checked and used as for one file."""
    p = tmp_path / "run.jsonl"
    with RotatingTraceWriter(p, header(), Rotation(max_bytes=2 * 1024 * KiB)) as w:
        record_stream(w, 40000, flush_every=100)
    segs, _ = trace_files(p)
    assert len(segs) >= 2 and columns_path(segs[-1]).stat().st_size > 0
    d1 = read_trace(p)
    columns_path(segs[-1]).unlink()
    same_data(read_trace(p), d1)


@pytest.mark.integration
def test_tuner_tui_follows_a_rotating_run_across_segments_in_a_terminal(tmp_path: Path) -> None:
    """``tuner tui 'run*'`` in tmux beside ``tuner run --trace-rotate 64KiB`` at 100 Hz: the view's clock
    runs on past the first segments (each holds about half a second) until the session ends."""
    from tests.test_tui_tmux import TMUX, Tmux

    if TMUX is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    p = tmp_path / "run.jsonl"
    run = tuner_popen("run", "--quiet", "--interval", "0.01", "--trace", str(p), "--trace-rotate", "64KiB",
                      "--", "sleep", "7")  # fmt: skip
    term = Tmux()
    try:
        deadline = time.monotonic() + 30
        while not p.exists():
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        term.send(f"cd {ROOT} && {sys.executable} -m tuner tui '{tmp_path}/run*'; echo TUI-EXIT=$?", "Enter")
        import re

        screen = term.wait(lambda s: re.search(r"up 00:0[4-9]", s) is not None, timeout=40)
        assert "CPU tree" in screen and "Traceback" not in screen
        assert len(trace_files(p)[0]) >= 4  # the view got there through several segments
        run.wait(timeout=30)
        term.send("q")
        final = term.wait(lambda s: re.search(r"^TUI-EXIT=\d+", s, re.M) is not None, timeout=20)
        assert re.search(r"^TUI-EXIT=0$", final, re.M), final
    finally:
        term.kill()
        if run.poll() is None:
            run.kill()
            run.wait()
