"""Widgets: a braille line chart (several series, step lines, trend line, target band) and device panels.

The chart draws into a braille grid (2x4 dots per cell) with numpy for the point mapping and one Python
pass over the occupied dot columns; the lines are cached as ``Strip``s and rebuilt only on new data.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from tuner.tui.model import ChartSpec, Device, Model, fmt_value

PALETTE = ("#5fafff", "#ffaf5f", "#87d75f", "#d787d7", "#5fd7d7", "#d7d75f")
TREND_COLOR = "#ff5f5f"
BAND_BG = "#1f3a24"
AXIS = Style(color="#808080")
DIM = Style(color="#909090", italic=True)
# braille bit for (sub-row 0..3 from the top, sub-column 0..1)
_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.uint8)
LABEL_W = 7
_GLYPHS = [" "] + [chr(0x2800 + b) for b in range(1, 256)]


def _series_dots(
    ts: np.ndarray, vs: np.ndarray, t0: float, t1: float, lo: float, hi: float, xd: int, yd: int, step: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Dot coordinates (x from the left, y from the bottom) of a connected line through the points."""
    empty = np.zeros(0, dtype=np.int64)
    ok = np.isfinite(vs)
    if not ok.any() or t1 <= t0 or hi <= lo:
        return empty, empty
    ts, vs = ts[ok], vs[ok]
    xs = np.clip(((ts - t0) / (t1 - t0) * (xd - 1)).round().astype(np.int64), 0, xd - 1)
    ys = np.clip(((vs - lo) / (hi - lo) * (yd - 1)).round().astype(np.int64), 0, yd - 1)
    ends = np.r_[np.flatnonzero(np.diff(xs)), len(xs) - 1]
    starts = np.r_[0, ends[:-1] + 1]
    cols = xs[starts]
    mins = np.minimum.reduceat(ys, starts)
    maxs = np.maximum.reduceat(ys, starts)
    lasts = ys[ends]
    # a gap wider than 4 sampling intervals is a hole in the data: do not bridge it
    dt = float(ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 2 else (t1 - t0)
    max_gap = max(2, math.ceil(4 * dt / (t1 - t0) * (xd - 1)))
    gap = np.r_[xd + max_gap, np.diff(cols)]
    prev = np.r_[0, lasts[:-1]]
    joined = gap <= max_gap
    a = np.where(joined, np.minimum(mins, prev), mins)
    b = np.where(joined, np.maximum(maxs, prev), maxs)
    n = b - a + 1
    offs = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    ox = np.repeat(cols, n)
    oy = np.repeat(a, n) + offs
    bridge = np.flatnonzero(joined & (gap > 1))
    if len(bridge):  # dot columns between two points: step (hold) or straight line
        bx: list[int] = []
        by: list[int] = []
        firsts = ys[starts]
        for g in bridge.tolist():
            px, x = int(cols[g - 1]), int(cols[g])
            py, f = int(lasts[g - 1]), int(firsts[g])
            for c in range(px + 1, x):
                bx.append(c)
                by.append(py if step else round(py + (f - py) * (c - px) / (x - px)))
        ox = np.r_[ox, np.asarray(bx, dtype=np.int64)]
        oy = np.r_[oy, np.asarray(by, dtype=np.int64)]
    return ox, oy


def y_range(spec: ChartSpec, arrays: Sequence[np.ndarray]) -> tuple[float, float] | None:
    finite = [a[np.isfinite(a)] for a in arrays]
    finite = [a for a in finite if len(a)]
    if not finite:
        return None
    lo = min(float(a.min()) for a in finite)
    hi = max(float(a.max()) for a in finite)
    if spec.unit in ("seconds", "ratio") or spec.id == "tps":
        lo = min(0.0, lo)
    if spec.unit == "ratio" and spec.id == "util":
        hi = max(hi, 1.0)
    if spec.band is not None:
        hi = max(hi, spec.band[1] * 1.25)
        lo = min(lo, spec.band[0])
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.08
        lo, hi = (lo - pad if lo != 0.0 else lo), hi + pad
    if spec.integer:
        lo, hi = float(math.floor(lo)), float(math.ceil(hi))
    return lo, hi


class Chart(Widget):
    """A titled braille chart of one ``ChartSpec`` over a time window."""

    DEFAULT_CSS = """
    Chart { height: 100%; min-height: 7; min-width: 30; }
    """

    def __init__(self, spec: ChartSpec, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.spec = spec
        self._lines: list[Strip] = []
        self._data: tuple[Model, float, float] | None = None
        self._drawn_for: tuple[Any, ...] | None = None
        self._drawn_t1 = math.nan
        self.latest: dict[str, float | None] = {}
        self.empty_reason: str | None = None

    def set_data(self, model: Model, t0: float, t1: float, spec: ChartSpec | None = None) -> None:
        """Redraw when the size, window or series changed, or the view time moved by one dot column
        (new data inside the newest dot column waits for the next one: at most window/plot-dots late)."""
        if spec is not None:
            self.spec = spec
        self._data = (model, t0, t1)
        w, h = self.size.width, self.size.height
        key = (w, h, round(t1 - t0, 6), self.spec, id(model))
        dot = (t1 - t0) / max(1, 2 * (w - LABEL_W))
        moved = abs(t1 - self._drawn_t1) >= dot if math.isfinite(self._drawn_t1) else True
        if key != self._drawn_for or moved:
            self._drawn_for = key
            self._drawn_t1 = t1
            self._lines = self.draw(model, t0, t1, w, h)
            self.refresh()

    def on_resize(self) -> None:
        if self._data is not None:
            m, t0, t1 = self._data
            self._drawn_for = None
            self._drawn_t1 = math.nan
            self.set_data(m, t0, t1)

    def render_line(self, y: int) -> Strip:
        if y < len(self._lines):
            return self._lines[y]
        return Strip.blank(self.size.width)

    # -- drawing ------------------------------------------------------------------------------------
    def draw(self, model: Model, t0: float, t1: float, width: int, height: int) -> list[Strip]:
        spec = self.spec
        if width < 12 or height < 2:
            return []
        data = [model.cols.window(k, t0, t1) for k, _ in spec.series]
        self.latest = {k: model.cols.latest(k, t1) for k, _ in spec.series}
        trend = model.trend(spec.trend, t0, t1) if spec.trend else None
        title = Text(spec.title, style="bold")
        for i, (key, label) in enumerate(spec.series):
            v = self.latest[key]
            if v is None and not np.isfinite(data[i][1]).any():
                continue
            title.append(f"  {label} ", style=PALETTE[i % len(PALETTE)])
            title.append(fmt_value(v, "bits" if key == "knob_precision_bits" else spec.unit))
        if trend is not None:
            per_min = trend[0] * 60
            title.append(f"  trend {'+' if per_min >= 0 else ''}{fmt_value(per_min, spec.unit)}/min", TREND_COLOR)
        if spec.band is not None:
            band_txt = f"  target {fmt_value(spec.band[0], spec.unit)}-{fmt_value(spec.band[1], spec.unit)}"
            title.append(band_txt, "#87af87")
        title.truncate(width, overflow="ellipsis")
        lines = [Strip(list(title.render(self.app.console)) if self.is_attached else [Segment(title.plain)])]
        lines[0] = lines[0].adjust_cell_length(width)
        rows = height - 1
        pw = width - LABEL_W
        rng = y_range(spec, [v for _, v in data])
        if rng is None:
            self.empty_reason = model.why_empty(spec)
            wrapped = textwrap.wrap(self.empty_reason, max(8, width - 2))[:rows]
            first = max(0, (rows - len(wrapped)) // 2)
            for r in range(rows):
                j = r - first
                if 0 <= j < len(wrapped):
                    msg = wrapped[j]
                    pad = max(0, (width - len(msg)) // 2)
                    lines.append(Strip([Segment(" " * pad), Segment(msg, DIM)]).adjust_cell_length(width))
                else:
                    lines.append(Strip.blank(width))
            return lines
        self.empty_reason = None
        lo, hi = rng
        xd, yd = pw * 2, rows * 4
        bits = np.zeros((rows, pw), dtype=np.uint8)
        color = np.full((rows, pw), -1, dtype=np.int16)

        def plot(x: np.ndarray, oy: np.ndarray, ci: int) -> None:
            if not len(x):
                return
            yy = (yd - 1) - oy
            r, sub = yy // 4, yy % 4
            c = x // 2
            np.bitwise_or.at(bits, (r, c), _BITS[sub, x % 2])
            color[r, c] = ci

        for i, (ts, vs) in enumerate(data):
            plot(*_series_dots(ts, vs, t0, t1, lo, hi, xd, yd, spec.step), i)
        if trend is not None:
            tt = np.linspace(t0, t1, xd)
            tv = trend[0] * tt + trend[1]
            ox, oy = _series_dots(tt, tv, t0, t1, lo, hi, xd, yd, False)
            keep = (ox // 2) % 2 == 0  # dashed
            plot(ox[keep], oy[keep], 99)
        band_rows: set[int] = set()
        if spec.band is not None:
            b0 = (spec.band[0] - lo) / (hi - lo) * (yd - 1)
            b1 = (spec.band[1] - lo) / (hi - lo) * (yd - 1)
            for r in range(rows):
                cell_lo = (rows - 1 - r) * 4
                if cell_lo + 3 >= b0 and cell_lo <= b1:
                    band_rows.add(r)
        styles = {i: Style(color=PALETTE[i % len(PALETTE)]) for i in range(len(spec.series))}
        styles[99] = Style(color=TREND_COLOR)
        unit = "bits" if spec.series[0][0] == "knob_precision_bits" else spec.unit
        top, bottom = fmt_value(hi, unit), fmt_value(lo, unit)
        for r in range(rows):
            label = top if r == 0 else bottom if r == rows - 1 else ""
            segs = [Segment(f"{label:>{LABEL_W - 1}}│", AXIS)]
            bg = Style(bgcolor=BAND_BG) if r in band_rows else None
            row_bits = bits[r]
            row_col = np.where(row_bits != 0, color[r], -1)
            text = "".join(_GLYPHS[b] for b in row_bits.tolist())
            cuts = np.flatnonzero(np.diff(row_col)) + 1
            edges = [0, *cuts.tolist(), len(text)]
            for a, b in itertools.pairwise(edges):
                st = styles.get(int(row_col[a]))
                segs.append(Segment(text[a:b], (st + bg) if st and bg else (st or bg)))
            lines.append(Strip(segs, width))
        return lines


def _set(widget: Static, content: Text) -> None:
    """Update a Static only when its content changed (an update costs a layout pass)."""
    if getattr(widget, "_tuner_last", None) != content:
        widget._tuner_last = content  # type: ignore[attr-defined]
        widget.update(content)


def bar(frac: float | None, width: int) -> Text:
    if frac is None or not math.isfinite(frac) or width <= 0:
        return Text("░" * max(0, width), style="#505050")
    frac = min(1.0, max(0.0, frac))
    full = round(frac * width)
    color = "#87d75f" if frac < 0.7 else "#ffaf5f" if frac < 0.9 else "#ff5f5f"
    t = Text("█" * full, style=color)
    t.append("░" * (width - full), style="#505050")
    return t


class DevicePanel(Vertical):
    """CPU / RAM / one accelerator: numbers, a bar, a sparkline."""

    DEFAULT_CSS = """
    DevicePanel { height: 3; width: 1fr; min-width: 22; padding: 0 1 0 0; }
    DevicePanel > Static { height: 1; }
    DevicePanel > Sparkline { height: 1; }
    """

    def __init__(self, device: Device, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.device = device
        self.info = Static("", classes="info")
        self.meter = Static("", classes="meter")
        self.spark = Sparkline([], summary_function=max)
        self._last: tuple[Model, float, float] | None = None

    def compose(self) -> ComposeResult:
        yield self.info
        yield self.meter
        yield self.spark

    def on_resize(self) -> None:
        # the bar's width comes from the panel's: a panel laid out after its first update draws it again
        # (else a frozen replay kept the 4-cell bar of a not-yet-sized panel)
        if self._last is not None:
            self.update_from(*self._last)

    def update_from(self, model: Model, t0: float, t1: float) -> None:
        self._last = (model, t0, t1)
        d = self.device
        cols = model.cols
        w = max(4, self.size.width - 12)
        if d.kind == "cpu":
            tree = cols.latest("tree_cpu_ratio", t1)
            sysr = cols.latest("sys_cpu_ratio", t1)
            _set(
                self.info,
                Text.assemble(("CPU ", "bold"), f"tree {fmt_value(tree, 'cores')}  sys {fmt_value(sysr, 'ratio')}"),
            )
            _set(self.meter, bar(sysr, w) + Text(f" {fmt_value(sysr, 'ratio')}"))
            spark_key = "tree_cpu_ratio"
        elif d.kind == "ram":
            used = cols.latest("sys_mem_used_bytes", t1)
            total = cols.latest("sys_mem_total_bytes", t1)
            rss = cols.latest("tree_rss_bytes", t1)
            frac = used / total if used is not None and total else None
            _set(
                self.info,
                Text.assemble(
                    ("RAM ", "bold"),
                    f"rss {fmt_value(rss, 'bytes')}  {fmt_value(used, 'bytes')}/{fmt_value(total, 'bytes')}",
                ),
            )
            _set(self.meter, bar(frac, w) + Text(f" {fmt_value(frac, 'ratio')}"))
            spark_key = "tree_rss_bytes"
        else:
            k, i = d.kind, d.index
            used = cols.latest(f"{k}_mem_used_bytes/{i}", t1)
            total = cols.latest(f"{k}_mem_total_bytes/{i}", t1)
            util = cols.latest(f"{k}_util_ratio/{i}", t1)
            watts = cols.latest(f"{k}_power_watts/{i}", t1)
            frac = used / total if used is not None and total else None
            _set(
                self.info,
                Text.assemble(
                    (f"{d.title} ", "bold"),
                    f"util {fmt_value(util, 'ratio')}  {fmt_value(used, 'bytes')}/{fmt_value(total, 'bytes')}",
                    f"  {watts:.0f}W" if watts is not None else "",
                ),
            )
            mine = self._tree_memory(model, t1)
            _set(self.meter, bar(frac, max(4, w - len(mine))) + Text(f" {fmt_value(frac, 'ratio')}{mine}"))
            spark_key = f"{k}_util_ratio/{i}"
        _, vs = cols.window(spark_key, t0, t1)
        vals = vs[np.isfinite(vs)]
        data = vals[-2000:].tolist() if len(vals) else [0.0]
        if data != self.spark.data:
            self.spark.data = data


    def _tree_memory(self, model: Model, t1: float) -> str:
        """The watched tree's own memory on this device; where NVML cannot attribute it (another PID
        namespace, MIG without privileges), the client's allocator report, labelled as such; else nothing."""
        cols, i = model.cols, self.device.index
        mine = cols.latest(f"{self.device.kind}_tree_mem_bytes/{i}", t1)
        if mine is not None:
            return f"  tree {fmt_value(mine, 'bytes')}"
        if self.device.kind == "gpu" and any(cols.latest(k, t1) is not None for k in cols.cols
                                             if k.startswith("gpu_tree_mem_bytes/")):
            return ""  # attributed on another device: the tree does not use this one
        client = cols.latest("alloc_reserved_bytes", t1)
        if self.device.kind == "gpu" and client is not None:
            return f"  client alloc {fmt_value(client, 'bytes')}"
        return ""


class MissingPanel(Static):
    """Says why an accelerator has no panel (``no GPU: <reason>``)."""

    DEFAULT_CSS = """
    MissingPanel { height: 3; width: 1fr; min-width: 22; color: $text-muted; }
    """
