"""Trace I/O: goal >= 200k records/s written, >= 5M metric values/s read into numpy (issue: Foundation).

Baselines in the same run: writing the same records with plain ``json.dumps`` + one ``f.write`` per
batch, and reading the same file with plain ``json.loads`` per line (no columns built).  The trace module
encodes and parses with orjson (bytes straight to ``os.write``, no per-record dict copies; reading groups
ticks by key layout and converts each group to numpy in one call), so both ratios are below 1 now:
measured here 0.30x the time of json.dumps for writing (was 1.17x) and 0.7-0.8x the time of json.loads
alone for reading into numpy (was 2.05x).  The writer's
figure is records per second with a flush every 100 records (the sampler flushes once per tick; the
per-tick flush cost is measured separately).  Records: CPU-probe-sized ticks (14 metrics, 2 processes).

Size: ``TUNER_BENCH_RECORDS`` (default 50,000).
Run: ``.venv/bin/pytest tests/bench/test_bench_trace.py -m bench --benchmark-enable -s``
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tuner.trace import TraceWriter, make_header, read_trace

N = int(os.environ.get("TUNER_BENCH_RECORDS", "50000"))
METRICS = [
    "tree_cpu_ratio", "tree_rss_bytes", "tree_uss_bytes", "tree_threads_count", "tree_fds_count", "tree_procs_count",
    "sys_cpu_ratio", "sys_mem_total_bytes", "sys_mem_available_bytes", "sys_mem_used_bytes", "sys_swap_used_bytes",
    "sys_core_cpu_ratio/0", "sys_core_cpu_ratio/1", "gpu_util_ratio/0",
]  # fmt: skip


def values(i: int) -> dict[str, float]:
    return {k: float(1_000_000 + i * 7 + j) for j, k in enumerate(METRICS)}


PROCS = {4242: {"name": "python", "rss_bytes": 123456789, "cpu_ratio": 0.93}, 4243: {"name": "w", "rss_bytes": 1e8}}


def header() -> dict[str, Any]:
    return make_header(probes={"cpu": {"available": True, "metrics": {}}}, interval_s=0.1)


def best(fn: Any, repeats: int = 3) -> float:
    """Best CPU time (``process_time``) of ``repeats`` runs: 8 agents share 2 cores here, and wall time
    measured the neighbours more than the code."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def goal(ok: bool) -> str:
    return "met" if ok else "NOT MET"


@pytest.mark.bench
def test_trace_write_rate(benchmark: Any, tmp_path: Path) -> None:
    rows = [values(i) for i in range(N)]

    def tuner_write() -> None:
        with TraceWriter(tmp_path / "w.jsonl", header()) as w:
            for i, v in enumerate(rows):
                w.tick(i * 0.1, v, PROCS)
                if i % 100 == 99:
                    w.flush()

    def plain_json() -> None:
        with open(tmp_path / "p.jsonl", "w") as f:
            buf = []
            for i, v in enumerate(rows):
                buf.append(json.dumps({"k": "tick", "t": round(i * 0.1, 6), "m": v, "p": {str(p): d for p, d in
                                                                                       PROCS.items()}}))  # fmt: skip
                if i % 100 == 99:
                    f.write("\n".join(buf) + "\n")
                    f.flush()
                    buf.clear()

    def per_tick_flush() -> None:
        with TraceWriter(tmp_path / "f.jsonl", header()) as w:
            for i, v in enumerate(rows[:5000]):
                w.tick(i * 0.1, v, PROCS)
                w.flush()

    t_tuner = best(tuner_write)
    t_plain = best(plain_json)
    t_flush = best(per_tick_flush) / 5000
    benchmark.pedantic(tuner_write, rounds=1, iterations=1)
    rate = N / t_tuner
    print(f"\ntrace write: {rate:,.0f} records/s, goal 200k/s {goal(rate >= 200_000)} (plain json.dumps+write "
          f"{N / t_plain:,.0f}/s, TraceWriter at {t_plain / t_tuner:.2f}x its speed); a tick with its own flush: "
          f"{t_flush * 1e6:.1f} us CPU")  # fmt: skip
    benchmark.extra_info.update(records_per_s=rate, plain_per_s=N / t_plain, flush_per_tick_us=t_flush * 1e6)
    # What the writer controls: its cost against encoding the same records with json.dumps (0.30x here).
    assert t_tuner <= 0.8 * t_plain, f"TraceWriter takes {t_tuner / t_plain:.2f}x plain json.dumps+write"


@pytest.mark.bench
def test_trace_read_rate(benchmark: Any, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with TraceWriter(path, header()) as w:
        for i in range(N):
            w.tick(i * 0.1, values(i), PROCS)
    n_values = N * len(METRICS)

    def tuner_read() -> None:
        d = read_trace(path)
        assert len(d.times) == N

    def plain_loads() -> None:
        with open(path, "rb") as f:
            for line in f:
                json.loads(line)

    t_tuner = best(tuner_read)
    t_plain = best(plain_loads)
    benchmark.pedantic(tuner_read, rounds=1, iterations=1)
    rate = n_values / t_tuner
    print(f"\ntrace read into numpy: {rate:,.0f} metric values/s ({N / t_tuner:,.0f} ticks/s), goal 5M/s "
          f"{goal(rate >= 5_000_000)}; plain json.loads per line alone {n_values / t_plain:,.0f} values/s; "
          f"read_trace takes {t_tuner / t_plain:.2f}x the time of json.loads alone")  # fmt: skip
    benchmark.extra_info.update(values_per_s=rate, plain_values_per_s=n_values / t_plain)
    # Parsing with orjson and building the columns in bulk beats json.loads alone (0.7-0.8x here).
    assert t_tuner <= 1.2 * t_plain, f"read_trace takes {t_tuner / t_plain:.2f}x json.loads alone"
