"""NVIDIA GPUs through NVML — the only module in the project that imports ``pynvml``.

``pynvml`` (from nvidia-ml-py) is imported lazily inside ``available()``; a test or a caller can inject
any module with the same functions (``NvidiaProbe(nvml=fake)``).  Nothing here prints: a machine
without a GPU costs one failed ``nvmlInit`` (~60 us), whose verdict is cached.

Per device ``i`` (NVML index):

- ``gpu_mem_used_bytes/i``, ``gpu_mem_total_bytes/i``, ``gpu_mem_reserved_bytes/i`` —
  ``nvmlDeviceGetMemoryInfo_v2`` when the driver has it, else v1 (no reserved figure: ``None``);
- ``gpu_util_ratio/i`` (share of time a kernel ran), ``gpu_mem_util_ratio/i`` (share of time device memory
  was read or written — bandwidth, not capacity), both 0..1, ``gpu_temp_celsius/i``, ``gpu_power_watts/i``,
  ``gpu_sm_clock_hertz/i``;
- with a process tree: ``gpu_tree_mem_bytes/i`` (the tree's compute processes' memory, summed) and
  ``gpu_tree_sm_ratio/i`` (their SM utilization, summed, 0..1); per process
  ``procs[pid] = {"gpu_mem_bytes/i": .., "gpu_sm_ratio/i": ..}``.

Faults are values, never exceptions out of ``sample()``:

- a query the device does not support (MIG, WDDM: ``NVMLError_NotSupported``), may not make
  (``NoPermission``) or the driver lacks (``FunctionNotFound``) yields ``None``; the reason is kept in
  ``self.unsupported[key]`` and the query is not tried again;
- a device that falls off the bus (``GpuIsLost``, or ``Unknown`` on its handle) produces one
  ``device_lost`` event and ``None`` for all its values from then on;
- any other NVML error leaves that value ``None`` for this tick only.

Each of these is also a note for the trace (``take_notes()``, see ``tuner.sampler``): a query found
unsupported while sampling (``warn`` once sampling is under way — a call that worked before — ``info`` at
the first reading), a device lost (``warn``).  The other devices and probes are sampled on.

Running processes: ``nvmlDeviceGetComputeRunningProcesses`` exists as v3, v2 and v1 with different
struct layouts; a binding newer than the driver (or the reverse) reads the wrong layout and returns
scrambled PIDs and sizes (nvitop's ``api/libnvml.py`` probes the symbols for the same reason).  The
first non-empty answer decides the version once: v3, then v2, then v1, keeping the first whose records
are plausible (PID within ``pid_max`` and alive here, memory within the device's total).  If every
version's PIDs are plausible but not alive (a container with its own PID namespace sees host PIDs), the
newest is kept; if every version is absurd, the tree's GPU memory is reported as unsupported.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
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
    ("gpu_sm_clock_hertz", "hertz"),
)
TREE_METRICS: tuple[tuple[str, str], ...] = (
    ("gpu_tree_mem_bytes", "bytes"),
    ("gpu_tree_sm_ratio", "ratio"),
)

_NVML_SUCCESS = 0
_NVML_ERROR_INSUFFICIENT_SIZE = 7
_ULONGLONG_MAX = (1 << 64) - 1
_UTIL_WINDOW_US = 1_000_000  # process utilization: the latest sample per PID within the last second


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
        self.mismatch: type[Exception] = getattr(nvml, "NVMLLibraryMismatchError", _Never)


class _Never(Exception):
    """Stands in for an exception class a binding does not define: never raised, so never caught."""


@dataclass
class _Device:
    index: int
    handle: Any
    total: int | None = None
    lost: bool = False
    skip: set[str] = field(default_factory=set)  # queries that are not supported here
    mem_v2: bool = True


class NvidiaProbe:
    """GPU readings per device and for a process tree.  ``tree`` gives the PIDs to attribute (a callable
    is asked every tick, so a server's changing workers are followed); ``nvml`` replaces ``pynvml``."""

    name = "nvidia"

    def __init__(self, tree: Tree = None, *, nvml: ModuleType | None = None) -> None:
        self.tree = tree
        self._nvml = nvml
        self._checked = False
        self._reason: str | None = None
        self._initialized = False
        self._devices: list[_Device] = []
        self._err: _Errors | None = None
        self._events: list[Event] = []
        self._lost_pending: list[tuple[int, str]] = []
        self.unsupported: dict[str, str] = {}
        self._noted: set[str] = set()  # unsupported keys already in a note
        self._notes: list[tuple[str, str]] = []
        self._samples = 0
        self.proc_version: str | None = None  # "v3" | "v2" | "v1" once decided
        self.proc_note: str | None = None  # why that version (e.g. PIDs not alive here)
        self._proc_candidates: list[tuple[str, Callable[[Any], list[Any]]]] | None = None
        self._pid_max = _pid_max()

    # -- start -----------------------------------------------------------------------------------------
    def available(self) -> str | None:
        if self._checked:
            return self._reason
        self._checked = True
        self._reason = self._start()
        return self._reason

    def _start(self) -> str | None:
        if self._nvml is None:
            try:
                import pynvml  # the project's only import of it
            except ImportError:
                return "nvidia-ml-py is not installed (no pynvml module)"
            self._nvml = pynvml
        nvml = self._nvml
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
            dev = _Device(i, handle)
            self._devices.append(dev)
            mem = self._memory(dev)
            if mem is not None:
                dev.total = int(mem.total)
        if not self._devices:
            self.close()
            return "no usable NVIDIA GPU (" + "; ".join(problems) + ")"
        return None

    # -- contract --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, str]:
        if self.available() is not None:
            return {}
        out: dict[str, str] = {}
        for dev in self._devices:
            for name, unit in DEVICE_METRICS:
                out[f"{name}/{dev.index}"] = unit
            if self.tree is not None:
                for name, unit in TREE_METRICS:
                    out[f"{name}/{dev.index}"] = unit
        return out

    def sample(self, now: float) -> Sample:
        if self.available() is not None:
            return Sample(self.name, now, {})
        values: dict[str, float | None] = {}
        procs: dict[int, dict[str, Any]] = {}
        tree = self._tree_pids()
        for dev in self._devices:
            self._sample_device(dev, values)
            if self.tree is not None:
                self._sample_tree(dev, tree, values, procs)
            if dev.lost:  # lost during this tick: nothing it said this tick is trusted
                for key in list(values):
                    if key.endswith(f"/{dev.index}"):
                        values[key] = None
        events = tuple(Event(now, "device_lost", {"device": i, "error": e}) for i, e in self._lost_pending)
        for i, e in self._lost_pending:
            self._notes.append((f"GPU {i} lost ({e}): its values are None from now on; the others go on", "warn"))
        self._lost_pending.clear()
        self._note_unsupported()
        self._samples += 1
        return Sample(self.name, now, values, procs or None, events)

    def take_notes(self) -> list[tuple[str, str]]:
        """Notes for the trace since the last call: ``[(message, level)]``."""
        out, self._notes = self._notes, []
        return out

    def _note_unsupported(self) -> None:
        new = [k for k in self.unsupported if k not in self._noted]
        if not new:
            return
        by_reason: dict[str, list[str]] = {}
        for k in new:
            self._noted.add(k)
            by_reason.setdefault(self.unsupported[k], []).append(k)
        level = "warn" if self._samples else "info"
        for reason, keys in by_reason.items():
            self._notes.append((f"{', '.join(keys)} not sampled from now on: {reason}", level))

    def close(self) -> None:
        if self._initialized and self._nvml is not None:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down must never fail the caller
                pass

    # -- one device -------------------------------------------------------------------------------------
    def _sample_device(self, dev: _Device, values: dict[str, float | None]) -> None:
        nvml = self._nvml
        assert nvml is not None
        i = dev.index
        mem = self._memory(dev)
        values[f"gpu_mem_used_bytes/{i}"] = _num(mem, "used")
        values[f"gpu_mem_total_bytes/{i}"] = _num(mem, "total")
        values[f"gpu_mem_reserved_bytes/{i}"] = _num(mem, "reserved") if dev.mem_v2 else None
        util = self._query(
            dev, "util", (f"gpu_util_ratio/{i}", f"gpu_mem_util_ratio/{i}"), nvml.nvmlDeviceGetUtilizationRates
        )
        values[f"gpu_util_ratio/{i}"] = _pct(_num(util, "gpu"))
        values[f"gpu_mem_util_ratio/{i}"] = _pct(_num(util, "memory"))
        temp = self._query(
            dev, "temp", (f"gpu_temp_celsius/{i}",), nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU
        )
        values[f"gpu_temp_celsius/{i}"] = None if temp is None else float(temp)
        power = self._query(dev, "power", (f"gpu_power_watts/{i}",), nvml.nvmlDeviceGetPowerUsage)
        values[f"gpu_power_watts/{i}"] = None if power is None else power / 1000.0
        clock = self._query(
            dev, "sm_clock", (f"gpu_sm_clock_hertz/{i}",), nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM
        )
        values[f"gpu_sm_clock_hertz/{i}"] = None if clock is None else clock * 1e6

    def _memory(self, dev: _Device) -> Any:
        nvml = self._nvml
        assert nvml is not None and self._err is not None
        keys = (f"gpu_mem_used_bytes/{dev.index}", f"gpu_mem_total_bytes/{dev.index}")
        version = getattr(nvml, "nvmlMemory_v2", None)
        if dev.mem_v2 and version is not None and not dev.lost and "mem" not in dev.skip:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(dev.handle, version=version)
            except (self._err.function_not_found, self._err.not_supported, TypeError) as exc:
                dev.mem_v2 = False  # an older driver (or binding): v1 has no reserved figure
                self.unsupported.setdefault(
                    f"gpu_mem_reserved_bytes/{dev.index}", f"nvmlDeviceGetMemoryInfo_v2 unavailable ({_msg(exc)})"
                )
            except self._err.base as exc:
                self._failed(dev, "mem", keys, exc)
                return None
        elif version is None and dev.mem_v2:
            dev.mem_v2 = False
            self.unsupported.setdefault(
                f"gpu_mem_reserved_bytes/{dev.index}", "this pynvml has no nvmlDeviceGetMemoryInfo_v2"
            )
        return self._query(dev, "mem", keys, nvml.nvmlDeviceGetMemoryInfo, dev.handle, pass_handle=False)

    def _query(
        self,
        dev: _Device,
        what: str,
        keys: Sequence[str],
        fn: Callable[..., Any],
        *args: Any,
        pass_handle: bool = True,
        not_found: Any = None,
    ) -> Any:
        """One NVML call for one device; faults become ``None`` (and are remembered as described above)."""
        if dev.lost or what in dev.skip:
            return None
        assert self._err is not None
        try:
            return fn(dev.handle, *args) if pass_handle else fn(*args)
        except self._err.not_found:
            return not_found
        except self._err.base as exc:
            if getattr(exc, "value", None) == _NVML_SUCCESS and not_found is not None:
                return not_found  # NVMLError(0): the binding's way of saying "no samples at all"
            self._failed(dev, what, keys, exc)
            return None

    def _failed(self, dev: _Device, what: str, keys: Sequence[str], exc: BaseException) -> None:
        err = self._err
        assert err is not None
        if isinstance(exc, err.lost):
            if not dev.lost:
                dev.lost = True
                self._lost_pending.append((dev.index, _msg(exc)))
        elif isinstance(exc, (err.not_supported, err.no_permission, err.function_not_found)):
            dev.skip.add(what)
            for key in keys:
                self.unsupported.setdefault(key, f"{_msg(exc)} (NVML, GPU {dev.index})")
        # anything else (Timeout, InsufficientResources, ...) is this tick's None only

    # -- the process tree ---------------------------------------------------------------------------------
    def _tree_pids(self) -> set[int] | None:
        if self.tree is None:
            return None
        try:
            pids = self.tree() if callable(self.tree) else self.tree
            return {int(p) for p in pids}
        except Exception:  # the tree's owner failing must not fail this probe
            return None

    def _sample_tree(
        self,
        dev: _Device,
        tree: set[int] | None,
        values: dict[str, float | None],
        procs: dict[int, dict[str, Any]],
    ) -> None:
        i = dev.index
        mem_key, sm_key = f"gpu_tree_mem_bytes/{i}", f"gpu_tree_sm_ratio/{i}"
        values[mem_key] = values[sm_key] = None
        if tree is None or dev.lost:
            return
        running = self._running_processes(dev)
        on_device = None
        if running is not None:
            on_device = {int(p.pid) for p in running} & tree
            total = 0
            known = True
            for p in running:
                pid = int(p.pid)
                if pid not in tree:
                    continue
                mem = p.usedGpuMemory
                if mem is None:
                    known = False
                else:
                    total += int(mem)
                procs.setdefault(pid, {})[f"gpu_mem_bytes/{i}"] = None if mem is None else float(mem)
            values[mem_key] = float(total) if known else None
        if on_device is not None and not on_device:
            values[sm_key] = 0.0  # none of the tree has a context here: nothing to ask NVML
            return
        assert self._nvml is not None
        stamp = time.time_ns() // 1000 - _UTIL_WINDOW_US  # NVML takes a CPU epoch time in us (wall clock)
        samples = self._query(
            dev, "proc_util", (sm_key,), self._nvml.nvmlDeviceGetProcessUtilization, stamp, not_found=[]
        )
        if samples is None:
            return
        # NotFound / an empty list: no process used the SMs within the window -> the tree's share is 0.
        latest: dict[int, tuple[int, int]] = {}
        for s in samples:
            pid, ts, sm = int(s.pid), int(s.timeStamp), int(s.smUtil)
            if pid in tree and 0 <= sm <= 100 and (pid not in latest or ts >= latest[pid][0]):
                latest[pid] = (ts, sm)
        for pid, (_, sm) in latest.items():
            procs.setdefault(pid, {})[f"gpu_sm_ratio/{i}"] = sm / 100.0
        values[sm_key] = min(1.0, sum(sm for _, sm in latest.values()) / 100.0)

    def _running_processes(self, dev: _Device) -> list[Any] | None:
        key = f"gpu_tree_mem_bytes/{dev.index}"
        candidates = self._process_queries()
        if self.proc_version is not None:
            fn = dict(candidates)[self.proc_version]
            return self._query(dev, "procs", (key,), fn)  # type: ignore[no-any-return]
        if dev.lost or "procs" in dev.skip:
            return None
        err = self._err
        assert err is not None
        fallback: tuple[str, list[Any]] | None = None
        tried: list[str] = []
        for label, fn in list(candidates):
            try:
                found = list(fn(dev.handle))
            except (err.function_not_found, err.mismatch, AttributeError) as exc:
                candidates.remove((label, fn))  # the driver (or binding) has no such version
                tried.append(f"{label} missing ({_msg(exc)})")
                continue
            except err.base as exc:
                self._failed(dev, "procs", (key,), exc)
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
            d.skip.add("procs")
            self.unsupported.setdefault(f"gpu_tree_mem_bytes/{d.index}", reason)
        return None

    def _decide(self, label: str, note: str | None) -> None:
        self.proc_version = label
        self.proc_note = note

    def _check(self, found: Sequence[Any], dev: _Device) -> str:
        """``ok``, ``absurd`` (a layout mismatch: impossible PIDs or sizes) or ``not alive``."""
        alive = True
        for p in found:
            pid, mem = getattr(p, "pid", None), getattr(p, "usedGpuMemory", None)
            if not isinstance(pid, int) or not 0 < pid <= self._pid_max:
                return "absurd"
            if mem is not None and (not isinstance(mem, int) or mem < 0 or (dev.total and mem > dev.total)):
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


def _pct(value: float | None) -> float | None:
    return None if value is None else value / 100.0
