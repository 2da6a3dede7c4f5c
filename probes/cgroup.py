"""The cgroup probe: the memory limit that can kill the watched process, and how close its cgroup is to it.

Finding the cgroup (``locate``), as the JDK and opencontainers do: ``/proc/<pid>/cgroup`` lines are
``hierarchy-ID:controller-list:path`` (split at the first two colons: a path may hold ``:``; ``0::/path`` is
the v2 line; paths are relative to the *reader's* cgroup namespace); ``/proc/self/mountinfo`` (the mounts the
files are opened through) gives each cgroup mount's root (field 4) and mount point (field 5),
``cgroup`` (v1, its super options name the controllers) or ``cgroup2`` after `` - ``; paths there are
octal-escaped (``\\040``).  A controller's directory is the mount point plus the cgroup path with the mount's
root stripped (needed in nested containers, where ``/proc`` shows host paths).  Per controller, v1 wins where
its hierarchy is mounted (a hybrid host: v1 ``memory``, v2 mounted at ``/sys/fs/cgroup/unified``); else v2 when
the unified directory has the controller's files.  A path outside the mount's root (``/..`` — another
cgroup namespace, another container) cannot be read: that is the probe's reason, never a crash.

Read (keys; ``None`` with a reason when the kernel does not have it — ``unsupported``):

- ``cgroup_mem_limit_bytes``: the *effective* limit, the minimum over the cgroup and every ancestor up to the
  mount point (Kubernetes and systemd put it on a parent; the leaf reads unlimited) — v1 also
  ``hierarchical_memory_limit`` from ``memory.stat`` (covers ancestors above a namespaced mount).  Unlimited
  is ``None``: v2 ``max``; v1 a value at or above 2^62 (kubelet's threshold; this kernel reads
  9223372036854771712).  ``cgroup_memsw_limit_bytes``: the kill limit with swap where swap is allowed (v1
  ``memsw``, v2 ``memory.max`` + ``memory.swap.max``), ``None`` without a separate finite one.
- ``cgroup_mem_usage_bytes`` (v1 ``memory.usage_in_bytes``, v2 ``memory.current``: every tick, kept open),
  ``cgroup_mem_working_set_bytes`` = usage - inactive file cache, floored at 0 (cAdvisor / kubelet's eviction
  signal: page cache is given back under pressure, so raw usage would cry wolf; the inactive-file figure is
  the last ``memory.stat``, at most ``slow_every_s`` old), ``cgroup_mem_peak_bytes`` (v1
  ``memory.max_usage_in_bytes``, v2 ``memory.peak`` since 5.19).
- ``memory.stat`` parts, each version's own keys mapped to one name: ``cgroup_mem_anon_bytes`` (v1
  ``total_rss``, v2 ``anon``), ``cgroup_mem_file_bytes`` (v1 ``total_cache``, v2 ``file``; both include shmem),
  ``cgroup_mem_shmem_bytes`` (``total_shmem`` / ``shmem``), ``cgroup_mem_kernel_bytes`` (v2 ``kernel``),
  ``cgroup_mem_inactive_file_bytes`` (``total_inactive_file`` / ``inactive_file``).
- ``cgroup_mem_high_bytes`` (v2 ``memory.high``, min over ancestors): a throttle threshold, not a kill limit.
- OOM: ``cgroup_oom_kills_total`` (v1 ``memory.oom_control`` ``oom_kill``, v2 ``memory.events`` ``oom_kill``),
  ``cgroup_ooms_total`` (v2 ``oom``), ``cgroup_mem_limit_hits_total`` (v1 ``memory.failcnt``, v2 ``max``),
  ``cgroup_mem_high_hits_total`` (v2 ``high``).  A rise of the OOM-kill counter while sampling is a warning
  note.
- Pressure (PSI ``avg10`` as a 0..1 share of time stalled): per cgroup on v2 (``memory.pressure``,
  ``cpu.pressure`` in the unified directory; they exist there without the memory controller):
  ``cgroup_mem_pressure_some_ratio``, ``cgroup_mem_pressure_full_ratio``, ``cgroup_cpu_pressure_some_ratio``.
  In the v2 root or without a unified mount the figures are the host's (``/proc/pressure/*``) and named so:
  ``sys_mem_pressure_some_ratio``, ``sys_mem_pressure_full_ratio``, ``sys_cpu_pressure_some_ratio``.
- CPU: ``cgroup_cpu_limit_ratio`` (cores' worth: quota / period, min over ancestors; v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; ``None`` unlimited), ``cgroup_cpu_throttled_seconds_total``
  (v2 ``throttled_usec``, v1 ``throttled_time`` in ns), ``cgroup_cpu_throttled_periods_total``
  (``nr_throttled``).  ``cgroup_pids`` / ``cgroup_pids_limit`` (``pids.current`` / min ``pids.max``).

Cadence: the usage file every tick through a kept-open descriptor (``ProcFile``: ``pread`` at offset 0);
everything else every ``slow_every_s`` (1 s), kept open too.  A file that vanishes (the cgroup was removed:
reads fail with ``ENODEV``) or holds garbage is a one-line note and ``None`` values; sampling goes on and
the PID's cgroup is looked up again (the process may have moved).  ``root`` prefixes every absolute path
(psutil's ``PROCFS_PATH``), so tests run on canned trees.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuner.probes.procfs import ProcFile
from tuner.records import Event, Sample, Value, unit_of

UNLIMITED_V1 = 1 << 62
"""A v1 limit at or above this is "no limit" (kubelet: not MaxInt64, the kernel rounds it to pages)."""

SLOW_EVERY_S = 1.0
PSI_KEYS = {"memory": "mem", "cpu": "cpu"}

MEM_METRICS: tuple[str, ...] = (
    "cgroup_mem_limit_bytes",
    "cgroup_memsw_limit_bytes",
    "cgroup_mem_usage_bytes",
    "cgroup_mem_working_set_bytes",
    "cgroup_mem_peak_bytes",
    "cgroup_mem_anon_bytes",
    "cgroup_mem_file_bytes",
    "cgroup_mem_shmem_bytes",
    "cgroup_mem_kernel_bytes",
    "cgroup_mem_inactive_file_bytes",
    "cgroup_mem_high_bytes",
    "cgroup_oom_kills_total",
    "cgroup_ooms_total",
    "cgroup_mem_limit_hits_total",
    "cgroup_mem_high_hits_total",
)
CPU_METRICS: tuple[str, ...] = (
    "cgroup_cpu_limit_ratio",
    "cgroup_cpu_throttled_seconds_total",
    "cgroup_cpu_throttled_periods_total",
)
PIDS_METRICS: tuple[str, ...] = ("cgroup_pids", "cgroup_pids_limit")
CGROUP_PSI: tuple[str, ...] = (
    "cgroup_mem_pressure_some_ratio",
    "cgroup_mem_pressure_full_ratio",
    "cgroup_cpu_pressure_some_ratio",
)
HOST_PSI: tuple[str, ...] = (
    "sys_mem_pressure_some_ratio",
    "sys_mem_pressure_full_ratio",
    "sys_cpu_pressure_some_ratio",
)

V1_STAT = {
    "cgroup_mem_anon_bytes": "total_rss",
    "cgroup_mem_file_bytes": "total_cache",
    "cgroup_mem_shmem_bytes": "total_shmem",
    "cgroup_mem_inactive_file_bytes": "total_inactive_file",
}
V2_STAT = {
    "cgroup_mem_anon_bytes": "anon",
    "cgroup_mem_file_bytes": "file",
    "cgroup_mem_shmem_bytes": "shmem",
    "cgroup_mem_kernel_bytes": "kernel",
    "cgroup_mem_inactive_file_bytes": "inactive_file",
}
V1_ONLY_MISSING = {
    "cgroup_mem_kernel_bytes": "cgroup v1 memory.stat has no kernel figure",
    "cgroup_mem_high_bytes": "memory.high exists on cgroup v2 only",
    "cgroup_ooms_total": "cgroup v1 counts OOM kills, not OOM events",
    "cgroup_mem_high_hits_total": "memory.high exists on cgroup v2 only",
}

EVENT_KEYS = (
    "cgroup_oom_kills_total",
    "cgroup_ooms_total",
    "cgroup_mem_limit_hits_total",
    "cgroup_mem_high_hits_total",
)
THROTTLE_KEYS = ("cgroup_cpu_throttled_seconds_total", "cgroup_cpu_throttled_periods_total")

GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.ESRCH})
"""A cgroup file read failing with one of these: the cgroup (or the process) is gone."""


# -- parsing (pure functions on file content) -----------------------------------------------------------
class CgroupUnreadable(Exception):
    """The process's cgroup cannot be read from here; the message says why (one line)."""


@dataclass(frozen=True)
class Mount:
    root: str
    point: str
    fstype: str
    controllers: frozenset[str]


def unescape(path: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space, ``\\011`` a tab, ``\\012`` a newline, ``\\134`` ``\\``)."""
    if "\\" not in path:
        return path
    out: list[str] = []
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "\\" and i + 3 < len(path) and path[i + 1 : i + 4].isdigit():
            try:
                out.append(chr(int(path[i + 1 : i + 4], 8)))
                i += 4
                continue
            except ValueError:
                pass
        out.append(ch)
        i += 1
    return "".join(out)


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``/proc/PID/cgroup`` -> (v1 controller -> path, the v2 path or None).

    ``name=systemd`` style named hierarchies are kept under their name; the v2 line is ``0::path``.
    """
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"not a /proc/PID/cgroup line: {line[:80]!r}")
        hid, ctl, path = parts
        if hid == "0" and ctl == "":
            v2 = path
            continue
        for c in ctl.split(","):
            if c:
                v1[c] = path
    return v1, v2


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a ``/proc/PID/mountinfo``."""
    out: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 1 or r[0] not in ("cgroup", "cgroup2"):
            continue
        ctls: frozenset[str] = frozenset()
        if r[0] == "cgroup" and len(r) >= 3:
            opts = r[2].split(",")
            ctls = frozenset(o for o in opts if o not in ("rw", "ro") and ("=" not in o or o.startswith("name=")))
        out.append(Mount(unescape(f[3]), unescape(f[4]), r[0], ctls))
    return out


def parse_int(data: bytes) -> int:
    """A file holding one integer (``ValueError`` on anything else)."""
    s = data.strip()
    if not s or not s.lstrip(b"-").isdigit():
        raise ValueError(f"not a number: {s[:40]!r}")
    return int(s)


def parse_limit(data: bytes, version: int) -> int | None:
    """A memory/pids limit file -> bytes, or ``None`` for no limit (v2 ``max``; v1 >= 2^62; v1 ``-1``)."""
    s = data.strip()
    if s == b"max":
        return None
    v = parse_int(s)
    if v < 0 or (version == 1 and v >= UNLIMITED_V1):
        return None
    return v


def parse_flat_keyed(data: bytes) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``cpu.stat``, ``memory.events``, ``memory.oom_control``).

    ``ValueError`` when a line is not two fields with an integer value.  Negative values become 0 (kernel
    bugs; opencontainers does the same).
    """
    out: dict[str, int] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        f = line.split()
        if len(f) != 2 or not f[1].lstrip(b"-").isdigit():
            raise ValueError(f"not a 'key value' line: {line[:60]!r}")
        out[f[0].decode("ascii", "replace")] = max(0, int(f[1]))
    return out


def parse_psi(data: bytes) -> dict[str, float]:
    """PSI (``some avg10=0.12 avg60=... total=...`` / ``full ...``) -> ``{"some": 0.0012, "full": ...}``:
    ``avg10`` as a 0..1 share of the last 10 s."""
    out: dict[str, float] = {}
    for line in data.split(b"\n"):
        f = line.split()
        if not f:
            continue
        kind = f[0].decode("ascii", "replace")
        if kind not in ("some", "full"):
            raise ValueError(f"not a PSI line: {line[:60]!r}")
        for item in f[1:]:
            k, _, v = item.partition(b"=")
            if k == b"avg10":
                out[kind] = float(v) / 100.0
    if "some" not in out:
        raise ValueError("no 'some avg10=' in the PSI file")
    return out


def parse_cpu_max(data: bytes) -> float | None:
    """v2 ``cpu.max`` (``quota period`` or ``max period``) -> cores, None without a quota."""
    f = data.split()
    if len(f) != 2:
        raise ValueError(f"not a cpu.max line: {data[:40]!r}")
    period = parse_int(f[1])
    if f[0] == b"max":
        return None
    quota = parse_int(f[0])
    if period <= 0:
        raise ValueError(f"cpu.max period {period}")
    return quota / period


# -- locating the cgroup ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Controller:
    """Where one controller of the process's cgroup lives: ``dir`` (the cgroup), ``top`` (the mount point:
    the walk up for limits stops there), ``path`` (the cgroup path as ``/proc`` shows it)."""

    version: int
    dir: str
    top: str
    path: str

    def walk(self) -> list[str]:
        """The cgroup's directory and its ancestors up to the mount point, leaf first."""
        out = [self.dir]
        d = self.dir
        top = self.top.rstrip("/") or "/"
        while d.rstrip("/") != top and len(d) > len(top):
            d = os.path.dirname(d.rstrip("/"))
            out.append(d)
        return out


@dataclass
class Location:
    memory: Controller | None = None
    cpu: Controller | None = None
    pids: Controller | None = None
    unified: Controller | None = None
    """The v2 cgroup (PSI lives there) whatever the controllers' versions."""
    why: dict[str, str] = field(default_factory=dict)
    """Controller -> why it is not read."""


def _join(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root not in ("", "/") else path


def _under(mount: Mount, path: str, root: str) -> tuple[str, str] | str:
    """(cgroup directory, mount point) for ``path`` on ``mount``, or why it cannot be read."""
    if path.startswith("/..") or "/../" in path or path.endswith("/.."):
        return (
            f"its cgroup {path} is outside this cgroup namespace (another container): "
            "run the tuner in the process's cgroup namespace or mount the host's cgroup filesystem"
        )
    mroot = mount.root.rstrip("/") or "/"
    if mroot != "/":
        if path == mroot:
            rel = "/"
        elif path.startswith(mroot + "/"):
            rel = path[len(mroot) :]
        else:
            return f"its cgroup {path} is not under the mounted part of the hierarchy ({mount.root} at {mount.point})"
    else:
        rel = path
    point = _join(root, mount.point)
    d = os.path.join(point, rel.lstrip("/")) if rel != "/" else point
    return d.rstrip("/") or "/", point


def locate(pid: int, root: str = "/") -> Location:
    """Where the process's memory, cpu and pids cgroups and its v2 cgroup are; ``CgroupUnreadable`` when
    ``/proc/PID/cgroup`` cannot be read at all."""
    try:
        with open(_join(root, f"/proc/{pid}/cgroup"), encoding="utf-8", errors="replace") as f:
            cg_text = f.read()
    except FileNotFoundError:
        if not os.path.exists(_join(root, "/proc/self/cgroup")):
            raise CgroupUnreadable("no cgroups here (/proc/PID/cgroup does not exist)") from None
        raise CgroupUnreadable(f"process {pid} does not exist") from None
    except PermissionError:
        raise CgroupUnreadable(f"cannot read /proc/{pid}/cgroup: permission denied") from None
    except OSError as exc:
        raise CgroupUnreadable(f"cannot read /proc/{pid}/cgroup: {exc.strerror or exc}") from None
    try:
        v1, v2 = parse_proc_cgroup(cg_text)
    except ValueError as exc:
        raise CgroupUnreadable(f"/proc/{pid}/cgroup: {exc}") from None
    mounts: list[Mount] = []
    for who in ("self", str(pid)):  # our own mounts: the files are opened through them
        try:
            with open(_join(root, f"/proc/{who}/mountinfo"), encoding="utf-8", errors="replace") as f:
                mounts = parse_mountinfo(f.read())
            break
        except OSError:
            continue
    loc = Location()
    unified_mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None and unified_mount is not None:
        got = _under(unified_mount, v2, root)
        if isinstance(got, str):
            loc.why["unified"] = got
        else:
            loc.unified = Controller(2, got[0], got[1], v2)
    elif v2 is not None:
        loc.why["unified"] = "no cgroup2 filesystem is mounted"
    for name, v1_name, probe_file in (
        ("memory", "memory", "memory.current"),
        ("cpu", "cpu", "cpu.max"),
        ("pids", "pids", "pids.current"),
    ):
        path = v1.get(v1_name)
        mount = next((m for m in mounts if m.fstype == "cgroup" and v1_name in m.controllers), None)
        if path is not None and mount is not None:
            got = _under(mount, path, root)
            if isinstance(got, str):
                loc.why[name] = got
            elif not os.path.isdir(got[0]):
                loc.why[name] = f"{got[0]} does not exist (is the cgroup filesystem mounted here?)"
            else:
                setattr(loc, name, Controller(1, got[0], got[1], path))
            continue
        u = loc.unified
        if u is not None and os.path.exists(os.path.join(u.dir, probe_file)):
            setattr(loc, name, Controller(2, u.dir, u.top, u.path))
        elif u is not None and u.path == "/":
            loc.why[name] = f"the process is in the root cgroup (no {probe_file} there: no cgroup {name} limit)"
        elif path is not None:
            loc.why[name] = f"the v1 {v1_name} hierarchy is not mounted here"
        elif u is not None:
            loc.why[name] = f"the {name} controller is not enabled for {u.path} (no {probe_file})"
        else:
            loc.why[name] = loc.why.get("unified", "no cgroup filesystem is mounted")
    if loc.memory is None and loc.cpu is None and loc.pids is None and loc.unified is None:
        why = loc.why.get("memory") or loc.why.get("unified") or "no cgroup controller found"
        raise CgroupUnreadable(f"cannot read the cgroup of process {pid}: {why}")
    return loc


# -- reading --------------------------------------------------------------------------------------------
class _Files:
    """Cgroup files kept open (``ProcFile``), opened on first use; a file that does not exist is remembered."""

    def __init__(self) -> None:
        self.open: dict[str, ProcFile] = {}
        self.absent: set[str] = set()

    def get(self, path: str) -> ProcFile | None:
        f = self.open.get(path)
        if f is not None:
            return f
        if path in self.absent:
            return None
        try:
            f = ProcFile(path, 4096)
        except FileNotFoundError:
            self.absent.add(path)
            return None
        self.open[path] = f
        return f

    def read(self, path: str) -> bytes | None:
        """The file's content, or None when it does not exist; ``OSError`` when it vanished."""
        f = self.get(path)
        return None if f is None else f.read()

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()
        self.absent.clear()


@dataclass(frozen=True)
class OomState:
    """What the memory cgroup says about OOM kills right now (for naming a kill)."""

    kills: int | None
    limit_bytes: int | None
    peak_bytes: int | None
    path: str | None
    version: int | None


class CgroupProbe:
    """The ``cgroup`` probe for the cgroup of ``pid`` (``None``: nothing to watch)."""

    name = "cgroup"

    def __init__(
        self,
        pid: int | None,
        *,
        root: str = "/",
        slow_every_s: float = SLOW_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pid = pid
        self.root = root
        self.slow_every_s = slow_every_s
        self.clock = clock
        self._reason: str | None = None
        self.loc = Location()
        self._files = _Files()
        self._usage: ProcFile | None = None
        self._slow_at = -1e18
        self._slow: dict[str, Value] = {}
        self._inactive_file: int | None = None
        self._limit: int | None = None
        self._notes: list[tuple[str, str]] = []
        self._noted: dict[str, str] = {}
        self._vanished = False
        self._last_oom_kills: int | None = None
        self._announce = True
        self.unsupported: dict[str, str] = {}
        self.start_oom_kills: int | None = None
        if pid is None:
            self._reason = "no process to watch (the cgroup probe reads the watched process's cgroup)"
            return
        try:
            self._setup()
        except CgroupUnreadable as exc:
            self._reason = str(exc)
        except Exception as exc:  # discovery must never raise
            self._reason = f"cgroup probe failed to start: {type(exc).__name__}: {exc}"
        if self._reason is None:
            self.start_oom_kills = self.oom_state().kills
            self._last_oom_kills = self.start_oom_kills
            self._slow_at = self.clock()
            self._slow = self._read_slow()  # finds the files this kernel lacks before the header is written

    # -- set-up ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        assert self.pid is not None
        self.loc = locate(self.pid, self.root)
        self._usage = None
        mem = self.loc.memory
        if mem is not None:
            usage = "memory.usage_in_bytes" if mem.version == 1 else "memory.current"
            try:
                self._usage = ProcFile(os.path.join(mem.dir, usage), 64)
            except FileNotFoundError:
                self.loc.why["memory"] = f"{mem.dir} has no {usage}"
                self.loc.memory = None
            except PermissionError:
                self.loc.why["memory"] = f"cannot read {os.path.join(mem.dir, usage)}: permission denied"
                self.loc.memory = None
        pids = self.loc.pids
        if pids is not None and not os.path.exists(os.path.join(pids.dir, "pids.current")):
            self.loc.why["pids"] = f"{pids.dir} has no pids.current (the root pids cgroup: no limit there)"
            self.loc.pids = None
        self.unsupported = self._missing()

    def _missing(self) -> dict[str, str]:
        out: dict[str, str] = {}
        loc = self.loc
        for name, keys in (("memory", MEM_METRICS), ("cpu", CPU_METRICS), ("pids", PIDS_METRICS)):
            ctl = getattr(loc, name)
            if ctl is None:
                for k in keys:
                    out[k] = loc.why.get(name, "not found")
            elif name == "memory" and ctl.version == 1:
                out.update(V1_ONLY_MISSING)
        if loc.unified is None or loc.unified.path == "/":
            why = (
                loc.why.get("unified", "no cgroup2 filesystem is mounted")
                if loc.unified is None
                else "the process is in the v2 root cgroup"
            )
            for k in CGROUP_PSI:
                out[k] = f"per-cgroup pressure needs the process's own v2 cgroup ({why}); the host's is recorded"
        return out

    @property
    def psi_host_wide(self) -> bool:
        u = self.loc.unified
        return u is None or u.path == "/"

    # -- the Probe protocol ---------------------------------------------------------------------------
    def available(self) -> str | None:
        return self._reason

    def metrics(self) -> dict[str, str]:
        out: dict[str, str] = {}
        keys: list[str] = []
        if self.loc.memory is not None:
            keys += MEM_METRICS
        if self.loc.cpu is not None:
            keys += CPU_METRICS
        if self.loc.pids is not None:
            keys += PIDS_METRICS
        keys += HOST_PSI if self.psi_host_wide else CGROUP_PSI
        for k in keys:
            if k not in self.unsupported:
                out[k] = unit_of(k)
        return out

    def describe(self) -> dict[str, Any]:
        """Which cgroup, which version, what is missing: for the trace header and ``tuner probes``."""
        d: dict[str, Any] = {}
        for name in ("memory", "cpu", "pids", "unified"):
            c = getattr(self.loc, name)
            if c is not None:
                d[name] = {"version": c.version, "path": c.path, "dir": c.dir}
            elif name in self.loc.why:
                d[name] = {"missing": self.loc.why[name]}
        d["pressure"] = "host-wide (/proc/pressure)" if self.psi_host_wide else "per cgroup (v2)"
        if self.start_oom_kills is not None:
            d["oom_kills_at_start"] = self.start_oom_kills
        return d

    def summary(self) -> str:
        """One line: ``cgroup /x (memory v1, cpu v1, pids v1; pressure host-wide)``."""
        if self._reason is not None:
            return self._reason
        mem = self.loc.memory or self.loc.unified
        parts = [f"{n} v{c.version}" for n in ("memory", "cpu", "pids") if (c := getattr(self.loc, n)) is not None]
        pressure = "pressure host-wide" if self.psi_host_wide else "pressure per cgroup (v2)"
        return f"cgroup {mem.path if mem else '?'} ({', '.join(parts) or 'no controller'}; {pressure})"

    def take_notes(self) -> list[tuple[str, str]]:
        out, self._notes = self._notes, []
        return out

    def close(self) -> None:
        if self._usage is not None:
            self._usage.close()
            self._usage = None
        self._files.close()

    def _note(self, key: str, msg: str, level: str = "warn") -> None:
        """A one-line note, once until the same key says something else."""
        if self._noted.get(key) != msg:
            self._noted[key] = msg
            self._notes.append((msg, level))

    def _clear(self, key: str) -> None:
        self._noted.pop(key, None)

    # -- sampling -------------------------------------------------------------------------------------
    def sample(self, now: float) -> Sample:
        values: dict[str, Value] = {}
        mono = self.clock()
        if mono - self._slow_at >= self.slow_every_s:
            self._slow_at = mono
            if self._vanished:
                self._relocate()
            self._slow = self._read_slow()
        values.update(self._slow)
        events: tuple[Event, ...] = ()
        if self._announce:  # which cgroup: the window names the limit with it; a move is announced again
            self._announce = False
            events = (Event(now, "cgroup", self.describe()),)
        mem = self.loc.memory
        if self._vanished or (mem is not None and self._usage is None):
            values["cgroup_mem_usage_bytes"] = values["cgroup_mem_working_set_bytes"] = None
        elif mem is not None and self._usage is not None:
            usage = self._read_usage(mem)
            values["cgroup_mem_usage_bytes"] = usage
            inactive = self._inactive_file
            values["cgroup_mem_working_set_bytes"] = (
                None if usage is None else max(0, usage - inactive) if inactive is not None else usage
            )
            if usage is not None and self._limit is not None and usage > self._limit:
                self._note(
                    "below",
                    f"cgroup {mem.path}: memory limit {_mib(self._limit)} is below its usage "
                    f"{_mib(usage)} (lowered while in use; the kernel reclaims or kills)",
                )
        return Sample(self.name, now, values, events=events)

    def _read_usage(self, mem: Controller) -> int | None:
        assert self._usage is not None
        try:
            return parse_int(self._usage.read())
        except OSError as exc:
            self._gone(mem, exc)
            return None
        except ValueError as exc:
            self._note("usage", f"cgroup {mem.path}: {os.path.basename(self._usage.path)}: {exc}")
            return None

    def _gone(self, ctl: Controller, exc: OSError) -> None:
        if exc.errno in GONE:
            self._vanished = True
            self._note("vanished", f"cgroup {ctl.path} vanished while sampled ({exc.strerror}): looking it up again")
        else:
            self._note(f"read:{ctl.dir}", f"cgroup {ctl.path}: cannot read: {exc.strerror or exc}")

    def _relocate(self) -> None:
        """The cgroup was removed: find where the process is now (it may have been moved)."""
        self._files.close()
        if self._usage is not None:
            self._usage.close()
        try:
            self._setup()
        except CgroupUnreadable as exc:
            self._note("vanished", f"cgroup of process {self.pid} cannot be read any more: {exc}")
            self.loc = Location(why={"memory": str(exc)})
            self._usage = None
            return
        self._vanished = False
        self._announce = True
        mem = self.loc.memory
        self._note("vanished", f"cgroup of process {self.pid} is now {mem.path if mem else '(none)'}", "info")

    def _read(self, metrics: tuple[str, ...], ctl: Controller, name: str, parse: Callable[[bytes], Any]) -> Any:
        """Read and parse ``ctl.dir/name`` (feeding ``metrics``): None when absent (the metrics become
        unsupported, with a note), garbled (noted) or gone (noted)."""
        path = os.path.join(ctl.dir, name)
        try:
            data = self._files.read(path)
        except OSError as exc:
            self._gone(ctl, exc)
            return None
        if data is None:
            why = f"{name} does not exist in {ctl.dir}" + (" (kernels before 5.19)" if name == "memory.peak" else "")
            new = [m for m in metrics if m not in self.unsupported]
            for m in new:
                self.unsupported[m] = why
            if new:
                self._note(f"absent:{path}", f"cgroup {ctl.path}: {why}: {', '.join(new)} not recorded", "info")
            return None
        try:
            got = parse(data)
        except (ValueError, UnicodeDecodeError) as exc:
            self._note(f"bad:{path}", f"cgroup {ctl.path}: {name}: unreadable content ({exc})")
            return None
        self._clear(f"bad:{path}")
        return got

    def _walk_min(self, ctl: Controller, name: str, parse: Callable[[bytes], Any]) -> tuple[Any, bool]:
        """The smallest limit in ``name`` over the cgroup and its ancestors (None: no limit anywhere), and
        whether any of those files was read at all."""
        best: Any = None
        seen = False
        for d in ctl.walk():
            path = os.path.join(d, name)
            try:
                data = self._files.read(path)
            except OSError as exc:
                if d == ctl.dir:
                    self._gone(ctl, exc)
                continue
            if data is None:
                continue
            try:
                v = parse(data)
            except (ValueError, UnicodeDecodeError) as exc:
                self._note(f"bad:{path}", f"cgroup {ctl.path}: {path}: unreadable content ({exc})")
                continue
            seen = True
            if v is not None and (best is None or v < best):
                best = v
        return best, seen

    def _read_slow(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        loc = self.loc
        mem = loc.memory
        if mem is not None and not self._vanished:
            self._read_memory(mem, out)
        elif mem is not None or self._vanished:
            for k in MEM_METRICS:
                if k not in self.unsupported:
                    out[k] = None
        if loc.cpu is not None and not self._vanished:
            self._read_cpu(loc.cpu, out)
        if loc.pids is not None and not self._vanished:
            out["cgroup_pids"] = self._read(("cgroup_pids",), loc.pids, "pids.current", parse_int)
            lim, _ = self._walk_min(loc.pids, "pids.max", lambda b: parse_limit(b, 2))
            out["cgroup_pids_limit"] = lim
        self._read_psi(out)
        return out

    def _read_memory(self, mem: Controller, out: dict[str, Value]) -> None:
        v1 = mem.version == 1
        keys = V1_STAT if v1 else V2_STAT
        stat = self._read(tuple(keys), mem, "memory.stat", parse_flat_keyed)
        for k, sk in keys.items():
            out[k] = stat.get(sk) if stat is not None else None
        if stat is not None and v1 and "total_inactive_file" not in stat:  # use_hierarchy 0 (old kernels)
            out["cgroup_mem_inactive_file_bytes"] = stat.get("inactive_file")
            out["cgroup_mem_anon_bytes"] = stat.get("rss")
            out["cgroup_mem_file_bytes"] = stat.get("cache")
            out["cgroup_mem_shmem_bytes"] = stat.get("shmem")
        inactive = out.get("cgroup_mem_inactive_file_bytes")
        self._inactive_file = int(inactive) if inactive is not None else None
        if v1:
            lim, _ = self._walk_min(mem, "memory.limit_in_bytes", lambda b: parse_limit(b, 1))
            hier = (
                parse_limit(str(stat["hierarchical_memory_limit"]).encode(), 1)
                if stat and ("hierarchical_memory_limit" in stat)
                else None
            )
            if hier is not None and (lim is None or hier < lim):
                lim = hier
            sw, _ = self._walk_min(mem, "memory.memsw.limit_in_bytes", lambda b: parse_limit(b, 1))
            hsw = (
                parse_limit(str(stat["hierarchical_memsw_limit"]).encode(), 1)
                if stat and ("hierarchical_memsw_limit" in stat)
                else None
            )
            if hsw is not None and (sw is None or hsw < sw):
                sw = hsw
            out["cgroup_memsw_limit_bytes"] = sw
            out["cgroup_mem_peak_bytes"] = self._read(
                ("cgroup_mem_peak_bytes",), mem, "memory.max_usage_in_bytes", parse_int
            )
            oom = self._read(("cgroup_oom_kills_total",), mem, "memory.oom_control", parse_flat_keyed)
            out["cgroup_oom_kills_total"] = oom.get("oom_kill") if oom is not None else None
            out["cgroup_mem_limit_hits_total"] = self._read(
                ("cgroup_mem_limit_hits_total",), mem, "memory.failcnt", parse_int
            )
        else:
            lim, _ = self._walk_min(mem, "memory.max", lambda b: parse_limit(b, 2))
            swap, seen = self._walk_min(mem, "memory.swap.max", lambda b: parse_limit(b, 2))
            out["cgroup_memsw_limit_bytes"] = lim + swap if seen and lim is not None and swap is not None else None
            high, _ = self._walk_min(mem, "memory.high", lambda b: parse_limit(b, 2))
            out["cgroup_mem_high_bytes"] = high
            out["cgroup_mem_peak_bytes"] = self._read(("cgroup_mem_peak_bytes",), mem, "memory.peak", parse_int)
            ev = self._read(EVENT_KEYS, mem, "memory.events", parse_flat_keyed)
            for k, ek in (
                ("cgroup_oom_kills_total", "oom_kill"),
                ("cgroup_ooms_total", "oom"),
                ("cgroup_mem_limit_hits_total", "max"),
                ("cgroup_mem_high_hits_total", "high"),
            ):
                out[k] = ev.get(ek) if ev is not None else None
        out["cgroup_mem_limit_bytes"] = lim
        self._limit = lim
        kills = out.get("cgroup_oom_kills_total")
        if kills is not None:
            last = self._last_oom_kills
            if last is not None and kills > last:
                lim_txt = f"memory limit {_mib(lim)}" if lim is not None else "memory"
                self._note(
                    "oom",
                    f"cgroup {mem.path}: the kernel OOM killer killed {int(kills - last)} process(es) "
                    f"({lim_txt}; oom_kill {int(last)} -> {int(kills)})",
                )
            self._last_oom_kills = int(kills)

    def _read_cpu(self, cpu: Controller, out: dict[str, Value]) -> None:
        if cpu.version == 2:
            cores, _ = self._walk_min(cpu, "cpu.max", parse_cpu_max)
            st = self._read(THROTTLE_KEYS, cpu, "cpu.stat", parse_flat_keyed)
            thr = st.get("throttled_usec") if st is not None else None
            out["cgroup_cpu_throttled_seconds_total"] = thr / 1e6 if thr is not None else None
        else:
            cores = None
            for d in cpu.walk():
                try:
                    q = self._files.read(os.path.join(d, "cpu.cfs_quota_us"))
                    p = self._files.read(os.path.join(d, "cpu.cfs_period_us"))
                except OSError as exc:
                    if d == cpu.dir:
                        self._gone(cpu, exc)
                    continue
                if q is None or p is None:
                    continue
                try:
                    quota, period = parse_int(q), parse_int(p)
                except ValueError as exc:
                    self._note(f"bad:{d}/cpu.cfs", f"cgroup {cpu.path}: cpu.cfs_quota_us/period: {exc}")
                    continue
                if quota > 0 and period > 0 and (cores is None or quota / period < cores):
                    cores = quota / period
            st = self._read(THROTTLE_KEYS, cpu, "cpu.stat", parse_flat_keyed)
            thr = st.get("throttled_time") if st is not None else None
            out["cgroup_cpu_throttled_seconds_total"] = thr / 1e9 if thr is not None else None
        out["cgroup_cpu_limit_ratio"] = cores
        out["cgroup_cpu_throttled_periods_total"] = st.get("nr_throttled") if st is not None else None

    def _read_psi(self, out: dict[str, Value]) -> None:
        u = self.loc.unified
        host = self.psi_host_wide
        for res, short in PSI_KEYS.items():
            if host:
                path = _join(self.root, f"/proc/pressure/{res}")
                prefix = f"sys_{short}_pressure"
            else:
                assert u is not None
                path = os.path.join(u.dir, f"{res}.pressure")
                prefix = f"cgroup_{short}_pressure"
            got: dict[str, float] | None = None
            try:
                data = self._files.read(path)
            except OSError as exc:
                data = None
                if not host and u is not None:
                    self._gone(u, exc)
            if data is None and path in self._files.absent:
                self.unsupported.setdefault(f"{prefix}_some_ratio", f"{path} does not exist (no PSI in this kernel)")
            elif data is not None:
                try:
                    got = parse_psi(data)
                    self._clear(f"bad:{path}")
                except ValueError as exc:
                    self._note(f"bad:{path}", f"{path}: unreadable content ({exc})")
            out[f"{prefix}_some_ratio"] = got.get("some") if got else None
            if res == "memory":
                out[f"{prefix}_full_ratio"] = got.get("full") if got else None

    # -- OOM kills --------------------------------------------------------------------------------------
    def oom_state(self) -> OomState:
        """Read the OOM-kill counter, the limit and the peak now (the process may be gone; its cgroup is not)."""
        mem = self.loc.memory
        if mem is None:
            return OomState(None, None, None, None, None)
        return read_oom_state(mem)


def read_oom_state(mem: Controller) -> OomState:
    """The OOM-kill count, effective limit and peak of a memory cgroup, read afresh (files opened and closed)."""

    def read(name: str) -> bytes | None:
        try:
            with open(os.path.join(mem.dir, name), "rb") as f:
                return f.read()
        except OSError:
            return None

    kills: int | None = None
    peak: int | None = None
    try:
        if mem.version == 1:
            oc = read("memory.oom_control")
            kills = parse_flat_keyed(oc).get("oom_kill") if oc is not None else None
            p = read("memory.max_usage_in_bytes")
        else:
            ev = read("memory.events")
            kills = parse_flat_keyed(ev).get("oom_kill") if ev is not None else None
            p = read("memory.peak")
        peak = parse_int(p) if p is not None else None
    except ValueError:
        pass
    limit: int | None = None
    name = "memory.limit_in_bytes" if mem.version == 1 else "memory.max"
    for d in mem.walk():
        try:
            with open(os.path.join(d, name), "rb") as f:
                v = parse_limit(f.read(), mem.version)
        except (OSError, ValueError):
            continue
        if v is not None and (limit is None or v < limit):
            limit = v
    if mem.version == 1:
        st = read("memory.stat")
        try:
            h = parse_flat_keyed(st).get("hierarchical_memory_limit") if st is not None else None
        except ValueError:
            h = None
        if h is not None and h < UNLIMITED_V1 and (limit is None or h < limit):
            limit = h
    return OomState(kills, limit, peak, mem.path, mem.version)


def oom_baseline(pid: int, root: str = "/") -> OomState | None:
    """The OOM-kill count (and limit, peak) of ``pid``'s memory cgroup now; None when it cannot be read.
    ``tuner run`` reads its own before starting the command: the command starts in the same cgroup."""
    try:
        loc = locate(pid, root)
    except CgroupUnreadable:
        return None
    return read_oom_state(loc.memory) if loc.memory is not None else None


def earlier_kills(pid: int, root: str = "/") -> tuple[str, int] | None:
    """The nearest of ``pid``'s memory cgroup and its ancestors (up to the mount point) whose OOM-kill counter
    is not zero, as (cgroup path, kills): an earlier run in this cgroup (or this pod) was killed there."""
    try:
        loc = locate(pid, root)
    except CgroupUnreadable:
        return None
    mem = loc.memory
    if mem is None:
        return None
    path = mem.path
    for d in mem.walk():
        name = "memory.oom_control" if mem.version == 1 else "memory.events"
        try:
            with open(os.path.join(d, name), "rb") as f:
                kills = parse_flat_keyed(f.read()).get("oom_kill")
        except (OSError, ValueError):
            kills = None
        if kills:
            return path, kills
        path = os.path.dirname(path.rstrip("/")) or "/"
    return None


@dataclass(frozen=True)
class OomVerdict:
    """What ended a command, as far as the cgroup tells: ``named`` (it died by SIGKILL while the OOM-kill
    counter rose: the kernel OOM killer), or only ``others`` (the counter rose, the command was not killed)."""

    named: bool
    message: str
    data: dict[str, Any]


def judge_exit(process: str, pid: int, signal_number: int | None, before: OomState | None,
               after: OomState | None) -> OomVerdict | None:  # fmt: skip
    """``signal_number``: the signal that ended the command (9 = SIGKILL, 0 = it exited by itself, None =
    unknown: a process ``tuner attach`` watched, reaped by its own parent — then the wording says "most
    likely").  None when the OOM-kill counter did not rise: a SIGKILL for another reason is not called an OOM
    kill."""
    if before is None or after is None or before.kills is None or after.kills is None or after.kills <= before.kills:
        return None
    data: dict[str, Any] = {
        "process": process,
        "pid": pid,
        "signal": signal_number,
        "cgroup": after.path,
        "cgroup_version": after.version,
        "limit_bytes": after.limit_bytes,
        "peak_bytes": after.peak_bytes,
        "oom_kills_before": before.kills,
        "oom_kills_after": after.kills,
    }
    if signal_number == 9:
        msg = oom_message(process, after)
        return OomVerdict(True, msg, {**data, "message": msg})
    n = after.kills - before.kills
    if signal_number is None:
        msg = oom_message(process, after).replace(" was killed by", " exited while the cgroup's OOM-kill counter "
                                                  f"rose by {n}: most likely killed by")  # fmt: skip
        return OomVerdict(True, msg, {**data, "message": msg, "likely": True})
    msg = (f"the kernel OOM killer killed {n} process(es) in cgroup {after.path} during the run "
           f"({process} itself was not killed by it)")  # fmt: skip
    return OomVerdict(False, msg, {**data, "message": msg})


def controller_from(detail: Any) -> Controller | None:
    """The memory controller described in a trace header's probe detail (``describe()``), if any."""
    if not isinstance(detail, dict):
        return None
    m = detail.get("memory")
    if not isinstance(m, dict) or not isinstance(m.get("dir"), str) or m.get("version") not in (1, 2):
        return None
    d = m["dir"]
    # the walk stops at the mount point; without it, stop at the directory itself
    return Controller(int(m["version"]), d, d, str(m.get("path", d)))


def _mib(v: float | None) -> str:
    return "unlimited" if v is None else f"{v / (1 << 20):.0f} MiB"


def oom_message(process: str, st: OomState) -> str:
    """``python was killed by the kernel OOM killer: cgroup memory limit 640 MiB reached (peak 639 MiB)``."""
    where = (
        f"cgroup memory limit {_mib(st.limit_bytes)} reached"
        if st.limit_bytes is not None
        else ("the cgroup's memory ran out")
    )
    peak = f" (peak {_mib(st.peak_bytes)})" if st.peak_bytes is not None else ""
    return f"{process} was killed by the kernel OOM killer: {where}{peak}"
