"""NPUs: Huawei Ascend through ``npu-smi``, Intel NPUs through the ``ivpu`` driver's sysfs files.

Ascend (``AscendNpuProbe``, name ``npu``): ``npu-smi info`` prints one table — per NPU a row with its
id, name, health, power (W), temperature (C) and hugepages, then a row per chip with its bus id, AICore
(%), DDR memory and HBM memory (``used / total`` MB) — and a process table (NPU, chip, PID, name,
memory MB).  Running it costs a subprocess (tens of milliseconds), so a background thread runs it at most
every ``every_s`` seconds and ``sample()`` returns the last parsed reading: a tick never waits on it.  A
failure (timeout, non-zero exit, output that does not parse) makes the values ``None`` and produces one
``npu_smi_failed`` event per run of failures.  When the table has no AICore figure for an NPU,
``npu-smi info -t usages -i N`` (``Aicore Usage Rate(%)``) fills it in.

Values per NPU id ``i``: ``npu_mem_used_bytes/i``, ``npu_mem_total_bytes/i`` (HBM, or DDR on cards
without HBM; chips summed), ``npu_util_ratio/i`` (AICore, mean over chips, 0..1),
``npu_temp_celsius/i``, ``npu_power_watts/i``; with a process tree ``npu_tree_mem_bytes/i`` and
``procs[pid]["npu_mem_bytes/i"]``.

Intel (``IntelNpuProbe``, name ``intel_npu``): the ``ivpu`` driver exposes
``/sys/class/accel/accelN/device/npu_busy_time_us`` (time the NPU spent executing jobs) and, on newer
kernels, ``npu_memory_utilization`` (bytes the NPU has allocated, from system RAM).  Utilization is
Δbusy / Δwall (monotonic) between two samples: ``npu_util_ratio/accelN``; memory
``npu_mem_used_bytes/accelN``.  The files are kept open and re-read with ``pread`` (sysfs regenerates
the value on every read from offset 0).  Reading them takes locks the driver's job submission also takes
(the driver's documentation recommends reading the busy time about once a second), so they are read at
most every ``every_s`` (default 1 s) and ticks in between repeat the last reading.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.records import Event, Sample

Tree = Callable[[], Sequence[int]] | Sequence[int] | None
MB = 1 << 20  # npu-smi's "MB" are MiB (a 64 GiB HBM shows 65536)
RUN_TIMEOUT_S = 5.0

ASCEND_METRICS: tuple[tuple[str, str], ...] = (
    ("npu_mem_used_bytes", "bytes"),
    ("npu_mem_total_bytes", "bytes"),
    ("npu_util_ratio", "ratio"),
    ("npu_temp_celsius", "celsius"),
    ("npu_power_watts", "watts"),
)


class NpuSmiError(ValueError):
    """``npu-smi`` output that cannot be read; the message says what was wrong (one line)."""


# -- npu-smi parsing --------------------------------------------------------------------------------------
@dataclass
class AscendChip:
    chip: int
    bus_id: str
    aicore_pct: float | None = None
    mem_used_mb: float | None = None  # HBM, or DDR when the card has no HBM
    mem_total_mb: float | None = None


@dataclass
class AscendNpu:
    npu: int
    name: str
    health: str
    power_w: float | None = None
    temp_c: float | None = None
    chips: list[AscendChip] = field(default_factory=list)

    @property
    def mem_used_mb(self) -> float | None:
        return _sum_known([c.mem_used_mb for c in self.chips])

    @property
    def mem_total_mb(self) -> float | None:
        return _sum_known([c.mem_total_mb for c in self.chips])

    @property
    def aicore_pct(self) -> float | None:
        known = [c.aicore_pct for c in self.chips if c.aicore_pct is not None]
        return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class AscendProcess:
    npu: int
    chip: int
    pid: int
    name: str
    mem_mb: float | None


@dataclass
class AscendInfo:
    npus: dict[int, AscendNpu]
    processes: list[AscendProcess]


_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_SLASH = re.compile(r"\s*/\s*")


def _cells(line: str) -> list[str] | None:
    """``| a | b |`` -> ``['a', 'b']``; ``None`` for frame lines (``+---``, ``+===``) and blanks."""
    text = line.strip()
    if not text.startswith("|"):
        return None
    parts = [c.strip() for c in text.strip("|").split("|")]
    return parts


def _number(token: str, what: str, lineno: int) -> float | None:
    if token.upper() in ("NA", "N/A", "-", "--"):
        return None
    try:
        return float(token)
    except ValueError:
        raise NpuSmiError(f"npu-smi info line {lineno}: {what} is {token!r}, not a number") from None


def _pair(token: str, what: str, lineno: int) -> tuple[float | None, float | None]:
    """``'59356/65536'`` -> ``(59356.0, 65536.0)``."""
    used, sep, total = token.partition("/")
    if not sep:
        raise NpuSmiError(f"npu-smi info line {lineno}: {what} is {token!r}, not 'used / total'")
    return _number(used, what, lineno), _number(total, what, lineno)


def _columns(cell: str, names: Sequence[str], lineno: int) -> dict[str, str]:
    tokens = _SLASH.sub("/", cell).split()
    if len(tokens) > len(names):
        raise NpuSmiError(f"npu-smi info line {lineno}: {len(tokens)} values under {len(names)} headings")
    return dict(zip(names, tokens, strict=False))  # a card may print fewer columns (no HBM)


def parse_info(text: str) -> AscendInfo:
    """Parse ``npu-smi info``.  Raises ``NpuSmiError`` (one line) on output it cannot make sense of."""
    npu_names: list[str] | None = None
    chip_names: list[str] | None = None
    in_procs = False
    npus: dict[int, AscendNpu] = {}
    processes: list[AscendProcess] = []
    current: AscendNpu | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        cells = _cells(line)
        if cells is None or not any(cells):
            continue
        head = cells[0]
        if head.startswith("NPU") and len(cells) >= 4 and "process" in " ".join(cells[1:]).lower():
            in_procs = True  # the process table's heading
            continue
        if head.startswith("NPU") and "Name" in head and len(cells) >= 3:
            npu_names = cells[2].split()
            in_procs = False
            continue
        if head.startswith("Chip") and len(cells) >= 3:
            chip_names = cells[2].split()
            continue
        if head.startswith("npu-smi") or head.lower().startswith("no running processes"):
            continue
        if in_procs:
            processes.append(_process_row(cells, lineno))
            continue
        if len(cells) != 3:
            raise NpuSmiError(f"npu-smi info line {lineno}: expected 3 columns, found {len(cells)}: {line.strip()!r}")
        if npu_names is None or chip_names is None:
            raise NpuSmiError(f"npu-smi info line {lineno}: a device row before the table's headings")
        ids = head.split()
        if not ids or not ids[0].isdigit():
            raise NpuSmiError(f"npu-smi info line {lineno}: {head!r} does not start with an NPU or chip id")
        if _BUS_ID.match(cells[1]):  # a chip row: chip id, bus id, AICore, memory
            if current is None:
                raise NpuSmiError(f"npu-smi info line {lineno}: a chip row before any NPU row")
            current.chips.append(_chip_row(int(ids[0]), cells, chip_names, lineno))
            continue
        if len(ids) < 2:
            raise NpuSmiError(f"npu-smi info line {lineno}: NPU row {head!r} has no name")
        current = _npu_row(int(ids[0]), " ".join(ids[1:]), cells, npu_names, lineno)
        if current.npu in npus:
            raise NpuSmiError(f"npu-smi info line {lineno}: NPU {current.npu} listed twice")
        npus[current.npu] = current
    if not npus:
        raise NpuSmiError("npu-smi info: no NPU rows found (not the output of 'npu-smi info'?)")
    for npu in npus.values():
        if not npu.chips:
            raise NpuSmiError(f"npu-smi info: NPU {npu.npu} has no chip row (output cut short?)")
    return AscendInfo(npus, processes)


def _npu_row(npu: int, name: str, cells: list[str], names: Sequence[str], lineno: int) -> AscendNpu:
    cols = _columns(cells[2], names, lineno)
    out = AscendNpu(npu, name, cells[1])
    for key, token in cols.items():
        if key.startswith("Power"):
            out.power_w = _number(token, key, lineno)
        elif key.startswith("Temp"):
            out.temp_c = _number(token, key, lineno)
    if "Power(W)" in names and "Power(W)" not in cols:
        raise NpuSmiError(f"npu-smi info line {lineno}: NPU {npu} row has no power value (output cut short?)")
    return out


def _chip_row(chip: int, cells: list[str], names: Sequence[str], lineno: int) -> AscendChip:
    cols = _columns(cells[2], names, lineno)
    out = AscendChip(chip, cells[1])
    hbm = ddr = None
    for key, token in cols.items():
        if key.startswith("AICore"):
            out.aicore_pct = _number(token, key, lineno)
        elif key.startswith("HBM"):
            hbm = _pair(token, key, lineno)
        elif key.startswith("Memory"):
            ddr = _pair(token, key, lineno)
    if any(n.startswith("HBM") for n in names) and hbm is None:
        raise NpuSmiError(f"npu-smi info line {lineno}: chip row has no HBM value (output cut short?)")
    used_total = hbm if hbm is not None and hbm[1] else ddr
    if used_total is not None:
        out.mem_used_mb, out.mem_total_mb = used_total
    return out


def _process_row(cells: list[str], lineno: int) -> AscendProcess:
    if len(cells) < 4:
        raise NpuSmiError(f"npu-smi info line {lineno}: process row with {len(cells)} columns")
    ids = cells[0].split()
    if len(ids) < 2 or not (ids[0].isdigit() and ids[1].isdigit()) or not cells[1].isdigit():
        raise NpuSmiError(
            f"npu-smi info line {lineno}: process row {cells[0]!r} | {cells[1]!r} is not 'NPU Chip | PID'"
        )
    return AscendProcess(int(ids[0]), int(ids[1]), int(cells[1]), cells[2], _number(cells[3], "memory", lineno))


def parse_usages(text: str) -> dict[str, float | None]:
    """Parse ``npu-smi info -t usages -i N``: ``Key(unit) : value`` lines -> ``{key: value}``."""
    out: dict[str, float | None] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            continue
        token = value.split()[0] if value.split() else ""
        out[key] = _number(token, key, lineno) if token else None
    if not out:
        raise NpuSmiError("npu-smi info -t usages: no 'key : value' lines")
    return out


def _sum_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _run_npu_smi(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    if done.returncode != 0:
        msg = " ".join((done.stderr or done.stdout).split())[:200]
        raise NpuSmiError(f"{' '.join(cmd)} exited with {done.returncode}: {msg or 'no output'}")
    return done.stdout


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"npu-smi did not answer within {exc.timeout:g} s"
    return " ".join(f"{exc}".split()) or type(exc).__name__


# -- Ascend probe -----------------------------------------------------------------------------------------
class AscendNpuProbe:
    """Ascend NPUs through ``npu-smi``.  ``run`` executes a command and returns its stdout (raising on
    failure); ``which`` finds ``npu-smi``; ``every_s`` is the least time between two runs."""

    name = "npu"

    def __init__(
        self,
        tree: Tree = None,
        *,
        run: Callable[[list[str]], str] | None = None,
        which: Callable[[str], str | None] = shutil.which,
        every_s: float = 1.0,
    ) -> None:
        self.tree = tree
        self._run = run or _run_npu_smi
        self._which = which
        self.every_s = every_s
        self._exe = "npu-smi"
        self._checked = False
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._info: AscendInfo | None = None
        self._ids: list[int] = []
        self._failing: str | None = None  # the current failure, while runs keep failing
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0  # successful runs, for tests and `tuner probes`

    def available(self) -> str | None:
        if not self._checked:
            self._checked = True
            self._reason = self._check()
        return self._reason

    def _check(self) -> str | None:
        exe = self._which("npu-smi")
        if exe is None:
            return "no Ascend NPU (npu-smi not found on PATH)"
        self._exe = exe
        try:
            info = self._read()  # once, synchronously: the devices and whether npu-smi works at all
        except (NpuSmiError, subprocess.SubprocessError, OSError) as exc:
            return f"npu-smi info failed: {_describe(exc)}"
        self._ids = sorted(info.npus)
        self._store(info)
        return None

    def metrics(self) -> dict[str, str]:
        if self.available() is not None:
            return {}
        out = {f"{name}/{i}": unit for i in self._ids for name, unit in ASCEND_METRICS}
        if self.tree is not None:
            out.update({f"npu_tree_mem_bytes/{i}": "bytes" for i in self._ids})
        return out

    def sample(self, now: float) -> Sample:
        if self.available() is not None:
            return Sample(self.name, now, {})
        self._ensure_thread()
        with self._lock:
            info = None if self._failing else self._info
            pending, self._events = self._events, []
        values: dict[str, float | None] = {}
        procs: dict[int, dict[str, Any]] = {}
        tree = _tree_pids(self.tree)
        for i in self._ids:
            npu = info.npus.get(i) if info else None
            values[f"npu_mem_used_bytes/{i}"] = _bytes(npu.mem_used_mb if npu else None)
            values[f"npu_mem_total_bytes/{i}"] = _bytes(npu.mem_total_mb if npu else None)
            util = npu.aicore_pct if npu else None
            values[f"npu_util_ratio/{i}"] = None if util is None else util / 100.0
            values[f"npu_temp_celsius/{i}"] = npu.temp_c if npu else None
            values[f"npu_power_watts/{i}"] = npu.power_w if npu else None
            if self.tree is not None:
                values[f"npu_tree_mem_bytes/{i}"] = None
        if info is not None and tree is not None:
            known = {i: True for i in self._ids}
            sums = dict.fromkeys(self._ids, 0.0)
            for p in info.processes:
                if p.pid not in tree or p.npu not in sums:
                    continue
                if p.mem_mb is None:
                    known[p.npu] = False
                else:
                    sums[p.npu] += p.mem_mb * MB
                entry = procs.setdefault(p.pid, {})
                key = f"npu_mem_bytes/{p.npu}"
                entry[key] = (entry.get(key) or 0.0) + p.mem_mb * MB if p.mem_mb is not None else None
            for i in self._ids:
                values[f"npu_tree_mem_bytes/{i}"] = sums[i] if known[i] else None
        events = tuple(Event(now, kind, data) for kind, data in pending)
        return Sample(self.name, now, values, procs or None, events)

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=1.0)  # a daemon: if npu-smi hangs, its own timeout ends the run later

    # -- the reader thread --------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="tuner-npu-smi", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                info = self._read()
            except Exception as exc:  # whatever went wrong, the probe reports it and keeps trying
                with self._lock:
                    if self._failing is None:
                        self._events.append(("npu_smi_failed", {"error": _describe(exc)}))
                    self._failing = _describe(exc)
            else:
                self._store(info)
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def _read(self) -> AscendInfo:
        info = parse_info(self._run([self._exe, "info"]))
        for npu in info.npus.values():
            if npu.aicore_pct is None and not any(c.aicore_pct is not None for c in npu.chips):
                try:
                    usages = parse_usages(self._run([self._exe, "info", "-t", "usages", "-i", str(npu.npu)]))
                except (NpuSmiError, subprocess.SubprocessError, OSError):
                    continue  # AICore stays unknown; the table's other values still count
                rate = usages.get("Aicore Usage Rate(%)", usages.get("NPU Utilization(%)"))
                if npu.chips and rate is not None:
                    npu.chips[0].aicore_pct = rate
        return info

    def _store(self, info: AscendInfo) -> None:
        with self._lock:
            if self._failing is not None:
                self._events.append(("npu_smi_recovered", {"after": self._failing}))
            self._info = info
            self._failing = None
            self.reads += 1


# -- Intel NPU probe --------------------------------------------------------------------------------------
@dataclass
class _Accel:
    name: str  # accel0
    busy_fd: int
    mem_fd: int | None
    last: tuple[float, int] | None = None  # (monotonic time, busy us)


class IntelNpuProbe:
    """Intel NPUs (``ivpu``): utilization from ``npu_busy_time_us`` deltas, memory if exposed."""

    name = "intel_npu"

    def __init__(
        self,
        sysfs_root: str = "/sys/class/accel",
        *,
        every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sysfs_root = sysfs_root
        self.every_s = every_s
        self.clock = clock
        self._read_at: float | None = None
        self._values: dict[str, float | None] = {}
        self._checked = False
        self._reason: str | None = None
        self._devices: list[_Accel] = []

    def available(self) -> str | None:
        if not self._checked:
            self._checked = True
            self._reason = self._open()
        return self._reason

    def _open(self) -> str | None:
        pattern = os.path.join(self.sysfs_root, "accel*", "device", "npu_busy_time_us")
        paths = sorted(glob.glob(pattern), key=_accel_order)
        if not paths:
            return f"no Intel NPU ({pattern} not found)"
        problems = []
        for path in paths:
            dev_dir = os.path.dirname(path)
            name = os.path.basename(os.path.dirname(dev_dir))
            try:
                fd = os.open(path, os.O_RDONLY)
                int(os.pread(fd, 64, 0))
            except (OSError, ValueError) as exc:
                problems.append(f"{name}: {exc.strerror if isinstance(exc, OSError) else exc}")
                continue
            try:
                mem_fd: int | None = os.open(os.path.join(dev_dir, "npu_memory_utilization"), os.O_RDONLY)
            except OSError:
                mem_fd = None  # older kernels have only the busy time
            self._devices.append(_Accel(name, fd, mem_fd))
        if not self._devices:
            return "Intel NPU unreadable (" + "; ".join(problems) + ")"
        return None

    def metrics(self) -> dict[str, str]:
        if self.available() is not None:
            return {}
        out: dict[str, str] = {}
        for d in self._devices:
            out[f"npu_util_ratio/{d.name}"] = "ratio"
            if d.mem_fd is not None:
                out[f"npu_mem_used_bytes/{d.name}"] = "bytes"
        return out

    def sample(self, now: float) -> Sample:
        if self.available() is not None:
            return Sample(self.name, now, {})
        t = self.clock()
        if self._read_at is None or t - self._read_at >= self.every_s:
            self._read_at = t
            self._values = self._read()
        return Sample(self.name, now, dict(self._values))

    def _read(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for d in self._devices:
            t = self.clock()
            busy = _read_int(d.busy_fd)
            ratio = None
            if busy is not None and d.last is not None and t > d.last[0] and busy >= d.last[1]:
                ratio = min(1.0, (busy - d.last[1]) / 1e6 / (t - d.last[0]))
            d.last = None if busy is None else (t, busy)  # a counter that went back (reset) starts over
            values[f"npu_util_ratio/{d.name}"] = ratio
            if d.mem_fd is not None:
                mem = _read_int(d.mem_fd)
                values[f"npu_mem_used_bytes/{d.name}"] = None if mem is None else float(mem)
        return values

    def close(self) -> None:
        for d in self._devices:
            for fd in (d.busy_fd, d.mem_fd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        self._devices = []


def _accel_order(path: str) -> tuple[int, str]:
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    digits = name.removeprefix("accel")
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)


def _read_int(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0))
    except (OSError, ValueError):
        return None


def _tree_pids(tree: Tree) -> set[int] | None:
    if tree is None:
        return None
    try:
        return {int(p) for p in (tree() if callable(tree) else tree)}
    except Exception:  # the tree's owner failing must not fail this probe
        return None


def _bytes(mb: float | None) -> float | None:
    return None if mb is None else mb * MB
