"""A fake ``pynvml`` module for tests, at the vendor boundary only.

It raises the *real* exception classes of the installed nvidia-ml-py (``except pynvml.NVMLError_X`` in
the probe catches them exactly as on a GPU machine) and returns the binding's *real* ctypes structs
(``c_nvmlMemory_v2_t``, ``c_nvmlUtilization_t``, ``c_nvmlProcessUtilizationSample_t``, friendly objects
built from ``c_nvmlProcessInfo_v2_t``).  What it emulates, per ``FakeGpu``:

- memory info v2 (``reserved``) or a driver with only v1 (``used`` then includes the reserved part);
- MIG mode: utilization queries raise ``NVMLError_NotSupported`` and per-process memory is not available;
- a device that falls off the bus after ``lost_after`` calls (``NVMLError_GpuIsLost`` from then on);
- any call failing from a moment on: ``errors[function name] = pynvml.NVMLError_X`` (mutable mid-run,
  e.g. ``NotSupported`` appearing on a call that worked before, a transient ``Timeout``);
- binding/driver skew for the running-process list: a binding without the ``_v3`` wrapper, a driver
  without the ``_v3``/``_v2`` symbols (``NVMLError_FunctionNotFound``), or a driver that writes v1
  structs into the binding's v2/v3-sized array (the scrambled PIDs nvitop guards against); the
  unversioned v1 C symbol is served through ``_nvmlGetFunctionPointer`` as a real C function pointer.
"""

from __future__ import annotations

import ctypes
import time
import types
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pynvml as real

MiB = 1 << 20
GiB = 1 << 30
ULONGLONG_MAX = (1 << 64) - 1


@dataclass
class FakeGpu:
    """One device's state; mutate it between samples to change what the next calls return."""

    name: str
    total_bytes: int
    reserved_bytes: int
    used_bytes: int  # allocated, not counting the reserved part (the v2 meaning)
    util_gpu: int  # percent
    util_mem: int  # percent
    temp_c: int
    power_mw: int
    sm_clock_mhz: int
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, usedGpuMemory bytes)
    sm_util: dict[int, int] = field(default_factory=dict)  # pid -> smUtil percent in the latest sample
    mig: bool = False
    lost_after: int | None = None  # the device answers this many calls, then is lost
    calls: int = 0
    errors: dict[str, type[Exception]] = field(default_factory=dict)  # NVML function -> error it raises now


def a100_80gb(**kw: Any) -> FakeGpu:
    """An A100-SXM4-80GB serving a model: ~60 GiB used, 312 W, 54 C, SM at 1410 MHz."""
    base: dict[str, Any] = dict(
        name="NVIDIA A100-SXM4-80GB",
        total_bytes=81920 * MiB,
        reserved_bytes=559 * MiB,
        used_bytes=61234 * MiB,
        util_gpu=87,
        util_mem=43,
        temp_c=54,
        power_mw=312_456,
        sm_clock_mhz=1410,
    )
    base.update(kw)
    return FakeGpu(**base)


def rtx_4090(**kw: Any) -> FakeGpu:
    """A GeForce RTX 4090: 24564 MiB, 287 W, 63 C, SM at 2520 MHz."""
    base: dict[str, Any] = dict(
        name="NVIDIA GeForce RTX 4090",
        total_bytes=24564 * MiB,
        reserved_bytes=331 * MiB,
        used_bytes=18022 * MiB,
        util_gpu=62,
        util_mem=28,
        temp_c=63,
        power_mw=287_120,
        sm_clock_mhz=2520,
    )
    base.update(kw)
    return FakeGpu(**base)


class _ProcInfoV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


_PROC_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p)


def make_fake_pynvml(
    gpus: Iterable[FakeGpu] = (),
    *,
    init_error: type[Exception] | None = None,
    binding_has_v3: bool = True,
    driver_proc_versions: Iterable[str] = ("v3", "v2", "v1"),
    driver_writes_v1_layout: bool = False,
    driver_has_memory_v2: bool = True,
    raw_v1: bool = False,
) -> types.ModuleType:
    """Build a module that behaves like ``pynvml`` over the given devices.

    ``init_error``: a real ``pynvml.NVMLError_*`` class ``nvmlInit`` raises.  ``binding_has_v3=False``:
    an older nvidia-ml-py (no ``nvmlDeviceGetComputeRunningProcesses_v3``; its unversioned wrapper is
    v1).  ``driver_proc_versions``: which C symbols the driver exports.  ``driver_writes_v1_layout``:
    the v2/v3 symbols fill in v1 structs (a skew).  ``raw_v1``: expose ``_nvmlGetFunctionPointer``.
    """
    devices = list(gpus)
    symbols = set(driver_proc_versions)
    mod = types.ModuleType("pynvml")
    mod.__dict__["calls"] = calls = Counter[str]()
    mod.__dict__["devices"] = devices
    state = {"init": 0, "shutdown": 0}
    mod.__dict__["state"] = state

    for name in dir(real):
        if name.startswith("NVMLError") or name.startswith("NVML_") or name == "NVMLLibraryMismatchError":
            setattr(mod, name, getattr(real, name))
    mod.__dict__["nvmlMemory_v2"] = real.nvmlMemory_v2  # the binding knows v2 even when the driver does not

    handles = [ctypes.c_void_p(0x7F00_0000 + i) for i in range(len(devices))]

    def gpu_of(handle: Any, fn: str) -> FakeGpu:
        calls[fn] += 1
        if not state["init"]:
            raise real.NVMLError_Uninitialized()
        value = handle.value if isinstance(handle, ctypes.c_void_p) else handle
        gpu = devices[int(value or 0) - 0x7F00_0000]
        gpu.calls += 1
        if gpu.lost_after is not None and gpu.calls > gpu.lost_after:
            raise real.NVMLError_GpuIsLost()
        error = gpu.errors.get(fn)
        if error is not None:
            raise error()
        return gpu

    def nvmlInit() -> None:
        calls["nvmlInit"] += 1
        if init_error is not None:
            raise init_error()
        state["init"] += 1

    def nvmlShutdown() -> None:
        calls["nvmlShutdown"] += 1
        if not state["init"]:
            raise real.NVMLError_Uninitialized()
        state["init"] -= 1
        state["shutdown"] += 1

    def nvmlDeviceGetCount() -> int:
        calls["nvmlDeviceGetCount"] += 1
        return len(devices)

    def nvmlDeviceGetHandleByIndex(index: int) -> ctypes.c_void_p:
        calls["nvmlDeviceGetHandleByIndex"] += 1
        if not 0 <= index < len(devices):
            raise real.NVMLError_InvalidArgument()
        return handles[index]

    def nvmlDeviceGetName(handle: Any) -> str:
        return gpu_of(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetMemoryInfo(handle: Any, version: int | None = None) -> Any:
        gpu = gpu_of(handle, "nvmlDeviceGetMemoryInfo")
        free = gpu.total_bytes - gpu.reserved_bytes - gpu.used_bytes
        if version:
            if not driver_has_memory_v2:
                raise real.NVMLError_FunctionNotFound()
            return real.c_nvmlMemory_v2_t(
                version=version, total=gpu.total_bytes, reserved=gpu.reserved_bytes, free=free, used=gpu.used_bytes
            )
        return real.c_nvmlMemory_t(total=gpu.total_bytes, free=free, used=gpu.used_bytes + gpu.reserved_bytes)

    def nvmlDeviceGetUtilizationRates(handle: Any) -> Any:
        gpu = gpu_of(handle, "nvmlDeviceGetUtilizationRates")
        if gpu.mig:
            raise real.NVMLError_NotSupported()
        return real.c_nvmlUtilization_t(gpu=gpu.util_gpu, memory=gpu.util_mem)

    def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetTemperature")
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError_InvalidArgument()
        return gpu.temp_c

    def nvmlDeviceGetPowerUsage(handle: Any) -> int:
        return gpu_of(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetClockInfo(handle: Any, clock: int) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetClockInfo")
        if clock != real.NVML_CLOCK_SM:
            raise real.NVMLError_InvalidArgument()
        return gpu.sm_clock_mhz

    def proc_list(gpu: FakeGpu) -> list[tuple[int, int | None]]:
        return [(pid, None if gpu.mig else mem) for pid, mem in gpu.processes]

    def versioned(label: str) -> Any:
        def call(handle: Any) -> list[Any]:
            gpu = gpu_of(handle, f"nvmlDeviceGetComputeRunningProcesses_{label}")
            if label not in symbols:
                raise real.NVMLError_FunctionNotFound()
            procs = proc_list(gpu)
            buf = (real.c_nvmlProcessInfo_v2_t * len(procs))()  # what the binding allocates
            if driver_writes_v1_layout:  # an older driver fills in the v1 layout: records come out scrambled
                v1 = (_ProcInfoV1 * len(procs)).from_buffer(buf)
                for k, (pid, mem) in enumerate(procs):
                    v1[k].pid, v1[k].usedGpuMemory = pid, ULONGLONG_MAX if mem is None else mem
            else:
                for k, (pid, mem) in enumerate(procs):
                    buf[k].pid, buf[k].usedGpuMemory = pid, ULONGLONG_MAX if mem is None else mem
                    buf[k].gpuInstanceId = buf[k].computeInstanceId = 0 if gpu.mig else 0xFFFFFFFF
            out = []
            for k in range(len(procs)):
                obj = real.nvmlStructToFriendlyObject(buf[k])
                if obj.usedGpuMemory == ULONGLONG_MAX:
                    obj.usedGpuMemory = None
                out.append(obj)
            return out

        call.__name__ = f"nvmlDeviceGetComputeRunningProcesses_{label}"
        return call

    mod.__dict__["nvmlDeviceGetComputeRunningProcesses_v2"] = versioned("v2")
    if binding_has_v3:
        mod.__dict__["nvmlDeviceGetComputeRunningProcesses_v3"] = v3 = versioned("v3")

        def unversioned(handle: Any) -> list[Any]:  # new bindings: the unversioned wrapper calls v3
            try:
                return v3(handle)  # type: ignore[no-any-return]
            except real.NVMLError_FunctionNotFound:
                raise real.NVMLLibraryMismatchError("Unversioned function called ...") from None

    else:

        def unversioned(handle: Any) -> list[Any]:  # old bindings: the v1 symbol with the v1 struct
            gpu = gpu_of(handle, "nvmlDeviceGetComputeRunningProcesses")
            if "v1" not in symbols:
                raise real.NVMLError_FunctionNotFound()
            return [
                real.nvmlStructToFriendlyObject(
                    _ProcInfoV1(pid=pid, usedGpuMemory=ULONGLONG_MAX if mem is None else mem)
                )
                for pid, mem in proc_list(gpu)
            ]

    mod.__dict__["nvmlDeviceGetComputeRunningProcesses"] = unversioned

    def c_v1(handle_value: int, count: Any, infos: int | None) -> int:
        try:
            gpu = gpu_of(handle_value, "nvmlDeviceGetComputeRunningProcesses(C)")
        except real.NVMLError as exc:
            return int(exc.value)
        procs = proc_list(gpu)
        if not procs:
            count[0] = 0
            return real.NVML_SUCCESS
        if not infos or count[0] < len(procs):
            count[0] = len(procs)
            return real.NVML_ERROR_INSUFFICIENT_SIZE
        arr = (_ProcInfoV1 * len(procs)).from_address(infos)
        for k, (pid, mem) in enumerate(procs):
            arr[k].pid, arr[k].usedGpuMemory = pid, ULONGLONG_MAX if mem is None else mem
        count[0] = len(procs)
        return real.NVML_SUCCESS

    c_v1_pointer = _PROC_FN(c_v1)
    mod.__dict__["_c_v1_pointer"] = c_v1_pointer  # keep the C thunk alive as long as the module

    if raw_v1:

        def _nvmlGetFunctionPointer(name: str) -> Any:
            if not state["init"]:
                raise real.NVMLError_Uninitialized()
            if name == "nvmlDeviceGetComputeRunningProcesses" and "v1" in symbols:
                return c_v1_pointer
            raise real.NVMLError_FunctionNotFound()

        mod.__dict__["_nvmlGetFunctionPointer"] = _nvmlGetFunctionPointer

    def nvmlDeviceGetProcessUtilization(handle: Any, timeStamp: int) -> list[Any]:
        gpu = gpu_of(handle, "nvmlDeviceGetProcessUtilization")
        if gpu.mig:
            raise real.NVMLError_NotSupported()
        now_us = time.time_ns() // 1000
        samples = [
            real.c_nvmlProcessUtilizationSample_t(
                pid=pid, timeStamp=now_us - 100_000 + k, smUtil=sm, memUtil=sm // 2, encUtil=0, decUtil=0
            )
            for k, (pid, sm) in enumerate(sorted(gpu.sm_util.items()))
        ]
        samples = [s for s in samples if s.timeStamp > timeStamp]
        if not samples:
            raise real.NVMLError_NotFound()
        return samples

    for fn in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetUtilizationRates,
        nvmlDeviceGetTemperature,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetClockInfo,
        nvmlDeviceGetProcessUtilization,
    ):
        setattr(mod, fn.__name__, fn)
    return mod
