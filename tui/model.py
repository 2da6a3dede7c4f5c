"""The TUI's state, built only from trace record dicts; pure Python + numpy, no Textual.

``Model.apply(record)`` takes every record kind of a trace (header, tick, skip, event, action, note, end);
queries take a view time ``now`` (the newest tick when live, the playhead in a replay) so every screen
works the same for a live feed and a recorded file.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

WINDOWS: tuple[float, ...] = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
SPEEDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DEFAULT_REP_BAND = (0.0, 0.2)


class Columns:
    """Tick times and one float64 column per metric key, NaN where a tick lacks the key.

    Keeps the newest ``capacity`` ticks (older ones are dropped in halves, amortised O(1) per tick);
    the arrays are always contiguous and sorted by time, so a window is two ``searchsorted`` calls.
    """

    def __init__(self, capacity: int = 36_000) -> None:
        self.capacity = max(16, capacity)
        self._size = min(2 * self.capacity, 4096)  # grows by doubling up to 2 x capacity
        self.times = np.empty(self._size, dtype=np.float64)
        self.cols: dict[str, np.ndarray] = {}
        self.n = 0
        self.total = 0

    def append(self, t: float, values: Mapping[str, Any]) -> None:
        if self.n == self._size and self._size < 2 * self.capacity:
            self._size = min(2 * self.capacity, 2 * self._size)
            self.times = np.resize(self.times, self._size)
            for key, arr in self.cols.items():
                grown = np.full(self._size, np.nan)
                grown[: self.n] = arr[: self.n]
                self.cols[key] = grown
        if self.n == self._size:
            keep = self.capacity
            self.times[:keep] = self.times[self.n - keep : self.n]
            for arr in self.cols.values():
                arr[:keep] = arr[self.n - keep : self.n]
            self.n = keep
        i = self.n
        self.times[i] = t
        for key, v in values.items():
            col = self.cols.get(key)
            if col is None:
                col = self.cols[key] = np.full(self._size, np.nan)
            col[i] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
        if len(values) < len(self.cols):
            for key, arr in self.cols.items():
                if key not in values:
                    arr[i] = np.nan
        self.n += 1
        self.total += 1

    def span(self, t0: float, t1: float) -> slice:
        ts = self.times[: self.n]
        return slice(int(np.searchsorted(ts, t0, "left")), int(np.searchsorted(ts, t1, "right")))

    def window(self, key: str, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        s = self.span(t0, t1)
        arr = self.cols.get(key)
        if arr is None:
            return self.times[s][:0], self.times[s][:0]
        return self.times[: self.n][s], arr[: self.n][s]

    def latest(self, key: str, at: float) -> float | None:
        """The newest finite value of ``key`` at or before ``at`` (looks back at most 600 ticks)."""
        arr = self.cols.get(key)
        if arr is None or self.n == 0:
            return None
        i = int(np.searchsorted(self.times[: self.n], at, "right"))
        lo = max(0, i - 600)
        seg = arr[lo:i]
        ok = np.flatnonzero(np.isfinite(seg))
        if not len(ok):
            return None
        return float(seg[ok[-1]])

    @property
    def first_t(self) -> float:
        return float(self.times[0]) if self.n else 0.0

    @property
    def last_t(self) -> float:
        return float(self.times[self.n - 1]) if self.n else 0.0


@dataclass(frozen=True, slots=True)
class Device:
    """A panel: ``kind`` cpu / ram / gpu / npu, ``index`` the device part of its keys."""

    kind: str
    index: str | None
    title: str


@dataclass(frozen=True, slots=True)
class ChartSpec:
    """A chart: series keys with labels; ``step`` draws step lines (knobs); ``why`` explains no data."""

    id: str
    title: str
    series: tuple[tuple[str, str], ...]
    unit: str
    step: bool = False
    trend: str | None = None
    band: tuple[float, float] | None = None
    integer: bool = False
    """Integer values (batch size, bits): the y axis ends on whole numbers."""


def fmt_value(v: float | None, unit: str) -> str:
    """Human figures: bytes in KiB..GiB, seconds in ms/s, ratios as %, cores as ``1.5c``; plain values with
    three significant digits, integers (a batch size) as integers."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "bytes":
        a = abs(v)
        for div, suf in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
            if a >= div:
                return f"{v / div:.1f}{suf}"
        return f"{v:.0f}B"
    if unit == "seconds":
        return f"{v * 1000:.0f}ms" if abs(v) < 1 else f"{v:.2f}s"
    if unit == "ratio":
        return f"{v * 100:.0f}%"
    if unit == "cores":
        return f"{v:.2f}c"
    if unit == "bits":
        return {32: "fp32", 16: "16b", 8: "int8"}.get(round(v), f"{v:.0f}b")
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"  # a batch size is 16, not 16.00
    return f"{v:.3g}"


class Model:
    """Everything the screens show; fed one record at a time."""

    def __init__(self, capacity: int = 36_000, keep_requests: int = 5000, keep_actions: int = 10_000) -> None:
        self.header: dict[str, Any] | None = None
        self.cols = Columns(capacity)
        self.keep_requests = keep_requests
        self.keep_actions = keep_actions
        self.req_t: list[float] = []
        self.requests: list[dict[str, Any]] = []
        self.act_t: list[float] = []
        self.actions: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        self.procs: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        self.dropped = 0
        self.end: dict[str, Any] | None = None
        self.oom: dict[str, Any] | None = None
        """The ``oom_kill`` event (who the kernel OOM killer killed), once it arrived."""
        self.policies: dict[str, bool] = {}
        self.records = 0
        self.newest_t = 0.0  # the newest time of any record (live view time)
        self.version = 0  # bumps on every change: views redraw only when it moved

    # -- feeding --------------------------------------------------------------------------------------
    def apply_many(self, recs: Iterable[Mapping[str, Any]]) -> None:
        for r in recs:
            self.apply(r)

    def apply(self, rec: Mapping[str, Any]) -> None:
        k = rec.get("k")
        self.records += 1
        t = rec.get("t")
        if isinstance(t, (int, float)) and t > self.newest_t:
            self.newest_t = float(t)
        self.version += 1
        try:
            if k == "tick":
                m = rec.get("m")
                self.cols.append(float(rec["t"]), m if isinstance(m, Mapping) else {})
                p = rec.get("p")
                if isinstance(p, Mapping) and p:
                    self.procs = {str(pid): dict(v) for pid, v in p.items() if isinstance(v, Mapping)}
            elif k == "event":
                if rec.get("kind") == "request" and isinstance(rec.get("data"), Mapping):
                    self._add(self.req_t, self.requests, float(rec["t"]), dict(rec["data"]), self.keep_requests)
                elif rec.get("kind") == "oom_kill" and isinstance(rec.get("data"), Mapping):
                    self.oom = {**rec["data"], "t": float(rec["t"])}
            elif k == "action":
                a = dict(rec)
                self._add(self.act_t, self.actions, float(rec["t"]), a, self.keep_actions)
                pol = str(a.get("policy", ""))
                if pol:
                    self.policies.setdefault(pol, True)
            elif k == "note":
                self.notes.append(dict(rec))
                del self.notes[:-200]
                msg = str(rec.get("msg", ""))
                if msg.startswith("viewer dropped"):
                    self.dropped += int(rec.get("n", 0) or 0)
                self._policy_note(msg)
            elif k == "skip":
                self.skipped += int(rec.get("n", 1))
            elif k == "header":
                self.header = dict(rec)
                for name in rec.get("policies") or ():
                    self.policies.setdefault(str(name), True)
            elif k == "end":
                self.end = dict(rec)
        except (KeyError, TypeError, ValueError):
            pass  # a malformed record is skipped; the view goes on

    @staticmethod
    def _add(ts: list[float], items: list[dict[str, Any]], t: float, item: dict[str, Any], keep: int) -> None:
        item["t"] = t
        if ts and t < ts[-1]:
            i = bisect.bisect_right(ts, t)
            ts.insert(i, t)
            items.insert(i, item)
        else:
            ts.append(t)
            items.append(item)
        if len(ts) > keep + keep // 4:
            del ts[:-keep]
            del items[:-keep]

    def _policy_note(self, msg: str) -> None:
        # "policy NAME disabled from the live view" (written by the session when it obeyed a viewer)
        parts = msg.split()
        if len(parts) >= 3 and parts[0] == "policy" and parts[2] in ("enabled", "disabled"):
            self.policies[parts[1]] = parts[2] == "enabled"

    # -- header facts -----------------------------------------------------------------------------------
    @property
    def probes(self) -> dict[str, dict[str, Any]]:
        p = (self.header or {}).get("probes")
        return p if isinstance(p, dict) else {}

    def probe_reason(self, *names: str) -> str | None:
        """Why a probe is not sampling (``None`` if it is, or if the header does not know it)."""
        for n in names:
            st = self.probes.get(n)
            if isinstance(st, dict) and not st.get("available", True):
                return str(st.get("reason") or "unavailable")
        return None

    def command(self) -> str:
        cmd = (self.header or {}).get("command")
        if isinstance(cmd, list):
            return " ".join(str(c) for c in cmd)
        return str(cmd) if cmd else "(attached)"

    def rep_band(self) -> tuple[tuple[float, float], bool]:
        """The repetition target band from the header (``targets``), else the default (flag False)."""
        tg = (self.header or {}).get("targets")
        if isinstance(tg, dict):
            b = tg.get("req_seq_rep_4_ratio")
            if isinstance(b, (list, tuple)) and len(b) == 2:
                return (float(b[0]), float(b[1])), True
        return DEFAULT_REP_BAND, False

    def memory_line(self, now: float) -> str | None:
        """The binding memory limit, how close it is and the projected time to it — shown when it is not
        simply the host's (a cgroup, a device) or a time to limit is projected; the OOM kill once it came."""
        if self.oom is not None and self.oom["t"] <= now + 1e-6:
            return f"OOM KILLED: {self.oom.get('message') or 'by the kernel OOM killer'}"
        from tuner.core import limits

        b = limits.binding(_ModelReader(self, now))
        if b is None:
            return None
        ttl = self.cols.latest("mem_time_to_limit_seconds", now)
        horizon = (self.header or {}).get("limit_horizon_s")
        soon = ttl is not None and (not isinstance(horizon, (int, float)) or ttl < horizon)
        if b.name == "host" and not soon:
            return None
        return f"memory: {b.describe()} ({b.headroom:.0%} free)" + (f", limit in {ttl:.0f} s" if soon else "")

    def quality_line(self, now: float) -> str | None:
        """Consistency (``--consistency``): the latest figures, named with the backend that produced them."""
        q = (self.header or {}).get("quality")
        if not isinstance(q, dict):
            return None
        b = str(q.get("backend"))
        name = b if q.get("semantic") else f"{b}, lexical"
        parts = []
        for key, label in (("quality_self_consistency_ratio", "self"), ("quality_relevance_ratio", "relevance"),
                           ("quality_reference_consistency_ratio", "reference")):
            v = self.cols.latest(f"{key}/{b}", now)
            if v is not None:
                parts.append(f"{label} {v:.2f}")
        if not parts:
            state = "scorer not running" if self.cols.latest("quality_jobs", now) is None else "no scores yet"
            return f"consistency ({name}): {state}"
        return f"consistency ({name}): {', '.join(parts)}"

    def energy_line(self, now: float) -> str | None:
        """Energy per generated token on the GPUs the inference uses (``tuner.core.energy``), or why not."""
        from tuner.core import energy

        if not any(k.startswith("gpu_energy_joules_total/") for k in self.cols.cols):
            return None
        r = _ModelReader(self, now)
        devs = energy.devices_used(r)
        if not devs:
            return None
        watts = [self.cols.latest(f"gpu_power_watts/{d}", now) for d in devs]
        power = f", {sum(w for w in watts if w is not None):.0f} W" if any(w is not None for w in watts) else ""
        reason = energy.shared_reason(r, devs)
        if reason is not None:
            return f"energy/token n/a: {reason}{power}"
        v = self.cols.latest(energy.KEY, now)
        if v is None:
            return f"energy/token: no tokens yet{power}"
        return f"energy {v:.3g} J/token{power}"

    # -- derived views ----------------------------------------------------------------------------------
    @property
    def last_t(self) -> float:
        t = self.cols.last_t
        if self.end is not None:
            t = max(t, float(self.end.get("t", 0.0)))
        return t

    @property
    def keys(self) -> list[str]:
        return list(self.cols.cols)

    def devices(self) -> list[Device]:
        """CPU and RAM always; each GPU/NPU index seen in the metric keys."""
        out = [Device("cpu", None, "CPU"), Device("ram", None, "RAM")]
        for kind in ("gpu", "npu"):
            idx = sorted(
                {k.split("/", 1)[1] for k in self.cols.cols if k.startswith(f"{kind}_") and "/" in k},
                key=lambda s: (len(s), s),
            )
            out.extend(Device(kind, i, f"{kind.upper()} {i}") for i in idx)
        return out

    def missing_devices(self) -> list[str]:
        """Lines like ``no GPU: NVML library not found`` for accelerators without keys."""
        out = []
        have = {d.kind for d in self.devices()}
        if "gpu" not in have:
            out.append(f"no GPU: {self.probe_reason('nvidia') or 'no GPU metrics in this trace'}")
        if "npu" not in have:
            why = self.probe_reason("ascend_npu", "ascend", "npu") or self.probe_reason("intel_npu")
            out.append(f"no NPU: {why or 'no NPU metrics in this trace'}")
        return out

    def charts(self) -> list[ChartSpec]:
        """The dashboard's charts, with series for the devices this trace has."""
        devs = self.devices()
        mem: list[tuple[str, str]] = [("tree_rss_bytes", "RSS")]
        util: list[tuple[str, str]] = [("sys_cpu_ratio", "CPU")]
        for d in devs:
            if d.kind in ("gpu", "npu"):
                mem.append((f"{d.kind}_mem_used_bytes/{d.index}", f"{d.kind}{d.index}"))
                util.append((f"{d.kind}_util_ratio/{d.index}", f"{d.kind}{d.index}"))
        band, _ = self.rep_band()
        return [
            ChartSpec("memory", "Memory", tuple(mem), "bytes", trend="tree_rss_bytes"),
            ChartSpec("util", "Utilization", tuple(util), "ratio"),
            ChartSpec("ttft", "TTFT", (("req_ttft_p50_seconds", "p50"), ("req_ttft_p95_seconds", "p95")), "seconds"),
            ChartSpec("tpot", "TPOT", (("req_tpot_p50_seconds", "p50"), ("req_tpot_p95_seconds", "p95")), "seconds"),
            ChartSpec("tps", "Tokens/s", (("req_tokens_per_second", "tok/s"),), "value"),
            ChartSpec(
                "rep",
                "Repetition",
                (("req_seq_rep_4_ratio", "rep4"), ("req_loop_ratio", "loop")),
                "ratio",
                band=band,
            ),
            ChartSpec(
                "knobs_t",
                "Temperature / rep. penalty",
                (("knob_temperature", "temp"), ("knob_repetition_penalty", "pen")),
                "value",
                step=True,
            ),
            ChartSpec(
                "knobs_b",
                "Batch size / precision",
                (("knob_batch_size", "batch"), ("knob_precision_bits", "bits")),
                "value",
                step=True,
                integer=True,
            ),
        ]

    def why_empty(self, spec: ChartSpec) -> str:
        """What to show instead of a blank chart."""
        keys = [k for k, _ in spec.series]
        if spec.id in ("ttft", "tpot", "tps", "rep"):
            if self.probe_reason("output"):
                return f"no request data: {self.probe_reason('output')}"
            return "no request data yet: no client has reported a request"
        if spec.id.startswith("knobs"):
            return "no knob values: no policy running (--policy not given)"
        if spec.id in ("memory", "util") and self.probe_reason("cpu"):
            return f"no CPU metrics: {self.probe_reason('cpu')}"
        return f"no data for {', '.join(keys)}"

    def trend(self, key: str, t0: float, t1: float) -> tuple[float, float] | None:
        """Least-squares line (slope per second, intercept) of ``key`` over the window."""
        ts, vs = self.cols.window(key, t0, t1)
        ok = np.isfinite(vs)
        if ok.sum() < 10:
            return None
        x, y = ts[ok], vs[ok]
        if float(x[-1] - x[0]) < 1.0:
            return None
        slope, icept = np.polyfit(x - x[0], y, 1)
        return float(slope), float(icept - slope * x[0])

    def requests_until(self, t: float, n: int) -> list[dict[str, Any]]:
        i = bisect.bisect_right(self.req_t, t)
        return self.requests[max(0, i - n) : i]

    def actions_until(self, t: float) -> list[dict[str, Any]]:
        return self.actions[: bisect.bisect_right(self.act_t, t)]

    def next_action_after(self, t: float) -> float | None:
        i = bisect.bisect_right(self.act_t, t + 1e-9)
        return self.act_t[i] if i < len(self.act_t) else None

    def tree_pids(self) -> str:
        if not self.procs:
            pid = (self.header or {}).get("pid")
            return f"pid {pid}" if pid else "no processes"
        parts = [f"{pid} {str(v.get('name', '?'))[:16]}" for pid, v in list(self.procs.items())[:4]]
        more = len(self.procs) - 4
        return ", ".join(parts) + (f" +{more}" if more > 0 else "")


class _ModelReader:
    """``tuner.core.limits.ValueReader`` over the model's columns at view time ``now``."""

    def __init__(self, model: Model, now: float) -> None:
        self.model, self.now = model, now
        mem = ((model.probes.get("cgroup") or {}).get("detail") or {}).get("memory")
        self.labels = {"cgroup": mem["path"]} if isinstance(mem, dict) and isinstance(mem.get("path"), str) else {}

    def latest(self, key: str) -> float | None:
        return self.model.cols.latest(key, self.now)

    @property
    def keys(self) -> list[str]:
        return list(self.model.cols.cols)


def nice_window(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    if seconds >= 60:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def clock(seconds: float) -> str:
    s = max(0, int(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
