"""NVIDIA GPUs through NVML — the only module in the project that imports ``pynvml``.

``pynvml`` (from nvidia-ml-py) is imported lazily inside ``available()``; a test or a caller can inject
any module with the same functions (``NvidiaProbe(nvml=fake)``).  Nothing here prints: a machine
without a GPU costs one failed ``nvmlInit`` (~60 us), whose verdict is cached.

**What is recorded.**  Per device ``i`` (NVML index; a MIG instance is ``i:k``, ``k`` its index under the
parent as ``nvmlDeviceGetMigDeviceHandleByIndex`` counts):

- every tick: ``gpu_mem_used_bytes``, ``gpu_mem_total_bytes``, ``gpu_mem_reserved_bytes``
  (``nvmlDeviceGetMemoryInfo_v2`` when the driver has it, else v1: no reserved figure) — MIG instances
  too; ``gpu_util_ratio`` (share of time a kernel ran) and ``gpu_mem_util_ratio`` (share of time memory
  was read or written — bandwidth, not capacity), 0..1; ``gpu_temp_celsius`` (``nvmlDeviceGetTemperatureV``
  where binding and driver have it, else the deprecated call); ``gpu_power_watts``;
  ``gpu_energy_joules_total`` (``nvmlDeviceGetTotalEnergyConsumption``, a mJ counter since the driver
  loaded); ``gpu_sm_clock_hertz``, ``gpu_mem_clock_hertz``; ``gpu_clock_event_reasons`` (how many clock
  event reasons are active: ``nvmlDeviceGetCurrentClocksEventReasons``, the deprecated throttle call as a
  fallback; the words — power cap, thermal, HW slowdown, sync boost, idle ... — go into a
  ``gpu_clock_reasons`` event whenever the set changes); ``gpu_pstate`` (the performance state's number,
  0 = fastest: a level, not a count); ``gpu_xid_errors_total`` (XID critical errors seen since the start,
  from NVML events on their own thread; each is also a ``gpu_xid`` event and a warn note);
- every ``BUS_EVERY_S``: ``gpu_power_limit_watts`` (enforced), ``gpu_pcie_{tx,rx}_bytes_per_second`` (from
  the ``NVML_FI_DEV_PCIE_COUNT_*`` field counters; without them ``nvmlDeviceGetPcieThroughput``, which
  samples the bus for ~20 ms), ``gpu_nvlink_{tx,rx}_bytes_per_second`` (field counters per link, summed);
- every ``HEALTH_EVERY_S`` (and the first tick): ``gpu_ecc_{corrected,uncorrected}_errors_total`` (volatile:
  since the driver loaded), ``gpu_retired_pages_total`` (pre-Ampere) or ``gpu_remapped_rows_total``
  (Ampere and later; a pending remap or a failed one is a warn note), ``gpu_sm_clock_max_hertz``,
  ``gpu_mem_clock_max_hertz``; the MIG mode is checked then too (a change re-enumerates the instances and
  asks again what MIG had made unsupported);
- once, in the trace header (``describe()``): name, UUID, PCI bus id, memory total, MIG mode and instances,
  CUDA compute capability, driver and CUDA driver versions — and which devices the inference uses.

**The watched tree** (``tree``: its PIDs, asked every tick).  Compute, graphics and MPS processes are
listed (MIG instances through their own handles); per device ``gpu_tree_mem_bytes`` (the tree's memory,
summed), ``gpu_tree_sm_ratio`` (its SM utilization, summed, 0..1), ``gpu_tree_procs`` (its processes with a
context there), ``gpu_other_procs`` (other processes computing there: compute or MPS clients, not graphics;
the MPS server counts as the tree's when the tree's processes are its clients) and ``gpu_tree_cuda_devices``
(1 when the watched process's ``CUDA_VISIBLE_DEVICES`` — read from ``/proc/<root>/environ`` with
``CUDA_DEVICE_ORDER`` — shows it this device, else 0); per process ``procs[pid]["gpu_mem_bytes/i"]``,
``["gpu_sm_ratio/i"]``.  ``CUDA_VISIBLE_DEVICES`` entries are CUDA ordinals (fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID``: without libcuda the fastest-first order is estimated as compute
capability, then cores x max SM clock, then PCI bus id — exact for identical GPUs), UUIDs, UUID prefixes or
``MIG-`` UUIDs; parsing stops at the first invalid entry, as CUDA's does, and at most one MIG instance is
visible.  Where per-process figures cannot be attributed they are ``None`` with the reason (``unsupported``,
``describe()``), never 0.0: the sidecar in a PID namespace other than the initial one (NVML reports the
host's PIDs; ``/proc/self/ns/pid`` against the initial namespace's inode 4026531836), MIG instances without
the privilege to list their processes, WDDM (Windows keeps per-process memory to itself).

**Never stopped by a device.**  NVML runs off the sampler thread: each physical device has a daemon
worker thread that makes its calls, one at a time (MIG instances go through their parent's).  ``sample()``
hands every answering device its tick's job, then waits for each while the call in flight is younger than
``deadline_s``.  A call past its deadline marks the device *not answering* (a ``device_not_answering``
event, a warn note, ``None`` for its values) and the tick goes on without it; while that call hangs, the
device is not asked again (a hung call cannot be cancelled: nothing piles up behind it).  Once it returns,
the device is tried again after a back-off (1 s, doubling to 60 s; ``device_answering`` event when it
does).  ``close()`` skips ``nvmlShutdown`` while a call hangs (the workers are daemons: the sidecar exits).
Starting (``nvmlInit``, identity) runs on a thread too, with ``start_deadline_s``.

**Faults are values**, never exceptions out of ``sample()``: a query the device does not support
(``NotSupported``), may not make (``NoPermission``) or the driver lacks (``FunctionNotFound``) yields
``None``, the reason in ``self.unsupported[key]`` and a note; it is not tried again (``NotSupported`` is
asked again when the MIG mode changes, ``FunctionNotFound`` never).  A device that falls off the bus
(``GpuIsLost``, or ``Unknown`` on its handle) produces one ``device_lost`` event and ``None`` from then on.
Any other error (``Timeout`` ...) leaves that value ``None`` for this tick.  ``nvmlDeviceGetProcessUtilization``
raising ``NVMLError(0)`` (the binding's way of saying "no sample at all") or ``NotFound`` means a share of 0.

Running processes: ``nvmlDeviceGetComputeRunningProcesses`` exists as v3, v2 and v1 with different struct
layouts; a binding newer than the driver (or the reverse) reads the wrong layout and returns scrambled PIDs
and sizes (nvitop's ``api/libnvml.py`` probes the symbols for the same reason).  The first non-empty answer
decides the version once: v3, then v2, then v1, keeping the first whose records are plausible (PID within
``pid_max`` and alive here, memory within the device's total).  If every version's PIDs are plausible but not
alive, the newest is kept; if every version is absurd, the tree's GPU memory is reported as unsupported.
Graphics and MPS lists use the version decided for compute.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import psutil

from tuner.records import Event, Sample

Tree = Callable[[], Sequence[int]] | Sequence[int] | None

DEVICE_METRICS: tuple[tuple[str, str], ...] = (
    ("gpu_mem_used_bytes", "bytes"),
    ("gpu_mem_total_bytes", "bytes"),
    ("gpu_mem_reserved_bytes", "bytes"),
    ("gpu_util_ratio", "ratio"),
    ("gpu_mem_util_ratio", "ratio"),
    ("gpu_temp_celsius", "celsius"),
    ("gpu_power_watts", "watts"),
    ("gpu_energy_joules_total", "joules"),
    ("gpu_sm_clock_hertz", "hertz"),
    ("gpu_mem_clock_hertz", "hertz"),
    ("gpu_clock_event_reasons", "count"),
    ("gpu_pstate", "count"),
    ("gpu_xid_errors_total", "count"),
    ("gpu_power_limit_watts", "watts"),
    ("gpu_pcie_tx_bytes_per_second", "per_second"),
    ("gpu_pcie_rx_bytes_per_second", "per_second"),
    ("gpu_nvlink_tx_bytes_per_second", "per_second"),
    ("gpu_nvlink_rx_bytes_per_second", "per_second"),
    ("gpu_ecc_corrected_errors_total", "count"),
    ("gpu_ecc_uncorrected_errors_total", "count"),
    ("gpu_retired_pages_total", "count"),
    ("gpu_remapped_rows_total", "count"),
    ("gpu_sm_clock_max_hertz", "hertz"),
    ("gpu_mem_clock_max_hertz", "hertz"),
)
TREE_METRICS: tuple[tuple[str, str], ...] = (
    ("gpu_tree_mem_bytes", "bytes"),
    ("gpu_tree_sm_ratio", "ratio"),
    ("gpu_tree_procs", "count"),
    ("gpu_other_procs", "count"),
    ("gpu_tree_cuda_devices", "count"),
)
MIG_METRICS: tuple[tuple[str, str], ...] = (
    ("gpu_mem_used_bytes", "bytes"),
    ("gpu_mem_total_bytes", "bytes"),
)
MIG_TREE_METRICS: tuple[tuple[str, str], ...] = (
    ("gpu_tree_mem_bytes", "bytes"),
    ("gpu_tree_procs", "count"),
    ("gpu_other_procs", "count"),
    ("gpu_tree_cuda_devices", "count"),
)
BUS_KEYS = (
    "gpu_power_limit_watts",
    "gpu_pcie_tx_bytes_per_second",
    "gpu_pcie_rx_bytes_per_second",
    "gpu_nvlink_tx_bytes_per_second",
    "gpu_nvlink_rx_bytes_per_second",
)
HEALTH_KEYS = (
    "gpu_ecc_corrected_errors_total",
    "gpu_ecc_uncorrected_errors_total",
    "gpu_retired_pages_total",
    "gpu_remapped_rows_total",
    "gpu_sm_clock_max_hertz",
    "gpu_mem_clock_max_hertz",
)
TICK_KEYS = tuple(name for name, _ in DEVICE_METRICS if name not in BUS_KEYS + HEALTH_KEYS)

BUS_EVERY_S = 1.0
HEALTH_EVERY_S = 60.0
DEADLINE_S = 0.5
"""A call older than this marks its device not answering (healthy calls take microseconds; the slowest,
``nvmlDeviceGetPcieThroughput``, ~20 ms)."""
START_DEADLINE_S = 15.0
"""``nvmlInit`` and the identity reads (``nvmlInit`` alone takes seconds without persistence mode)."""
BACKOFF_S = (1.0, 60.0)
INITIAL_PID_NS = 4026531836
"""``PROC_PID_INIT_INO``: the inode of the initial PID namespace (include/linux/proc_ns.h)."""

CLOCK_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "idle"),
    (0x2, "applications clocks setting"),
    (0x4, "power cap"),
    (0x8, "HW slowdown"),
    (0x10, "sync boost"),
    (0x20, "SW thermal slowdown"),
    (0x40, "HW thermal slowdown"),
    (0x80, "HW power brake"),
    (0x100, "display clock setting"),
    (0x200, "board limit"),
    (0x400, "reliability"),
)
"""``nvmlClocksEventReason*`` bits (``nvmlClocksThrottleReason*`` for the last two) and their words."""
XID_MEANINGS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

_NVML_SUCCESS = 0
_NVML_ERROR_INSUFFICIENT_SIZE = 7
_ULONGLONG_MAX = (1 << 64) - 1
_UINT_MAX = 0xFFFFFFFF
_UTIL_WINDOW_US = 1_000_000  # process utilization: the latest sample per PID within the last second
_MPS_SERVER = "nvidia-cuda-mps-server"
_FI_PCIE_TX, _FI_PCIE_RX = 197, 198  # NVML_FI_DEV_PCIE_COUNT_{TX,RX}_BYTES (driver 535+)
_FI_NVLINK_TX, _FI_NVLINK_RX, _FI_NVLINK_LINKS = 138, 139, 91  # NVLink data KiB counters; link count


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 22  # Linux's upper limit for pid_max


@dataclass
class _Proc:
    """One compute process as NVML reports it (``usedGpuMemory`` ``None`` when not available)."""

    pid: int
    usedGpuMemory: int | None  # NVML's field name
    gpuInstanceId: int = _UINT_MAX
    computeInstanceId: int = _UINT_MAX


class _ProcInfoV1(ctypes.Structure):
    """``nvmlProcessInfo_v1_t``: the layout the unversioned C symbol fills in (pid, usedGpuMemory)."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


def _raw_v1(nvml: ModuleType) -> Callable[[Any], list[Any]]:
    """Call the unversioned C symbol with the v1 struct: newer bindings route their unversioned Python
    wrapper to v3, so an old driver with only the v1 symbol is reachable only this way."""
    get_pointer = nvml._nvmlGetFunctionPointer

    def call(handle: Any) -> list[Any]:
        fn = get_pointer("nvmlDeviceGetComputeRunningProcesses")
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        if ret == _NVML_SUCCESS:
            return []
        if ret != _NVML_ERROR_INSUFFICIENT_SIZE:
            raise nvml.NVMLError(ret)
        count.value = count.value * 2 + 5
        infos = (_ProcInfoV1 * count.value)()
        ret = fn(handle, ctypes.byref(count), infos)
        if ret != _NVML_SUCCESS:
            raise nvml.NVMLError(ret)
        out: list[Any] = []
        for k in range(count.value):
            mem = int(infos[k].usedGpuMemory)
            out.append(_Proc(int(infos[k].pid), None if mem == _ULONGLONG_MAX else mem))
        return out

    return call


class _Errors:
    """The binding's exception classes, looked up once (a fake module provides the real ones)."""

    def __init__(self, nvml: ModuleType) -> None:
        base: type[Exception] = nvml.NVMLError

        def cls(name: str) -> type[Exception]:
            found = getattr(nvml, name, None)
            return found if isinstance(found, type) else _Never

        self.base = base
        self.not_supported = cls("NVMLError_NotSupported")
        self.no_permission = cls("NVMLError_NoPermission")
        self.not_found = cls("NVMLError_NotFound")
        self.function_not_found = cls("NVMLError_FunctionNotFound")
        self.lost: tuple[type[Exception], ...] = (cls("NVMLError_GpuIsLost"), cls("NVMLError_Unknown"))
        self.library_not_found = cls("NVMLError_LibraryNotFound")
        self.driver_not_loaded = cls("NVMLError_DriverNotLoaded")
        self.timeout = cls("NVMLError_Timeout")
        self.mismatch: type[Exception] = getattr(nvml, "NVMLLibraryMismatchError", _Never)
        self.final = (self.not_supported, self.no_permission, self.function_not_found)


class _Never(Exception):
    """Stands in for an exception class a binding does not define: never raised, so never caught."""


class _Abandoned(Exception):
    """Raised inside a worker when its job was given up on (its device stopped answering)."""


# -- the deadline worker ------------------------------------------------------------------------------------
class _Job:
    __slots__ = ("abandoned", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None


class _Worker:
    """A daemon thread that makes one device's NVML calls, one at a time, and says how old the call in
    flight is (``call_started``), so the waiting side can give up on it without waiting for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._go = threading.Event()
        self._job: _Job | None = None
        self.call_started: float | None = None
        self.call_name = ""
        self.busy = False
        """True from a job's hand-over until its last call returned (an abandoned job included)."""
        self.returned_at = 0.0
        self.released_at = 0.0
        """When an abandoned job's hung call finally returned."""
        self.stopped = False
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> _Job:
        assert not self.busy
        job = _Job(fn)
        self.busy = True
        self._job = job
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"tuner-nvml-{self.name}", daemon=True)
            self._thread.start()
        self._go.set()
        return job

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One NVML call on this thread, timed for the deadline; stops the job once it was abandoned."""
        job = self._job
        if job is not None and job.abandoned:
            raise _Abandoned()
        self.call_name = getattr(fn, "__name__", "nvml")
        self.call_started = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            self.call_started = None
            if job is not None and job.abandoned:
                raise _Abandoned()

    def _run(self) -> None:
        while not self.stopped:
            self._go.wait()
            self._go.clear()
            job = self._job
            if job is None:
                continue
            try:
                job.result = job.fn()
            except _Abandoned:
                pass
            except BaseException as exc:  # reported by the waiting side
                job.error = exc
            self.returned_at = time.monotonic()
            if job.abandoned:
                self.released_at = self.returned_at
            self._job = None
            self.busy = False
            job.done.set()

    def wait(self, job: _Job, deadline: float) -> bool:
        """Wait for ``job`` while its call in flight is younger than ``deadline``; False: given up on."""
        timeout = deadline
        while not job.done.wait(timeout):
            started = self.call_started
            now = time.monotonic()
            if started is not None and now - started >= deadline:
                job.abandoned = True
                return job.done.is_set()
            timeout = deadline if started is None else max(0.001, started + deadline - now)
        return True

    def stop(self) -> None:
        self.stopped = True
        self._go.set()


def run_with_deadline(fn: Callable[[], Any], deadline: float, name: str) -> tuple[bool, Any]:
    """``fn()`` on a daemon thread; ``(False, None)`` when it did not return within ``deadline``."""
    w = _Worker(name)
    job = w.submit(fn)
    done = job.done.wait(deadline)
    w.stop()
    if not done:
        job.abandoned = True
        return False, None
    if job.error is not None:
        raise job.error
    return True, job.result


# -- devices ---------------------------------------------------------------------------------------------------
@dataclass
class _Device:
    key: str  # "0", or "0:1" for MIG instance 1 of GPU 0
    index: int  # the physical device's NVML index
    handle: Any
    parent: _Device | None = None
    total: int | None = None
    lost: bool = False
    skip: set[str] = field(default_factory=set)  # query groups not supported here (until the MIG mode changes)
    gone: set[str] = field(default_factory=set)  # the driver has no such function: never again
    unsupported: dict[str, str] = field(default_factory=dict)
    mem_v2: bool = True
    temp_v: bool = True
    reasons_v: bool = True
    fields: bool = True
    identity: dict[str, Any] = field(default_factory=dict)
    mig: list[_Device] = field(default_factory=list)
    mig_mode: bool | None = None
    gi: int | None = None
    ci: int | None = None
    nvlinks: int = 0
    max_clocks: tuple[float | None, float | None] = (None, None)
    reasons: int | None = None
    bus_at: float = -1e18
    health_at: float = -1e18
    bus_prev: dict[str, tuple[float, float]] = field(default_factory=dict)
    remap_noted: bool = False
    worker: _Worker | None = None
    # answering (physical devices)
    hung_at: float | None = None
    hung_call: str = ""
    retry_at: float = 0.0
    backoff: float = BACKOFF_S[0]
    answering_since: float = 0.0
    xids: int = 0

    def keys(self, names: Iterable[tuple[str, str]]) -> list[str]:
        return [f"{n}/{self.key}" for n, _ in names]


@dataclass
class _Out:
    """What one device's job produced this tick (handed back to the sampler thread)."""

    values: dict[str, float | None] = field(default_factory=dict)
    procs: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    lost: str | None = None


class NvidiaProbe:
    """GPU readings per device and for a process tree.  ``tree`` gives the PIDs to attribute (a callable
    is asked every tick, so a server's changing workers are followed); ``root`` is the watched process
    (its ``CUDA_VISIBLE_DEVICES``; default: the tree's first PID); ``nvml`` replaces ``pynvml``; ``proc``
    is the procfs root (tests); ``deadline_s``: see the module docstring."""

    name = "nvidia"

    def __init__(
        self,
        tree: Tree = None,
        *,
        nvml: ModuleType | None = None,
        root: int | None = None,
        proc: str = "/proc",
        deadline_s: float = DEADLINE_S,
        start_deadline_s: float = START_DEADLINE_S,
        events: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tree = tree
        self.clock = clock
        """What the 1 s and 60 s cadences are counted on (a test or bench moves it; deadlines use the real one)."""
        self.root = root
        self._proc_root = proc
        self.deadline_s = deadline_s
        self.start_deadline_s = start_deadline_s
        self._use_events = events
        self._nvml = nvml
        self._checked = False
        self._reason: str | None = None
        self._initialized = False
        self._devices: list[_Device] = []
        self._err: _Errors | None = None
        self._lock = threading.Lock()
        self._noted: set[str] = set()  # unsupported keys already in a note
        self._notes: list[tuple[str, str]] = []
        self._samples = 0
        self.proc_version: str | None = None  # "v3" | "v2" | "v1" once decided
        self.proc_note: str | None = None  # why that version (e.g. PIDs not alive here)
        self._proc_candidates: list[tuple[str, Callable[[Any], list[Any]]]] | None = None
        self._pid_max = _pid_max()
        self.attribution: str | None = None
        """Why per-process figures cannot be attributed on any device (None: they can)."""
        self.selection: dict[str, Any] = {}
        self._visible: set[str] | None = None
        self._system: dict[str, Any] = {}
        self._xid_thread: threading.Thread | None = None
        self._xid_stop = threading.Event()
        self._xid_set: Any = None
        self._xid_pending: list[tuple[int, int]] = []
        self._hung_start = False

    # -- start -----------------------------------------------------------------------------------------
    def available(self) -> str | None:
        if self._checked:
            return self._reason
        self._checked = True
        if self._nvml is None:
            try:
                import pynvml  # the project's only import of it
            except ImportError:
                self._reason = "nvidia-ml-py is not installed (no pynvml module)"
                return self._reason
            self._nvml = pynvml
        try:
            done, reason = run_with_deadline(self._start, self.start_deadline_s, "start")
        except Exception as exc:
            self.close()
            done, reason = True, f"NVML failed to start: {type(exc).__name__}: {_msg(exc)}"
        if not done:
            self._hung_start = True
            reason = f"NVML did not answer within {self.start_deadline_s:g} s while starting (a hung driver?)"
        self._reason = reason
        if reason is None and self._use_events:
            self._start_events()
        return reason

    def _start(self) -> str | None:
        nvml = self._nvml
        assert nvml is not None
        err = self._err = _Errors(nvml)
        try:
            nvml.nvmlInit()
        except err.library_not_found:
            return "no NVIDIA driver (libnvidia-ml.so not found)"
        except err.driver_not_loaded:
            return "NVIDIA driver not loaded (nvmlInit: Driver Not Loaded)"
        except err.no_permission:
            return "no permission to use the NVIDIA driver (nvmlInit: Insufficient Permissions)"
        except err.base as exc:
            return f"NVML failed to start: {_msg(exc)}"
        except OSError as exc:
            return f"NVML failed to start: {exc}"
        self._initialized = True
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except err.base as exc:
            self.close()
            return f"NVML cannot count GPUs: {_msg(exc)}"
        if count == 0:
            self.close()
            return "no NVIDIA GPU found (driver loaded, 0 devices)"
        problems: list[str] = []
        for i in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
            except err.base as exc:
                problems.append(f"GPU {i}: {_msg(exc)}")
                continue
            dev = _Device(str(i), i, handle)
            dev.worker = _Worker(str(i))
            self._devices.append(dev)
            mem = self._memory(dev, _direct)
            if mem is not None:
                dev.total = int(mem.total)
            self._identify(dev)
        if not self._devices:
            self.close()
            return "no usable NVIDIA GPU (" + "; ".join(problems) + ")"
        self._system = self._system_identity()
        self.attribution = self._check_namespace()
        if self.tree is not None:
            self.selection = self._select()
        return None

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        """An identity read: any NVML error (or a binding without the function) is None."""
        assert self._err is not None
        try:
            return fn(*args)
        except (self._err.base, AttributeError, TypeError):
            return None

    def _system_identity(self) -> dict[str, Any]:
        nvml = self._nvml
        out: dict[str, Any] = {}
        driver = self._try(lambda: nvml.nvmlSystemGetDriverVersion())  # type: ignore[union-attr]
        out["driver_version"] = _text(driver)
        cuda = self._try(lambda: nvml.nvmlSystemGetCudaDriverVersion_v2())  # type: ignore[union-attr]
        if cuda is None:
            cuda = self._try(lambda: nvml.nvmlSystemGetCudaDriverVersion())  # type: ignore[union-attr]
        out["cuda_driver_version"] = f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}" if cuda else None
        return out

    def _identify(self, dev: _Device) -> None:
        nvml = self._nvml
        assert nvml is not None
        h = dev.handle
        ident: dict[str, Any] = {"index": dev.index}
        ident["name"] = _text(self._try(nvml.nvmlDeviceGetName, h))
        ident["uuid"] = _text(self._try(nvml.nvmlDeviceGetUUID, h))
        pci = self._try(nvml.nvmlDeviceGetPciInfo, h)
        ident["pci_bus_id"] = _text(getattr(pci, "busId", None)) if pci is not None else None
        ident["memory_total_bytes"] = dev.total
        cc = self._try(nvml.nvmlDeviceGetCudaComputeCapability, h)
        ident["compute_capability"] = f"{cc[0]}.{cc[1]}" if cc else None
        ident["cores"] = self._try(getattr(nvml, "nvmlDeviceGetNumGpuCores", _missing), h)
        sm_max = self._try(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM)
        mem_max = self._try(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM)
        dev.max_clocks = (None if sm_max is None else sm_max * 1e6, None if mem_max is None else mem_max * 1e6)
        ident["sm_clock_max_hertz"], ident["mem_clock_max_hertz"] = dev.max_clocks
        model = self._try(getattr(nvml, "nvmlDeviceGetDriverModel", _missing), h)
        wddm = getattr(nvml, "NVML_DRIVER_WDDM", 0)
        ident["driver_model"] = None if model is None else ("WDDM" if model[0] == wddm else "TCC/MCDM")
        if model is not None and model[0] == wddm:
            dev.identity["wddm"] = True
        links = self._try(nvml.nvmlDeviceGetFieldValues, h, [_FI_NVLINK_LINKS])
        if links is not None and links[0].nvmlReturn == _NVML_SUCCESS:
            dev.nvlinks = int(links[0].value.uiVal)
        ident["nvlinks"] = dev.nvlinks
        dev.identity.update(ident)
        self._enumerate_mig(dev)

    def _enumerate_mig(self, dev: _Device, call: Callable[..., Any] | None = None) -> None:
        """MIG mode and instances (nvitop's way: handles by index until the first error)."""
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        call = call or _direct
        try:
            mode = call(nvml.nvmlDeviceGetMigMode, dev.handle)
            dev.mig_mode = bool(mode[0])
        except (self._err.base, AttributeError):
            dev.mig_mode = None
        dev.identity["mig_mode"] = dev.mig_mode
        dev.mig = []
        if dev.mig_mode:
            try:
                count = int(call(nvml.nvmlDeviceGetMaxMigDeviceCount, dev.handle))
            except self._err.base:
                count = 0
            for k in range(count):
                try:
                    h = call(nvml.nvmlDeviceGetMigDeviceHandleByIndex, dev.handle, k)
                except self._err.base:
                    break
                child = _Device(f"{dev.index}:{k}", dev.index, h, parent=dev)
                mem = self._try(lambda h=h: call(nvml.nvmlDeviceGetMemoryInfo, h))
                child.total = int(mem.total) if mem is not None else None
                gi = self._try(lambda h=h: call(nvml.nvmlDeviceGetGpuInstanceId, h))
                ci = self._try(lambda h=h: call(nvml.nvmlDeviceGetComputeInstanceId, h))
                child.gi = None if gi in (None, _UINT_MAX) else int(gi)
                child.ci = None if ci in (None, _UINT_MAX) else int(ci)
                child.identity = {
                    "key": child.key,
                    "uuid": _text(self._try(lambda h=h: call(nvml.nvmlDeviceGetUUID, h))),
                    "gpu_instance_id": child.gi,
                    "compute_instance_id": child.ci,
                    "memory_total_bytes": child.total,
                }
                dev.mig.append(child)
        dev.identity["mig"] = [c.identity for c in dev.mig]

    def _check_namespace(self) -> str | None:
        try:
            link = os.readlink(os.path.join(self._proc_root, "self", "ns", "pid"))
        except OSError:
            return None  # cannot tell: the plausibility checks on NVML's PIDs stand alone
        try:
            inode = int(link.split("[", 1)[1].rstrip("]"))
        except (IndexError, ValueError):
            return None
        if inode == INITIAL_PID_NS:
            return None
        return (
            f"the tuner runs in a PID namespace other than the host's ({link}): NVML reports host PIDs, "
            "which cannot be matched to the watched processes"
        )

    # -- which devices the inference uses -------------------------------------------------------------
    def _root_pid(self) -> int | None:
        """The watched process: ``root``, else the tree's first PID (the CPU probe lists roots first)."""
        if self.root is not None:
            return self.root
        try:
            pids = self.tree() if callable(self.tree) else self.tree
            return int(next(iter(pids or ())))
        except Exception:
            return None

    def _select(self) -> dict[str, Any]:
        pid = self._root_pid()
        out: dict[str, Any] = {"pid": pid}
        env: dict[str, str] | None = None
        if pid is not None:
            try:
                with open(os.path.join(self._proc_root, str(pid), "environ"), "rb") as f:
                    raw = f.read()
                env = {}
                for item in raw.split(b"\0"):
                    k, sep, v = item.partition(b"=")
                    if sep and k in (b"CUDA_VISIBLE_DEVICES", b"CUDA_DEVICE_ORDER"):
                        env[k.decode()] = v.decode(errors="replace")
            except OSError as exc:
                out["reason"] = f"cannot read /proc/{pid}/environ ({exc.strerror or exc})"
        else:
            out["reason"] = "no watched process"
        if env is None:
            return out
        cvd, order = env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER") or "FASTEST_FIRST"
        out["cuda_visible_devices"], out["cuda_device_order"] = cvd, order
        ordered, exact = cuda_order([d.identity for d in self._devices], order)
        out["cuda_order"] = [str(i) for i in ordered]
        if not exact:
            out["order_note"] = (
                "the GPUs differ and CUDA's fastest-first order is estimated (compute capability, cores x clock, "
                "PCI bus id); set CUDA_DEVICE_ORDER=PCI_BUS_ID for an exact mapping"
            )
        visible = resolve_visible(cvd, ordered, [d.identity for d in self._devices])
        out["visible"] = visible
        self._visible = set(visible)
        return out

    def _start_events(self) -> None:
        nvml = self._nvml
        err = self._err
        assert nvml is not None and err is not None
        create = getattr(nvml, "nvmlEventSetCreate", None)
        xid = getattr(nvml, "nvmlEventTypeXidCriticalError", None)
        if create is None or xid is None:
            for dev in self._devices:
                dev.unsupported.setdefault(f"gpu_xid_errors_total/{dev.key}", "this pynvml has no NVML events")
            return
        try:
            ok, event_set = run_with_deadline(create, self.deadline_s, "events")
        except err.base as exc:
            ok, event_set = True, None
            for dev in self._devices:
                dev.unsupported.setdefault(f"gpu_xid_errors_total/{dev.key}", f"{_msg(exc)} (nvmlEventSetCreate)")
        if not ok or event_set is None:
            return

        def register() -> list[_Device]:
            done = []
            for dev in self._devices:
                try:
                    nvml.nvmlDeviceRegisterEvents(dev.handle, xid, event_set)
                    done.append(dev)
                except err.base as exc:
                    reason = f"{_msg(exc)} (NVML, GPU {dev.key})"
                    dev.unsupported.setdefault(f"gpu_xid_errors_total/{dev.key}", reason)
            return done

        ok, registered = run_with_deadline(register, self.deadline_s * len(self._devices), "events")
        if not ok:
            return  # the driver hangs already: no events (the devices will say so when sampled)
        if not registered:
            self._try(nvml.nvmlEventSetFree, event_set)
            return
        self._xid_set = event_set
        self._xid_thread = threading.Thread(
            target=self._watch_xids, args=(event_set, registered), name="tuner-nvml-xid", daemon=True
        )
        self._xid_thread.start()

    def _watch_xids(self, event_set: Any, devices: list[_Device]) -> None:
        nvml = self._nvml
        err = self._err
        assert nvml is not None and err is not None
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        by_address = {_address(d.handle): d for d in devices}
        while not self._xid_stop.is_set():
            try:
                data = wait(event_set, 500)
            except err.timeout:
                continue
            except err.base as exc:
                with self._lock:
                    self._notes.append((f"XID events no longer watched: {_msg(exc)}", "warn"))
                return
            dev = by_address.get(_address(data.device))
            if dev is not None:
                with self._lock:
                    self._xid_pending.append((dev.index, int(data.eventData)))

    # -- contract --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, str]:
        if self.available() is not None:
            return {}
        out: dict[str, str] = {}
        for dev in self._devices:
            for name, unit in DEVICE_METRICS:
                out[f"{name}/{dev.key}"] = unit
            if self.tree is not None:
                for name, unit in TREE_METRICS:
                    out[f"{name}/{dev.key}"] = unit
            for child in dev.mig:
                for name, unit in MIG_METRICS:
                    out[f"{name}/{child.key}"] = unit
                if self.tree is not None:
                    for name, unit in MIG_TREE_METRICS:
                        out[f"{name}/{child.key}"] = unit
        return out

    @property
    def unsupported(self) -> dict[str, str]:
        """Metric key -> why it is not read (a copy)."""
        out: dict[str, str] = {}
        for dev in self._devices:
            out.update(dev.unsupported)
            for child in dev.mig:
                out.update(child.unsupported)
        return out

    def describe(self) -> dict[str, Any]:
        """What the trace header keeps: the devices' identity, which devices the inference uses and why
        per-process figures are missing where they are."""
        devices = []
        for dev in self._devices:
            ident = {k: v for k, v in dev.identity.items() if k != "wddm"}
            devices.append(ident)
        out: dict[str, Any] = {**self._system, "devices": devices}
        if self.tree is not None:
            out["selection"] = dict(self.selection)
            out["attribution"] = self.attribution or self._attribution_reasons() or None
        return out

    def _attribution_reasons(self) -> str | None:
        reasons = sorted({v for k, v in self.unsupported.items() if k.startswith("gpu_tree_mem_bytes/")})
        return "; ".join(reasons) if reasons else None

    def summary(self) -> str:
        """One line for ``tuner probes``."""
        names = ", ".join(f"GPU {d.key} {d.identity.get('name') or '?'}" for d in self._devices)
        driver = self._system.get("driver_version")
        cuda = self._system.get("cuda_driver_version")
        extra = f" (driver {driver}, CUDA {cuda})" if driver else ""
        visible = self.selection.get("visible")
        used = f"; the process sees {', '.join(visible) if visible else 'none'}" if visible is not None else ""
        return names + extra + used

    def take_notes(self) -> list[tuple[str, str]]:
        """Notes for the trace since the last call: ``[(message, level)]``."""
        with self._lock:
            out, self._notes = self._notes, []
        return out

    def _note_unsupported(self) -> None:
        current = self.unsupported
        new = [k for k in current if k not in self._noted]
        if not new:
            return
        by_reason: dict[str, list[str]] = {}
        for k in new:
            self._noted.add(k)
            by_reason.setdefault(current[k], []).append(k)
        level = "warn" if self._samples else "info"
        with self._lock:
            for reason, keys in by_reason.items():
                self._notes.append((f"{', '.join(keys)} not sampled from now on: {reason}", level))

    def close(self) -> None:
        self._xid_stop.set()
        hung = self._hung_start or any(d.worker is not None and d.worker.busy for d in self._devices)
        for dev in self._devices:
            if dev.worker is not None:
                dev.worker.stop()
        xid = self._xid_thread
        if xid is not None:
            xid.join(0.6)  # its wait times out every 0.5 s
        if self._initialized and self._nvml is not None:
            self._initialized = False
            if hung:
                return  # a call is still in the driver: shutting down could wait for it
            nvml = self._nvml

            def shutdown() -> None:
                if self._xid_set is not None and (xid is None or not xid.is_alive()):
                    nvml.nvmlEventSetFree(self._xid_set)
                nvml.nvmlShutdown()

            try:
                run_with_deadline(shutdown, 1.0, "shutdown")
            except Exception:  # shutting down must never fail the caller
                pass

    # -- one tick ------------------------------------------------------------------------------------------
    def sample(self, now: float) -> Sample:
        if self.available() is not None:
            return Sample(self.name, now, {})
        values: dict[str, float | None] = {}
        procs: dict[int, dict[str, Any]] = {}
        events: list[Event] = []
        tree = self._tree_pids()
        mono = self.clock()
        jobs: list[tuple[_Device, _Job]] = []
        for dev in self._devices:
            w = dev.worker
            assert w is not None
            if dev.hung_at is not None and not w.busy and dev.retry_at == float("inf"):
                dev.retry_at = w.released_at + dev.backoff  # the hung call returned: try again after a back-off
            if dev.lost or w.busy or (dev.hung_at is not None and time.monotonic() < dev.retry_at):
                self._fill_none(dev, values)
                continue
            jobs.append((dev, w.submit(self._job(dev, tree, mono))))
        for dev, job in jobs:
            w = dev.worker
            assert w is not None
            if not w.wait(job, self.deadline_s):
                self._stopped_answering(dev, w, now, events)
                self._fill_none(dev, values)
                continue
            if job.error is not None:
                raise job.error
            out: _Out = job.result
            if dev.hung_at is not None:
                self._answers_again(dev, now, events)
            if time.monotonic() - dev.answering_since > HEALTH_EVERY_S:
                dev.backoff = BACKOFF_S[0]
            values.update(out.values)
            for pid, pv in out.procs.items():
                procs.setdefault(pid, {}).update(pv)
            events.extend(Event(now, kind, data) for kind, data in out.events)
            with self._lock:
                self._notes.extend(out.notes)
            if out.lost is not None:
                events.append(Event(now, "device_lost", {"device": dev.index, "error": out.lost}))
                with self._lock:
                    self._notes.append(
                        (f"GPU {dev.key} lost ({out.lost}): its values are None from now on; the others go on", "warn")
                    )
                self._fill_none(dev, values)
        self._take_xids(now, values, events)
        self._note_unsupported()
        self._samples += 1
        return Sample(self.name, now, values, procs or None, tuple(events))

    def _job(self, dev: _Device, tree: set[int] | None, mono: float) -> Callable[[], _Out]:
        return lambda: self._sample_device(dev, tree, mono, dev.worker)

    def _fill_none(self, dev: _Device, values: dict[str, float | None]) -> None:
        for name in TICK_KEYS:
            values[f"{name}/{dev.key}"] = None
        if self.tree is not None:
            for name, _ in TREE_METRICS:
                values[f"{name}/{dev.key}"] = None
        for child in dev.mig:
            for name, _ in MIG_METRICS:
                values[f"{name}/{child.key}"] = None
            if self.tree is not None:
                for name, _ in MIG_TREE_METRICS:
                    values[f"{name}/{child.key}"] = None
        values[f"gpu_xid_errors_total/{dev.key}"] = float(dev.xids)

    def _stopped_answering(self, dev: _Device, w: _Worker, now: float, events: list[Event]) -> None:
        call = w.call_name
        if dev.hung_at is None:
            events.append(Event(now, "device_not_answering", {"device": dev.index, "call": call,
                                                              "deadline_s": self.deadline_s}))  # fmt: skip
            with self._lock:
                self._notes.append((
                    f"GPU {dev.key} not answering: {call} took longer than {self.deadline_s:g} s; its values are None "
                    "and it is not asked again until that call returns (then after a back-off); the rest goes on",
                    "warn",
                ))  # fmt: skip
        else:  # a retry hung again: wait longer before the next one
            dev.backoff = min(BACKOFF_S[1], dev.backoff * 2)
        dev.hung_at = time.monotonic()
        dev.hung_call = call
        dev.retry_at = float("inf")  # set once the hung call returns (sample() sees the worker idle)

    def _answers_again(self, dev: _Device, now: float, events: list[Event]) -> None:
        assert dev.hung_at is not None
        took = time.monotonic() - dev.hung_at
        events.append(Event(now, "device_answering", {"device": dev.index, "after_s": round(took, 3)}))
        with self._lock:
            self._notes.append((f"GPU {dev.key} answers again ({dev.hung_call} had hung; {took:.1f} s without it)",
                                "info"))  # fmt: skip
        dev.hung_at = None
        dev.answering_since = time.monotonic()

    def _take_xids(self, now: float, values: dict[str, float | None], events: list[Event]) -> None:
        with self._lock:
            pending, self._xid_pending = self._xid_pending, []
        for index, xid in pending:
            dev = next((d for d in self._devices if d.index == index), None)
            if dev is None:
                continue
            dev.xids += 1
            meaning = XID_MEANINGS.get(xid, "see NVIDIA's XID catalog")
            events.append(Event(now, "gpu_xid", {"device": index, "xid": xid, "meaning": meaning}))
            with self._lock:
                self._notes.append((f"GPU {dev.key} reported XID {xid} ({meaning})", "warn"))
        for dev in self._devices:
            key = f"gpu_xid_errors_total/{dev.key}"
            if key not in dev.unsupported:
                values[key] = float(dev.xids)

    # -- one device (on its worker) --------------------------------------------------------------------
    def _sample_device(self, dev: _Device, tree: set[int] | None, mono: float, w: _Worker | None) -> _Out:
        out = _Out()
        call = w.call if w is not None else _direct
        nvml = self._nvml
        assert nvml is not None
        k = dev.key
        v = out.values
        if mono - dev.health_at >= HEALTH_EVERY_S:  # first: it notices a MIG mode switch
            dev.health_at = mono
            self._health(dev, out, call)
        mem = self._memory(dev, call, out)
        v[f"gpu_mem_used_bytes/{k}"] = _num(mem, "used")
        v[f"gpu_mem_total_bytes/{k}"] = _num(mem, "total")
        v[f"gpu_mem_reserved_bytes/{k}"] = _num(mem, "reserved") if dev.mem_v2 else None
        util = self._query(dev, out, call, "util", ("gpu_util_ratio", "gpu_mem_util_ratio"),
                           nvml.nvmlDeviceGetUtilizationRates)  # fmt: skip
        v[f"gpu_util_ratio/{k}"] = _pct(_num(util, "gpu"))
        v[f"gpu_mem_util_ratio/{k}"] = _pct(_num(util, "memory"))
        v[f"gpu_temp_celsius/{k}"] = _float(self._temperature(dev, out, call))
        power = self._query(dev, out, call, "power", ("gpu_power_watts",), nvml.nvmlDeviceGetPowerUsage)
        v[f"gpu_power_watts/{k}"] = None if power is None else power / 1000.0
        energy = self._query(dev, out, call, "energy", ("gpu_energy_joules_total",),
                             nvml.nvmlDeviceGetTotalEnergyConsumption)  # fmt: skip
        v[f"gpu_energy_joules_total/{k}"] = None if energy is None else energy / 1000.0
        sm = self._query(dev, out, call, "sm_clock", ("gpu_sm_clock_hertz",), nvml.nvmlDeviceGetClockInfo,
                         nvml.NVML_CLOCK_SM)  # fmt: skip
        v[f"gpu_sm_clock_hertz/{k}"] = None if sm is None else sm * 1e6
        memclk = self._query(dev, out, call, "mem_clock", ("gpu_mem_clock_hertz",), nvml.nvmlDeviceGetClockInfo,
                             nvml.NVML_CLOCK_MEM)  # fmt: skip
        v[f"gpu_mem_clock_hertz/{k}"] = None if memclk is None else memclk * 1e6
        self._clock_reasons(dev, out, call)
        pstate = self._query(dev, out, call, "pstate", ("gpu_pstate",), nvml.nvmlDeviceGetPerformanceState)
        v[f"gpu_pstate/{k}"] = None if pstate is None or pstate > 15 else float(pstate)  # 32: unknown
        if mono - dev.bus_at >= BUS_EVERY_S:
            dev.bus_at = mono
            self._bus(dev, out, call)
        for child in dev.mig:
            cmem = self._memory(child, call, out)
            v[f"gpu_mem_used_bytes/{child.key}"] = _num(cmem, "used")
            v[f"gpu_mem_total_bytes/{child.key}"] = _num(cmem, "total")
        if self.tree is not None:
            self._sample_tree(dev, tree, out, call)
        if dev.lost:  # lost during this tick: nothing it said this tick is trusted
            for key in list(v):
                if key.endswith(f"/{k}") or f"/{k}:" in key:
                    v[key] = None
            out.procs.clear()
        return out

    def _memory(self, dev: _Device, call: Callable[..., Any], out: _Out | None = None) -> Any:
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        keys = ("gpu_mem_used_bytes", "gpu_mem_total_bytes")
        version = getattr(nvml, "nvmlMemory_v2", None)
        owner = dev.parent or dev
        if dev.mem_v2 and version is not None and not owner.lost and "mem" not in dev.skip:
            try:
                return call(nvml.nvmlDeviceGetMemoryInfo, dev.handle, version=version)
            except (self._err.function_not_found, self._err.not_supported, TypeError) as exc:
                dev.mem_v2 = False  # an older driver (or binding): v1 has no reserved figure
                dev.unsupported.setdefault(
                    f"gpu_mem_reserved_bytes/{dev.key}", f"nvmlDeviceGetMemoryInfo_v2 unavailable ({_msg(exc)})"
                )
            except _Abandoned:
                raise
            except self._err.base as exc:
                self._failed(dev, out, "mem", keys, exc)
                return None
        elif version is None and dev.mem_v2:
            dev.mem_v2 = False
            reason = "this pynvml has no nvmlDeviceGetMemoryInfo_v2"
            dev.unsupported.setdefault(f"gpu_mem_reserved_bytes/{dev.key}", reason)
        return self._query(dev, out, call, "mem", keys, nvml.nvmlDeviceGetMemoryInfo)

    def _query(
        self,
        dev: _Device,
        out: _Out | None,
        call: Callable[..., Any],
        what: str,
        names: Sequence[str],
        fn: Callable[..., Any],
        *args: Any,
        not_found: Any = None,
    ) -> Any:
        """One NVML call for one device; faults become ``None`` (and are remembered as described above)."""
        owner = dev.parent or dev
        if owner.lost or what in dev.skip or what in dev.gone:
            return None
        assert self._err is not None
        try:
            return call(fn, dev.handle, *args)
        except _Abandoned:
            raise
        except self._err.not_found:
            return not_found
        except self._err.base as exc:
            if getattr(exc, "value", None) == _NVML_SUCCESS and not_found is not None:
                return not_found  # NVMLError(0): the binding's way of saying "no samples at all"
            self._failed(dev, out, what, names, exc)
            return None

    def _failed(self, dev: _Device, out: _Out | None, what: str, names: Sequence[str], exc: BaseException) -> None:
        err = self._err
        assert err is not None
        owner = dev.parent or dev
        if isinstance(exc, err.lost):
            if not owner.lost:
                owner.lost = True
                if out is not None:
                    out.lost = _msg(exc)
        elif isinstance(exc, err.final):
            (dev.gone if isinstance(exc, err.function_not_found) else dev.skip).add(what)
            for name in names:
                key = name if "/" in name else f"{name}/{dev.key}"
                dev.unsupported.setdefault(key, f"{_msg(exc)} (NVML, GPU {dev.key})")
        # anything else (Timeout, InsufficientResources, ...) is this tick's None only

    def _temperature(self, dev: _Device, out: _Out, call: Callable[..., Any]) -> Any:
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        fn_v = getattr(nvml, "nvmlDeviceGetTemperatureV", None)
        if dev.temp_v and fn_v is not None and "temp" not in dev.skip and not dev.lost:
            try:
                return call(fn_v, dev.handle, nvml.NVML_TEMPERATURE_GPU)
            except (self._err.function_not_found, TypeError):
                dev.temp_v = False  # an older driver: the deprecated call from now on
            except _Abandoned:
                raise
            except self._err.base as exc:
                self._failed(dev, out, "temp", ("gpu_temp_celsius",), exc)
                return None
        else:
            dev.temp_v = False
        return self._query(dev, out, call, "temp", ("gpu_temp_celsius",), nvml.nvmlDeviceGetTemperature,
                           nvml.NVML_TEMPERATURE_GPU)  # fmt: skip

    def _clock_reasons(self, dev: _Device, out: _Out, call: Callable[..., Any]) -> None:
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        key = f"gpu_clock_event_reasons/{dev.key}"
        mask = None
        new = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if dev.reasons_v and new is not None and "reasons" not in dev.skip and not dev.lost:
            try:
                mask = call(new, dev.handle)
            except self._err.function_not_found:
                dev.reasons_v = False
            except _Abandoned:
                raise
            except self._err.base as exc:
                self._failed(dev, out, "reasons", ("gpu_clock_event_reasons",), exc)
                out.values[key] = None
                return
        else:
            dev.reasons_v = False
        if not dev.reasons_v:
            mask = self._query(dev, out, call, "reasons", ("gpu_clock_event_reasons",),
                               nvml.nvmlDeviceGetCurrentClocksThrottleReasons)  # fmt: skip
        if mask is None:
            out.values[key] = None
            return
        mask = int(mask)
        if dev.reasons is None and not mask:
            dev.reasons = 0
        words = clock_reason_words(mask)
        out.values[key] = float(len(words))
        if mask != dev.reasons and (dev.reasons is not None or mask):  # a change, or reasons at the start
            dev.reasons = mask
            out.events.append(("gpu_clock_reasons", {"device": dev.index, "reasons": words, "mask": mask}))

    def _bus(self, dev: _Device, out: _Out, call: Callable[..., Any]) -> None:
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        v, k = out.values, dev.key
        limit = self._query(dev, out, call, "power_limit", ("gpu_power_limit_watts",),
                            nvml.nvmlDeviceGetEnforcedPowerLimit)  # fmt: skip
        v[f"gpu_power_limit_watts/{k}"] = None if limit is None else limit / 1000.0
        ids: list[Any] = []
        if dev.fields:
            ids = [_FI_PCIE_TX, _FI_PCIE_RX]
            ids += [(_FI_NVLINK_TX, i) for i in range(dev.nvlinks)] + [(_FI_NVLINK_RX, i) for i in range(dev.nvlinks)]
        got = self._query(dev, out, call, "fields", (), nvml.nvmlDeviceGetFieldValues, ids) if ids else None
        if got is None and dev.fields and ("fields" in dev.gone or "fields" in dev.skip):
            dev.fields = False
        counters: dict[str, tuple[float, float] | None] = {"pcie_tx": None, "pcie_rx": None}
        if got is not None:
            nv_tx = nv_rx = 0.0
            nv_ok = dev.nvlinks > 0
            for fv in got:
                ok = fv.nvmlReturn == _NVML_SUCCESS
                t = float(fv.timestamp) / 1e6
                if fv.fieldId == _FI_PCIE_TX:
                    counters["pcie_tx"] = (t, float(fv.value.ullVal)) if ok else None
                elif fv.fieldId == _FI_PCIE_RX:
                    counters["pcie_rx"] = (t, float(fv.value.ullVal)) if ok else None
                elif fv.fieldId == _FI_NVLINK_TX:
                    nv_ok = nv_ok and ok
                    nv_tx += float(fv.value.ullVal) * 1024.0 if ok else 0.0
                    t_nv = t
                elif fv.fieldId == _FI_NVLINK_RX:
                    nv_ok = nv_ok and ok
                    nv_rx += float(fv.value.ullVal) * 1024.0 if ok else 0.0
            if nv_ok:
                counters["nvlink_tx"], counters["nvlink_rx"] = (t_nv, nv_tx), (t_nv, nv_rx)
        for name in ("nvlink_tx", "nvlink_rx"):
            key = f"gpu_{name}_bytes_per_second/{k}"
            if name in counters:
                v[key] = self._rate(dev, name, counters[name])
            else:
                v[key] = None
                reason = "no NVLink on this device" if not dev.nvlinks else "the driver gives no NVLink counters"
                dev.unsupported.setdefault(key, f"{reason} (GPU {k})")
        if counters["pcie_tx"] is not None and counters["pcie_rx"] is not None:
            v[f"gpu_pcie_tx_bytes_per_second/{k}"] = self._rate(dev, "pcie_tx", counters["pcie_tx"])
            v[f"gpu_pcie_rx_bytes_per_second/{k}"] = self._rate(dev, "pcie_rx", counters["pcie_rx"])
            return
        tx = self._query(dev, out, call, "pcie", ("gpu_pcie_tx_bytes_per_second", "gpu_pcie_rx_bytes_per_second"),
                         nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_TX_BYTES)  # fmt: skip
        rx = None
        if tx is not None:
            rx = self._query(dev, out, call, "pcie", ("gpu_pcie_rx_bytes_per_second",),
                             nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_RX_BYTES)  # fmt: skip
        v[f"gpu_pcie_tx_bytes_per_second/{k}"] = None if tx is None else tx * 1024.0  # KiB/s (20 ms sample)
        v[f"gpu_pcie_rx_bytes_per_second/{k}"] = None if rx is None else rx * 1024.0

    @staticmethod
    def _rate(dev: _Device, name: str, now: tuple[float, float] | None) -> float | None:
        if now is None:
            dev.bus_prev.pop(name, None)
            return None
        prev = dev.bus_prev.get(name)
        dev.bus_prev[name] = now
        if prev is None or now[0] <= prev[0] or now[1] < prev[1]:
            return None  # the first reading (a rate needs two) or a counter reset
        return (now[1] - prev[1]) / (now[0] - prev[0])

    def _health(self, dev: _Device, out: _Out, call: Callable[..., Any]) -> None:
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        v, k = out.values, dev.key
        v[f"gpu_sm_clock_max_hertz/{k}"], v[f"gpu_mem_clock_max_hertz/{k}"] = dev.max_clocks
        ecc = ("gpu_ecc_corrected_errors_total", "gpu_ecc_uncorrected_errors_total")
        corr = self._query(dev, out, call, "ecc", ecc, nvml.nvmlDeviceGetTotalEccErrors,
                           nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC)  # fmt: skip
        unc = None if corr is None else self._query(
            dev, out, call, "ecc", (), nvml.nvmlDeviceGetTotalEccErrors, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC)  # fmt: skip
        v[f"gpu_ecc_corrected_errors_total/{k}"] = _float(corr)
        v[f"gpu_ecc_uncorrected_errors_total/{k}"] = _float(unc)
        pages = None
        for cause in (nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                      nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR):  # fmt: skip
            got = self._query(dev, out, call, "retired", ("gpu_retired_pages_total",), nvml.nvmlDeviceGetRetiredPages,
                              cause)  # fmt: skip
            if got is None:
                pages = None
                break
            pages = (pages or 0) + len(got)
        v[f"gpu_retired_pages_total/{k}"] = _float(pages)
        rows = self._query(dev, out, call, "remapped", ("gpu_remapped_rows_total",), nvml.nvmlDeviceGetRemappedRows)
        v[f"gpu_remapped_rows_total/{k}"] = None if rows is None else float(rows[0] + rows[1])
        if rows is not None and (rows[2] or rows[3]) and not dev.remap_noted:
            dev.remap_noted = True
            what = "a row remapping failed" if rows[3] else "a row remapping is pending (reset the GPU to apply it)"
            out.notes.append((f"GPU {k}: {what}", "warn"))
        before = dev.mig_mode
        if before is not None:
            try:
                mode = bool(call(nvml.nvmlDeviceGetMigMode, dev.handle)[0])
            except _Abandoned:
                raise
            except self._err.base:
                mode = before
            if mode != before:
                dev.skip.clear()  # what MIG made unsupported may work now (and the reverse)
                for child in dev.mig:
                    self._drop_keys(child.unsupported)
                self._drop_keys(dev.unsupported)
                self._enumerate_mig(dev, call)
                state = "on" if mode else "off"
                out.notes.append((f"GPU {k}: MIG mode switched {state}; {len(dev.mig)} MIG instances", "warn"))

    def _drop_keys(self, unsupported: dict[str, str]) -> None:
        for key in list(unsupported):
            if "Function Not Found" in unsupported[key] or "this pynvml" in unsupported[key]:
                continue
            del unsupported[key]
            self._noted.discard(key)

    # -- the process tree ---------------------------------------------------------------------------------
    def _tree_pids(self) -> set[int] | None:
        if self.tree is None:
            return None
        try:
            pids = self.tree() if callable(self.tree) else self.tree
            return {int(p) for p in pids}
        except Exception:  # the tree's owner failing must not fail this probe
            return None

    def _unattributed(self, dev: _Device) -> str | None:
        if self.attribution is not None:
            return self.attribution
        if dev.identity.get("wddm"):
            return f"WDDM: Windows manages GPU {dev.key}'s memory and NVML reports no per-process figures"
        return None

    def _sample_tree(self, dev: _Device, tree: set[int] | None, out: _Out, call: Callable[..., Any]) -> None:
        v, k = out.values, dev.key
        for d in (dev, *dev.mig):
            v[f"gpu_tree_cuda_devices/{d.key}"] = None if self._visible is None else float(d.key in self._visible)
            v[f"gpu_tree_mem_bytes/{d.key}"] = v[f"gpu_tree_procs/{d.key}"] = v[f"gpu_other_procs/{d.key}"] = None
        v[f"gpu_tree_sm_ratio/{k}"] = None
        if self._visible is None and self.selection.get("reason"):
            for d in (dev, *dev.mig):
                d.unsupported.setdefault(f"gpu_tree_cuda_devices/{d.key}", str(self.selection["reason"]))
        if tree is None or dev.lost:
            return
        why = self._unattributed(dev)
        if why is not None:
            for d in (dev, *dev.mig):
                for name, _ in TREE_METRICS if d is dev else MIG_TREE_METRICS:
                    if name != "gpu_tree_cuda_devices":
                        d.unsupported.setdefault(f"{name}/{d.key}", why)
            return
        running = self._processes(dev, out, call)
        on_device = self._attribute(dev, running, tree, out)
        for child in dev.mig:
            self._attribute(child, self._processes(child, out, call), tree, out)
        sm_key = f"gpu_tree_sm_ratio/{k}"
        if on_device is not None and not on_device:
            v[sm_key] = 0.0  # none of the tree has a context here: nothing to ask NVML
            return
        nvml = self._nvml
        assert nvml is not None
        stamp = time.time_ns() // 1000 - _UTIL_WINDOW_US  # NVML takes a CPU epoch time in us (wall clock)
        samples = self._query(dev, out, call, "proc_util", ("gpu_tree_sm_ratio",), nvml.nvmlDeviceGetProcessUtilization,
                              stamp, not_found=[])  # fmt: skip
        if samples is None:
            return
        # NotFound / NVMLError(0) / an empty list: no process used the SMs within the window -> a share of 0.
        latest: dict[int, tuple[int, int]] = {}
        for s in samples:
            pid, ts, smu = int(s.pid), int(s.timeStamp), int(s.smUtil)
            if pid in tree and 0 <= smu <= 100 and (pid not in latest or ts >= latest[pid][0]):
                latest[pid] = (ts, smu)
        for pid, (_, smu) in latest.items():
            out.procs.setdefault(pid, {})[f"gpu_sm_ratio/{k}"] = smu / 100.0
        v[sm_key] = min(1.0, sum(smu for _, smu in latest.values()) / 100.0)

    def _attribute(
        self, dev: _Device, running: dict[str, list[Any]] | None, tree: set[int], out: _Out
    ) -> set[int] | None:
        """The tree's memory and processes on ``dev`` from its process lists; the PIDs of the tree found."""
        v, k = out.values, dev.key
        if running is None:
            return None
        mem: dict[int, int | None] = {}
        compute: set[int] = set()
        for kind, procs in running.items():
            for p in procs:
                pid = int(p.pid)
                m = p.usedGpuMemory
                if pid not in mem or (m is not None and (mem[pid] is None or m > (mem[pid] or 0))):
                    mem[pid] = None if m is None else int(m)
                if kind != "graphics":
                    compute.add(pid)
        ours = {pid for pid in mem if pid in tree}
        others = compute - ours
        if others and ours & {int(p.pid) for p in running.get("mps", ())}:
            others = {pid for pid in others if _name(pid) != _MPS_SERVER}  # the clients' server works for them
        total = 0.0
        known = True
        for pid in ours:
            m = mem[pid]
            if m is None:
                known = False
            else:
                total += m
            out.procs.setdefault(pid, {})[f"gpu_mem_bytes/{k}"] = None if m is None else float(m)
        v[f"gpu_tree_mem_bytes/{k}"] = total if known else None
        if not known:
            owner = dev.parent or dev
            reason = (
                f"MIG without privileges: NVML gives no per-process memory on GPU {owner.key}'s instances"
                if owner.mig_mode
                else f"NVML reports no per-process memory on GPU {k}"
            )
            dev.unsupported.setdefault(f"gpu_tree_mem_bytes/{k}", reason)
        v[f"gpu_tree_procs/{k}"] = float(len(ours))
        v[f"gpu_other_procs/{k}"] = float(len(others))
        return ours

    def _processes(self, dev: _Device, out: _Out, call: Callable[..., Any]) -> dict[str, list[Any]] | None:
        """Compute, graphics and MPS processes on ``dev`` (None: the compute list is not available)."""
        compute = self._running_processes(dev, out, call)
        if compute is None:
            return None
        got: dict[str, list[Any]] = {"compute": compute}
        if dev.parent is not None:
            return got  # a MIG instance: its compute list is the whole story
        nvml = self._nvml
        assert nvml is not None
        version = self.proc_version or "v3"
        for kind, base in (("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
                           ("mps", "nvmlDeviceGetMPSComputeRunningProcesses")):  # fmt: skip
            fn = getattr(nvml, f"{base}_{version}", None) if version != "v1" else None
            if fn is None and not hasattr(nvml, f"{base}_v3"):
                fn = getattr(nvml, base, None)  # an old binding's unversioned (v1) wrapper
            if fn is None or kind in dev.skip or kind in dev.gone:
                continue
            found = self._query(dev, out, call, kind, (), fn)
            if found is None and (kind in dev.skip or kind in dev.gone):
                out.notes.append((f"GPU {dev.key}: no {kind} process list ({self._why(dev, kind)}); "
                                  "compute processes only", "info"))  # fmt: skip
            got[kind] = list(found or ())
        return got

    def _why(self, dev: _Device, kind: str) -> str:
        return "the driver lacks it" if kind in dev.gone else "not supported or not permitted"

    def _running_processes(self, dev: _Device, out: _Out, call: Callable[..., Any]) -> list[Any] | None:
        key = f"gpu_tree_mem_bytes/{dev.key}"
        candidates = self._process_queries()
        if self.proc_version is not None:
            fn = dict(candidates)[self.proc_version]
            if dev.parent is not None and "procs" in dev.skip:
                return None
            got = self._query(dev, out, call, "procs", (key,), fn)
            if got is None and dev.parent is not None and "procs" in dev.skip:
                dev.unsupported[key] = (
                    f"MIG without privileges: NVML does not list the processes of instance {dev.key} for this user"
                )
            return got  # type: ignore[no-any-return]
        owner = dev.parent or dev
        if owner.lost or "procs" in dev.skip:
            return None
        err = self._err
        assert err is not None
        fallback: tuple[str, list[Any]] | None = None
        tried: list[str] = []
        for label, fn in list(candidates):
            try:
                found = list(call(fn, dev.handle))
            except _Abandoned:
                raise
            except (err.function_not_found, err.mismatch, AttributeError) as exc:
                with self._lock:
                    if (label, fn) in candidates:
                        candidates.remove((label, fn))  # the driver (or binding) has no such version
                tried.append(f"{label} missing ({_msg(exc)})")
                continue
            except err.base as exc:
                self._failed(dev, out, "procs", (key,), exc)
                if dev.parent is not None and "procs" in dev.skip:
                    dev.unsupported[key] = (
                        f"MIG without privileges: NVML does not list the processes of instance {dev.key} for this user"
                    )
                return None
            if not found:
                return found  # nothing to validate: decide on the first non-empty answer
            verdict = self._check(found, dev)
            if verdict == "ok":
                self._decide(label, None)
                return found
            tried.append(f"{label} {verdict}")
            if verdict == "not alive" and fallback is None:
                fallback = (label, found)
        if fallback is not None:
            self._decide(fallback[0], "PIDs from NVML are not alive here (another PID namespace?): " + "; ".join(tried))
            return fallback[1]
        reason = "no usable nvmlDeviceGetComputeRunningProcesses: " + ("; ".join(tried) or "none in this pynvml")
        for d in self._devices:
            for x in (d, *d.mig):
                x.skip.add("procs")
                x.unsupported.setdefault(f"gpu_tree_mem_bytes/{x.key}", reason)
        return None

    def _decide(self, label: str, note: str | None) -> None:
        with self._lock:
            if self.proc_version is None:
                self.proc_version = label
                self.proc_note = note

    def _check(self, found: Sequence[Any], dev: _Device) -> str:
        """``ok``, ``absurd`` (a layout mismatch: impossible PIDs or sizes) or ``not alive``."""
        alive = True
        total = dev.total or (dev.parent.total if dev.parent is not None else None)
        for p in found:
            pid, mem = getattr(p, "pid", None), getattr(p, "usedGpuMemory", None)
            if not isinstance(pid, int) or not 0 < pid <= self._pid_max:
                return "absurd"
            if mem is not None and (not isinstance(mem, int) or mem < 0 or (total and mem > total)):
                return "absurd"
            if alive and not psutil.pid_exists(pid):
                alive = False
        return "ok" if alive else "not alive"

    def _process_queries(self) -> list[tuple[str, Callable[[Any], list[Any]]]]:
        if self._proc_candidates is None:
            nvml = self._nvml
            assert nvml is not None
            found: list[tuple[str, Callable[[Any], list[Any]]]] = []
            for label in ("v3", "v2"):
                fn = getattr(nvml, f"nvmlDeviceGetComputeRunningProcesses_{label}", None)
                if fn is not None:
                    found.append((label, fn))
            if callable(getattr(nvml, "_nvmlGetFunctionPointer", None)):
                found.append(("v1", _raw_v1(nvml)))
            elif not hasattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v3"):
                fn = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None)
                if fn is not None:  # an old binding: its unversioned wrapper is the v1 call
                    found.append(("v1", fn))
            self._proc_candidates = found
        return self._proc_candidates


# -- CUDA's view of the devices ---------------------------------------------------------------------------
def cuda_order(devices: Sequence[dict[str, Any]], order: str) -> tuple[list[int], bool]:
    """NVML indices in CUDA's enumeration order, and whether that order is exact.  ``PCI_BUS_ID``: by bus
    id.  ``FASTEST_FIRST`` (CUDA's default; its heuristic is not published): by compute capability, then
    cores x max SM clock, then bus id — exact when all devices are the same model."""
    def bus(d: dict[str, Any]) -> str:
        return str(d.get("pci_bus_id") or "").lower()

    if order.strip().upper() == "PCI_BUS_ID":
        return [int(d["index"]) for d in sorted(devices, key=bus)], True

    def speed(d: dict[str, Any]) -> tuple[float, float, str]:
        cc = str(d.get("compute_capability") or "0.0")
        try:
            major, minor = (int(x) for x in cc.split(".", 1))
        except ValueError:
            major = minor = 0
        cores = float(d.get("cores") or 0) * float(d.get("sm_clock_max_hertz") or 0)
        return (-(major * 10 + minor), -cores, bus(d))

    same = len({d.get("name") for d in devices}) <= 1
    return [int(d["index"]) for d in sorted(devices, key=speed)], same


def resolve_visible(cvd: str | None, ordered: Sequence[int], devices: Sequence[dict[str, Any]]) -> list[str]:
    """Device keys (``"1"``, ``"0:2"``) CUDA shows a process with this ``CUDA_VISIBLE_DEVICES``, in its
    ordinal order.  Unset: every device.  Entries are ordinals (into ``ordered``), ``GPU-`` UUIDs or unique
    prefixes of them, ``MIG-`` UUIDs (or prefixes); the first entry that names nothing ends the list, as in
    CUDA, and a device named twice makes it empty.  A GPU in MIG mode shows its first instance; once a MIG
    instance is visible, it is the only device (CUDA enumerates one MIG instance at most)."""
    by_index = {int(d["index"]): d for d in devices}
    if cvd is None:
        entries: list[str] = [str(i) for i in range(len(ordered))]
    else:
        entries = [e.strip() for e in cvd.split(",")]
    chosen: list[str] = []
    for entry in entries:
        key = _resolve_entry(entry, ordered, by_index)
        if key is None:
            break
        if key in chosen:
            return []  # a device named twice: CUDA refuses the list (as nvitop's parser does)
        chosen.append(key)
    out: list[str] = []
    for key in chosen:
        if ":" in key:
            return [key]
        d = by_index[int(key)]
        if d.get("mig_mode"):
            migs = d.get("mig") or []
            if migs:
                return [str(migs[0]["key"])]
            continue  # a GPU in MIG mode without instances: nothing to run on
        out.append(key)
    return out


def _resolve_entry(entry: str, ordered: Sequence[int], by_index: dict[int, dict[str, Any]]) -> str | None:
    """One ``CUDA_VISIBLE_DEVICES`` entry as a device key, or None when it names nothing.  Like CUDA (and
    nvitop's parser), an entry starting with a number is that ordinal, whatever follows it."""
    e = entry.strip()
    if not e:
        return None
    if e[0].isdigit() or (len(e) > 1 and e[0] in "+-" and e[1].isdigit()):
        j = 1
        while j < len(e) and e[j].isdigit():
            j += 1
        k = int(e[:j])
        return str(ordered[k]) if 0 <= k < len(ordered) else None
    low = e.lower()
    if low.startswith("mig-"):
        rest = low[4:]
        if rest.startswith("gpu-") and "/" in rest:  # MIG-GPU-<uuid>/<gi>/<ci> (drivers before R470)
            parent, _, ids = rest[4:].partition("/")
            gi, _, ci = ids.partition("/")
            hits = [
                str(m["key"])
                for d in by_index.values()
                if str(d.get("uuid") or "").lower()[4:].startswith(parent)
                for m in d.get("mig") or []
                if str(m.get("gpu_instance_id")) == gi and str(m.get("compute_instance_id")) == ci
            ]
        else:
            hits = [
                str(m["key"])
                for d in by_index.values()
                for m in d.get("mig") or []
                if str(m.get("uuid") or "").lower()[4:].startswith(rest)
            ]
        return hits[0] if len(hits) == 1 else None
    if low.startswith("gpu-"):
        rest = low[4:]
        hits = [str(i) for i, d in by_index.items() if str(d.get("uuid") or "").lower()[4:].startswith(rest)]
        return hits[0] if len(hits) == 1 else None
    return None


def clock_reason_words(mask: int) -> list[str]:
    """``nvmlClocksEventReason*`` bits as words: ``0x24`` -> ``["power cap", "SW thermal slowdown"]``."""
    words = [word for bit, word in CLOCK_REASONS if mask & bit]
    rest = mask & ~sum(bit for bit, _ in CLOCK_REASONS)
    if rest:
        words.append(f"other (0x{rest:x})")
    return words


# -- helpers ------------------------------------------------------------------------------------------------
def _direct(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return fn(*args, **kw)


def _missing(*args: Any) -> Any:
    raise AttributeError("not in this pynvml")


def _address(handle: Any) -> int:
    try:
        return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return ""


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return str(v)


def _msg(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library
        text = ""
    return " ".join((text or type(exc).__name__).split())


def _num(obj: Any, attr: str) -> float | None:
    if obj is None:
        return None
    value = getattr(obj, attr, None)
    return None if value is None else float(value)


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _pct(value: float | None) -> float | None:
    return None if value is None else value / 100.0
