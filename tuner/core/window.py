"""The agent's view of the recent past: bounded numpy ring buffers fed one tick at a time.

- Metric values: a ring of rows, one row per tick (aligned with a ring of tick times), one column per
  tracked key (NaN where a tick had no value), so "the last S seconds of key k" is one
  ``searchsorted`` and a slice.  A tick costs one list of the tracked values; rows are copied into the
  numpy block in bulk (every 64 ticks, or when something reads), which is what keeps a tick at a few
  microseconds.
- Finished requests (``request`` events): columns of the fields policies use (temperature, seq-rep-4,
  tokens, TTFT, queue time, batch size ...), in their own rings.
- The current tick's other events (``oom``, ``command_result``, ...) and the recent applied actions.

Appends are O(1) and nothing grows: every buffer has a fixed capacity.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

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
        self._headroom_at = -1
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
                for row in reversed(self._pending):
                    x = _num(row[j]) if j < len(row) else _NAN
                    if x == x:
                        return x
        col = self._column(key)
        if col is None:
            return None
        v = self._view(col, len(self.times))
        ok = np.flatnonzero(~np.isnan(v))
        return float(v[ok[-1]]) if ok.size else None

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

    def headroom(self) -> tuple[float | None, str | None]:
        """Free memory on the binding device (computed once per tick)."""
        if self._headroom_at != self.ticks:
            self._headroom = self._compute_headroom()
            self._headroom_at = self.ticks
        return self._headroom

    def _compute_headroom(self) -> tuple[float | None, str | None]:
        """Free memory on the binding device: ``(free / total, which)``, the smallest over the host
        (``sys_mem_available_bytes``) and every GPU/NPU with used and total figures; ``(None, None)``
        when nothing reports memory."""
        best: tuple[float | None, str | None] = (None, None)
        avail, total = self.latest("sys_mem_available_bytes"), self.latest("sys_mem_total_bytes")
        if avail is not None and total:
            best = (avail / total, "host")
        for key in self._order:
            if key.startswith(("gpu_mem_used_bytes/", "npu_mem_used_bytes/")):
                used = self.latest(key)
                if used is None:
                    continue
                dev = key.split("/", 1)[1]
                kind = key.split("_", 1)[0]
                tot = self.latest(f"{kind}_mem_total_bytes/{dev}")
                if tot:
                    h = 1.0 - used / tot
                    if best[0] is None or h < best[0]:
                        best = (h, f"{kind}/{dev}")
        return best
