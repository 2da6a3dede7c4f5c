"""The cgroup probe: its parsers and canned v1/v2 trees (written from the kernel's cgroup-v1/memory.rst and
cgroup-v2.rst), then real cgroups made under this test process's own (skipped with the reason where the
hierarchy is absent or not writable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cgroups import MIB, Unified, V1Memory, kernel_v1, sleeper
from tuner.probes.base import Probe, discover
from tuner.probes.cgroup import (
    UNLIMITED_V1,
    CgroupProbe,
    locate,
    parse_cpu_max,
    parse_flat_keyed,
    parse_limit,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_psi,
    unescape,
)

PID = 4242
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


# -- parsers ---------------------------------------------------------------------------------------------
def test_proc_cgroup_lines_split_at_two_colons() -> None:
    v1, v2 = parse_proc_cgroup(
        "12:memory:/kubepods/pod:1/ctr\n4:cpu,cpuacct:/a\n1:name=systemd:/user.slice\n0::/kubepods/pod:1/ctr\n"
    )
    assert v1 == {"memory": "/kubepods/pod:1/ctr", "cpu": "/a", "cpuacct": "/a", "name=systemd": "/user.slice"}
    assert v2 == "/kubepods/pod:1/ctr"
    with pytest.raises(ValueError):
        parse_proc_cgroup("garbage without colons\n")


def test_mountinfo_cgroup_mounts_and_octal_escapes() -> None:
    text = (
        "24 1 0:22 / /sys rw - sysfs sysfs rw\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /my\\040cgroups rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    ms = parse_mountinfo(text)
    assert [(m.root, m.point, m.fstype) for m in ms] == [
        ("/docker/abc", "/sys/fs/cgroup/memory", "cgroup"),
        ("/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup"),
        ("/", "/sys/fs/cgroup/systemd", "cgroup"),
        ("/", "/my cgroups", "cgroup2"),
    ]
    assert ms[1].controllers >= {"cpu", "cpuacct"} and "rw" not in ms[1].controllers
    assert "name=systemd" in ms[2].controllers
    assert unescape("a\\011b\\134c") == "a\tb\\c"


def test_limits_unlimited_is_none_never_a_sentinel() -> None:
    assert parse_limit(b"max\n", 2) is None
    assert parse_limit(b"671088640\n", 2) == 640 * MIB
    assert parse_limit(b"9223372036854771712\n", 1) is None  # this kernel's v1 "no limit"
    assert parse_limit(str(UNLIMITED_V1 - 4096).encode(), 1) == UNLIMITED_V1 - 4096
    assert parse_limit(b"-1\n", 1) is None
    for bad in (b"", b"12 MB", b"lots"):
        with pytest.raises(ValueError):
            parse_limit(bad, 2)


def test_flat_keyed_psi_and_cpu_max() -> None:
    assert parse_flat_keyed(b"anon 10\nfile -3\n\n") == {"anon": 10, "file": 0}
    with pytest.raises(ValueError):
        parse_flat_keyed(b"anon ten\n")
    psi = parse_psi(b"some avg10=12.50 avg60=1.00 avg300=0.00 total=123\nfull avg10=2.00 avg60=0 avg300=0 total=1\n")
    assert psi == {"some": 0.125, "full": 0.02}
    with pytest.raises(ValueError):
        parse_psi(b"nonsense\n")
    assert parse_cpu_max(b"max 100000\n") is None
    assert parse_cpu_max(b"150000 100000\n") == 1.5
    with pytest.raises(ValueError):
        parse_cpu_max(b"150000\n")


# -- canned trees ----------------------------------------------------------------------------------------
def write(root: Path, rel: str, text: str) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


V2_STAT = """anon 314572800
file 104857600
kernel 8388608
kernel_stack 1048576
sock 0
shmem 4194304
file_mapped 2097152
active_anon 300000000
inactive_anon 14572800
active_file 52428800
inactive_file 41943040
unevictable 0
"""
V2_EVENTS = "low 0\nhigh 7\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n"
PSI = "some avg10={s} avg60=0.50 avg300=0.10 total=1234\nfull avg10={f} avg60=0.00 avg300=0.00 total=12\n"


def v2_tree(tmp: Path, *, leaf_max: str = "max", current: int = 450 * MIB) -> Path:
    """A Kubernetes-like v2 layout: the limit on the pod, the process in a container below it."""
    write(tmp, f"/proc/{PID}/cgroup", "0::/kubepods/pod1/ctr\n")
    write(tmp, "/proc/self/mountinfo", "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    write(tmp, "/proc/self/cgroup", "0::/\n")
    pod, ctr = "/sys/fs/cgroup/kubepods/pod1", "/sys/fs/cgroup/kubepods/pod1/ctr"
    write(tmp, "/sys/fs/cgroup/kubepods/memory.max", "max\n")
    write(tmp, f"{pod}/memory.max", f"{640 * MIB}\n")
    write(tmp, f"{pod}/memory.high", "max\n")
    write(tmp, f"{pod}/cpu.max", "200000 100000\n")
    write(tmp, f"{pod}/pids.max", "1024\n")
    write(tmp, f"{ctr}/memory.max", leaf_max + "\n")
    write(tmp, f"{ctr}/memory.high", f"{600 * MIB}\n")
    write(tmp, f"{ctr}/memory.swap.max", "0\n")
    write(tmp, f"{ctr}/memory.current", f"{current}\n")
    write(tmp, f"{ctr}/memory.peak", f"{500 * MIB}\n")
    write(tmp, f"{ctr}/memory.stat", V2_STAT)
    write(tmp, f"{ctr}/memory.events", V2_EVENTS)
    write(tmp, f"{ctr}/memory.pressure", PSI.format(s="12.50", f="3.00"))
    write(tmp, f"{ctr}/cpu.pressure", PSI.format(s="40.00", f="0.00"))
    write(tmp, f"{ctr}/cpu.max", "max 100000\n")
    write(
        tmp,
        f"{ctr}/cpu.stat",
        "usage_usec 9000000\nuser_usec 7000000\nsystem_usec 2000000\n"
        "nr_periods 500\nnr_throttled 40\nthrottled_usec 2500000\n",
    )
    write(tmp, f"{ctr}/pids.current", "17\n")
    write(tmp, f"{ctr}/pids.max", "max\n")
    return tmp / ctr.lstrip("/")


def test_v2_canned_tree_limit_on_the_parent(tmp_path: Path) -> None:
    ctr = v2_tree(tmp_path)
    p = CgroupProbe(PID, root=str(tmp_path))
    assert p.available() is None and isinstance(p, Probe)
    assert p.summary() == "cgroup /kubepods/pod1/ctr (memory v2, cpu v2, pids v2; pressure per cgroup (v2))"
    s = p.sample(0.0)
    v = s.values
    assert v["cgroup_mem_limit_bytes"] == 640 * MIB  # the pod's, though the container reads "max"
    assert v["cgroup_memsw_limit_bytes"] == 640 * MIB  # swap.max 0: nothing more before the kill
    assert v["cgroup_mem_usage_bytes"] == 450 * MIB
    assert v["cgroup_mem_working_set_bytes"] == 450 * MIB - 41943040
    assert v["cgroup_mem_peak_bytes"] == 500 * MIB
    assert v["cgroup_mem_high_bytes"] == 600 * MIB
    assert (v["cgroup_mem_anon_bytes"], v["cgroup_mem_file_bytes"], v["cgroup_mem_kernel_bytes"]) == (
        314572800,
        104857600,
        8388608,
    )
    assert (v["cgroup_oom_kills_total"], v["cgroup_ooms_total"]) == (1, 2)
    assert (v["cgroup_mem_limit_hits_total"], v["cgroup_mem_high_hits_total"]) == (3, 7)
    assert v["cgroup_mem_pressure_some_ratio"] == 0.125 and v["cgroup_mem_pressure_full_ratio"] == 0.03
    assert v["cgroup_cpu_pressure_some_ratio"] == 0.40
    assert "sys_mem_pressure_some_ratio" not in v  # per cgroup here, not the host's
    assert v["cgroup_cpu_limit_ratio"] == 2.0  # the pod's 200 ms per 100 ms
    assert v["cgroup_cpu_throttled_seconds_total"] == 2.5 and v["cgroup_cpu_throttled_periods_total"] == 40
    assert (v["cgroup_pids"], v["cgroup_pids_limit"]) == (17, 1024)
    assert [e.kind for e in s.events] == ["cgroup"] and s.events[0].data["memory"]["path"] == "/kubepods/pod1/ctr"
    assert p.unsupported == {} and set(p.metrics()) == set(v)
    units = p.metrics()
    assert units["cgroup_cpu_throttled_seconds_total"] == "seconds" and units["cgroup_oom_kills_total"] == "count"
    assert units["cgroup_pids"] == "count" and units["cgroup_mem_pressure_some_ratio"] == "ratio"
    # usage every tick from the kept-open file; memory.stat and limits only once a slow cadence
    (ctr / "memory.current").write_text(f"{460 * MIB}\n")
    (ctr / "memory.events").write_text(V2_EVENTS.replace("oom_kill 1", "oom_kill 2"))
    v = p.sample(0.1).values
    assert v["cgroup_mem_usage_bytes"] == 460 * MIB and v["cgroup_oom_kills_total"] == 1
    p.slow_every_s = 0.0
    v = p.sample(0.2).values
    assert v["cgroup_oom_kills_total"] == 2
    assert any("OOM killer killed 1 process" in m for m, _ in p.take_notes())
    p.close()


def v1_nested_tree(tmp: Path) -> Path:
    """A v1 container whose memory mount's root is its own cgroup (the host's path shows in /proc)."""
    write(tmp, f"/proc/{PID}/cgroup", "5:memory:/docker/abc/app\n4:cpu,cpuacct:/docker/abc\n3:pids:/docker/abc\n0::/\n")
    write(
        tmp,
        "/proc/self/mountinfo",
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
        "33 31 0:30 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
        "39 31 0:36 /docker/abc /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids\n",
    )
    write(tmp, "/proc/self/cgroup", "0::/\n")
    mem = "/sys/fs/cgroup/memory"
    write(tmp, f"{mem}/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp, f"{mem}/app/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp, f"{mem}/app/memory.memsw.limit_in_bytes", "9223372036854771712\n")
    write(tmp, f"{mem}/app/memory.usage_in_bytes", f"{300 * MIB}\n")
    write(tmp, f"{mem}/app/memory.max_usage_in_bytes", f"{320 * MIB}\n")
    write(tmp, f"{mem}/app/memory.failcnt", "5\n")
    write(tmp, f"{mem}/app/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    write(
        tmp,
        f"{mem}/app/memory.stat",
        f"cache 1\nrss 2\nshmem 0\ninactive_file 3\nhierarchical_memory_limit {512 * MIB}\n"
        f"hierarchical_memsw_limit {768 * MIB}\ntotal_cache {60 * MIB}\ntotal_rss {230 * MIB}\n"
        f"total_shmem {MIB}\ntotal_inactive_file {40 * MIB}\n",
    )
    cpu = "/sys/fs/cgroup/cpu,cpuacct"
    write(tmp, f"{cpu}/cpu.cfs_quota_us", "50000\n")
    write(tmp, f"{cpu}/cpu.cfs_period_us", "100000\n")
    write(tmp, f"{cpu}/cpu.stat", "nr_periods 10\nnr_throttled 4\nthrottled_time 1500000000\n")
    write(tmp, "/sys/fs/cgroup/pids/pids.current", "9\n")
    write(tmp, "/sys/fs/cgroup/pids/pids.max", "max\n")
    write(tmp, "/proc/pressure/memory", PSI.format(s="1.00", f="0.50"))
    write(tmp, "/proc/pressure/cpu", PSI.format(s="20.00", f="0.00"))
    return tmp / f"{mem}/app".lstrip("/")


def test_v1_nested_container_mount_root_stripped_and_hierarchical_limit(tmp_path: Path) -> None:
    v1_nested_tree(tmp_path)
    loc = locate(PID, str(tmp_path))
    assert loc.memory is not None and loc.memory.dir == str(tmp_path / "sys/fs/cgroup/memory/app")
    p = CgroupProbe(PID, root=str(tmp_path))
    v = p.sample(0.0).values
    # the ancestors above the container's mount are not visible: memory.stat's hierarchical limit is
    assert v["cgroup_mem_limit_bytes"] == 512 * MIB and v["cgroup_memsw_limit_bytes"] == 768 * MIB
    assert v["cgroup_mem_working_set_bytes"] == 260 * MIB and v["cgroup_mem_peak_bytes"] == 320 * MIB
    assert (v["cgroup_mem_anon_bytes"], v["cgroup_mem_file_bytes"]) == (230 * MIB, 60 * MIB)
    assert (v["cgroup_oom_kills_total"], v["cgroup_mem_limit_hits_total"]) == (3, 5)
    assert v["cgroup_cpu_limit_ratio"] == 0.5 and v["cgroup_cpu_throttled_seconds_total"] == 1.5
    assert v["cgroup_pids"] == 9 and v["cgroup_pids_limit"] is None
    # v1 has no per-cgroup PSI: the host's, under the host's names
    assert v["sys_mem_pressure_some_ratio"] == 0.01 and v["sys_cpu_pressure_some_ratio"] == 0.2
    assert "cgroup_mem_pressure_some_ratio" not in v
    assert "cgroup_mem_pressure_some_ratio" in p.unsupported and "cgroup_mem_high_bytes" in p.unsupported
    assert p.describe()["pressure"] == "host-wide (/proc/pressure)"


def test_missing_files_are_reasons_and_sampling_goes_on(tmp_path: Path) -> None:
    ctr = v2_tree(tmp_path)
    for name in ("memory.peak", "memory.pressure", "cpu.pressure", "memory.events"):
        (ctr / name).unlink()
    p = CgroupProbe(PID, root=str(tmp_path))
    assert p.available() is None
    v = p.sample(0.0).values
    assert v["cgroup_mem_peak_bytes"] is None and v["cgroup_oom_kills_total"] is None
    assert "kernels before 5.19" in p.unsupported["cgroup_mem_peak_bytes"]
    assert "memory.events does not exist" in p.unsupported["cgroup_oom_kills_total"]
    assert "no PSI in this kernel" in p.unsupported["cgroup_mem_pressure_some_ratio"]
    assert "cgroup_mem_peak_bytes" not in p.metrics()  # the header lists only what is recorded
    notes = [m for m, _ in p.take_notes()]
    assert any("memory.peak does not exist" in m and "cgroup_mem_peak_bytes not recorded" in m for m in notes)
    assert v["cgroup_mem_limit_bytes"] == 640 * MIB


def test_garbage_and_limit_below_usage_are_one_line_notes(tmp_path: Path) -> None:
    ctr = v2_tree(tmp_path, leaf_max=str(400 * MIB), current=450 * MIB)
    (ctr / "memory.stat").write_text("anon lots\n")
    (ctr / "cpu.max").write_text("\x00\x01binary")
    p = CgroupProbe(PID, root=str(tmp_path), slow_every_s=0.0)
    v = p.sample(0.0).values
    assert v["cgroup_mem_limit_bytes"] == 400 * MIB
    assert v["cgroup_mem_anon_bytes"] is None and v["cgroup_mem_working_set_bytes"] == 450 * MIB
    assert v["cgroup_cpu_limit_ratio"] == 2.0  # the garbled leaf is skipped, the pod's quota stands
    notes = [m for m, _ in p.take_notes()]
    assert any("memory.stat: unreadable content" in m for m in notes)
    assert any("cpu.max: unreadable content" in m for m in notes)
    assert any("memory limit 400 MiB is below its usage 450 MiB" in m for m in notes)
    assert all("\n" not in m for m in notes)
    p.sample(0.1)
    assert p.take_notes() == []  # said once, not every tick
    (ctr / "memory.current").write_text("not a number\n")
    assert p.sample(0.2).values["cgroup_mem_usage_bytes"] is None
    assert any("memory.current" in m for m, _ in p.take_notes())


def test_cgroup_outside_the_namespace_is_a_reason(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    write(tmp_path, f"/proc/{PID}/cgroup", "0::/../../kubepods/pod2/other\n")
    p = CgroupProbe(PID, root=str(tmp_path))
    assert "outside this cgroup namespace (another container)" in (p.available() or "")
    gone = CgroupProbe(PID + 1, root=str(tmp_path))
    assert gone.available() == f"process {PID + 1} does not exist"
    none = CgroupProbe(PID, root=str(tmp_path / "nowhere"))
    assert "no cgroups here" in (none.available() or "")
    assert CgroupProbe(None).available() is not None


def test_discover_registers_it() -> None:
    probes, statuses = discover([os.getpid()])
    names = [s.name for s in statuses]
    assert "cgroup" in names
    for p in probes:
        p.close()


# -- real cgroups ----------------------------------------------------------------------------------------
@pytest.fixture
def v1() -> Iterator[V1Memory]:
    h = V1Memory.get()
    try:
        yield h
    finally:
        h.cleanup()


ALLOC = (
    "import sys,time; b=bytearray(int(sys.argv[1])); b[::4096]=b'x'*len(b[::4096]); print('ok',flush=True); "
    "time.sleep(600)"
)


def test_real_v1_readings_match_the_kernel(v1: V1Memory) -> None:
    cg = v1.make(memory__limit_in_bytes=256 * MIB)
    proc = v1.popen(cg, [sys.executable, "-c", ALLOC, str(64 * MIB)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ok"
        p = CgroupProbe(proc.pid)
        assert p.available() is None and p.loc.memory is not None and p.loc.memory.dir == str(cg)
        v = p.sample(0.0).values
        k = kernel_v1(cg)
        assert v["cgroup_mem_limit_bytes"] == 256 * MIB
        assert v["cgroup_mem_usage_bytes"] == pytest.approx(k["usage"], rel=0.02)
        assert v["cgroup_mem_usage_bytes"] >= 64 * MIB
        ws = k["usage"] - k["total_inactive_file"]
        assert v["cgroup_mem_working_set_bytes"] == pytest.approx(ws, rel=0.02)
        assert v["cgroup_mem_anon_bytes"] == pytest.approx(k["total_rss"], rel=0.02)
        assert v["cgroup_oom_kills_total"] == 0
        assert v["cgroup_mem_peak_bytes"] >= v["cgroup_mem_usage_bytes"] * 0.98
        p.close()
    finally:
        proc.kill()
        proc.wait()


def test_real_limit_on_the_parent_process_in_an_unlimited_child(v1: V1Memory) -> None:
    parent = v1.make(memory__limit_in_bytes=300 * MIB)
    child = v1.make(parent)
    assert int((child / "memory.limit_in_bytes").read_text()) >= 1 << 62  # the leaf itself reads unlimited
    with sleeper() as proc:
        v1.add(child, proc.pid)
        p = CgroupProbe(proc.pid)
        v = p.sample(0.0).values
        assert v["cgroup_mem_limit_bytes"] == 300 * MIB
        p.close()


def test_real_cgroup_removed_while_sampled_then_found_again(v1: V1Memory) -> None:
    a = v1.make(memory__limit_in_bytes=200 * MIB)
    b = v1.make(memory__limit_in_bytes=220 * MIB)
    with sleeper() as proc:
        v1.add(a, proc.pid)
        p = CgroupProbe(proc.pid, slow_every_s=0.0)
        assert p.sample(0.0).values["cgroup_mem_limit_bytes"] == 200 * MIB
        v1.add(b, proc.pid)  # moved, then its old cgroup removed (as a runtime does)
        a.rmdir()
        v = p.sample(0.1).values
        assert v["cgroup_mem_usage_bytes"] is None
        notes = [m for m, _ in p.take_notes()]
        assert any("vanished while sampled" in m for m in notes)
        s = p.sample(0.2)  # looked up again: the process's new cgroup
        assert s.values["cgroup_mem_limit_bytes"] == 220 * MIB and s.values["cgroup_mem_usage_bytes"] is not None
        assert [e.kind for e in s.events] == ["cgroup"]
        assert any(b.name in m for m, _ in p.take_notes())
        p.close()


def test_real_v2_per_cgroup_pressure_in_a_child_of_the_unified_mount() -> None:
    h = Unified.get()
    try:
        cg = h.make()
        if not (cg / "memory.pressure").exists():
            pytest.skip("this kernel has no per-cgroup PSI (memory.pressure)")
        with sleeper() as proc:
            h.add(cg, proc.pid)
            p = CgroupProbe(proc.pid)
            assert not p.psi_host_wide
            v = p.sample(0.0).values
            assert v["cgroup_mem_pressure_some_ratio"] == 0.0 and v["cgroup_cpu_pressure_some_ratio"] is not None
            assert "sys_mem_pressure_some_ratio" not in v
            p.close()
    finally:
        h.cleanup()


def test_tuner_probes_names_the_cgroup_and_the_binding_limit(v1: V1Memory) -> None:
    cg = v1.make(memory__limit_in_bytes=200 * MIB)
    with sleeper() as proc:
        v1.add(cg, proc.pid)
        cp = subprocess.run(
            [sys.executable, "-m", "tuner", "probes", "--pid", str(proc.pid)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        assert cp.returncode == 0, cp.stderr
        out = cp.stdout
        assert "cgroup     ok  cgroup " in out and cg.name in out and "memory v1" in out
        assert "pressure host-wide" in out and "not read: cgroup_mem_high_bytes" in out
        lines = out.split("memory limits (tightest first; the first one binds):\n")[1].splitlines()
        assert lines[0].strip().startswith("cgroup ") and "of 200 MiB" in lines[0], out
        js = subprocess.run(
            [sys.executable, "-m", "tuner", "probes", "--pid", str(proc.pid), "--json"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        data = json.loads(js.stdout)
        assert data["memory_limits"]["binding"].startswith("cgroup ")
        cgp = next(p for p in data["probes"] if p["name"] == "cgroup")
        assert cgp["detail"]["memory"]["version"] == 1 and cgp["detail"]["memory"]["dir"] == str(cg)


def test_tuner_probes_from_another_cgroup_namespace_says_why(v1: V1Memory) -> None:
    """The tuner in a cgroup namespace rooted below the watched process's cgroup (another container's view):
    ``tuner probes --pid`` says the process's cgroup cannot be read from here, and goes on."""
    if subprocess.run(["unshare", "--help"], capture_output=True).returncode != 0:
        pytest.skip("no unshare(1)")
    inner = v1.make()
    with sleeper() as proc:  # in this test's own cgroup, the parent of ``inner``
        shell = f'echo $$ > "{inner}/cgroup.procs" && exec unshare -C "$@"'
        cp = subprocess.run(
            ["sh", "-c", shell, "sh", sys.executable, "-m", "tuner", "probes", "--pid", str(proc.pid)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        if "unshare failed" in cp.stderr or "Operation not permitted" in cp.stderr:
            pytest.skip(f"cannot make a cgroup namespace here: {cp.stderr.strip()}")
        assert cp.returncode == 0, cp.stderr
        assert "outside this cgroup namespace (another container)" in cp.stdout, cp.stdout


def test_a_run_in_a_limited_cgroup_reports_and_shows_the_binding_limit(v1: V1Memory, tmp_path: Path) -> None:
    """``tuner run`` inside a 300 MiB cgroup: the trace names the cgroup, ``tuner report`` says the cgroup's
    limit binds (not the host's 23 GiB) and the live view's header says so too."""
    from tuner.trace import iter_records
    from tuner.tui.model import Model

    cg = v1.make(memory__limit_in_bytes=300 * MIB)
    trace = tmp_path / "t.jsonl"
    run = v1.popen(cg, [sys.executable, "-m", "tuner", "run", "--headless", "--quiet", "--trace", str(trace), "--",
                        sys.executable, "-c", ALLOC.replace("600", "1.5"), str(64 * MIB)],
                   env=ENV, stdout=subprocess.DEVNULL)  # fmt: skip
    assert run.wait(timeout=120) == 0
    cp = subprocess.run([sys.executable, "-m", "tuner", "report", str(trace)], capture_output=True, text=True,
                        env=ENV, timeout=120)  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("memory "))
    assert line.startswith("memory    cgroup /") and cg.name in line and "of 300 MiB at the end" in line, line
    m = Model()
    m.apply_many(iter_records(str(trace)))
    shown = m.memory_line(m.last_t) or ""
    assert shown.startswith("memory: cgroup /") and cg.name in shown and "of 300 MiB" in shown, shown


def test_a_cgroup_removed_under_a_recording_is_a_note_and_sampling_goes_on(v1: V1Memory, tmp_path: Path) -> None:
    """``tuner attach`` to a process whose runtime moves it to a new cgroup and removes the old one: the trace
    says so in one line each, and the ticks go on with the new cgroup's limit."""
    from tuner.trace import iter_records

    a = v1.make(memory__limit_in_bytes=200 * MIB)
    b = v1.make(memory__limit_in_bytes=220 * MIB)
    trace = tmp_path / "moved.jsonl"
    with sleeper() as proc:
        v1.add(a, proc.pid)
        rec = subprocess.Popen([sys.executable, "-m", "tuner", "attach", "--quiet", "--headless", "--trace",
                                str(trace), str(proc.pid)], env=ENV)  # fmt: skip

        def ticks() -> list[dict]:
            return [r for r in iter_records(str(trace)) if r.get("k") == "tick"] if trace.exists() else []

        deadline = time.monotonic() + 60
        while not any((r["m"].get("cgroup_mem_limit_bytes") == 200 * MIB) for r in ticks()):
            assert time.monotonic() < deadline, "no tick with the first cgroup's limit"
            time.sleep(0.2)
        v1.add(b, proc.pid)
        a.rmdir()
        while not any((r["m"].get("cgroup_mem_limit_bytes") == 220 * MIB) for r in ticks()):
            assert time.monotonic() < deadline, "no tick with the new cgroup's limit"
            time.sleep(0.2)
        proc.kill()
        assert rec.wait(timeout=60) == 0
    notes = [r["msg"] for r in iter_records(str(trace)) if r.get("k") == "note"]
    assert any("vanished while sampled" in n for n in notes), notes
    assert any("is now" in n and b.name in n for n in notes), notes
    assert all("\n" not in n for n in notes)
    events = [r for r in iter_records(str(trace)) if r.get("k") == "event" and r.get("kind") == "cgroup"]
    assert [e["data"]["memory"]["path"].rsplit("/", 1)[1] for e in events] == [a.name, b.name]
