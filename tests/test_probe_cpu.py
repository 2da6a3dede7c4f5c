"""The CPU probe on real processes (children the test starts and drives), and its /proc parsers on canned text."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tuner.probes.cpu as cpu_mod
from tuner.probes.base import Probe
from tuner.probes.cpu import CpuProbe
from tuner.probes.procfs import (
    CLK_TCK,
    PAGE_SIZE,
    CpuTimes,
    ProcFile,
    parse_cpu_times,
    parse_meminfo,
    parse_stat,
    parse_statm_rss,
    ratio_between,
    system_memory,
)
from tuner.records import Sample, unit_of

MB = 1024 * 1024
LINUX = sys.platform.startswith("linux")
BACKENDS = ["procfs", "psutil"] if LINUX else ["psutil"]

# -- canned /proc content --------------------------------------------------------------------------------

STAT_TAIL = (
    b"S 4242 100 100 0 -1 4194560 5000 0 12 0 731 269 3 4 20 0 7 0 123456 1048576000 25600 "
    b"18446744073709551615 1 1 0 0 0 0 0 16781312 17442 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
)


def test_parse_stat_plain_and_hostile_comm() -> None:
    s = parse_stat(b"1234 (python3) " + STAT_TAIL)
    assert s == (1234, "python3", "S", 4242, 731, 269, 7, 123456)
    # a process may call itself anything up to 15 bytes, spaces and parentheses included
    for comm in ("a) b (c", "x) S 1 2 3 (", ")", "((", "my worker 1", "))) )"):
        s = parse_stat(f"77 ({comm}) ".encode() + STAT_TAIL)
        assert s.comm == comm
        assert (s.pid, s.state, s.ppid, s.utime, s.stime, s.num_threads, s.starttime) == (
            77,
            "S",
            4242,
            731,
            269,
            7,
            123456,
        )


def test_parse_stat_zombie_and_garbage() -> None:
    z = parse_stat(b"9 (defunct) Z 1 " + STAT_TAIL[4:])
    assert z.state == "Z" and z.ppid == 1
    for bad in (b"", b"garbage", b"12 (x) S 1 2", b"(x) S " + STAT_TAIL):
        with pytest.raises(ValueError):
            parse_stat(bad)


@settings(max_examples=300, deadline=None)
@given(
    comm=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=32),
    pid=st.integers(1, 2**22),
    ppid=st.integers(0, 2**22),
    utime=st.integers(0, 2**63),
    stime=st.integers(0, 2**63),
    threads=st.integers(1, 100_000),
    start=st.integers(0, 2**63),
    state=st.sampled_from("RSDZTtXI"),
)
def test_parse_stat_property(
    comm: str, pid: int, ppid: int, utime: int, stime: int, threads: int, start: int, state: str
) -> None:
    fields = [state, ppid, 1, 1, 0, -1, 4194560, 1, 0, 0, 0, utime, stime, 0, 0, 20, 0, threads, 0, start]
    fields += [123, 456] + [0] * 30
    line = f"{pid} ({comm}) " + " ".join(map(str, fields)) + "\n"
    s = parse_stat(line.encode())
    assert s == (pid, comm, state, ppid, utime, stime, threads, start)


def test_parse_statm() -> None:
    assert parse_statm_rss(b"280381 25600 4000 1 0 30000 0\n") == 25600 * PAGE_SIZE
    assert parse_statm_rss(b"0 0 0 0 0 0 0\n") == 0  # zombie: no mm
    with pytest.raises(ValueError):
        parse_statm_rss(b"")


PROC_STAT = b"""cpu  1000 10 500 8000 400 0 90 0 300 0
cpu0 600 5 300 3900 200 0 45 0 150 0
cpu1 400 5 200 4100 200 0 45 0 150 0
intr 12345 0 0 0
ctxt 999
cpu9 this is not a cpu line after the block
"""


def test_parse_cpu_times_excludes_guest_and_counts_iowait_idle() -> None:
    all_, cores = parse_cpu_times(PROC_STAT)
    # total = user..steal (guest already inside user); busy = total - idle - iowait
    assert all_ == CpuTimes(1000 + 10 + 500 + 90, 1000 + 10 + 500 + 8000 + 400 + 90)
    assert set(cores) == {0, 1}
    assert cores[1] == CpuTimes(400 + 5 + 200 + 45, 400 + 5 + 200 + 4100 + 200 + 45)
    later = CpuTimes(all_.busy + 50, all_.total + 100)
    assert ratio_between(all_, later) == 0.5
    assert ratio_between(all_, all_) is None
    with pytest.raises(ValueError):
        parse_cpu_times(b"intr 1 2 3\n")


MEMINFO = b"""MemTotal:       16384000 kB
MemFree:         1000000 kB
MemAvailable:    8192000 kB
Buffers:          200000 kB
Cached:          3000000 kB
SwapCached:            0 kB
SwapTotal:       2000000 kB
SwapFree:        1500000 kB
HugePages_Total:       0
"""


def test_parse_meminfo_and_system_memory() -> None:
    m = parse_meminfo(MEMINFO)
    assert m["MemTotal"] == 16384000 * 1024 and m["Cached"] == 3000000 * 1024
    assert "SwapCached" not in m  # only the keys the probe uses
    sm = system_memory(m)
    assert sm.total == 16384000 * 1024
    assert sm.available == 8192000 * 1024
    assert sm.used == sm.total - sm.available  # as psutil and free(1)
    assert sm.swap_used == 500000 * 1024
    # an old kernel without MemAvailable: free + buffers + cached
    old = parse_meminfo(b"".join(line + b"\n" for line in MEMINFO.splitlines() if b"MemAvailable" not in line))
    assert system_memory(old).available == (1000000 + 200000 + 3000000) * 1024
    assert system_memory(parse_meminfo(b"MemTotal: 100 kB\nMemAvailable: 40 kB\n")).swap_used is None


def test_procfile_rereads_and_grows(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"a" * 100)
    pf = ProcFile(str(f), size=16)
    assert pf.read() == b"a" * 100  # buffer doubled until the whole content fit
    f.write_bytes(b"b" * 5)  # same inode, rewritten: re-read from offset 0
    assert pf.read() == b"b" * 5
    pf.close()
    pf.close()  # idempotent


# -- real processes --------------------------------------------------------------------------------------

CHILD = r"""
import sys, os, subprocess, time
ns = {"os": os, "sys": sys, "subprocess": subprocess, "time": time}
print("ready", flush=True)
for line in sys.stdin:
    try:
        exec(line, ns)
        print("ok", ns.get("out", ""), flush=True)
    except Exception as exc:
        print("err", exc, flush=True)
"""


class Child:
    """A python child the test drives line by line (``do("code")`` runs it and waits for the answer)."""

    def __init__(self) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def do(self, code: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(code + "\n")
        self.p.stdin.flush()
        ans = self.p.stdout.readline().strip()
        assert ans.startswith("ok"), ans
        return ans[2:].strip()

    def start_sleep_seen(self, probe: CpuProbe, at: float, tries: int = 200) -> tuple[int, Sample]:
        """Start a ``sleep 60`` child of this process (``g``) and sample ``probe`` at time ``at`` until it sees it."""
        gpid = int(self.do("g = subprocess.Popen(['sleep', '60']); out = g.pid"))
        for _ in range(tries):
            s = probe.sample(at)
            if s.procs and gpid in s.procs:
                return gpid, s
            time.sleep(0.01)
        raise AssertionError(f"the probe never saw the new child {gpid}")

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                for c in psutil.Process(self.pid).children(recursive=True):
                    c.kill()
            except psutil.Error:
                pass
            self.p.kill()
        self.p.wait()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


def events_of(samples: list[Sample], kind: str) -> list[dict[str, Any]]:
    return [dict(e.data) for s in samples for e in s.events if e.kind == kind]


def test_is_a_probe_with_declared_units(child: Child) -> None:
    p = CpuProbe([child.pid])
    try:
        assert isinstance(p, Probe) and p.name == "cpu" and p.available() is None
        m = p.metrics()
        p.sample(0.0)
        time.sleep(0.05)
        s = p.sample(0.05)
        assert set(s.values) == set(m)
        assert {k for k in m if k.startswith("sys_core_cpu_ratio/")} == {
            f"sys_core_cpu_ratio/{i}" for i in range(psutil.cpu_count() or 1)
        }
        for k, unit in m.items():
            assert unit == unit_of(k), k
        for k in ("tree_rss_bytes", "tree_threads", "tree_procs", "sys_cpu_ratio", "sys_mem_used_bytes"):
            assert s.values[k] is not None, k
    finally:
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_100mb_allocation_shows_in_tree_rss(child: Child, backend: str) -> None:
    p = CpuProbe([child.pid], backend=backend)
    try:
        before = p.sample(0.0).values["tree_rss_bytes"]
        child.do("buf = bytearray(100 * 1024 * 1024); buf[::4096] = b'x' * len(buf[::4096])")
        after = p.sample(0.1)
        assert after.values["tree_rss_bytes"] is not None and before is not None
        assert after.values["tree_rss_bytes"] - before >= 90 * MB
        assert after.procs is not None and after.procs[child.pid]["rss_bytes"] >= 100 * MB
        child.do("del buf")
        freed = p.sample(0.2).values["tree_rss_bytes"]
        assert freed is not None and freed < before + 20 * MB
    finally:
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grandchild_is_watched_summed_and_its_exit_is_an_event(child: Child, backend: str) -> None:
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend=backend)
    try:
        samples = [p.sample(0.0)]
        assert p.pids() == [child.pid]
        gpid = int(
            child.do(
                "g = subprocess.Popen([sys.executable, '-c', "
                "'b = bytearray(30 << 20); b[::4096] = bytes(len(b[::4096])); import time; time.sleep(60)']); "
                "out = g.pid"
            )
        )
        deadline = time.monotonic() + 10
        while True:  # until the grandchild has its 30 MB
            s = p.sample(time.monotonic())
            samples.append(s)
            assert s.procs is not None
            if gpid in s.procs and s.procs[gpid]["rss_bytes"] >= 30 * MB:
                break
            assert time.monotonic() < deadline, s.procs
            time.sleep(0.02)
        assert set(s.procs) == {child.pid, gpid} and sorted(p.pids()) == sorted([child.pid, gpid])
        assert s.procs[gpid]["ppid"] == child.pid
        assert s.values["tree_procs"] == 2
        assert s.values["tree_rss_bytes"] == sum(v["rss_bytes"] for v in s.procs.values())
        assert s.values["tree_threads"] == sum(v["threads"] for v in s.procs.values())
        starts = events_of(samples, "proc_start")
        assert starts == [{"pid": gpid, "ppid": child.pid, "name": starts[0]["name"]}]
        assert starts[0]["name"].startswith("python")

        child.do("g.kill(); g.wait()")  # exits and is reaped
        s = p.sample(time.monotonic())
        assert s.procs is not None and set(s.procs) == {child.pid}
        exits = events_of([s], "proc_exit")
        assert len(exits) == 1 and exits[0]["pid"] == gpid and exits[0]["exit_after_s"] >= 0
        assert s.values["tree_procs"] == 1
        assert p.pids() == [child.pid]
    finally:
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zombie_is_reported_once_and_never_counted(child: Child, backend: str) -> None:
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend=backend)
    try:
        p.sample(0.0)
        gpid, _ = child.start_sleep_seen(p, 0.1)
        child.do("os.kill(g.pid, 9); time.sleep(0.3)")  # not reaped: a zombie
        assert psutil.Process(gpid).status() == psutil.STATUS_ZOMBIE
        s1, s2 = p.sample(0.2), p.sample(0.3)
        for s in (s1, s2):  # dead: not a process with 0 B of memory, just gone
            assert s.procs is not None and gpid not in s.procs
            assert s.values["tree_procs"] == 1
        exits = events_of([s1, s2], "proc_exit")
        assert len(exits) == 1 and exits[0]["pid"] == gpid and exits[0]["zombie"] is True
        child.do("g.wait()")  # reaped now: gone, and no second exit event
        s3 = p.sample(0.4)
        assert s3.procs is not None and gpid not in s3.procs and not events_of([s3], "proc_exit")
    finally:
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_root_exit_is_an_event_not_an_error(backend: str) -> None:
    c = Child()
    p = CpuProbe([c.pid], backend=backend)
    try:
        p.sample(0.0)
        c.close()
        s = p.sample(0.1)
        assert [e.kind for e in s.events] == ["proc_exit"] and s.events[0].data["pid"] == c.pid
        assert s.values["tree_procs"] == 0 and s.values["tree_rss_bytes"] is None  # no reading, not 0 B
        assert s.values["sys_mem_total_bytes"]  # the machine is still sampled
        s = p.sample(0.2)
        assert not s.events and p.pids() == []
    finally:
        p.close()


def test_process_gone_between_listing_and_reading(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil lists a child that is dead by the time the probe opens its /proc files."""
    p = CpuProbe([child.pid], rescan_every_s=0.0)
    try:
        p.sample(0.0)
        dead = subprocess.Popen(["true"])
        dead.wait()
        ghost = psutil.Process.__new__(psutil.Process)
        ghost._pid = dead.pid  # type: ignore[attr-defined]
        monkeypatch.setattr(psutil.Process, "children", lambda self, recursive=False: [ghost])
        p._last_pid_seen = None
        s = p.sample(0.1)
        assert s.procs is not None and set(s.procs) == {child.pid} and not s.events
    finally:
        p.close()


def test_reused_pid_is_a_new_process(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    """Identity is (pid, starttime): the same PID with another start time is an exit and a start."""
    real = cpu_mod.parse_stat
    fake_start: dict[int, int] = {}

    def parse(data: bytes) -> Any:
        s = real(data)
        return s._replace(starttime=fake_start.get(s.pid, s.starttime))

    monkeypatch.setattr(cpu_mod, "parse_stat", parse)
    p = CpuProbe([child.pid], rescan_every_s=0.0, min_window_s=0.0)  # stat read every tick, as at <= 20 Hz
    try:
        gpid = int(child.do("g = subprocess.Popen(['sleep', '60']); out = g.pid"))
        samples = [p.sample(0.0), p.sample(0.1)]
        assert gpid in (samples[-1].procs or {})
        old_start = p._procs[gpid].starttime
        fake_start[gpid] = int(old_start) + 5 * CLK_TCK  # "a new process got this PID"
        samples += [p.sample(0.2), p.sample(0.3)]
        exits = events_of(samples, "proc_exit")
        starts = events_of(samples, "proc_start")
        assert [e["pid"] for e in exits] == [gpid]
        assert [e["pid"] for e in starts] == [gpid]
        assert p._procs[gpid].starttime == old_start + 5 * CLK_TCK
        last = samples[-1].procs or {}
        assert gpid in last and last[gpid]["cpu_ratio"] is None  # no delta across two processes
    finally:
        p.close()


def test_busy_child_is_about_one_core(child: Child) -> None:
    p = CpuProbe([child.pid])
    try:
        child.do(
            "import threading; stop = [False]; "
            "th = threading.Thread(target=lambda: any(iter(lambda: stop[0], True)), daemon=True); th.start()"
        )
        time.sleep(0.2)
        ps = psutil.Process(child.pid)
        first = p.sample(0.0)
        c0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
        assert first.values["tree_cpu_ratio"] is None  # no delta yet
        time.sleep(1.0)
        s = p.sample(1.0)
        c1, t1 = sum(ps.cpu_times()[:2]), time.monotonic()
        ratio, ref = s.values["tree_cpu_ratio"], (c1 - c0) / (t1 - t0)
        assert ratio is not None and ratio == pytest.approx(ref, abs=0.1)  # psutil's view of the same second
        # about one core, unless the machine (2 cores shared here) would not give the child one
        assert ratio <= 1.3 and (ratio >= 0.5 or ref < 0.5), (ratio, ref, os.getloadavg())
        assert s.procs is not None and s.procs[child.pid]["cpu_ratio"] == pytest.approx(ratio)
        assert s.procs[child.pid]["threads"] == 2
        child.do("stop[0] = True; th.join()")
    finally:
        p.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_seconds_total_counts_the_tree_and_keeps_what_exited_processes_used(child: Child, backend: str) -> None:
    """``tree_cpu_seconds_total``: utime+stime of the tree's processes as the kernel counts them (psutil
    agrees), a grandchild's CPU stays in it after the grandchild exits, and the counter never goes down."""
    p = CpuProbe([child.pid], rescan_every_s=0.0, min_window_s=0.0, backend=backend)
    try:
        s0 = p.sample(0.0)
        burn = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.4: pass')"
        gpid = int(child.do(f"g = subprocess.Popen([sys.executable, '-c', {burn!r}]); out = g.pid"))
        seen: list[float] = [s0.values["tree_cpu_seconds_total"]]
        g_cpu = 0.0
        deadline = time.monotonic() + 20
        while True:  # until the grandchild has burnt its 0.4 s and exited (reaped by the child below)
            s = p.sample(time.monotonic())
            seen.append(s.values["tree_cpu_seconds_total"])
            assert s.procs is not None
            if gpid in s.procs:
                g_cpu = s.procs[gpid]["cpu_seconds_total"]
                assert g_cpu == pytest.approx(sum(psutil.Process(gpid).cpu_times()[:2]), abs=0.05)
            if g_cpu >= 0.35 and gpid not in s.procs:
                break
            if child.do("out = g.poll()") != "None":
                child.do("g.wait()")
            assert time.monotonic() < deadline, (g_cpu, s.procs)
            time.sleep(0.02)
        assert seen == sorted(seen), seen  # a counter
        mine = sum(psutil.Process(child.pid).cpu_times()[:2])
        assert s.values["tree_cpu_seconds_total"] == pytest.approx(mine + g_cpu, abs=0.05)
        assert s.values["tree_cpu_seconds_total"] >= seen[0] + 0.35  # the exited grandchild's 0.4 s stay
        assert p.metrics()["tree_cpu_seconds_total"] == "seconds"
    finally:
        p.close()


def test_values_match_psutil(child: Child) -> None:
    child.do("bufs = [bytearray(20 << 20)]; bufs[0][::4096] = bytes(len(bufs[0][::4096]))")
    child.do("fs = [open(os.devnull) for _ in range(7)]")
    p = CpuProbe([child.pid], uss_every_s=0.0)
    try:
        p.sample(0.0)
        time.sleep(0.1)
        s = p.sample(0.1)
        ps = psutil.Process(child.pid)
        v, me = s.values, (s.procs or {})[child.pid]
        assert me["rss_bytes"] == pytest.approx(ps.memory_info().rss, abs=MB)
        assert me["threads"] == ps.num_threads()
        assert me["name"] == ps.name() and me["ppid"] == os.getpid()
        if LINUX:
            assert me["fds"] == ps.num_fds() == v["tree_fds"]
        assert me["uss_bytes"] == pytest.approx(ps.memory_full_info().uss, abs=2 * MB)
        assert v["tree_uss_bytes"] == me["uss_bytes"]
        vm, sw = psutil.virtual_memory(), psutil.swap_memory()
        assert v["sys_mem_total_bytes"] == vm.total
        assert v["sys_mem_available_bytes"] == pytest.approx(vm.available, abs=64 * MB)
        assert v["sys_mem_used_bytes"] == vm.total - (v["sys_mem_available_bytes"] or 0)
        assert v["sys_swap_used_bytes"] == pytest.approx(sw.used, abs=16 * MB)
        # system CPU: the same interval measured by psutil's own per-CPU percentages
        psutil.cpu_percent(percpu=True)
        p.sample(0.2)
        time.sleep(0.5)
        ref = psutil.cpu_percent(percpu=True)
        s = p.sample(0.7)
        for i, pct in enumerate(ref):
            got = s.values[f"sys_core_cpu_ratio/{i}"]
            assert got is not None and 0 <= got <= 1
            assert got == pytest.approx(pct / 100, abs=0.15)
        total = s.values["sys_cpu_ratio"]
        assert total is not None and total == pytest.approx(sum(ref) / len(ref) / 100, abs=0.15)
    finally:
        p.close()


def test_uss_only_on_its_cadence(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = psutil.Process.memory_full_info

    def counting(self: psutil.Process) -> Any:
        calls.append(self.pid)
        return real(self)

    monkeypatch.setattr(psutil.Process, "memory_full_info", counting)
    clock = [100.0]
    p = CpuProbe([child.pid], uss_every_s=5.0, clock=lambda: clock[0])
    try:
        first = p.sample(0.0)
        for i in range(1, 10):  # 4.5 s of ticks: the first reading is held
            clock[0] += 0.5
            s = p.sample(i * 0.5)
            assert (s.procs or {})[child.pid]["uss_bytes"] == (first.procs or {})[child.pid]["uss_bytes"]
        assert calls == [child.pid]
        clock[0] += 0.5
        p.sample(5.0)
        assert calls == [child.pid, child.pid]
    finally:
        p.close()


def test_missing_roots_give_a_reason() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    p = CpuProbe([dead.pid])
    assert p.available() == f"process {dead.pid} does not exist"
    p.close()
    p = CpuProbe([0])
    assert p.available() == "0 is not a valid PID"
    p.close()


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="needs root to become another user")
def test_access_denied_root_gives_a_reason() -> None:
    """A probe running as 'nobody' asked to watch a root process: a reason, not an exception."""
    target = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            p = CpuProbe([target])
            os.write(w, (p.available() or "None").encode())
            p.close()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        reason = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reason.startswith(f"cannot read process {target}: access denied"), reason


def test_system_only_without_roots() -> None:
    p = CpuProbe([])
    try:
        assert p.available() is None and p.pids() == []
        assert not any(k.startswith("tree_") for k in p.metrics())
        s1 = p.sample(0.0)
        time.sleep(0.05)
        s2 = p.sample(0.05)
        assert s1.values["sys_cpu_ratio"] is None and s2.procs is None
        assert set(s2.values) == set(p.metrics())
        assert s2.values["sys_cpu_ratio"] is not None
    finally:
        p.close()


def _proc_files_open() -> Counter[str]:
    """What this process holds open under /proc, by target (descriptor numbers are reused as other
    tests' leftovers get collected, so counting new numbers was flaky)."""
    out: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/proc/"):
            out[target] += 1
    return out


@pytest.mark.skipif(not LINUX, reason="counts this process's file descriptors in /proc")
def test_close_releases_every_descriptor(child: Child) -> None:
    child.do("gs = [subprocess.Popen(['sleep', '60']) for _ in range(3)]")
    p = CpuProbe([child.pid], rescan_every_s=0.0)
    for i in range(3):
        p.sample(i * 0.1)
    pids = p.pids()
    assert len(pids) == 4
    mine = Counter({f"/proc/{pid}/{name}": 1 for pid in pids for name in ("stat", "statm")})
    mine.update(["/proc/stat", "/proc/meminfo", "/proc/loadavg"])
    held = _proc_files_open()
    assert not mine - held  # stat+statm per process, /proc/stat, meminfo, loadavg: kept open
    p.close()
    assert held - _proc_files_open() == mine  # every one of them closed (other tests' leftovers may hold more)
    assert p.pids() == []


@pytest.mark.skipif(not LINUX, reason="reads /proc/loadavg")
def test_rescan_reads_only_new_pids(child: Child, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full psutil walk (~2 ms) runs first and every FULL_RESCAN_EVERY cadences; between, only PIDs handed out since
    the last scan (/proc/loadavg's last PID) are read, and none at all when it did not move."""
    scans = []
    real = psutil.Process.children

    def counting(self: psutil.Process, recursive: bool = False) -> Any:
        scans.append(self.pid)
        return real(self, recursive=recursive)

    monkeypatch.setattr(psutil.Process, "children", counting)
    listings = []
    real_listdir = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        if path == "/proc":
            listings.append(path)
        return real_listdir(path)

    monkeypatch.setattr(cpu_mod.os, "listdir", listdir)
    loadavg = tmp_path / "loadavg"
    loadavg.write_bytes(b"0.50 0.40 0.30 2/345 1000\n")
    p = CpuProbe([child.pid], rescan_every_s=0.0)
    try:
        assert p._loadavg is not None
        p._loadavg.close()
        p._loadavg = ProcFile(str(loadavg))
        p.sample(0.0)
        assert len(scans) == 1
        for i in range(cpu_mod.FULL_RESCAN_EVERY):
            p.sample(0.1 * i)
        # no PID handed out anywhere: nothing new to find (the last few PIDs are read once more, then never)
        assert len(scans) == 1 and len(listings) == 1
        p.sample(2.0)
        assert len(scans) == 2  # the periodic full scan
        loadavg.write_bytes(b"0.50 0.40 0.30 2/345 1001\n")  # a process was created somewhere
        for t in (2.1, 2.2, 2.3, 2.4):
            p.sample(t)
        assert len(scans) == 2 and len(listings) == 3  # the new PIDs read, once more, then settled
    finally:
        p.close()


@pytest.mark.skipif(not LINUX, reason="reads /proc/loadavg")
def test_new_descendants_found_without_a_full_scan(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child and a grandchild created between scans are adopted by reading only the new PIDs."""
    monkeypatch.setattr(cpu_mod, "FULL_RESCAN_EVERY", 10**6)
    scans = []
    real = psutil.Process.children

    def counting(self: psutil.Process, recursive: bool = False) -> Any:
        scans.append(self.pid)
        return real(self, recursive=recursive)

    monkeypatch.setattr(psutil.Process, "children", counting)
    p = CpuProbe([child.pid], rescan_every_s=0.0)
    try:
        samples = [p.sample(0.0)]
        assert len(scans) == 1
        out = child.do(
            "g = subprocess.Popen(['sh', '-c', 'sleep 60 & echo $!; wait'], stdout=subprocess.PIPE, text=True); "
            "out = f'{g.pid} {g.stdout.readline().strip()}'"
        )
        gpid, ggpid = map(int, out.split())
        samples.append(p.sample(0.1))
        assert len(scans) == 1  # no psutil walk
        assert sorted(p.pids()) == sorted([child.pid, gpid, ggpid])
        procs = samples[-1].procs or {}
        assert procs[gpid]["ppid"] == child.pid and procs[ggpid]["ppid"] == gpid
        assert sorted(e["pid"] for e in events_of(samples, "proc_start")) == sorted([gpid, ggpid])
    finally:
        p.close()


def test_fast_ticks_hold_cpu_ratios_and_system_values(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 100 Hz the 10 ms CPU counters would read 0 or 1 core: ratios span >= min_window_s and hold between."""
    system_reads = []
    real = cpu_mod.CpuProbe._sample_system

    def counting(self: CpuProbe, values: dict[str, Any], raw: Any) -> None:
        system_reads.append(1)
        real(self, values, raw)

    monkeypatch.setattr(cpu_mod.CpuProbe, "_sample_system", counting)
    clock = [50.0]
    p = CpuProbe([child.pid], min_window_s=1.0, clock=lambda: clock[0])  # scaled by 20 for exact floats
    try:
        first = p.sample(0.0)
        assert first.values["tree_cpu_ratio"] is None and first.values["sys_mem_total_bytes"]
        ratios, sys_ratios = [], []
        for i in range(1, 11):  # 10 ticks 4 to a window (100 Hz with the 0.05 s default)
            clock[0] += 0.25
            s = p.sample(i * 0.25)
            ratios.append(s.values["tree_cpu_ratio"])
            sys_ratios.append(s.values["sys_cpu_ratio"])
            assert s.values["tree_rss_bytes"] and s.values["sys_mem_total_bytes"]  # every tick
        assert len(system_reads) == 3  # t = 0, 1, 2
        assert ratios[:3] == [None] * 3 and all(r is not None for r in ratios[3:])  # the first window at t = 1
        assert ratios[3] == ratios[4] == ratios[6]  # held for t = 1 .. 1.75
        assert sys_ratios[:3] == [None] * 3  # the machine's first window: no ratio yet, values held
    finally:
        p.close()


def test_psutil_backend_zombie_refusing_calls_keeps_its_name(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS/BSD psutil raises ZombieProcess for a zombie: reported once, by name, and never counted."""
    p = CpuProbe([child.pid], rescan_every_s=0.0, backend="psutil")
    try:
        p.sample(0.0)
        gpid, _ = child.start_sleep_seen(p, 0.1)
        real = psutil.Process.status

        def status(self: psutil.Process) -> str:
            if self.pid == gpid:
                raise psutil.ZombieProcess(gpid)
            return real(self)

        monkeypatch.setattr(psutil.Process, "status", status)
        s = p.sample(0.2)
        assert s.procs is not None and gpid not in s.procs and s.values["tree_procs"] == 1
        exits = events_of([s, p.sample(0.3)], "proc_exit")
        assert [e["pid"] for e in exits] == [gpid] and exits[0]["name"] == "sleep"
    finally:
        p.close()
