"""Issue 7 faults: SIGKILL of the sidecar, of the inference, of the live view, at hypothesis-chosen moments.

Everything here is the real thing: ``tuner run -- python -c <client loop>`` in a subprocess, the
inference using ``tuner.client`` over the real socket, ``tuner report`` reading what was left on disk.

- the sidecar killed: the inference never blocks nor raises, finishes every request; the trace on disk
  is readable by ``tuner report`` up to its last complete tick;
- the inference killed: the sidecar records it (``proc_exit``, the client's disconnect) and exits with
  the code a shell reports (128 + 9), the trace ends with that code;
- the live view (``tuner tui --connect``, or ``tuner tui TRACE`` following the file) killed: the session
  records on, serves the next viewer, and its trace is complete.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli import tuner, tuner_env, tuner_popen

# The inference: N requests with tokens through tuner.client, pid written first, result written last.
# ``worst`` is the longest any single request (with its poll) took: the client must never wait on the sidecar.
INFERENCE = r"""
import json, os, sys, time
out, n, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with open(out + ".pid", "w") as f:
    f.write(str(os.getpid()))
from tuner import client
c = client.connect()
worst = 0.0
done = 0
for i in range(n):
    s = time.monotonic()
    with c.request(prompt_tokens=4, batch_size=1) as r:
        r.started()
        for k in range(16):
            r.token(k % 7)
    c.poll()
    worst = max(worst, time.monotonic() - s)
    done += 1
    time.sleep(pause)
with open(out + ".tmp", "w") as f:
    json.dump({"done": done, "worst": worst, "dropped": c.dropped, "connected": c.connected}, f)
os.replace(out + ".tmp", out)
"""


def wait_file(path: Path, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def complete_records(path: Path) -> list[dict[str, Any]]:
    """Every whole JSON line of a trace (a killed writer may leave half a line at the end)."""
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def report_json(trace: Path) -> dict[str, Any]:
    cp = tuner("report", str(trace), "--json", timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    summary: dict[str, Any] = json.loads(cp.stdout)
    return summary


def unique_dir(tmp_path: Path) -> Path:
    d = tmp_path / f"r{time.monotonic_ns()}"
    d.mkdir()
    return d


# -- the sidecar dies ------------------------------------------------------------------------------------
def sidecar_killed(tmp_path: Path, kill_after: float, n: int = 200, pause: float = 0.01) -> None:
    d = unique_dir(tmp_path)
    out, trace = d / "result.json", d / "t.jsonl"
    side = tuner_popen(
        "run", "--headless", "--interval", "0.02", "--trace", str(trace), "--",
        sys.executable, "-c", INFERENCE, str(out), str(n), str(pause),
    )  # fmt: skip
    try:
        pid = int(wait_file(Path(str(out) + ".pid")))
        time.sleep(kill_after)
        side.kill()  # SIGKILL: no handler, no flush, no goodbye on the socket
        side.wait(timeout=10)
        res = json.loads(wait_file(out, timeout=60))
    finally:
        if side.poll() is None:
            side.kill()
        side.communicate()
    end = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    assert not pid_alive(pid)
    assert res["done"] == n  # every request ran: nothing in the client raised into the inference
    assert res["worst"] < 1.0, res  # and nothing waited on the vanished sidecar (generous: a loaded 2-core box)
    if not trace.exists():
        return  # killed before the trace was created: nothing recorded, nothing to lose
    recs = complete_records(trace)
    if not recs:
        return
    ticks = [r for r in recs if r.get("k") == "tick"]
    summary = report_json(trace)  # a trace cut mid-write is still a report, never a traceback
    assert summary["ticks"] == len(ticks)
    if summary["ended"]:  # the kill came after the inference had finished and the end was written
        assert summary["exit_code"] == 0
    else:
        assert summary["exit_code"] is None
    if ticks:
        assert summary["duration_s"] == pytest.approx(ticks[-1]["t"], abs=1e-3)  # up to the last tick
    served = [r for r in recs if r.get("k") == "event" and r.get("kind") == "request"]
    if summary["requests"] is not None:
        assert summary["requests"]["count"] == len(served)


def test_sidecar_sigkilled_mid_run_inference_finishes_and_trace_reads(tmp_path: Path) -> None:
    sidecar_killed(tmp_path, 1.0)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_after=st.floats(0.0, 2.0))
def test_sidecar_sigkilled_at_any_moment(tmp_path: Path, kill_after: float) -> None:
    sidecar_killed(tmp_path, kill_after)


# -- the inference dies ----------------------------------------------------------------------------------
def inference_killed(tmp_path: Path, kill_after: float) -> None:
    d = unique_dir(tmp_path)
    out, trace = d / "result.json", d / "t.jsonl"
    side = tuner_popen(
        "run", "--headless", "--interval", "0.02", "--trace", str(trace), "--",
        sys.executable, "-c", INFERENCE, str(out), "100000", "0.005",
    )  # fmt: skip
    try:
        pid = int(wait_file(Path(str(out) + ".pid")))
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
        _, err = side.communicate(timeout=60)
    finally:
        if side.poll() is None:
            side.kill()
            side.communicate()
    assert side.returncode == 128 + signal.SIGKILL, err
    assert "Traceback" not in err
    assert "exited with code 137" in err
    recs = complete_records(trace)
    assert recs[-1]["k"] == "end" and recs[-1]["exit_code"] == 137  # the death is the trace's last word
    exits = [r for r in recs if r.get("kind") == "proc_exit" and r["data"]["pid"] == pid]
    assert len(exits) == 1
    ticks = [r for r in recs if r.get("k") == "tick"]
    assert ticks and ticks[-1]["m"]["tree_procs"] == 0  # sampled on after the death, nothing counted
    assert ticks[-1]["m"]["tree_rss_bytes"] is None  # no live process: no value, not 0
    summary = report_json(trace)
    assert summary["ended"] is True and summary["exit_code"] == 137
    assert summary["ticks"] == len(ticks)
    connects = [r for r in recs if r.get("kind") == "client_connect"]
    if connects:  # the client got as far as connecting: its going away is recorded too
        assert [r["data"]["pid"] for r in recs if r.get("kind") == "client_disconnect"] == [pid]


def test_inference_sigkilled_sidecar_records_it_and_exits_137(tmp_path: Path) -> None:
    inference_killed(tmp_path, 0.8)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_after=st.floats(0.0, 1.5))
def test_inference_sigkilled_at_any_moment(tmp_path: Path, kill_after: float) -> None:
    inference_killed(tmp_path, kill_after)


# -- the live view dies ----------------------------------------------------------------------------------
def read_frame(s: socket.socket, timeout: float = 10.0) -> dict[str, Any]:
    s.settimeout(timeout)
    buf = b""
    while len(buf) < 4:
        chunk = s.recv(4 - len(buf))
        assert chunk, "observer closed the connection"
        buf += chunk
    (size,) = struct.unpack(">I", buf)
    body = b""
    while len(body) < size:
        chunk = s.recv(size - len(body))
        assert chunk
        body += chunk
    rec: dict[str, Any] = json.loads(body)
    return rec


def tui_killed(tmp_path: Path, kill_after: float, mode: str) -> None:
    d = unique_dir(tmp_path)
    out, trace = d / "result.json", d / "t.jsonl"
    side = tuner_popen(
        "run", "--headless", "--interval", "0.05", "--trace", str(trace), "--",
        sys.executable, "-c", INFERENCE, str(out), "250", "0.01",
    )  # fmt: skip
    master, slave = pty.openpty()
    viewer: subprocess.Popen[bytes] | None = None
    try:
        wait_file(Path(str(out) + ".pid"))
        header = json.loads(wait_file(trace).split("\n", 1)[0])
        sock_path = header["observer_socket"]
        target = ["--connect", sock_path] if mode == "connect" else [str(trace)]
        env = tuner_env(TERM="xterm-256color", COLUMNS="120", LINES="40")
        viewer = subprocess.Popen(
            [sys.executable, "-m", "tuner", "tui", *target], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        end = time.monotonic() + kill_after
        while time.monotonic() < end:  # keep the pty drained so the app never blocks on its terminal
            try:
                os.set_blocking(master, False)
                os.read(master, 65536)
            except (BlockingIOError, OSError):
                pass
            time.sleep(0.02)
        assert viewer.poll() is None, "the live view died on its own"
        viewer.kill()
        viewer.wait(timeout=10)
        # The session goes on: a new viewer is served the header and live records.
        if side.poll() is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock_path)
                first = read_frame(s)
                assert first.get("k") == "header"
                assert read_frame(s).get("k") in {"tick", "event", "note", "skip", "action"}
            except (ConnectionRefusedError, FileNotFoundError):
                assert side.poll() is not None  # only if the run just ended
            finally:
                s.close()
        _, err = side.communicate(timeout=90)
    finally:
        os.close(master)
        os.close(slave)
        if viewer is not None and viewer.poll() is None:
            viewer.kill()
        if side.poll() is None:
            side.kill()
            side.communicate()
    assert side.returncode == 0, err
    res = json.loads(out.read_text())
    assert res["done"] == 250
    recs = complete_records(trace)
    assert recs[-1]["k"] == "end" and recs[-1]["exit_code"] == 0
    served = [r for r in recs if r.get("kind") == "request"]
    assert len(served) + res["dropped"] == 250  # every request is in the trace or counted as dropped
    assert report_json(trace)["requests"]["count"] == len(served)


@pytest.mark.parametrize("mode", ["connect", "follow"])
def test_live_view_sigkilled_session_records_on(tmp_path: Path, mode: str) -> None:
    tui_killed(tmp_path, 1.5, mode)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_after=st.floats(0.0, 2.5), mode=st.sampled_from(["connect", "follow"]))
def test_live_view_sigkilled_at_any_moment(tmp_path: Path, kill_after: float, mode: str) -> None:
    tui_killed(tmp_path, kill_after, mode)
