"""The nvidia probe against a fake pynvml (real exception classes and structs) and the real one here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pynvml
import pytest

from tests.fakes.fake_pynvml import FakeGpu, GiB, MiB, a100_80gb, make_fake_pynvml, rtx_4090
from tuner.core.sampler import Sampler
from tuner.probes.base import Probe
from tuner.probes.nvidia import DEVICE_METRICS, TREE_METRICS, NvidiaProbe

ME = os.getpid()


@pytest.fixture
def child() -> Iterator[int]:
    """A live process of our own tree (a worker the server forked)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _probe(*gpus: FakeGpu, tree: Sequence[int] = (ME,), **kw: Any) -> NvidiaProbe:
    nvml = make_fake_pynvml(gpus, **kw)
    return NvidiaProbe(tree, nvml=nvml)


# -- unavailable ----------------------------------------------------------------------------------------
def test_library_not_found_is_a_reason_not_an_error() -> None:
    nvml = make_fake_pynvml([], init_error=pynvml.NVMLError_LibraryNotFound)
    p = NvidiaProbe([ME], nvml=nvml)
    assert p.available() == "no NVIDIA driver (libnvidia-ml.so not found)"
    assert p.available() == "no NVIDIA driver (libnvidia-ml.so not found)"
    assert nvml.calls["nvmlInit"] == 1  # the verdict is cached
    assert p.metrics() == {}
    assert p.sample(1.0).values == {}
    p.close()
    assert nvml.calls["nvmlShutdown"] == 0  # never initialised: nothing to shut down


def test_no_permission_is_a_reason() -> None:
    p = NvidiaProbe(nvml=make_fake_pynvml([a100_80gb()], init_error=pynvml.NVMLError_NoPermission))
    reason = p.available()
    assert reason is not None and "permission" in reason and "\n" not in reason


def test_driver_not_loaded_and_zero_devices_are_reasons() -> None:
    p = NvidiaProbe(nvml=make_fake_pynvml([], init_error=pynvml.NVMLError_DriverNotLoaded))
    assert p.available() == "NVIDIA driver not loaded (nvmlInit: Driver Not Loaded)"
    nvml = make_fake_pynvml([])
    p = NvidiaProbe(nvml=nvml)
    assert p.available() == "no NVIDIA GPU found (driver loaded, 0 devices)"
    assert nvml.state["init"] == 0 and nvml.calls["nvmlShutdown"] == 1  # init undone


def test_every_device_lost_at_start_is_a_reason() -> None:
    p = _probe(a100_80gb(lost_after=0))
    p._nvml.nvmlDeviceGetHandleByIndex = lambda i: (_ for _ in ()).throw(pynvml.NVMLError_GpuIsLost())  # type: ignore[union-attr]
    assert p.available() == "no usable NVIDIA GPU (GPU 0: GPU is lost)"


def test_real_pynvml_without_a_gpu_gives_a_reason_and_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    p = NvidiaProbe([ME])
    reason = p.available()
    if reason is None:
        pytest.skip("this machine has an NVIDIA GPU")
    p.close()
    out, err = capfd.readouterr()
    assert reason == "no NVIDIA driver (libnvidia-ml.so not found)"
    assert out == "" and err == ""
    assert isinstance(p, Probe)


# -- readings -------------------------------------------------------------------------------------------
def test_two_devices_report_realistic_values() -> None:
    p = _probe(a100_80gb(), rtx_4090())
    assert p.available() is None
    keys = p.metrics()
    assert keys["gpu_mem_used_bytes/0"] == "bytes" and keys["gpu_sm_clock_hertz/1"] == "hertz"
    assert keys["gpu_tree_mem_bytes/1"] == "bytes" and len(keys) == 2 * (len(DEVICE_METRICS) + len(TREE_METRICS))
    s = p.sample(0.5)
    v = s.values
    assert set(v) == set(keys)  # the first tick reads every cadence
    assert v["gpu_mem_total_bytes/0"] == 81920 * MiB
    assert v["gpu_mem_reserved_bytes/0"] == 559 * MiB
    assert v["gpu_mem_used_bytes/0"] == 61234 * MiB
    assert v["gpu_util_ratio/0"] == pytest.approx(0.87)
    assert v["gpu_mem_util_ratio/0"] == pytest.approx(0.43)
    assert v["gpu_temp_celsius/0"] == 54.0
    assert v["gpu_power_watts/0"] == pytest.approx(312.456)
    assert v["gpu_sm_clock_hertz/0"] == 1410e6
    assert v["gpu_mem_total_bytes/1"] == 24564 * MiB
    assert v["gpu_power_watts/1"] == pytest.approx(287.12)
    assert v["gpu_sm_clock_hertz/1"] == 2520e6
    assert v["gpu_tree_mem_bytes/0"] == 0.0 and v["gpu_tree_sm_ratio/1"] == 0.0  # nothing of ours runs there
    assert v["gpu_tree_procs/0"] == 0.0 and v["gpu_other_procs/0"] == 0.0
    assert v["gpu_energy_joules_total/0"] == pytest.approx(1_234_567.0, abs=50.0)
    assert v["gpu_power_limit_watts/0"] == 400.0 and v["gpu_power_limit_watts/1"] == 450.0
    assert v["gpu_mem_clock_hertz/1"] == 10501e6 and v["gpu_sm_clock_max_hertz/1"] == 3120e6
    assert v["gpu_clock_event_reasons/0"] == 0.0 and v["gpu_pstate/0"] == 0.0
    assert v["gpu_ecc_corrected_errors_total/0"] == 0.0 and v["gpu_remapped_rows_total/0"] == 0.0
    assert v["gpu_pcie_tx_bytes_per_second/0"] is None  # a rate needs two readings of the counters
    assert v["gpu_xid_errors_total/0"] == 0.0
    assert s.events == ()
    assert p.unsupported == {
        "gpu_retired_pages_total/0": "Not Supported (NVML, GPU 0)",  # Ampere remaps rows instead
        "gpu_ecc_corrected_errors_total/1": "Not Supported (NVML, GPU 1)",  # a GeForce card has no ECC
        "gpu_ecc_uncorrected_errors_total/1": "Not Supported (NVML, GPU 1)",
        "gpu_retired_pages_total/1": "Not Supported (NVML, GPU 1)",
        "gpu_remapped_rows_total/1": "Not Supported (NVML, GPU 1)",
        "gpu_nvlink_tx_bytes_per_second/1": "no NVLink on this device (GPU 1)",
        "gpu_nvlink_rx_bytes_per_second/1": "no NVLink on this device (GPU 1)",
    }
    p.close()
    assert p._nvml.state["init"] == 0  # type: ignore[union-attr]


def test_tree_attribution_counts_only_the_trees_pids(child: int) -> None:
    gpu = a100_80gb(
        processes=[(ME, 20 * GiB), (child, 10 * GiB), (1, 30 * GiB)],
        sm_util={ME: 40, child: 25, 1: 30},
    )
    tree = [ME, child]
    p = NvidiaProbe(lambda: tree, nvml=make_fake_pynvml([gpu]))
    assert p.available() is None
    s = p.sample(1.0)
    assert s.values["gpu_tree_mem_bytes/0"] == 30 * GiB
    assert s.values["gpu_tree_sm_ratio/0"] == pytest.approx(0.65)
    assert s.procs == {
        ME: {"gpu_mem_bytes/0": 20 * GiB, "gpu_sm_ratio/0": 0.40},
        child: {"gpu_mem_bytes/0": 10 * GiB, "gpu_sm_ratio/0": 0.25},
    }
    assert p.proc_version == "v3"
    tree.remove(child)  # the worker left the tree: the callable is asked every tick
    s = p.sample(1.1)
    assert s.values["gpu_tree_mem_bytes/0"] == 20 * GiB
    assert s.procs is not None and set(s.procs) == {ME}


def test_no_utilization_samples_means_zero_share() -> None:
    p = _probe(a100_80gb(processes=[(ME, 4 * GiB)], sm_util={}))
    assert p.available() is None
    v = p.sample(0.1).values
    assert v["gpu_tree_sm_ratio/0"] == 0.0  # NVML answered NotFound: nobody used the SMs in the window
    assert v["gpu_tree_mem_bytes/0"] == 4 * GiB
    assert not any(k.startswith("gpu_tree") for k in p.unsupported)


def test_old_binding_without_v3_uses_v2() -> None:
    p = _probe(a100_80gb(processes=[(ME, 3 * GiB)]), binding_has_v3=False)
    assert p.available() is None
    assert p.sample(0.1).values["gpu_tree_mem_bytes/0"] == 3 * GiB
    assert p.proc_version == "v2"


def test_driver_without_v3_symbol_falls_back_to_v2() -> None:
    p = _probe(a100_80gb(processes=[(ME, 3 * GiB)]), driver_proc_versions=("v2", "v1"))
    assert p.available() is None
    assert p.sample(0.1).values["gpu_tree_mem_bytes/0"] == 3 * GiB
    assert p.proc_version == "v2"
    p.sample(0.2)
    assert p._nvml.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 1  # type: ignore[union-attr]  # probed once


def test_scrambled_pids_from_a_skewed_driver_fall_back_to_v1(child: int) -> None:
    # The driver fills v1 structs into the binding's v3/v2 array: the second record's PID comes out as
    # the low half of the first's... memory; plausibility checks catch it and the raw v1 call is right.
    gpu = a100_80gb(processes=[(ME, 6 * GiB), (child, 1536 * MiB)])
    p = NvidiaProbe([ME, child], nvml=make_fake_pynvml([gpu], driver_writes_v1_layout=True, raw_v1=True))
    assert p.available() is None
    s = p.sample(0.1)
    assert p.proc_version == "v1"
    assert s.values["gpu_tree_mem_bytes/0"] == 6 * GiB + 1536 * MiB
    assert s.procs is not None and s.procs[child]["gpu_mem_bytes/0"] == 1536 * MiB
    assert p.sample(0.2).values["gpu_tree_mem_bytes/0"] == 6 * GiB + 1536 * MiB


def test_scrambled_everywhere_is_unsupported_not_wrong(child: int) -> None:
    gpu = a100_80gb(processes=[(ME, 6 * GiB), (child, 1536 * MiB)])
    p = NvidiaProbe([ME, child], nvml=make_fake_pynvml([gpu], driver_writes_v1_layout=True))
    assert p.available() is None
    assert p.sample(0.1).values["gpu_tree_mem_bytes/0"] is None
    assert "v3 absurd" in p.unsupported["gpu_tree_mem_bytes/0"]
    assert p.proc_version is None


def test_pids_not_alive_here_keep_the_newest_version() -> None:
    # Inside a container NVML reports host PIDs; they are plausible but not ours to see.
    dead = _dead_pid()
    p = _probe(a100_80gb(processes=[(dead, 2 * GiB)]), tree=[dead])
    assert p.available() is None
    assert p.sample(0.1).values["gpu_tree_mem_bytes/0"] == 2 * GiB
    assert p.proc_version == "v3" and p.proc_note is not None and "not alive" in p.proc_note


def test_memory_v1_driver_has_no_reserved_figure() -> None:
    p = _probe(rtx_4090(), driver_has_memory_v2=False)
    assert p.available() is None
    v = p.sample(0.1).values
    assert v["gpu_mem_reserved_bytes/0"] is None
    assert v["gpu_mem_used_bytes/0"] == (18022 + 331) * MiB  # v1's used includes the reserved part
    assert v["gpu_mem_total_bytes/0"] == 24564 * MiB
    assert "nvmlDeviceGetMemoryInfo_v2" in p.unsupported["gpu_mem_reserved_bytes/0"]


# -- faults mid-run -------------------------------------------------------------------------------------
def test_not_supported_is_none_with_a_reason_and_not_retried() -> None:
    p = _probe(a100_80gb(mig=True, processes=[(ME, 5 * GiB)], sm_util={ME: 50}), rtx_4090())
    assert p.available() is None
    for k in range(5):
        v = p.sample(0.1 * k).values
        assert v["gpu_util_ratio/0"] is None and v["gpu_mem_util_ratio/0"] is None
        assert v["gpu_tree_sm_ratio/0"] is None
        assert v["gpu_tree_mem_bytes/0"] is None  # MIG: per-process memory is not available
        assert v["gpu_mem_used_bytes/0"] == 61234 * MiB and v["gpu_temp_celsius/0"] == 54.0
        assert v["gpu_util_ratio/1"] == pytest.approx(0.62)
    nvml = p._nvml
    assert nvml.calls["nvmlDeviceGetUtilizationRates"] == 1 + 5  # type: ignore[union-attr]  # GPU 0 once, GPU 1 each tick
    assert nvml.calls["nvmlDeviceGetProcessUtilization"] == 1  # type: ignore[union-attr]  # GPU 1 runs none of ours
    assert p.unsupported["gpu_util_ratio/0"] == "Not Supported (NVML, GPU 0)"
    assert p.unsupported["gpu_mem_util_ratio/0"] == "Not Supported (NVML, GPU 0)"
    assert "gpu_tree_sm_ratio/0" in p.unsupported
    assert not any(k.endswith("/1") and "util" in k for k in p.unsupported)


def test_gpu_lost_mid_run_is_one_event_then_none() -> None:
    a100, rtx = a100_80gb(processes=[(ME, 1 * GiB)]), rtx_4090(processes=[(ME, 2 * GiB)], lost_after=40)
    p = _probe(a100, rtx)
    assert p.available() is None
    samples = [p.sample(0.1 * k) for k in range(6)]
    events = [e for s in samples for e in s.events if e.kind == "device_lost"]
    assert len(events) == 1
    lost = events[0]
    assert lost.kind == "device_lost" and lost.data == {"device": 1, "error": "GPU is lost"}
    first = next(k for k, s in enumerate(samples) if any(e.kind == "device_lost" for e in s.events))
    assert samples[0].values["gpu_power_watts/1"] == pytest.approx(287.12)
    for s in samples[first:]:
        assert all(v is None for k, v in s.values.items() if k.endswith("/1") and "xid" not in k)
        assert s.values["gpu_power_watts/0"] == pytest.approx(312.456)
        assert s.values["gpu_tree_mem_bytes/0"] == 1 * GiB
    calls_when_lost = rtx.calls
    p.sample(1.0)
    assert rtx.calls == calls_when_lost  # a lost device is not asked again


def test_values_flow_through_the_sampler() -> None:
    p = _probe(a100_80gb(processes=[(ME, 7 * GiB)], sm_util={ME: 90}))
    assert p.available() is None
    tick = Sampler([p], interval=0.1, t0=0.0, clock=lambda: 2.0).tick()
    assert tick.values["gpu_tree_mem_bytes/0"] == 7 * GiB
    assert tick.values["gpu_tree_sm_ratio/0"] == pytest.approx(0.9)
    assert tick.procs[ME]["gpu_mem_bytes/0"] == 7 * GiB
    assert "probe_cost_seconds/nvidia" in tick.values


def test_without_a_tree_only_device_values() -> None:
    p = NvidiaProbe(nvml=make_fake_pynvml([a100_80gb(processes=[(ME, GiB)])]))
    assert p.available() is None
    s = p.sample(0.0)
    assert not any("tree" in k for k in s.values) and s.procs is None
    assert not any("tree" in k for k in p.metrics())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_unknown_error_on_a_handle_counts_as_lost() -> None:
    gpu = a100_80gb()
    p = _probe(gpu)
    assert p.available() is None
    assert p.sample(0.0).values["gpu_temp_celsius/0"] == 54.0

    def broken(handle: object) -> int:
        raise pynvml.NVMLError_Unknown()

    p._nvml.nvmlDeviceGetPowerUsage = broken  # type: ignore[union-attr]
    s = p.sample(0.1)
    assert [(e.kind, e.data["error"]) for e in s.events] == [("device_lost", "Unknown Error")]
    assert all(v is None for k, v in s.values.items() if "xid" not in k)  # the XID count is the probe's own
    assert p.sample(0.2).events == ()


def test_not_supported_appearing_mid_run() -> None:
    gpu = rtx_4090(processes=[(ME, 2 * GiB)], sm_util={ME: 30})
    p = _probe(gpu)
    assert p.available() is None
    v = p.sample(0.0).values
    assert v["gpu_util_ratio/0"] == pytest.approx(0.62) and v["gpu_tree_sm_ratio/0"] == pytest.approx(0.3)
    gpu.mig = True  # an administrator switched MIG on under us
    for k in range(3):
        v = p.sample(0.1 * (k + 1)).values
        assert v["gpu_util_ratio/0"] is None and v["gpu_tree_sm_ratio/0"] is None
        assert v["gpu_power_watts/0"] == pytest.approx(287.12)
    assert p.unsupported["gpu_util_ratio/0"] == "Not Supported (NVML, GPU 0)"
    assert p._nvml.calls["nvmlDeviceGetUtilizationRates"] == 2  # type: ignore[union-attr]


def test_memory_info_without_permission_is_not_retried() -> None:
    gpu = a100_80gb()
    p = _probe(gpu)
    assert p.available() is None

    asked: list[int | None] = []

    def denied(handle: object, version: int | None = None) -> object:
        asked.append(version)
        raise pynvml.NVMLError_NoPermission()

    p._nvml.nvmlDeviceGetMemoryInfo = denied  # type: ignore[union-attr]
    for k in range(3):
        v = p.sample(0.1 * k).values
        assert v["gpu_mem_used_bytes/0"] is None and v["gpu_mem_total_bytes/0"] is None
        assert v["gpu_temp_celsius/0"] == 54.0
    assert p.unsupported["gpu_mem_used_bytes/0"] == "Insufficient Permissions (NVML, GPU 0)"
    assert asked == [pynvml.nvmlMemory_v2]  # asked once (v2), then skipped
