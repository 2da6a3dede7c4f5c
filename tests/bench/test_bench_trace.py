"""Trace I/O: goal >= 200k records/s written, >= 5M metric values/s read into numpy (issue: Foundation).

Both goals are asserted on CPU time (``process_time``, the best of 3 runs): what the trace code costs, not
what the neighbours on a shared machine take from it.

Baselines in the same run: writing the same records with plain ``json.dumps`` + one ``f.write`` per
batch, and reading the same file with plain ``json.loads`` per line (no columns built).  The writer also
keeps the trace's columnar companion (``<trace>.cols``, float64 blocks checked against the trace's
bytes), which ``read_trace`` uses instead of parsing the ticks' JSON; each read figure is printed with
the companion and without it (the trace parsed: the JSON Lines path, what older traces get).  The
writer's figure is records per second with a flush every 100 records (the sampler flushes once per
tick; the per-tick flush cost is measured separately).  Records: CPU-probe-sized ticks (14 metrics, 2
processes), and for reading also ticks shaped like a real ``tuner run`` trace's (39 metrics, ints and
floats, 1 process, a request event every few ticks).

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

from tests.bench.goals import judge
from tuner.records import Event
from tuner.trace import TraceWriter, columns_path, make_header, read_trace

N = int(os.environ.get("TUNER_BENCH_RECORDS", "50000"))
METRICS = [
    "tree_cpu_ratio", "tree_rss_bytes", "tree_uss_bytes", "tree_threads", "tree_fds", "tree_procs",
    "sys_cpu_ratio", "sys_mem_total_bytes", "sys_mem_available_bytes", "sys_mem_used_bytes", "sys_swap_used_bytes",
    "sys_core_cpu_ratio/0", "sys_core_cpu_ratio/1", "gpu_util_ratio/0",
]  # fmt: skip


def values(i: int) -> dict[str, float]:
    return {k: float(1_000_000 + i * 7 + j) for j, k in enumerate(METRICS)}


PROCS = {4242: {"name": "python", "rss_bytes": 123456789, "cpu_ratio": 0.93}, 4243: {"name": "w", "rss_bytes": 1e8}}


# A real `tuner run` tick (traces/*-soak.jsonl, demo workload): its metric keys, value types and process entry.
SOAK_METRICS: dict[str, Any] = {
    "tree_procs": 1, "tree_cpu_ratio": 0.19950348171959345, "tree_rss_bytes": 1666723840,
    "tree_uss_bytes": 1545568256, "tree_threads": 5, "tree_fds": 6, "sys_cpu_ratio": 1.0,
    "sys_core_cpu_ratio/0": 1.0, "sys_core_cpu_ratio/1": 1.0, "sys_mem_total_bytes": 25275990016,
    "sys_mem_available_bytes": 21557215232, "sys_mem_used_bytes": 3718774784, "sys_swap_used_bytes": 0,
    "probe_cost_seconds/cpu": 0.00023390900014419458, "req_ttft_p50_seconds": 36.12414627599992,
    "req_ttft_p95_seconds": 41.87676059715002, "req_tpot_p50_seconds": 0.00783950685630211,
    "req_tpot_p95_seconds": 0.018628552380522297, "req_e2e_p50_seconds": 36.6060834325001,
    "req_queue_p50_seconds": 35.95665370100005, "req_tokens_per_second": 207.8,
    "req_requests_per_second": 3.1333333333333333, "req_done_total": 2250.0, "req_active": 202.0,
    "req_batch_occupancy_ratio": 1.0, "req_seq_rep_4_ratio": 0.08974603101414981,
    "req_rep_32_ratio": 0.5991058049776594,
    "req_loop_ratio": 0.1276595744680851, "req_distinct_2_ratio": 0.1333436820863086, "chan_clients": 1.0,
    "chan_dropped_total": 0.0, "alloc_allocated_bytes": 1413689856.0, "alloc_reserved_bytes": 1536696320.0,
    "probe_cost_seconds/output": 0.00026244099990435643, "self_cpu_ratio": 0.0, "self_rss_bytes": 46026752.0,
    "knob_temperature": 0.9, "knob_batch_size": 3, "knob_precision_bits": 8,
}  # fmt: skip
SOAK_PROC = {"name": "python", "ppid": 3604, "rss_bytes": 1666723840, "cpu_ratio": 0.19950348171959345,
             "threads": 5, "fds": 6, "uss_bytes": 1545568256}  # fmt: skip
SOAK_EVENT = {"id": 1603, "pid": 3609, "prompt_tokens": 123, "tokens": 75, "queue_seconds": 8.701855398000134,
              "ttft_seconds": 8.78549885800021, "tpot_seconds": 0.007187116621621867, "e2e_seconds": 9.317352998999922,
              "tokens_per_second": 121.85262765959314, "seq_rep_4": 0.2222222222222222, "rep_32": 0.6666666666666666,
              "loop": True, "batch_size": 3, "temperature": 0.8868, "precision": "int8"}  # fmt: skip


def soak_values(i: int) -> dict[str, Any]:
    """The soak tick's values, varied per tick (ints stay ints, floats floats)."""
    return {k: (v + i if type(v) is int else v * (1.0 + i * 1e-6)) for k, v in SOAK_METRICS.items()}


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


@pytest.mark.bench
def test_trace_write_rate(benchmark: Any, tmp_path: Path) -> None:
    rows = [values(i) for i in range(N)]

    def tuner_write() -> None:
        with TraceWriter(tmp_path / "w.jsonl", header()) as w:
            for i, v in enumerate(rows):
                w.tick(i * 0.1, v, PROCS)
                if i % 100 == 99:
                    w.flush()

    def tuner_write_bare() -> None:  # the same without the columnar companion: what it costs
        w = TraceWriter(tmp_path / "b.jsonl", header())
        w._cols_abandon()
        with w:
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
    t_bare = best(tuner_write_bare)
    t_plain = best(plain_json)
    t_flush = best(per_tick_flush) / 5000
    benchmark.pedantic(tuner_write, rounds=1, iterations=1)
    rate = N / t_tuner
    print(f"\ntrace write: plain json.dumps+write {N / t_plain:,.0f}/s (TraceWriter at {t_plain / t_tuner:.2f}x its "
          f"speed); without the columnar companion {N / t_bare:,.0f}/s (it costs {(t_tuner - t_bare) / N * 1e6:.2f} us "
          f"CPU a record); a tick with its own flush: {t_flush * 1e6:.1f} us CPU")  # fmt: skip
    benchmark.extra_info.update(records_per_s=rate, plain_per_s=N / t_plain, flush_per_tick_us=t_flush * 1e6,
                                without_companion_per_s=N / t_bare)  # fmt: skip
    judge("trace write >= 200k records/s", rate >= 200_000, f"{rate:,.0f} records/s of CPU time, with the companion")
    # What the writer controls: its cost against encoding the same records with json.dumps (0.30x here).
    assert t_tuner <= 0.8 * t_plain, f"TraceWriter takes {t_tuner / t_plain:.2f}x plain json.dumps+write"


def read_rates(path: Path, n_ticks: int, n_values: int) -> tuple[float, float, float]:
    """CPU seconds of ``read_trace`` with the companion, without it, and of plain ``json.loads`` per line."""

    def tuner_read() -> None:
        d = read_trace(path)
        assert len(d.times) == n_ticks

    def plain_loads() -> None:
        with open(path, "rb") as f:
            for line in f:
                json.loads(line)

    with_cols = best(tuner_read)
    cols = columns_path(path)
    cols.rename(cols.with_name("aside"))
    try:
        without = best(tuner_read)
    finally:
        cols.with_name("aside").rename(cols)
    return with_cols, without, best(plain_loads)


def report_read(name: str, n_ticks: int, n_values: int, t: tuple[float, float, float]) -> float:
    with_cols, without, plain = t
    rate = n_values / with_cols
    print(f"\ntrace read into numpy ({name}): without the companion (JSON Lines parsed) {n_values / without:,.0f} "
          f"values/s; plain json.loads per line alone {n_values / plain:,.0f} values/s; read_trace takes "
          f"{with_cols / plain:.2f}x the time of json.loads alone ({without / plain:.2f}x without it)")  # fmt: skip
    return rate


def judge_read(benchmark: Any, label: str, path: Path, n: int, n_values: int) -> None:
    """Time, print and judge one read case.  Parsing with orjson and building the columns in bulk beats
    json.loads alone (0.7-0.8x here) even without the companion; with it, the ticks' JSON is not parsed."""
    t = read_rates(path, n, n_values)
    benchmark.pedantic(lambda: read_trace(path), rounds=1, iterations=1)
    rate = report_read(label, n, n_values, t)
    benchmark.extra_info.update(values_per_s=rate, without_companion_values_per_s=n_values / t[1],
                                plain_values_per_s=n_values / t[2])  # fmt: skip
    judge(f"trace read into numpy >= 5M values/s ({label})", rate >= 5_000_000,
          f"{rate:,.0f} metric values/s of CPU time ({n / t[0]:,.0f} ticks/s), with the companion")  # fmt: skip
    assert t[1] <= 1.2 * t[2], f"read_trace without the companion takes {t[1] / t[2]:.2f}x json.loads alone"
    assert t[0] <= 0.5 * t[1], f"the companion saves too little: {t[0] / t[1]:.2f}x the time without it"


@pytest.mark.bench
def test_trace_read_rate(benchmark: Any, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with TraceWriter(path, header()) as w:
        for i in range(N):
            w.tick(i * 0.1, values(i), PROCS)
    judge_read(benchmark, "CPU-probe ticks", path, N, N * len(METRICS))


@pytest.mark.bench
def test_trace_read_rate_real_ticks(benchmark: Any, tmp_path: Path) -> None:
    """Ticks shaped like a real trace's (the soak run's): more metrics a tick, ints among them, events."""
    path = tmp_path / "soak.jsonl"
    n = N // 3
    with TraceWriter(path, header()) as w:
        for i in range(n):
            w.tick(i * 0.1, soak_values(i), {3609: SOAK_PROC})
            if i % 2:
                w.event(Event(i * 0.1, "request", SOAK_EVENT))
            if i % 10 == 9:
                w.flush()
    judge_read(benchmark, "real-trace ticks", path, n, n * len(SOAK_METRICS))
