"""A fake ``pynvml`` module for tests, at the vendor boundary only.

It raises the *real* exception classes of the installed nvidia-ml-py (``except pynvml.NVMLError_X`` in
the probe catches them exactly as on a GPU machine), returns the binding's *real* ctypes structs and
handles (``c_nvmlDevice_t`` pointers, ``c_nvmlMemory_v2_t``, ``nvmlPciInfo_t``, ``c_nvmlFieldValue_t``
arrays, ``c_nvmlEventData_t``, friendly objects built from ``c_nvmlProcessInfo_v2_t``) and keeps the
binding's signatures (``tests/test_probe_nvidia.py`` compares them with the installed binding's).

The binding's quirks, as its wrappers produce them (line numbers of nvidia-ml-py 13.615's ``pynvml.py``):

- ``nvmlDeviceGetProcessUtilization`` raises ``NVMLError(0)`` — the base class, value ``NVML_SUCCESS`` —
  when the driver has no sample at all: its first call succeeds with a count of 0 and the wrapper only
  expects ``INSUFFICIENT_SIZE`` (:5741); samples that are all older than ``timeStamp``: ``NotFound``;
- every call before ``nvmlInit`` (or after the last ``nvmlShutdown``) raises ``NVMLError_Uninitialized``;
- the unversioned process-list wrappers raise ``NVMLLibraryMismatchError`` when the driver lacks the ``_v3``
  symbol (``throwOnVersionMismatch``, :3131); ``usedGpuMemory`` is ``None`` where the driver reports
  ``NVML_VALUE_NOT_AVAILABLE`` (WDDM, MIG without privileges);
- ``nvmlDeviceGetName``/``GetUUID``/``nvmlSystemGetDriverVersion`` return ``str``, and so does
  ``nvmlPciInfo_t.busId`` (``_PrintableStructure`` decodes it); ``nvmlDeviceIsMigDeviceHandle`` returns a
  ``c_uint``; ``nvmlDeviceGetFieldValues`` succeeds as a call and reports each field's own ``nvmlReturn``;
- ``nvmlDeviceGetTemperatureV`` exists only in newer bindings (``binding_has_temperature_v``) and needs the
  driver's symbol (``FunctionNotFound`` from older drivers); ``nvmlDeviceGetPcieThroughput`` samples for
  ~20 ms before it answers (``pcie_sample_s``).

What it emulates, per ``FakeGpu`` (mutate it between samples to change what the next calls return):

- memory info v2 (``reserved``) or a driver with only v1 (``used`` then includes the reserved part);
- an energy counter in mJ that integrates the current power draw over (monotonic) time, PCIe and NVLink
  byte counters that integrate their rates (``nvmlDeviceGetFieldValues``), clocks, clock event reasons,
  P-state, ECC volatile counts, retired pages (pre-Ampere) or remapped rows (Ampere and later);
- compute, graphics and MPS processes; ``children_mem``: every live descendant of this process is a
  compute process using that much (how a ``tuner run`` subprocess test puts the watched command on a GPU);
- MIG mode (``mig``): utilization queries raise ``NotSupported``; ``mig_devices`` are instances with their
  own memory and processes behind ``nvmlDeviceGetMigDeviceHandleByIndex``; without ``mig_privileged`` the
  parent's process list has no memory figures and the instances' lists raise ``NoPermission``;
- WDDM (``driver_model``): no per-process memory;
- faults: a device that falls off the bus after ``lost_after`` calls (``NVMLError_GpuIsLost`` from then
  on); ``errors[fn] = pynvml.NVMLError_X`` (mutable mid-run); ``hangs[fn]``: the call blocks until that
  ``threading.Event`` is set (never, if nobody sets it); ``delays[fn]`` seconds on every call,
  ``delays_once[fn]`` on the next call only;
- XID critical errors: ``mod.fire_xid(index, xid)`` wakes ``nvmlEventSetWait_v2`` on every event set the
  device was registered with;
- binding/driver skew for the running-process list: a binding without the ``_v3`` wrapper, a driver
  without the ``_v3``/``_v2`` symbols (``NVMLError_FunctionNotFound``), or a driver that writes v1
  structs into the binding's v2/v3-sized array (the scrambled PIDs nvitop guards against); the
  unversioned v1 C symbol is served through ``_nvmlGetFunctionPointer`` as a real C function pointer.

``from_spec(dict)`` builds the module from JSON (``tests/fakes/nvml_shim/pynvml.py`` does it inside a
``tuner`` subprocess, with a timeline of faults).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
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
UINT_MAX = 0xFFFFFFFF
_HANDLE_BASE = 0x7F00_0000
_MIG_BASE = 0x7F10_0000


@dataclass
class FakeMig:
    """One MIG instance (a GPU instance with one compute instance)."""

    gpu_instance_id: int
    compute_instance_id: int
    total_bytes: int
    used_bytes: int
    uuid: str = ""
    processes: list[tuple[int, int | None]] = field(default_factory=list)


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
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # compute (pid, usedGpuMemory bytes)
    sm_util: dict[int, int] = field(default_factory=dict)  # pid -> smUtil percent in the latest sample
    mig: bool = False
    lost_after: int | None = None  # the device answers this many calls, then is lost
    calls: int = 0
    errors: dict[str, type[Exception]] = field(default_factory=dict)  # NVML function -> error it raises now
    # identity
    uuid: str = ""  # "" -> derived from the index by make_fake_pynvml
    pci_bus_id: str = ""
    cuda_cc: tuple[int, int] = (8, 0)
    cores: int = 6912
    # energy, power, clocks
    energy_mj: float = 1_234_567_000.0  # since the driver loaded
    energy_supported: bool = True
    power_limit_mw: int = 400_000
    mem_clock_mhz: int = 1593
    sm_clock_max_mhz: int = 1410
    mem_clock_max_mhz: int = 1593
    clock_reasons: int = 0
    pstate: int = 0
    # buses
    pcie_tx_kbps: int = 120_000  # KB/s, what nvmlDeviceGetPcieThroughput reports
    pcie_rx_kbps: int = 480_000
    pcie_counters: bool = True  # the driver has the NVML_FI_DEV_PCIE_COUNT_* fields
    nvlink_tx_kibps: float = 0.0  # KiB/s over all links
    nvlink_rx_kibps: float = 0.0
    nvlink_links: int = 0
    # errors kept by the device
    ecc: tuple[int, int] | None = (0, 0)  # volatile (corrected, uncorrected); None: no ECC (NotSupported)
    retired_pages: dict[int, list[int]] | None = None  # cause -> addresses; None: NotSupported (Ampere+)
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)  # corr, unc, pending, failure; None: N/S
    # processes beyond compute
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    mps: list[tuple[int, int | None]] = field(default_factory=list)
    children_mem: int | None = None  # every live descendant of this process computes here with this much
    # MIG
    mig_devices: list[FakeMig] = field(default_factory=list)
    mig_privileged: bool = False
    mig_max: int = 7
    mig_capable: bool = True
    # Windows
    driver_model: int | None = None  # real.NVML_DRIVER_WDDM ...; None: Linux (NotSupported)
    # slow and hung calls
    hangs: dict[str, threading.Event] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    delays_once: dict[str, float] = field(default_factory=dict)
    xid_supported: bool = True
    _t: float = field(default=0.0, repr=False)  # when the counters were last advanced (monotonic)


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
        power_limit_mw=400_000,
        mem_clock_mhz=1593,
        sm_clock_max_mhz=1410,
        mem_clock_max_mhz=1593,
        nvlink_links=12,
        nvlink_tx_kibps=2_000_000.0,
        nvlink_rx_kibps=1_500_000.0,
    )
    base.update(kw)
    return FakeGpu(**base)


def h200(**kw: Any) -> FakeGpu:
    """An H200 (141 GB HBM3e), idle but for a small model: 700 W limit, SM up to 1980 MHz."""
    base: dict[str, Any] = dict(
        name="NVIDIA H200",
        total_bytes=143771 * MiB,
        reserved_bytes=581 * MiB,
        used_bytes=2120 * MiB,
        util_gpu=35,
        util_mem=12,
        temp_c=38,
        power_mw=182_000,
        sm_clock_mhz=1980,
        power_limit_mw=700_000,
        mem_clock_mhz=3201,
        sm_clock_max_mhz=1980,
        mem_clock_max_mhz=3201,
        cuda_cc=(9, 0),
        cores=16896,
        nvlink_links=18,
    )
    base.update(kw)
    return FakeGpu(**base)


def rtx_4090(**kw: Any) -> FakeGpu:
    """A GeForce RTX 4090: 24564 MiB, 287 W, 63 C, SM at 2520 MHz; no ECC, no MIG, no NVLink."""
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
        power_limit_mw=450_000,
        mem_clock_mhz=10501,
        sm_clock_max_mhz=3120,
        mem_clock_max_mhz=10501,
        cuda_cc=(8, 9),
        cores=16384,
        ecc=None,
        remapped_rows=None,
        mig_capable=False,
    )
    base.update(kw)
    return FakeGpu(**base)


PRESETS = {"a100_80gb": a100_80gb, "h200": h200, "rtx_4090": rtx_4090}


class _ProcInfoV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


_PROC_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p)


def _handle(addr: int) -> Any:
    """A device handle of the binding's own type (``c_nvmlDevice_t``, a pointer to an opaque struct)."""
    return ctypes.cast(ctypes.c_void_p(addr), real.c_nvmlDevice_t)


def _address(handle: Any) -> int:
    if isinstance(handle, int):
        return handle
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


def _unversioned(v3: Any, name: str) -> Any:
    """New bindings' unversioned wrapper: calls ``_v3``; a driver without it -> ``NVMLLibraryMismatchError``
    (``throwOnVersionMismatch``)."""

    def call(handle: Any) -> list[Any]:
        try:
            return v3(handle)  # type: ignore[no-any-return]
        except real.NVMLError_FunctionNotFound:
            raise real.NVMLLibraryMismatchError("Unversioned function called ...") from None

    call.__name__ = name
    return call


def make_fake_pynvml(
    gpus: Iterable[FakeGpu] = (),
    *,
    init_error: type[Exception] | None = None,
    binding_has_v3: bool = True,
    driver_proc_versions: Iterable[str] = ("v3", "v2", "v1"),
    driver_writes_v1_layout: bool = False,
    driver_has_memory_v2: bool = True,
    raw_v1: bool = False,
    binding_has_temperature_v: bool = True,
    driver_has_temperature_v: bool = True,
    driver_has_event_reasons: bool = True,
    driver_has_field_values: bool = True,
    driver_version: str = "570.124.06",
    cuda_driver_version: int = 12080,
    pcie_sample_s: float = 0.02,
    init_delay_s: float = 0.0,
) -> types.ModuleType:
    """Build a module that behaves like ``pynvml`` over the given devices.

    ``init_error``: a real ``pynvml.NVMLError_*`` class ``nvmlInit`` raises.  ``binding_has_v3=False``:
    an older nvidia-ml-py (no ``nvmlDeviceGetComputeRunningProcesses_v3``; its unversioned wrapper is
    v1).  ``driver_proc_versions``: which C symbols the driver exports.  ``driver_writes_v1_layout``:
    the v2/v3 symbols fill in v1 structs (a skew).  ``raw_v1``: expose ``_nvmlGetFunctionPointer``.
    ``binding_has_temperature_v=False``: a binding without ``nvmlDeviceGetTemperatureV``;
    ``driver_has_*=False``: the driver lacks that symbol (``FunctionNotFound``).
    """
    devices = list(gpus)
    for i, gpu in enumerate(devices):
        gpu.uuid = gpu.uuid or f"GPU-{0x5A0E0000 + i:08x}-1b2c-4d3e-8f40-{0xA1B2C3D40000 + i:012x}"
        gpu.pci_bus_id = gpu.pci_bus_id or f"00000000:{0x17 + 0x20 * i:02X}:00.0"
    symbols = set(driver_proc_versions)
    mod = types.ModuleType("pynvml")
    mod.__dict__["calls"] = calls = Counter[str]()
    mod.__dict__["devices"] = devices
    state = {"init": 0, "shutdown": 0}
    mod.__dict__["state"] = state

    for name in dir(real):
        if (
            name.startswith(("NVMLError", "NVML_", "nvmlClocks", "nvmlEventType"))
            or name == "NVMLLibraryMismatchError"
            or name.startswith(("c_nvml", "nvmlPciInfo", "nvmlFriendlyObject", "nvmlStructToFriendlyObject"))
        ):
            setattr(mod, name, getattr(real, name))
    mod.__dict__["nvmlMemory_v2"] = real.nvmlMemory_v2  # the binding knows v2 even when the driver does not
    if binding_has_temperature_v:
        mod.__dict__["nvmlTemperature_v1"] = real.nvmlTemperature_v1

    handles = [_handle(_HANDLE_BASE + i) for i in range(len(devices))]
    mig_handles: dict[int, tuple[FakeGpu, FakeMig, Any]] = {}
    by_id: dict[int, int] = {id(h): _HANDLE_BASE + i for i, h in enumerate(handles)}

    def mig_handle(i: int, k: int) -> Any:
        """Instance ``k`` of GPU ``i`` (made when first asked for: MIG can be switched on mid-run)."""
        addr = _MIG_BASE + 0x100 * i + k
        gpu, mig = devices[i], devices[i].mig_devices[k]
        found = mig_handles.get(addr)
        if found is None or found[1] is not mig:
            mig.uuid = mig.uuid or f"MIG-{0x3C000000 + 16 * i + k:08x}-aaaa-5bbb-8ccc-{0xD0000000 + k:012x}"
            found = mig_handles[addr] = (gpu, mig, _handle(addr))
            by_id[id(found[2])] = addr
        return found[2]

    for i, gpu in enumerate(devices):
        for k in range(len(gpu.mig_devices)):
            mig_handle(i, k)

    def check_init(fn: str) -> None:
        calls[fn] += 1
        if not state["init"]:
            raise real.NVMLError_Uninitialized()

    def lookup(handle: Any, fn: str) -> tuple[FakeGpu, FakeMig | None]:
        check_init(fn)
        addr = by_id.get(id(handle))
        if addr is None:
            addr = _address(handle)
        mig = None
        if addr >= _MIG_BASE:
            found = mig_handles.get(addr)
            if found is None:
                raise real.NVMLError_InvalidArgument()
            gpu, mig, _ = found
        elif 0 <= addr - _HANDLE_BASE < len(devices):
            gpu = devices[addr - _HANDLE_BASE]
        else:
            raise real.NVMLError_InvalidArgument()
        gpu.calls += 1
        if gpu.lost_after is not None and gpu.calls > gpu.lost_after:
            raise real.NVMLError_GpuIsLost()
        hang = gpu.hangs.get(fn)
        if hang is not None:
            hang.wait()
        delay = gpu.delays_once.pop(fn, None) or gpu.delays.get(fn)
        if delay:
            time.sleep(delay)
        if gpu.lost_after is not None and gpu.calls > gpu.lost_after:  # lost while the call waited
            raise real.NVMLError_GpuIsLost()
        error = gpu.errors.get(fn)
        if error is not None:
            raise error()
        return gpu, mig

    def gpu_of(handle: Any, fn: str, *, mig_ok: bool = False) -> FakeGpu:
        gpu, mig = lookup(handle, fn)
        if mig is not None and not mig_ok:
            raise real.NVMLError_NotSupported()  # device-level figures are the parent's
        return gpu

    def advance(gpu: FakeGpu) -> None:
        now = time.monotonic()
        if gpu._t:
            dt = now - gpu._t
            gpu.energy_mj += gpu.power_mw * dt  # mW x s = mJ
            gpu.__dict__["_pcie_tx"] = gpu.__dict__.get("_pcie_tx", 0.0) + gpu.pcie_tx_kbps * 1000.0 * dt
            gpu.__dict__["_pcie_rx"] = gpu.__dict__.get("_pcie_rx", 0.0) + gpu.pcie_rx_kbps * 1000.0 * dt
            gpu.__dict__["_nvl_tx"] = gpu.__dict__.get("_nvl_tx", 0.0) + gpu.nvlink_tx_kibps * dt
            gpu.__dict__["_nvl_rx"] = gpu.__dict__.get("_nvl_rx", 0.0) + gpu.nvlink_rx_kibps * dt
        gpu._t = now

    # -- the library --------------------------------------------------------------------------------
    def nvmlInit() -> None:
        calls["nvmlInit"] += 1
        if init_delay_s:
            time.sleep(init_delay_s)
        if init_error is not None:
            raise init_error()
        state["init"] += 1
        for gpu in devices:
            advance(gpu)

    def nvmlShutdown() -> None:
        calls["nvmlShutdown"] += 1
        if not state["init"]:
            raise real.NVMLError_Uninitialized()
        state["init"] -= 1
        state["shutdown"] += 1

    def nvmlSystemGetDriverVersion() -> str:
        check_init("nvmlSystemGetDriverVersion")
        return driver_version

    def nvmlSystemGetCudaDriverVersion() -> int:
        check_init("nvmlSystemGetCudaDriverVersion")
        return cuda_driver_version

    def nvmlSystemGetCudaDriverVersion_v2() -> int:
        check_init("nvmlSystemGetCudaDriverVersion_v2")
        return cuda_driver_version

    def nvmlDeviceGetCount() -> int:
        check_init("nvmlDeviceGetCount")
        return len(devices)

    def nvmlDeviceGetHandleByIndex(index: int) -> Any:
        check_init("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(devices):
            raise real.NVMLError_InvalidArgument()
        return handles[index]

    # -- identity -----------------------------------------------------------------------------------
    def nvmlDeviceGetName(handle: Any) -> str:
        gpu, mig = lookup(handle, "nvmlDeviceGetName")
        if mig is not None:
            return f"{gpu.name} MIG {mig.total_bytes // GiB}g"
        return gpu.name

    def nvmlDeviceGetUUID(handle: Any) -> str:
        gpu, mig = lookup(handle, "nvmlDeviceGetUUID")
        return mig.uuid if mig is not None else gpu.uuid

    def nvmlDeviceGetPciInfo(handle: Any) -> Any:
        gpu = gpu_of(handle, "nvmlDeviceGetPciInfo")
        dom, bus, rest = gpu.pci_bus_id.split(":")
        info = real.nvmlPciInfo_t()
        info.busId = gpu.pci_bus_id.encode()
        info.busIdLegacy = gpu.pci_bus_id[4:].encode()
        info.domain, info.bus, info.device = int(dom, 16), int(bus, 16), int(rest.split(".")[0], 16)
        info.pciDeviceId = 0x20B210DE
        return info

    def nvmlDeviceGetIndex(handle: Any) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetIndex")
        return devices.index(gpu)

    def nvmlDeviceGetCudaComputeCapability(handle: Any) -> tuple[int, int]:
        return gpu_of(handle, "nvmlDeviceGetCudaComputeCapability").cuda_cc

    def nvmlDeviceGetNumGpuCores(device: Any) -> int:
        return gpu_of(device, "nvmlDeviceGetNumGpuCores").cores

    def nvmlDeviceGetDriverModel(handle: Any) -> list[int]:
        gpu = gpu_of(handle, "nvmlDeviceGetDriverModel")
        if gpu.driver_model is None:
            raise real.NVMLError_NotSupported()  # Linux has no driver models
        return [gpu.driver_model, gpu.driver_model]

    # -- memory, utilization, sensors --------------------------------------------------------------
    def nvmlDeviceGetMemoryInfo(handle: Any, version: int | None = None) -> Any:
        gpu, mig = lookup(handle, "nvmlDeviceGetMemoryInfo")
        if mig is not None:
            total, reserved, used = mig.total_bytes, 0, mig.used_bytes
        else:
            total, reserved, used = gpu.total_bytes, gpu.reserved_bytes, gpu.used_bytes
        free = total - reserved - used
        if version:
            if not driver_has_memory_v2:
                raise real.NVMLError_FunctionNotFound()
            return real.c_nvmlMemory_v2_t(version=version, total=total, reserved=reserved, free=free, used=used)
        return real.c_nvmlMemory_t(total=total, free=free, used=used + reserved)

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

    def nvmlDeviceGetTemperatureV(handle: Any, sensor: int, version: int = real.nvmlTemperature_v1) -> int:
        if version != real.nvmlTemperature_v1:
            raise real.NVMLError(real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        gpu = gpu_of(handle, "nvmlDeviceGetTemperatureV")
        if not driver_has_temperature_v:
            raise real.NVMLError_FunctionNotFound()
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError_InvalidArgument()
        return gpu.temp_c

    def nvmlDeviceGetPowerUsage(handle: Any) -> int:
        return gpu_of(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(handle: Any) -> int:
        return gpu_of(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(handle: Any) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetTotalEnergyConsumption")
        if not gpu.energy_supported:
            raise real.NVMLError_NotSupported()  # before Volta
        advance(gpu)
        return int(gpu.energy_mj)

    def nvmlDeviceGetClockInfo(handle: Any, type: int) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetClockInfo")
        if type == real.NVML_CLOCK_SM:
            return gpu.sm_clock_mhz
        if type == real.NVML_CLOCK_MEM:
            return gpu.mem_clock_mhz
        raise real.NVMLError_InvalidArgument()

    def nvmlDeviceGetMaxClockInfo(handle: Any, type: int) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetMaxClockInfo")
        if type == real.NVML_CLOCK_SM:
            return gpu.sm_clock_max_mhz
        if type == real.NVML_CLOCK_MEM:
            return gpu.mem_clock_max_mhz
        raise real.NVMLError_InvalidArgument()

    def nvmlDeviceGetCurrentClocksEventReasons(handle: Any) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetCurrentClocksEventReasons")
        if not driver_has_event_reasons:
            raise real.NVMLError_FunctionNotFound()
        return gpu.clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(handle: Any) -> int:
        return gpu_of(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_reasons

    def nvmlDeviceGetPerformanceState(handle: Any) -> int:
        return gpu_of(handle, "nvmlDeviceGetPerformanceState").pstate

    # -- buses --------------------------------------------------------------------------------------
    def nvmlDeviceGetPcieThroughput(device: Any, counter: int) -> int:
        gpu = gpu_of(device, "nvmlDeviceGetPcieThroughput")
        if pcie_sample_s:
            time.sleep(pcie_sample_s)  # the driver samples the bus for ~20 ms before it answers
        if counter == real.NVML_PCIE_UTIL_TX_BYTES:
            return gpu.pcie_tx_kbps
        if counter == real.NVML_PCIE_UTIL_RX_BYTES:
            return gpu.pcie_rx_kbps
        raise real.NVMLError_InvalidArgument()

    def nvmlDeviceGetFieldValues(handle: Any, fieldIds: list[Any]) -> Any:
        gpu = gpu_of(handle, "nvmlDeviceGetFieldValues")
        if not driver_has_field_values:
            raise real.NVMLError_FunctionNotFound()
        advance(gpu)
        values = (real.c_nvmlFieldValue_t * len(fieldIds))()
        now_us = time.time_ns() // 1000
        for k, fid in enumerate(fieldIds):
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            v = values[k]
            v.fieldId, v.scopeId, v.timestamp, v.latencyUsec = fid, scope, now_us, 0
            got: float | None = None
            if fid == real.NVML_FI_DEV_PCIE_COUNT_TX_BYTES and gpu.pcie_counters:
                got = gpu.__dict__.get("_pcie_tx", 0.0)
            elif fid == real.NVML_FI_DEV_PCIE_COUNT_RX_BYTES and gpu.pcie_counters:
                got = gpu.__dict__.get("_pcie_rx", 0.0)
            elif fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX and scope < gpu.nvlink_links:
                got = gpu.__dict__.get("_nvl_tx", 0.0) / gpu.nvlink_links  # per link (scopeId); traffic spread evenly
            elif fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX and scope < gpu.nvlink_links:
                got = gpu.__dict__.get("_nvl_rx", 0.0) / gpu.nvlink_links
            elif fid == real.NVML_FI_DEV_NVLINK_LINK_COUNT:
                got = gpu.nvlink_links
                v.valueType = real.NVML_VALUE_TYPE_UNSIGNED_INT
                v.nvmlReturn = real.NVML_SUCCESS
                v.value.uiVal = int(got)
                continue
            if got is None:
                v.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
            else:
                v.nvmlReturn = real.NVML_SUCCESS
                v.valueType = real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                v.value.ullVal = int(got)
        return values

    # -- errors the device keeps --------------------------------------------------------------------
    def nvmlDeviceGetTotalEccErrors(handle: Any, errorType: int, counterType: int) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetTotalEccErrors")
        if gpu.ecc is None:
            raise real.NVMLError_NotSupported()
        if counterType != real.NVML_VOLATILE_ECC:
            return 0
        return gpu.ecc[0] if errorType == real.NVML_MEMORY_ERROR_TYPE_CORRECTED else gpu.ecc[1]

    def nvmlDeviceGetRetiredPages(device: Any, sourceFilter: int) -> list[int]:
        gpu = gpu_of(device, "nvmlDeviceGetRetiredPages")
        if gpu.retired_pages is None:
            raise real.NVMLError_NotSupported()
        return list(gpu.retired_pages.get(sourceFilter, []))

    def nvmlDeviceGetRemappedRows(device: Any) -> tuple[int, int, int, int]:
        gpu = gpu_of(device, "nvmlDeviceGetRemappedRows")
        if gpu.remapped_rows is None:
            raise real.NVMLError_NotSupported()
        return gpu.remapped_rows

    # -- MIG ----------------------------------------------------------------------------------------
    def nvmlDeviceGetMigMode(device: Any) -> list[int]:
        gpu = gpu_of(device, "nvmlDeviceGetMigMode")
        if not gpu.mig_capable:
            raise real.NVMLError_NotSupported()
        mode = real.NVML_DEVICE_MIG_ENABLE if gpu.mig else real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(device: Any) -> int:
        gpu = gpu_of(device, "nvmlDeviceGetMaxMigDeviceCount")
        if not gpu.mig_capable:
            raise real.NVMLError_NotSupported()
        return gpu.mig_max

    def nvmlDeviceGetMigDeviceHandleByIndex(device: Any, index: int) -> Any:
        gpu = gpu_of(device, "nvmlDeviceGetMigDeviceHandleByIndex")
        if not gpu.mig_capable:
            raise real.NVMLError_NotSupported()
        if not gpu.mig:
            raise real.NVMLError_InvalidArgument()
        if not 0 <= index < len(gpu.mig_devices):
            raise real.NVMLError_NotFound()
        return mig_handle(devices.index(gpu), index)

    def nvmlDeviceIsMigDeviceHandle(device: Any) -> Any:
        _, mig = lookup(device, "nvmlDeviceIsMigDeviceHandle")
        return ctypes.c_uint(1 if mig is not None else 0)  # the binding returns the c_uint itself

    def nvmlDeviceGetGpuInstanceId(device: Any) -> int:
        _, mig = lookup(device, "nvmlDeviceGetGpuInstanceId")
        if mig is None:
            raise real.NVMLError_NotSupported()
        return mig.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(device: Any) -> int:
        _, mig = lookup(device, "nvmlDeviceGetComputeInstanceId")
        if mig is None:
            raise real.NVMLError_NotSupported()
        return mig.compute_instance_id

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migDevice: Any) -> Any:
        gpu, mig = lookup(migDevice, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        if mig is None:
            raise real.NVMLError_InvalidArgument()
        return handles[devices.index(gpu)]

    # -- processes ----------------------------------------------------------------------------------
    def children() -> list[int]:
        try:
            import psutil

            return [c.pid for c in psutil.Process(os.getpid()).children(recursive=True)]
        except Exception:
            return []

    def proc_list(gpu: FakeGpu, mig: FakeMig | None, kind: str) -> list[tuple[int, int | None, int, int]]:
        """(pid, usedGpuMemory, gpuInstanceId, computeInstanceId) as the driver reports them."""
        hidden = gpu.driver_model == real.NVML_DRIVER_WDDM or (gpu.mig and not gpu.mig_privileged)
        if mig is not None:
            if not gpu.mig_privileged:
                raise real.NVMLError_NoPermission()
            rows = [(p, m, mig.gpu_instance_id, mig.compute_instance_id) for p, m in mig.processes]
        elif kind == "compute":
            rows = [(p, m, UINT_MAX, UINT_MAX) for p, m in gpu.processes]
            if gpu.children_mem is not None:
                rows += [(p, gpu.children_mem, UINT_MAX, UINT_MAX) for p in children()]
            for m in gpu.mig_devices if gpu.mig else ():
                rows += [(p, b, m.gpu_instance_id, m.compute_instance_id) for p, b in m.processes]
        else:
            rows = [(p, m, UINT_MAX, UINT_MAX) for p, m in (gpu.graphics if kind == "graphics" else gpu.mps)]
        return [(p, None if hidden else m, gi, ci) for p, m, gi, ci in rows]

    def versioned(kind: str, label: str) -> Any:
        fname = {
            "compute": "nvmlDeviceGetComputeRunningProcesses",
            "graphics": "nvmlDeviceGetGraphicsRunningProcesses",
            "mps": "nvmlDeviceGetMPSComputeRunningProcesses",
        }[kind] + f"_{label}"

        def call(handle: Any) -> list[Any]:
            gpu, mig = lookup(handle, fname)
            if label not in symbols:
                raise real.NVMLError_FunctionNotFound()
            procs = proc_list(gpu, mig, kind)
            if not procs:
                return []  # the binding's special case: the first call succeeded with no processes
            buf = (real.c_nvmlProcessInfo_v2_t * len(procs))()  # what the binding allocates
            if driver_writes_v1_layout:  # an older driver fills in the v1 layout: records come out scrambled
                v1 = (_ProcInfoV1 * len(procs)).from_buffer(buf)
                for k, (pid, mem, _, _) in enumerate(procs):
                    v1[k].pid, v1[k].usedGpuMemory = pid, ULONGLONG_MAX if mem is None else mem
            else:
                for k, (pid, mem, gi, ci) in enumerate(procs):
                    buf[k].pid, buf[k].usedGpuMemory = pid, ULONGLONG_MAX if mem is None else mem
                    buf[k].gpuInstanceId, buf[k].computeInstanceId = gi, ci
            out = []
            for k in range(len(procs)):
                obj = real.nvmlStructToFriendlyObject(buf[k])
                if obj.usedGpuMemory == ULONGLONG_MAX:
                    obj.usedGpuMemory = None
                out.append(obj)
            return out

        call.__name__ = fname
        return call

    for kind, base in (
        ("compute", "nvmlDeviceGetComputeRunningProcesses"),
        ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
        ("mps", "nvmlDeviceGetMPSComputeRunningProcesses"),
    ):
        mod.__dict__[f"{base}_v2"] = versioned(kind, "v2")
        if binding_has_v3:
            v3 = mod.__dict__[f"{base}_v3"] = versioned(kind, "v3")
            mod.__dict__[base] = _unversioned(v3, base)

    if not binding_has_v3:

        def unversioned_v1(handle: Any) -> list[Any]:  # old bindings: the v1 symbol with the v1 struct
            gpu, mig = lookup(handle, "nvmlDeviceGetComputeRunningProcesses")
            if "v1" not in symbols:
                raise real.NVMLError_FunctionNotFound()
            return [
                real.nvmlStructToFriendlyObject(
                    _ProcInfoV1(pid=pid, usedGpuMemory=ULONGLONG_MAX if mem is None else mem)
                )
                for pid, mem, _, _ in proc_list(gpu, mig, "compute")
            ]

        mod.__dict__["nvmlDeviceGetComputeRunningProcesses"] = unversioned_v1

    def c_v1(handle_value: int, count: Any, infos: int | None) -> int:
        try:
            gpu, mig = lookup(handle_value, "nvmlDeviceGetComputeRunningProcesses(C)")
            procs = proc_list(gpu, mig, "compute")
        except real.NVMLError as exc:
            return int(exc.value)
        if not procs:
            count[0] = 0
            return real.NVML_SUCCESS
        if not infos or count[0] < len(procs):
            count[0] = len(procs)
            return real.NVML_ERROR_INSUFFICIENT_SIZE
        arr = (_ProcInfoV1 * len(procs)).from_address(infos)
        for k, (pid, mem, _, _) in enumerate(procs):
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
        if not gpu.sm_util:
            raise real.NVMLError(real.NVML_SUCCESS)  # the binding's quirk: no sample at all
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

    # -- events -------------------------------------------------------------------------------------
    event_sets: dict[int, tuple[queue.SimpleQueue[tuple[int, int]], set[int]]] = {}
    next_set = [0x7E00_0000]

    def nvmlEventSetCreate() -> Any:
        check_init("nvmlEventSetCreate")
        next_set[0] += 1
        event_sets[next_set[0]] = (queue.SimpleQueue(), set())
        return ctypes.cast(ctypes.c_void_p(next_set[0]), real.c_nvmlEventSet_t)

    def _set(eventSet: Any) -> tuple[queue.SimpleQueue[tuple[int, int]], set[int]]:
        found = event_sets.get(int(ctypes.cast(eventSet, ctypes.c_void_p).value or 0))
        if found is None:
            raise real.NVMLError_InvalidArgument()
        return found

    def nvmlDeviceRegisterEvents(handle: Any, eventTypes: int, eventSet: Any) -> None:
        gpu = gpu_of(handle, "nvmlDeviceRegisterEvents")
        if not gpu.xid_supported and eventTypes & real.nvmlEventTypeXidCriticalError:
            raise real.NVMLError_NotSupported()
        _set(eventSet)[1].add(devices.index(gpu))

    def nvmlDeviceGetSupportedEventTypes(handle: Any) -> int:
        gpu = gpu_of(handle, "nvmlDeviceGetSupportedEventTypes")
        return real.nvmlEventTypeXidCriticalError if gpu.xid_supported else 0

    def nvmlEventSetWait_v2(eventSet: Any, timeoutms: int) -> Any:
        check_init("nvmlEventSetWait_v2")
        q, _ = _set(eventSet)
        try:
            index, xid = q.get(timeout=timeoutms / 1000.0)
        except queue.Empty:
            raise real.NVMLError_Timeout() from None
        if index < 0:
            raise real.NVMLError_Unknown()
        return real.c_nvmlEventData_t(
            device=handles[index],
            eventType=real.nvmlEventTypeXidCriticalError,
            eventData=xid,
            gpuInstanceId=UINT_MAX,
            computeInstanceId=UINT_MAX,
        )

    def nvmlEventSetWait(eventSet: Any, timeoutms: int) -> Any:
        return nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetFree(eventSet: Any) -> None:
        check_init("nvmlEventSetFree")
        event_sets.pop(int(ctypes.cast(eventSet, ctypes.c_void_p).value or 0), None)

    def fire_xid(index: int, xid: int) -> None:
        """The driver reports XID ``xid`` on device ``index`` (every event set it is registered with)."""
        for q, registered in list(event_sets.values()):
            if index in registered:
                q.put((index, xid))

    mod.__dict__["fire_xid"] = fire_xid
    mod.__dict__["handles"] = handles

    for fn in (
        nvmlInit,
        nvmlShutdown,
        nvmlSystemGetDriverVersion,
        nvmlSystemGetCudaDriverVersion,
        nvmlSystemGetCudaDriverVersion_v2,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName,
        nvmlDeviceGetUUID,
        nvmlDeviceGetPciInfo,
        nvmlDeviceGetIndex,
        nvmlDeviceGetCudaComputeCapability,
        nvmlDeviceGetNumGpuCores,
        nvmlDeviceGetDriverModel,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetUtilizationRates,
        nvmlDeviceGetTemperature,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetEnforcedPowerLimit,
        nvmlDeviceGetTotalEnergyConsumption,
        nvmlDeviceGetClockInfo,
        nvmlDeviceGetMaxClockInfo,
        nvmlDeviceGetCurrentClocksEventReasons,
        nvmlDeviceGetCurrentClocksThrottleReasons,
        nvmlDeviceGetPerformanceState,
        nvmlDeviceGetPcieThroughput,
        nvmlDeviceGetFieldValues,
        nvmlDeviceGetTotalEccErrors,
        nvmlDeviceGetRetiredPages,
        nvmlDeviceGetRemappedRows,
        nvmlDeviceGetMigMode,
        nvmlDeviceGetMaxMigDeviceCount,
        nvmlDeviceGetMigDeviceHandleByIndex,
        nvmlDeviceIsMigDeviceHandle,
        nvmlDeviceGetGpuInstanceId,
        nvmlDeviceGetComputeInstanceId,
        nvmlDeviceGetDeviceHandleFromMigDeviceHandle,
        nvmlDeviceGetProcessUtilization,
        nvmlEventSetCreate,
        nvmlDeviceRegisterEvents,
        nvmlDeviceGetSupportedEventTypes,
        nvmlEventSetWait_v2,
        nvmlEventSetWait,
        nvmlEventSetFree,
    ):
        setattr(mod, fn.__name__, fn)
    if binding_has_temperature_v:
        mod.__dict__["nvmlDeviceGetTemperatureV"] = nvmlDeviceGetTemperatureV
    return mod


def from_spec(spec: dict[str, Any]) -> types.ModuleType:
    """The fake from JSON: ``{"gpus": [{"preset": "a100_80gb", <FakeGpu fields>...}], "options": {<make_fake_pynvml
    keywords>}, "timeline": [{"at": s, "gpu": i, <change>}]}``.  A change, ``at`` seconds after ``nvmlInit``:
    ``"hang": fn`` (blocks from then on, for ever), ``"delay_once": {fn: s}``, ``"lost": true``,
    ``"xid": n``, ``"set": {field: value}``.  ``init_error`` names a class (``"NVMLError_LibraryNotFound"``)."""
    gpus = []
    for g in spec.get("gpus", []):
        g = dict(g)
        preset = PRESETS[g.pop("preset", "a100_80gb")]
        for key in ("processes", "graphics", "mps"):
            if key in g:
                g[key] = [tuple(p) for p in g[key]]
        if "mig_devices" in g:
            g["mig_devices"] = [FakeMig(**m) for m in g["mig_devices"]]
        gpus.append(preset(**g))
    options = dict(spec.get("options", {}))
    if isinstance(options.get("init_error"), str):
        options["init_error"] = getattr(real, options["init_error"])
    mod = make_fake_pynvml(gpus, **options)
    timeline = sorted(spec.get("timeline", []), key=lambda c: float(c["at"]))
    if not timeline:
        return mod
    init = mod.nvmlInit

    def apply(change: dict[str, Any]) -> None:
        gpu = gpus[int(change.get("gpu", 0))]
        if "hang" in change:
            gpu.hangs[change["hang"]] = threading.Event()
        if "delay_once" in change:
            gpu.delays_once.update(change["delay_once"])
        if change.get("lost"):
            gpu.lost_after = gpu.calls
        if "xid" in change:
            mod.fire_xid(int(change.get("gpu", 0)), int(change["xid"]))
        for k, v in change.get("set", {}).items():
            setattr(gpu, k, v)

    def run(start: float) -> None:
        for change in timeline:
            time.sleep(max(0.0, start + float(change["at"]) - time.monotonic()))
            apply(change)

    def nvmlInit() -> None:
        init()
        if mod.state["init"] == 1 and not mod.__dict__.get("_timeline"):
            mod.__dict__["_timeline"] = t = threading.Thread(target=run, args=(time.monotonic(),), daemon=True)
            t.start()

    mod.__dict__["nvmlInit"] = nvmlInit
    return mod
