"""``tuner report --html`` on a 1-hour 10 Hz trace: goal <= 5 s (issue: Offline analysis).

The trace: 36,000 ticks of CPU/GPU/knob metrics, a request every 0.25 s (14,400 request events) and a knob
move every 30 s (240 actions), written with the real ``TraceWriter`` (``tests/test_report.make_trace``).
Baselines in the same run: ``tuner report --json`` on the same trace (read + summarize, no plots) and
``python -c pass`` (interpreter start).  Figures are CPU seconds of the child (``RUSAGE_CHILDREN``): eight
agents share two cores here and wall time measured the neighbours; wall time is printed too.

Length: ``TUNER_BENCH_TRACE_SECONDS`` (default 3600).
Run: ``.venv/bin/pytest tests/bench/test_bench_report.py -m bench --benchmark-enable -s``
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/bench has no package marker
from tests.cli import ROOT, tuner_env
from tests.test_report import MiB, make_trace

SECONDS = float(os.environ.get("TUNER_BENCH_TRACE_SECONDS", "3600"))


def run_child(*args: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    cp = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=tuner_env(), cwd=ROOT)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert cp.returncode == 0, cp.stderr
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


@pytest.mark.bench
def test_report_html_on_an_hour_at_10hz(benchmark: Any, tmp_path: Path) -> None:
    trace = make_trace(tmp_path / "hour.jsonl", seconds=SECONDS, leak_bytes_per_s=0.05 * MiB)
    out = tmp_path / "hour.html"

    def best(*args: str) -> tuple[float, float]:
        runs = [run_child(*args) for _ in range(2)]
        return min(r[0] for r in runs), min(r[1] for r in runs)

    html_cpu, html_wall = best("-m", "tuner", "report", str(trace), "--html", str(out))
    json_cpu, _ = best("-m", "tuner", "report", "--json", str(trace))
    start_cpu, _ = best("-c", "pass")
    benchmark.pedantic(run_child, args=("-m", "tuner", "report", str(trace), "--html", str(out)), rounds=1)
    size = out.stat().st_size
    print(f"\ntuner report --html, {SECONDS:.0f} s at 10 Hz ({trace.stat().st_size / 1e6:.0f} MB trace): "
          f"{html_cpu:.2f} s CPU ({html_wall:.2f} s wall), goal <= 5 s; --json alone {json_cpu:.2f} s CPU "
          f"({html_cpu / json_cpu:.2f}x); interpreter start {start_cpu:.2f} s; HTML {size / 1e6:.2f} MB")  # fmt: skip
    benchmark.extra_info.update(html_cpu_s=html_cpu, html_wall_s=html_wall, json_cpu_s=json_cpu, html_bytes=size)
    assert html_cpu <= 5.0
    assert size < 5_000_000  # decimated plots: an hour must not make a page browsers choke on
