"""``tuner fleet``: every sidecar a Prometheus server scrapes, one row each, refreshed from PromQL.

A worker thread calls ``fetch() -> Fleet`` (``tuner.fleet.fetch_fleet``) every ``refresh`` seconds and posts
``FleetFetched``; the app keeps the last answer, sorts it and redraws the table.  Keys: ``s`` / ``S`` sort by
the next / previous column (or click a header), ``r`` reverse, ``g`` refresh now, Enter a replica's detail,
``?`` help, ``q`` quit.  A failed refresh keeps the last rows and says why in the status line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from tuner.fleet.table import COLUMNS, empty_text, last_action_text, num, secs, sorted_rows, status, totals_text
from tuner.fleet.view import Fleet, Replica

HELP = """\
[b]tuner fleet[/b]: one row per sidecar Prometheus scrapes
  s / S    sort by the next / previous column (or click a header)
  r        reverse the order
  g        refresh now
  enter    the selected replica's detail
  ?        this help          q   quit

Latencies are percentiles from the histograms over the window (bucket resolution); headroom is the binding
memory limit's free share, by the sidecar's own rule.  Press escape to close."""


def detail_text(r: Replica, window: str) -> str:
    labels = "  ".join(f"{k}={v}" for k, v in sorted(r.labels.items()))
    lines = [f"[b]{escape(r.key)}[/b]  {status(r)}  {escape(labels)}",
             escape(f"tuner {r.version or '?'}, policy {r.policy or '?'}"), "",
             f"[b]requests[/b] (last {window}): {num(r.requests_per_second, '{:.2f}')} req/s, "
             f"{num(r.tokens_per_second)} tok/s",
             f"  TTFT p50 {secs(r.ttft_p50)}  p95 {secs(r.ttft_p95)}  p99 {secs(r.ttft_p99)}",
             f"  TPOT p95 {secs(r.tpot_p95)}  end-to-end p95 {secs(r.e2e_p95)}", "",
             "[b]memory limits[/b] (tightest first)"]  # fmt: skip
    for lim in r.limits:
        lines.append(f"  {escape(lim['describe'])}  ({lim['headroom']:.0%} free)")
    if not r.limits:
        lines.append("  no memory figures")
    if r.time_to_limit_seconds is not None:
        lines.append(f"  projected to reach it in {r.time_to_limit_seconds:.0f} s")
    lines += ["", f"[b]knobs[/b]  {escape(r.knobs_text() or 'none set')}"]
    if r.engine:
        lines.append("[b]engine[/b]  " + ", ".join(f"{k.removeprefix('engine_')} {v:g}"
                                                    for k, v in sorted(r.engine.items())))  # fmt: skip
    acts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.actions.items())) or "none"
    lines += ["", f"[b]actions[/b]  {escape(acts)}", f"  last: {escape(last_action_text(r))}"]
    if r.last_action:
        a = r.last_action
        lines.append(escape(f"  ({a['policy']} set {a['knob']}: {a['outcome']}, "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a['unix']))})"))  # fmt: skip
    lines.append(f"[b]OOM kills[/b]  {num(r.oom_kills, '{:.0f}')} so far, "
                 f"{num(r.oom_kills_window, '{:.0f}')} in the last {window}")  # fmt: skip
    return "\n".join(lines)


@dataclass
class FleetFetched(Message):
    fleet: Fleet


@dataclass
class FetchFailed(Message):
    error: str


@dataclass
class DetailFetched(Message):
    replica: Replica


class DetailScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "close", "close")]
    DEFAULT_CSS = """
    DetailScreen { align: center middle; }
    DetailScreen > Static { width: 100; max-width: 95%; height: auto; border: round $accent; padding: 0 1;
                            background: $surface; }
    """

    def __init__(self, text: str, key: str | None = None) -> None:
        super().__init__()
        self.text = text
        self.key = key
        """The replica shown (None: not a replica's detail)."""

    def compose(self) -> ComposeResult:
        yield Static(self.text, id="detail")

    def action_close(self) -> None:
        self.dismiss(None)


class HelpScreen(DetailScreen):
    def __init__(self) -> None:
        super().__init__(HELP)


class FleetApp(App[None]):
    """``FleetApp(fetch, refresh=5)``: ``fetch()`` returns a ``Fleet`` or raises with a one-line message."""

    TITLE = "tuner fleet"
    CSS = """
    Screen { layout: vertical; }
    #hdr { height: 2; padding: 0 1; background: $boost; }
    #table { height: 1fr; }
    #status { height: 1; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("s", "sort(1)", "sort"),
        Binding("S", "sort(-1)", "sort back", show=False),
        Binding("r", "reverse", "reverse"),
        Binding("g", "refresh_now", "refresh"),
        Binding("question_mark", "help", "help"),
    ]

    def __init__(self, fetch: Callable[[], Fleet], *, refresh: float = 5.0, sort: str = "replica",
                 reverse: bool = False, detail: Callable[[Replica], Replica] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.fetch = fetch
        self.detail = detail
        """Fills in what a refresh leaves out for one replica (``tuner.fleet.view.replica_detail``), on Enter."""
        self.refresh_s = refresh
        self.fleet: Fleet | None = None
        self.sort_key = sort
        self.reverse = reverse
        self.error: str | None = None
        self.fetched_at: float | None = None
        self.redraw_seconds: float | None = None
        self.redraws = 0
        self._wake = threading.Event()
        self._stopping = False

    def compose(self) -> ComposeResult:
        yield Static("asking Prometheus ...", id="hdr")
        table: DataTable[Any] = DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for c in COLUMNS:
            table.add_column(c.title, key=c.key)
        table.focus()
        self.poll()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def poll(self) -> None:
        worker = get_current_worker()
        while not (worker.is_cancelled or self._stopping):
            try:
                fleet = self.fetch()
            except Exception as exc:  # a one-line reason: Prometheus down, a bad query, a timeout
                self.post_message(FetchFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            else:
                self.post_message(FleetFetched(fleet))
            self._wake.wait(self.refresh_s)
            self._wake.clear()

    def on_unmount(self) -> None:
        self._stopping = True  # the poller leaves its wait now, not a refresh later (quitting would hang)
        self._wake.set()

    def on_fleet_fetched(self, msg: FleetFetched) -> None:
        self.fleet, self.error, self.fetched_at = msg.fleet, None, time.monotonic()
        self.redraw()

    def on_fetch_failed(self, msg: FetchFailed) -> None:
        self.error = msg.error
        self._status()

    def redraw(self) -> None:
        f = self.fleet
        if f is None:
            return
        started = time.perf_counter()
        table = self.query_one(DataTable)
        selected = self._selected_key()
        rows = sorted_rows(f.replicas, self.sort_key, self.reverse)
        texts = [[Text(c.cell(r), style="bold red" if c.key == "status" and status(r) == "down" else "")
                  for c in COLUMNS] for r in rows]  # fmt: skip
        # Columns sized here from the cells, not by DataTable's idle-time measuring: on a loaded CI machine
        # that measuring had not run 10 s after the rows came, and every cell showed cut to its title's width.
        widths = [max([len(c.title)] + [t[i].cell_len for t in texts]) for i, c in enumerate(COLUMNS)]
        table.clear(columns=True)
        for c, w in zip(COLUMNS, widths, strict=True):
            table.add_column(c.title, key=c.key, width=w)
        for r, cells in zip(rows, texts, strict=True):
            table.add_row(*cells, key=r.key)
        if selected is not None and selected in {r.key for r in rows}:
            table.move_cursor(row=table.get_row_index(selected))
        title = next(c.title for c in COLUMNS if c.key == self.sort_key)
        hdr = self.query_one("#hdr", Static)
        hdr.update(f"{f.prometheus}  window {f.window}  by {f.by}" + (f"  {{{f.match}}}" if f.match else "")
                   + f"  sorted by {title}{' (reversed)' if self.reverse else ''}\n" + totals_text(f))  # fmt: skip
        self.redraw_seconds = time.perf_counter() - started
        self.redraws += 1
        self._status()

    def _status(self) -> None:
        f = self.fleet
        parts = []
        if f is not None:
            parts.append(f"queried in {f.query_seconds * 1000:.0f} ms, drawn in "
                         f"{(self.redraw_seconds or 0) * 1000:.0f} ms; every {self.refresh_s:g} s")  # fmt: skip
        if f is not None and not f.replicas and not self.error:
            parts.append(empty_text(f))
        if self.error:
            parts.append(f"refresh failed: {self.error}" + (" (showing the last answer)" if f else ""))
        self.query_one("#status", Static).update(Text("  ".join(parts), style="red" if self.error else ""))

    def _selected_key(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:
            return None
        return str(key.value) if key.value is not None else None

    def action_sort(self, step: int) -> None:
        keys = [c.key for c in COLUMNS]
        self.sort_key = keys[(keys.index(self.sort_key) + step) % len(keys)]
        self.redraw()

    def action_refresh_now(self) -> None:
        self._wake.set()

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self.redraw()

    def on_data_table_header_selected(self, msg: DataTable.HeaderSelected) -> None:
        key = str(msg.column_key.value)
        if key == self.sort_key:
            self.reverse = not self.reverse
        else:
            self.sort_key, self.reverse = key, False
        self.redraw()

    def on_data_table_row_selected(self, msg: DataTable.RowSelected) -> None:
        f = self.fleet
        if f is None:
            return
        r = next((x for x in f.replicas if x.key == str(msg.row_key.value)), None)
        if r is not None:
            self.push_screen(DetailScreen(detail_text(r, f.window), r.key))
            if self.detail is not None:
                self.fetch_detail(r)

    @work(thread=True, group="detail", exit_on_error=False)
    def fetch_detail(self, r: Replica) -> None:
        assert self.detail is not None
        try:
            self.post_message(DetailFetched(self.detail(r)))
        except Exception as exc:  # the detail keeps what the last refresh had; the status line says why
            self.post_message(FetchFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))

    def on_detail_fetched(self, msg: DetailFetched) -> None:
        screen, f = self.screen, self.fleet
        if isinstance(screen, DetailScreen) and screen.key == msg.replica.key and f is not None:
            screen.query_one("#detail", Static).update(detail_text(msg.replica, f.window))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())
