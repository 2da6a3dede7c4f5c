"""SVG snapshots of the dashboard at 80x24 and 160x48, fed by the synthetic fixture
(tests/data/synthetic-demo.jsonl, tests/helpers/make_synthetic_trace.py) with a frozen clock (the replay
playhead moves only by keys).  Update with ``pytest tests/test_tui_snapshots.py --snapshot-update`` after
checking the diff report; look at the pictures too (``rsvg-convert -w 1600 X.svg -o X.png``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tuner.tui.app import TunerApp
from tuner.tui.source import FileSource

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "synthetic-demo.jsonl"


def frozen_app() -> TunerApp:
    return TunerApp(FileSource(FIXTURE), clock=lambda: 0.0, redraw_interval=0.05)


async def loaded(pilot: Any, *keys: str) -> None:
    deadline = time.monotonic() + 20
    while not pilot.app.loaded:
        assert time.monotonic() < deadline, "trace did not load"
        await pilot.pause(0.05)
    await pilot.press(*keys)
    # settle: no redraw for two consecutive looks (a loaded machine can be slow to lay out)
    seen = -1
    while seen != pilot.app.redraws:
        seen = pilot.app.redraws
        await pilot.pause(0.4)
    await pilot.wait_for_scheduled_animations()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_dashboard_end_of_trace(snap_compare: Any, size: tuple[int, int]) -> None:
    async def before(pilot: Any) -> None:
        await loaded(pilot, "end")

    assert snap_compare(frozen_app(), terminal_size=size, run_before=before)


def test_dashboard_at_first_action_160x48(snap_compare: Any) -> None:
    async def before(pilot: Any) -> None:
        await loaded(pilot, "n")

    assert snap_compare(frozen_app(), terminal_size=(160, 48), run_before=before)

