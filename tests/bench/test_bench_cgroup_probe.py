"""The cgroup probe's cost per tick at 10 Hz, with the CPU probe's in the same run as the baseline.

A 10 Hz tick reads the usage file (kept open); every tenth also reads ``memory.stat``, the limits up the
hierarchy, the OOM counters, CPU, pids and PSI (the 1 s cadence).  The clock the probe sees advances 0.1 s a
call, so the mean over many calls is the mean cost of a tick at 10 Hz, slow reads included (CPU time of this
process, median of 5 rounds).  The CPU probe
(one process, every value read every call) runs alternately in the same rounds.

Goal (issue 13): <= 30 us per tick, mean over the 1 s cadence.

Run: ``.venv/bin/pytest tests/bench/test_bench_cgroup_probe.py -m bench --benchmark-enable -s``
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import pytest

from tests.bench.goals import judge
from tuner.probes.cgroup import CgroupProbe
from tuner.probes.cpu import CpuProbe

GOAL_US = 30.0


class TenHz:
    """A clock that moves 0.1 s every time it is read (one tick at 10 Hz per sample)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.1
        return self.t


def mean_us(fn: Any, n: int) -> float:
    """CPU time per call (this process's): what a tick costs, not how long the host's other jobs kept it
    waiting (load 9-13 on 2 cores during the issue-13 runs)."""
    t = time.process_time_ns()
    for _ in range(n):
        fn()
    return (time.process_time_ns() - t) / n / 1e3


@pytest.mark.bench
def test_cgroup_probe_tick_cost(benchmark: Any) -> None:
    probe = CgroupProbe(os.getpid(), clock=TenHz())
    if probe.available() is not None:
        pytest.skip(f"no cgroup to read here: {probe.available()}")
    cpu = CpuProbe([os.getpid()], min_window_s=0.0)
    n = int(os.environ.get("TUNER_BENCH_CALLS", "2000"))  # a multiple of 10: whole 1 s cadences
    rounds = 5
    cg: list[float] = []
    base: list[float] = []
    now = [0.0]

    def cg_tick() -> None:
        now[0] += 0.1
        probe.sample(now[0])

    def cpu_tick() -> None:
        cpu.sample(0.0)

    try:
        cg_tick()
        for _ in range(rounds):  # alternate so both see the same load
            cg.append(mean_us(cg_tick, n))
            base.append(mean_us(cpu_tick, n))
        v = probe.sample(1e6).values
        assert v["cgroup_mem_usage_bytes"] and v["cgroup_mem_working_set_bytes"] is not None
        med, med_base = statistics.median(cg), statistics.median(base)
        info = {
            "cgroup_tick_mean_us": round(med, 2),
            "cgroup_rounds_us": [round(x, 2) for x in cg],
            "cpu_probe_tick_us": round(med_base, 2),
            "cgroup_over_cpu_probe": round(med / med_base, 3),
            "goal_us": GOAL_US,
        }
        benchmark.extra_info.update(info)
        benchmark.pedantic(cg_tick, rounds=200, iterations=10)
        print(f"\ncgroup probe per 10 Hz tick: {info}")
        judge(
            "cgroup probe, mean per 10 Hz tick (1 s reads included) <= 30 us",
            med <= GOAL_US,
            f"{med:.1f} us (rounds {info['cgroup_rounds_us']}); CPU probe {med_base:.1f} us in the same run "
            f"({med / med_base:.2f}x)",
        )
    finally:
        probe.close()
        cpu.close()
