"""Issue 7 faults at the probes: NVML errors mid-run, processes exiting between listing and reading, PID
reuse, the wall clock jumping.

- NVML (``tests/fakes/fake_pynvml.py``, the vendor boundary only): a real sampler thread with the real CPU
  probe on a real process and the NVIDIA probe over two fake GPUs; mid-run GPU 1 is lost, ``NotSupported``
  appears on GPU 0's utilization (which worked until then), a transient ``Timeout`` hits its power once.
  The trace says so (``device_lost`` event, warn notes ``tuner report`` lists), the affected values turn
  ``None``, everything else — GPU 0's memory, the CPU probe, the ticks — goes on.
- Processes that exit between listing and reading: the listing is real, the victims are killed and
  reaped right after it (both backends, both the full and the incremental scan).
- PID reuse, for real: as root, ``/proc/sys/kernel/ns_last_pid`` makes the kernel hand a new process the
  PID of one that just exited; it is not counted as the old one.
- The wall clock jumping (``time.time`` patched to leap an hour back and forth during a live run): tick
  spacing, skip counts and CPU ratios do not notice (intervals are monotonic only).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pynvml
import pytest

from tests.cli import tuner
from tests.fakes.fake_pynvml import a100_80gb, make_fake_pynvml, rtx_4090
from tests.test_probe_cpu import Child
from tuner.core.sampler import Sampler, Tick
from tuner.probes.cpu import CpuProbe
from tuner.probes.nvidia import NvidiaProbe
from tuner.records import Sample
from tuner.trace import TraceWriter, make_header

BACKENDS = ["procfs", "psutil"]


def record_session(trace: Path, probes: list[Any], interval: float, steps: list[tuple[float, Any]]) -> None:
    """A real sampler thread writing a trace (what ``tuner run`` does), with ``steps`` run at given times."""
    writer = TraceWriter(trace, make_header(probes={}, interval_s=interval, command=["faults"]))

    def record(tick: Tick) -> None:
        writer.tick(tick.t, tick.values, tick.procs)
        for e in tick.events:
            writer.event(e)
        writer.flush()

    sampler = Sampler(
        probes,
        interval=interval,
        hooks=[record],
        on_note=lambda t, m, lv: writer.note(t, m, lv),
        on_skip=lambda t, n: writer.skip(t, n),
    )
    sampler.start()
    t0 = time.monotonic()
    try:
        for at, step in steps:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            step()
    finally:
        sampler.stop()
        writer.end(time.monotonic() - sampler.t0, ticks=sampler.ticks, skipped=sampler.skipped)
        writer.close()
        sampler.close()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


# -- NVML errors mid-run ----------------------------------------------------------------------------------
def test_nvml_errors_mid_run_reported_and_sampling_goes_on(tmp_path: Path, child: Child) -> None:
    gpu0 = a100_80gb(processes=[(child.pid, 2 << 30)])
    gpu1 = rtx_4090()
    nvml = make_fake_pynvml([gpu0, gpu1])
    cpu = CpuProbe([child.pid])
    gpu = NvidiaProbe(cpu.pids, nvml=nvml)
    assert gpu.available() is None
    trace = tmp_path / "t.jsonl"
    marks: dict[str, float] = {}

    def break_things() -> None:
        marks["broken"] = time.monotonic()
        gpu1.lost_after = gpu1.calls  # falls off the bus now
        gpu0.errors["nvmlDeviceGetUtilizationRates"] = pynvml.NVMLError_NotSupported
        gpu0.errors["nvmlDeviceGetPowerUsage"] = pynvml.NVMLError_Timeout

    def power_back() -> None:
        del gpu0.errors["nvmlDeviceGetPowerUsage"]  # a transient error: the next reading is fine again

    record_session(trace, [cpu, gpu], 0.02, [(0.4, break_things), (0.45, power_back), (0.9, lambda: None)])
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    ticks = [r for r in recs if r["k"] == "tick"]
    lost = [r for r in recs if r.get("kind") == "device_lost"]
    assert [e["data"]["device"] for e in lost] == [1]
    t_lost = lost[0]["t"]
    # The faults are set from this thread while the sampler runs: the one or two ticks before the loss was
    # noticed may already have read GPU 0 broken (a loaded host failed this once), so they are not "before".
    before = [t["m"] for t in ticks if t["t"] < t_lost][:-2]
    after = [t["m"] for t in ticks if t["t"] > t_lost + 0.06]
    assert len(before) >= 3 and len(after) >= 5
    assert all(m["gpu_util_ratio/0"] == 0.0 or m["gpu_util_ratio/0"] for m in before)  # it worked before
    assert all(m["gpu_util_ratio/0"] is None and m["gpu_mem_util_ratio/0"] is None for m in after)
    gone = ("gpu_mem_used_bytes/1", "gpu_util_ratio/1", "gpu_temp_celsius/1")
    assert all(m[k] is None for m in after for k in gone)
    # the rest goes on: GPU 0's memory and temperature, its power after the transient error, the tree, the CPU
    assert all(m["gpu_mem_used_bytes/0"] and m["gpu_temp_celsius/0"] for m in after)
    assert after[-1]["gpu_power_watts/0"] and after[-1]["gpu_tree_mem_bytes/0"] == 2 << 30
    assert all(m["tree_rss_bytes"] and m["sys_mem_total_bytes"] for m in after)
    notes = [r for r in recs if r["k"] == "note"]
    warn = [n["msg"] for n in notes if n["level"] == "warn"]
    assert any(m.startswith("GPU 1 lost (GPU is lost)") for m in warn), notes
    assert any("gpu_util_ratio/0, gpu_mem_util_ratio/0 not sampled from now on: Not Supported" in m for m in warn)
    assert not any("power" in n["msg"] for n in notes)  # a one-tick error is that tick's None, not a verdict
    assert recs[-1]["k"] == "end"
    rep = tuner("report", str(trace), "--json")
    assert rep.returncode == 0, rep.stderr
    warnings = json.loads(rep.stdout)["warnings"]
    assert any("GPU 1 lost" in w for w in warnings) and any("Not Supported" in w for w in warnings)


# -- processes exiting between listing and reading ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_exiting_between_listing_and_reading(
    child: Child, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend=backend)
    try:
        p.sample(0.0)
        pids = [int(child.do(f"g{i} = subprocess.Popen(['sleep', '60']); out = g{i}.pid")) for i in range(3)]
        victims = set(pids[:2])
        real_children = psutil.Process.children
        real_listdir = os.listdir

        def kill_victims() -> None:
            for i, pid in enumerate(pids[:2]):
                if psutil.pid_exists(pid):
                    child.do(f"g{i}.kill(); g{i}.wait()")  # gone, and reaped: no zombie to find either

        def children(self: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
            found = real_children(self, recursive=recursive)
            kill_victims()
            return found

        def listdir(path: Any = ".") -> list[str]:
            found = real_listdir(path)
            if path == "/proc":
                kill_victims()
            return found

        monkeypatch.setattr(psutil.Process, "children", children)
        monkeypatch.setattr(os, "listdir", listdir)
        samples: list[Sample] = []
        for k in range(20):
            samples.append(p.sample(0.1 + k * 0.01))  # never raises
        monkeypatch.undo()
        last = samples[-1]
        assert last.procs is not None and set(last.procs) == {child.pid, pids[2]}
        assert last.values["tree_procs"] == 2
        seen = {pid for s in samples for pid in (s.procs or {})}
        started = {e.data["pid"] for s in samples for e in s.events if e.kind == "proc_start"}
        exited = {e.data["pid"] for s in samples for e in s.events if e.kind == "proc_exit"}
        # a victim may have been read before it died (then it starts and exits): never one without the other
        assert started & victims == exited & victims == seen & victims
        assert pids[2] in started
    finally:
        p.close()


# -- PID reuse -----------------------------------------------------------------------------------------
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def spawn_with_pid(pid: int, argv: list[str], tries: int = 50) -> subprocess.Popen[bytes] | None:
    """A new process with exactly ``pid`` (the kernel hands out ns_last_pid + 1), or None if other
    processes on the machine kept taking it first."""
    for _ in range(tries):
        NS_LAST_PID.write_text(str(pid - 1))
        p = subprocess.Popen(argv)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


@pytest.mark.skipif(os.getuid() != 0 or not NS_LAST_PID.exists(), reason="needs root and ns_last_pid")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_recycled_pid_is_not_counted_as_the_old_process(child: Child, backend: str) -> None:
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend=backend)
    impostor: subprocess.Popen[bytes] | None = None
    try:
        p.sample(0.0)
        old, s = child.start_sleep_seen(p, 0.01, tries=50)
        assert s.procs is not None and s.procs[old]["name"] == "sleep"
        # a process is (PID, start time in 10 ms clock ticks): a PID reused within the same tick cannot be
        # told apart by anyone; make sure the impostor starts in a later tick
        time.sleep(0.05)
        child.do("g.kill(); g.wait()")
        # the same PID, at once, for a process outside the tree (started by us, not by the watched root)
        impostor = spawn_with_pid(old, [sys.executable, "-c", "import time; time.sleep(60)"])
        if impostor is None:
            pytest.skip("the machine kept taking the PID first")
        assert psutil.Process(old).ppid() == os.getpid()
        samples = [p.sample(1.0 + 0.1 * k) for k in range(5)]
        for s in samples:
            assert s.procs is not None and old not in s.procs  # not counted as the old one
            assert s.values["tree_procs"] == 1
        exits = [e.data for s in samples for e in s.events if e.kind == "proc_exit"]
        assert [e["pid"] for e in exits] == [old] and exits[0]["name"] == "sleep"
        assert not [e for s in samples for e in s.events if e.kind == "proc_start"]
    finally:
        if impostor is not None:
            impostor.kill()
            impostor.wait()
        p.close()


@pytest.mark.skipif(os.getuid() != 0 or not NS_LAST_PID.exists(), reason="needs root and ns_last_pid")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_recycled_pid_inside_the_tree_is_a_new_process(child: Child, backend: str) -> None:
    """The watched root itself starts a new process that gets the old PID: an exit and a start, and the
    newcomer's CPU is measured from its own start (not the old one's counters)."""
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend=backend, min_window_s=0.0)
    try:
        p.sample(0.0)
        burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.5: pass\ntime.sleep(60)"
        old = int(child.do(f"g = subprocess.Popen([sys.executable, '-c', {burn!r}]); out = g.pid"))
        time.sleep(0.8)  # it burnt 0.5 s of CPU
        s = p.sample(0.8)
        assert s.procs is not None and old in s.procs
        child.do("g.kill(); g.wait()")
        got = child.do(f"exec({_reuse_code(old)!r}); out = h.pid")  # the root's own new child
        if int(got) != old:
            pytest.skip("the machine kept taking the PID first")
        samples = [p.sample(1.0 + 0.1 * k) for k in range(4)]
        kinds = [(e.kind, e.data["pid"], e.data["name"]) for s in samples for e in s.events]
        assert ("proc_exit", old, "python3") in kinds or ("proc_exit", old, Path(sys.executable).name) in kinds
        assert ("proc_start", old, "sleep") in kinds
        last = samples[-1]
        assert last.procs is not None and last.procs[old]["name"] == "sleep"
        assert last.values["tree_procs"] == 2
        ratios = [s.procs[old]["cpu_ratio"] for s in samples if s.procs and old in s.procs]
        assert all(r is None or 0.0 <= r < 0.2 for r in ratios), ratios  # sleep's own (idle) CPU
    finally:
        p.close()


def _reuse_code(pid: int) -> str:
    return (
        "from pathlib import Path\n"
        "for _ in range(50):\n"
        f"    Path('/proc/sys/kernel/ns_last_pid').write_text(str({pid} - 1))\n"
        "    h = subprocess.Popen(['sleep', '60'])\n"
        f"    if h.pid == {pid}:\n"
        "        break\n"
        "    h.kill(); h.wait()\n"
    )


# -- the wall clock jumping --------------------------------------------------------------------------------
def test_wall_clock_jumps_do_not_move_intervals(tmp_path: Path, child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    real_time = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])
    burn = "import threading\ndef burn():\n    while True: pass\nthreading.Thread(target=burn, daemon=True).start()"
    child.do(f"exec({burn!r})")  # one core busy in the watched process
    cpu = CpuProbe([child.pid], min_window_s=0.2)  # CPU time moves in 10 ms steps: a long window, less noise
    trace = tmp_path / "t.jsonl"

    def jump(by: float) -> Any:
        def step() -> None:
            offset[0] += by

        return step

    interval = 0.02
    steps = [(0.3, jump(-3600.0)), (0.6, jump(7200.0)), (0.9, jump(-86400.0)), (1.2, jump(0.0))]
    record_session(trace, [cpu], interval, steps)
    assert time.time() - real_time() < -80000  # the jumps really were in effect for everything in this process
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    ticks = [r for r in recs if r["k"] == "tick"]
    ts = [t["t"] for t in ticks]
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    skipped = sum(r["n"] for r in recs if r["k"] == "skip")
    # tick times stay on the monotonic grid: no hour-long gap, no burst of skips, no time going back
    assert all(g > 0 for g in gaps)
    assert max(gaps) < 0.5
    assert ts[-1] - ts[0] == pytest.approx(1.2, abs=0.3)
    assert len(ticks) + skipped == pytest.approx((ts[-1] - ts[0]) / interval + 1, abs=2)
    ratios = [t["m"]["tree_cpu_ratio"] for t in ticks if t["t"] > ts[0] + 0.25]
    # one busy thread all along (a shared machine gives it what it can): a ratio over an interval measured on
    # the wall clock would read ~0 (over an hour), negative (time going back) or absurd around each jump
    # (an hour-long interval reads < 0.001; a busy thread starved below 0.01 core over 200 ms is not seen here)
    assert all(r is not None and 0.01 < r < 1.6 for r in ratios), ratios


# -- zombies -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zombie_is_reported_once_and_never_counted(child: Child, backend: str) -> None:
    """A child of the tree that exited but is not reaped yet: one ``proc_exit`` (zombie), then it is in no
    sum, no count and no ``procs`` entry; once no live process remains the tree's values are None."""
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend=backend)
    try:
        p.sample(0.0)
        gpid, s = child.start_sleep_seen(p, 0.01)
        assert s.values["tree_procs"] == 2
        child.do("os.kill(g.pid, 9); time.sleep(0.3)")  # dead, not reaped
        assert psutil.Process(gpid).status() == psutil.STATUS_ZOMBIE
        samples = [p.sample(3.0 + 0.1 * k) for k in range(3)]
        for s in samples:
            assert s.procs is not None and set(s.procs) == {child.pid}
            assert s.values["tree_procs"] == 1
            assert s.values["tree_rss_bytes"] == s.procs[child.pid]["rss_bytes"]
            assert s.values["tree_threads"] == s.procs[child.pid]["threads"]
        exits = [e.data for s in samples for e in s.events if e.kind == "proc_exit"]
        assert exits == [{"pid": gpid, "name": "sleep", "exit_after_s": exits[0]["exit_after_s"], "zombie": True}]
        # the root goes too (its zombie child is reaped with it): nothing alive, nothing measured
        os.kill(child.pid, 9)
        child.p.wait()
        s = p.sample(4.0)
        assert s.values["tree_procs"] == 0
        for key in ("tree_rss_bytes", "tree_cpu_ratio", "tree_threads", "tree_fds", "tree_uss_bytes"):
            assert s.values[key] is None, key
        assert s.values["sys_mem_total_bytes"]  # the machine is still sampled
    finally:
        p.close()
