"""The cost of each exporter (issue 18 §5): the sidecar's CPU at 10 Hz with 32 concurrent requests, with and
without ``--prometheus`` (scraped every 15 s) and ``--otlp`` (exporting every 15 s to a receiver process).

Goal: the 95% upper bound of the CPU an exporter adds <= 0.3% of a core.  Each round starts three ``tuner run``
sidecars at once — no exporter, ``--prometheus``, ``--otlp`` — each over its own copy of the same client
workload (32 threads, each one request after another: 64 prompt tokens, 20 ms, then 32 tokens 20 ms apart,
~47 requests/s and ~1,500 tokens/s a sidecar), and measures each sidecar process's own CPU time (user +
system, all its threads; not the workload's) over the same window.  The three share the machine's load at
the same moments, so each round gives one on/off pair per exporter; the start order rotates.  The figure is
the mean of the pairs' differences and its 95% upper bound (Student's t, two-sided interval's upper end).

The scrape and export interval is 15 s, as in deploy/prometheus/prometheus-cluster.yml and the OTLP example
of docs/fleet.md (TUNER_BENCH_EXPORT_S changes it for both: the per-scrape/export part of the cost scales with it).
Beside them, as a scale: the trace writer every sidecar runs, for the same records — the "off" sidecar's trace
of the last round written again through ``TraceWriter`` in this process (its CPU over the trace's span).

TUNER_BENCH_SECONDS: the measured window of a round (default 45: three scrapes and exports; CPU time comes in
10 ms ticks, 0.02% of a core over 45 s); TUNER_BENCH_PAIRS: rounds (default 10, at least 5: on this shared
machine the rounds differ by more than the ticks, and more rounds narrow the bound more than longer ones).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.bench.goals import judge
from tests.cli import tuner_env

SECONDS = float(os.environ.get("TUNER_BENCH_SECONDS", "45"))
PAIRS = max(5, int(os.environ.get("TUNER_BENCH_PAIRS", "10")))
WARM_S = 6.0  # start-up (imports, discovery, the first connection) is not the steady cost
EVERY_S = float(os.environ.get("TUNER_BENCH_EXPORT_S", "15"))  # scrape / export interval
GOAL = 0.003  # share of one core (BENCHMARKS.md)
CONCURRENT = 32
ROOT = Path(__file__).resolve().parents[2]
RECEIVER = ROOT / "tests" / "helpers" / "otlp_receiver.py"

WORKLOAD = """
import random, sys, threading, time
from tuner import client
c = client.connect()
def worker(i):
    rng = random.Random(i)
    while True:
        with c.request(prompt_tokens=64) as r:
            time.sleep(0.02)
            for _ in range(32):
                r.token([rng.randrange(32000)])
                time.sleep(0.02)
for i in range(int(sys.argv[1])):
    threading.Thread(target=worker, args=(i,), daemon=True).start()
time.sleep(float(sys.argv[2]))
"""

# Student's t, 0.975 quantile, by degrees of freedom (scipy is not a dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


def t975(df: int) -> float:
    if df in T975:
        return T975[df]
    return T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96 + 2.4 / df  # conservative between keys


def upper_bound(diffs: list[float]) -> tuple[float, float]:
    """Mean and the upper end of its two-sided 95% confidence interval."""
    m = statistics.fmean(diffs)
    return m, m + t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper(threading.Thread):
    """Scrapes a ``/metrics`` every ``EVERY_S`` from the sidecar's start, as a Prometheus would; counts the
    scrapes that answered in the measured window (``counting``)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.ok, self.failed, self.bytes = url, 0, 0, 0
        self.stop = threading.Event()
        self.counting = False

    def run(self) -> None:
        while not self.stop.wait(EVERY_S):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    self.bytes = len(r.read())
                self.ok += self.counting
            except OSError:
                self.failed += self.counting


def start_sidecar(variant: str, tmp: Path, n: int, otlp_url: str) -> tuple[subprocess.Popen[bytes], Any]:
    trace = tmp / f"{variant}-{n}.jsonl"
    args = ["run", "--quiet", "--interval", "0.1", "--trace", str(trace)]
    env = tuner_env(OTEL_METRIC_EXPORT_INTERVAL=str(int(EVERY_S * 1000)))
    scraper = None
    if variant == "prometheus":
        port = _free_port()
        args += ["--prometheus", f"127.0.0.1:{port}", "--prometheus-linger", "0"]  # the end is not the steady cost
        scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    elif variant == "otlp":
        args += ["--otlp", otlp_url]
    total = WARM_S + SECONDS + 4
    cmd = [sys.executable, "-m", "tuner", *args, "--", sys.executable, "-c", WORKLOAD, str(CONCURRENT), str(total)]
    err = (tmp / f"{variant}-{n}.err").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, scraper


def writer_share(trace: Path, tmp: Path) -> tuple[float, int]:
    """CPU share of one core that writing ``trace``'s records through ``TraceWriter`` takes (its companion
    included, a flush a tick as the sampler does at 10 Hz), over the trace's span of time."""
    from tuner.trace import TraceWriter, iter_records
    from tuner.trace.reader import read_trace

    data = read_trace(trace)
    recs = [r for r in iter_records(trace) if r.get("k") in ("tick", "event")]
    w = TraceWriter(tmp / "rewrite.jsonl", data.header)
    t0 = time.process_time()
    for r in recs:
        if r["k"] == "tick":
            w.tick(float(r["t"]), r["m"], r.get("p"))
            w.flush()
        else:
            w.write(r)
    w.close()
    cpu = time.process_time() - t0
    span = float(data.times[-1] - data.times[0])
    return cpu / span, len(recs)


def in_process_shares(trace: Path) -> dict[str, float]:
    """Each exporter's own work for ``trace``'s records, in this process, as a share of one core over the trace's
    span: what the sampler thread calls for every tick and event (``update``, ``count_tick``, ``count_event``)
    and one scrape (Prometheus: the page rendered) or export (OTLP: collected and encoded to protobuf; the HTTP
    POST not included) every ``EVERY_S`` of the span.  The part of the added CPU that is the exporter's code;
    the rest of what the pairs measure is its threads' wake-ups, the HTTP server and client, and noise."""
    from prometheus_client import CollectorRegistry, generate_latest

    from tuner.outputs.otlp import OtlpExporter
    from tuner.outputs.prometheus import TunerCollector
    from tuner.trace import iter_records
    from tuner.trace.reader import read_trace

    header = read_trace(trace).header
    recs = [r for r in iter_records(trace) if r.get("k") in ("tick", "event")]
    ticks = [(r["m"], {int(k): v for k, v in (r.get("p") or {}).items()}) for r in recs if r["k"] == "tick"]
    events = [(r["kind"], r.get("data") or {}) for r in recs if r["k"] == "event"]
    span = float(recs[-1]["t"]) - float(recs[0]["t"])
    n_out = max(1, round(span / EVERY_S))
    out: dict[str, float] = {}

    prom = TunerCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(prom)  # type: ignore[arg-type]
    otlp = OtlpExporter(f"http://127.0.0.1:{_free_port()}", header, interval_s=3600.0)  # never exports here
    try:
        from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics

        for name, exp in (("prometheus", prom), ("otlp", otlp)):
            t0 = time.process_time()
            for values, procs in ticks:
                exp.update(values, procs)
                exp.count_tick()
            for kind, data in events:
                exp.count_event(kind, data)
            for _ in range(n_out):
                if exp is prom:
                    generate_latest(registry)
                else:
                    encode_metrics(otlp.collect()).SerializeToString()
            out[name] = (time.process_time() - t0) / span
    finally:
        otlp.close()
    return out


@pytest.mark.bench
@pytest.mark.timeout(int(PAIRS * (WARM_S + SECONDS + 90)) + 300)  # a round: start, warm-up, window, linger, end
def test_exporter_cost_at_10hz_with_32_requests() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tuner-bench-exporters-"))
    receiver = subprocess.Popen([sys.executable, str(RECEIVER), str(tmp / "otlp.jsonl")], stdout=subprocess.PIPE,
                                text=True, env=tuner_env())  # fmt: skip
    assert receiver.stdout is not None
    otlp_url = f"http://127.0.0.1:{receiver.stdout.readline().split()[-1]}"
    variants = ["off", "prometheus", "otlp"]
    shares: dict[str, list[float]] = {v: [] for v in variants}
    loads: list[float] = []
    scrapes = [0, 0]
    page_bytes = 0
    try:
        for n in range(PAIRS):
            order = variants[n % 3:] + variants[: n % 3]  # rotate who starts first
            started = {v: start_sidecar(v, tmp, n, otlp_url) for v in order}
            for _, s in started.values():
                if s is not None:
                    s.start()  # from the start, as the OTLP exports: three of each in the window
            try:
                time.sleep(WARM_S)
                procs = {v: psutil.Process(p.pid) for v, (p, _) in started.items()}
                for _, s in started.values():
                    if s is not None:
                        s.counting = True
                c0 = {v: _cpu(p) for v, p in procs.items()}
                t0 = time.monotonic()
                time.sleep(SECONDS)
                c1 = {v: _cpu(p) for v, p in procs.items()}
                dt = time.monotonic() - t0
                loads.append(os.getloadavg()[0])
                for v in variants:
                    shares[v].append((c1[v] - c0[v]) / dt)
                for _, s in started.values():
                    if s is not None:
                        s.stop.set()
                        scrapes[0] += s.ok
                        scrapes[1] += s.failed
                        page_bytes = max(page_bytes, s.bytes)
                for v, (p, _) in started.items():
                    assert p.wait(timeout=60) == 0, (tmp / f"{v}-{n}.err").read_text()
            finally:
                for p, _ in started.values():
                    if p.poll() is None:
                        p.kill()
                        p.wait(10)
            print(f"\nround {n + 1}/{PAIRS} (order {order}, load {loads[-1]:.1f}): "
                  + ", ".join(f"{v} {shares[v][-1]:.3%}" for v in variants), flush=True)  # fmt: skip
    finally:
        receiver.kill()
        receiver.wait(10)
    exports = sum(1 for ln in (tmp / "otlp.jsonl").read_text().splitlines() if '"metrics"' in ln) \
        if (tmp / "otlp.jsonl").exists() else 0  # fmt: skip
    trace_share, n_recs = writer_share(tmp / f"off-{PAIRS - 1}.jsonl", tmp)
    own = in_process_shares(tmp / f"off-{PAIRS - 1}.jsonl")
    info: dict[str, Any] = {
        "rounds": PAIRS,
        "seconds_per_round": SECONDS,
        "scrape_and_export_interval_s": EVERY_S,
        "load_1min": f"{min(loads):.1f}-{max(loads):.1f}",
        "off_mean": f"{statistics.fmean(shares['off']):.3%}",
        "scrapes_ok_failed": scrapes,
        "metrics_page_bytes": page_bytes,
        "otlp_metric_exports": exports,
        "trace_writer_share": f"{trace_share:.3%} ({n_recs} records)",
        "exporters_own_code_in_process": ", ".join(f"{k} {v:.3%}" for k, v in own.items()),
    }
    bounds = {}
    for v in ("prometheus", "otlp"):
        diffs = [on - off for on, off in zip(shares[v], shares["off"], strict=True)]
        mean, ub = upper_bound(diffs)
        bounds[v] = ub
        info[v] = (f"on {statistics.fmean(shares[v]):.3%}, added {mean:+.3%} (pairs "
                   + " ".join(f"{d:+.3%}" for d in diffs) + f"), 95% upper bound {ub:+.3%}")  # fmt: skip
    print("\nexporter cost at 10 Hz, 32 concurrent requests:")
    for k, v in info.items():
        print(f"  {k}: {v}")
    assert scrapes[0] >= PAIRS * (SECONDS // EVERY_S - 1) and scrapes[1] == 0, scrapes
    assert exports >= PAIRS * (SECONDS // EVERY_S - 1), exports
    for v in ("prometheus", "otlp"):
        judge(f"{v} exporter: added sidecar CPU, 95% upper bound <= {GOAL:.1%} of a core", bounds[v] <= GOAL,
              info[v])  # fmt: skip
