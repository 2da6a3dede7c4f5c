"""The fake NVML (``tests/fakes/fake_pynvml.py``) against the real binding: same signatures, same structs and
error classes, the binding's quirks reproduced — checked by running the *real* wrappers over a stub C
function where the quirk is the binding's own doing — and the faults the probe must survive."""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from tests.cli import tuner_env
from tests.fakes.fake_pynvml import FakeMig, GiB, MiB, a100_80gb, from_spec, h200, make_fake_pynvml, rtx_4090

SHIM = Path(__file__).parent / "fakes" / "nvml_shim"


def _started(*gpus: Any, **kw: Any) -> Any:
    nvml = make_fake_pynvml(gpus, **kw)
    nvml.nvmlInit()
    return nvml


# -- the same API as the binding ----------------------------------------------------------------------------
def test_every_fake_function_has_the_bindings_signature() -> None:
    nvml = make_fake_pynvml([a100_80gb()], raw_v1=True)
    checked = 0
    for name, fn in vars(nvml).items():
        if not name.startswith("nvml") or not callable(fn) or isinstance(fn, type):
            continue
        theirs = getattr(pynvml, name, None)
        assert theirs is not None, f"{name} is not in the real binding"
        if isinstance(theirs, type) or not callable(theirs):
            continue
        mine, real = inspect.signature(fn), inspect.signature(theirs)
        assert list(mine.parameters) == list(real.parameters), name
        for p, q in zip(mine.parameters.values(), real.parameters.values(), strict=True):
            assert (p.default is inspect.Parameter.empty) == (q.default is inspect.Parameter.empty), name
        checked += 1
    assert checked >= 45


def test_structs_handles_and_errors_are_the_bindings_own() -> None:
    nvml = _started(a100_80gb(), rtx_4090())
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(h, pynvml.c_nvmlDevice_t)
    assert isinstance(nvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2), pynvml.c_nvmlMemory_v2_t)
    pci = nvml.nvmlDeviceGetPciInfo(h)
    assert isinstance(pci, pynvml.nvmlPciInfo_t) and pci.busId == "00000000:17:00.0"  # decoded by _PrintableStructure
    assert isinstance(nvml.nvmlDeviceGetName(h), str) and nvml.nvmlDeviceGetUUID(h).startswith("GPU-")
    fields = nvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES])
    assert isinstance(fields[0], pynvml.c_nvmlFieldValue_t)
    assert nvml.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(2)
    is_mig = nvml.nvmlDeviceIsMigDeviceHandle(h)
    assert isinstance(is_mig, ctypes.c_uint) and not is_mig  # the binding hands back the c_uint itself


def test_uninitialized_before_init_and_after_shutdown() -> None:
    nvml = make_fake_pynvml([a100_80gb()])
    for call in (nvml.nvmlDeviceGetCount, nvml.nvmlSystemGetDriverVersion, lambda: nvml.nvmlDeviceGetHandleByIndex(0)):
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            call()
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetPowerUsage(h) == 312_456
    nvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetPowerUsage(h)


# -- the binding's quirks, shown on the real wrappers ----------------------------------------------------------
_UTIL_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong
)
_PROCS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p)


def test_real_binding_raises_nvmlerror_0_for_no_samples_and_the_fake_does_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_samples(handle: int, samples: int, count: Any, ts: int) -> int:
        count[0] = 0
        return pynvml.NVML_SUCCESS  # what the driver answers when it holds no sample

    c_fn = _UTIL_FN(no_samples)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lambda name: c_fn)
    with pytest.raises(pynvml.NVMLError) as real_exc:
        pynvml.nvmlDeviceGetProcessUtilization(None, 0)
    nvml = _started(a100_80gb(sm_util={}))
    with pytest.raises(pynvml.NVMLError) as fake_exc:
        nvml.nvmlDeviceGetProcessUtilization(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    for exc in (real_exc.value, fake_exc.value):
        assert type(exc) is pynvml.NVMLError and exc.value == 0  # the base class: no subclass for success


def test_real_binding_returns_an_empty_list_when_no_process_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def none_running(handle: int, count: Any, infos: int) -> int:
        count[0] = 0
        return pynvml.NVML_SUCCESS

    c_fn = _PROCS_FN(none_running)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lambda name: c_fn)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses_v3(None) == []
    assert pynvml.nvmlDeviceGetMPSComputeRunningProcesses_v3(None) == []
    nvml = _started(a100_80gb())
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(h) == []
    assert nvml.nvmlDeviceGetMPSComputeRunningProcesses_v3(h) == []


def test_real_binding_reports_field_errors_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    def fields(handle: int, n: int, values: int) -> int:
        arr = (pynvml.c_nvmlFieldValue_t * n).from_address(values)
        arr[0].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return pynvml.NVML_SUCCESS

    c_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p)(fields)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lambda name: c_fn)
    got = pynvml.nvmlDeviceGetFieldValues(None, [pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX])
    assert got[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED  # the call succeeded; the field did not
    nvml = _started(rtx_4090())  # no NVLink
    v = nvml.nvmlDeviceGetFieldValues(
        nvml.nvmlDeviceGetHandleByIndex(0),
        [pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES],
    )
    assert v[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED and v[1].nvmlReturn == pynvml.NVML_SUCCESS


def test_samples_older_than_the_timestamp_are_not_found() -> None:
    nvml = _started(a100_80gb(sm_util={1234: 50}))
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert [s.smUtil for s in nvml.nvmlDeviceGetProcessUtilization(h, 0)] == [50]
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetProcessUtilization(h, time.time_ns() // 1000)


def test_temperature_v_only_in_new_bindings_and_drivers() -> None:
    old = make_fake_pynvml([a100_80gb()], binding_has_temperature_v=False)
    assert not hasattr(old, "nvmlDeviceGetTemperatureV") and hasattr(pynvml, "nvmlDeviceGetTemperatureV")
    nvml = _started(a100_80gb(), driver_has_temperature_v=False)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetTemperatureV(nvml.nvmlDeviceGetHandleByIndex(0), pynvml.NVML_TEMPERATURE_GPU)


# -- what the devices report ------------------------------------------------------------------------------------
def test_energy_and_bus_counters_integrate_their_rates() -> None:
    gpu = a100_80gb(power_mw=300_000, pcie_tx_kbps=100_000)
    nvml = _started(gpu)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    fid = pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES
    energy, fields = nvml.nvmlDeviceGetTotalEnergyConsumption, nvml.nvmlDeviceGetFieldValues
    e0, b0, t0 = energy(h), fields(h, [fid])[0], time.monotonic()
    time.sleep(0.2)
    e1, b1, t1 = energy(h), fields(h, [fid])[0], time.monotonic()
    assert (e1 - e0) == pytest.approx(300_000 * (t1 - t0), rel=0.1)  # mW x s = mJ
    assert (b1.value.ullVal - b0.value.ullVal) == pytest.approx(100e6 * (t1 - t0), rel=0.1)


def test_pcie_throughput_samples_for_20_ms() -> None:
    nvml = _started(a100_80gb())
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    t = time.perf_counter()
    assert nvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES) == 480_000
    assert time.perf_counter() - t >= 0.019


def test_mig_instances_memory_and_permissions() -> None:
    migs = [FakeMig(1, 0, 40 * GiB, 10 * GiB, processes=[(4242, 9 * GiB)]), FakeMig(2, 0, 20 * GiB, 1 * GiB)]
    gpu = a100_80gb(mig=True, mig_devices=migs)
    nvml = _started(gpu)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMigMode(h) == [1, 1] and nvml.nvmlDeviceGetMaxMigDeviceCount(h) == 7
    found = []
    for i in range(7):  # nvitop's loop: until the first error
        try:
            found.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i))
        except pynvml.NVMLError_NotFound:
            break
    assert len(found) == 2
    m = found[0]
    assert nvml.nvmlDeviceIsMigDeviceHandle(m).value == 1
    assert nvml.nvmlDeviceGetUUID(m).startswith("MIG-")
    assert nvml.nvmlDeviceGetMemoryInfo(m, version=pynvml.nvmlMemory_v2).total == 40 * GiB
    assert (nvml.nvmlDeviceGetGpuInstanceId(m), nvml.nvmlDeviceGetComputeInstanceId(m)) == (1, 0)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        nvml.nvmlDeviceGetComputeRunningProcesses_v3(m)
    [p] = nvml.nvmlDeviceGetComputeRunningProcesses_v3(h)
    assert (p.pid, p.usedGpuMemory, p.gpuInstanceId) == (4242, None, 1)  # aggregate, without memory
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetUtilizationRates(h)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetPowerUsage(m)  # device-level figures are the parent's
    gpu.mig_privileged = True
    [q] = nvml.nvmlDeviceGetComputeRunningProcesses_v3(m)
    assert (q.pid, q.usedGpuMemory) == (4242, 9 * GiB)
    consumer = _started(rtx_4090())
    with pytest.raises(pynvml.NVMLError_NotSupported):
        consumer.nvmlDeviceGetMigMode(consumer.nvmlDeviceGetHandleByIndex(0))  # not MIG-capable


def test_graphics_and_mps_processes_and_wddm() -> None:
    gpu = rtx_4090(graphics=[(11, 300 * MiB)], mps=[(12, 2 * GiB)], processes=[(13, GiB)])
    nvml = _started(gpu)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert [(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(h)] == [(11, 300 * MiB)]
    assert [(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetMPSComputeRunningProcesses_v3(h)] == [(12, 2 * GiB)]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetDriverModel(h)  # Linux
    gpu.driver_model = pynvml.NVML_DRIVER_WDDM
    assert nvml.nvmlDeviceGetDriverModel(h) == [pynvml.NVML_DRIVER_WDDM] * 2
    assert [p.usedGpuMemory for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)] == [None]


@pytest.fixture
def child() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_children_compute_on_the_device(child: int) -> None:
    nvml = _started(h200(children_mem=3 * GiB))
    procs = nvml.nvmlDeviceGetComputeRunningProcesses_v3(nvml.nvmlDeviceGetHandleByIndex(0))
    assert (child, 3 * GiB) in [(p.pid, p.usedGpuMemory) for p in procs]


# -- faults -------------------------------------------------------------------------------------------------------
def test_a_hung_call_blocks_until_released_and_others_answer() -> None:
    gpu0, gpu1 = a100_80gb(), rtx_4090()
    release = threading.Event()
    gpu0.hangs["nvmlDeviceGetPowerUsage"] = release
    nvml = _started(gpu0, gpu1)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(nvml.nvmlDeviceGetPowerUsage(nvml.nvmlDeviceGetHandleByIndex(0))))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # still blocked
    assert nvml.nvmlDeviceGetPowerUsage(nvml.nvmlDeviceGetHandleByIndex(1)) == 287_120
    release.set()
    t.join(2)
    assert got == [312_456]


def test_slow_once_then_fast_and_lost_mid_run() -> None:
    gpu = a100_80gb(delays_once={"nvmlDeviceGetTotalEnergyConsumption": 0.3})
    nvml = _started(gpu)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    t = time.perf_counter()
    nvml.nvmlDeviceGetTotalEnergyConsumption(h)
    assert time.perf_counter() - t >= 0.3
    t = time.perf_counter()
    nvml.nvmlDeviceGetTotalEnergyConsumption(h)
    assert time.perf_counter() - t < 0.1
    gpu.lost_after = gpu.calls
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU)


def test_xid_events_wake_the_waiter() -> None:
    nvml = _started(a100_80gb(), rtx_4090(xid_supported=False))
    s = nvml.nvmlEventSetCreate()
    h0, h1 = nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlDeviceGetHandleByIndex(1)
    nvml.nvmlDeviceRegisterEvents(h0, pynvml.nvmlEventTypeXidCriticalError, s)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceRegisterEvents(h1, pynvml.nvmlEventTypeXidCriticalError, s)
    with pytest.raises(pynvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait_v2(s, 10)
    nvml.fire_xid(0, 79)
    data = nvml.nvmlEventSetWait_v2(s, 1000)
    assert isinstance(data, pynvml.c_nvmlEventData_t) and data.eventData == 79
    assert ctypes.cast(data.device, ctypes.c_void_p).value == ctypes.cast(h0, ctypes.c_void_p).value
    nvml.nvmlEventSetFree(s)


def test_spec_timeline() -> None:
    nvml = from_spec(
        {
            "gpus": [{"preset": "h200", "processes": [[99, 1024]]}, {"preset": "rtx_4090"}],
            "timeline": [{"at": 0.05, "gpu": 1, "lost": True}, {"at": 0.05, "gpu": 0, "set": {"power_mw": 5000}}],
        }
    )
    nvml.nvmlInit()
    h0, h1 = nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetPowerUsage(h1) == 287_120
    time.sleep(0.3)
    assert nvml.nvmlDeviceGetPowerUsage(h0) == 5000
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetPowerUsage(h1)


def test_the_shim_puts_the_fake_into_a_subprocess() -> None:
    env = tuner_env(FAKE_NVML_SPEC=json.dumps({"gpus": [{"preset": "h200"}]}))
    env["PYTHONPATH"] = f"{SHIM}{os.pathsep}{env['PYTHONPATH']}"
    code = (
        "import pynvml, tests.fakes.fake_pynvml as f; pynvml.nvmlInit(); "
        "print(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)), f.real.__name__, "
        "pynvml.NVMLError_GpuIsLost is f.real.NVMLError_GpuIsLost)"
    )
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["NVIDIA", "H200", "pynvml", "True"]
