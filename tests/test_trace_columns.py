"""The trace's columnar companion (``<trace>.cols``): ``read_trace`` gives exactly the same result with it
as without it, whatever happened to either file (written in pieces, killed mid-block, truncated, edited,
swapped for another trace's); it is private like the trace; its failures never touch the trace."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tuner.trace.columns as trace_columns
import tuner.trace.format as trace_format
import tuner.trace.reader as trace_reader
import tuner.trace.writer as trace_writer
from tuner.records import Action, Applied, Event
from tuner.trace import TraceData, TraceError, TraceWriter, columns_path, make_header, read_trace


def header() -> dict[str, Any]:
    return make_header(probes={"cpu": {"available": True, "reason": None, "metrics": {}}}, interval_s=0.1)


@contextmanager
def counting_blocks() -> Iterator[list[int]]:
    """Counts the companion blocks ``read_trace`` takes (checked against the trace) while inside."""
    taken: list[int] = []
    real = trace_reader._check_block

    def check(*args: Any) -> Any:
        blk = real(*args)
        if blk is not None:
            taken.append(len(blk.covered.t))
        return blk

    trace_reader._check_block = check  # type: ignore[assignment]
    try:
        yield taken
    finally:
        trace_reader._check_block = real  # type: ignore[assignment]


def outcome(path: Path, skip_bad: bool) -> TraceData | str:
    try:
        return read_trace(path, skip_bad=skip_bad)
    except TraceError as exc:
        return f"TraceError: {exc}"


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal element for element, NaN where NaN, and the same sign of zero."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = np.isnan(a), np.isnan(b)
    return bool((na == nb).all()) and a[~na].tobytes() == b[~nb].tobytes()


def assert_same(a: TraceData | str, b: TraceData | str) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert same_floats(a.times, b.times)
    assert list(a.columns) == list(b.columns)  # the same keys in the same order
    for k in a.columns:
        assert same_floats(a.columns[k], b.columns[k]), k
    assert a.header == b.header
    assert a.events == b.events
    assert a.actions == b.actions
    assert a.notes == b.notes
    assert a.skipped == b.skipped
    assert a.end == b.end
    assert a.warnings == b.warnings
    assert a.procs == b.procs
    assert [type(t) for t, _ in a.procs] == [type(t) for t, _ in b.procs]


def read_both(path: Path, skip_bad: bool = False) -> tuple[TraceData | str, list[int]]:
    """``read_trace`` with the companion and with it moved away: asserted equal; the first and the
    blocks it took."""
    cols = columns_path(path)
    with counting_blocks() as taken:
        with_cols = outcome(path, skip_bad)
    if cols.exists():
        aside = cols.with_name(cols.name + ".aside")
        cols.rename(aside)
        try:
            with counting_blocks() as none:
                without = outcome(path, skip_bad)
            assert not none
        finally:
            aside.rename(cols)
        assert_same(with_cols, without)
    return with_cols, taken


# -- writing a trace from a random script -----------------------------------------------------------------

KEYS = ["a_bytes", "b_ratio", "c_items", "d_seconds", "sys_core_cpu_ratio/0", "e_watts"]

plain_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([None, True, False, 0, -0.0, 10**400, -(10**400), 2**63, 2**64 + 1]),
)
odd_value = st.one_of(
    st.sampled_from(["1.5", "abc", "inf", "", " 2 ", "nan", "1e400", [1.0], [], {"x": 1}, [1.0, 2.0], (3,)]),
    st.text(max_size=5),
    st.builds(np.float32, st.floats(width=32, allow_nan=False)),
    st.builds(np.int64, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.builds(np.float64, st.floats()),
)


@st.composite
def tick_values(draw: st.DrawFn, odd: bool) -> dict[Any, Any]:
    keys = draw(st.sampled_from([KEYS, KEYS[:3], KEYS[::-1], [*KEYS[1:], "f_bytes"], [], ["a_bytes"]]))
    values = st.one_of(plain_value, odd_value) if odd else plain_value
    m: dict[Any, Any] = {k: draw(values) for k in keys}
    if odd and draw(st.integers(0, 30)) == 0:
        m[7] = 1.0  # a key orjson writes as "7"
    return m


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, Any]]:
    odd = draw(st.booleans())
    ops: list[tuple[str, Any]] = []
    t = 0.0
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["tick"] * 8 + ["flush"] * 3 + ["event", "note", "skip", "action", "raw", "end"]))
        t += draw(st.sampled_from([0.1, 0.05, 1e-7, 0.0, 5e-7, 1.0 / 3]))
        if kind == "tick":
            tt: Any = t
            if odd and draw(st.integers(0, 40)) == 0:
                tt = draw(st.sampled_from([math.nan, math.inf, 2**60, 3, True, np.float64(t)]))
            procs = draw(st.sampled_from([None, {}, {7: {"name": "p", "rss_bytes": 5}}, {1: {"n": 1}, 2: {"x": [1]}}]))
            ops.append(("tick", (tt, draw(tick_values(odd)), procs)))
        elif kind == "raw":  # a record a tick() did not write; some malformed
            ops.append(("raw", draw(st.sampled_from([
                {"k": "tick", "t": t, "m": {"a_bytes": 1.0}},
                {"t": t, "k": "tick", "m": {"z_bytes": 2.0}},
                {"k": "tick", "t": "late", "m": {}},
                {"k": "event", "t": t, "data": [1]},
                {"k": "mystery", "t": t},
            ]))))  # fmt: skip
        else:
            ops.append((kind, t))
    return ops


def run_script(path: Path, ops: list[tuple[str, Any]], close: bool = True) -> TraceWriter:
    w = TraceWriter(path, header())
    for kind, arg in ops:
        if kind == "tick":
            w.tick(*arg)
        elif kind == "raw":
            w.write(arg)
        elif kind == "flush":
            w.flush()
        elif kind == "event":
            w.event(Event(arg, "request", {"ttft_s": 0.1, "tokens": 3}))
        elif kind == "note":
            w.note(arg, "a note", "warn", where="here")
        elif kind == "skip":
            w.skip(arg, 2)
        elif kind == "action":
            w.action(Applied(arg, Action("p", "batch_size", 4, "why", {"x": 1}), "applied", 8, {"ok": True}))
        elif kind == "end":
            w.end(arg, exit_code=0)
    if close:
        w.close()
    else:
        w.flush()
    return w


@st.composite
def damages(draw: st.DrawFn) -> tuple[str, int, int]:
    what = draw(st.sampled_from(["none", "none", "cut cols", "cut trace", "edit trace", "edit cols", "junk trace",
                                 "drop a trace line", "swap cols", "no newline at the end", "change a digit",
                                 "change a digit", "swap two lines", "join two lines"]))  # fmt: skip
    return what, draw(st.integers(0, 10**6)), draw(st.integers(0, 255))


def damage(path: Path, how: tuple[str, int, int], other: Path) -> None:
    what, at, byte = how
    cols = columns_path(path)
    if what == "cut cols" and cols.exists():  # a writer killed mid-block (or mid-header)
        data = cols.read_bytes()
        cols.write_bytes(data[: at % (len(data) + 1)])
    elif what == "cut trace":  # a torn tail, or a trace cut inside a covered block
        data = path.read_bytes()
        path.write_bytes(data[: at % (len(data) + 1)])
    elif what == "edit trace":
        edited = bytearray(path.read_bytes())
        edited[at % len(edited)] = byte
        path.write_bytes(bytes(edited))
    elif what == "edit cols" and cols.exists():
        edited = bytearray(cols.read_bytes())
        edited[at % len(edited)] ^= byte or 1
        cols.write_bytes(bytes(edited))
    elif what == "junk trace":
        with open(path, "ab") as f:
            f.write(b'{"k":"tick","t":99,"m":{"a_bytes":5}}\n{"k":"tick","t":1' if byte % 2 else b"garbage\n")
    elif what == "drop a trace line":
        lines = path.read_bytes().split(b"\n")
        if len(lines) > 2:
            del lines[1 + at % (len(lines) - 1)]
            path.write_bytes(b"\n".join(lines))
    elif what == "swap cols" and columns_path(other).exists():
        shutil.copyfile(columns_path(other), cols)
    elif what == "change a digit":  # the same length, the same lines: only the CRC can tell
        edited = bytearray(path.read_bytes())
        start = edited.find(b"\n") + 1
        digits = [i for i in range(start, len(edited)) if 48 <= edited[i] <= 57]
        if digits:
            i = digits[at % len(digits)]
            edited[i] = 48 + (edited[i] - 48 + 1 + byte % 9) % 10
            path.write_bytes(bytes(edited))
    elif what == "join two lines":  # a newline replaced: often the one just before a block's range
        edited = bytearray(path.read_bytes())
        newlines = [i for i in range(len(edited) - 1) if edited[i] == 10]
        if newlines:
            edited[newlines[at % len(newlines)]] = 32
            path.write_bytes(bytes(edited))
    elif what == "swap two lines":
        lines = path.read_bytes().split(b"\n")
        if len(lines) > 3:
            i = 1 + at % (len(lines) - 2)
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
            path.write_bytes(b"\n".join(lines))
    elif what == "no newline at the end":
        data = path.read_bytes()
        path.write_bytes(data.rstrip(b"\n"))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_columns, "_COLS_BLOCK_BYTES", 300)  # many blocks from a few ticks


def check_script(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, Any]], how: tuple[str, int, int], close: bool,
    skip_bad: bool, other_ops: list[tuple[str, Any]],
) -> None:  # fmt: skip
    d = tmp_path_factory.mktemp("cols")
    path, other = d / "t.jsonl", d / "other.jsonl"
    run_script(other, other_ops)
    run_script(path, ops, close)
    damage(path, how, other)
    read_both(path, skip_bad)


_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
_CASES = {"ops": scripts(), "how": damages(), "close": st.booleans(), "skip_bad": st.booleans(), "other_ops": scripts()}


@settings(max_examples=80, deadline=None, suppress_health_check=_HEALTH)
@given(**_CASES)
def test_read_with_companion_is_read_without_it(
    tmp_path_factory: pytest.TempPathFactory, small_blocks: None, ops: list[tuple[str, Any]],
    how: tuple[str, int, int], close: bool, skip_bad: bool, other_ops: list[tuple[str, Any]],
) -> None:  # fmt: skip
    check_script(tmp_path_factory, ops, how, close, skip_bad, other_ops)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=_HEALTH)
@given(**_CASES)
def test_read_with_companion_is_read_without_it_many(
    tmp_path_factory: pytest.TempPathFactory, small_blocks: None, ops: list[tuple[str, Any]],
    how: tuple[str, int, int], close: bool, skip_bad: bool, other_ops: list[tuple[str, Any]],
) -> None:  # fmt: skip
    check_script(tmp_path_factory, ops, how, close, skip_bad, other_ops)


@settings(max_examples=40, deadline=None, suppress_health_check=_HEALTH)
@given(ops=scripts())
def test_plain_ticks_are_read_from_the_companion(
    tmp_path_factory: pytest.TempPathFactory, small_blocks: None, ops: list[tuple[str, Any]]
) -> None:
    """Not a vacuous equality: ticks of plain values (what probes give) come from the companion."""
    assume(not any(kind == "raw" for kind, _ in ops))
    path = tmp_path_factory.mktemp("plain") / "t.jsonl"
    ticks = [(t, {k: v for k, v in m.items() if type(v) in (float, int, bool, type(None))}, p)
             for kind, (t, m, p) in [(k, a) for k, a in ops if k == "tick"]
             if type(t) is float and math.isfinite(t)]  # fmt: skip
    w = TraceWriter(path, header())
    for i, (t, m, p) in enumerate(ticks):
        w.tick(t + i, {k: v for k, v in m.items() if type(k) is str}, p)
    w.close()
    got, taken = read_both(path)
    assert isinstance(got, TraceData)
    assert sum(taken) == len(ticks) == len(got.times)


# -- the companion file ---------------------------------------------------------------------------------


def write_ticks(path: Path, n: int) -> TraceWriter:
    w = TraceWriter(path, header())
    for i in range(n):
        w.tick(i * 0.1, {"a_bytes": float(i), "b_items": i, "c_ratio": None if i % 3 else 0.5}, {9: {"rss_bytes": i}})
        if i % 7 == 0:
            w.event(Event(i * 0.1, "request", {"ttft_s": 0.01 * i}))
        w.flush()
    w.close()
    return w


def test_edited_trace_is_read_from_the_trace_where_edited(tmp_path: Path, small_blocks: None) -> None:
    path = tmp_path / "t.jsonl"
    write_ticks(path, 60)
    data = path.read_bytes()
    assert data.count(b'"a_bytes":30.0,') == 1
    path.write_bytes(data.replace(b'"a_bytes":30.0,', b'"a_bytes":31.0,'))  # same length, same lines
    d, taken = read_both(path)
    assert isinstance(d, TraceData) and d.column("a_bytes")[30] == 31.0
    assert 0 < sum(taken) < 60  # the other blocks still count


def test_companion_is_private_and_named_after_the_trace(tmp_path: Path) -> None:
    path = tmp_path / "new" / "run.jsonl"
    write_ticks(path, 50)
    cols = columns_path(path)
    assert cols == tmp_path / "new" / "run.jsonl.cols"
    assert stat.S_IMODE(cols.stat().st_mode) == 0o600
    assert stat.S_IMODE(cols.parent.stat().st_mode) == 0o700
    d, taken = read_both(path)
    assert isinstance(d, TraceData) and sum(taken) == 50
    assert d.column("b_items").tolist() == [float(i) for i in range(50)]
    assert d.procs[49] == (pytest.approx(4.9), {"9": {"rss_bytes": 49}})


def test_overwritten_trace_leaves_no_stale_companion(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_ticks(path, 200)
    old = columns_path(path).read_bytes()
    w = TraceWriter(path, header())  # --overwrite: the old companion is gone before anything else
    assert not columns_path(path).exists() or columns_path(path).read_bytes() != old
    w.tick(0.0, {"z_bytes": 1.0})
    w.close()
    d, _ = read_both(path)
    assert isinstance(d, TraceData) and list(d.columns) == ["z_bytes"] and len(d.times) == 1


def test_stale_companion_of_another_trace_is_not_used(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_ticks(a, 100)
    write_ticks(b, 100)  # the same ticks, another header (its start time)
    shutil.copyfile(columns_path(a), columns_path(b))
    d, taken = read_both(b)
    assert isinstance(d, TraceData) and not taken and len(d.times) == 100


def test_companion_that_cannot_be_created_is_no_error(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    columns_path(path).mkdir()  # in the way, and cannot be removed as a file
    write_ticks(path, 30)
    d, taken = read_both(path)
    assert isinstance(d, TraceData) and len(d.times) == 30 and not taken


class FailingDisk:
    """``os.write`` for the companion only, failing with ``err`` once ``room`` bytes are written."""

    def __init__(self, room: int, err: int = errno.ENOSPC) -> None:
        self.room, self.err, self.calls = room, err, 0

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.room <= 0:
            raise OSError(self.err, os.strerror(self.err))
        n = os.write(fd, memoryview(data)[: self.room])
        self.room -= n
        return n


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EFBIG])
@pytest.mark.parametrize("room", [0, 30, 3000])
def test_companion_write_failure_is_abandoned_and_trace_unharmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: None, err: int, room: int
) -> None:
    ref = tmp_path / "ref.jsonl"
    write_ticks(ref, 80)
    disk = FailingDisk(room, err)
    monkeypatch.setattr(trace_columns, "_cols_write", disk)
    path = tmp_path / "t.jsonl"
    w = write_ticks(path, 80)  # never raises
    assert disk.calls and w.error is None
    assert not columns_path(path).exists()  # given up, and removed
    strip = lambda b: b.split(b"\n", 1)[1]  # noqa: E731 - the headers differ (start time)
    assert strip(path.read_bytes()) == strip(ref.read_bytes())
    d, taken = read_both(path)
    assert isinstance(d, TraceData) and len(d.times) == 80 and not taken


def test_companion_deleted_while_recording(tmp_path: Path, small_blocks: None) -> None:
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path, header())
    for i in range(40):
        w.tick(i * 0.1, {"a_bytes": float(i)})
        w.flush()
        if i == 20:
            columns_path(path).unlink()
    w.close()
    d = read_trace(path)
    assert d.column("a_bytes").tolist() == [float(i) for i in range(40)] and not d.warnings


def test_trace_write_failure_leaves_that_range_to_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: None
) -> None:
    """Lines lost or half-written while the disk was full: the companion must not claim them."""
    room = [10**9]

    def disk(fd: int, data: Any) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, memoryview(data)[: room[0]])
        room[0] -= n
        return n

    monkeypatch.setattr(trace_writer, "_os_write", disk)
    monkeypatch.setattr(trace_writer, "BUFFER_LIMIT", 400)
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path, header())
    for i in range(120):
        if i == 40:
            room[0] = 25  # half a line, then full
        if i == 80:
            room[0] = 10**9
        w.tick(i * 0.1, {"a_bytes": float(i), "b_ratio": 0.5})
        w.flush()
    w.close()
    assert w.dropped > 0
    d, taken = read_both(path)
    assert isinstance(d, TraceData) and not d.warnings and taken
    assert len(d.times) == 120 - w.dropped


KILLED_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
import tuner.trace as t
import tuner.trace.columns
tuner.trace.columns._COLS_BLOCK_BYTES = 2000
w = t.TraceWriter(sys.argv[1], t.make_header(probes={}, interval_s=0.01))
i = 0
while True:
    w.tick(i * 0.01, {"a_bytes": float(i), "b_items": i, "c_ratio": 0.25}, {5: {"rss_bytes": i}})
    w.flush()
    i += 1
    if i == 300:
        print("ready", flush=True)
"""


def test_writer_killed_mid_block(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(path), root], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    d, taken = read_both(path)
    assert isinstance(d, TraceData) and taken and len(d.times) >= 300
    assert d.column("b_items").tolist() == [float(i) for i in range(len(d.times))]


def test_old_trace_without_companion_reads_as_before() -> None:
    fixture = Path(__file__).resolve().parents[1] / "tests" / "data" / "synthetic-demo.jsonl"
    assert not columns_path(fixture).exists()
    d = read_trace(fixture)
    assert len(d.times) > 0 and isinstance(d._procs, list)  # parsed as before, nothing deferred


def test_procs_are_parsed_when_first_asked(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_ticks(path, 20)
    d = read_trace(path)
    assert callable(d._procs)  # not parsed yet
    assert d.procs[3] == (pytest.approx(0.3), {"9": {"rss_bytes": 3}}) and isinstance(d._procs, list)


def _same_round(x: float) -> bool:
    a, b = trace_format._round6(x), round(x, 6)
    return type(a) is type(b) and (a == b or (a != a and b != b)) and math.copysign(1, a) == math.copysign(1, b)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(
    st.floats(),
    st.integers(-(10**12), 10**12).map(lambda k: k / 1e6),
    st.integers(-(10**13), 10**13).map(lambda k: (k + 0.5) / 1e6),
    st.tuples(st.integers(0, 10**7), st.sampled_from([5e-7, -5e-7, 4.9999999e-7, 1e-12, -1e-12])).map(sum),
))  # fmt: skip
def test_round6_is_round(x: float) -> None:
    assert _same_round(x)


def test_round6_on_tick_times() -> None:
    assert all(_same_round(i * 0.1) and _same_round(i / 3) and _same_round(i * 1e-7) for i in range(-20000, 100000))
    assert all(_same_round(x) for x in (0.0, -0.0, 1e-9, -1e-9, 5e-7, 1.5e-6, 2.5e-6, 1e300, -1e300, 1e12, 1e6))
    assert trace_format._round6(3) == 3 and type(trace_format._round6(True)) is int


@settings(max_examples=60, deadline=None)
@given(ticks=st.lists(st.tuples(st.one_of(st.floats(), st.integers(-(2**60), 2**60)), tick_values(True),
                                st.sampled_from([None, {}, {7: {"name": "p", "rss_bytes": 5}}])), max_size=20),
       listener=st.booleans())  # fmt: skip
def test_tick_lines_are_what_they_were(
    tmp_path_factory: pytest.TempPathFactory, ticks: list[Any], listener: bool
) -> None:
    """The trace format does not change: each tick line is the record the writer wrote before the
    companion existed (``round(t, 6)``, the caller's dicts, NaN/inf as null), byte for byte."""
    path = tmp_path_factory.mktemp("same") / "t.jsonl"
    w = TraceWriter(path, header())
    if listener:
        w.add_listener(lambda rec: None)
    for t, m, p in ticks:
        w.tick(t, m, p)
    w.close()
    expected = []
    for t, m, p in ticks:
        if listener:
            m = {k: trace_format._clean(v) for k, v in m.items()}
            rec: dict[str, Any] = {"k": "tick", "t": round(t, 6), "m": m}
            if p:
                rec["p"] = {str(pid): dict(v) for pid, v in p.items()}
        else:
            rec = {"k": "tick", "t": round(t, 6), "m": m, "p": p} if p else {"k": "tick", "t": round(t, 6), "m": m}
        expected.append(trace_format.encode_record(rec))
    assert path.read_bytes().split(b"\n")[1:-1] == expected


def test_a_values_dict_refilled_every_tick_reads_back_as_written(tmp_path: Path) -> None:
    """A caller that reuses one dict: the companion keeps what each tick said, not the dict's last state."""
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, make_header(probes={}, interval_s=0.1)) as w:
        m: dict[str, float] = {}
        for i in range(50):
            m["a_bytes"] = float(i)
            w.tick(i * 0.1, m)
    assert columns_path(path).exists()
    assert read_trace(path).column("a_bytes").tolist() == [float(i) for i in range(50)]
