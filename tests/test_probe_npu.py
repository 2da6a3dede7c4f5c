"""NPU probes: the npu-smi parser on captured real output, the Ascend probe's reader thread, and the
Intel probe on a fake sysfs tree."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tuner.probes.base import Probe
from tuner.probes.npu import MB, AscendNpuProbe, IntelNpuProbe, NpuSmiError, parse_info, parse_usages
from tuner.records import Sample

DATA = Path(__file__).parent / "data" / "npu-smi"
BUSY = (DATA / "info-910B2C-24.1.rc1-busy.txt").read_text()
THREE = (DATA / "info-910B3-24.1.rc1-3dev.txt").read_text()
WITH_PROCESS = (DATA / "info-910B3-with-process.txt").read_text()
IDLE = (DATA / "info-910B4-26.0.rc1-idle.txt").read_text()


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


# -- parser on every captured file ------------------------------------------------------------------------
def test_every_captured_file_is_covered() -> None:
    assert sorted(p.name for p in DATA.glob("*.txt")) == [
        "info-910B2C-24.1.rc1-busy.txt",
        "info-910B3-24.1.rc1-3dev.txt",
        "info-910B3-with-process.txt",
        "info-910B4-26.0.rc1-idle.txt",
    ]


def _rows(
    text: str,
) -> list[tuple[int, str, str, float | None, float | None, float | None, float | None, float | None]]:
    info = parse_info(text)
    return [
        (n.npu, n.name, n.health, n.power_w, n.temp_c, n.aicore_pct, n.mem_used_mb, n.mem_total_mb)
        for n in info.npus.values()
    ]


def test_parse_910b2c_busy_no_space_before_slash() -> None:
    assert _rows(BUSY) == [
        (0, "910B2C", "OK", 86.8, 35.0, 0.0, 59356.0, 65536.0),
        (1, "910B2C", "OK", 103.1, 37.0, 0.0, 59351.0, 65536.0),
        (2, "910B2C", "OK", 94.0, 36.0, 0.0, 59351.0, 65536.0),
    ]
    info = parse_info(BUSY)
    assert [c.bus_id for n in info.npus.values() for c in n.chips] == ["0000:66:00.0", "0000:19:00.0", "0000:52:00.0"]
    assert info.processes == []


def test_parse_910b3_three_devices() -> None:
    assert _rows(THREE) == [
        (0, "910B3", "OK", 101.8, 43.0, 0.0, 3318.0, 65536.0),
        (1, "910B3", "OK", 92.0, 39.0, 0.0, 3314.0, 65536.0),
        (2, "910B3", "OK", 102.0, 40.0, 0.0, 3314.0, 65536.0),
    ]
    assert [c.bus_id for n in parse_info(THREE).npus.values() for c in n.chips] == [
        "0000:C1:00.0",
        "0000:C2:00.0",
        "0000:81:00.0",
    ]


def test_parse_fragment_without_frames_and_with_a_process() -> None:
    assert _rows(WITH_PROCESS) == [
        (0, "910B3", "OK", 90.7, 37.0, 7.0, 53984.0, 65536.0),
        (1, "910B3", "OK", 96.9, 36.0, 42.0, 52314.0, 65536.0),
    ]
    (proc,) = parse_info(WITH_PROCESS).processes
    assert (proc.npu, proc.chip, proc.pid, proc.name, proc.mem_mb) == (0, 0, 1712733, "sglangschedul", 48954.0)


def test_parse_910b4_idle_with_empty_process_table() -> None:
    assert _rows(IDLE) == [(0, "910B4", "OK", 82.6, 32.0, 0.0, 2871.0, 32768.0)]
    assert parse_info(IDLE).processes == []


# -- malformed output -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no NPU rows found"),
        ("command not found\n", "no NPU rows found"),
        (BUSY[: BUSY.index("| 0                         | 0000:52")], "NPU 2 has no chip row"),
        (BUSY[: BUSY.index("59351/ 65536         |\n+===", BUSY.index("0000:52")) + 4], "not 'used / total'"),
        (BUSY[: BUSY.index("0          59351/ 65536         |\n+===", BUSY.index("0000:52")) + 3], "no HBM value"),
        (BUSY.replace("86.8", "8x.8"), "Power(W) is '8x.8', not a number"),
        (BUSY.replace("| OK            | 86.8", "| OK | 86.8 | 9"), "expected 3 columns"),
        ("\n".join(BUSY.splitlines()[5:]), "before the table's headings"),
        (WITH_PROCESS.replace("1712733", "17x2733"), "is not 'NPU Chip | PID'"),
        (THREE.replace("| 1     910B3 ", "| 0     910B3 "), "NPU 0 listed twice"),
    ],
)
def test_malformed_or_truncated_output_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(NpuSmiError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_info(text)
    assert "\n" not in str(caught.value)


def test_parse_usages() -> None:
    # The key : value shape of `npu-smi info -t usages -i N` (no capture of it in tests/data yet).
    text = """
        NPU ID                         : 0
        Chip Count                     : 1

        HBM Capacity(MB)               : 65536
        HBM Usage Rate(%)              : 86
        Aicore Usage Rate(%)           : 57
        Aivector Usage Rate(%)         : 0
        Aicpu Usage Rate(%)            : NA
        Chip ID                        : 0
    """
    u = parse_usages(text)
    assert u["Aicore Usage Rate(%)"] == 57.0 and u["HBM Capacity(MB)"] == 65536.0 and u["Aicpu Usage Rate(%)"] is None
    with pytest.raises(NpuSmiError):
        parse_usages("garbage\n")


# -- the Ascend probe -------------------------------------------------------------------------------------
class FakeNpuSmi:
    """Stands in for running npu-smi: returns a captured output, or fails/blocks on demand."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.calls: list[list[str]] = []
        self.fail: BaseException | None = None
        self.gate: threading.Event | None = None

    def __call__(self, cmd: list[str]) -> str:
        self.calls.append(cmd)
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return self.text


def _ascend(text: str, tree: list[int] | None = None, every_s: float = 0.01) -> tuple[AscendNpuProbe, FakeNpuSmi]:
    run = FakeNpuSmi(text)
    p = AscendNpuProbe(tree, run=run, which=lambda name: "/usr/local/bin/npu-smi", every_s=every_s)
    return p, run


def test_no_npu_smi_on_path_is_a_reason() -> None:
    p = AscendNpuProbe(which=lambda name: None)
    assert p.available() == "no Ascend NPU (npu-smi not found on PATH)"
    assert p.metrics() == {} and p.sample(0.0).values == {}
    p.close()


def test_npu_smi_failing_at_start_is_a_reason() -> None:
    p, run = _ascend(BUSY)
    run.fail = subprocess.TimeoutExpired(["npu-smi", "info"], 5.0)
    assert p.available() == "npu-smi info failed: npu-smi did not answer within 5 s"
    p.close()


def test_values_from_the_table() -> None:
    p, run = _ascend(BUSY, tree=[os.getpid()])
    try:
        assert p.available() is None
        assert isinstance(p, Probe)
        keys = p.metrics()
        assert len(keys) == 3 * 6 and keys["npu_power_watts/2"] == "watts" and keys["npu_tree_mem_bytes/0"] == "bytes"
        v = p.sample(0.1).values
        assert set(v) == set(keys)
        assert v["npu_mem_used_bytes/0"] == 59356 * MB
        assert v["npu_mem_total_bytes/0"] == 65536 * MB
        assert v["npu_power_watts/1"] == 103.1 and v["npu_temp_celsius/1"] == 37.0
        assert v["npu_util_ratio/2"] == 0.0
        assert v["npu_tree_mem_bytes/0"] == 0.0
        assert run.calls[0] == ["/usr/local/bin/npu-smi", "info"]
    finally:
        p.close()


def test_tree_attribution_from_the_process_table() -> None:
    p, _ = _ascend(WITH_PROCESS, tree=[1712733, 42])
    try:
        assert p.available() is None
        s = p.sample(0.1)
        assert s.values["npu_tree_mem_bytes/0"] == 48954 * MB
        assert s.values["npu_tree_mem_bytes/1"] == 0.0
        assert s.values["npu_util_ratio/1"] == pytest.approx(0.42)
        assert s.procs == {1712733: {"npu_mem_bytes/0": 48954 * MB}}
    finally:
        p.close()
    p, _ = _ascend(WITH_PROCESS, tree=[42])
    try:
        assert p.available() is None
        s = p.sample(0.1)
        assert s.values["npu_tree_mem_bytes/0"] == 0.0 and s.procs is None
    finally:
        p.close()


def test_a_tick_never_waits_for_npu_smi() -> None:
    p, run = _ascend(IDLE, every_s=0.0)
    try:
        assert p.available() is None
        run.gate = threading.Event()  # from now on npu-smi hangs
        p.sample(0.0)  # starts the reader, which blocks in run()
        wait_for(lambda: len(run.calls) == 2)
        start = time.perf_counter()
        s = p.sample(0.1)
        cost = time.perf_counter() - start
        assert cost < 0.05  # the reader is stuck for up to 10 s
        assert s.values["npu_mem_used_bytes/0"] == 2871 * MB  # the last reading
    finally:
        assert run.gate is not None
        run.gate.set()
        p.close()


def test_runs_at_most_every_every_s() -> None:
    p, run = _ascend(IDLE, every_s=0.1)
    try:
        assert p.available() is None
        start = time.monotonic()
        for k in range(30):
            p.sample(0.01 * k)
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        runs = len(run.calls) - 1  # the first was the check in available()
        assert 1 <= runs <= elapsed / 0.1 + 1.5
    finally:
        p.close()


def _events(samples: list[Sample]) -> list[tuple[str, dict[str, object]]]:
    return [(e.kind, dict(e.data)) for s in samples for e in s.events]


def test_failures_make_values_none_with_one_event_then_recover() -> None:
    p, run = _ascend(BUSY)
    try:
        assert p.available() is None
        samples = [p.sample(0.0)]
        run.fail = subprocess.CalledProcessError(1, ["npu-smi", "info"])
        wait_for(lambda: p._failing is not None)
        n = len(run.calls)
        wait_for(lambda: len(run.calls) >= n + 3)  # it keeps failing
        samples += [p.sample(0.1), p.sample(0.2)]
        assert all(v is None for v in samples[-1].values.values())
        assert _events(samples) == [
            ("npu_smi_failed", {"error": "Command '['npu-smi', 'info']' returned non-zero exit status 1."})
        ]
        run.fail = None
        wait_for(lambda: p._failing is None)
        s = p.sample(0.3)
        assert [e.kind for e in s.events] == ["npu_smi_recovered"]
        assert s.values["npu_power_watts/0"] == 86.8
    finally:
        p.close()


def test_truncated_output_mid_run_is_reported_not_raised() -> None:
    p, run = _ascend(BUSY)
    try:
        assert p.available() is None
        assert p.sample(0.0).values["npu_power_watts/2"] == 94.0
        run.text = BUSY[: BUSY.index("| 0                         | 0000:52")]
        wait_for(lambda: p._failing is not None)
        s = p.sample(0.5)
        assert all(v is None for v in s.values.values())
        (event,) = s.events
        assert event.kind == "npu_smi_failed" and "NPU 2 has no chip row" in str(event.data["error"])
    finally:
        p.close()


def test_a_real_npu_smi_executable_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default runner, through a real subprocess: a stand-in `npu-smi` script found on PATH."""
    script = tmp_path / "npu-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{tmp_path}/broken" ]; then echo "dcmi module initialize failed. ret is -8005" >&2; exit 251; fi\n'
        f'[ "$1" = info ] && cat "{DATA / "info-910B3-with-process.txt"}"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    p = AscendNpuProbe([1712733], every_s=0.05)
    try:
        assert p.available() is None
        assert p.sample(0.0).values["npu_tree_mem_bytes/0"] == 48954 * MB
        (tmp_path / "broken").touch()
        wait_for(lambda: p._failing is not None)
        (event,) = p.sample(0.1).events
        assert event.data["error"] == (f"{script} info exited with 251: dcmi module initialize failed. ret is -8005")
    finally:
        p.close()
    (tmp_path / "broken").touch()
    p = AscendNpuProbe(every_s=0.05)
    assert (
        p.available()
        == f"npu-smi info failed: {script} info exited with 251: dcmi module initialize failed. ret is -8005"
    )


def test_usages_fill_in_a_missing_aicore_figure() -> None:
    table = IDLE.replace(
        "| 0                         | 0000:C1:00.0  | 0     ", "| 0                         | 0000:C1:00.0  | NA    "
    )
    run = FakeNpuSmi(table)

    def runner(cmd: list[str]) -> str:
        if cmd[1:] == ["info", "-t", "usages", "-i", "0"]:
            return "NPU ID : 0\nAicore Usage Rate(%) : 57\n"
        return run(cmd)

    p = AscendNpuProbe(run=runner, which=lambda name: "npu-smi", every_s=10)
    try:
        assert p.available() is None
        assert p.sample(0.0).values["npu_util_ratio/0"] == pytest.approx(0.57)
    finally:
        p.close()


# -- the Intel probe --------------------------------------------------------------------------------------
def _accel(root: Path, n: int, busy: int, mem: int | None = None) -> Path:
    dev = root / f"accel{n}" / "device"
    dev.mkdir(parents=True, exist_ok=True)
    (dev / "npu_busy_time_us").write_text(f"{busy}\n")
    if mem is not None:
        (dev / "npu_memory_utilization").write_text(f"{mem}\n")
    return dev


def test_intel_unavailable_without_sysfs_files(tmp_path: Path) -> None:
    p = IntelNpuProbe(str(tmp_path / "none"))
    reason = p.available()
    assert reason is not None and reason.startswith("no Intel NPU (") and "npu_busy_time_us" in reason
    (tmp_path / "accel0" / "device").mkdir(parents=True)  # a GPU-like accel device without the ivpu files
    assert IntelNpuProbe(str(tmp_path)).available() is not None
    assert p.metrics() == {} and p.sample(0.0).values == {}


def test_intel_garbage_counter_is_a_reason(tmp_path: Path) -> None:
    dev = _accel(tmp_path, 0, 0)
    (dev / "npu_busy_time_us").write_text("not a number\n")
    reason = IntelNpuProbe(str(tmp_path)).available()
    assert reason is not None and reason.startswith("Intel NPU unreadable (accel0:")


def test_intel_utilization_from_busy_time_deltas(tmp_path: Path) -> None:
    d0 = _accel(tmp_path, 0, 5_000_000, mem=512 * MB)
    d1 = _accel(tmp_path, 1, 0)  # an older kernel: no memory figure
    now = [100.0]
    p = IntelNpuProbe(str(tmp_path), every_s=0.0, clock=lambda: now[0])
    assert p.available() is None
    assert p.metrics() == {
        "npu_util_ratio/accel0": "ratio",
        "npu_mem_used_bytes/accel0": "bytes",
        "npu_util_ratio/accel1": "ratio",
    }
    v = p.sample(0.0).values
    assert v == {"npu_util_ratio/accel0": None, "npu_mem_used_bytes/accel0": 512 * MB, "npu_util_ratio/accel1": None}
    (d0 / "npu_busy_time_us").write_text("5250000\n")  # 0.25 s busy in 0.5 s
    (d0 / "npu_memory_utilization").write_text(f"{768 * MB}\n")
    (d1 / "npu_busy_time_us").write_text("500000\n")  # busy the whole 0.5 s
    now[0] = 100.5
    v = p.sample(0.5).values
    assert v["npu_util_ratio/accel0"] == pytest.approx(0.5)
    assert v["npu_util_ratio/accel1"] == pytest.approx(1.0)
    assert v["npu_mem_used_bytes/accel0"] == 768 * MB
    (d0 / "npu_busy_time_us").write_text("1000\n")  # the driver was reloaded: the counter restarted
    now[0] = 101.0
    assert p.sample(1.0).values["npu_util_ratio/accel0"] is None
    (d0 / "npu_busy_time_us").write_text("101000\n")
    now[0] = 101.5
    assert p.sample(1.5).values["npu_util_ratio/accel0"] == pytest.approx(0.2)
    p.close()


def test_intel_with_the_real_monotonic_clock(tmp_path: Path) -> None:
    dev = _accel(tmp_path, 0, 0)
    p = IntelNpuProbe(str(tmp_path), every_s=0.0)
    assert p.available() is None
    p.sample(0.0)
    start = time.monotonic()
    time.sleep(0.05)
    (dev / "npu_busy_time_us").write_text(f"{int((time.monotonic() - start) * 1e6 * 0.5)}\n")  # ~half busy
    ratio = p.sample(0.05).values["npu_util_ratio/accel0"]
    assert ratio is not None and 0.2 < ratio <= 0.51
    p.close()


def test_intel_reads_sysfs_at_most_every_every_s(tmp_path: Path) -> None:
    # The driver takes its job-submission lock to answer; it asks for reads about once a second.
    dev = _accel(tmp_path, 0, 0, mem=MB)
    now = [10.0]
    p = IntelNpuProbe(str(tmp_path), clock=lambda: now[0])
    assert p.available() is None
    p.sample(0.0)
    (dev / "npu_busy_time_us").write_text("300000\n")
    (dev / "npu_memory_utilization").write_text(f"{2 * MB}\n")
    now[0] = 10.5
    assert p.sample(0.5).values == {"npu_util_ratio/accel0": None, "npu_mem_used_bytes/accel0": MB}  # not re-read
    now[0] = 11.0
    assert p.sample(1.0).values == {"npu_util_ratio/accel0": pytest.approx(0.3), "npu_mem_used_bytes/accel0": 2 * MB}
    p.close()
