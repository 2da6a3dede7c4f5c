"""The CPU probe: a process tree's CPU, memory, threads and open files, and the machine's CPU and memory.

What it watches: each root PID and every descendant (servers fork workers; children come and go).  The
tree is rescanned every ``rescan_every_s``, not every tick.  On Linux a rescan reads only the PIDs handed
out since the previous one (``/proc/loadavg``'s last-PID field; PIDs are allocated cyclically), keeping
those whose parent is watched, and nothing at all when no process was created on the machine; psutil's
full walk (``Process.children(recursive=True)``, 2-3 ms here as it reads every process's stat) runs for
the first scan and every ``FULL_RESCAN_EVERY`` cadences as a safety net.  Elsewhere every rescan is the
psutil walk.  A process once seen is watched until it exits, even if it is re-parented out of the tree
(a daemonizing worker keeps counting).

Per tick, per process (Linux): ``/proc/PID/stat`` (utime+stime, threads, state, starttime) and
``/proc/PID/statm`` (RSS), both kept open and re-read with ``pread`` (``probes.procfs``); the machine:
``/proc/stat`` and ``/proc/meminfo``, kept open too.  At the rescan cadence: open fds per process
(``/proc/PID/fd``).  Every ``uss_every_s``: USS (psutil ``memory_full_info``, ~300 us a process), held
between readings.  Elsewhere (macOS, Windows, BSD) the same values come from psutil.

A process is identified by (PID, starttime): a reused PID is a new process.  A process that exits (or
turns zombie) becomes a ``proc_exit`` event ``{pid, name, exit_after_s}``; one that appears, ``proc_start``
``{pid, ppid, name}`` (the processes found by the first scan are the starting state, not events).
Zombies (dead, not yet reaped) are reported once as an exit and never counted: not in ``procs``, not in
the tree's sums or ``tree_procs``.  With no live process left the tree's values are ``None``
(``tree_procs`` 0), never a 0 that would read as a measurement.  Nothing a watched process does
raises out of ``sample()``.

CPU ratios (per process, tree, machine) are measured over at least ``min_window_s`` (0.05 s: the kernel's
CPU counters move in 10 ms steps, so a 100 Hz tick-to-tick delta would read 0 or 1 core); a faster tick
repeats the last ratio, and the machine's values (``/proc/stat``, ``/proc/meminfo``) are read on that
cadence too.  The tree's RSS, threads and process count are read every tick.

Values (``docs/conventions.md``): ``tree_cpu_ratio`` (cores' worth; ``None`` until a first window),
``tree_cpu_seconds_total`` (user + system CPU time of the tree's processes, each since it started, as last
read — at most ``min_window_s`` old — plus that of the processes that have left the tree, as last read
before they went: a counter for Prometheus' ``rate()``, kept when no process is left), ``tree_rss_bytes``,
``tree_uss_bytes`` (sum over processes with a USS reading; ``None`` before the first), ``tree_threads``,
``tree_fds`` (sum over processes whose fds are readable), ``tree_procs``, ``sys_cpu_ratio`` (0..1 of the
machine), ``sys_core_cpu_ratio/<n>`` (0..1 of core n), ``sys_mem_total_bytes``, ``sys_mem_available_bytes``,
``sys_mem_used_bytes`` (total - available), ``sys_swap_used_bytes``.  ``Sample.procs``: ``{pid: {"name",
"ppid", "rss_bytes", "cpu_ratio", "cpu_seconds_total", "threads", "fds", "uss_bytes"}}`` (``uss_bytes``
once measured).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from tuner.probes.procfs import (
    CLK_TCK,
    GONE_ERRNOS,
    CpuTimes,
    ProcFile,
    SysMemory,
    parse_cpu_times,
    parse_meminfo,
    parse_stat,
    parse_statm_rss,
    ratio_between,
    system_memory,
)
from tuner.records import Event, Sample, Value

LINUX = sys.platform.startswith("linux")
COMM_LEN = 15  # the kernel truncates comm to 15 characters; psutil recovers the full name from cmdline
FULL_RESCAN_EVERY = 20  # a full (psutil) tree scan at least every this many rescan cadences (10 s)
MAX_INCREMENTAL = 256  # more new PIDs than this since the last scan: a full scan instead
PID_MARGIN = 8  # PIDs before the last scan's last PID read again (mid-fork processes are not yet in /proc)

TREE_METRICS: dict[str, str] = {
    "tree_cpu_ratio": "ratio",
    "tree_cpu_seconds_total": "seconds",
    "tree_rss_bytes": "bytes",
    "tree_uss_bytes": "bytes",
    "tree_threads": "count",
    "tree_fds": "count",
    "tree_procs": "count",
}
SYS_METRICS: dict[str, str] = {
    "sys_cpu_ratio": "ratio",
    "sys_mem_total_bytes": "bytes",
    "sys_mem_available_bytes": "bytes",
    "sys_mem_used_bytes": "bytes",
    "sys_swap_used_bytes": "bytes",
}


class Reading:
    """One process's per-tick figures, whichever backend read them."""

    __slots__ = ("comm", "cpu_s", "ppid", "rss", "starttime", "state", "threads")

    def __init__(
        self, comm: str, state: str, ppid: int, cpu_s: float, threads: int, starttime: float, rss: int
    ) -> None:
        self.comm = comm
        self.state = state
        self.ppid = ppid
        self.cpu_s = cpu_s
        self.threads = threads
        self.starttime = starttime
        self.rss = rss


class Gone(Exception):
    """The process has exited (and been reaped) or its /proc entry vanished."""


class _ProcfsReader:
    """``/proc/PID/stat`` + ``statm`` kept open.  A descriptor stays bound to its process: never a reused PID."""

    __slots__ = ("stat", "statm")

    def __init__(self, pid: int) -> None:
        try:
            self.stat = ProcFile(f"/proc/{pid}/stat", 1024)
            try:
                self.statm = ProcFile(f"/proc/{pid}/statm", 256)
            except BaseException:
                self.stat.close()
                raise
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                raise Gone(str(exc)) from None
            raise

    def read(self) -> Reading:
        return self.parse(self.capture(True), None)

    def capture(self, with_stat: bool) -> tuple[bytes | None, bytes]:
        """The raw ``stat`` (when asked) and ``statm`` bytes, unparsed: all a fast tick does at its moment."""
        try:
            return (self.stat.read() if with_stat else None), self.statm.read()
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                raise Gone(str(exc)) from None
            raise

    @staticmethod
    def parse(raw: tuple[bytes | None, bytes], prev: Reading | None) -> Reading:
        """A captured pair -> a reading; without ``stat`` bytes the CPU time, threads and state are the last
        ones read (``prev``) and only the RSS is new."""
        stat, statm = raw
        if stat is None:
            if prev is None:
                raise ValueError("no stat read yet")
            rss = 0 if prev.state == "Z" else parse_statm_rss(statm)
            return Reading(prev.comm, prev.state, prev.ppid, prev.cpu_s, prev.threads, prev.starttime, rss)
        st = parse_stat(stat)
        rss = 0 if st.state == "Z" else parse_statm_rss(statm)
        return Reading(st.comm, st.state, st.ppid, (st.utime + st.stime) / CLK_TCK, st.num_threads, st.starttime, rss)

    def close(self) -> None:
        self.stat.close()
        self.statm.close()


class _PsutilReader:
    """The portable fallback: one ``oneshot()`` bundle per tick."""

    __slots__ = ("last", "proc")

    def __init__(self, pid: int) -> None:
        self.last: Reading | None = None
        try:
            self.proc = psutil.Process(pid)
        except psutil.NoSuchProcess as exc:
            raise Gone(str(exc)) from None

    def read(self) -> Reading:
        p = self.proc
        try:
            with p.oneshot():
                status = p.status()
                ct = p.cpu_times()
                zombie = status == psutil.STATUS_ZOMBIE
                self.last = Reading(
                    p.name(),
                    "Z" if zombie else status[:1].upper(),
                    p.ppid(),
                    ct.user + ct.system,
                    0 if zombie else p.num_threads(),
                    p.create_time(),
                    0 if zombie else p.memory_info().rss,
                )
                return self.last
        except psutil.ZombieProcess:  # macOS and BSD refuse most calls on a zombie: keep what was known
            last = self.last
            name, ppid, cpu = (last.comm, last.ppid, last.cpu_s) if last is not None else ("", -1, 0.0)
            return Reading(name, "Z", ppid, cpu, 0, p.create_time(), 0)
        except psutil.NoSuchProcess as exc:
            raise Gone(str(exc)) from None
        except psutil.AccessDenied as exc:
            raise PermissionError(str(exc)) from None

    def close(self) -> None:
        pass


Reader = _ProcfsReader | _PsutilReader

_Payload = tuple[bytes | None, bytes] | Reading | BaseException
"""A process's capture: raw ``stat``/``statm`` bytes (procfs), a whole reading (psutil), or what reading raised."""


class CpuCapture:
    """What ``CpuProbe.capture`` read at one tick's moment, turned into values later by ``sample(now, it)``.

    ``fresh``: ``stat`` was read too (CPU time, threads, state), which happens at most every
    ``min_window_s``; otherwise only the RSS.  ``system``: the machine's raw ``/proc/stat`` and
    ``/proc/meminfo`` when due (``True``: read them at processing, the psutil backend; ``None``: not due)."""

    __slots__ = ("fresh", "mono", "reads", "system")

    def __init__(
        self,
        mono: float,
        fresh: bool,
        reads: dict[int, tuple[_Proc, _Payload]],
        system: tuple[bytes, bytes] | BaseException | bool | None,
    ) -> None:
        self.mono = mono
        self.fresh = fresh
        self.reads = reads
        self.system = system


class _Proc:
    """A watched process: its reader, identity and the figures held between ticks."""

    __slots__ = (
        "cpu_ratio",
        "exited",
        "fds",
        "last_cpu",
        "last_mono",
        "name",
        "pid",
        "ppid",
        "ps",
        "reader",
        "reading",
        "starttime",
        "uss",
    )

    def __init__(self, pid: int, reader: Reader, reading: Reading, ps: psutil.Process | None) -> None:
        self.pid = pid
        self.reader = reader
        self.reading = reading
        self.starttime = reading.starttime
        self.ppid = reading.ppid
        self.name = reading.comm
        self.ps = ps
        self.last_cpu: float | None = None
        self.last_mono = 0.0
        self.cpu_ratio: float | None = None
        self.fds: int | None = None
        self.uss: int | None = None
        self.exited = False  # zombie already reported


def _full_name(pid: int, comm: str, ps: psutil.Process | None) -> str:
    """``comm`` unless the kernel truncated it, then psutil's full name (read from cmdline)."""
    if len(comm) < COMM_LEN or ps is None:
        return comm
    try:
        name = ps.name()
    except psutil.Error:
        return comm
    return name if name.startswith(comm) else comm


def _lifetime_s(starttime: float) -> float | None:
    """Seconds since a process started (``starttime`` in clock ticks after boot, or a psutil create time)."""
    try:
        if LINUX and isinstance(starttime, int):
            return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - starttime / CLK_TCK)
        return max(0.0, time.time() - starttime)
    except (OSError, AttributeError):
        return None


class CpuProbe:
    """The ``cpu`` probe.  ``backend``: ``"procfs"`` (Linux default) or ``"psutil"`` (elsewhere; tests)."""

    name = "cpu"

    def __init__(
        self,
        roots: Sequence[int],
        *,
        uss_every_s: float = 5.0,
        rescan_every_s: float = 0.5,
        min_window_s: float = 0.05,
        backend: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = [int(r) for r in roots]
        self.uss_every_s = uss_every_s
        self.rescan_every_s = rescan_every_s
        self.min_window_s = min_window_s
        self.clock = clock
        self.backend = backend or ("procfs" if LINUX else "psutil")
        if self.backend not in ("procfs", "psutil"):
            raise ValueError(f"unknown cpu probe backend {self.backend!r}")
        self._reason: str | None = None
        self._procs: dict[int, _Proc] = {}
        self._pid_list: list[int] = []
        self._started = False
        self._last_scan = -1e18
        self._last_uss = -1e18
        self._since_full = 0
        self._settled = False
        self._last_pid_seen: int | None = None
        self._sys_last: tuple[CpuTimes, dict[int, CpuTimes]] | None = None
        self._sys_values: dict[str, Value] = {}
        self._sys_mono = -1e18
        self._fresh_mono = -1e18
        self._stat: ProcFile | None = None
        self._meminfo: ProcFile | None = None
        self._loadavg: ProcFile | None = None
        self._core_keys: dict[int, str] = {}
        self._cpu_left_s = 0.0  # CPU time of the processes that have left the tree (``tree_cpu_seconds_total``)
        self._cpu_seen = False
        try:
            self._open_system()
            for pid in self.roots:
                self._open_root(pid)
        except Exception as exc:  # discovery must never raise: the reason says what went wrong
            if self._reason is None:
                self._reason = f"cpu probe failed to start: {type(exc).__name__}: {exc}"
        self._pid_list = list(self._procs)

    # -- set-up ------------------------------------------------------------------------------------------
    def _open_system(self) -> None:
        if self.backend == "procfs":
            try:
                self._stat = ProcFile("/proc/stat", 8192)
                self._meminfo = ProcFile("/proc/meminfo", 4096)
            except OSError as exc:
                self._reason = f"cannot read /proc: {exc.strerror or exc}"
                return
            try:
                self._loadavg = ProcFile("/proc/loadavg", 128)
            except OSError:
                self._loadavg = None
            _, cores = parse_cpu_times(self._stat.read())
        else:
            cores = {i: CpuTimes(0, 0) for i in range(len(psutil.cpu_times(percpu=True)))}
        self._core_keys = {n: f"sys_core_cpu_ratio/{n}" for n in sorted(cores)}

    def _reader(self, pid: int) -> Reader:
        return _ProcfsReader(pid) if self.backend == "procfs" else _PsutilReader(pid)

    def _open_root(self, pid: int) -> None:
        if pid in self._procs:
            return
        if pid <= 0:
            self._reason = self._reason or f"{pid} is not a valid PID"
            return
        try:
            ps = psutil.Process(pid)
            reader = self._reader(pid)
        except (Gone, psutil.NoSuchProcess):
            self._reason = self._reason or f"process {pid} does not exist"
            return
        except (PermissionError, psutil.AccessDenied):
            self._reason = self._reason or self._denied(pid)
            return
        try:
            reading = reader.read()
            if LINUX:
                os.listdir(f"/proc/{pid}/fd")  # open files need the same user (or root), like USS
        except Gone:
            reader.close()
            self._reason = self._reason or f"process {pid} does not exist"
            return
        except (PermissionError, psutil.AccessDenied):
            reader.close()
            self._reason = self._reason or self._denied(pid)
            return
        except FileNotFoundError:
            reader.close()
            self._reason = self._reason or f"process {pid} does not exist"
            return
        self._procs[pid] = _Proc(pid, reader, reading, ps)

    @staticmethod
    def _denied(pid: int) -> str:
        return f"cannot read process {pid}: access denied (run tuner as the process's user or as root)"

    # -- the Probe protocol --------------------------------------------------------------------------------
    def available(self) -> str | None:
        return self._reason

    def metrics(self) -> dict[str, str]:
        out: dict[str, str] = dict(TREE_METRICS) if self.roots else {}
        out.update(SYS_METRICS)
        for key in self._core_keys.values():
            out[key] = "ratio"
        return out

    def pids(self) -> list[int]:
        """The processes of the watched tree right now (roots first).  Safe to call from another thread."""
        return list(self._pid_list)

    def close(self) -> None:
        for p in self._procs.values():
            p.reader.close()
        self._procs.clear()
        self._pid_list = []
        for f in (self._stat, self._meminfo, self._loadavg):
            if f is not None:
                f.close()
        self._stat = self._meminfo = self._loadavg = None

    def capture(self, now: float) -> CpuCapture:
        """Read, unparsed, what a tick needs at this moment: each watched process's ``statm`` (and ``stat``
        at most every ``min_window_s``), the machine's files when due.  Never raises.  The sampler calls
        this at each fast tick and ``sample(now, capture)`` later, in a batch: at 100 Hz a tick's fixed
        cost after a 10 ms sleep (a cold CPU cache on this VM) was ten times its cost in a batch."""
        mono = self.clock()
        fresh = mono - self._fresh_mono >= self.min_window_s
        if fresh:
            self._fresh_mono = mono
        procfs = self.backend == "procfs"
        reads: dict[int, tuple[_Proc, _Payload]] = {}
        for pid, p in self._procs.items():
            payload: _Payload
            try:
                payload = p.reader.capture(fresh) if isinstance(p.reader, _ProcfsReader) else p.reader.read()
            except Exception as exc:  # Gone, OSError, a psutil error: sorted out when it is processed
                payload = exc
            reads[pid] = (p, payload)
        system: tuple[bytes, bytes] | BaseException | bool | None = None
        if mono - self._sys_mono >= self.min_window_s:
            self._sys_mono = mono
            if procfs and self._stat is not None and self._meminfo is not None:
                try:
                    system = (self._stat.read(), self._meminfo.read())
                except OSError as exc:
                    system = exc
            else:
                system = True
        return CpuCapture(mono, fresh, reads, system)

    def sample(self, now: float, captured: Any = None) -> Sample:
        """The values at trace time ``now``: from ``captured`` (this probe's ``capture`` taken at that
        tick) or, without one, read now."""
        cap = captured if isinstance(captured, CpuCapture) else self.capture(now)
        mono = cap.mono
        events: list[Event] = []
        values: dict[str, Value] = {}
        procs_out: dict[int, dict[str, Any]] | None = None
        if self.roots:
            procs_out = {}
            first = not self._started
            if mono - self._last_scan >= self.rescan_every_s:
                self._rescan(now, mono, events, quiet=first)
            self._sample_tree(now, cap, events, values, procs_out)
        if cap.system is not None:
            self._sys_values = {}
            self._sample_system(self._sys_values, cap.system)
        values.update(self._sys_values)
        self._started = True
        return Sample(self.name, now, values, procs_out, tuple(events))

    # -- the tree ----------------------------------------------------------------------------------------
    def _sample_tree(
        self,
        now: float,
        cap: CpuCapture,
        events: list[Event],
        values: dict[str, Value],
        procs_out: dict[int, dict[str, Any]],
    ) -> None:
        mono = cap.mono
        do_uss = mono - self._last_uss >= self.uss_every_s
        if do_uss:
            self._last_uss = mono
        cpu_sum = 0.0
        cpu_any = False
        window = self.min_window_s
        rss_sum = threads_sum = fds_sum = 0
        uss_sum = 0
        uss_any = False
        gone: list[_Proc] = []
        for p in self._procs.values():
            got = cap.reads.get(p.pid)
            fresh = False
            if got is None or got[0] is not p:  # adopted after this capture: its adoption reading stands
                r = p.reading
            else:
                payload = got[1]
                if isinstance(payload, BaseException):
                    if isinstance(payload, Gone):
                        gone.append(p)
                    continue  # else unreadable this tick (permission changed, torn content)
                if isinstance(payload, Reading):
                    r, fresh = payload, True
                else:
                    try:
                        r = _ProcfsReader.parse(payload, p.reading)
                    except ValueError:
                        continue
                    fresh = payload[0] is not None
            if fresh and r.starttime != p.starttime:  # a reused PID (psutil and the fd-less fallback read by PID)
                gone.append(p)
                self._last_scan = -1e18  # find the newcomer at the next tick
                self._last_pid_seen = None
                continue
            p.reading = r
            p.ppid = r.ppid
            if fresh:
                if r.comm and r.comm != p.name and not (len(r.comm) >= COMM_LEN and p.name.startswith(r.comm)):
                    p.name = _full_name(p.pid, r.comm, p.ps)  # exec changed it
                if p.last_cpu is None:
                    p.last_cpu, p.last_mono = r.cpu_s, mono
                elif mono - p.last_mono >= window:  # else the last ratio holds: CPU time ticks at 10 ms
                    p.cpu_ratio = max(0.0, (r.cpu_s - p.last_cpu) / (mono - p.last_mono))
                    p.last_cpu, p.last_mono = r.cpu_s, mono
            if r.state == "Z":  # dead, not yet reaped: reported once as an exit, never counted
                p.uss = None
                p.cpu_ratio = None
                if not p.exited:
                    p.exited = True
                    events.append(self._exit_event(now, p, zombie=True))
                continue
            ratio = p.cpu_ratio
            if ratio is not None:
                cpu_sum += ratio
                cpu_any = True
            if do_uss and p.ps is not None:
                try:
                    p.uss = p.ps.memory_full_info().uss
                except (psutil.Error, OSError, AttributeError):
                    p.uss = None
            rss_sum += r.rss
            threads_sum += r.threads
            entry: dict[str, Any] = {
                "name": p.name,
                "ppid": r.ppid,
                "rss_bytes": r.rss,
                "cpu_ratio": ratio,
                "cpu_seconds_total": r.cpu_s,
                "threads": r.threads,
                "fds": p.fds,
            }
            if p.fds is not None:
                fds_sum += p.fds
            if p.uss is not None:
                entry["uss_bytes"] = p.uss
                uss_sum += p.uss
                uss_any = True
            procs_out[p.pid] = entry
        for p in gone:
            self._forget(p)
            if not p.exited:
                events.append(self._exit_event(now, p))
        if gone:
            self._pid_list = list(self._procs)
        if self._procs:
            self._cpu_seen = True
        cpu_total = self._cpu_left_s + sum(p.reading.cpu_s for p in self._procs.values())
        values["tree_cpu_seconds_total"] = cpu_total if self._cpu_seen else None
        values["tree_procs"] = len(procs_out)
        if not procs_out:  # no live process left (all exited or zombies): nothing to measure, not zeros
            for key in ("tree_cpu_ratio", "tree_rss_bytes", "tree_uss_bytes", "tree_threads", "tree_fds"):
                values[key] = None
            return
        values["tree_cpu_ratio"] = cpu_sum if cpu_any else None
        values["tree_rss_bytes"] = rss_sum
        values["tree_uss_bytes"] = uss_sum if uss_any else None
        values["tree_threads"] = threads_sum
        values["tree_fds"] = fds_sum

    def _exit_event(self, now: float, p: _Proc, zombie: bool = False) -> Event:
        data: dict[str, Any] = {"pid": p.pid, "name": p.name}
        life = _lifetime_s(p.starttime)
        if life is not None:
            data["exit_after_s"] = round(life, 3)
        if zombie:
            data["zombie"] = True
        return Event(now, "proc_exit", data)

    def _forget(self, p: _Proc) -> None:
        self._cpu_left_s += p.reading.cpu_s
        self._cpu_seen = True
        p.reader.close()
        if self._procs.get(p.pid) is p:
            del self._procs[p.pid]

    def _read_last_pid(self) -> int | None:
        """The PID most recently handed out on the machine (``/proc/loadavg``'s last field)."""
        if self._loadavg is None:
            return None
        try:
            return int(self._loadavg.read().rsplit(None, 1)[-1])
        except (OSError, IndexError, ValueError):
            return None

    def _discover(self) -> dict[int, psutil.Process | None] | None:
        """Descendants that may be new (PID -> psutil process when known); ``None``: nothing can be new.

        PIDs are handed out cyclically, so every process created since the last scan has a PID in
        (last PID then, last PID now].  Only those are read (a ``/proc`` listing and one stat each: ~0.1 ms)
        instead of psutil's full walk (``children(recursive=True)`` reads every process's stat: 2-3 ms
        here); no new PID at all skips the scan.  A full psutil scan still runs first, every
        ``FULL_RESCAN_EVERY`` cadences, and whenever the last PID cannot be read.
        """
        last = self._read_last_pid()
        prev, self._last_pid_seen = self._last_pid_seen, last
        if last is not None and prev is not None and self._since_full < FULL_RESCAN_EVERY:
            self._since_full += 1
            if last == prev and self._settled:
                return None
            # A PID is handed out a moment before its process shows in /proc: the last few PIDs of the
            # previous range are read again, once more after the last PID stops moving.
            self._settled = last == prev
            found = self._new_descendants(prev - PID_MARGIN, last)
            if found is not None:
                return found
        self._since_full = 0
        self._settled = False
        return self._full_scan()

    def _full_scan(self) -> dict[int, psutil.Process | None]:
        tracked = self._procs
        found: dict[int, psutil.Process | None] = {}
        for a in [p for p in tracked.values() if p.ppid not in tracked]:  # roots, and the re-parented
            if a.ps is None or a.reading.state == "Z":
                continue
            try:
                for child in a.ps.children(recursive=True):
                    found.setdefault(child.pid, child)
            except (psutil.Error, OSError):
                continue
        return found

    def _new_descendants(self, prev: int, last: int) -> dict[int, psutil.Process | None] | None:
        """Processes with a PID allocated in (prev, last] whose parent is watched (or one of them)."""
        tracked = self._procs
        try:
            names = os.listdir("/proc")
        except OSError:
            return None
        wrapped = last < prev  # pid_max was reached: the range runs past it and restarts low
        cands = []
        for n in names:
            if n.isdigit():
                pid = int(n)
                if (pid > prev or pid <= last) if wrapped else (prev < pid <= last):
                    cands.append(pid)
        if len(cands) > MAX_INCREMENTAL:
            return None
        cands.sort(key=lambda pid: (pid <= prev, pid))  # allocation order: parents before children
        found: dict[int, psutil.Process | None] = {}
        for pid in cands:
            try:
                with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
                    ppid = parse_stat(f.read()).ppid
            except (OSError, ValueError):
                continue
            if ppid in tracked or ppid in found:  # a tracked PID here is checked for reuse by _adopt
                found[pid] = None
        return found

    def _rescan(self, now: float, mono: float, events: list[Event], quiet: bool) -> None:
        """Adopt new descendants, retire replaced PIDs, refresh open-fd counts."""
        self._last_scan = mono
        found = self._discover() if self.backend == "procfs" else self._full_scan()
        if found:
            self._adopt(found, now, events, quiet)
        self._refresh_fds()

    def _adopt(self, found: dict[int, psutil.Process | None], now: float, events: list[Event], quiet: bool) -> None:
        tracked = self._procs
        changed = False
        for pid, ps in found.items():
            old = tracked.get(pid)
            if old is not None and not self._replaced(old, ps):
                continue
            try:
                if ps is None:
                    ps = psutil.Process(pid)
                reader = self._reader(pid)
            except (Gone, OSError, psutil.Error):
                continue
            try:
                reading = reader.read()
            except (Gone, OSError, ValueError):
                reader.close()
                continue
            if old is not None:
                if reading.starttime == old.starttime:  # same process after all
                    reader.close()
                    continue
                self._forget(old)
                if not old.exited:
                    events.append(self._exit_event(now, old))
            p = _Proc(pid, reader, reading, ps)
            p.name = _full_name(pid, reading.comm, ps)
            tracked[pid] = p
            changed = True
            if not quiet:
                events.append(Event(now, "proc_start", {"pid": pid, "ppid": reading.ppid, "name": p.name}))
        if changed:
            self._pid_list = list(tracked)

    def _replaced(self, old: _Proc, ps: psutil.Process | None) -> bool:
        """Whether the process now at ``old.pid`` is a different one (the PID was reused)."""
        if self.backend == "psutil" and ps is not None:
            try:
                return abs(ps.create_time() - float(old.starttime)) > 0.01
            except psutil.Error:
                return False
        if old.reading.state == "Z" or old.exited:
            return False
        # A kept-open stat fd reads ESRCH once its process is gone, so a live old entry is the same process
        # unless its read fails; checked cheaply by reading it again.
        try:
            old.reader.read()
        except (Gone, OSError, ValueError):
            return True
        return False

    def _refresh_fds(self) -> None:
        for p in self._procs.values():
            if p.reading.state == "Z":
                p.fds = 0
                continue
            try:
                if self.backend == "procfs":
                    p.fds = len(os.listdir(f"/proc/{p.pid}/fd"))
                elif p.ps is not None and hasattr(p.ps, "num_fds"):
                    p.fds = p.ps.num_fds()
                else:
                    p.fds = None
            except (OSError, psutil.Error):
                p.fds = None

    # -- the machine --------------------------------------------------------------------------------------
    def _sample_system(self, values: dict[str, Value], raw: tuple[bytes, bytes] | BaseException | bool) -> None:
        try:
            if isinstance(raw, BaseException):
                raise raw
            if isinstance(raw, tuple):
                cpu = parse_cpu_times(raw[0])
                mem = system_memory(parse_meminfo(raw[1]))
            else:
                cpu = self._psutil_cpu_times()
                vm = psutil.virtual_memory()
                swap = psutil.swap_memory()
                avail = min(max(vm.available, 0), vm.total)
                mem = SysMemory(vm.total, avail, vm.total - avail, swap.used)
        except (OSError, ValueError, KeyError, psutil.Error):
            values["sys_cpu_ratio"] = None
            for key in self._core_keys.values():
                values[key] = None
            for key in ("sys_mem_total_bytes", "sys_mem_available_bytes", "sys_mem_used_bytes", "sys_swap_used_bytes"):
                values[key] = None
            return
        last = self._sys_last
        self._sys_last = cpu
        if last is None:
            values["sys_cpu_ratio"] = None
            for key in self._core_keys.values():
                values[key] = None
        else:
            values["sys_cpu_ratio"] = ratio_between(last[0], cpu[0])
            prev_cores = last[1]
            for n, key in self._core_keys.items():
                a, b = prev_cores.get(n), cpu[1].get(n)
                values[key] = ratio_between(a, b) if a is not None and b is not None else None
        values["sys_mem_total_bytes"] = mem.total
        values["sys_mem_available_bytes"] = mem.available
        values["sys_mem_used_bytes"] = mem.used
        values["sys_swap_used_bytes"] = mem.swap_used

    @staticmethod
    def _psutil_cpu_times() -> tuple[CpuTimes, dict[int, CpuTimes]]:
        def conv(ct: Any) -> CpuTimes:
            total = sum(ct) - getattr(ct, "guest", 0) - getattr(ct, "guest_nice", 0)
            busy = total - ct.idle - getattr(ct, "iowait", 0)
            return CpuTimes(busy, total)

        return conv(psutil.cpu_times()), {i: conv(c) for i, c in enumerate(psutil.cpu_times(percpu=True))}
