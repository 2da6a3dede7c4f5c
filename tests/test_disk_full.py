"""A trace that cannot be written mid-run — disk full, or its directory gone and not creatable — while
``tuner run`` goes on: sampling and Prometheus continue, the failure is reported once, recording resumes
when it can, and what was written stays readable.  Driven as a user meets it: ``tuner run`` in a
subprocess; a full disk is a real tiny tmpfs when this machine lets us mount one, else RLIMIT_FSIZE
(writes then fail with EFBIG exactly like ENOSPC, at a byte boundary of our choosing)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cli import tuner_popen
from tuner.trace import TraceData, columns_path, read_trace

WAIT_FOR_FLAG = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)\n"
INTERVAL = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ticks_served(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith("tuner_ticks_total "):
            return float(line.split()[1])
    raise AssertionError("no tuner_ticks_total in /metrics")


class Run:
    """``tuner run --prometheus`` on a child that waits for a flag file; stderr collected as it comes."""

    def __init__(self, tmp_path: Path, trace: Path, preexec_fn: Callable[[], None] | None = None) -> None:
        self.flag = tmp_path / "stop.flag"
        self.port = free_port()
        self.proc = tuner_popen(
            "run", "--headless", "--interval", str(INTERVAL), "--trace", str(trace),
            "--prometheus", f"127.0.0.1:{self.port}", "--", sys.executable, "-c", WAIT_FOR_FLAG, str(self.flag),
            preexec_fn=preexec_fn,
        )  # fmt: skip
        self.err: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.err.append(line)

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in self.err):
                return
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never printed; stderr so far:\n{''.join(self.err)}")

    def wait_for_prometheus(self) -> None:
        end = time.monotonic() + 15
        while True:
            try:
                ticks_served(self.port)
                return
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def stop(self) -> int:
        self.flag.touch()
        rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def read_as_without_companion(trace: Path) -> TraceData:
    """``read_trace``, checked to give the same with the trace's columnar companion as without it (its
    blocks around the outage must not claim lines the trace lost or got twice)."""
    d = read_trace(trace)
    cols = columns_path(trace)
    if cols.exists():
        cols.rename(cols.with_name("aside"))
        try:
            bare = read_trace(trace)
        finally:
            cols.with_name("aside").rename(cols)
        assert d.times.tobytes() == bare.times.tobytes() and list(d.columns) == list(bare.columns)
        assert all(np.array_equal(d.columns[k], bare.columns[k], equal_nan=True) for k in d.columns)
        assert (d.notes, d.events, d.warnings, d.end, d.procs) == (bare.notes, bare.events, bare.warnings, bare.end,
                                                                   bare.procs)  # fmt: skip
    return d


def check_outage(run: Run, trace: Path, restore: Callable[[], None]) -> None:
    """The common part: failure seen once, Prometheus ticking through it, resumed, nothing lost."""
    run.wait_for("cannot write trace")
    on_disk = read_trace(trace)  # what was written before is readable now (a torn tail skipped)
    assert len(on_disk.times) >= 1
    before = ticks_served(run.port)
    time.sleep(8 * INTERVAL)
    assert ticks_served(run.port) > before  # sampling and /metrics go on without the trace
    restore()
    run.wait_for("trace writing resumed")
    time.sleep(4 * INTERVAL)
    assert run.stop() == 0
    err = "".join(run.err)
    assert "Traceback" not in err, err
    # reported once, however many ticks failed (the summary printed at the end lists the trace's note too)
    assert err.count("tuner: cannot write trace") == 1, err
    assert "nothing lost" in err, err
    d = read_as_without_companion(trace)
    assert not d.warnings, d.warnings
    assert len(d.times) > len(on_disk.times)
    gaps = np.diff(d.times)
    assert gaps.max() < 1.0, f"a hole in the recording: {gaps.max():.2f} s"  # the outage's ticks are there
    msgs = [n["msg"] for n in d.notes]
    assert any(m.startswith("trace writing failed") for m in msgs), msgs
    assert any(m == "trace writing resumed" for m in msgs), msgs
    assert d.end is not None and d.end["exit_code"] == 0


def limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return preexec


def test_file_size_limit_mid_run_then_lifted(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    run = Run(tmp_path, trace, preexec_fn=limit_file_size(12 * 1024))
    try:
        run.wait_for_prometheus()
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        check_outage(run, trace, lambda: resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (hard, hard)))
        assert trace.stat().st_size > 12 * 1024
    finally:
        run.kill()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({cp.stderr.strip() or 'not root'}); the RLIMIT_FSIZE test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_then_space_freed(tmp_path: Path, tiny_tmpfs: Path) -> None:
    trace = tiny_tmpfs / "traces" / "t.jsonl"
    filler = tiny_tmpfs / "filler"
    run = Run(tmp_path, trace)
    try:
        run.wait_for_prometheus()
        # fill the disk: whatever room is left after the trace's first records
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        check_outage(run, trace, filler.unlink)
    finally:
        run.kill()


def test_trace_directory_removed_and_blocked_mid_run(tmp_path: Path) -> None:
    """The directory is deleted and a file takes its name (so it cannot be made again), then cleared:
    the writer notices its file is gone, reports once, and records into a new file there."""
    tdir = tmp_path / "traces"
    trace = tdir / "t.jsonl"
    run = Run(tmp_path, trace)
    try:
        run.wait_for_prometheus()
        time.sleep(4 * INTERVAL)
        shutil.rmtree(tdir)
        tdir.write_text("in the way")
        run.wait_for("cannot write trace")
        before = ticks_served(run.port)
        time.sleep(8 * INTERVAL)
        assert ticks_served(run.port) > before
        tdir.unlink()
        run.wait_for("trace writing resumed")
        assert run.stop() == 0
        err = "".join(run.err)
        assert err.count("tuner: cannot write trace") == 1 and "was removed while recording" in err, err
        d = read_as_without_companion(trace)
        assert not d.warnings and len(d.times) > 5
        assert "removed while recording" in d.notes[0]["msg"]
        assert d.end is not None and d.end["exit_code"] == 0
        assert os.stat(tdir).st_mode & 0o777 == 0o700
    finally:
        run.kill()


def test_disk_still_full_at_the_end_says_what_the_trace_lacks(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    run = Run(tmp_path, trace, preexec_fn=limit_file_size(16 * 1024))
    try:
        run.wait_for("cannot write trace")
        assert run.stop() == 0  # the command's exit code, not a recording failure
        err = "".join(run.err)
        assert "Traceback" not in err and err.count("tuner: cannot write trace") == 1, err
        assert f"trace {trace} is incomplete" in err, err
        d = read_as_without_companion(trace)  # what made it to disk reads, the torn tail skipped with a warning
        assert len(d.times) >= 1 and d.end is None
    finally:
        run.kill()
