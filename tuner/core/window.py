"""The agent's view of the recent past: bounded numpy ring buffers fed one tick at a time.

- Metric values: a ring of rows, one row per tick (aligned with a ring of tick times), one column per
  tracked key (NaN where a tick had no value), so "the last S seconds of key k" is one
  ``searchsorted`` and a slice.  A tick costs one list of the tracked values; rows are copied into the
  numpy block in bulk (every 64 ticks, or when something reads), which is what keeps a tick at a few
  microseconds.
- Finished requests (``request`` events): columns of the fields policies use (temperature, seq-rep-4,
  tokens, TTFT, queue time, batch size ...), in their own rings.
- The current tick's other events (``oom``, ``command_result``, ...) and the recent applied actions.
- Memory headroom against the *binding* limit (``tuner.core.limits``: the cgroup's limit on its working set,
  the host's memory, each device; any probe can add a term), and the memory-pressure signal: the binding
  limit's floor trend projected to the limit (``memory_pressure()``), restarted after every memory action.

Appends are O(1) and nothing grows: every buffer has a fixed capacity.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from tuner.core import limits
from tuner.core.limits import LimitTerm, MemoryPressure, Projection
from tuner.records import Applied, Event

REQUEST_FIELDS: tuple[str, ...] = (
    "t",
    "temperature",
    "seq_rep_4",
    "tokens",
    "prompt_tokens",
    "ttft_seconds",
    "tpot_seconds",
    "e2e_seconds",
    "queue_seconds",
    "batch_size",
)

_NAN = math.nan
_FLUSH_ROWS = 64
PROJECT_EVERY_S = 2.0
"""The time-to-limit projection is computed at most this often (trace time): horizons are minutes, and at
~60 us a term it is the agent's largest fixed cost (the replay benchmark)."""
_NO_COLUMNS: dict[str, float] = {}
RELEASE_SPAN_S = 30.0
"""A flat trend ends an episode only when measured over this long since the last memory action: 10-15 s after
a cleanup the floor often reads flat by chance (on the demo, an edge run's batch went up 15 s after one, at
80% of the cgroup's limit, and the next spike was killed)."""
RELEASE = 1.5
"""An episode of memory pressure ends when the trend is flat or the limit is projected beyond this many
horizons (hysteresis: a time to limit hovering at the horizon is one episode, not many)."""
MEMORY_COMMANDS = ("cleanup", "precision")
"""Commands whose result changes memory: the projection restarts on data after them."""


class Ring:
    """A fixed-capacity float64 ring; ``last(n)`` gives the newest ``n`` values oldest first (a view when
    they do not wrap around the end of the buffer, a copy when they do)."""

    __slots__ = ("buf", "cap", "count")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.cap = capacity
        self.buf = np.full(capacity, np.nan)
        self.count = 0

    def append(self, v: float) -> None:
        self.buf[self.count % self.cap] = v
        self.count += 1

    def __len__(self) -> int:
        return min(self.count, self.cap)

    def last(self, n: int | None = None) -> np.ndarray:
        size = min(self.count, self.cap)
        n = size if n is None or n > size else n
        if n <= 0:
            return self.buf[:0]
        end = self.count % self.cap or (self.cap if self.count else 0)
        if n <= end:
            return self.buf[end - n : end]
        return np.concatenate((self.buf[self.cap - (n - end) :], self.buf[:end]))

    def latest(self) -> float:
        return float(self.buf[(self.count - 1) % self.cap]) if self.count else _NAN


def _last_finite(v: np.ndarray) -> float | None:
    """The last non-NaN entry of ``v``: its last slot, then the last 64, then all of it."""
    if not v.size:
        return None
    x = float(v[-1])
    if x == x:
        return x
    for part in (v[-64:], v):
        ok = np.flatnonzero(~np.isnan(part))
        if ok.size:
            return float(part[ok[-1]])
    return None


def _num(x: Any) -> float:
    if x is None or isinstance(x, bool):
        return _NAN
    try:
        return float(x)
    except (TypeError, ValueError):
        return _NAN


class Window:
    """Recent metric values, requests, events and actions.

    ``keys``: exact metric keys to keep; ``prefixes``: keep any key starting with one of these too (device
    keys like ``gpu_mem_used_bytes/0``).  ``keys=None`` keeps every numeric key seen (handy in tests, a
    little slower).
    """

    def __init__(
        self,
        *,
        capacity: int = 3000,
        request_capacity: int = 4096,
        action_capacity: int = 256,
        keys: Iterable[str] | None = None,
        prefixes: Sequence[str] = (),
    ) -> None:
        self.capacity = capacity
        self.times = Ring(capacity)
        self._order: list[str] = []
        """Tracked keys, in column order of ``_block``."""
        self._block = np.full((capacity, 0), np.nan)
        """Row = a tick slot (aligned with ``times``), column = a key; NaN = missing."""
        self._pending: list[list[Any]] = []
        """Rows of the latest ticks not yet copied into ``_block`` (copied in bulk when read or every
        ``_FLUSH_ROWS`` ticks: one ``np.array`` call for many ticks instead of one store per value)."""
        self._pending_start = 0
        self._present: set[str] = set()
        """Keys that had a value in some flushed row: ``latest`` of a key never seen costs no scan."""
        self._all = keys is None
        self._keys = set(keys or ())
        self._prefixes = tuple(prefixes)
        self.requests: dict[str, Ring] = {f: Ring(request_capacity) for f in REQUEST_FIELDS}
        self.request_count = 0
        """Requests seen since the start (not bounded)."""
        self.events: list[Event] = []
        """This tick's events other than ``request``."""
        self.new_requests = 0
        """How many requests this tick brought."""
        self.actions: deque[Applied] = deque(maxlen=action_capacity)
        self.t = 0.0
        self.ticks = 0
        self._nvalues = -1
        self._index: dict[str, int] = {}
        self._headroom: tuple[float | None, str | None] = (None, None)
        self._binding: LimitTerm | None = None
        self._terms: list[LimitTerm] = []
        self._headroom_at = -1
        if not self._all:  # the limits' own keys (cgroup, host, devices, contributed terms, PSI)
            lk, lp = limits.tracked()
            self._keys |= lk
            self._prefixes = tuple(sorted(set(self._prefixes) | lp))
        self.labels: dict[str, str] = {}
        """Names for the limits' descriptions: ``"cgroup"`` -> its path (from the probe's ``cgroup`` event)."""
        self.horizon_s: float | None = None
        """Memory pressure: the binding limit projected to be reached within this many seconds (None: off)."""
        self._trend_since = -math.inf
        self._projected_at = -math.inf
        self._columns_at = -math.inf
        self._projection: tuple[Projection, LimitTerm] | None = None
        self._episode: float | None = None
        self._pressure: MemoryPressure | None = None
        self._cleanups: deque[tuple[float, bool]] = deque(maxlen=16)
        """Cleanup results: (time, whether it gave back at least half of the growth it was sent for)."""
        self._cleanup_sent: tuple[float, float | None, float] | None = None
        """The last cleanup sent: (time, the projected growth in bytes/s then, the start of its trend data)."""
        self._cleanup_done_at = -math.inf
        self._add_columns(sorted(self._keys))

    # -- feeding ------------------------------------------------------------------------------------
    def _tracked(self, key: str) -> bool:
        if self._all or key in self._keys:
            return True
        return bool(self._prefixes) and key.startswith(self._prefixes)

    def update(self, t: float, values: Mapping[str, Any], events: Iterable[Event] = ()) -> None:
        """Add one tick: its time, values and events.  Cost: one store per tracked key."""
        self.t = t
        self.ticks += 1
        times = self.times
        i = times.count % times.cap
        times.buf[i] = t
        times.count += 1
        if self._all or (self._prefixes and len(values) != self._nvalues):
            self._discover(values)
        get = values.get
        if not self._pending:
            self._pending_start = times.count - 1
        self._pending.append([get(k) for k in self._order])
        if len(self._pending) >= _FLUSH_ROWS:
            self._flush()
        if self.events:
            self.events = []
        self.new_requests = 0
        for e in events:
            if e.kind == "request":
                self.add_request(e)
            else:
                self.events.append(e)
                if e.kind in ("cgroup", "command_result"):
                    self._memory_event(e)

    def _discover(self, values: Mapping[str, Any]) -> None:
        self._nvalues = len(values)
        for key, v in values.items():
            if key in self._index or not self._tracked(key) or math.isnan(_num(v)):
                continue
            self._add_columns([key])  # the past of a new key is missing (NaN)

    def _add_columns(self, keys: list[str]) -> None:
        if not keys:
            return
        self._flush()
        self._block = np.hstack((self._block, np.full((self.capacity, len(keys)), np.nan)))
        self._order.extend(keys)
        self._index = {k: j for j, k in enumerate(self._order)}
        if self._pending:  # rows staged before the discovery lack the new columns
            for row in self._pending:
                row.extend([None] * len(keys))

    def _flush(self) -> None:
        rows = self._pending
        if not rows:
            return
        self._pending = []
        width = len(self._order)
        for row in rows:
            if len(row) < width:
                row.extend([None] * (width - len(row)))
        try:
            arr = np.array(rows, dtype=np.float64)
        except (TypeError, ValueError):  # something that is not a number in there: slot by slot
            arr = np.array([[_num(x) for x in row] for row in rows], dtype=np.float64)
        start = self._pending_start
        if len(rows) > self.capacity:
            arr = arr[-self.capacity :]
            start += len(rows) - self.capacity
        idx = (start + np.arange(arr.shape[0])) % self.capacity
        self._block[idx] = arr
        if len(self._present) < width:
            for j in np.flatnonzero(~np.isnan(arr).all(axis=0)).tolist():
                self._present.add(self._order[j])

    def add_request(self, e: Event) -> None:
        d = e.data
        rq = self.requests
        rq["t"].append(round(e.t, 6))  # as the trace stores it
        for f in REQUEST_FIELDS[1:]:
            rq[f].append(_num(d.get(f)))
        self.request_count += 1
        self.new_requests += 1

    def add_action(self, a: Applied) -> None:
        self.actions.append(a)
        if a.action.knob == "cleanup" and a.outcome in ("sent", "applied", "clamped"):
            # its time, the projected growth then, and where that projection's data began
            self._cleanup_sent = (a.t, self._pressure.slope if self._pressure is not None else None, self._trend_since)
        if a.action.knob == "batch_size" and a.outcome in ("applied", "clamped", "pending"):
            self._restart_trend(a.t)  # memory per batch changed: judge the trend on what follows

    def _restart_trend(self, t: float) -> None:
        """A memory action took effect at ``t``: the projection starts again on what follows (the episode of
        pressure, if any, goes on meanwhile)."""
        self._trend_since = t
        self._projected_at = -math.inf
        self._projection = None

    def _memory_event(self, e: Event) -> None:
        d = e.data
        if e.kind == "cgroup":
            mem = d.get("memory")
            if isinstance(mem, dict) and isinstance(mem.get("path"), str):
                self.labels["cgroup"] = mem["path"]
            return
        if d.get("cmd") not in MEMORY_COMMANDS:
            return
        self._restart_trend(e.t)
        if d.get("cmd") == "cleanup":
            res = d.get("result")
            got = _num(res.get("reclaimed_bytes")) if isinstance(res, dict) and d.get("ok") else 0.0
            reclaimed = got if got == got else 0.0
            # what it was sent to undo: the growth since the previous cleanup (or over the trend it was
            # projected from) at the rate projected when it was sent
            sent_t, slope, since = self._cleanup_sent if self._cleanup_sent is not None else (e.t, None, e.t)
            first = float(self.times.last(len(self.times))[0]) if len(self.times) else e.t
            ref = max(self._cleanup_done_at, since, sent_t - limits.PROJECTION_WINDOW_S, first)
            grown = float(slope) * max(0.0, sent_t - ref) if slope is not None else None
            self._cleanups.append((e.t, bool(reclaimed >= (0.5 * grown if grown is not None else 1 << 20))))
            self._cleanup_done_at = e.t
            self._cleanup_sent = None

    # -- reading ------------------------------------------------------------------------------------
    @property
    def series(self) -> dict[str, np.ndarray]:
        """Key -> its ring of values (a column of the block, aligned with ``times``)."""
        self._flush()
        return {k: self._block[:, j] for j, k in enumerate(self._order)}

    def _column(self, key: str) -> np.ndarray | None:
        j = self._index.get(key)
        if j is None:
            return None
        self._flush()
        return self._block[:, j]

    def latest(self, key: str) -> float | None:
        """The newest non-missing value of ``key`` among the kept ticks, or None."""
        if self._pending:
            j = self._index.get(key)
            if j is not None:
                rows = self._pending
                if len(rows) > self.capacity:  # a ring smaller than a flush: its oldest pending rows are gone
                    rows = rows[-self.capacity :]
                for row in reversed(rows):
                    x = _num(row[j]) if j < len(row) else _NAN
                    if x == x:
                        return x
        if key not in self._present:
            return None
        col = self._column(key)
        if col is None or not self.times.count:
            return None
        # Newest first, without building the ring's view (a copy once it wraps) or scanning all of it: the value
        # is nearly always in the newest slot or a few before (the replay bench called this 30k times in 20k
        # ticks, scanning 3,000 slots each time).
        end = self.times.count % self.capacity or self.capacity
        got = _last_finite(col[:end])
        if got is None and self.times.count > self.capacity:
            got = _last_finite(col[end:])
        return got

    def _has(self, key: str) -> bool:
        """Whether ``key`` had a value in some kept tick (cheap: no scan of the block)."""
        if key in self._present:
            return True
        j = self._index.get(key)
        return j is not None and any(j < len(row) and row[j] is not None for row in self._pending)

    def current(self, key: str) -> float | None:
        """This tick's value of ``key``, or None when this tick did not have it."""
        j = self._index.get(key)
        if j is None or not self.times.count:
            return None
        if self._pending:
            row = self._pending[-1]
            x = _num(row[j]) if j < len(row) else _NAN
        else:
            x = float(self._block[(self.times.count - 1) % self.capacity, j])
        return None if math.isnan(x) else x

    def _view(self, buf: np.ndarray, n: int) -> np.ndarray:
        """The newest ``n`` entries of a series ring, oldest first."""
        count, cap = self.times.count, self.capacity
        if n <= 0:
            return buf[:0]
        end = count % cap or (cap if count else 0)
        if n <= end:
            return buf[end - n : end]
        return np.concatenate((buf[cap - (n - end) :], buf[:end]))

    def _span(self, seconds: float | None) -> int:
        n = len(self.times)
        if seconds is None:
            return n
        ts = self.times.last(n)
        return n - int(np.searchsorted(ts, self.t - seconds, side="left"))

    def values(self, key: str, seconds: float | None = None) -> np.ndarray:
        """Finite values of ``key`` over the last ``seconds`` (all kept when None), oldest first."""
        buf = self._column(key)
        if buf is None:
            return np.empty(0)
        v = self._view(buf, self._span(seconds))
        return v[~np.isnan(v)]

    def after(self, keys: Sequence[str], t: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The kept ticks later than ``t``: their times and each key's values at them (NaN where missing; all NaN
        for a key never seen), oldest first, one row per tick (the columns line up)."""
        n = len(self.times)
        ts = self.times.last(n)
        k = n - int(np.searchsorted(ts, t, side="right"))
        cols: dict[str, np.ndarray] = {}
        for key in keys:
            buf = self._column(key)
            cols[key] = self._view(buf, k) if buf is not None else np.full(k, np.nan)
        return ts[n - k :], cols

    def pairs(self, key: str, seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(times, values)`` of ``key`` over the last ``seconds`` where it was present."""
        buf = self._column(key)
        if buf is None:
            return np.empty(0), np.empty(0)
        n = self._span(seconds)
        v = self._view(buf, n)
        ts = self.times.last(n)
        ok = ~np.isnan(v)
        return ts[ok], v[ok]

    def mean(self, key: str, seconds: float | None = None) -> float | None:
        v = self.values(key, seconds)
        return float(v.mean()) if v.size else None

    def percentile(self, key: str, q: float, seconds: float | None = None) -> float | None:
        v = self.values(key, seconds)
        if not v.size:
            return None
        return float(np.percentile(v, q))

    def request_columns(
        self, since: float | None = None, fields: Sequence[str] = REQUEST_FIELDS
    ) -> dict[str, np.ndarray]:
        """Columns of the kept requests that ended after ``since`` (all kept when None), oldest first."""
        ts = self.requests["t"].last()
        n = ts.size if since is None else ts.size - int(np.searchsorted(ts, since, side="right"))
        return {f: self.requests[f].last(n) for f in fields}

    @property
    def keys(self) -> list[str]:
        """The tracked keys seen so far (``tuner.core.limits.ValueReader``)."""
        return self._order

    def headroom(self) -> tuple[float | None, str | None]:
        """Free share of the binding limit and its name (``"cgroup"``, ``"host"``, ``"gpu/0"`` ...), computed
        once per tick; ``(None, None)`` when nothing reports memory."""
        if self._headroom_at != self.ticks:
            ts = self._terms = limits.terms(self)
            b = self._binding = ts[0] if ts else None
            self._headroom = (b.headroom, b.name) if b is not None else (None, None)
            self._headroom_at = self.ticks
        return self._headroom

    def terms(self) -> list[LimitTerm]:
        """Every limit term this tick, tightest first (``tuner.core.limits.terms``; once per tick)."""
        self.headroom()
        return self._terms

    def binding(self) -> LimitTerm | None:
        """The limit with the least headroom (``describe()``: ``cgroup /x working set 612 MiB of 640 MiB``)."""
        self.headroom()
        return self._binding

    def projection(self) -> tuple[Projection, LimitTerm] | None:
        """The soonest-reached limit's projection (recomputed at most every ``PROJECT_EVERY_S``), over the
        last ``limits.PROJECTION_WINDOW_S`` but not before the last memory action."""
        if self.t - self._projected_at < PROJECT_EVERY_S:
            return self._projection
        self._projected_at = self.t
        best: tuple[Projection, LimitTerm] | None = None
        for term in self.terms():
            if term.series is None or not self._has(term.series):
                continue
            ts, vs = self.pairs(term.series, limits.PROJECTION_WINDOW_S)
            keep = ts >= self._trend_since
            p = limits.project(ts[keep], vs[keep], term.limit, term.used)
            rank = (p.seconds if p.seconds is not None else math.inf, term.headroom)
            if best is None or rank < (
                best[0].seconds if best[0].seconds is not None else math.inf,
                best[1].headroom,
            ):
                best = (p, term)
        self._projection = best
        self._update_episode()
        return best

    def _update_episode(self) -> None:
        got = self._projection
        if got is None or self.horizon_s is None:
            self._episode = None
            return
        p, _ = got
        if p.seconds is not None and p.seconds < self.horizon_s:
            if self._episode is None:
                self._episode = self.t
        elif (p.verdict == "flat" and p.span_s >= RELEASE_SPAN_S) or (
            p.seconds is not None and p.seconds >= RELEASE * self.horizon_s
        ):
            self._episode = None  # a verdict on enough data since the last action, clear of the horizon

    def memory_pressure(self) -> MemoryPressure | None:
        """The binding limit is projected to be reached within ``horizon_s``: the signal the cleanup, batch
        and precision policies act on (None otherwise, and while ``horizon_s`` is None).  While the trend is
        measured again after a memory action, the episode's last projection is returned with ``fresh``
        False."""
        got = self.projection()
        if self._episode is None or self.horizon_s is None:
            self._pressure = None
            return None
        p, term = got if got is not None else (None, None)
        if p is None or term is None or p.seconds is None or p.slope is None or p.seconds >= self.horizon_s:
            last = self._pressure  # re-measuring after an action (or inside the hysteresis): the episode holds
            return replace(last, fresh=False) if last is not None else None
        helped: bool | None = None
        for t, ok in self._cleanups:
            if t >= self._episode:
                helped = ok
        host = self.latest("cgroup_mem_pressure_some_ratio") is None
        psi = self.latest("sys_mem_pressure_some_ratio" if host else "cgroup_mem_pressure_some_ratio")
        self._pressure = MemoryPressure(p.seconds, self.horizon_s, term, p.slope, self._episode, helped, psi, host)
        return self._pressure

    def limit_columns(self) -> dict[str, float]:
        """``mem_headroom_ratio`` and ``mem_time_to_limit_seconds`` when the projection was just computed
        (once a ``PROJECT_EVERY_S``): the agent writes them with the tick."""
        if self._projected_at <= self._columns_at and self.t - self._projected_at < PROJECT_EVERY_S:
            return _NO_COLUMNS  # the common tick: nothing new since the last columns
        got = self.projection()
        if self._projected_at <= self._columns_at:
            return _NO_COLUMNS
        self._columns_at = self._projected_at
        out: dict[str, float] = {}
        h, _ = self.headroom()
        if h is not None:
            out["mem_headroom_ratio"] = round(h, 6)
        if got is not None and got[0].seconds is not None:
            out["mem_time_to_limit_seconds"] = round(got[0].seconds, 3)
        return out
