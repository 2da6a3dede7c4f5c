"""Agent cost (issue: Policies): one tick with all four policies over a full window <= 200 us median;
replay >= 100k ticks/s.

- The tick: the ``interactive`` preset (temperature, batch size, precision, cleanup) after the window is
  full (3,000 ticks, 4,096 requests), on a 10 Hz stream of the simulator (one response every ~5 ticks,
  a slow leak).  Two cases: as configured (each policy decides once a second, and at once on events),
  and the worst case where every policy decides on every tick.  Baseline in the same run: the window
  update alone (the floor the agent adds to).
- Replay: ticks per second of CPU time through ``tuner.commands.replay.replay`` (dry run, knob columns)
  over 20,000 preloaded ticks, and with the JSON parsing of a recorded trace included.

Size: ``TUNER_BENCH_TICKS`` (default 20,000).
Run: ``.venv/bin/pytest tests/bench/test_bench_agent.py -m bench --benchmark-enable -s``
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/bench has no __init__: make `tests` importable

from tests.replay.sim import Sim
from tuner.commands.replay import Recording, ReplayTick, load, replay
from tuner.core.actuator import DryRunActuator
from tuner.core.policy_config import build_agent, load_policy
from tuner.core.window import Window

N = int(os.environ.get("TUNER_BENCH_TICKS", "20000"))
FIXTURE = Path(__file__).resolve().parents[1] / "replay" / "interactive.jsonl"


def stream(n: int) -> list[Any]:
    sim = Sim(seed=1, temperature=0.3, tokens_per_request=96, leak_per_request=1e5)
    return [sim.tick() for _ in range(n)]


def per_tick_us(step: Any, ticks: list[Any]) -> list[float]:
    out = []
    for tk in ticks:
        t = time.perf_counter_ns()
        step(tk)
        out.append((time.perf_counter_ns() - t) / 1e3)
    return out


@pytest.mark.bench
@pytest.mark.parametrize("every_tick", [False, True], ids=["as-configured", "every-policy-every-tick"])
def test_agent_tick_over_a_full_window(every_tick: bool, benchmark: Any) -> None:
    ticks = stream(3000 + 4000)
    agent = build_agent(load_policy("interactive"), DryRunActuator(), None)
    assert len(agent.policies) == 4 and all(agent.enabled.values())
    if every_tick:
        for p in agent.policies:
            p.interval_s = 0.0
    for tk in ticks[:3000]:
        agent.step(tk)
    assert agent.window.times.count >= agent.window.capacity  # the window is full
    rest = iter(ticks[3000:])
    times = per_tick_us(agent.step, ticks[3000:6000])
    floor = Window(keys=agent.window.series.keys(), prefixes=("gpu_mem_", "npu_mem_"))
    floor_us = per_tick_us(lambda tk: floor.update(tk.t, tk.values, tk.events), ticks[:3000])
    med, floor_med = statistics.median(times), statistics.median(floor_us)
    p95 = sorted(times)[int(0.95 * len(times))]
    print(
        f"\nagent tick ({'every tick' if every_tick else 'as configured'}): median {med:.1f} us, p95 {p95:.1f} us, "
        f"mean {statistics.fmean(times):.1f} us; window update alone {floor_med:.1f} us "
        f"(ratio {med / floor_med:.1f}x)"
    )
    benchmark.pedantic(lambda: agent.step(next(rest)), rounds=900, iterations=1)
    assert med <= 200.0


@pytest.mark.bench
def test_replay_ticks_per_second(benchmark: Any) -> None:
    ticks = [ReplayTick(tk.t, tk.values, tk.events) for tk in stream(N)]
    rec = Recording({}, ticks, [], [], None, [])
    cfg = load_policy("interactive")
    replay(rec, cfg)  # warm-up (imports, first allocation)

    def best(fn: Any, repeats: int = 3) -> float:
        out = []
        for _ in range(repeats):
            t = time.process_time()
            fn()
            out.append(time.process_time() - t)
        return min(out)

    rate = N / best(lambda: replay(rec, cfg))
    parse = load(str(FIXTURE))
    with_parse = len(parse.ticks) / best(lambda: replay(load(str(FIXTURE)), cfg))
    parse_only = len(parse.ticks) / best(lambda: load(str(FIXTURE)))
    print(
        f"\nreplay: {rate:,.0f} ticks/s of CPU time (10 Hz stream, 4 policies); with JSON parsing of "
        f"{FIXTURE.name}: {with_parse:,.0f} ticks/s (parsing alone {parse_only:,.0f} ticks/s)"
    )
    benchmark.pedantic(lambda: replay(rec, cfg), rounds=1, iterations=1)
    assert rate >= 100_000
