"""``tuner fleet`` (issue 18 §2): a real Prometheus (Debian package, started here on a free loopback port with a
generated config) scraping ``tuner run`` sidecars; what the view shows is checked against each sidecar's own
trace.  100 replicas' worth of series come from ``promtool tsdb create-blocks-from openmetrics``."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner, tuner_env, tuner_popen
from tuner.core.limits import DictReader, binding
from tuner.fleet import PromClient, fetch_fleet
from tuner.fleet.table import COLUMNS, secs, sorted_rows, status
from tuner.fleet.view import Fleet, Replica, queries, replica_detail
from tuner.outputs.prometheus import TTFT_BUCKETS
from tuner.trace import TraceData, read_trace

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus (Debian package prometheus, installed by .ci/run) is not installed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A real Prometheus on loopback scraping ``targets`` every second (job ``tuner``), data in tmp."""

    def __init__(self, tmp_path: Path, targets: list[str], *, tsdb: Path | None = None, rules: Path | None = None,
                 interval: str = "1s") -> None:  # fmt: skip
        assert PROMETHEUS is not None
        self.port = free_port()
        cfg: dict[str, Any] = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "tuner", "static_configs": [{"targets": targets}]}] if targets else [],
        }
        if rules is not None:
            cfg["rule_files"] = [str(rules)]
        path = tmp_path / f"prometheus-{self.port}.yml"
        path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tsdb or tmp_path / f'tsdb-{self.port}'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=10y"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


# -- the queries and the table, without a server -------------------------------------------------------


def test_the_queries_use_the_label_the_window_and_the_matchers() -> None:
    q = queries("pod", "2m", 'job="tuner", namespace="prod"')
    assert q["ttft_p95"] == ('histogram_quantile(0.95, sum by (pod, le) (rate(tuner_req_ttft_seconds_bucket'
                             '{job="tuner", namespace="prod"}[2m])))')  # fmt: skip
    assert q["fleet_ttft_p95"] == ('histogram_quantile(0.95, sum by (le) (rate(tuner_req_ttft_seconds_bucket'
                                   '{job="tuner", namespace="prod"}[2m])))')  # fmt: skip
    assert q["tokens"] == 'sum by (pod) (rate(tuner_req_generation_tokens_sum{job="tuner", namespace="prod"}[2m]))'
    assert q["gauges"].startswith('last_over_time({__name__=~"tuner_(knob_.+|')
    assert q["gauges"].endswith(', job="tuner", namespace="prod"}[5m])')
    assert queries("instance", "1m", "")["info"] == "last_over_time(tuner_info{}[1h])"
    light = queries("pod", "2m", "", rows_only=True)  # what the terminal UI refreshes: the rows' and totals'
    assert {k for k in light if "_p" in k} == {"ttft_p95", "tpot_p95", "fleet_ttft_p50", "fleet_ttft_p95",
                                               "fleet_ttft_p99", "fleet_tpot_p95"}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "msg"),
    [(["--prometheus", "prom:9090"], "give the server's http"), (["--prometheus", "http://p:9090", "--by", "a-b"],
      "not a label name"), (["--prometheus", "http://p:9090", "--window", "5"], "not a Prometheus duration"),
     (["--prometheus", "http://p:9090", "--match", "{a}=b"], "give label matchers"),
     (["--prometheus", "http://p:9090", "--refresh", "0"], "--refresh 0 is out of range"),
     (["--prometheus", "http://p:9090", "--sort", "p95"], "--sort 'p95': one of replica, status, ttft, tpot")],
)  # fmt: skip
def test_bad_options_are_one_line_errors(args: list[str], msg: str) -> None:
    err = assert_one_line_error(tuner("fleet", "--once", *args))
    assert msg in err


def test_an_unreachable_prometheus_is_a_one_line_error() -> None:
    err = assert_one_line_error(tuner("fleet", "--once", "--prometheus", f"http://127.0.0.1:{free_port()}"))
    assert "cannot reach Prometheus at http://127.0.0.1:" in err


def test_a_url_that_is_not_prometheus_is_a_one_line_error() -> None:
    """A web server that is not Prometheus' API: its 404, or a page that is not the API's JSON."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            ok = self.path.startswith("/grafana/")
            body = b"<html>login</html>" if ok else b"404 page not found"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/html" if ok else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        err = assert_one_line_error(tuner("fleet", "--once", "--prometheus", url + "/prom"))
        assert err == f"tuner: {url}/prom: HTTP 404 Not Found"
        err = assert_one_line_error(tuner("fleet", "--once", "--json", "--prometheus", url + "/grafana/"))
        assert err == f"tuner: {url}/grafana: the answer is not the Prometheus API's JSON"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
@needs_prometheus
def test_a_prometheus_without_sidecars_is_a_one_line_error(tmp_path: Path) -> None:
    prom = Prometheus(tmp_path, [])
    try:
        for args in ([], ["--json"], ["--match", 'job="tuner"']):
            err = assert_one_line_error(tuner("fleet", "--once", "--prometheus", prom.url, *args))
            assert err.startswith(f"tuner: no tuner sidecars at {prom.url}: no tuner_info series")
        assert 'matching {job="tuner"} in the last hour' in err
        # a query Prometheus refuses (a label matcher it cannot parse) is its own error, in one line
        err = assert_one_line_error(tuner("fleet", "--once", "--prometheus", prom.url, "--match", 'job=~"("'))
        assert err.startswith(f"tuner: {prom.url}: bad_data: ")
    finally:
        prom.close()


@pytest.mark.parametrize(
    ("args", "msg"),
    [(["--prometheus-linger", "5"], "--prometheus-linger needs --prometheus ADDR"),
     (["--prometheus-linger", "-1"], "--prometheus-linger -1 is out of range: 0 to 3600 s"),
     (["--prometheus-linger", "nan"], "'nan' is not a finite number")],
)  # fmt: skip
def test_bad_linger_is_a_one_line_error(tmp_path: Path, args: list[str], msg: str) -> None:
    if args[1] != "5":
        args = ["--prometheus", f"127.0.0.1:{free_port()}", *args]
    err = assert_one_line_error(tuner("run", "--quiet", "--trace", str(tmp_path / "t.jsonl"), *args, "--", "true"))
    assert msg in err


def test_sorting_puts_missing_values_last_both_ways() -> None:
    rows = [Replica("a", {}, ttft_p95=0.2), Replica("b", {}), Replica("c", {}, ttft_p95=0.1)]
    assert [r.key for r in sorted_rows(rows, "ttft", False)] == ["c", "a", "b"]
    assert [r.key for r in sorted_rows(rows, "ttft", True)] == ["a", "c", "b"]
    assert {c.key for c in COLUMNS} >= {"replica", "ttft", "tokens", "headroom", "binding", "knobs", "action", "oom"}
    rows = [Replica(k, {}) for k in ("10.0.0.10:9464", "10.0.0.9:9464", "pod-10", "pod-2")]
    natural = ["10.0.0.9:9464", "10.0.0.10:9464", "pod-2", "pod-10"]
    assert [r.key for r in sorted_rows(rows, "replica", False)] == natural
    assert [status(r) for r in (Replica("a", {}, up=True), Replica("b", {}, up=False), Replica("c", {}),
                                Replica("d", {}, up=True, reporting=False))] == ["up", "down", "reporting", "down"]


# -- three real sidecars ------------------------------------------------------------------------------


def histogram_quantile(q: float, values: list[float], bounds: tuple[float, ...]) -> tuple[float, float]:
    """The bucket (lower, upper edge) Prometheus' ``histogram_quantile`` answers within for these values."""
    counts = np.zeros(len(bounds) + 1)
    for v in values:
        counts[int(np.searchsorted(bounds, v, side="left"))] += 1
    rank = q * len(values)
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, rank, side="left"))
    lo = bounds[i - 1] if i > 0 else 0.0
    hi = bounds[i] if i < len(bounds) else bounds[-1]
    return lo, hi


def at_time(data: TraceData, unix: float) -> int:
    """The index of the last tick at or before wall-clock ``unix``."""
    t = unix - data.header["started_unix"]
    return max(0, int(np.searchsorted(data.times, t, side="right")) - 1)


def tick_values(data: TraceData, i: int) -> dict[str, float]:
    return {k: float(c[i]) for k, c in data.columns.items() if not math.isnan(c[i])}


WORKLOAD = [sys.executable, "-m", "tuner.demo.workload", "--max-new-tokens", "12", "--threads", "1"]


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[list[tuple[str, Path]]]:
    """Three ``tuner run --prometheus`` sidecars serving the demo workload at different rates and policies,
    each holding its /metrics up for a while after its workload ends."""
    pytest.importorskip("torch", reason="the demo workload runs the built-in model on torch (the torch extra)")
    runs = []
    out: list[tuple[str, Path]] = []
    for i, (rate, policy) in enumerate(((0.5, None), (1.5, "offline"), (3.0, "interactive"))):
        port = free_port()
        trace = tmp_path / f"replica{i}.jsonl"
        cmd = " ".join([*WORKLOAD, "--duration", "45", "--rate", str(rate), "--seed", str(i)]) + " >/dev/null; sleep 90"
        args = ["run", "--quiet", "--trace", str(trace), "--prometheus", f"127.0.0.1:{port}",
                "--prometheus-linger", "0"]
        if policy:
            args += ["--policy", policy]
        runs.append(tuner_popen(*args, "--", "sh", "-c", cmd, start_new_session=True))
        out.append((f"127.0.0.1:{port}", trace))
    try:
        yield out
    finally:
        import os
        import signal

        for r in runs:
            try:
                os.killpg(r.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for r in runs:
            r.communicate(timeout=60)


@pytest.mark.integration
@pytest.mark.slow
@needs_prometheus
def test_the_fleet_view_of_three_sidecars_matches_their_traces(tmp_path: Path,
                                                               sidecars: list[tuple[str, Path]]) -> None:  # fmt: skip
    prom = Prometheus(tmp_path, [t for t, _ in sidecars])
    try:
        time.sleep(40)  # 35-45 s of the workloads, scraped every second
        cp = tuner("fleet", "--prometheus", prom.url, "--once", "--json", "--window", "30s", "--match", 'job="tuner"')
        assert cp.returncode == 0, cp.stderr
        view = json.loads(cp.stdout)
        text = tuner("fleet", "--prometheus", prom.url, "--once", "--window", "30s")
        assert text.returncode == 0, text.stderr
    finally:
        prom.close()
    at = view["at"]
    rows = {r["key"]: r for r in view["replicas"]}
    assert set(rows) == {t for t, _ in sidecars}
    rates = []
    for target, trace in sidecars:
        r = rows[target]
        data = read_trace(trace)
        assert r["up"] is True and r["reporting"] is True
        assert r["labels"] == {"instance": target, "job": "tuner"}
        assert r["policy"] == (data.header.get("policy") or "none")
        t_end = at - data.header["started_unix"]
        reqs = [e.data for e in data.requests() if t_end - 30 <= e.t <= t_end]
        assert len(reqs) >= 3, (target, len(reqs))
        # TTFT p95: histogram_quantile resolves to the bucket holding the trace's own p95
        lo, hi = histogram_quantile(0.95, [q["ttft_seconds"] for q in reqs], TTFT_BUCKETS)
        assert r["ttft_p95"] is not None and lo - 1e-9 <= r["ttft_p95"] <= hi + 1e-9, (target, r["ttft_p95"], lo, hi)
        # tokens/s over the window, against the tokens the trace's requests generated in it
        tokens = sum(q["tokens"] for q in reqs) / 30
        assert r["tokens_per_second"] == pytest.approx(tokens, rel=0.35), (target, r["tokens_per_second"], tokens)
        rates.append(r["tokens_per_second"])
        # memory: the binding limit by the sidecar's rule on its values at that time
        i = at_time(data, at - 1.0)
        b = binding(DictReader(tick_values(data, i)))
        assert b is not None and r["binding_name"] == b.name
        assert r["headroom"] == pytest.approx(b.headroom, abs=0.03)
        # knobs: the values the trace recorded in the last seconds before the query
        window = slice(at_time(data, at - 4.0), i + 2)
        for knob, v in r["knobs"].items():
            if knob == "precision_bytes":  # Prometheus has bytes per value, the trace bits
                col = data.column("knob_precision_bits")[window] / 8
            else:
                col = data.column(f"knob_{knob}")[window]
            assert v in set(col[~np.isnan(col)].tolist()), (target, knob, v)
        if data.header.get("policy"):
            assert r["knobs"] and "batch_size" in r["knobs"]
            before = [a for a in data.actions if a["t"] <= t_end]
            assert before and r["last_action"] is not None
            last_by = {(a["policy"], a["knob"], a["outcome"]): a["t"] for a in before}
            key = (r["last_action"]["policy"], r["last_action"]["knob"], r["last_action"]["outcome"])
            assert key in last_by and last_by[key] >= max(last_by.values()) - 2.0  # the latest (to a scrape)
            outcomes: dict[str, int] = {}
            for a in before:
                outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
            assert r["actions"].keys() <= outcomes.keys()
        else:
            assert r["knobs"] == {} and r["last_action"] is None
        oom = data.column("cgroup_oom_kills_total")[: i + 1]
        oom = oom[~np.isnan(oom)]
        kills = sum(1 for e in data.events if e.kind == "oom_kill" and e.t <= t_end)  # the sidecar's own verdicts
        assert r["oom_kills"] == max(float(oom[-1]) if len(oom) else 0.0, kills)
    assert rates == sorted(rates)  # the three rates, seen in order
    t = view["totals"]
    assert t["replicas"] == 3 and t["up"] == 3
    assert t["tokens_per_second"] == pytest.approx(sum(rates), rel=0.05)
    assert t["ttft_p50"] <= t["ttft_p95"] <= t["ttft_p99"]
    assert min(r["ttft_p95"] for r in rows.values()) <= t["ttft_p95"] <= max(r["ttft_p95"] for r in rows.values())
    for target, _ in sidecars:
        assert target in text.stdout
    assert "3 replicas (3 up, 3 reporting)" in text.stdout


# -- a hundred replicas, from OpenMetrics blocks --------------------------------------------------------


@pytest.fixture(scope="module")
def hundred(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, float]]:
    """A Prometheus whose TSDB holds 10 minutes of 100 sidecars' series (``tests/helpers/fleet_openmetrics.py``)
    made with ``promtool tsdb create-blocks-from openmetrics``; the series end at ``t_end``."""
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus and promtool (Debian package prometheus, installed by .ci/run) are not installed")
    from tests.helpers.fleet_openmetrics import write

    tmp = tmp_path_factory.mktemp("hundred")
    t_end = float(int(time.time()) - 60)
    om = tmp / "fleet.om"
    write(om, 100, t_end)
    cp = subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", "-q", str(om), str(tmp / "tsdb")],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cp.returncode == 0, cp.stdout + cp.stderr
    prom = Prometheus(tmp, [], tsdb=tmp / "tsdb")
    try:
        yield prom, t_end
    finally:
        prom.close()


@pytest.mark.integration
def test_a_hundred_replicas_each_as_its_series_say(hundred: tuple[Prometheus, float]) -> None:
    from tests.helpers.fleet_openmetrics import expected

    prom, t_end = hundred
    f = fetch_fleet(PromClient(prom.url), window="1m", match='job="tuner"', at=t_end)
    assert len(f.replicas) == 100
    rows = {r.key: r for r in f.replicas}
    for i in range(100):
        e = expected(i, t_end)
        r = rows[str(e["key"])]
        assert r.reporting and r.up is None  # (no scrape: blocks, not targets)
        assert r.tokens_per_second == pytest.approx(e["tokens_per_second"], rel=1e-6)
        assert r.requests_per_second == pytest.approx(e["requests_per_second"], rel=1e-6)
        lo, hi = e["ttft_bucket"]  # type: ignore[misc]
        assert r.ttft_p95 is not None and lo <= r.ttft_p95 <= hi
        assert r.headroom == pytest.approx(e["headroom"]) and r.binding_name == e["binding_name"]
        assert r.binding is not None and r.binding.startswith("cgroup working set")
        assert r.knobs == e["knobs"] and r.oom_kills == e["oom_kills"]
        la = e["last_action"]
        assert r.last_action is not None and r.last_action["unix"] == la["unix"]  # type: ignore[index]
        assert r.last_action["age_seconds"] == pytest.approx(30 + i)
        assert r.actions == {"applied": 3.0}
    t = f.totals
    assert t["replicas"] == 100 and t["reporting"] == 100
    assert t["tokens_per_second"] == pytest.approx(sum(float(expected(i, t_end)["tokens_per_second"])  # type: ignore[arg-type]
                                                       for i in range(100)), rel=1e-6)  # fmt: skip
    assert t["oom_kills"] == 34 and t["min_headroom"] == pytest.approx(min(r.headroom or 1 for r in f.replicas))
    # fleet percentiles from the summed buckets: a fifth of the requests at each TTFT, weighted by rate
    assert 0.5 <= t["ttft_p95"] <= 2.5 and t["ttft_p50"] <= t["ttft_p95"] <= t["ttft_p99"]


@pytest.mark.integration
def test_once_sorts_as_asked(hundred: tuple[Prometheus, float]) -> None:
    prom, _ = hundred
    base = ["fleet", "--prometheus", prom.url, "--once", "--match", 'job="tuner"']
    cp = tuner(*base, "--json", "--sort", "replica", "--reverse")
    assert cp.returncode == 0, cp.stderr
    keys = [r["key"] for r in json.loads(cp.stdout)["replicas"]]
    assert keys[:3] == ["10.0.0.99:9464", "10.0.0.98:9464", "10.0.0.97:9464"] and keys[-1] == "10.0.0.0:9464"
    cp = tuner(*base)
    assert cp.returncode == 0, cp.stderr
    rows = [line.split()[0] for line in cp.stdout.splitlines()[2:102]]
    assert rows[:3] == ["10.0.0.0:9464", "10.0.0.1:9464", "10.0.0.2:9464"] and rows[-1] == "10.0.0.99:9464"


def test_the_view_sorts_and_shows_a_replicas_detail(hundred: tuple[Prometheus, float]) -> None:
    import asyncio

    from tuner.tui.fleet import FleetApp

    prom, t_end = hundred
    client = PromClient(prom.url)
    opts: dict[str, Any] = {"window": "1m", "match": 'job="tuner"', "at": t_end}
    full = {r.key: r for r in fetch_fleet(client, **opts).replicas}  # every percentile, as --once --json has them
    app = FleetApp(lambda: fetch_fleet(client, rows_only=True, **opts), refresh=3600,
                   detail=lambda r: replica_detail(client, r, **opts))  # as tuner fleet runs it  # fmt: skip

    def screen() -> str:
        return "\n".join(s.text for s in app.screen._compositor.render_strips())

    async def main() -> None:
        async with app.run_test(size=(200, 50)) as pilot:

            async def shown(text: str) -> str:
                deadline = time.monotonic() + 10
                while text not in (s := screen()):
                    assert time.monotonic() < deadline, s
                    await pilot.pause(0.05)
                return s

            deadline = time.monotonic() + 30
            while app.fleet is None:
                assert time.monotonic() < deadline, screen()
                await pilot.pause(0.05)
            table = app.query_one("DataTable")
            assert table.row_count == 100  # type: ignore[attr-defined]
            await shown("100 replicas")  # drawn at the next refresh of the screen (0.2 s was not always enough)
            s = await shown("10.0.0.0:9464")
            assert "100 replicas" in s and "cgroup working set" in s
            for _ in range(4):  # replica, status, TTFT p95, TPOT p95 -> tok/s
                await pilot.press("s")
            assert app.sort_key == "tokens" and "sorted by tok/s" in await shown("sorted by tok/s")
            first = str(table.coordinate_to_cell_key((0, 0)).row_key.value)  # type: ignore[attr-defined]
            assert first == min(app.fleet.replicas, key=lambda r: r.tokens_per_second or 0).key  # type: ignore[union-attr]
            await pilot.press("r")
            first = str(table.coordinate_to_cell_key((0, 0)).row_key.value)  # type: ignore[attr-defined]
            assert first == max(app.fleet.replicas, key=lambda r: r.tokens_per_second or 0).key  # type: ignore[union-attr]
            await pilot.press("ctrl+home")  # the cursor stays on its replica across redraws: go to the first row
            await pilot.press("enter")
            d = await shown("memory limits")
            assert first in d and "memory limits" in d and "batch_size set batch_size: applied" in d
            assert "OOM kills" in d and app.fleet.replicas[0].ttft_p50 is None  # type: ignore[union-attr]
            e = full[first]  # the refreshes left p50, p99 and end-to-end out: the detail asked for them
            d = await shown(f"TTFT p50 {secs(e.ttft_p50)}  p95 {secs(e.ttft_p95)}  p99 {secs(e.ttft_p99)}")
            assert e.ttft_p50 is not None and e.e2e_p95 is not None and f"end-to-end p95 {secs(e.e2e_p95)}" in d
            await pilot.press("escape")
            deadline = time.monotonic() + 10
            while "memory limits" in (s := screen()):  # (the header behind the detail is on the screen all along)
                assert time.monotonic() < deadline, s
                await pilot.pause(0.05)
            assert "sorted by tok/s" in s
            assert app.redraw_seconds is not None and app.redraws >= 3

    asyncio.run(main())


def test_the_view_keeps_the_last_rows_when_a_refresh_fails_and_says_why() -> None:
    """Refreshes: no sidecars yet, then two, then Prometheus unreachable (the rows stay, the status says why)."""
    import asyncio

    from tuner.fleet import PromError
    from tuner.tui.fleet import FleetApp

    def fleet(keys: list[str]) -> Fleet:
        rows = [Replica(k, {"instance": k}, up=True, ttft_p95=0.25) for k in keys]
        return Fleet("http://prom:9090", time.time(), "1m", "instance", "", rows, {
            "replicas": len(rows), "up": len(rows), "reporting": len(rows), "tokens_per_second": None,
            "requests_per_second": None, "oom_kills": None, "oom_kills_window": 0.0, "min_headroom": None,
            "ttft_p50": None, "ttft_p95": None, "ttft_p99": None, "tpot_p95": None, "e2e_p95": None}, 0.01)  # fmt: skip

    down = PromError("cannot reach Prometheus at http://prom:9090: [Errno 111] Connection refused")
    answers: list[Any] = [fleet([]), fleet(["a:9464", "b:9464"]), down]

    def fetch() -> Fleet:
        a = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(a, Exception):
            raise a
        return a

    app = FleetApp(fetch, refresh=3600)

    def screen() -> str:
        return "\n".join(s.text for s in app.screen._compositor.render_strips())

    async def main() -> None:
        async with app.run_test(size=(220, 30)) as pilot:

            async def shown(text: str) -> str:
                deadline = time.monotonic() + 10
                while text not in (s := screen()):
                    assert time.monotonic() < deadline, s
                    await pilot.pause(0.05)
                return s

            await shown("no tuner sidecars at http://prom:9090: no tuner_info series in the last hour")
            await pilot.press("g")  # refresh now
            s = await shown("2 replicas")
            assert "a:9464" in s and "250 ms" in s
            await pilot.press("g")
            s = await shown("refresh failed: cannot reach Prometheus at http://prom:9090: [Errno 111] Connection "
                            "refused (showing the last answer)")  # fmt: skip
            assert "a:9464" in s and "b:9464" in s
            await pilot.press("q")

    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tuner_fleet_in_a_real_terminal(tmp_path: Path, hundred: tuple[Prometheus, float]) -> None:
    """``tuner fleet`` in tmux (a real pseudo-terminal): the rows, a sort, a replica's detail, quit with exit 0."""
    import shlex

    prom, _ = hundred
    sock, done = f"tuner-fleet-{free_port()}", tmp_path / "exit"
    cmd = shlex.join([sys.executable, "-m", "tuner", "fleet", "--prometheus", prom.url, "--match", 'job="tuner"'])
    env = tuner_env()
    env.pop("TMUX", None)

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], env=env, capture_output=True, text=True, timeout=30,
                              check=True).stdout  # fmt: skip

    def shown(text: str) -> str:
        deadline = time.monotonic() + 60
        while text not in (s := tmux("capture-pane", "-p", "-t", "fleet")):
            assert time.monotonic() < deadline, s
            time.sleep(0.2)
        return s

    tmux("new-session", "-d", "-s", "fleet", "-x", "220", "-y", "50", f"{cmd}; echo $? > {done}; sleep 30")
    try:
        shown("100 replicas (0 up, 100 reporting)")
        s = shown("10.0.0.10:9464")  # (the rows may come a frame after the header)
        assert "10.0.0.0:9464" in s and "cgroup working set" in s and "batch size 8" in s and "reporting" in s
        assert s.index("10.0.0.9:9464") < s.index("10.0.0.10:9464")
        tmux("send-keys", "-t", "fleet", "s")
        shown("sorted by status")
        tmux("send-keys", "-t", "fleet", "Enter")
        d = shown("memory limits (tightest first)")
        assert "10.0.0.0:9464" in d and "batch_size set batch_size: applied" in d
        tmux("send-keys", "-t", "fleet", "Escape")
        deadline = time.monotonic() + 30
        while "memory limits" in (s := tmux("capture-pane", "-p", "-t", "fleet")):  # (a key right after an
            assert time.monotonic() < deadline, s  # escape would read as alt+key)
            time.sleep(0.2)
        tmux("send-keys", "-t", "fleet", "q")
        deadline = time.monotonic() + 30
        while not done.exists() or not done.read_text().strip():
            assert time.monotonic() < deadline, tmux("capture-pane", "-p", "-t", "fleet")
            time.sleep(0.2)
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], env=env, capture_output=True, timeout=30)


# -- the last scrape: --prometheus-linger

LINGER = re.compile(r"tuner: keeping /metrics up for a last scrape \(at most (\d+) s; --prometheus-linger; "
                    r"Ctrl-C stops it\)")


def lingered(err: str) -> float | None:
    """The bound the sidecar said it waits, in whole seconds (None: it did not wait)."""
    m = LINGER.search(err)
    return None if m is None else float(m.group(1))


@pytest.mark.integration
@needs_prometheus
def test_an_oom_kill_reaches_prometheus_before_the_sidecar_goes(tmp_path: Path) -> None:
    """``tuner run --prometheus`` in a v1 memory cgroup with a child that allocates past its limit once it is
    told to: the kernel OOM killer ends the child, the sidecar keeps /metrics up for a last scrape (two scrape
    intervals at most), and the fleet view — after the sidecar is gone — shows the kill."""
    from tests.helpers.cgroups import MIB, V1Memory

    v1 = V1Memory.get()
    try:
        cg = v1.make(memory__limit_in_bytes=256 * MIB)
        port = free_port()
        trace = tmp_path / "oom.jsonl"
        hog = ("import sys, time\nsys.stdin.readline()\nchunks = []\nwhile True:\n"
               "    chunks.append(b'x' * (16 << 20))\n    time.sleep(0.02)\n")  # fmt: skip
        run = v1.popen(cg, [sys.executable, "-m", "tuner", "run", "--headless", "--trace", str(trace), "--prometheus",
                            f"127.0.0.1:{port}", "--", sys.executable, "-c", hog], env=tuner_env(),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        prom = Prometheus(tmp_path, [f"127.0.0.1:{port}"], interval="2s")
        try:
            client = PromClient(prom.url)
            deadline = time.monotonic() + 60
            # three scrapes: the sidecar has seen the scrape interval (two of them, the default linger)
            while not client.query('count_over_time(tuner_ticks_total{job="tuner"}[1m]) >= 3'):
                assert time.monotonic() < deadline and run.poll() is None
                time.sleep(0.5)
            assert run.stdin is not None
            run.stdin.write("go\n")
            run.stdin.flush()
            _, err = run.communicate(timeout=120)
            assert run.returncode == 137, err
            assert 3.0 <= (lingered(err) or 0) <= 6.0, err  # two scrape intervals of 2 s, as seen
            time.sleep(1)
            f = fetch_fleet(client, window="1m", match='job="tuner"')
        finally:
            prom.close()
    finally:
        v1.cleanup()
    [r] = f.replicas
    assert r.oom_kills == 1.0 and r.oom_kills_window == pytest.approx(1.0, abs=0.5)
    data = read_trace(trace)
    assert [e.kind for e in data.events if e.kind == "oom_kill"] == ["oom_kill"]


LAST_BURST = """\
import sys, time
from tuner import client
c = client.connect()
sys.stdin.readline()  # the test says when: Prometheus has scraped the sidecar a few times
for i in range(25):  # the last requests, then gone at once: no scrape in between
    with c.request(prompt_tokens=4) as r:
        r.token([1, 2, 3])
"""


@pytest.mark.integration
@needs_prometheus
@pytest.mark.parametrize("linger", [None, "30"])
def test_the_last_counters_reach_prometheus_after_the_command_exits(tmp_path: Path, linger: str | None) -> None:
    """A command ends right after its last requests.  The sidecar keeps /metrics up until Prometheus scraped it
    once more (default: at most two scrape intervals as seen; ``--prometheus-linger 30``: at most 30 s, and only
    as long as that scrape takes), so Prometheus' last value is the trace's whole count."""
    port = free_port()
    trace = tmp_path / "burst.jsonl"
    args = ["run", "--headless", "--trace", str(trace), "--prometheus", f"127.0.0.1:{port}"]
    if linger:
        args += ["--prometheus-linger", linger]
    run = tuner_popen(*args, "--", sys.executable, "-c", LAST_BURST, stdin=subprocess.PIPE)
    prom = Prometheus(tmp_path, [f"127.0.0.1:{port}"], interval="2s")
    try:
        client = PromClient(prom.url)
        deadline = time.monotonic() + 60
        while not client.query('count_over_time(tuner_ticks_total{job="tuner"}[1m]) >= 3'):
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.3)
        assert run.stdin is not None
        run.stdin.write("go\n")
        run.stdin.flush()
        started = time.monotonic()
        _, err = run.communicate(timeout=60)
        took = time.monotonic() - started
        assert run.returncode == 0, err
        time.sleep(0.5)
        [last] = client.query('last_over_time(tuner_req_e2e_seconds_count{job="tuner"}[5m])')
        [kills] = client.query('last_over_time(tuner_events_total{job="tuner", kind="oom_kill"}[5m])')
    finally:
        prom.close()
    if linger is None:
        assert 3.0 <= (lingered(err) or 0) <= 6.0, err  # two scrape intervals of 2 s, as seen
    else:
        assert lingered(err) == 30.0, err
    assert len(read_trace(trace).requests()) == 25
    assert last.value == 25.0  # the whole count: the burst came after the last regular scrape
    assert kills.value == 0.0  # the series is there from the start, at 0
    assert took < 25.0  # one scrape interval (+ the run's own ending, slow on a busy machine), not the 30 s


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_wait_for_a_last_scrape(tmp_path: Path, sig: str) -> None:
    """A scraper that scraped twice and does not come back: ``--prometheus-linger 120`` would wait two minutes;
    Ctrl-C (or SIGTERM) ends the wait at once, the command's exit code and the trace intact."""
    import signal

    port = free_port()
    trace = tmp_path / "t.jsonl"
    run = tuner_popen("run", "--headless", "--trace", str(trace), "--prometheus", f"127.0.0.1:{port}",
                      "--prometheus-linger", "120", "--", sys.executable, "-c", "import sys; sys.stdin.readline()",
                      stdin=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        scrapes = 0
        while scrapes < 2:
            assert time.monotonic() < deadline and run.poll() is None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    scrapes += r.status == 200
            except OSError:
                time.sleep(0.2)
        assert run.stdin is not None and run.stderr is not None
        run.stdin.write("\n")
        run.stdin.flush()
        lines = []
        for line in run.stderr:
            lines.append(line)
            if "keeping /metrics up for a last scrape (at most 120 s" in line:
                break
        time.sleep(0.5)
        assert run.poll() is None, "".join(lines)  # still waiting for the scraper
        started = time.monotonic()
        run.send_signal(getattr(signal, sig))
        _, err = run.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, "".join(lines) + err
    assert took < 30.0, took  # (the run's own ending, slow on a busy machine), not the 120 s
    assert "Traceback" not in err and "trace written to" in err
    assert read_trace(trace).end is not None
