"""`tuner run`, `tuner attach` and `tuner probes` driven as a user would: real commands, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_error, cannot_run_as_nobody, tuner, tuner_popen
from tuner.trace import read_trace

MB = 1024 * 1024

ALLOC_300 = """
import time
time.sleep(0.8)
buf = bytearray(300 * 1024 * 1024)
for i in range(0, len(buf), 4096):
    buf[i] = 1
time.sleep(2.0)
del buf
time.sleep(1.2)
"""


@pytest.mark.parametrize("interval", ["0.1", "0.01"])  # 100 Hz runs in batches (tuner.core.sampler)
def test_run_sees_a_300mb_allocation_rise_and_fall(tmp_path: Path, interval: str) -> None:
    trace = tmp_path / "t.jsonl"
    cp = tuner("run", "--interval", interval, "--trace", str(trace), "--", sys.executable, "-c", ALLOC_300)
    assert cp.returncode == 0, cp.stderr
    assert str(trace) in cp.stderr
    d = read_trace(trace)
    rss = d.column("tree_rss_bytes")
    ok = ~np.isnan(rss)
    assert ok.sum() > 20 / float(interval) * 0.1
    # every tick has its own RSS at its own time: ticks one interval apart, in order
    assert np.all(np.diff(d.times) > 0)
    assert abs(float(np.median(np.diff(d.times))) - float(interval)) < float(interval) * 0.2
    t, rss = d.times[ok], rss[ok]
    base = np.median(rss[t < 0.6])
    peak = rss.max()
    after = np.median(rss[t > t[-1] - 0.6])
    assert peak - base >= 300 * MB * 0.98
    assert after - base < 50 * MB
    assert d.end is not None and d.end["exit_code"] == 0


FORKING = """
import os, time
kids = []
for n in range(2):
    pid = os.fork()
    if pid == 0:
        buf = bytearray(120 * 1024 * 1024)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        time.sleep(2.5)
        os._exit(0)
    kids.append(pid)
print(" ".join(map(str, kids)), flush=True)
for k in kids:
    os.waitpid(k, 0)
"""


def test_run_sums_the_whole_process_tree(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    cp = tuner("run", "--trace", str(trace), "--", sys.executable, "-c", FORKING)
    assert cp.returncode == 0, cp.stderr
    kids = [int(x) for x in cp.stdout.split()]
    d = read_trace(trace)
    seen: set[int] = set()
    for _, procs in d.procs:
        seen.update(int(p) for p in procs)
    assert set(kids) <= seen
    assert np.nanmax(d.column("tree_rss_bytes")) >= 240 * MB
    assert np.nanmax(d.column("tree_procs")) >= 3
    exits = {e.data.get("pid") for e in d.events if e.kind == "proc_exit"}
    assert set(kids) <= exits


def test_run_exits_with_the_commands_code(tmp_path: Path) -> None:
    cp = tuner("run", "--trace", str(tmp_path / "t.jsonl"), "--", sys.executable, "-c", "import sys; sys.exit(7)")
    assert cp.returncode == 7
    d = read_trace(tmp_path / "t.jsonl")
    assert d.end is not None and d.end["exit_code"] == 7


def test_run_default_trace_path_is_under_traces(tmp_path: Path) -> None:
    cp = tuner("run", "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    files = list((tmp_path / "traces").glob("*.jsonl"))
    assert len(files) == 1 and str(files[0].name) in cp.stderr


@pytest.mark.parametrize("interval", ["0.1", "0.01"])
def test_sidecar_sigkill_leaves_a_readable_trace_up_to_the_kill(tmp_path: Path, interval: str) -> None:
    trace = tmp_path / "t.jsonl"
    p = tuner_popen(
        "run", "--interval", interval, "--trace", str(trace), "--", sys.executable, "-c", "import time; time.sleep(30)"
    )
    time.sleep(3.0)
    killed_at = time.monotonic()
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    d = read_trace(trace)
    started = float(d.header["started_mono"])
    last_tick_mono = started + float(d.times[-1])
    assert killed_at - last_tick_mono <= 1.0
    assert len(d.times) >= 2 / float(interval)  # 10 or 100 Hz for ~3 s, start-up aside
    assert d.end is None
    # the orphaned child is still sleeping; end it
    subprocess.run(["pkill", "-f", "time.sleep\\(30\\)"], check=False)


def test_sigterm_stops_the_child_gracefully(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    p = tuner_popen("run", "--trace", str(trace), "--", sys.executable, "-c", "import time; time.sleep(60)")
    time.sleep(1.5)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(15)
    assert rc == 128 + signal.SIGTERM
    d = read_trace(trace)
    assert d.end is not None and d.end["stopped_by_signal"] is True


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["run"], "no command given", 2),
        (["run", "--", "definitely-not-a-command-xyz"], "command not found", 127),
        (["run", "--interval", "5", "--", "true"], "out of range", 2),
        (["run", "--interval", "abc", "--", "true"], "invalid float", 2),
        (["attach", "999999999"], "no process with PID 999999999", 2),
        (["attach", "12ab"], "not a PID", 2),
        (["attach", "-5"], "not a valid PID", 2),
        (["run", "--prometheus", "0.0.0.0:9464", "--", "true"], "--prometheus-public", 2),
        (["frobnicate"], "invalid choice", 2),
    ],
)
def test_bad_input_gives_one_line_errors(args: list[str], message: str, code: int, tmp_path: Path) -> None:
    cp = tuner(*args, cwd=tmp_path)
    err = assert_one_line_error(cp, code)
    assert message in err


def test_run_into_unwritable_trace_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cp = tuner("run", "--trace", str(blocker / "t.jsonl"), "--", "true")
    assert "cannot write trace" in assert_one_line_error(cp)


def test_attach_records_a_running_process_until_it_exits(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2.5)"])
    try:
        trace = tmp_path / "a.jsonl"
        cp = tuner("attach", str(child.pid), "--trace", str(trace), timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert "exited" in cp.stderr
        d = read_trace(trace)
        assert d.header["pid"] == child.pid
        assert np.nanmax(d.column("tree_rss_bytes")) > 1 * MB
    finally:
        child.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_attach_to_a_process_it_may_not_read(tmp_path: Path) -> None:
    """As 'nobody', another user's process cannot be watched: one line, exit 2."""
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed")
    if why := cannot_run_as_nobody():
        pytest.skip(why)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
    try:
        env_root = str(Path(__file__).resolve().parents[1])
        cp = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "tuner",
                "attach",
                str(child.pid),
                "--trace",
                "/tmp/nobody-should-not-write.jsonl",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": env_root, "PATH": os.environ["PATH"]},
            cwd="/tmp",
        )
        err = assert_one_line_error(cp)
        assert "access denied" in err or "permission" in err
    finally:
        child.kill()
        child.wait()


def test_probes_lists_every_probe_and_why(tmp_path: Path) -> None:
    cp = tuner("probes")
    assert cp.returncode == 0, cp.stderr
    assert "cpu" in cp.stdout and "ok" in cp.stdout
    assert "nvidia" in cp.stdout and "unavailable:" in cp.stdout
    cpj = tuner("probes", "--json")
    data = json.loads(cpj.stdout)
    by = {p["name"]: p for p in data["probes"]}
    assert by["cpu"]["available"] and by["cpu"]["values"]["sys_mem_total_bytes"] > 0
    assert not by["nvidia"]["available"] and by["nvidia"]["reason"]
    for name in ("npu", "intel_npu"):
        assert not by[name]["available"] and by[name]["reason"]
