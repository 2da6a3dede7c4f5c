"""What a trace says: summary statistics, memory trends with a leak verdict, request latencies.

``summarize(data)`` returns a plain dict (JSON-ready: no NaN, no numpy types) whose keys are stable:

- ``trace`` (path), ``command`` (list of str or None), ``host``, ``started_unix``
- ``duration_s``, ``ticks``, ``skipped_ticks``, ``interval_s`` (the requested one, from the header),
  ``ended`` (an end record exists), ``exit_code`` (int or None)
- ``metrics``: ``{key: {"unit", "samples", "min", "median", "p95", "max"}}`` (None when never recorded)
- ``peak_rss_bytes``: the maximum of ``tree_rss_bytes`` or None
- ``memory_trend``: ``{"per_minute": {key: verdict}, "per_1k_requests": {key: verdict}}`` for
  ``tree_rss_bytes`` (always listed) and every device/allocator memory column present; the request-based
  trend is there only when the trace has ``request`` events (x = requests finished by each tick / 1000).
  A verdict is ``tuner.core.stats.LeakVerdict.as_dict()``: verdict, slope, p_value, n, unit, reason.
- ``peak_memory_bytes``: ``{key: max}`` for every memory column judged in ``memory_trend`` that has samples
  (per device: ``gpu_mem_used_bytes/0`` ...)
- ``requests``: None without ``request`` events, else ``{"count", "failed", "output_tokens",
  "ttft_seconds", "tpot_seconds", "e2e_seconds", "queue_seconds", "tokens_per_second", "seq_rep_4",
  "rep_32", "loop_share"}`` where each distribution is ``{"p50", "p95", "n"}`` over the request events'
  fields of those names (``probes/output.py``); per-request tokens/s is ``tokens_per_second`` if given,
  else ``tokens`` / ``e2e_seconds``; ``loop_share`` is the share of requests with ``loop`` true (None when
  no request says)
- ``actions`` (count), ``actions_by_outcome`` (``{outcome: count}``)
- ``memory_limit``: None without memory figures, else the binding limit (``tuner.core.limits``) at the end
  ``{"name", "limit" (its description), "headroom", "closest": {"t", "headroom", "limit"}}``
- ``time_to_limit``: None unless the agent projected the binding limit within its horizon, else
  ``{"horizon_s", "first_t" (first projection under the horizon), "seconds" (then), "action_t", "action"
  (the first action whose evidence has a time to limit), "to_action_s"}``
- ``oom_kill``: None, the ``oom_kill`` event's data (``message``: who the kernel OOM killer killed, the
  limit, the peak), or — for a trace cut short — ``{"inferred": true, "message"}`` when the recorded
  cgroup's OOM-kill counter is higher now than at the last tick
- ``replay``: None unless the trace is a counterfactual written by ``tuner replay --out``; then ``{"of",
  "policy", "diverged_at", "diverged_why", "text"}``: the metrics are the recording's, which are what the
  replayed policy would have caused only up to ``diverged_at`` (None: never diverged; missing from traces
  written before it was recorded, ``text`` says so)
- ``consistency``: None without ``--consistency``, else ``tuner.quality.report.summarize``'s dict (the backend,
  self-consistency and relevance, by temperature, each precision step's KL / top-1 / reference consistency)
- ``warnings``: list of one-line strings (reader warnings, warn/error notes, findings)

``render_text(summary)`` turns it into a compact table for a terminal.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from tuner.core import limits
from tuner.core.stats import leak_verdict, percentiles
from tuner.quality import report as quality_report
from tuner.records import split_key, unit_of
from tuner.trace import TraceData

MEMORY_TREND_NAMES = (
    "tree_rss_bytes",
    "tree_uss_bytes",
    "gpu_mem_used_bytes",
    "gpu_tree_mem_bytes",
    "npu_mem_used_bytes",
    "npu_tree_mem_bytes",
    "alloc_allocated_bytes",
    "alloc_reserved_bytes",
)
"""Memory columns whose trend is judged (with any ``/device``)."""

TIME_MIN_SPAN_MIN = 1 / 3
"""A time trend needs at least 20 s of samples."""
REQ_MIN_SPAN_K = 0.05
"""A per-request trend needs at least 50 requests finished within the window."""
MIN_LEAK_BYTES = 64 * 1024 * 1024
"""Growth of at least this much over the window counts even when it is under 5% of the level."""

REQUEST_LATENCIES = ("ttft_seconds", "tpot_seconds", "e2e_seconds", "queue_seconds")
"""Fields of ``request`` events (``probes/output.py``) summarized as p50/p95."""
TOKEN_FIELDS = ("tokens", "output_tokens", "completion_tokens")


def _num(v: Any) -> float | None:
    """A finite float from a JSON value, or None (bools and strings are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _metric_stats(key: str, col: np.ndarray, units: Mapping[str, Any]) -> dict[str, Any]:
    vals = col[np.isfinite(col)]
    unit = units.get(key) if isinstance(units.get(key), str) else unit_of(key)
    if vals.size == 0:
        return {"unit": unit, "samples": 0, "min": None, "median": None, "p95": None, "max": None}
    pc = percentiles(vals, (50.0, 95.0))
    return {
        "unit": unit,
        "samples": int(vals.size),
        "min": float(vals.min()),
        "median": pc[50.0],
        "p95": pc[95.0],
        "max": float(vals.max()),
    }


def _memory_keys(columns: Mapping[str, np.ndarray]) -> list[str]:
    keys = ["tree_rss_bytes"]
    for k in columns:
        name, _ = split_key(k)
        if k != "tree_rss_bytes" and name in MEMORY_TREND_NAMES:
            keys.append(k)
    return keys


def _request_stats(reqs: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(reqs)}
    out["failed"] = sum(1 for d in reqs if d.get("error") not in (None, False, "") or d.get("ok") is False)
    tokens_total = 0.0
    per_req_tps: list[float] = []
    for d in reqs:
        tok = next((t for t in (_num(d.get(f)) for f in TOKEN_FIELDS) if t is not None), None)
        if tok is not None:
            tokens_total += tok
        tps = _num(d.get("tokens_per_second"))
        e2e = _num(d.get("e2e_seconds"))
        if tps is None and tok is not None and e2e is not None and e2e > 0:
            tps = tok / e2e
        if tps is not None:
            per_req_tps.append(tps)
    out["output_tokens"] = tokens_total
    for fld in REQUEST_LATENCIES:
        out[fld] = _p50_p95([_num(d.get(fld)) for d in reqs])
    out["tokens_per_second"] = _p50_p95(per_req_tps)
    out["seq_rep_4"] = _p50_p95([_num(d.get("seq_rep_4")) for d in reqs])
    out["rep_32"] = _p50_p95([_num(d.get("rep_32")) for d in reqs])
    loops = [bool(d["loop"]) for d in reqs if isinstance(d.get("loop"), bool)]
    out["loop_share"] = (sum(loops) / len(loops)) if loops else None
    return out


def _p50_p95(values: list[float | None] | list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    pc = percentiles(vals, (50.0, 95.0))
    return {"p50": pc[50.0], "p95": pc[95.0], "n": len(vals)}


def replay_mark(hdr: Mapping[str, Any]) -> dict[str, Any] | None:
    """For a trace written by ``tuner replay --out``: where its metrics stop being what its policy caused."""
    of = hdr.get("replay_of")
    if not of:
        return None
    at = _num(hdr.get("replay_diverged_at"))
    why = hdr.get("replay_diverged_why")
    policy = hdr.get("policy")
    head = f"a replay of {of} with policy {policy}: "
    if "replay_diverged_at" not in hdr:
        text = head + ("its metrics are the recording's (open loop); where its decisions first differ from the "
                       "recording's was not recorded (written before tuner marked it)")
    elif at is None:
        text = head + "its decisions are the recording's throughout, so its metrics are what this policy caused"
    else:
        text = (head + f"metrics after t={at:.2f} s are the recording's, not what this policy would have caused "
                f"(first difference: {why})")
    return {"of": str(of), "policy": policy, "diverged_at": at, "diverged_why": why, "text": text}


def summarize(data: TraceData) -> dict[str, Any]:
    """The summary of a trace (see the module docstring for the keys).  Never raises on odd content."""
    hdr = data.header
    warnings: list[str] = list(data.warnings)
    times = np.asarray(data.times, dtype=np.float64)
    ok_t = np.isfinite(times)
    units_raw = hdr.get("units")
    units: Mapping[str, Any] = units_raw if isinstance(units_raw, dict) else {}
    cmd = hdr.get("command")
    command = [str(c) for c in cmd] if isinstance(cmd, list) else None
    end = data.end if isinstance(data.end, dict) else None
    exit_code = end.get("exit_code") if end else None
    exit_code = exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None
    end_t = _num(end.get("t")) if end else None
    duration = max(float(np.max(times[ok_t], initial=0.0)), end_t or 0.0)

    metrics = {k: _metric_stats(k, np.asarray(col, dtype=np.float64), units) for k, col in data.columns.items()}
    rss = data.column("tree_rss_bytes")
    rss_ok = rss[np.isfinite(rss)]
    peak_rss = float(rss_ok.max()) if rss_ok.size else None

    requests = [e for e in data.events if e.kind == "request"]
    req_data = [e.data if isinstance(e.data, Mapping) else {} for e in requests]

    per_minute: dict[str, Any] = {}
    per_kreq: dict[str, Any] = {}
    minutes = times / 60.0
    req_t = np.sort(np.array([e.t for e in requests], dtype=np.float64))
    req_t = req_t[np.isfinite(req_t)]
    done = np.searchsorted(req_t, times, side="right") / 1000.0 if requests else None
    for key in _memory_keys(data.columns):
        col = data.column(key)
        if not np.isfinite(col).any():
            per_minute[key] = {
                "verdict": "not recorded",
                "slope": None,
                "p_value": None,
                "n": 0,
                "unit": f"{unit_of(key)}/min",
                "reason": "no samples of this metric in the trace",
            }
            continue
        if key.startswith("tree_"):
            # A tree with no live process (after exit; a zombie not yet reaped) reads 0: nothing to judge.
            col = np.where(col > 0, col, np.nan)
        per_minute[key] = leak_verdict(
            minutes, col, min_span=TIME_MIN_SPAN_MIN, min_abs_growth=MIN_LEAK_BYTES, unit=f"{unit_of(key)}/min"
        ).as_dict()
        if done is not None:
            per_kreq[key] = leak_verdict(
                done, col, min_span=REQ_MIN_SPAN_K, min_abs_growth=MIN_LEAK_BYTES, unit=f"{unit_of(key)}/1k requests"
            ).as_dict()
    for key in per_minute:
        rates = [
            _rate(v["slope"], v["unit"])
            for v in (per_minute.get(key), per_kreq.get(key))
            if v and v["verdict"] == "leak"
        ]
        if rates:
            warnings.append(f"{key}: possible leak, the memory floor keeps rising ({', '.join(rates)})")

    by_outcome = Counter(str(a.get("outcome")) for a in data.actions if isinstance(a, Mapping))
    for note in data.notes:
        if isinstance(note, Mapping) and note.get("level") in ("warn", "warning", "error"):
            warnings.append(f"at {_num(note.get('t')) or 0.0:.1f} s: {note.get('msg')}")
    if end is None:
        warnings.append("the trace has no end record: the recording was cut short or is still going")
    n_ticks = len(times)
    if data.skipped and n_ticks and data.skipped > 0.05 * (n_ticks + data.skipped):
        warnings.append(f"{data.skipped} ticks were skipped (the sampler fell behind): lower the rate with --interval")
    interval = _num(hdr.get("interval_s"))
    host = hdr.get("host")

    peak_mem: dict[str, float] = {}
    for key in per_minute:
        col = data.column(key)
        ok = col[np.isfinite(col)]
        if ok.size:
            peak_mem[key] = float(ok.max())

    return {
        "trace": str(data.path),
        "command": command,
        "host": host if isinstance(host, str) else None,
        "started_unix": _num(hdr.get("started_unix")),
        "duration_s": duration,
        "ticks": n_ticks,
        "skipped_ticks": int(data.skipped),
        "interval_s": interval,
        "ended": end is not None,
        "exit_code": exit_code,
        "metrics": metrics,
        "peak_rss_bytes": peak_rss,
        "peak_memory_bytes": peak_mem,
        "memory_trend": {"per_minute": per_minute, "per_1k_requests": per_kreq},
        "requests": _request_stats(req_data) if requests else None,
        "memory_limit": _memory_limit(data, times),
        "time_to_limit": _time_to_limit(data, times),
        "energy": _energy(data, req_data, times),
        "consistency": quality_report.summarize(hdr, data.events, data.actions),
        "gpu_tree_memory": _gpu_tree_memory(data),
        "oom_kill": _oom_kill(data, end, exit_code),
        "actions": sum(by_outcome.values()),
        "actions_by_outcome": dict(by_outcome),
        "action_log": _action_log(data.actions),
        "replay": replay_mark(hdr),
        "warnings": warnings,
    }


def _energy(data: TraceData, reqs: list[Mapping[str, Any]], times: np.ndarray) -> dict[str, Any] | None:
    """The run's GPU (and CPU package) energy and energy per generated token (``tuner.core.energy``)."""
    from tuner.core.energy import over_run, request_tokens

    if not any(k.startswith(("gpu_energy_joules_total/", "cpu_package_energy_joules_total/")) for k in data.columns):
        return None
    tokens = [t for t in (request_tokens(d) for d in reqs) if t is not None]
    return over_run(data.columns, times, tokens)


def _gpu_tree_memory(data: TraceData) -> dict[str, Any] | None:
    """When the tree's GPU memory could not be attributed (never a number in the trace): why, and what the
    client itself reported (``alloc_*``: its allocator's figures, not the CUDA context) in its place."""
    keys = [k for k in data.columns if k.startswith("gpu_tree_mem_bytes/")]
    if not keys or any(np.isfinite(data.column(k)).any() for k in keys):
        return None
    probes = data.header.get("probes")
    gpu = probes.get("nvidia") if isinstance(probes, dict) else None
    detail = gpu.get("detail") if isinstance(gpu, dict) else None
    reason = detail.get("attribution") if isinstance(detail, dict) else None
    if not isinstance(reason, str):
        reason = next((str(n.get("msg")) for n in data.notes if isinstance(n, Mapping)
                       and "gpu_tree_mem_bytes" in str(n.get("msg"))), None)  # fmt: skip
    out: dict[str, Any] = {"reason": reason}
    for key in ("alloc_reserved_bytes", "alloc_allocated_bytes"):
        name = key.replace("alloc_", "client_")
        col = data.column(key)
        ok = col[np.isfinite(col)]
        out[name] = float(ok.max()) if ok.size else None
    return out


def _cgroup_detail(hdr: Mapping[str, Any]) -> dict[str, Any]:
    probes = hdr.get("probes")
    cg = probes.get("cgroup") if isinstance(probes, dict) else None
    detail = cg.get("detail") if isinstance(cg, dict) else None
    return detail if isinstance(detail, dict) else {}


def _labels(hdr: Mapping[str, Any]) -> dict[str, str]:
    mem = _cgroup_detail(hdr).get("memory")
    return {"cgroup": mem["path"]} if isinstance(mem, dict) and isinstance(mem.get("path"), str) else {}


def _memory_limit(data: TraceData, times: np.ndarray) -> dict[str, Any] | None:
    """The binding memory limit at the end and where the run came closest to it."""
    pts = limits.over_time(data.columns, len(times), _labels(data.header))
    if not pts:
        return None
    _, last = pts[-1]
    i_min, closest = min(pts, key=lambda p: p[1].headroom)
    return {
        "name": last.name,
        "limit": last.describe(),
        "headroom": last.headroom,
        "closest": {"t": float(times[i_min]), "headroom": closest.headroom, "limit": closest.describe()},
    }


def _time_to_limit(data: TraceData, times: np.ndarray) -> dict[str, Any] | None:
    """When the agent first projected the binding limit within its horizon, and when it first acted on it."""
    horizon = _num(data.header.get("limit_horizon_s"))
    ttl = data.column("mem_time_to_limit_seconds")
    if horizon is None or not ttl.size:
        return None
    under = np.flatnonzero(np.isfinite(ttl) & (ttl < horizon))
    if not under.size:
        return None
    i = int(under[0])
    out: dict[str, Any] = {"horizon_s": horizon, "first_t": float(times[i]), "seconds": float(ttl[i]),
                           "action_t": None, "action": None, "to_action_s": None}  # fmt: skip
    for a in data.actions:
        ev = a.get("evidence") if isinstance(a, Mapping) else None
        if isinstance(ev, Mapping) and _num(ev.get("time_to_limit_s")) is not None and a.get("outcome") != "rejected":
            t = _num(a.get("t")) or 0.0
            out.update(action_t=t, action=f"{a.get('policy')}: {a.get('knob')}", to_action_s=t - out["first_t"])
            break
    return out


def _oom_kill(data: TraceData, end: Mapping[str, Any] | None, exit_code: int | None) -> dict[str, Any] | None:
    """The ``oom_kill`` event, or — when the recording was cut short (the sidecar shared the cgroup and died
    too) or the command ended by SIGKILL — a rise of the cgroup's OOM-kill counter since the last tick."""
    for e in reversed(data.events):
        if e.kind == "oom_kill" and isinstance(e.data, Mapping):
            return {"t": e.t, **dict(e.data)}
    if end is not None and exit_code != 137:
        return None
    from tuner.probes.cgroup import controller_from, read_oom_state

    ctl = controller_from(_cgroup_detail(data.header))
    col = data.column("cgroup_oom_kills_total")
    ok = col[np.isfinite(col)]
    if ctl is None or not ok.size:
        return None
    st = read_oom_state(ctl)
    if st.kills is None or st.kills <= ok[-1]:
        return None
    return {
        "inferred": True,
        "kills_recorded": int(ok[-1]),
        "kills_now": st.kills,
        "message": f"the OOM-kill counter of cgroup {ctl.path} rose from {int(ok[-1])} to {st.kills} after the "
        "last recorded tick: the kernel OOM killer most likely ended this run (and the recording with it)",
    }


ACTION_LOG_MAX = 200


def _action_log(actions: Any) -> list[dict[str, Any]]:
    """Each action as the user reads it (the last ``ACTION_LOG_MAX``); evidence stays in the trace."""
    out: list[dict[str, Any]] = []
    for a in list(actions)[-ACTION_LOG_MAX:]:
        if not isinstance(a, Mapping):
            continue
        out.append({k: a.get(k) for k in ("t", "policy", "knob", "previous", "value", "outcome", "reason")})
    return out


def _fmt_knob(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------------------------------------------
# Text


def human_bytes(v: float) -> str:
    sign = "-" if v < 0 else ""
    a = abs(v)
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if a >= div:
            return f"{sign}{a / div:.3g} {unit}" if a / div < 1000 else f"{sign}{a / div:.0f} {unit}"
    return f"{sign}{a:.0f} B"


def human_seconds(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{v * 1e6:.3g} us"
    if a < 1:
        return f"{v * 1e3:.3g} ms"
    if a < 120:
        return f"{v:.3g} s"
    m, s = divmod(a, 60)
    h, m = divmod(m, 60)
    return f"{int(h)}h{int(m):02d}m" if h else f"{int(m)}m{int(s):02d}s"


def human_value(v: float | None, unit: str) -> str:
    """A value in its unit as people read it: MiB/GiB, ms, %, °C, W, MHz."""
    if v is None or not math.isfinite(v):
        return "-"
    if unit == "bytes":
        return human_bytes(v)
    if unit == "seconds":
        return human_seconds(v)
    if unit == "ratio":
        return f"{v * 100:.3g}%"
    if unit == "celsius":
        return f"{v:.0f} °C"
    if unit == "watts":
        return f"{v:.3g} W"
    if unit == "hertz":
        return f"{v / 1e9:.3g} GHz" if abs(v) >= 1e9 else f"{v / 1e6:.3g} MHz"
    if unit == "per_second":
        return f"{v:.3g}/s"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v)}"
    return f"{v:.4g}"


def _rate(slope: float | None, unit: str) -> str:
    if slope is None:
        return "-"
    base, _, per = unit.partition("/")
    sign = "+" if slope >= 0 else ""
    return f"{sign}{human_value(slope, base)}/{per}" if per else f"{sign}{slope:.3g}"


def _energy_lines(e: Mapping[str, Any] | None, gm: Mapping[str, Any] | None) -> list[str]:
    out = []
    if e:
        parts = []
        if e.get("gpu_joules") is not None:
            devs = ", ".join(f"GPU {d}" for d in e.get("devices") or [])
            watts = f" ({e['gpu_mean_watts']:.0f} W mean)" if e.get("gpu_mean_watts") is not None else ""
            parts.append(f"{devs} {e['gpu_joules']:,.0f} J{watts}")
        if e.get("cpu_package_joules") is not None:
            parts.append(f"CPU packages {e['cpu_package_joules']:,.0f} J")
        tokens = e.get("tokens") or 0
        if e.get("joules_per_token") is not None:
            per = f"{e['joules_per_token']:.3g} J per generated token ({tokens:,.0f} tokens)"
        else:
            per = f"per token n/a: {e.get('reason')}"
        out.append(f"energy    {'; '.join(parts) or 'no GPU the inference uses has an energy counter'}; {per}")
    if gm:
        client = gm.get("client_reserved_bytes")
        seen = (f"; the client reports {human_bytes(client)} reserved by its allocator (not the CUDA context)"
                if client is not None else "")  # fmt: skip
        why = gm.get("reason") or "not attributed"
        out.append(f"GPU mem   the tree's per-process GPU memory is unknown: {why}{seen}")
    return out


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def _metric_rows(metrics: Mapping[str, Mapping[str, Any]], columns_pool: int = 4) -> list[list[str]]:
    """Rows of the metric table; a name with more than ``columns_pool`` devices (per-core CPU) is one
    row ``name/*`` spanning the devices' min, the largest median/p95 and the max."""
    groups: dict[str, list[str]] = {}
    for k in metrics:
        name, dev = split_key(k)
        groups.setdefault(name if dev is not None else k, []).append(k)
    rows = []
    for name, keys in groups.items():
        if len(keys) > columns_pool:
            ms = [metrics[k] for k in keys if metrics[k]["samples"]]
            unit = metrics[keys[0]]["unit"]
            if not ms:
                rows.append([f"{name}/* ({len(keys)})", "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    f"{name}/* ({len(keys)})",
                    human_value(min(m["min"] for m in ms), unit),
                    human_value(max(m["median"] for m in ms), unit),
                    human_value(max(m["p95"] for m in ms), unit),
                    human_value(max(m["max"] for m in ms), unit),
                ]
            )
            continue
        for k in keys:
            m = metrics[k]
            if not m["samples"]:
                rows.append([k, "not recorded", "", "", ""])
                continue
            rows.append([k, *(human_value(m[f], m["unit"]) for f in ("min", "median", "p95", "max"))])
    return rows


def render_text(summary: Mapping[str, Any]) -> str:
    """A compact human report of ``summarize()``'s result."""
    s = summary
    lines: list[str] = []
    cmd = " ".join(s.get("command") or []) or "(not recorded)"
    lines.append(f"trace     {s.get('trace')}")
    exit_code = s.get("exit_code")
    ended = "exit code " + str(exit_code) if exit_code is not None else ("ended" if s.get("ended") else "no end record")
    lines.append(f"command   {cmd}  ({ended})")
    rmark = s.get("replay")
    if rmark:
        lines.append(f"replay    {rmark['text']}")
    interval = s.get("interval_s")
    every = f" every {human_seconds(interval)}" if interval else ""
    skipped = f", {s['skipped_ticks']} skipped" if s.get("skipped_ticks") else ""
    lines.append(f"duration  {human_seconds(s.get('duration_s') or 0.0)}, {s.get('ticks', 0)} ticks{every}{skipped}")
    peak = s.get("peak_rss_bytes")
    lines.append(f"peak RSS  {human_bytes(peak) if peak is not None else 'not recorded'}")
    ml = s.get("memory_limit")
    if ml:
        c = ml["closest"]
        lines.append(f"memory    {ml['limit']} at the end ({ml['headroom']:.0%} free); closest "
                     f"{c['headroom']:.0%} free at {c['t']:.1f} s ({c['limit']})")  # fmt: skip
    ttl = s.get("time_to_limit")
    if ttl:
        acted = (f"; first action on it {ttl['to_action_s']:.1f} s later ({ttl['action']})"
                 if ttl.get("action") else "; no action on it")  # fmt: skip
        lines.append(f"          limit projected within the {ttl['horizon_s']:g} s horizon at {ttl['first_t']:.1f} s "
                     f"({ttl['seconds']:.0f} s left){acted}")  # fmt: skip
    oom = s.get("oom_kill")
    if oom:
        lines.append(f"OOM kill  {oom.get('message')}")
    lines += _energy_lines(s.get("energy"), s.get("gpu_tree_memory"))

    metrics = s.get("metrics") or {}
    lines.append("")
    if metrics:
        lines.append("metrics")
        lines += _table([["", "min", "median", "p95", "max"], *_metric_rows(metrics)])
    else:
        lines.append("metrics   not recorded (no ticks)")

    trend = s.get("memory_trend") or {}
    for title, key in (
        ("memory trend per minute", "per_minute"),
        ("memory trend per 1,000 requests", "per_1k_requests"),
    ):
        verdicts = trend.get(key) or {}
        if not verdicts:
            continue
        lines.append("")
        lines.append(title)
        rows = []
        for k, v in verdicts.items():
            p = v.get("p_value")
            rows.append(
                [
                    k,
                    _rate(v.get("slope"), v.get("unit", "")),
                    v.get("verdict", ""),
                    f"p={p:.2g}" if p is not None else "",
                ]
            )
        table = _table(rows)
        for row_text, v in zip(table, verdicts.values(), strict=True):
            lines.append(f"{row_text}  ({v.get('reason')})")

    lines.append("")
    req = s.get("requests")
    if not req:
        lines.append("requests  not recorded")
    else:
        failed = f", {req['failed']} failed" if req.get("failed") else ""
        lines.append(f"requests  {req['count']}{failed}")
        rows = [["", "p50", "p95"]]
        for field, label in (
            ("ttft_seconds", "time to first token"),
            ("tpot_seconds", "time per output token"),
            ("e2e_seconds", "end to end"),
            ("queue_seconds", "queue"),
        ):
            r = req.get(field) or {}
            if r.get("n"):
                rows.append([label, human_seconds(r["p50"]), human_seconds(r["p95"])])
        tps = req.get("tokens_per_second") or {}
        if tps.get("n"):
            rows.append(["tokens/s per request", f"{tps['p50']:.3g}", f"{tps['p95']:.3g}"])
        rep = req.get("seq_rep_4") or {}
        if rep.get("n"):
            rows.append(["repetition (seq-rep-4)", f"{rep['p50']:.3g}", f"{rep['p95']:.3g}"])
        if len(rows) > 1:
            lines += _table(rows)
        if req.get("loop_share") is not None:
            lines.append(f"  looping responses  {req['loop_share']:.1%}")
    lines += quality_report.render(s.get("consistency"))
    n_act = s.get("actions") or 0
    by = s.get("actions_by_outcome") or {}
    detail = " (" + ", ".join(f"{v} {k}" for k, v in sorted(by.items())) + ")" if by else ""
    lines.append(f"actions   {n_act}{detail}")
    log = s.get("action_log") or []
    shown = log if len(log) <= 20 else [*log[:10], None, *log[-10:]]
    for a in shown:
        if a is None:
            lines.append(f"  ... {len(log) - 20} more (tuner report --json lists the last {ACTION_LOG_MAX})")
            continue
        t = _num(a.get("t"))
        change = f"{a.get('knob')} {_fmt_knob(a.get('previous'))} -> {_fmt_knob(a.get('value'))}"
        lines.append(f"  {t or 0.0:8.1f} s  {a.get('policy')!s:<12} {change:<28} {a.get('outcome')!s:<9} "
                     f"{a.get('reason') or ''}")
    warns = s.get("warnings") or []
    if warns:
        lines.append("")
        lines.append("warnings")
        lines += [f"  - {w}" for w in warns]
    return "\n".join(lines)
