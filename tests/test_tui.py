"""TUI: the pure model, then the app through Textual's pilot in replay, follow and live modes (every key),
then the ``tuner tui`` command's errors.  Assertions are on the text on screen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner
from tuner.link.observe import ObserverServer
from tuner.tui.app import TunerApp
from tuner.tui.model import Columns, Model
from tuner.tui.source import FileSource, QueueSource, SocketSource

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "synthetic-demo.jsonl"  # tests/helpers/make_synthetic_trace.py


def screen_text(app: TunerApp) -> str:
    """What the terminal shows, as plain text lines."""
    return "\n".join(s.text for s in app.screen._compositor.render_strips())


async def wait_for(pilot: Any, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time; screen:\n" + screen_text(pilot.app))
        await pilot.pause(0.05)


def run_app(app: TunerApp, scenario: Callable[[Any], Awaitable[None]], size: tuple[int, int] = (120, 40)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def header(**extra: Any) -> dict[str, Any]:
    h = {
        "k": "header",
        "schema": 1,
        "tool": "inference-tuner",
        "command": ["python", "serve.py"],
        "pid": 100,
        "interval_s": 0.1,
        "probes": {
            "cpu": {"available": True, "reason": None, "metrics": {}},
            "nvidia": {"available": False, "reason": "NVML: driver not loaded", "metrics": {}},
        },
    }
    h.update(extra)
    return h


def tick(t: float, **m: Any) -> dict[str, Any]:
    base = {"tree_cpu_ratio": 0.5, "sys_cpu_ratio": 0.25, "tree_rss_bytes": 100 << 20}
    base.update(m)
    return {"k": "tick", "t": t, "m": base, "p": {"100": {"name": "python", "rss_bytes": 1}}}


# -- model ------------------------------------------------------------------------------------------------


def test_columns_window_and_trim() -> None:
    c = Columns(capacity=16)
    for i in range(100):
        c.append(i / 10, {"a": i} if i % 2 == 0 else {"b": i})
    assert c.total == 100 and 16 <= c.n <= 32
    ts, vs = c.window("a", 9.0, 9.9)
    assert list(ts) == pytest.approx([9.0 + j / 10 for j in range(10)])
    assert np.isnan(vs[1::2]).all() and list(vs[::2]) == [90, 92, 94, 96, 98]
    assert c.latest("a", 9.95) == 98 and c.latest("b", 9.85) == 97
    assert c.latest("nope", 5) is None
    big = Columns(capacity=10_000_000)  # a replay's capacity: memory grows with the data, not up front
    assert big.times.nbytes <= 64 * 1024
    for i in range(10_000):
        big.append(float(i), {"x": i})
    ts, xs = big.window("x", 0, 1e9)
    assert len(ts) == 10_000 and xs[-1] == 9999 and xs[0] == 0


def test_model_applies_every_record_kind() -> None:
    m = Model()
    m.apply(header(targets={"req_seq_rep_4_ratio": [0.0, 0.1]}, policies=["memory"]))
    m.apply(tick(0.1, **{"gpu_mem_used_bytes/0": 1 << 30, "gpu_util_ratio/0": 0.5}))
    m.apply({"k": "skip", "t": 0.2, "n": 3})
    m.apply({"k": "event", "t": 0.3, "kind": "request", "data": {"id": "a", "ttft_seconds": 0.1}})
    m.apply({"k": "event", "t": 0.25, "kind": "request", "data": {"id": "b"}})  # out of order: sorted in
    m.apply({"k": "action", "t": 0.4, "policy": "latency", "knob": "batch_size", "value": 4})
    m.apply({"k": "note", "t": 0.5, "level": "warn", "msg": "viewer dropped 7 records", "n": 7})
    m.apply({"k": "note", "t": 0.6, "level": "info", "msg": "policy memory disabled from the live view"})
    m.apply({"k": "tick", "t": "bad"})  # malformed: skipped
    m.apply({"k": "end", "t": 1.0, "exit_code": 0})
    assert [d.title for d in m.devices()] == ["CPU", "RAM", "GPU 0"]
    assert m.missing_devices() == ["no NPU: no NPU metrics in this trace"]
    assert m.skipped == 3 and m.dropped == 7
    assert [r["id"] for r in m.requests_until(1.0, 10)] == ["b", "a"]
    assert m.policies == {"memory": False, "latency": True}
    assert m.rep_band() == ((0.0, 0.1), True)
    assert m.next_action_after(0.0) == 0.4 and m.next_action_after(0.4) is None
    assert m.last_t == 1.0 and m.command() == "python serve.py"


def test_model_missing_reasons_and_trend() -> None:
    m = Model()
    m.apply(header())
    for i in range(600):
        m.apply(tick(i / 10, tree_rss_bytes=1000 + 50 * i))  # +500 bytes per second
    assert m.missing_devices()[0] == "no GPU: NVML: driver not loaded"
    slope, _ = m.trend("tree_rss_bytes", 0, 60) or (0, 0)
    assert slope == pytest.approx(500, rel=1e-6)
    ttft = next(c for c in m.charts() if c.id == "ttft")
    assert "no request data" in m.why_empty(ttft)
    knobs = next(c for c in m.charts() if c.id == "knobs_t")
    assert "no policy running" in m.why_empty(knobs)


# -- replay (a finished trace file) ---------------------------------------------------------------------


def replay_app() -> TunerApp:
    return TunerApp(FileSource(FIXTURE), clock=lambda: 0.0)  # frozen clock: the playhead moves only by keys


def test_replay_loads_and_scrubs() -> None:
    app = replay_app()

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)
        await pilot.pause(0.3)
        s = screen_text(app)
        assert "REPLAY" in s and "SYNTHETIC" in s and "tests/helpers/make_synthetic" in s
        assert "00:00 / 03:00" in s
        assert "no GPU: NVML library not found" in s and "no NPU: npu-smi not found" in s
        await pilot.press("end")
        await pilot.pause(0.2)
        s = screen_text(app)
        assert "03:00 / 03:00" in s and "up 03:00" in s
        assert "RSS 447.9M" in s  # the memory chart's latest value at the end of the trace
        rows = [ln for ln in s.splitlines() if "→" in ln]
        assert "02:45" in rows[0] and "memory" in rows[0] and "precision fp32→bf16" in rows[0]  # newest first
        await pilot.press("home")
        await pilot.press("right")
        await pilot.pause(0.2)
        assert "00:09 / 03:00" in screen_text(app)
        await pilot.press("left")
        await pilot.pause(0.2)
        assert "00:00 / 03:00" in screen_text(app)

    run_app(app, go)


def test_replay_next_action_speed_and_pause() -> None:
    app = replay_app()

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)
        await pilot.press("n")
        await pilot.pause(0.2)
        s = screen_text(app)
        assert "action at 00:42: repetition repetition_penalty" in s and "00:42 / 03:00" in s
        assert "repetition_penalty 1→1.15" in s  # the action is now in the log
        assert "memory" not in s.split("Actions")[1].split("\n")[2]  # only the first action so far
        await pilot.press("n")
        await pilot.pause(0.2)
        assert "01:15 / 03:00" in screen_text(app)
        await pilot.press("right_square_bracket", "right_square_bracket")
        await pilot.pause(0.2)
        assert "▶ 4x" in screen_text(app)
        for _ in range(6):
            await pilot.press("left_square_bracket")
        await pilot.pause(0.2)
        assert "▶ 0.5x" in screen_text(app)
        await pilot.press("p")
        await pilot.pause(0.2)
        s = screen_text(app)
        assert "⏸ 0.5x" in s and "PAUSED" in s
        await pilot.press("d")
        await pilot.pause(0.2)
        assert "cannot change policy repetition: replay" in screen_text(app)

    run_app(app, go)


def test_replay_plays_with_the_clock() -> None:
    now = [0.0]
    app = TunerApp(FileSource(FIXTURE), clock=lambda: now[0], redraw_interval=0.05)

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)
        await pilot.press("right_square_bracket")  # 2x
        now[0] += 10.0  # ten seconds of wall clock at 2x: twenty seconds of trace
        await pilot.pause(0.3)
        assert "00:20 / 03:00" in screen_text(app)
        now[0] += 1000.0
        await pilot.pause(0.3)
        s = screen_text(app)
        assert "03:00 / 03:00" in s and "end of trace" in s

    run_app(app, go)


def test_window_help_metrics_focus_quit() -> None:
    app = replay_app()

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)
        assert "window 1m" in screen_text(app)
        await pilot.press("plus")
        await pilot.pause(0.1)
        assert "window 2m" in screen_text(app)
        await pilot.press("minus", "minus")
        await pilot.pause(0.1)
        assert "window 30s" in screen_text(app)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        assert "jump to the next action" in screen_text(app)
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert "jump to the next action" not in screen_text(app)
        assert "Memory" in screen_text(app)
        await pilot.press("m")
        await pilot.pause(0.2)
        assert "charts (space toggles" in screen_text(app)
        await pilot.press("space")  # the first entry: Memory
        await pilot.press("escape")
        await pilot.pause(0.3)
        s = screen_text(app)
        assert "7 of 8 charts shown" in s and "Memory " not in s
        assert "focus: body" in s
        await pilot.press("tab")
        await pilot.pause(0.2)
        assert "focus: actions" in screen_text(app)
        await pilot.press("tab")
        await pilot.pause(0.2)
        assert "focus: requests" in screen_text(app)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert not app.is_running

    run_app(app, go)


def test_small_terminal_80x24() -> None:
    app = replay_app()

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)
        await pilot.press("end")
        await pilot.pause(0.3)
        lines = screen_text(app).splitlines()
        assert len(lines) == 24 and all(len(ln) <= 80 for ln in lines)
        s = "\n".join(lines)
        assert "REPLAY" in s and "CPU tree" in s and "RAM rss" in s and "no GPU:" in s
        assert "Memory" in s and "03:00 / 03:00" in s and "q quit" in s

    run_app(app, go, size=(80, 24))


def test_a_timer_tick_during_shutdown_draws_nothing() -> None:
    """Textual stops the app (is_running False) and prunes the screen's widgets before it stops the
    app's own timers, so one redraw tick can land on a screen without '#hdr' (CI, Python 3.13).  That
    tick must be a no-op, not a NoMatches that fails the session on exit."""
    app = replay_app()

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)

    run_app(app, go, size=(80, 24))
    assert not app.is_running
    drawn = app.redraws
    app._tables_stale = True
    app._on_timer()  # the widgets are gone: before the guard this raised NoMatches('#hdr')
    app.redraw(force=True)
    assert app.redraws == drawn


def test_large_terminal_160x48_uses_the_whole_screen() -> None:
    """At 160x48 the charts grow into the space (three columns, taller than the 7-row minimum) and the
    tables reach down to the scrubber: no empty band at the bottom.  Integer knobs print as integers."""
    app = replay_app()

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: app.loaded)
        await pilot.press("end")
        await pilot.pause(0.3)
        lines = screen_text(app).splitlines()
        assert len(lines) == 48
        blank = [i for i, ln in enumerate(lines) if not ln.strip()]
        assert blank == [], f"empty rows {blank}:\n" + "\n".join(lines)
        mem = app.query_one("#chart-memory")
        assert mem.size.height >= 9 and mem.size.width >= 46
        assert app.query_one("#tables").region.bottom == 48 - 3  # right above scrubber, status, footer
        last = app.query_one("#chart-knobs_b")  # the 8th chart of 3 columns spans the rest of its row
        assert last.region.right >= 158
        s = "\n".join(lines)
        assert "batch 4  bits 16b" in s and "temp 0.9  pen 1.15" in s
        assert not any(x in s for x in ("4.00", "0.90", "1.76")), s  # no 16.00-style integers, axis on whole numbers
        # fewer charts shown: the others grow
        await pilot.press("m", "space", "escape")
        await pilot.pause(0.3)
        assert app.query_one("#chart-util").size.height > mem.size.height

    run_app(app, go, size=(160, 48))


@pytest.mark.parametrize(
    ("v", "unit", "shown"),
    [(16.0, "value", "16"), (16, "value", "16"), (0.9, "value", "0.9"), (1.15, "value", "1.15"),
     (38.35, "value", "38.4"), (288.4, "value", "288"), (0.0, "value", "0"), (None, "value", "-")],
)
def test_values_print_integers_as_integers(v: float | None, unit: str, shown: str) -> None:
    from tuner.tui.model import fmt_value

    assert fmt_value(v, unit) == shown


def test_integer_chart_axis_ends_on_whole_numbers() -> None:
    from tuner.tui.widgets import y_range

    spec = next(c for c in Model().charts() if c.id == "knobs_b")
    lo, hi = y_range(spec, [np.array([4.0, 8.0, 32.0])]) or (0.0, 0.0)
    assert lo == int(lo) and hi == int(hi) and lo < 4 and hi > 32


def test_layout_for_terminal_sizes() -> None:
    from tuner.tui.app import layout_for

    assert layout_for(80, 24, 8, True) == (2, 7, 8)  # the smallest charts; the body scrolls
    cols, chart, tables = layout_for(160, 48, 8, True)
    assert cols == 3 and chart * 3 + tables == 48 - 8  # every row of the body used
    assert layout_for(220, 60, 8, False)[0] == 4


# -- following a growing file ----------------------------------------------------------------------------


def test_follow_growing_file(tmp_path: Path) -> None:
    from tuner.trace import TraceWriter

    path = tmp_path / "grow.jsonl"
    w = TraceWriter(path, header())
    w.tick(0.1, tick(0.1, tree_cpu_ratio=0.5)["m"])
    w.flush()
    app = TunerApp(FileSource(path), redraw_interval=0.05)

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: "tree 0.50c" in screen_text(app))
        s = screen_text(app)
        assert "FOLLOW" in s and "following grow.jsonl" in s
        for i in range(2, 30):
            w.tick(i / 10, tick(i / 10, tree_cpu_ratio=1.75)["m"])
        w.flush()
        await wait_for(pilot, lambda: "tree 1.75c" in screen_text(app))
        await pilot.press("d")
        await pilot.pause(0.1)
        assert "no policy selected" in screen_text(app)
        w.end(3.0)
        w.close()
        await pilot.pause(0.3)
        assert app.model.end is not None

    run_app(app, go)


# -- live (a queue in tests, a real observer socket below) ---------------------------------------------


def test_live_numbers_pause_and_policy_command() -> None:
    src = QueueSource([header(), tick(0.1, tree_cpu_ratio=0.5)])
    app = TunerApp(src, redraw_interval=0.05)

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: "tree 0.50c" in screen_text(app))
        s = screen_text(app)
        assert "LIVE" in s and "no GPU: NVML: driver not loaded" in s
        assert "no request data yet:" in s and "no knob values:" in s
        await pilot.press("p")
        src.put(tick(0.2, tree_cpu_ratio=1.25))
        await pilot.pause(0.3)
        s = screen_text(app)
        assert "PAUSED" in s and "tree 0.50c" in s  # frozen view while paused
        await pilot.press("p")
        await wait_for(pilot, lambda: "tree 1.25c" in screen_text(app))
        src.put(
            {
                "k": "action",
                "t": 0.3,
                "policy": "temperature",
                "knob": "temperature",
                "value": 0.7,
                "previous": 1.0,
                "outcome": "applied",
                "reason": "loops",
                "evidence": {},
                "result": {},
            }
        )
        src.put(tick(0.4))
        await wait_for(pilot, lambda: "temperature 1→0.7" in screen_text(app))
        await pilot.press("d")
        await pilot.pause(0.1)
        assert src.sent == [{"cmd": "policy", "name": "temperature", "enabled": False}]
        s = screen_text(app)
        assert "sent: disable policy temperature" in s and "policies: temperature off" in s
        await pilot.press("d")
        assert src.sent[-1] == {"cmd": "policy", "name": "temperature", "enabled": True}
        for key in ("n", "left_square_bracket"):
            await pilot.press(key)
            await pilot.pause(0.1)
            assert "only in a replay" in screen_text(app)

    run_app(app, go)


def test_live_gpu_panel_and_requests() -> None:
    recs: list[dict[str, Any]] = [header()]
    for i in range(1, 50):
        recs.append(
            tick(
                i / 10,
                **{
                    "gpu_mem_used_bytes/0": 2 << 30,
                    "gpu_mem_total_bytes/0": 8 << 30,
                    "gpu_util_ratio/0": 0.42,
                    "req_ttft_p50_seconds": 0.2,
                },
            )
        )
    recs.append(
        {
            "k": "event",
            "t": 4.0,
            "kind": "request",
            "data": {"id": "req-9", "ttft_seconds": 0.123, "tokens": 77, "seq_rep_4": 0.05, "loop": True},
        }
    )
    app = TunerApp(QueueSource(recs), redraw_interval=0.05)

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: "GPU 0" in screen_text(app))
        await pilot.pause(0.2)
        s = screen_text(app)
        assert "GPU 0 util 42%  2.0G/8.0G" in s and "no GPU" not in s
        assert "gpu0" in s  # a series in the memory and utilization charts
        await wait_for(pilot, lambda: "req-9" in screen_text(app))  # the table is rebuilt at most 1/s when live
        s = screen_text(app)
        assert "123ms" in s and "loop" in s

    run_app(app, go)


@pytest.mark.parametrize("attributed", [True, False])
def test_gpu_panel_shows_the_trees_memory_or_the_clients_labelled(attributed: bool) -> None:
    """The tree's own memory on the GPU beside the device's; where NVML could not attribute it (the key
    recorded as missing), the client's allocator report, labelled "client alloc" — never a 0."""
    recs: list[dict[str, Any]] = [header()]
    for i in range(1, 30):
        recs.append(tick(i / 10, **{"gpu_mem_used_bytes/0": 6 << 30, "gpu_mem_total_bytes/0": 8 << 30,
                                    "gpu_util_ratio/0": 0.5, "gpu_tree_mem_bytes/0": (3 << 30) if attributed else None,
                                    "alloc_reserved_bytes": 1 << 30}))
    app = TunerApp(QueueSource(recs), redraw_interval=0.05)

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: "GPU 0" in screen_text(app))
        await pilot.pause(0.2)
        s = screen_text(app)
        if attributed:
            assert "tree 3.0G" in s and "client alloc" not in s, s
        else:
            line = next(x for x in s.splitlines() if "client alloc" in x)
            assert "client alloc 1.0G" in line and "tree" not in line.split("75%")[1], s

    run_app(app, go)


def test_live_socket_end_to_end(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    srv = ObserverServer(path)
    srv.start()
    srv.publish(header())
    for i in range(1, 20):
        srv.publish(tick(i / 10, tree_cpu_ratio=0.33))
    srv.publish(
        {
            "k": "action",
            "t": 2.0,
            "policy": "memory",
            "knob": "cleanup",
            "value": "gc",
            "previous": None,
            "outcome": "applied",
            "reason": "leak",
            "evidence": {},
            "result": {},
        }
    )
    app = TunerApp(SocketSource(path), redraw_interval=0.05)

    async def go(pilot: Any) -> None:
        await wait_for(pilot, lambda: "tree 0.33c" in screen_text(app) and "cleanup" in screen_text(app))
        srv.publish(tick(2.1, tree_cpu_ratio=1.5))
        await wait_for(pilot, lambda: "tree 1.50c" in screen_text(app))
        await pilot.press("d")
        deadline = time.monotonic() + 3
        cmds: list[dict[str, Any]] = []
        while not cmds and time.monotonic() < deadline:
            cmds = srv.drain_commands()
            await pilot.pause(0.05)
        assert cmds == [{"cmd": "policy", "name": "memory", "enabled": False}]
        srv.close()  # the session goes away: the app says so and keeps showing the data
        await wait_for(pilot, lambda: "the session closed the live feed" in screen_text(app))
        assert "tree 1.50c" in screen_text(app)

    try:
        run_app(app, go)
    finally:
        srv.close()


# -- the command -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (("tui", "/nonexistent/trace.jsonl"), "no such file"),
        (("tui", "--connect", "/nonexistent/obs.sock"), "no such socket"),
        (("tui",), "give either a TRACE file or --connect SOCKET"),
        (("tui", str(ROOT / "tuner")), "is a directory"),
        (("tui", str(ROOT / "pyproject.toml")), "not an inference-tuner trace"),
        (("tui", "--connect", str(ROOT / "pyproject.toml")), "cannot connect to"),
    ],
)
def test_cli_errors_are_one_line(args: tuple[str, ...], msg: str) -> None:
    cp = tuner(*args, timeout=60)
    assert msg in assert_one_line_error(cp)
