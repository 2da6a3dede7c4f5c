"""``--prometheus``: address rules, /metrics as a scraper parses it, and a real Prometheus server scraping
``tuner run --prometheus``."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, tuner, tuner_popen
from tuner.errors import UserError
from tuner.outputs.prometheus import PrometheusExporter, parse_listen

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:9000", ("localhost", 9000)),
        ("[::1]:9464", ("::1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("127.3.4.5:1", ("127.3.4.5", 1)),
    ],
)
def test_parse_listen_accepts_loopback(text: str, expect: tuple[str, int]) -> None:
    assert parse_listen(text, False) == expect


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("0.0.0.0:9464", "not a loopback address"),
        ("10.1.2.3:9464", "not a loopback address"),
        ("[::]:9464", "not a loopback address"),
        ("127.0.0.1:0", "port must be"),
        ("127.0.0.1:65536", "port must be"),
        ("127.0.0.1:http", "port must be"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:9464", "brackets"),
        ("[::1]9464", "expected [IPV6]:PORT"),
        ("no-such-host.invalid:9464", "cannot resolve"),
    ],
)
def test_parse_listen_refuses_with_one_line(text: str, msg: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_listen(text, False)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_parse_listen_public_allows_any_address() -> None:
    assert parse_listen("0.0.0.0:9464", True) == ("0.0.0.0", 9464)
    with pytest.raises(UserError):
        parse_listen("0.0.0.0:99999", True)


@pytest.fixture
def exporter() -> Iterator[PrometheusExporter]:
    e = PrometheusExporter(("127.0.0.1", 0))
    yield e
    e.close()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_metrics_names_labels_and_counters(exporter: PrometheusExporter) -> None:
    exporter.update(
        {
            "tree_rss_bytes": 300.0 * MiB,
            "tree_cpu_ratio": 1.5,
            "gpu_util_ratio/0": 0.25,
            "gpu_util_ratio/1": 0.75,
            "sys_core_cpu_ratio/3": 0.5,
            "req_ttft_p50_seconds": None,  # missing: left out
        },
        {
            101: {"name": "python", "ppid": 1, "rss_bytes": 200.0 * MiB, "cpu_ratio": 0.5},
            102: {"name": "worker", "rss_bytes": 1.0},
        },
    )
    for _ in range(3):
        exporter.count_tick()
    exporter.count_skipped(2)
    exporter.count_event("request")
    exporter.count_event("request")
    exporter.count_event("oom")
    got = scrape(exporter.port)
    assert got["tuner_tree_rss_bytes"] == [({}, 300.0 * MiB)]
    assert got["tuner_tree_cpu_ratio"] == [({}, 1.5)]
    assert sorted(got["tuner_gpu_util_ratio"], key=lambda s: s[0]["device"]) == [
        ({"device": "0"}, 0.25),
        ({"device": "1"}, 0.75),
    ]
    assert got["tuner_sys_core_cpu_ratio"] == [({"device": "3"}, 0.5)]
    assert "tuner_req_ttft_p50_seconds" not in got
    assert ({"pid": "101", "name": "python"}, 200.0 * MiB) in got["tuner_process_rss_bytes"]
    assert ({"pid": "102", "name": "worker"}, 1.0) in got["tuner_process_rss_bytes"]
    assert got["tuner_process_cpu_ratio"] == [({"pid": "101", "name": "python"}, 0.5)]
    assert "tuner_process_ppid" not in got
    assert got["tuner_ticks_total"] == [({}, 3.0)]
    assert got["tuner_skipped_ticks_total"] == [({}, 2.0)]
    assert sorted(got["tuner_events_total"], key=lambda s: s[0]["kind"]) == [
        ({"kind": "oom"}, 1.0),
        ({"kind": "request"}, 2.0),
    ]
    # nothing from the default registry (python_gc, process_*) leaks in
    assert all(name.startswith("tuner_") for name in got)


def test_latest_tick_wins_and_scrapes_during_updates_stay_consistent(exporter: PrometheusExporter) -> None:
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            exporter.update({"a_bytes": float(i), "b_bytes": float(i)}, None)  # one tick: a == b
            exporter.count_tick()

    th = threading.Thread(target=writer)
    th.start()
    try:
        for _ in range(20):
            got = scrape(exporter.port)
            assert got["tuner_a_bytes"][0][1] == got["tuner_b_bytes"][0][1]
    finally:
        stop.set()
        th.join()
    exporter.update({"a_bytes": 7.0}, None)
    got = scrape(exporter.port)
    assert got["tuner_a_bytes"] == [({}, 7.0)] and "tuner_b_bytes" not in got


def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            PrometheusExporter(("127.0.0.1", s.getsockname()[1]))


def test_close_frees_the_port() -> None:
    e = PrometheusExporter(("127.0.0.1", 0))
    port = e.port
    e.close()
    e.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def need_probes() -> None:
    pytest.importorskip("tuner.probes.cpu", reason="the CPU probe (tuner.probes/cpu.py) is not in this tree yet")
    pytest.importorskip("tuner.probes.npu", reason="the NPU probe (tuner.probes/npu.py) is not in this tree yet")


def test_cli_refuses_public_address_with_one_line(tmp_path: Path) -> None:
    need_probes()
    cp = tuner("run", "--prometheus", "0.0.0.0:9464", "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert "--prometheus-public" in assert_one_line_error(cp)
    cp = tuner("run", "--prometheus", "127.0.0.1:70000", "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert "port must be" in assert_one_line_error(cp)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        cp = tuner("run", "--prometheus", addr, "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert f"cannot serve Prometheus metrics on {addr}" in assert_one_line_error(cp)


# -- a real Prometheus server --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(target_port: int) -> str:
    """The smallest config that scrapes the tuner every second (YAML is a superset of JSON)."""
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "tuner",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
    )


def test_scrape_config_is_accepted_by_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(scrape_config(9464))
    cp = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def query(api_port: int, q: str) -> list[dict]:
    url = f"http://127.0.0.1:{api_port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


class RealPrometheus:
    """A Prometheus server on loopback scraping ``127.0.0.1:target_port`` every second, data in tmp."""

    def __init__(self, tmp_path: Path, target_port: int) -> None:
        prom = shutil.which("prometheus")
        if prom is None:
            pytest.skip("prometheus (Debian package prometheus, installed by .ci/run) is not installed")
        self.port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(scrape_config(target_port))
        self.proc = subprocess.Popen(
            [prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def wait_for(self, q: str, timeout: float = 18) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(1)
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                result = query(self.port, q)
            except (urllib.error.URLError, ConnectionError):
                continue
            if result:
                return result
        return []

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.integration
def test_real_prometheus_scrapes_the_exporter(tmp_path: Path, exporter: PrometheusExporter) -> None:
    exporter.update({"tree_rss_bytes": 123.0 * MiB, "gpu_util_ratio/0": 0.5}, {7: {"name": "x", "rss_bytes": 1.0}})
    exporter.count_tick()
    server = RealPrometheus(tmp_path, exporter.port)
    try:
        result = server.wait_for("tuner_tree_rss_bytes")
        assert result, "Prometheus never got a tuner_tree_rss_bytes series"
        assert float(result[0]["value"][1]) == 123.0 * MiB
        gpu = query(server.port, "tuner_gpu_util_ratio")
        assert gpu[0]["metric"]["device"] == "0" and float(gpu[0]["value"][1]) == 0.5
        up = query(server.port, 'up{job="tuner"}')
        assert float(up[0]["value"][1]) == 1.0
    finally:
        server.close()


@pytest.mark.integration
def test_real_prometheus_scrapes_tuner_run(tmp_path: Path) -> None:
    need_probes()
    tport = free_port()
    child = "import time; b = b'x' * (50 << 20); time.sleep(20)"
    run = tuner_popen(
        "run", "--quiet", "--trace", str(tmp_path / "t.jsonl"), "--prometheus", f"127.0.0.1:{tport}",
        "--", sys.executable, "-c", child,
    )  # fmt: skip
    server = RealPrometheus(tmp_path, tport)
    try:
        result = server.wait_for("tuner_tree_rss_bytes")
        assert result, "Prometheus never got a tuner_tree_rss_bytes series"
        assert result[0]["metric"]["job"] == "tuner"
        assert float(result[0]["value"][1]) >= 50 * MiB  # the child holds 50 MiB
        ticks = query(server.port, "tuner_ticks_total")
        assert ticks and float(ticks[0]["value"][1]) >= 1
        procs = query(server.port, "tuner_process_rss_bytes")
        assert procs and "pid" in procs[0]["metric"]
    finally:
        server.close()
        run.terminate()
        run.wait(timeout=15)
