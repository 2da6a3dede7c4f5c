"""Bad trace files through the CLI (``tuner report``, ``export``, ``replay``, ``tui``): empty, truncated,
corrupted at random bytes (fuzzed), wrong schema version, a 50 MB line, not a trace at all, a directory.
Unusable input is a one-line ``tuner: ...`` error with exit 2; a damaged but usable trace is read with a
warning saying what was skipped.  Never a traceback."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli import assert_one_line_error, tuner
from tuner.cli import main
from tuner.records import Event
from tuner.trace import TraceWriter, make_header


def write_trace(path: Path, ticks: int = 60) -> bytes:
    hdr = make_header(
        probes={"cpu": {"available": True, "reason": None, "metrics": {"tree_rss_bytes": "bytes"}}},
        interval_s=0.1,
        extra={"policy": "interactive", "started_mono": 0.0},
    )
    with TraceWriter(path, hdr) as w:
        for i in range(ticks):
            w.tick(i * 0.1, {"tree_rss_bytes": 1e8 + i * 1e5, "tree_cpu_ratio": 0.5, "sys_cpu_ratio": 0.25},
                   {100: {"name": "python", "rss_bytes": 1e8}})  # fmt: skip
            if i % 10 == 5:
                w.event(Event(i * 0.1, "request", {"ttft_s": 0.2, "total_s": 1.0, "tokens": 20, "ok": True}))
        w.end(ticks * 0.1, exit_code=0)
    return path.read_bytes()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_trace(tmp_path_factory.mktemp("good") / "t.jsonl")


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def with_line(data: bytes, at: int, line: bytes) -> bytes:
    ls = lines_of(data)
    ls[at] = line
    return b"\n".join(ls)


HUGE = 50 * 1024 * 1024

# name -> (make the file from a good trace's bytes, or None for a directory)
UNUSABLE: dict[str, tuple[Callable[[bytes], bytes] | None, str]] = {
    "empty": (lambda g: b"", "empty file"),
    "blank lines": (lambda g: b"\n\n  \n", "empty file"),
    "cut inside the header": (lambda g: g[:200], "ends inside its header line"),
    "wrong schema version": (lambda g: g.replace(b'"schema":1,', b'"schema":2,', 1), "schema version 2 is not"),
    "ELF binary": (lambda g: b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40, "not an inference-tuner trace"),
    "other JSON": (lambda g: b'{"hello": "world"}\n{"k": 1}\n', "not an inference-tuner trace"),
    "CSV text": (lambda g: b"t,rss\n0,1\n", "not an inference-tuner trace"),
    "one 50 MB line": (lambda g: b"{" + b"x" * HUGE + b"\n", "not an inference-tuner trace"),
    "a directory": (None, "is a directory"),
}

COMMANDS: dict[str, list[str]] = {
    "report": ["report"],
    "report --json": ["report", "--json"],
    "export": ["export", "--to", "csv", "{out}"],
    "replay": ["replay", "--policy", "interactive"],
    "tui": ["tui"],
}


def argv(cmd: str, trace: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = [a.replace("{out}", str(tmp_path / "out.csv")) for a in COMMANDS[cmd]]
    return [args[0], str(trace), *args[1:], *extra]


def make(tmp_path: Path, good: bytes, maker: Callable[[bytes], bytes] | None) -> Path:
    if maker is None:
        d = tmp_path / "dir.jsonl"
        d.mkdir()
        return d
    p = tmp_path / "bad.jsonl"
    p.write_bytes(maker(good))
    return p


# every case through report and export; replay, tui and report --json share the reader, so a few suffice
MATRIX = [(case, cmd) for case in UNUSABLE for cmd in ("report", "export")] + [
    (case, cmd)
    for case in ("empty", "cut inside the header", "wrong schema version", "ELF binary", "a directory")
    for cmd in ("replay", "tui", "report --json")
]


@pytest.mark.parametrize(("case", "cmd"), MATRIX)
def test_unusable_trace_is_a_one_line_error(tmp_path: Path, good: bytes, case: str, cmd: str) -> None:
    maker, message = UNUSABLE[case]
    if cmd == "tui" and case in ("one 50 MB line", "cut inside the header"):
        message = "no complete first line"  # the follower cannot tell more
    p = make(tmp_path, good, maker)
    err = assert_one_line_error(tuner(*argv(cmd, p, tmp_path)), 2)
    assert err.startswith("tuner: ") and message in err, err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("cmd", ["report", "tui"])
def test_a_device_is_a_one_line_error(tmp_path: Path, cmd: str) -> None:
    """/dev/zero has no end: it must be refused, not read until memory runs out."""
    cp = tuner(*argv(cmd, Path("/dev/zero"), tmp_path), timeout=60)
    assert cp.returncode == 2, cp.stderr
    assert "Traceback" not in cp.stderr and len(cp.stderr.strip().splitlines()) == 1, cp.stderr


@pytest.mark.parametrize("cmd", ["report", "export", "replay", "tui"])
def test_missing_file_is_a_one_line_error(tmp_path: Path, cmd: str) -> None:
    err = assert_one_line_error(tuner(*argv(cmd, tmp_path / "nope.jsonl", tmp_path)), 2)
    assert "no such file" in err, err


# -- damaged but usable: read with a warning; a bad middle line needs --skip-bad ----------------------------

READ_CMDS = ["report", "export", "replay"]


@pytest.mark.parametrize("cmd", READ_CMDS)
def test_truncated_last_line_is_skipped_with_a_warning(tmp_path: Path, good: bytes, cmd: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(good[: good.rindex(b"\n", 0, len(good) - 1) + 30])  # half of the last (end) record
    cp = tuner(*argv(cmd, p, tmp_path))
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    assert "incomplete (torn write); ignored" in cp.stderr


@pytest.mark.parametrize("cmd", READ_CMDS)
@pytest.mark.parametrize(
    ("case", "line", "message"),
    [
        pytest.param("corrupt JSON", b'{"k":"tick","t":1.0,"m":{"tree_rss_b\x00\xff', "line 8 is not valid JSON",
                     id="corrupt"),
        pytest.param("not a record", b"[1, 2, 3]", "line 8 is not a trace record", id="not-a-record"),
        pytest.param("a 50 MB line", b'{"k":"note","msg":"' + b"y" * HUGE + b'"}', "line 8 is longer than 16 MiB",
                     id="50MB-line"),
        pytest.param("malformed tick", b'{"k":"tick","t":"soon","m":{}}', "a 'tick' record is malformed",
                     id="malformed-tick"),
    ],
)  # fmt: skip
def test_bad_middle_line_errors_and_skip_bad_reads_past_it(
    tmp_path: Path, good: bytes, cmd: str, case: str, line: bytes, message: str
) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(with_line(good, 7, line))
    err = assert_one_line_error(tuner(*argv(cmd, p, tmp_path)), 2)
    assert message in err and "--skip-bad" in err, err
    cp = tuner(*argv(cmd, p, tmp_path, "--skip-bad"))
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    warnings = [ln for ln in cp.stderr.splitlines() if ln.startswith("tuner: warning:")]
    assert len(warnings) == 1 and "skipped" in warnings[0], cp.stderr


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_overwritten_report_is_an_answer_or_one_line(tmp_path: Path, good: bytes, seed: int) -> None:
    rnd = random.Random(seed)
    data = bytearray(good)
    for _ in range(5):
        at = rnd.randrange(len(data))
        data[at : at + 8] = rnd.randbytes(8)
    p = tmp_path / "t.jsonl"
    p.write_bytes(bytes(data))
    for extra in ([], ["--skip-bad"]):
        cp = tuner("report", str(p), *extra)
        assert "Traceback" not in cp.stderr, cp.stderr
        if cp.returncode != 0:
            assert_one_line_error(cp, 2)
        else:
            assert all(ln.startswith("tuner: ") for ln in cp.stderr.splitlines()), cp.stderr


# -- fuzzed: random corruption, in-process through the same CLI entry point (fast enough to fuzz) -------


def run_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)  # anything but UserError/TraceError would escape here as a traceback
    return code, err.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=16)), max_size=4),
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["report", "report --json", "export", "replay"]),
    st.booleans(),
)
def test_fuzzed_corruption_never_escapes_as_a_traceback(
    tmp_path: Path, good: bytes, patches: list[tuple[int, bytes]], cut: int, cmd: str, skip_bad: bool
) -> None:
    data = bytearray(good)
    for at, junk in patches:
        at %= len(data)
        data[at : at + len(junk)] = junk
    data = data[: len(data) - cut % 400]
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(bytes(data))
    out = tmp_path / "out.csv"
    out.unlink(missing_ok=True)
    code, err = run_cli(argv(cmd, p, tmp_path, *(["--skip-bad"] if skip_bad else [])))
    lines = err.splitlines()
    assert code in (0, 2), err
    assert all(ln.startswith("tuner: ") for ln in lines), err
    if code == 2:
        assert len(lines) - sum(ln.startswith("tuner: warning:") for ln in lines) == 1, err
        assert "\n" not in err.rstrip("\n").split("\n")[-1]
    elif cmd == "export":
        assert out.exists()
