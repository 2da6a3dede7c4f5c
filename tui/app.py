"""The dashboard: one app for a live session, a growing trace file and a replayed recording.

A worker thread reads a ``RecordSource`` and posts ``Records`` messages; the app folds them into a
``Model`` and redraws on a timer only when something changed (the view time, the window, new data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, SelectionList, Static
from textual.worker import get_current_worker

from tuner.tui.model import SPEEDS, WINDOWS, Model, clock, fmt_value, nice_window
from tuner.tui.source import RecordSource
from tuner.tui.widgets import Chart, DevicePanel, MissingPanel, _set

HELP = """\
[b]Keys[/b]
  p        pause / resume (live: freeze the view; replay: stop the playhead)
  + / -    longer / shorter time window
  tab      move focus (charts, action log, requests)
  m        pick which charts to show
  d        disable / enable the policy of the selected action (live session only)
  ?        this help          q   quit
[b]Replay[/b]
  [ / ]    slower / faster (0.5x-64x)
  n        jump to the next action
  ← / →    seek 5%          home / end   start / end of the trace

Press escape to close."""


@dataclass
class Records(Message):
    """Records read by the worker (a batch, in order)."""

    records: list[dict[str, Any]]


@dataclass
class SourceDone(Message):
    """The source has nothing more: a replay is fully loaded, a live session went away."""

    reason: str | None


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "close", "close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 70; max-width: 95%; height: auto; border: round $accent; padding: 0 1;
                          background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")

    def action_close(self) -> None:
        self.dismiss(None)


class MetricsScreen(ModalScreen[list[str]]):
    """Pick the charts to show (space toggles, escape or m closes)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,m", "close", "done")]
    DEFAULT_CSS = """
    MetricsScreen { align: center middle; }
    MetricsScreen > SelectionList { width: 50; height: auto; max-height: 90%; border: round $accent; }
    """

    def __init__(self, charts: list[tuple[str, str]], shown: set[str]) -> None:
        super().__init__()
        self.charts = charts
        self.shown = shown

    def compose(self) -> ComposeResult:
        sl: SelectionList[str] = SelectionList(*[(title, cid, cid in self.shown) for cid, title in self.charts])
        sl.border_title = "charts (space toggles, esc closes)"
        yield sl

    def action_close(self) -> None:
        self.dismiss(list(self.query_one(SelectionList).selected))


class TunerApp(App[None]):
    """``TunerApp(source)``; ``clock`` drives the replay playhead (frozen in snapshot tests)."""

    CSS_PATH = "app.tcss"
    TITLE = "tuner"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("p", "pause", "pause"),
        Binding("plus,equals_sign", "window(1)", "+win"),
        Binding("minus", "window(-1)", "-win"),
        Binding("m", "metrics", "metrics"),
        Binding("d", "toggle_policy", "policy on/off"),
        Binding("question_mark", "help", "help"),
        Binding("left_square_bracket", "speed(-1)", "slower", show=False),
        Binding("right_square_bracket", "speed(1)", "faster", show=False),
        Binding("n", "next_action", "next action", show=False),
        Binding("left", "seek(-0.05)", "seek", show=False, priority=True),
        Binding("right", "seek(0.05)", "seek", show=False, priority=True),
        Binding("home", "seek_to(0)", "start", show=False, priority=True),
        Binding("end", "seek_to(1)", "end", show=False, priority=True),
    ]

    def __init__(
        self,
        source: RecordSource,
        *,
        clock: Callable[[], float] = time.monotonic,
        redraw_interval: float = 0.5,
        window: float = 60.0,
    ) -> None:
        super().__init__()
        self.source = source
        self.replay = bool(source.replay)
        self.model = Model(capacity=10_000_000 if self.replay else 36_000)
        self.clock = clock
        self.redraw_interval = redraw_interval
        self.window = window
        self.paused = False
        self.pause_t: float | None = None
        self.speed = 1.0
        self.playhead = 0.0
        self.loaded = False
        self.done_reason: str | None = None
        self.shown: set[str] = {c.id for c in self.model.charts()}
        self.message = ""
        self._last_clock = clock()
        self._drawn: tuple[Any, ...] | None = None
        self._devices_sig: tuple[Any, ...] | None = None
        self._actions_sig: tuple[int, int] | None = None
        self._requests_sig: tuple[int, int] | None = None
        self._requests_at = 0.0
        self._tables_stale = False
        self.redraws = 0

    # -- layout ---------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("", id="hdr")
        yield Horizontal(id="devices")
        with VerticalScroll(id="body"):
            with Grid(id="charts"):
                for spec in self.model.charts():
                    yield Chart(spec, id=f"chart-{spec.id}")
            with Horizontal(id="tables"):
                yield DataTable(id="actions", cursor_type="row", zebra_stripes=True)
                yield DataTable(id="requests", cursor_type="row", zebra_stripes=True)
        yield Static("", id="scrubber")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        acts = self.query_one("#actions", DataTable)
        acts.border_title = "Actions"
        # fixed widths: stable layout (no re-measuring on every rebuild) and deterministic snapshots
        for label, width in (("time", 5), ("policy", 10), ("action", 26), ("reason", 44), ("result", 8)):
            acts.add_column(label, width=width, key=label)
        reqs = self.query_one("#requests", DataTable)
        reqs.border_title = "Recent requests"
        req_cols = (
            ("time", 5),
            ("id", 6),
            ("TTFT", 6),
            ("TPOT", 5),
            ("toks", 4),
            ("tok/s", 5),
            ("rep4", 4),
            ("loop", 4),
        )
        for label, width in req_cols:
            reqs.add_column(label, width=width, key=label)
        self.query_one("#scrubber").display = self.replay
        self._layout(self.size.width, self.size.height)
        self._read_source()
        self.set_interval(self.redraw_interval, self._on_timer)
        self.redraw()

    def on_resize(self, event: Any) -> None:
        self._layout(event.size.width, event.size.height)

    def _layout(self, width: int, height: int) -> None:
        """Size the charts to the terminal: columns by width, and the rows left between the fixed lines
        (header, devices, scrubber, status, footer) shared between the chart grid and the tables, so a
        large terminal shows taller charts instead of an empty bottom.  When even the smallest charts do
        not fit (80x24) the body scrolls."""
        cols, chart_h, tables_h = layout_for(width, height, len(self.shown) or 1, self.replay)
        grid = self.query_one("#charts", Grid)
        grid.styles.grid_size_columns = cols
        grid.styles.grid_rows = str(chart_h)
        self.query_one("#tables").styles.height = tables_h
        shown = [c for c in self.query(Chart) if c.spec.id in self.shown]
        for c in self.query(Chart):
            c.styles.column_span = 1
        if shown and len(shown) % cols:  # the last chart widens to the end of its row: no empty cell
            shown[-1].styles.column_span = cols - len(shown) % cols + 1

    # -- data ----------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False)
    def _read_source(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                recs = self.source.read(0.1)
            except Exception as exc:  # a broken source ends the feed, it does not kill the app
                self.post_message(SourceDone(f"source failed: {exc}"))
                return
            if recs is None:
                self.post_message(SourceDone(getattr(self.source, "error", None)))
                return
            if recs:
                self.post_message(Records(recs))

    def on_records(self, msg: Records) -> None:
        first = self.model.header is None
        self.model.apply_many(msg.records)
        if first and self.model.header is not None:
            self.shown = {c.id for c in self.model.charts()}
            self._layout(self.size.width, self.size.height)

    def on_source_done(self, msg: SourceDone) -> None:
        self.loaded = True
        if self.replay:
            self.playhead = self.model.cols.first_t
            self._last_clock = self.clock()
        else:
            self.done_reason = msg.reason or ("session ended" if self.model.end else "feed ended")
        self.redraw()

    # -- view time -----------------------------------------------------------------------------------
    def view_now(self) -> float:
        if self.replay:
            return self.playhead
        if self.paused and self.pause_t is not None:
            return self.pause_t
        return self.model.newest_t

    def _on_timer(self) -> None:
        if self.replay and self.loaded:
            now = self.clock()
            if not self.paused:
                self.playhead = min(self.model.last_t, self.playhead + (now - self._last_clock) * self.speed)
                if self.playhead >= self.model.last_t:
                    self.paused = True
                    self.message = "end of trace"
            self._last_clock = now
        self.redraw()

    def redraw(self, force: bool = False) -> None:
        if not self.is_running:
            # Shutting down: Textual clears _running, then prunes the screen's widgets while the app's
            # own timer can still tick once (CI, Python 3.13: NoMatches '#hdr' after the test's last check).
            return
        now = self.view_now()
        t1 = now
        t0 = t1 - self.window
        sig = (
            self.model.version,
            round(t1, 3),
            self.window,
            self.paused,
            self.speed,
            self.message,
            self.size,
            tuple(sorted(self.shown)),
            self.loaded,
            self.done_reason,
        )
        if sig == self._drawn and not force and not self._tables_stale:
            return
        self._drawn = sig
        self.redraws += 1
        self._draw_header(now)
        self._draw_devices(t0, t1)
        for spec in self.model.charts():
            try:
                chart = self.query_one(f"#chart-{spec.id}", Chart)
            except Exception:
                continue
            chart.display = spec.id in self.shown
            if chart.display:
                chart.set_data(self.model, t0, t1, spec)
        self._draw_tables(now)
        self._draw_status(now)

    def _draw_header(self, now: float) -> None:
        m = self.model
        if m.header is None:
            _set(self.query_one("#hdr", Static), Text("waiting for the trace header…", style="italic"))
            return
        mode = "REPLAY" if self.replay else ("LIVE" if not self.source.describe.startswith("follow") else "FOLLOW")
        width = max(10, self.size.width - 2)
        line1 = Text.assemble(("tuner ", "bold #5fafff"), (f"{mode} ", "bold reverse"))
        if m.header.get("synthetic"):  # a generated fixture, not a recording: say so first
            line1.append(" SYNTHETIC ", "bold reverse #ffaf5f")
        tail = Text(f"  │ {m.tree_pids()}  │ up {clock(now)}  │ window {nice_window(self.window)}")
        if line1.cell_len + 17 + tail.cell_len > width:  # a narrow terminal: uptime before the process list
            tail = Text(f"  │ up {clock(now)}  │ window {nice_window(self.window)}")
        if self.paused:
            tail.append("  PAUSED", "bold #ffaf5f")
        # the command gets what is left of the line (at least 16 cells): uptime and window stay visible
        room = max(16, width - line1.cell_len - 1 - tail.cell_len)
        cmd = Text(m.command(), "bold")
        cmd.truncate(room, overflow="ellipsis")
        line1.append(" ")
        line1.append_text(cmd)
        line1.append_text(tail)
        parts = Text("probes: ")
        for name, st in m.probes.items():
            if isinstance(st, dict) and st.get("available", True):
                parts.append(f"{name} ✓  ", "#87d75f")
            else:
                reason = st.get("reason") if isinstance(st, dict) else None
                parts.append(f"{name} ✗ ({reason or 'unavailable'})  ", "#d7875f")
        quality = m.quality_line(now)  # consistency (--consistency), with the backend's name
        if quality is not None:
            parts = Text.assemble((quality, "#87afd7"), "  │  ", parts)
        energy = m.energy_line(now)  # energy per generated token on the inference's GPUs
        if energy is not None:
            parts = Text.assemble((energy, "#87afd7"), "  │  ", parts)
        mem = m.memory_line(now)  # the binding memory limit (a cgroup's, a device's) or the OOM kill
        if mem is not None:
            style = "bold #ff5f5f" if mem.startswith("OOM") else ("#ffaf5f" if "limit in" in mem else "#87afd7")
            parts = Text.assemble((mem, style), "  │  ", parts)
        line1.truncate(width, overflow="ellipsis")
        parts.truncate(width, overflow="ellipsis")
        _set(self.query_one("#hdr", Static), Text("\n").join([line1, parts]))

    def _draw_devices(self, t0: float, t1: float) -> None:
        devices = self.model.devices()
        missing = self.model.missing_devices()
        sig = (tuple(devices), tuple(missing))
        box = self.query_one("#devices", Horizontal)
        if sig != self._devices_sig:
            self._devices_sig = sig
            box.remove_children()
            box.mount_all([DevicePanel(d) for d in devices] + [MissingPanel("\n".join(missing), classes="missing")])
            self.call_after_refresh(self.redraw, True)
            return
        for panel in box.query(DevicePanel):
            panel.update_from(self.model, t0, t1)

    def _draw_tables(self, now: float) -> None:
        m = self.model
        acts = m.actions_until(now)
        sig = (len(acts), id(acts[-1]) if acts else 0)
        if sig != self._actions_sig:
            self._actions_sig = sig
            table = self.query_one("#actions", DataTable)
            row = table.cursor_row
            table.clear()
            for a in reversed(acts[-200:]):
                what = f"{a.get('knob')} {_short(a.get('previous'))}→{_short(a.get('value'))}"
                table.add_row(
                    clock(a["t"]),
                    str(a.get("policy", "")),
                    what,
                    str(a.get("reason", ""))[:60],
                    str(a.get("outcome", "")),
                )
            if table.row_count:
                table.move_cursor(row=min(row, table.row_count - 1))
        reqs = m.requests_until(now, 30)
        rsig = (len(m.req_t), id(reqs[-1]) if reqs else 0)
        # rebuilt at most once a second: a table rebuild is the dearest thing on screen (~2.5 requests/s)
        self._tables_stale = rsig != self._requests_sig
        due = self.replay or self._requests_sig is None or time.monotonic() - self._requests_at >= 1.0
        if self._tables_stale and due:
            self._tables_stale = False
            self._requests_sig = rsig
            self._requests_at = time.monotonic()
            table = self.query_one("#requests", DataTable)
            table.clear()
            for r in reversed(reqs):
                table.add_row(
                    clock(r["t"]),
                    str(r.get("id", ""))[:10],
                    fmt_value(_num(r.get("ttft_seconds")), "seconds"),
                    fmt_value(_num(r.get("tpot_seconds")), "seconds"),
                    str(r.get("tokens", "-")),
                    fmt_value(_num(r.get("tokens_per_second")), "value"),
                    fmt_value(_num(r.get("seq_rep_4")), "ratio"),
                    "loop" if r.get("loop") else "",
                )

    def _draw_status(self, now: float) -> None:
        m = self.model
        bits = [self.source.describe]  # most important first: the line is cut at the terminal's width
        if self.message:
            bits.append(self.message)
        if not self.loaded and self.replay:
            bits.append(f"loading… {m.records} records")
        if self.done_reason:
            bits.append(self.done_reason)
        focused = self.focused.id if self.focused is not None and self.focused.id else "-"
        bits.append(f"focus: {focused}")
        if m.skipped:
            bits.append(f"{m.skipped} ticks skipped")
        if m.dropped:
            bits.append(f"viewer dropped {m.dropped} records")
        if m.policies:
            bits.append("policies: " + " ".join(f"{n} {'on' if on else 'off'}" for n, on in m.policies.items()))
        _set(self.query_one("#status", Static), Text("  │  ".join(bits), style="#a0a0a0"))
        if self.replay:
            dur = max(m.last_t, 1e-9)
            nxt = m.next_action_after(self.playhead)
            state = "⏸" if self.paused else "▶"
            head = f"{state} {self.speed:g}x  {clock(self.playhead)} / {clock(m.last_t)} "
            tail = f"  next action {clock(nxt) if nxt is not None else '-'}"
            w = max(10, self.size.width - 2 - len(head) - len(tail))  # the track takes what the text leaves
            pos = round(self.playhead / dur * (w - 1)) if m.last_t > 0 else 0
            track = Text("━" * pos, "#5fafff")
            track.append("●", "bold #ffffff")
            track.append("─" * (w - 1 - pos), "#606060")
            scrub = Text.assemble(head, track, tail)
            _set(self.query_one("#scrubber", Static), scrub)

    # -- keys ----------------------------------------------------------------------------------------
    def action_pause(self) -> None:
        self.paused = not self.paused
        self.pause_t = self.model.newest_t if self.paused else None
        self._last_clock = self.clock()
        self.message = "paused" if self.paused else "resumed"
        self.redraw()

    def action_window(self, direction: int) -> None:
        i = min(range(len(WINDOWS)), key=lambda j: abs(WINDOWS[j] - self.window))
        self.window = WINDOWS[max(0, min(len(WINDOWS) - 1, i + direction))]
        self.message = f"window {nice_window(self.window)}"
        self.redraw()

    def action_speed(self, direction: int) -> None:
        if not self.replay:
            self.message = "speed: only in a replay"
        else:
            i = min(range(len(SPEEDS)), key=lambda j: abs(SPEEDS[j] - self.speed))
            self.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + direction))]
            self.message = f"speed {self.speed:g}x"
        self.redraw()

    def action_next_action(self) -> None:
        if not self.replay:
            self.message = "n: only in a replay"
        else:
            t = self.model.next_action_after(self.playhead)
            if t is None:
                self.message = "no more actions"
            else:
                self.playhead = t
                a = self.model.actions[self.model.act_t.index(t)]
                self.message = f"action at {clock(t)}: {a.get('policy')} {a.get('knob')}"
        self.redraw()

    def action_seek(self, frac: float) -> None:
        if self.replay:
            self.playhead = min(self.model.last_t, max(0.0, self.playhead + frac * self.model.last_t))
            self.redraw()

    def action_seek_to(self, frac: float) -> None:
        if self.replay:
            self.playhead = frac * self.model.last_t
            self.redraw()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_metrics(self) -> None:
        charts = [(c.id, c.title) for c in self.model.charts()]

        def done(selected: list[str] | None) -> None:
            if selected is not None:
                self.shown = set(selected)
                self.message = f"{len(self.shown)} of {len(charts)} charts shown"
                self._layout(self.size.width, self.size.height)
                self.redraw()

        self.push_screen(MetricsScreen(charts, set(self.shown)), done)

    def selected_policy(self) -> str | None:
        table = self.query_one("#actions", DataTable)
        if not table.row_count:
            return None
        row = table.get_row_at(table.cursor_row)
        return str(row[1]) or None

    def action_toggle_policy(self) -> None:
        name = self.selected_policy()
        if name is None:
            self.message = "d: no policy selected (the action log is empty)"
        else:
            enabled = not self.model.policies.get(name, True)
            why = self.source.send_command({"cmd": "policy", "name": name, "enabled": enabled})
            if why is not None:
                self.message = f"cannot change policy {name}: {why}"
            else:
                self.model.policies[name] = enabled
                self.message = f"sent: {'enable' if enabled else 'disable'} policy {name}"
        self.notify(self.message, timeout=3)
        self.redraw()

    def on_descendant_focus(self) -> None:
        self.redraw(force=True)

    def on_unmount(self) -> None:
        for w in self.workers:
            w.cancel()
        try:
            self.source.close()
        except Exception:
            pass


CHROME_ROWS = 2 + 3 + 1 + 1  # header, device panels, status line, footer (+1 for a replay's scrubber)
CHART_MIN_ROWS = 7
CHART_MIN_COLS = 46  # wide enough for a title with its values (e.g. "Batch size / precision  batch 16  bits fp32")


def layout_for(width: int, height: int, charts: int, replay: bool) -> tuple[int, int, int]:
    """(chart columns, rows per chart, rows of the tables) for a terminal of ``width`` x ``height``.

    Columns: as many as keep each chart at least ``CHART_MIN_COLS`` wide (2 to 4).  Rows: the tables take
    a quarter of the body (8 to 16 rows) and the charts share the rest, at least ``CHART_MIN_ROWS`` each.
    """
    cols = max(2, min(4, (width - 2) // CHART_MIN_COLS))
    body = max(0, height - CHROME_ROWS - (1 if replay else 0))
    tables = max(8, min(16, body // 4))
    rows = -(-max(1, charts) // cols)
    chart = max(CHART_MIN_ROWS, (body - tables) // rows)
    return cols, chart, tables


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def run_live(socket_path: str) -> None:
    """Run the dashboard on a session's observer socket until the user presses q."""
    from tuner.tui.source import SocketSource

    TunerApp(SocketSource(socket_path)).run()
