"""``tuner fleet`` query and redraw (issue 18 §5): with 3 and with 100 replicas; goal <= 1 s for 100.

The series are a real sidecar's: ``tuner run --policy offline --prometheus`` over a client that made requests
(histograms, knobs, an action, the cgroup), its ``/metrics`` page replicated for N instances over 10 minutes at
a 15 s step (``tests/helpers/fleet_openmetrics.py: from_page``), loaded into a real Prometheus with ``promtool
tsdb create-blocks-from openmetrics``.  One round: every PromQL query of the view's refresh (``fetch_fleet``
with ``rows_only``, as ``tuner fleet`` refreshes), then the
Textual view's redraw with the answer (``FleetApp.redraw``: sort, the table's rows, header) and the whole 200x50
screen composed as Textual paints it.  Rounds alternate 3 and 100 replicas; the 3-replica figure is the
baseline of the same run.  The goal is judged on the median wall time, printed with the slowest round and the
CPU a refresh costs (Prometheus' process and this one, all threads); on a machine whose load exceeds its cores
(a shared CI box) the wall time is mostly waiting for a core, and the goal is judged on that CPU instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/bench is not a package

from tests.bench.goals import judge
from tests.cli import tuner, tuner_env
from tests.helpers.fleet_openmetrics import write_page
from tests.test_fleet import Prometheus, free_port
from tuner.fleet import Fleet, PromClient, fetch_fleet
from tuner.tui.fleet import FleetApp

ROUNDS = int(os.environ.get("TUNER_BENCH_ROUNDS", "10"))
CHILD = """\
import time
from tuner import client
c = client.connect()
for i in range(60):
    with c.request(prompt_tokens=16) as r:
        time.sleep(0.01)
        for k in range(8):
            r.token([k])
time.sleep(60)
"""


def sidecar_page(tmp: Path) -> str:
    """A real sidecar's /metrics once its requests are done and its policy has acted."""
    port = free_port()
    run = subprocess.Popen([sys.executable, "-m", "tuner", "run", "--quiet", "--policy", "offline", "--trace",
                            str(tmp / "sidecar.jsonl"), "--prometheus", f"127.0.0.1:{port}", "--prometheus-linger", "0",
                            "--", sys.executable, "-c", CHILD], env=tuner_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                page = ""
            if "tuner_req_e2e_seconds_count 60.0" in page and "tuner_knob_" in page:
                return page
            time.sleep(0.5)
    finally:
        run.terminate()
        run.communicate(timeout=30)


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, tuple[Prometheus, float]]]:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus and promtool (Debian package prometheus) are not installed")
    tmp = tmp_path_factory.mktemp("fleet-bench")
    page = sidecar_page(tmp)
    t_end = float(int(time.time()) - 60)
    out: dict[int, tuple[Prometheus, float]] = {}
    try:
        for n in (3, 100):
            om = tmp / f"fleet{n}.om"
            write_page(om, page, n, t_end)
            cp = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "-q", str(om),
                                 str(tmp / f"tsdb{n}")], capture_output=True, text=True, timeout=600)  # fmt: skip
            assert cp.returncode == 0, cp.stdout + cp.stderr
            om.unlink()
            out[n] = (Prometheus(tmp, [], tsdb=tmp / f"tsdb{n}"), t_end)
        yield out
    finally:
        for prom, _ in out.values():
            prom.close()


def _rounds(fleets: dict[int, tuple[Prometheus, float]]) -> dict[int, dict[str, list[float]]]:
    """Per round and fleet size: wall seconds of the queries, of the redraw (table + screen), and both."""
    clients = {n: PromClient(prom.url) for n, (prom, _) in fleets.items()}
    t_end = next(iter(fleets.values()))[1]
    first = fetch_fleet(clients[3], window="1m", match='job="tuner"', at=t_end)  # the app's own first refresh
    app = FleetApp(lambda: first, refresh=3600)
    procs = {n: psutil.Process(prom.proc.pid) for n, (prom, _) in fleets.items()}
    kinds = ("query", "redraw", "total", "cpu", "query_full")
    out: dict[int, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in fleets}

    def prom_cpu(n: int) -> float:
        t = procs[n].cpu_times()
        return float(t.user + t.system)

    async def main() -> None:
        async with app.run_test(size=(200, 50)) as pilot:
            while app.fleet is None:
                await pilot.pause(0.05)
            await pilot.pause(0.2)
            for i in range(ROUNDS * 2):
                n = (3, 100)[i % 2]
                w0, c0, p0 = time.perf_counter(), time.process_time(), prom_cpu(n)
                f: Fleet = fetch_fleet(clients[n], window="1m", match='job="tuner"', at=t_end, rows_only=True)
                w1 = time.perf_counter()
                app.fleet = f
                app.redraw()
                app.screen._compositor.render_strips()  # the screen composed as Textual paints it
                w2, c2, p2 = time.perf_counter(), time.process_time(), prom_cpu(n)
                assert len(f.replicas) == n and app.query_one("DataTable").row_count == n  # type: ignore[attr-defined]
                out[n]["query"].append(w1 - w0)
                out[n]["redraw"].append(w2 - w1)
                out[n]["total"].append(w2 - w0)
                out[n]["cpu"].append(c2 - c0 + p2 - p0)  # CPU of Prometheus and of this process (all threads)
                w3 = time.perf_counter()  # every percentile for every replica, as --once --json asks
                fetch_fleet(clients[n], window="1m", match='job="tuner"', at=t_end)
                out[n]["query_full"].append(time.perf_counter() - w3)
                await pilot.pause(0)

    asyncio.run(main())
    return out


def _med(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


@pytest.mark.bench
def test_fleet_query_and_redraw_3_and_100_replicas(fleets: dict[int, tuple[Prometheus, float]],
                                                   benchmark: Any) -> None:  # fmt: skip
    res = benchmark.pedantic(_rounds, args=(fleets,), rounds=1, iterations=1)
    info = {f"{k}_{n}_median_ms": round(_med(v) * 1000, 1) for n, r in res.items() for k, v in r.items()}
    info["total_100_max_ms"] = round(max(res[100]["total"]) * 1000, 1)
    info["ratio_100_vs_3"] = round(_med(res[100]["total"]) / _med(res[3]["total"]), 2)
    # the command a user runs, end to end (Python start, imports, the queries, the table printed): once each
    cli: dict[int, float] = {}
    for n, (prom, _) in fleets.items():
        w0 = time.perf_counter()
        cp = tuner("fleet", "--prometheus", prom.url, "--once", "--json", "--match", 'job="tuner"')
        cli[n] = time.perf_counter() - w0
        assert cp.returncode == 0, cp.stderr
        assert len(json.loads(cp.stdout)["replicas"]) == n  # (now: the series ended a minute ago, no rates)
    info.update({f"cli_once_json_{n}_s": round(v, 2) for n, v in cli.items()})
    benchmark.extra_info.update(info)
    info["load_1m"] = round(os.getloadavg()[0], 1)
    print("\n" + json.dumps(info, indent=1))
    total100, cpu100 = _med(res[100]["total"]), _med(res[100]["cpu"])
    busy = info["load_1m"] >= (os.cpu_count() or 1)
    # On a machine busier than its cores the wall time is mostly waiting for a core: then the goal is judged on
    # the CPU a refresh costs (Prometheus + tuner), which bounds an idle machine's wall time (run serially).
    figure = total100 if not busy else cpu100
    judge("tuner fleet query + redraw, 100 replicas <= 1 s", figure <= 1.0,
          f"median {total100 * 1000:.0f} ms wall (query {info['query_100_median_ms']:.0f} ms + redraw "
          f"{info['redraw_100_median_ms']:.0f} ms; slowest {info['total_100_max_ms']:.0f} ms), CPU per refresh "
          f"(Prometheus + tuner) {cpu100 * 1000:.0f} ms; 3 replicas {info['total_3_median_ms']:.0f} ms wall, "
          f"{info['cpu_3_median_ms']:.0f} ms CPU in the same run; load {info['load_1m']} on {os.cpu_count()} cores"
          + (" (busy: judged by CPU)" if busy else ""))
