"""The limits that can kill the inference, which one binds, and when the memory trend reaches it.

**Terms.**  Memory headroom is the minimum over every limit that can actually end the process: the cgroup's
effective limit against its working set (the kernel OOM killer acts there, not at the host's total), the
host's memory, each accelerator's memory.  A term is ``(name, used, limit)`` plus how to describe it and
which metric grows toward it; a *source* turns the latest metric values into terms.  Any probe may contribute
one: ``register(TermSource(...))`` — the engines issue adds the KV cache (``used = kv_cache_usage``, ``limit =
1``), the GPU issue the devices the tree really uses; the window, the policies, ``tuner probes``, the TUI
and the report all see every term through ``binding()`` and ``terms()``.

**Time to limit.**  ``project(x, y, limit, used)``: like Prometheus' ``predict_linear`` alerting, but on the
memory *floor* (what is held throughout; a sawtooth of batches does not count as growth): the lower envelope
of the series (as ``tuner.core.stats.lower_envelope``), Mann-Kendall significance on it, and the Theil-Sen
slope of its recent half (the current rate: a start-up ramp earlier in the window neither hides nor inflates it).
Time to limit = (limit - used now) / slope.  A flat workload has no significant rising floor, so no time to
limit: no action (``tests/test_limits.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


class ValueReader(Protocol):
    """What a source reads: the latest value of a key, the keys seen, and labels (``"cgroup"``: its path)."""

    def latest(self, key: str) -> float | None: ...

    @property
    def keys(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


class LimitTerm(NamedTuple):
    """One limit that can kill the process: ``used`` of ``limit`` (same unit).  (A named tuple: the window
    builds a few every second.)"""

    name: str
    """``"cgroup"``, ``"host"``, ``"gpu/0"``, ``"kv_cache"`` ... (what ``Window.headroom()`` names)."""
    used: float
    limit: float
    what: str = "used"
    """How ``used`` is measured, for people: ``"working set"``, ``"used"``, ``"KV cache"``."""
    label: str = ""
    """Where, for people: the cgroup's path."""
    unit: str = "bytes"
    series: str | None = None
    """The metric key whose trend approaches the limit (the projection's input); None: not projected."""
    pool: str = ""
    """What the ``used`` bytes come out of (``"ram"`` for the host and the cgroup; default: the name).  Within a
    pool the limit with the least room left binds (the next allocation fails there first); across pools, the
    least free share."""

    @property
    def room(self) -> float:
        return self.limit - self.used

    @property
    def headroom(self) -> float:
        """Free share of the limit (negative when usage is above a limit lowered under it)."""
        return 1.0 - self.used / self.limit if self.limit > 0 else 0.0

    def describe(self) -> str:
        """``cgroup /kubepods/pod1 working set 612 MiB of 640 MiB``."""
        where = f"{self.name} {self.label}" if self.label else self.name
        return f"{where} {self.what} {fmt(self.used, self.unit)} of {fmt(self.limit, self.unit)}"


@dataclass(frozen=True)
class TermSource:
    """Turns the latest metric values into terms; ``keys``/``prefixes``: what the window must keep for it."""

    name: str
    keys: tuple[str, ...]
    prefixes: tuple[str, ...]
    terms: Callable[[ValueReader], Iterable[LimitTerm]]


def fmt(v: float, unit: str = "bytes") -> str:
    if unit != "bytes":
        return f"{v:.0%}" if unit == "ratio" else f"{v:g}"
    a = abs(v)
    for suffix, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if a >= div:
            return f"{v / div:.1f} {suffix}" if suffix == "GiB" else f"{v / div:.0f} {suffix}"
    return f"{v:.0f} B"


# -- the built-in sources --------------------------------------------------------------------------------
def _host(r: ValueReader) -> Iterable[LimitTerm]:
    avail, total = r.latest("sys_mem_available_bytes"), r.latest("sys_mem_total_bytes")
    if avail is not None and total:
        yield LimitTerm("host", total - avail, total, "memory used", series="sys_mem_used_bytes", pool="ram")


def _cgroup(r: ValueReader) -> Iterable[LimitTerm]:
    limit = r.latest("cgroup_mem_limit_bytes")
    ws = r.latest("cgroup_mem_working_set_bytes")
    if limit and ws is not None:
        label = r.labels.get("cgroup", "")
        yield LimitTerm("cgroup", ws, limit, "working set", label, series="cgroup_mem_working_set_bytes", pool="ram")


def tree_uses_gpu(r: ValueReader, dev: str) -> bool:
    """Whether the watched tree uses GPU ``dev`` (``tuner.probes.nvidia``): it holds a context or memory there;
    where the probe cannot attribute processes (another PID namespace, MIG without privileges), the devices
    its ``CUDA_VISIBLE_DEVICES`` shows it; with no tree figures at all (no tree, an older trace), every one."""
    procs, mem = r.latest(f"gpu_tree_procs/{dev}"), r.latest(f"gpu_tree_mem_bytes/{dev}")
    if procs is not None or mem is not None:
        return bool(procs) or bool(mem)
    cuda = r.latest(f"gpu_tree_cuda_devices/{dev}")
    return cuda is None or cuda > 0


def _devices(r: ValueReader) -> Iterable[LimitTerm]:
    """Each accelerator's memory — for GPUs only the devices the tree uses (``tree_uses_gpu``): another job's
    full GPU is not this inference's limit."""
    for key in [k for k in r.keys if k.startswith(("gpu_mem_used_bytes/", "npu_mem_used_bytes/"))]:
        used = r.latest(key)
        if used is None:
            continue
        kind, dev = key.split("_", 1)[0], key.split("/", 1)[1]
        if kind == "gpu" and not tree_uses_gpu(r, dev):
            continue
        tot = r.latest(f"{kind}_mem_total_bytes/{dev}")
        if tot:
            yield LimitTerm(f"{kind}/{dev}", used, tot, "memory used", series=key)


def _kv_cache(r: ValueReader) -> Iterable[LimitTerm]:
    """A serving engine that preallocates its KV cache (vLLM, SGLang, TGI) shows no pressure in process or
    device memory; the cache's own usage does (``tuner.probes.engine``: the fullest engine's)."""
    used = r.latest("engine_kv_cache_usage_ratio")
    if used is not None:
        yield LimitTerm("kv_cache", used, 1.0, "used", unit="ratio", series="engine_kv_cache_usage_ratio")


DEVICE_PREFIXES = ("gpu_mem_", "npu_mem_", "gpu_tree_procs/", "gpu_tree_mem_bytes/", "gpu_tree_cuda_devices/")

SOURCES: list[TermSource] = [
    TermSource("host", ("sys_mem_available_bytes", "sys_mem_total_bytes", "sys_mem_used_bytes"), (), _host),
    TermSource("cgroup", ("cgroup_mem_limit_bytes", "cgroup_mem_working_set_bytes"), (), _cgroup),
    TermSource("devices", (), DEVICE_PREFIXES, _devices),
    TermSource("kv_cache", ("engine_kv_cache_usage_ratio",), (), _kv_cache),
]
"""Every source of limit terms; ``register`` adds one (the device and KV-cache terms of later issues)."""

PRESSURE_KEYS: tuple[str, ...] = (
    "cgroup_mem_pressure_some_ratio",
    "cgroup_mem_pressure_full_ratio",
    "sys_mem_pressure_some_ratio",
    "sys_mem_pressure_full_ratio",
)
"""PSI figures the window keeps as evidence (per cgroup on v2, the host's otherwise)."""


def register(source: TermSource) -> None:
    """Add (or replace, by name) a source of limit terms."""
    SOURCES[:] = [s for s in SOURCES if s.name != source.name] + [source]


def tracked() -> tuple[set[str], set[str]]:
    """Keys and prefixes a window must keep for every source (and the pressure evidence)."""
    keys: set[str] = set(PRESSURE_KEYS)
    prefixes: set[str] = set()
    for s in SOURCES:
        keys.update(s.keys)
        prefixes.update(s.prefixes)
    return keys, prefixes


def terms(r: ValueReader) -> list[LimitTerm]:
    """Every term the sources give for the latest values, tightest first (a failing source is skipped): per
    pool the term with the least room left, those by free share; then the others, by free share."""
    out: list[LimitTerm] = []
    for s in SOURCES:
        try:
            out.extend(t for t in s.terms(r) if t.limit > 0 and math.isfinite(t.used) and math.isfinite(t.limit))
        except Exception:  # a contributed source must never take the agent down
            continue
    first: dict[str, LimitTerm] = {}
    for t in out:
        pool = t.pool or t.name
        if pool not in first or t.room < first[pool].room:
            first[pool] = t
    lead = sorted(first.values(), key=lambda t: t.headroom)
    return lead + sorted((t for t in out if t not in lead), key=lambda t: t.headroom)


def binding(r: ValueReader) -> LimitTerm | None:
    """The limit with the least headroom, or None when nothing reports memory."""
    ts = terms(r)
    return ts[0] if ts else None


class DictReader:
    """A ``ValueReader`` over one dict of values (a tick, a ``tuner probes`` reading)."""

    def __init__(self, values: Mapping[str, float | None], labels: Mapping[str, str] | None = None) -> None:
        self._v = values
        self._labels = dict(labels or {})

    def latest(self, key: str) -> float | None:
        v = self._v.get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    @property
    def keys(self) -> Sequence[str]:
        return list(self._v)

    @property
    def labels(self) -> Mapping[str, str]:
        return self._labels


# -- projection ------------------------------------------------------------------------------------------
PROJECTION_WINDOW_S = 60.0
"""How much of the recent past the projection looks at."""
MIN_POINTS = 20
MIN_SPAN_S = 10.0
ALPHA = 0.01
ENVELOPE_BINS = 12
MIN_BINS = 6


def envelope(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``tuner.core.stats.lower_envelope`` for ``x`` in time order: the minimum of ``y`` in each of ``bins``
    equal stretches of ``x`` at the stretch's centre (empty stretches left out), by ``reduceat`` (5x faster
    than its ``minimum.at`` on 600 points: the projection runs every second)."""
    lo, hi = float(x[0]), float(x[-1])
    edges = np.linspace(lo, hi, bins + 1)
    starts = np.searchsorted(x, edges[:-1], side="left")
    starts[0] = 0
    present = np.concatenate((starts[1:] > starts[:-1], [starts[-1] < x.size]))
    mins = np.minimum.reduceat(y, starts[present]) if present.any() else y[:0]
    centres = (edges[:-1] + edges[1:]) / 2
    return centres[present], mins


def mk_small(y: Sequence[float]) -> tuple[int, float]:
    """``tuner.core.stats.mann_kendall`` (S and its two-sided p, ties corrected, continuity corrected) written
    out for the dozen envelope points (its merge-sort form costs 0.3 ms at this size)."""
    n = len(y)
    s = 0
    for i in range(n):
        yi = y[i]
        for j in range(i + 1, n):
            d = y[j] - yi
            s += (d > 0) - (d < 0)
    counts: dict[float, int] = {}
    for v in y:
        counts[v] = counts.get(v, 0) + 1
    var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in counts.values())) / 18.0
    if n < 3 or var <= 0:
        return s, 1.0
    z = (s - 1) / math.sqrt(var) if s > 0 else (s + 1) / math.sqrt(var) if s < 0 else 0.0
    return s, min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))


def ts_small(x: Sequence[float], y: Sequence[float]) -> float:
    """``tuner.core.stats.theil_sen``'s slope (median of the pairwise slopes) for a few points; NaN when
    fewer than two distinct x."""
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x)) if x[j] != x[i]]
    if not slopes:
        return math.nan
    slopes.sort()
    m = len(slopes) // 2
    return slopes[m] if len(slopes) % 2 else (slopes[m - 1] + slopes[m]) / 2


@dataclass(frozen=True)
class Projection:
    """The floor trend of one term's series: ``verdict`` ``"rising"`` (``seconds`` to the limit),
    ``"flat"`` (no significant rise, or not any more) or ``"insufficient data"``."""

    verdict: str
    seconds: float | None
    slope: float | None
    """Units per second of the floor's recent half."""
    p_value: float | None
    n: int
    span_s: float


def project(
    x: np.ndarray,
    y: np.ndarray,
    limit: float,
    used: float,
    *,
    alpha: float = ALPHA,
    min_points: int = MIN_POINTS,
    min_span_s: float = MIN_SPAN_S,
) -> Projection:
    """Extrapolate the floor of ``y`` (over times ``x`` in seconds) to ``limit`` from ``used`` now."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    span = float(x[-1] - x[0]) if n else 0.0
    if n < min_points or span < min_span_s:
        return Projection("insufficient data", None, None, None, n, span)
    bins = min(ENVELOPE_BINS, n // 3)
    if bins < MIN_BINS:
        return Projection("insufficient data", None, None, None, n, span)
    exa, eya = envelope(x, y, bins)
    if exa.size < MIN_BINS:
        return Projection("insufficient data", None, None, None, n, span)
    ex, ey = exa.tolist(), eya.tolist()
    s, p = mk_small(ey)
    if not (s > 0 and p < alpha):
        return Projection("flat", None, None, p, n, span)
    half = len(ex) // 2
    slope = ts_small(ex[half:], ey[half:])
    if not (slope > 0 and math.isfinite(slope)):
        return Projection("flat", None, slope if math.isfinite(slope) else None, p, n, span)
    seconds = max(0.0, (limit - used) / slope)
    return Projection("rising", seconds, slope, p, n, span)


@dataclass(frozen=True)
class MemoryPressure:
    """The memory-pressure signal the policies read (``Window.memory_pressure()``): the binding limit is
    projected to be reached within the horizon.

    ``cleanup_helped``: whether the last cleanup in this episode gave back at least half of what it was sent
    to undo — the growth since the previous cleanup (or over the trend it was projected from) at the rate
    projected when it was sent; None: no cleanup result yet.  Cleanup comes first; a smaller batch and a
    lower precision only when it did not help (a leak it reaches comes back with each cleanup; one it does not
    reach keeps growing).
    """

    seconds: float
    horizon_s: float
    term: LimitTerm
    slope: float
    since: float
    """When this episode began (trace time)."""
    cleanup_helped: bool | None
    psi_some: float | None
    psi_host_wide: bool
    fresh: bool = True
    """Projected on data after the last memory action.  False: the episode goes on while the trend is
    measured again after an action (the last projection, held): wait for a fresh one before acting again."""

    @property
    def escalate(self) -> bool:
        """Cleanup was tried and did not buy the time back: a smaller batch, then a lower precision."""
        return self.cleanup_helped is False

    def evidence(self) -> dict[str, object]:
        ev: dict[str, object] = {
            "time_to_limit_s": round(self.seconds, 1),
            "horizon_s": self.horizon_s,
            "limit": self.term.describe(),
            "growth_bytes_per_s": round(self.slope, 1),
        }
        if self.psi_some is not None:
            ev["memory_psi_some"] = self.psi_some
            ev["memory_psi_scope"] = "host" if self.psi_host_wide else "cgroup"
        return ev

    def describe(self) -> str:
        """``cgroup /x working set 420 MiB of 448 MiB, limit in 38 s at +5.1 MiB/s``."""
        return f"{self.term.describe()}, limit in {self.seconds:.0f} s at +{fmt(self.slope, self.term.unit)}/s"


# -- over a recorded trace ---------------------------------------------------------------------------------
class ColumnsReader:
    """A ``ValueReader`` over recorded columns at one tick: each key's last finite value at or before it."""

    def __init__(self, columns: Mapping[str, np.ndarray], labels: Mapping[str, str] | None = None) -> None:
        self._labels = dict(labels or {})
        self._keys = list(columns)
        self._filled: dict[str, np.ndarray] = {}
        self._cols = columns
        self.i = 0

    def _col(self, key: str) -> np.ndarray | None:
        got = self._filled.get(key)
        if got is None:
            col = self._cols.get(key)
            if col is None:
                return None
            col = np.asarray(col, dtype=np.float64)
            idx = np.where(np.isfinite(col), np.arange(col.size), -1)
            np.maximum.accumulate(idx, out=idx)  # forward fill: the last finite value so far
            got = np.where(idx >= 0, col[np.maximum(idx, 0)], np.nan)
            self._filled[key] = got
        return got

    def latest(self, key: str) -> float | None:
        col = self._col(key)
        if col is None or self.i >= col.size:
            return None
        v = float(col[self.i])
        return v if math.isfinite(v) else None

    @property
    def keys(self) -> Sequence[str]:
        return self._keys

    @property
    def labels(self) -> Mapping[str, str]:
        return self._labels


def over_time(
    columns: Mapping[str, np.ndarray], n: int, labels: Mapping[str, str] | None = None, max_points: int = 512
) -> list[tuple[int, LimitTerm]]:
    """The binding term at up to ``max_points`` ticks of a recording (evenly spread, plus the last 64, where
    a limit is usually closest), as ``(tick index, term)``."""
    if n <= 0:
        return []
    idx = set(np.linspace(0, n - 1, min(n, max_points)).astype(int).tolist()) | set(range(max(0, n - 64), n))
    r = ColumnsReader(columns, labels)
    out: list[tuple[int, LimitTerm]] = []
    for i in sorted(idx):
        r.i = i
        b = binding(r)
        if b is not None:
            out.append((i, b))
    return out
