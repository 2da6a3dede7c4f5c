"""Self-contained HTML reports: ``tuner report TRACE --html OUT`` and ``tuner compare A B --html OUT``.

One file, no network: plots are matplotlib figures rendered to SVG and inlined (XML prologue and namespace
URIs stripped, which HTML does not need), styles are inline, there is no script.  Every figure exists in
every report; when the trace lacks what a figure needs, its place says what is missing and why.

Figures (``FIGURES``): memory (tree RSS, device and allocator memory, per-process RSS, with the fitted
Theil-Sen trend of the memory floor), utilization, latency (TTFT/TPOT), throughput, repetition (per
response with its inter-quartile band), knobs (step lines, actions marked and listed with reasons),
throughput vs batch size and repetition vs temperature (from the trace's own windows, see
``trace_windows``).  Each figure also yields a few numbers (``FigureResult.numbers``) that ``compare``
sets side by side with ratios B/A and a verdict.
"""

from __future__ import annotations

import contextvars
import html
import io
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuner.core.stats import ENVELOPE_BINS, MIN_BINS, lower_envelope, theil_sen
from tuner.outputs.report import human_bytes, human_value
from tuner.records import split_key
from tuner.trace import TraceData

MAX_LINE_POINTS = 1500
"""A plotted line keeps at most this many buckets (min and max of each), so an hour at 10 Hz stays light."""
MAX_SCATTER_POINTS = 3000
WINDOW_S = 10.0
"""Length of the windows the batch/temperature figures are built from."""
MAX_ACTION_LABELS = 30
"""Above this many actions the knob plot marks them without numbers (the table still lists each)."""
SAME_WITHIN = 0.05
"""Compare: a ratio within 5% of 1 is "about the same"."""

MEMORY_NAMES = (
    "tree_rss_bytes",
    "tree_uss_bytes",
    "gpu_mem_used_bytes",
    "gpu_tree_mem_bytes",
    "npu_mem_used_bytes",
    "npu_tree_mem_bytes",
    "alloc_allocated_bytes",
    "alloc_reserved_bytes",
)
UTIL_NAMES = ("tree_cpu_ratio", "sys_cpu_ratio", "gpu_util_ratio", "gpu_mem_util_ratio", "npu_util_ratio")
KNOB_NAMES = ("knob_batch_size", "knob_temperature", "knob_repetition_penalty", "knob_precision_bits")


@dataclass
class Number:
    """One figure's headline number: ``better`` is ``"lower"``, ``"higher"`` or ``None`` (just a fact)."""

    label: str
    value: float | None
    unit: str
    better: str | None = None


@dataclass
class FigureResult:
    id: str
    title: str
    svg: str | None
    missing: str | None = None
    numbers: list[Number] = field(default_factory=list)
    extra_html: str = ""


# -- small helpers ----------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_LINE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * max_points`` points keeping each bucket's min and max, so peaks survive."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = x.size
    if n <= 2 * max_points:
        return x, y
    edges = np.linspace(0, n, max_points + 1).astype(np.int64)
    starts = edges[:-1]
    lo_idx = starts
    mins = np.minimum.reduceat(y, starts)
    maxs = np.maximum.reduceat(y, starts)
    xs = x[lo_idx]
    xe = x[np.maximum(edges[1:] - 1, 0)]
    out_x = np.column_stack([xs, xe]).ravel()
    # rising bucket: min then max; falling: max then min (keeps the shape's direction)
    first_half = y[lo_idx] <= y[np.maximum(edges[1:] - 1, 0)]
    out_y = np.where(first_half[:, None], np.column_stack([mins, maxs]), np.column_stack([maxs, mins])).ravel()
    return out_x, out_y


def _subsample(n: int, limit: int = MAX_SCATTER_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def _byte_scale(vmax: float) -> tuple[float, str]:
    for div, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if vmax >= 2 * div:
            return float(div), name
    return 1.0, "B"


def _keys_named(data: TraceData, names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        for k in data.columns:
            if split_key(k)[0] == name and np.isfinite(data.columns[k]).any():
                out.append(k)
    return out


def _probe_reasons(data: TraceData, probes: Sequence[str]) -> str:
    table = data.header.get("probes")
    if not isinstance(table, dict):
        return ""
    why = []
    for name in probes:
        p = table.get(name)
        if isinstance(p, dict) and p.get("reason"):
            why.append(f"{name} probe: {p['reason']}")
    return f" ({'; '.join(why)})" if why else ""


def _request_field(reqs: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    return np.array([_num(d.get(name)) if _num(d.get(name)) is not None else np.nan for d in reqs], dtype=float)


def _request_data(data: TraceData) -> tuple[np.ndarray, list[Mapping[str, Any]]]:
    reqs = data.requests()
    t = np.array([e.t for e in reqs], dtype=float)
    return t, [e.data if isinstance(e.data, Mapping) else {} for e in reqs]


# -- matplotlib -------------------------------------------------------------------------------------

_SVG_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)
_SVG_NS = re.compile(r'\s+xmlns(:xlink)?="[^"]*"')
_SVG_SIZE = re.compile(r'<svg([^>]*?)\s+width="[^"]*"\s+height="[^"]*"')


def _new_figure(rows: int = 1, height: float = 2.6, sharex: bool = True) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    total = height * rows if rows > 1 else height
    fig = Figure(figsize=(8.0, total))
    # fixed margins (in inches, turned into fractions): constrained layout measured every text twice and
    # cost more than the drawing itself on long traces
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.12 / total, bottom=0.45 / total, hspace=0.12 * rows)
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0].tolist()
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8)
    return fig, axes


_DRAW: contextvars.ContextVar[bool] = contextvars.ContextVar("tuner_html_draw", default=True)
"""False while only the figures' numbers are wanted (``tuner compare`` without ``--html``): no SVG is rendered."""


def _svg(fig: Any, fig_id: str, titles: Mapping[str, str] | None = None) -> str:
    """The figure as inline SVG; ``titles`` maps an artist's gid to a hover text (an SVG ``<title>``)."""
    import matplotlib

    if not _DRAW.get():
        return ""  # present, not rendered
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": fig_id, "svg.fonttype": "path", "font.size": 8}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    s = _SVG_PROLOGUE.sub("", buf.getvalue(), count=1)
    s = _SVG_NS.sub("", s)
    s = _SVG_SIZE.sub(r'<svg\1 class="plot" role="img"', s, count=1)
    for gid, text in (titles or {}).items():
        s = s.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{html.escape(text)}</title>', 1)
    return f'<figure class="plot-wrap" data-figure="{fig_id}">{s}</figure>'


def _legend(ax: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper left", framealpha=0.8, ncols=min(2, len(handles)))


# -- figures ----------------------------------------------------------------------------------------


def fit_floor_trend(minutes: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Theil-Sen line through the lower envelope (the same floor the leak verdict judges)."""
    ok = np.isfinite(minutes) & np.isfinite(y)
    x, v = minutes[ok], y[ok]
    bins = min(ENVELOPE_BINS, x.size // 3)
    if bins < MIN_BINS or float(x.max() - x.min()) <= 0:
        return None
    ex, ey = lower_envelope(x, v, bins)
    slope, intercept = theil_sen(ex, ey)
    if not math.isfinite(slope):
        return None
    return slope, intercept


def fig_memory(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = "Memory"
    keys = _keys_named(data, MEMORY_NAMES)
    procs = _process_rss(data)
    if not keys and not procs:
        return FigureResult("memory", title, None, "no memory samples in this trace" + _probe_reasons(data, ["cpu"]))
    t = np.asarray(data.times, dtype=float)
    vmax = max([float(np.nanmax(data.columns[k])) for k in keys] + [float(np.nanmax(v)) for _, v in procs.values()])
    div, unit = _byte_scale(vmax)
    fig, (ax,) = _new_figure(height=3.0)
    trend = (summary.get("memory_trend") or {}).get("per_minute") or {}
    for k in keys:
        y = data.columns[k]
        line = ax.plot(*decimate(t, y / div), label=k, linewidth=1.0)[0]
        fit = fit_floor_trend(t / 60.0, y)
        if fit is not None:
            slope, icpt = fit
            xs = np.array([np.nanmin(t[np.isfinite(y)]), np.nanmax(t[np.isfinite(y)])])
            verdict = (trend.get(k) or {}).get("verdict", "")
            ax.plot(xs, (icpt + slope * xs / 60.0) / div, linestyle="--", color=line.get_color(), linewidth=1.2,
                    label=f"{k} floor trend {human_bytes(slope)}/min ({verdict})")  # fmt: skip
    for pid, (name, series) in procs.items():
        ax.plot(*decimate(series[0], series[1] / div), linewidth=0.7, alpha=0.6, label=f"pid {pid} {name} RSS")
    ax.set_ylabel(unit)
    ax.set_xlabel("seconds")
    _legend(ax)
    rss = trend.get("tree_rss_bytes") or {}
    kreq = ((summary.get("memory_trend") or {}).get("per_1k_requests") or {}).get("tree_rss_bytes") or {}
    return FigureResult(
        "memory",
        title,
        _svg(fig, "memory"),
        numbers=[
            Number("peak tree RSS", summary.get("peak_rss_bytes"), "bytes", "lower"),
            Number("RSS floor slope per minute", rss.get("slope"), "bytes", "lower"),
            Number("RSS floor slope per 1,000 requests", kreq.get("slope"), "bytes", "lower"),
            *(Number(f"peak {k}", v, "bytes", "lower") for k, v in (summary.get("peak_memory_bytes") or {}).items()
              if k != "tree_rss_bytes"),
        ],
    )  # fmt: skip


def _process_rss(data: TraceData, top: int = 5) -> dict[str, tuple[str, tuple[np.ndarray, np.ndarray]]]:
    series: dict[str, tuple[str, list[float], list[float]]] = {}
    for t, procs in data.procs:
        if not isinstance(procs, dict):
            continue
        for pid, fields in procs.items():
            v = _num(fields.get("rss_bytes")) if isinstance(fields, dict) else None
            if v is None:
                continue
            entry = series.setdefault(str(pid), (str(fields.get("name", "")), [], []))
            entry[1].append(t)
            entry[2].append(v)
    if len(series) <= 1:  # one process: the tree RSS line already shows it
        return {}
    ranked = sorted(series.items(), key=lambda kv: -max(kv[1][2]))[:top]
    return {pid: (name, (np.array(ts), np.array(vs))) for pid, (name, ts, vs) in ranked}


def fig_utilization(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    keys = _keys_named(data, UTIL_NAMES)
    if not keys:
        return FigureResult("utilization", "Utilization", None,
                            "no CPU/GPU/NPU utilization samples" + _probe_reasons(data, ["cpu", "nvidia"]))  # fmt: skip
    t = np.asarray(data.times, dtype=float)
    fig, (ax,) = _new_figure()
    for k in keys:
        name = split_key(k)[0]
        # conventions: a tree's CPU ratio counts cores (150% = one and a half), the others are 0..1 shares
        whole = {"tree_cpu_ratio": "one core", "sys_cpu_ratio": "the machine"}.get(name, "the device")
        label = f"{k} (% of {whole})"
        ax.plot(*decimate(t, data.columns[k] * 100.0), label=label, linewidth=0.9)
    ax.set_ylabel("%")
    ax.set_xlabel("seconds")
    _legend(ax)
    metrics = summary.get("metrics") or {}
    nums = [Number(f"median {k}", (metrics.get(k) or {}).get("median"), "ratio") for k in keys]
    return FigureResult("utilization", "Utilization", _svg(fig, "utilization"), numbers=nums)


def fig_latency(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = "Latency: time to first token and per output token"
    rt, reqs = _request_data(data)
    ttft, tpot = _request_field(reqs, "ttft_seconds"), _request_field(reqs, "tpot_seconds")
    cols = [k for k in ("req_ttft_p50_seconds", "req_ttft_p95_seconds", "req_tpot_p50_seconds") if k in data.columns
            and np.isfinite(data.columns[k]).any()]  # fmt: skip
    if not np.isfinite(ttft).any() and not np.isfinite(tpot).any() and not cols:
        return FigureResult("latency", title, None, "no requests with latencies in this trace (no tuner.client "
                            "reports: instrument the inference loop or use tuner proxy)")  # fmt: skip
    fig, (ax,) = _new_figure()
    idx = _subsample(rt.size)
    for arr, label in ((ttft, "TTFT per request"), (tpot, "TPOT per request")):
        if np.isfinite(arr).any():
            ax.scatter(rt[idx], arr[idx] * 1e3, s=4, alpha=0.5, label=label, linewidths=0)
    t = np.asarray(data.times, dtype=float)
    for k in cols:
        ax.plot(*decimate(t, data.columns[k] * 1e3), linewidth=1.0, label=k)
    ax.set_ylabel("ms")
    ax.set_xlabel("seconds")
    shown = np.concatenate([ttft, tpot, *(data.columns[k] for k in cols)])
    shown = shown[np.isfinite(shown)]
    if shown.size and shown.min() > 0:  # TTFT and TPOT differ by orders of magnitude
        ax.set_yscale("log")
    _legend(ax)
    req = summary.get("requests") or {}
    return FigureResult("latency", title, _svg(fig, "latency"), numbers=[
        Number("TTFT p50", (req.get("ttft_seconds") or {}).get("p50"), "seconds", "lower"),
        Number("TTFT p95", (req.get("ttft_seconds") or {}).get("p95"), "seconds", "lower"),
        Number("TPOT p50", (req.get("tpot_seconds") or {}).get("p50"), "seconds", "lower"),
        Number("TPOT p95", (req.get("tpot_seconds") or {}).get("p95"), "seconds", "lower"),
    ])  # fmt: skip


def overall_tokens_per_second(data: TraceData) -> float | None:
    """Generated tokens over the span from the first request's start to the last request's end."""
    rt, reqs = _request_data(data)
    tok = _request_field(reqs, "tokens")
    e2e = np.nan_to_num(_request_field(reqs, "e2e_seconds"))
    if rt.size == 0 or not np.isfinite(tok).any():
        return None
    span = float(rt.max() - (rt - e2e).min())
    return float(np.nansum(tok) / span) if span > 0 else None


def fig_throughput(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = "Throughput"
    t = np.asarray(data.times, dtype=float)
    has_col = "req_tokens_per_second" in data.columns and np.isfinite(data.columns["req_tokens_per_second"]).any()
    w = trace_windows(data)
    if not has_col and not w["n_requests"].any():
        return FigureResult("throughput", title, None, "no requests in this trace, so no tokens/s")
    fig, (ax,) = _new_figure()
    if has_col:
        ax.plot(*decimate(t, data.columns["req_tokens_per_second"]), linewidth=1.0, label="req_tokens_per_second")
    has = w["n_requests"] > 0
    if has.any():
        ax.step(w["start"][has], w["tokens_per_second"][has], where="post", linewidth=1.0,
                label=f"tokens/s per {WINDOW_S:g} s window")  # fmt: skip
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("seconds")
    _legend(ax)
    return FigureResult("throughput", title, _svg(fig, "throughput"), numbers=[
        Number("tokens/s overall", overall_tokens_per_second(data), "per_second", "higher"),
        Number("requests", float(len(data.requests())), "count"),
    ])  # fmt: skip


def fig_repetition(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = "Repetition"
    rt, reqs = _request_data(data)
    rep = _request_field(reqs, "seq_rep_4")
    col = "req_seq_rep_4_ratio"
    has_col = col in data.columns and np.isfinite(data.columns[col]).any()
    if not np.isfinite(rep).any() and not has_col:
        return FigureResult("repetition", title, None, "no repetition measures: the trace has no requests with "
                            "token ids (seq_rep_4)")  # fmt: skip
    fig, (ax,) = _new_figure()
    ok = np.isfinite(rep)
    if ok.any():
        x, y = rt[ok], rep[ok]
        idx = _subsample(x.size)
        ax.scatter(x[idx], y[idx], s=4, alpha=0.4, linewidths=0, label="seq-rep-4 per response")
        w = trace_windows(data)
        has = np.isfinite(w["rep_p25"])
        if has.any():
            mid = w["start"][has] + WINDOW_S / 2
            ax.fill_between(mid, w["rep_p25"][has], w["rep_p75"][has], alpha=0.25, label="inter-quartile band")
            ax.plot(mid, w["rep_median"][has], linewidth=1.0, label="median per window")
    if has_col:
        ax.plot(*decimate(np.asarray(data.times, dtype=float), data.columns[col]), linewidth=0.8, label=col)
    ax.set_ylabel("share of repeated 4-grams")
    ax.set_xlabel("seconds")
    _legend(ax)
    req = summary.get("requests") or {}
    return FigureResult("repetition", title, _svg(fig, "repetition"), numbers=[
        Number("seq-rep-4 median", (req.get("seq_rep_4") or {}).get("p50"), "ratio", "lower"),
        Number("looping responses", req.get("loop_share"), "ratio", "lower"),
    ])  # fmt: skip


def fig_knobs(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = "Knobs and actions"
    keys = [k for k in KNOB_NAMES if k in data.columns and np.isfinite(data.columns[k]).any()]
    acts = [a for a in data.actions if isinstance(a, Mapping)]
    table = _action_table(acts)
    if not keys and not acts:
        return FigureResult("knobs", title, None, "no knob values and no actions: no policy ran (tuner run "
                            "--policy P)", extra_html=table)  # fmt: skip
    t = np.asarray(data.times, dtype=float)
    rows = keys or ["actions"]
    fig, axes = _new_figure(rows=len(rows), height=1.6)
    by_knob = {k: i for i, k in enumerate(rows)}
    for k, ax in zip(rows, axes, strict=True):
        if k in data.columns:
            y = data.columns[k]
            ok = np.isfinite(y)
            ax.step(t[ok], y[ok], where="post", linewidth=1.2)
        ax.set_ylabel(k.removeprefix("knob_"), fontsize=7)
    marks: dict[tuple[int, str], list[float]] = {}
    for a in acts:
        row = _knob_row(by_knob, a)
        color = "tab:red" if a.get("outcome") in ("rejected", "failed") else "tab:green"
        marks.setdefault((row, color), []).append(_num(a.get("t")) or 0.0)
    for (row, color), ts in marks.items():  # one artist per knob and colour, however many actions
        axes[row].vlines(ts, 0, 1, transform=axes[row].get_xaxis_transform(), colors=color, linestyles=":",
                         linewidth=0.9)  # fmt: skip
    titles: dict[str, str] = {}
    if len(acts) <= MAX_ACTION_LABELS:  # numbers matching the action table (reason on hover), while readable
        prefix = f"act{zlib.crc32(str(data.path).encode()):08x}-"
        for n, a in enumerate(acts, start=1):
            ax = axes[_knob_row(by_knob, a)]
            ann = ax.annotate(str(n), (_num(a.get("t")) or 0.0, 1.0), xycoords=("data", "axes fraction"),
                              fontsize=7, ha="left", va="top")  # fmt: skip
            ann.set_gid(prefix + str(n))
            titles[prefix + str(n)] = (f"#{n} {a.get('policy')}: {a.get('knob')} {a.get('previous')} -> "
                                       f"{a.get('value')} ({a.get('outcome')}): {a.get('reason')}")  # fmt: skip
    axes[-1].set_xlabel("seconds")
    return FigureResult("knobs", title, _svg(fig, "knobs", titles), extra_html=table,
                        numbers=[Number("actions", float(len(acts)), "count")])  # fmt: skip


def _knob_row(by_knob: Mapping[str, int], action: Mapping[str, Any]) -> int:
    """The subplot of the knob an action moved (``precision`` is plotted as ``knob_precision_bits``); commands
    such as ``cleanup`` go on the first."""
    knob = str(action.get("knob"))
    return by_knob.get(f"knob_{knob}", by_knob.get(f"knob_{knob}_bits", 0))


def _action_table(acts: Sequence[Mapping[str, Any]]) -> str:
    if not acts:
        return '<p class="missing">no actions recorded</p>'
    rows = []
    for n, a in enumerate(acts, start=1):
        cells = [str(n), f"{_num(a.get('t')) or 0.0:.1f} s", a.get("policy"), a.get("knob"),
                 f"{a.get('previous')} → {a.get('value')}", a.get("outcome"), a.get("reason")]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("#", "time", "policy", "knob", "change", "outcome", "reason"))
    return f'<table class="actions"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_windows_cache: list[tuple[TraceData, float, dict[str, np.ndarray]]] = []


def trace_windows(data: TraceData, window_s: float = WINDOW_S) -> dict[str, np.ndarray]:
    """See ``compute_windows``; the last result is kept, since four figures ask for the same trace's windows."""
    for d, w, res in _windows_cache:
        if d is data and w == window_s:
            return res
    res = compute_windows(data, window_s)
    _windows_cache[:] = [(data, window_s, res)]
    return res


def compute_windows(data: TraceData, window_s: float = WINDOW_S) -> dict[str, np.ndarray]:
    """Cut the trace into ``window_s`` windows; per window: requests finished in it, tokens/s (their tokens
    / the window), repetition (mean and quartiles of seq_rep_4), and the batch size and temperature in
    force — NaN where the setting changed within the window (mixed windows are left out of the
    setting-vs-outcome figures).  The setting comes from the knob column when recorded, else from the
    requests' own ``batch_size``/``temperature``."""
    duration = max(data.duration, float(max((e.t for e in data.requests()), default=0.0)))
    n = max(1, math.ceil(duration / window_s)) if duration > 0 else 1
    start = np.arange(n) * window_s
    rt, reqs = _request_data(data)
    which = np.clip((rt // window_s).astype(np.int64), 0, n - 1) if rt.size else np.zeros(0, np.int64)
    tok = np.nan_to_num(_request_field(reqs, "tokens"))
    rep = _request_field(reqs, "seq_rep_4")
    n_req = np.bincount(which, minlength=n)
    tps = np.bincount(which, weights=tok, minlength=n) / window_s
    out: dict[str, np.ndarray] = {"start": start, "n_requests": n_req, "tokens_per_second": tps}
    for name in ("rep_median", "rep_p25", "rep_p75", "rep_mean"):
        out[name] = np.full(n, np.nan)
    for i in np.unique(which):
        r = rep[which == i]
        r = r[np.isfinite(r)]
        if r.size:
            out["rep_mean"][i] = r.mean()
            out["rep_median"][i], out["rep_p25"][i], out["rep_p75"][i] = np.percentile(r, [50, 25, 75])
    t = np.asarray(data.times, dtype=float)
    tw = np.clip((t // window_s).astype(np.int64), 0, n - 1) if t.size else np.zeros(0, np.int64)
    for knob, fld in (("knob_batch_size", "batch_size"), ("knob_temperature", "temperature")):
        vals = np.full(n, np.nan)
        if knob in data.columns and np.isfinite(data.columns[knob]).any():
            src_w, src_v = tw, data.columns[knob]
        else:
            src_w, src_v = which, _request_field(reqs, fld)
        ok = np.isfinite(src_v)
        src_w, src_v = src_w[ok], src_v[ok]
        if src_v.size:
            lo = np.full(n, np.inf)
            hi = np.full(n, -np.inf)
            np.minimum.at(lo, src_w, src_v)
            np.maximum.at(hi, src_w, src_v)
            steady = np.isfinite(lo) & (lo == hi)
            vals[steady] = lo[steady]
        out[fld] = vals
    return out


def _group_medians(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = np.unique(x)
    return xs, np.array([np.median(y[x == v]) for v in xs])


def fig_throughput_vs_batch(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = f"Throughput vs batch size ({WINDOW_S:g} s windows)"
    w = trace_windows(data)
    ok = np.isfinite(w["batch_size"]) & (w["n_requests"] > 0)
    if not ok.any():
        why = "no requests" if not w["n_requests"].any() else "no batch size recorded (knob_batch_size or the " \
              "requests' batch_size)"  # fmt: skip
        return FigureResult("throughput_vs_batch", title, None, f"{why}, so no throughput per batch size")
    x, y = w["batch_size"][ok], w["tokens_per_second"][ok]
    fig, (ax,) = _new_figure()
    ax.scatter(x, y, s=10, alpha=0.5, linewidths=0, label="window")
    gx, gy = _group_medians(x, y)
    ax.plot(gx, gy, marker="o", linewidth=1.2, label="median per batch size")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    _legend(ax)
    best = int(np.argmax(gy))
    return FigureResult("throughput_vs_batch", title, _svg(fig, "throughput_vs_batch"), numbers=[
        Number("best median tokens/s", float(gy[best]), "per_second", "higher"),
        Number("at batch size", float(gx[best]), "count"),
        Number("windows", float(ok.sum()), "count"),
    ])  # fmt: skip


def fig_repetition_vs_temperature(data: TraceData, summary: Mapping[str, Any]) -> FigureResult:
    title = f"Repetition vs temperature ({WINDOW_S:g} s windows)"
    w = trace_windows(data)
    ok = np.isfinite(w["temperature"]) & np.isfinite(w["rep_mean"])
    if not ok.any():
        if not np.isfinite(w["rep_mean"]).any():
            why = "no repetition measures (no requests with token ids)"
        else:
            why = "no temperature recorded (knob_temperature or the requests' temperature)"
        return FigureResult("repetition_vs_temperature", title, None, why)
    x, y = w["temperature"][ok], w["rep_mean"][ok]
    fig, (ax,) = _new_figure()
    ax.scatter(x, y, s=10, alpha=0.5, linewidths=0, label="window (mean seq-rep-4)")
    gx, gy = _group_medians(x, y)
    ax.plot(gx, gy, marker="o", linewidth=1.2, label="median per temperature")
    ax.set_xlabel("temperature")
    ax.set_ylabel("seq-rep-4")
    _legend(ax)
    return FigureResult("repetition_vs_temperature", title, _svg(fig, "repetition_vs_temperature"), numbers=[
        Number("median seq-rep-4 over windows", float(np.median(y)), "ratio", "lower"),
        Number("temperatures seen", float(gx.size), "count"),
    ])  # fmt: skip


FIGURES: tuple[Callable[[TraceData, Mapping[str, Any]], FigureResult], ...] = (
    fig_memory,
    fig_utilization,
    fig_latency,
    fig_throughput,
    fig_repetition,
    fig_knobs,
    fig_throughput_vs_batch,
    fig_repetition_vs_temperature,
)


def build_figures(data: TraceData, summary: Mapping[str, Any], *, draw: bool = True) -> list[FigureResult]:
    """Every figure, in order; a figure that fails to draw becomes a "missing" with the error, never a crash.
    ``draw=False``: numbers and missing reasons only (``svg`` is ``""`` for a figure that exists)."""
    token = _DRAW.set(draw)
    try:
        return _build_figures(data, summary)
    finally:
        _DRAW.reset(token)


def _build_figures(data: TraceData, summary: Mapping[str, Any]) -> list[FigureResult]:
    out = []
    for fn in FIGURES:
        try:
            out.append(fn(data, summary))
        except Exception as exc:  # one odd trace must not cost the whole report
            fid = fn.__name__.removeprefix("fig_")
            out.append(FigureResult(fid, fid.replace("_", " ").capitalize(), None,
                                    f"could not draw this figure: {type(exc).__name__}: {exc}"))  # fmt: skip
    return out


# -- summary card -------------------------------------------------------------------------------------


def card_items(summary: Mapping[str, Any], data: TraceData) -> list[tuple[str, str, float | None, str]]:
    """``(key, label, value, shown)`` for the summary card; ``value`` is the raw number (None = missing)."""
    req = summary.get("requests") or {}
    items: list[tuple[str, str, float | None, str]] = []

    def add(key: str, label: str, value: Any, unit: str, missing: str = "not recorded") -> None:
        v = _num(value)
        items.append((key, label, v, human_value(v, unit) if v is not None else missing))

    add("duration_seconds", "duration", summary.get("duration_s"), "seconds")
    add("requests", "requests", req.get("count") if req else None, "count", "no requests")
    add("ttft_p50_seconds", "TTFT p50", (req.get("ttft_seconds") or {}).get("p50"), "seconds")
    add("ttft_p95_seconds", "TTFT p95", (req.get("ttft_seconds") or {}).get("p95"), "seconds")
    add("tpot_p50_seconds", "TPOT p50", (req.get("tpot_seconds") or {}).get("p50"), "seconds")
    add("tpot_p95_seconds", "TPOT p95", (req.get("tpot_seconds") or {}).get("p95"), "seconds")
    add("tokens_per_second", "tokens/s overall", overall_tokens_per_second(data), "per_second")
    add("peak_rss_bytes", "peak tree RSS", summary.get("peak_rss_bytes"), "bytes")
    ml = summary.get("memory_limit")
    if ml:  # the limit that can kill the process (a cgroup's, the host's, a device's) and how close it came
        items.append(("memory_limit", "binding memory limit", _num(ml.get("headroom")),
                      f"{ml.get('limit')} ({ml.get('headroom', 0):.0%} free at the end, "
                      f"{(ml.get('closest') or {}).get('headroom', 0):.0%} at the closest)"))  # fmt: skip
    ttl = summary.get("time_to_limit")
    if ttl:
        acted = f", acted {ttl['to_action_s']:.1f} s later" if ttl.get("to_action_s") is not None else ", no action"
        items.append(("time_to_limit", "limit projected", _num(ttl.get("seconds")),
                      f"at {ttl['first_t']:.0f} s, {ttl['seconds']:.0f} s ahead{acted}"))  # fmt: skip
    oom = summary.get("oom_kill")
    if oom:
        items.append(("oom_kill", "OOM kill", None, str(oom.get("message") or "by the kernel OOM killer")))
    for k, v in (summary.get("peak_memory_bytes") or {}).items():
        if k != "tree_rss_bytes":
            add(f"peak:{k}", f"peak {k}", v, "bytes")
    trend = summary.get("memory_trend") or {}
    for per, suffix in (("per_minute", "/min"), ("per_1k_requests", "/1k requests")):
        v = (trend.get(per) or {}).get("tree_rss_bytes")
        if v:
            slope = _num(v.get("slope"))
            shown = v.get("verdict", "")
            if slope is not None:
                shown += f" ({'+' if slope >= 0 else ''}{human_bytes(slope)}{suffix})"
            items.append((f"leak_{per}", f"leak verdict {suffix.lstrip('/')}", slope, shown))
    add("seq_rep_4_median", "repetition median", (req.get("seq_rep_4") or {}).get("p50"), "value")
    add("loop_share", "looping responses", req.get("loop_share") if req else None, "ratio")
    return items


# -- HTML -------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:16px 24px;
color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6576;margin-bottom:12px}
.card{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:8px;background:#fff;
border:1px solid #dde1e7;border-radius:8px;padding:12px}
.item .label{color:#5b6576;font-size:12px}.item .value{font-size:16px;font-weight:600}
.item.missing .value{color:#9aa3b1;font-weight:400}
figure.plot-wrap{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:6px}
svg.plot{width:100%;height:auto;display:block}
.missing{color:#8a5a00;background:#fff8e6;border:1px solid #f0d9a0;border-radius:8px;padding:12px}
table{border-collapse:collapse;font-size:12px;margin-top:8px;background:#fff}
td,th{border:1px solid #dde1e7;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}.num{text-align:right;font-variant-numeric:tabular-nums}
.side{display:grid;grid-template-columns:1fr 1fr;gap:12px}.side>div>h3{font-size:13px;margin:4px 0;color:#5b6576}
.better{color:#17733a;font-weight:600}.worse{color:#b42318;font-weight:600}
.warn{color:#8a5a00}
.oom{color:#fff;background:#b42318;border-radius:8px;padding:8px 12px;font-weight:600}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def _card_html(items: Sequence[tuple[str, str, float | None, str]]) -> str:
    out = []
    for key, label, value, shown in items:
        cls = "item" if value is not None or shown not in ("not recorded", "no requests") else "item missing"
        dv = f' data-value="{value!r}"' if value is not None else ""
        out.append(f'<div class="{cls}" data-key="{html.escape(key)}"{dv}><div class="label">{html.escape(label)}'
                   f'</div><div class="value">{html.escape(shown)}</div></div>')  # fmt: skip
    return f'<div class="card" id="summary">{"".join(out)}</div>'


def _figure_block(f: FigureResult) -> str:
    if f.svg is None:
        return f'<p class="missing" data-missing="{f.id}">Missing: {html.escape(f.missing or "")}</p>{f.extra_html}'
    return f.svg + f.extra_html


def _describe(summary: Mapping[str, Any]) -> str:
    cmd = " ".join(summary.get("command") or []) or "(attached process)"
    return f"{cmd} — {summary.get('host') or 'unknown host'} — {summary.get('trace')}"


def _replay_mark_html(summary: Mapping[str, Any], el_id: str) -> str:
    """A counterfactual trace (``tuner replay --out``) says where its metrics stop being its policy's."""
    mark = summary.get("replay")
    if not mark:
        return ""
    return f"<p class='warn' id='{el_id}'>{html.escape(mark['text'])}</p>"


def render_report(data: TraceData, summary: Mapping[str, Any]) -> str:
    figs = build_figures(data, summary)
    parts = [f"<h1>inference-tuner report</h1><div class='sub'>{html.escape(_describe(summary))}</div>"
             + _replay_mark_html(summary, "replay-mark"),
             _card_html(card_items(summary, data))]  # fmt: skip
    oom = summary.get("oom_kill")
    if oom:
        parts.insert(1, f"<p class='oom' id='oom-kill'>{html.escape(str(oom.get('message') or 'OOM kill'))}</p>")
    warns = summary.get("warnings") or []
    if warns:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in warns)
                     + "</ul>")  # fmt: skip
    for f in figs:
        parts.append(f'<section id="fig-{f.id}"><h2>{html.escape(f.title)}</h2>{_figure_block(f)}</section>')
    return _page(f"tuner report: {summary.get('trace')}", "".join(parts))


# -- compare ----------------------------------------------------------------------------------------


def _verdict(a: float | None, b: float | None, better: str | None) -> tuple[float | None, str]:
    if a is None and b is None:
        return None, "missing in both"
    if a is None:
        return None, "missing in A"
    if b is None:
        return None, "missing in B"
    if a == 0 or (a < 0) != (b < 0):  # no meaningful ratio (a slope that changed sign): compare directly
        if a == b:
            return None, "about the same"
        if better is None:
            return None, "higher in B" if b > a else "lower in B"
        return None, "better in B" if (b < a) == (better == "lower") else "worse in B"
    ratio = b / a
    if abs(ratio - 1.0) <= SAME_WITHIN:
        return ratio, "about the same"
    if better is None:
        return ratio, "higher in B" if ratio > 1 else "lower in B"
    improved = (b < a) == (better == "lower")  # by the values: with negative values (slopes) ratio < 1 is higher
    return ratio, "better in B" if improved else "worse in B"


def compare(
    a_data: TraceData, a_sum: Mapping[str, Any], b_data: TraceData, b_sum: Mapping[str, Any], *, draw: bool = True
) -> tuple[dict[str, Any], list[tuple[FigureResult, FigureResult]]]:
    """The comparison (JSON-ready) and the figure pairs.  Keys: ``a``, ``b`` (trace paths), ``figures``:
    list of ``{"id", "title", "a_missing", "b_missing", "numbers": [{"label", "unit", "better", "a", "b",
    "ratio", "verdict"}], "verdict"}`` where the figure's verdict is ``better in B`` / ``worse in B`` when its
    judged numbers agree, ``mixed`` when they disagree, else ``about the same`` or what is missing."""
    fa, fb = build_figures(a_data, a_sum, draw=draw), build_figures(b_data, b_sum, draw=draw)
    figures = []
    for x, y in zip(fa, fb, strict=True):
        labels = list(dict.fromkeys([n.label for n in x.numbers] + [n.label for n in y.numbers]))
        na, nb = {n.label: n for n in x.numbers}, {n.label: n for n in y.numbers}
        nums = []
        for lab in labels:
            ref = na.get(lab) or nb[lab]
            av = na[lab].value if lab in na else None
            bv = nb[lab].value if lab in nb else None
            ratio, verdict = _verdict(av, bv, ref.better)
            nums.append({"label": lab, "unit": ref.unit, "better": ref.better, "a": av, "b": bv, "ratio": ratio,
                         "verdict": verdict})  # fmt: skip
        judged = {n["verdict"] for n in nums if n["better"] and n["verdict"] in ("better in B", "worse in B")}
        if x.svg is None and y.svg is None:
            fv = "missing in both"
        elif x.svg is None:
            fv = "missing in A"
        elif y.svg is None:
            fv = "missing in B"
        elif len(judged) == 1:
            fv = judged.pop()
        elif judged:
            fv = "mixed"
        else:
            fv = "about the same"
        figures.append({"id": x.id, "title": x.title, "a_missing": x.missing if x.svg is None else None,
                        "b_missing": y.missing if y.svg is None else None, "numbers": nums, "verdict": fv})  # fmt: skip
    result = {"a": str(a_data.path), "b": str(b_data.path), "a_replay": a_sum.get("replay"),
              "b_replay": b_sum.get("replay"), "figures": figures}  # fmt: skip
    return result, list(zip(fa, fb, strict=True))


def _fmt_number(v: float | None, unit: str) -> str:
    return human_value(v, unit) if v is not None else "missing"


def render_compare(result: Mapping[str, Any], pairs: Sequence[tuple[FigureResult, FigureResult]],
                   a_sum: Mapping[str, Any], b_sum: Mapping[str, Any]) -> str:  # fmt: skip
    parts = [
        "<h1>inference-tuner comparison</h1>",
        f"<div class='sub'>A: {html.escape(_describe(a_sum))}<br>B: {html.escape(_describe(b_sum))}</div>",
        _replay_mark_html(a_sum, "replay-mark-a"),
        _replay_mark_html(b_sum, "replay-mark-b"),
    ]
    rows = []
    for f in result["figures"]:
        for n in f["numbers"]:
            cls = "better" if n["verdict"] == "better in B" else "worse" if n["verdict"] == "worse in B" else ""
            ratio = f"{n['ratio']:.3g}" if n["ratio"] is not None else "—"
            rows.append(f"<tr><td>{html.escape(f['title'])}</td><td>{html.escape(n['label'])}</td>"
                        f"<td class='num'>{_fmt_number(n['a'], n['unit'])}</td>"
                        f"<td class='num'>{_fmt_number(n['b'], n['unit'])}</td><td class='num'>{ratio}</td>"
                        f"<td class='{cls}'>{html.escape(n['verdict'])}</td></tr>")  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in ("figure", "number", "A", "B", "B/A", "verdict"))
    parts.append(f"<h2>Figures side by side</h2><table id='ratios'><thead><tr>{head}</tr></thead><tbody>"
                 + "".join(rows) + "</tbody></table>")  # fmt: skip
    for f, (fa, fb) in zip(result["figures"], pairs, strict=True):
        cls = "better" if f["verdict"] == "better in B" else "worse" if f["verdict"] == "worse in B" else ""
        parts.append(
            f'<section id="fig-{f["id"]}"><h2>{html.escape(f["title"])} — <span class="{cls}">'
            f'{html.escape(f["verdict"])}</span></h2><div class="side"><div><h3>A</h3>{_figure_block(fa)}</div>'
            f"<div><h3>B</h3>{_figure_block(fb)}</div></div></section>"
        )
    return _page("tuner compare", "".join(parts))


def render_compare_text(result: Mapping[str, Any]) -> str:
    lines = [f"A  {result['a']}", f"B  {result['b']}"]
    for side in ("a", "b"):
        mark = result.get(f"{side}_replay")
        if mark:
            lines.append(f"{side.upper()} is {mark['text']}")
    lines.append("")
    rows = [["figure / number", "A", "B", "B/A", "verdict"]]
    for f in result["figures"]:
        rows.append([f["title"], "", "", "", f["verdict"]])
        for n in f["numbers"]:
            ratio = f"{n['ratio']:.3g}" if n["ratio"] is not None else "-"
            rows.append(["  " + n["label"], _fmt_number(n["a"], n["unit"]), _fmt_number(n["b"], n["unit"]), ratio,
                         n["verdict"]])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:4], widths[1:4], strict=True)),
                                r[4]]).rstrip())  # fmt: skip
    return "\n".join(lines)


__all__ = [
    "FIGURES",
    "FigureResult",
    "Number",
    "build_figures",
    "card_items",
    "compare",
    "render_compare",
    "render_compare_text",
    "render_report",
    "trace_windows",
]
