"""``tuner demo --workload``: shaped request streams set against the capacity the demo measures at the start
(issue 14) — run as a user runs them, read back from the trace and the workload's own summary."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner, tuner_env
from tuner.trace import read_trace

# tuner demo and its workload run the built-in torch model; CI runs the fast suite on the oldest and newest Python
# without the torch extra
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (the torch extra)")


def workload_summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{") and '"workload"' in ln]
    assert lines, stdout
    return json.loads(lines[-1])


def arrivals(trace: Path) -> tuple[np.ndarray, list[dict]]:
    """Arrival times (trace time: end - e2e) of the finished requests, sorted, and the requests."""
    reqs = [dict(e.data, t=e.t) for e in read_trace(trace).requests()]
    return np.sort(np.array([r["t"] - r["e2e_seconds"] for r in reqs])), reqs


@needs_torch
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "sawtooth"], "invalid choice: 'sawtooth'"),
        (["--workload", "step", "--rate", "3"], "--rate sets the steady workload"),
        (["--capacity", "4"], "--capacity sets the shaped workloads' rates"),
        (["--workload", "burst", "--capacity", "0"], "--capacity 0 must be more than 0"),
        (["--workload", "ramp", "--capacity", "nan"], "not a finite number"),
        (["--serve", "--workload", "mix"], "--workload drives the built-in workload"),
    ],
)
def test_bad_workload_options_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    cp = tuner("demo", "--headless", "--trace", str(tmp_path / "t.jsonl"), *args, timeout=60)
    assert message in assert_one_line_error(cp)
    assert not (tmp_path / "t.jsonl").exists()  # refused before anything started


@needs_torch
def test_step_rises_to_over_capacity_in_the_middle_third_and_falls_back(tmp_path: Path) -> None:
    """Capacity pinned at 4 requests/s: 2/s (0.5x), then 5.2/s (1.3x) over the middle third, then 2/s."""
    trace = tmp_path / "step.jsonl"
    cp = tuner("demo", "--headless", "--workload", "step", "--capacity", "4", "--duration", "30", "--seed", "3",
               "--trace", str(trace), timeout=300)
    assert cp.returncode == 0, cp.stderr
    own = workload_summary(cp.stdout)
    assert own["shape"] == "step" and own["capacity_rps"] == 4 and own["capacity_measured"] is False
    assert own["requests_arrived"] == own["requests_done"] + own["requests_rejected"] + own["requests_failed"]
    assert "capacity 4 requests/s (given)" in cp.stderr
    t, _ = arrivals(trace)
    t = t - t[0]
    thirds = [int(np.sum((t >= a) & (t < a + 10))) for a in (0, 10, 20)]
    assert 1.6 * max(thirds[0], thirds[2]) < thirds[1] < 4.5 * min(thirds[0], thirds[2]), thirds
    assert 60 <= sum(thirds) <= 130, thirds  # 2*10 + 5.2*10 + 2*10 = 92 expected


@needs_torch
def test_mix_shifts_to_long_prompts_in_the_second_half(tmp_path: Path) -> None:
    trace = tmp_path / "mix.jsonl"
    cp = tuner("demo", "--headless", "--workload", "mix", "--capacity", "3", "--duration", "20", "--seed", "4",
               "--trace", str(trace), timeout=300)
    assert cp.returncode == 0, cp.stderr
    t, reqs = arrivals(trace)
    mid = t[0] + 10.0
    first = [r["prompt_tokens"] for r in reqs if r["t"] - r["e2e_seconds"] < mid]
    second = [r["prompt_tokens"] for r in reqs if r["t"] - r["e2e_seconds"] >= mid]
    assert first and second
    assert max(first) <= 49 and min(second) >= 60, (max(first), min(second))  # bytes + BOS; 16-48 vs 120-160


@needs_torch
def test_capacity_is_measured_at_the_start_when_not_given() -> None:
    """No sidecar needed: the workload alone measures its capacity and shapes the stream with it."""
    cp = subprocess.run([sys.executable, "-m", "tuner.demo.workload", "--workload", "burst", "--duration", "6",
                         "--max-new-tokens", "24"], capture_output=True, text=True, env=tuner_env(), timeout=180)
    assert cp.returncode == 0, cp.stderr
    own = workload_summary(cp.stdout)
    assert own["capacity_measured"] is True and own["capacity_rps"] > 0.5
    assert float(f"{own['capacity_rps']:.3g}") == own["capacity_rps"]  # as printed: --capacity reproduces it
    assert f"capacity {own['capacity_rps']:g} requests/s (measured over 4 batches of 8" in cp.stderr


@needs_torch
def test_the_same_capacity_and_seed_give_the_same_stream() -> None:
    """What pairs a cell's runs: ``--capacity C --seed S`` arrives the same requests at the same moments (the
    prompts and lengths too), whatever the server does with them."""
    def run(batch: str) -> dict:
        cp = subprocess.run([sys.executable, "-m", "tuner.demo.workload", "--workload", "ramp", "--capacity", "13.7",
                             "--seed", "5", "--duration", "5", "--max-new-tokens", "8", "--batch-size", batch],
                            capture_output=True, text=True, env=tuner_env(), timeout=180)
        assert cp.returncode == 0, cp.stderr
        return workload_summary(cp.stdout)

    a, b = run("8"), run("2")
    assert a["requests_arrived"] == b["requests_arrived"] > 20
    assert a["capacity_rps"] == b["capacity_rps"] == 13.7


@needs_torch
def test_shapes_follow_their_definitions() -> None:
    from tuner.commands.demo import WORKLOADS as CLI_WORKLOADS
    from tuner.demo.workload import OVER, UNDER, WORKLOADS, shape_mean, shape_peak, shape_rate

    assert CLI_WORKLOADS == WORKLOADS
    assert (OVER, UNDER) == (1.3, 0.5)
    c, period = 10.0, 100.0  # a whole number of 20 s burst cycles
    grid = np.linspace(0.0, period, 9001)[:-1]
    for shape in WORKLOADS[1:]:
        rates = np.array([shape_rate(shape, t, period, c) for t in grid])
        assert rates.max() <= shape_peak(shape, c) + 1e-9
        assert abs(rates.mean() - shape_mean(shape, c)) < 0.02 * c, shape
    assert shape_rate("ramp", 0.0, period, c) == pytest.approx(5.0)
    assert shape_rate("ramp", 50.0, period, c) == pytest.approx(13.0)
    assert [shape_rate("step", t, period, c) for t in (10, 50, 90)] == [5.0, 13.0, 5.0]
    assert [shape_rate("burst", t, period, c) for t in (2, 12, 22)] == [26.0, 5.0, 26.0]
