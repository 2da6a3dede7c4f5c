"""Naming an OOM kill, with real cgroups and the real kernel OOM killer: a child allocating past a small v1
memory limit under ``tuner run`` (the sidecar in the same cgroup, as in a pod), ``tuner attach`` from
outside it, a SIGKILL that is not the OOM killer's, a recording cut short, and the next start in the cgroup.
The cgroups are made under this test process's own memory cgroup and removed afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cgroups import MIB, V1Memory
from tuner.trace import iter_records
from tuner.tui.model import Model

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
TUNER = [sys.executable, "-m", "tuner"]
# allocates 16 MiB more every 20 ms (pages written) until something stops it
HOG = "import time\nchunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n    time.sleep(0.02)\n"
# waits for a line on stdin, then hogs
WAIT_THEN_HOG = "import sys\nsys.stdin.readline()\n" + HOG


@pytest.fixture
def v1() -> Iterator[V1Memory]:
    h = V1Memory.get()
    try:
        yield h
    finally:
        h.cleanup()


def kills(cg: Path) -> int:
    for line in (cg / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    raise AssertionError("no oom_kill line")


def run_in(v1: V1Memory, cg: Path, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = v1.popen(cg, args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNER, "report", *args], capture_output=True, text=True, env=ENV, timeout=120)


def test_an_oom_kill_is_named_in_the_terminal_the_trace_the_reports_and_the_live_view(
    v1: V1Memory, tmp_path: Path
) -> None:
    cg = v1.make(memory__limit_in_bytes=256 * MIB)
    trace = tmp_path / "oom.jsonl"
    cp = run_in(v1, cg, [*TUNER, "run", "--headless", "--trace", str(trace), "--", sys.executable, "-c", HOG])
    assert cp.returncode == 137, cp.stderr
    assert kills(cg) == 1
    lines = [ln for ln in cp.stderr.splitlines() if ln.startswith("tuner:") and "OOM killer" in ln]
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("tuner: python was killed by the kernel OOM killer: cgroup memory limit 256 MiB "
                               "reached (peak "), lines  # fmt: skip
    events = [r for r in iter_records(str(trace)) if r.get("k") == "event" and r.get("kind") == "oom_kill"]
    assert len(events) == 1
    d = events[0]["data"]
    assert d["signal"] == 9 and d["limit_bytes"] == 256 * MIB and d["oom_kills_after"] == d["oom_kills_before"] + 1
    assert 200 * MIB < d["peak_bytes"] <= 256 * MIB and d["cgroup"].endswith(cg.name)
    text = report(str(trace))
    assert text.returncode == 0, text.stderr
    assert "OOM kill  python was killed by the kernel OOM killer: cgroup memory limit 256 MiB reached" in text.stdout
    js = json.loads(report(str(trace), "--json").stdout)
    assert js["oom_kill"]["message"].startswith("python was killed by the kernel OOM killer")
    assert js["memory_limit"]["name"] == "cgroup" and js["memory_limit"]["closest"]["headroom"] < 0.25
    html = tmp_path / "r.html"
    assert report(str(trace), "--html", str(html)).returncode == 0
    assert "id='oom-kill'" in html.read_text() and "killed by the kernel OOM killer" in html.read_text()
    m = Model()
    m.apply_many(iter_records(str(trace)))
    assert (m.memory_line(m.last_t) or "").startswith("OOM KILLED: python was killed by the kernel OOM killer")


def test_a_sigkill_for_another_reason_is_not_an_oom_kill(v1: V1Memory, tmp_path: Path) -> None:
    cg = v1.make(memory__limit_in_bytes=256 * MIB)
    trace = tmp_path / "k.jsonl"
    cp = run_in(v1, cg, [*TUNER, "run", "--headless", "--trace", str(trace), "--", "sh", "-c", "sleep 0.5; kill -9 $$"])
    assert cp.returncode == 137, cp.stderr
    assert "OOM" not in cp.stderr
    assert not [r for r in iter_records(str(trace)) if r.get("kind") == "oom_kill"]
    assert json.loads(report(str(trace), "--json").stdout)["oom_kill"] is None


def test_the_next_start_in_the_cgroup_names_an_earlier_kill(v1: V1Memory, tmp_path: Path) -> None:
    cg = v1.make(memory__limit_in_bytes=128 * MIB)
    hog = v1.popen(cg, [sys.executable, "-c", HOG])
    assert hog.wait(timeout=120) == -signal.SIGKILL and kills(cg) == 1
    trace = tmp_path / "next.jsonl"
    cp = run_in(v1, cg, [*TUNER, "run", "--headless", "--trace", str(trace), "--", "true"])
    assert cp.returncode == 0, cp.stderr
    assert "has had 1 OOM kill(s) before this start" in cp.stderr and cg.name in cp.stderr
    notes = [r["msg"] for r in iter_records(str(trace)) if r.get("k") == "note"]
    assert any("OOM kill(s) before this start" in n for n in notes)


def test_a_recording_cut_short_by_the_oom_killer_is_named_by_the_next_report(v1: V1Memory, tmp_path: Path) -> None:
    """The sidecar shares the cgroup and dies too (here: SIGKILLed the way the OOM killer would): the trace has
    no end record; the OOM-kill counter rose after its last tick, and ``tuner report`` says so."""
    cg = v1.make(memory__limit_in_bytes=160 * MIB)
    trace = tmp_path / "cut.jsonl"
    sidecar = v1.popen(cg, [*TUNER, "run", "--headless", "--quiet", "--trace", str(trace), "--", "sleep", "60"],
                       env=ENV)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if trace.exists() and any(
                "cgroup_oom_kills_total" in (r.get("m") or {}) for r in iter_records(str(trace)) if r.get("k") == "tick"
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no tick with the cgroup's OOM counter")
        sidecar.kill()
        sidecar.wait()
        hog = v1.popen(cg, [sys.executable, "-c", HOG])
        assert hog.wait(timeout=120) == -signal.SIGKILL
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(sidecar.pid)], check=False)  # the orphaned sleep, by parent
        for pid in (cg / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    text = report(str(trace))
    assert text.returncode == 0, text.stderr
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("OOM kill"))
    assert "OOM-kill counter of cgroup" in line and "rose from 0 to 1 after the last recorded tick" in line, line


def test_attach_names_the_oom_kill_of_the_process_it_watches(v1: V1Memory, tmp_path: Path) -> None:
    cg = v1.make(memory__limit_in_bytes=200 * MIB)
    victim = v1.popen(cg, [sys.executable, "-c", WAIT_THEN_HOG], stdin=subprocess.PIPE)
    trace = tmp_path / "attach.jsonl"
    tuner = subprocess.Popen([*TUNER, "attach", "--headless", "--trace", str(trace), str(victim.pid)], env=ENV,
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (trace.exists() and any(r.get("k") == "tick" for r in iter_records(str(trace)))):
            assert time.monotonic() < deadline, "attach did not start recording"
            time.sleep(0.2)
        assert victim.stdin is not None
        victim.stdin.write(b"go\n")
        victim.stdin.flush()
        _, err = tuner.communicate(timeout=120)  # the victim stays a zombie (unreaped) meanwhile: its signal shows
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL and kills(cg) == 1
    assert "tuner: python was killed by the kernel OOM killer: cgroup memory limit 200 MiB reached" in err, err
    ev = [r for r in iter_records(str(trace)) if r.get("kind") == "oom_kill"]
    assert len(ev) == 1 and ev[0]["data"]["signal"] == 9


def test_the_unreclaimable_demo_leak_survives_a_cleanup() -> None:
    """``tuner demo --leak unreclaimable`` (the containers effect run's second variant): the same per-request
    cache, not registered for cleanup — a cleanup command from a real channel gives it nothing back."""
    pytest.importorskip("torch", reason="needs torch (the torch extra): the demo workload runs the built-in model")
    from tuner.link.channel import ChannelServer

    server = ChannelServer()
    server.start()
    msgs: list[dict] = []
    try:
        p = subprocess.Popen([sys.executable, "-m", "tuner.demo.workload", "--requests", "40", "--rate", "30",
                              "--leak", "unreclaimable", "--max-new-tokens", "32"],
                             env={**ENV, "TUNER_SOCKET": server.path}, stdout=subprocess.PIPE, text=True)  # fmt: skip
        sent = None
        deadline = time.monotonic() + 170
        while p.poll() is None and time.monotonic() < deadline:
            msgs += [m for _, m in server.drain()]
            if sent is None and sum(m.get("type") == "request" for m in msgs) >= 25:
                sent = server.send_command("cleanup", {"steps": ["caches", "gc", "malloc_trim"]})
            time.sleep(0.05)
        out, _ = p.communicate(timeout=30)
        time.sleep(0.3)
        msgs += [m for _, m in server.drain()]
    finally:
        server.close()
    own = json.loads(out.strip().splitlines()[-1])
    clean = next(m for m in msgs if m.get("type") == "command_result" and m.get("cmd") == "cleanup")
    assert clean["ok"] and clean["id"] == sent
    assert clean["result"]["steps"][0].get("entries", 0) == 0  # no cache registered: nothing to clear
    assert own["leak_kind"] == "unreclaimable" and own["leak_entries"] == 40  # all kept
