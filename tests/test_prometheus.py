"""``--prometheus``: address rules, /metrics as a scraper parses it (names, types, histograms), ``promtool
check metrics`` on a live sidecar serving the demo workload and on every key the probes declare, and a real
Prometheus server scraping ``tuner run --prometheus``."""

from __future__ import annotations

import json
import shlex
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
from tuner.outputs.prometheus import (
    HISTOGRAMS,
    REQUEST_BUCKETS,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    PrometheusExporter,
    parse_listen,
)

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:9000", ("localhost", 9000)),
        ("LocalHost:9000", ("LocalHost", 9000)),
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
        ("no-such-host.invalid:9464", "no-such-host.invalid is not a loopback address"),  # names: no lookup
        ("example.com:9464", "example.com is not a loopback address"),
        ("[localhost]:9464", "expected [IPV6]:PORT"),
        ("127.0.0.1:\u0663", "port must be"),  # a digit, but not an ASCII one
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


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse(scrape_text(port))


def types(text: str) -> dict[str, str]:
    """``# TYPE`` lines: family name -> type."""
    return {ln.split()[2]: ln.split()[3] for ln in text.splitlines() if ln.startswith("# TYPE ")}


def test_metrics_names_labels_and_counters(exporter: PrometheusExporter) -> None:
    exporter.update(
        {
            "tree_rss_bytes": 300.0 * MiB,
            "tree_cpu_ratio": 1.5,  # cores' worth: left out, the counter stands in
            "tree_cpu_seconds_total": 12.5,
            "tree_threads": 9,
            "req_done_total": 2.0,
            "req_tokens_per_second": 50.0,  # windowed: left out
            "engine_generation_tokens_total": 900.0,
            "engine_generation_tokens_per_second": 30.0,  # the windowed rate of a counter exported too: left out
            "engine_kv_cache_usage_ratio": 0.5,
            "gpu_util_ratio/0": 0.25,
            "gpu_util_ratio/1": 0.75,
            "sys_core_cpu_ratio/3": 0.5,
            "probe_cost_seconds/cpu": 0.001,
            "req_ttft_p50_seconds": 0.2,  # a windowed quantile: left out
            "req_tpot_p95_seconds": None,
            "req_seq_rep_4_ratio": 0.05,  # a windowed mean: kept
            "knob_precision_bits": 16,  # bits are not a Prometheus unit: bytes per value
        },
        {
            101: {"name": "python", "ppid": 1, "rss_bytes": 200.0 * MiB, "cpu_ratio": 0.5, "cpu_seconds_total": 3.0},
            102: {"name": "worker", "rss_bytes": 1.0, "threads": 4},
        },
    )
    for _ in range(3):
        exporter.count_tick()
    exporter.count_skipped(2)
    exporter.count_event("request", {"ttft_seconds": 0.1})
    exporter.count_event("request", {})
    exporter.count_event("oom", {"batch_size": 8})
    text = scrape_text(exporter.port)
    got, typ = parse(text), types(text)
    assert got["tuner_tree_rss_bytes"] == [({}, 300.0 * MiB)] and typ["tuner_tree_rss_bytes"] == "gauge"
    assert got["tuner_tree_threads"] == [({}, 9.0)] and typ["tuner_tree_threads"] == "gauge"
    assert got["tuner_tree_cpu_seconds_total"] == [({}, 12.5)] and typ["tuner_tree_cpu_seconds_total"] == "counter"
    assert got["tuner_req_done_total"] == [({}, 2.0)] and typ["tuner_req_done_total"] == "counter"
    assert sorted(got["tuner_gpu_util_ratio"], key=lambda s: s[0]["device"]) == [
        ({"device": "0"}, 0.25),
        ({"device": "1"}, 0.75),
    ]
    assert got["tuner_sys_core_cpu_ratio"] == [({"device": "3"}, 0.5)]
    assert got["tuner_probe_cost_seconds"] == [({"probe": "cpu"}, 0.001)]
    assert got["tuner_req_seq_rep_4_ratio"] == [({}, 0.05)]
    assert got["tuner_engine_generation_tokens_total"] == [({}, 900.0)] and got["tuner_engine_kv_cache_usage_ratio"]
    assert got["tuner_knob_precision_bytes"] == [({}, 2.0)] and "tuner_knob_precision_bits" not in got
    for gone in ("tuner_tree_cpu_ratio", "tuner_req_ttft_p50_seconds", "tuner_req_tpot_p95_seconds",
                 "tuner_req_tokens_per_second", "tuner_engine_generation_tokens_per_second", "tuner_process_cpu_ratio",
                 "tuner_process_ppid"):  # fmt: skip
        assert gone not in got, gone
    assert ({"pid": "101", "name": "python"}, 200.0 * MiB) in got["tuner_process_rss_bytes"]
    assert ({"pid": "102", "name": "worker"}, 1.0) in got["tuner_process_rss_bytes"]
    assert got["tuner_process_cpu_seconds_total"] == [({"pid": "101", "name": "python"}, 3.0)]
    assert typ["tuner_process_cpu_seconds_total"] == "counter"
    assert got["tuner_process_threads"] == [({"pid": "102", "name": "worker"}, 4.0)]
    assert got["tuner_ticks_total"] == [({}, 3.0)]
    assert got["tuner_skipped_ticks_total"] == [({}, 2.0)]
    assert sorted(got["tuner_events_total"], key=lambda s: s[0]["kind"]) == [
        ({"kind": "oom"}, 1.0),
        ({"kind": "oom_kill"}, 0.0),
        ({"kind": "request"}, 2.0),
    ]
    # identity on one series; no host, command line or pid of the session anywhere
    [(info, one)] = got["tuner_info"]
    assert one == 1.0 and set(info) == {"version", "python", "policy", "probes"}
    assert not any({"host", "hostname", "command", "cmdline"} & set(lab) for samples in got.values()
                   for lab, _ in samples)  # fmt: skip
    assert all(set(lab) <= {"pid", "name"} for name, samples in got.items() if name.startswith("tuner_process_")
               for lab, _ in samples)  # fmt: skip
    # nothing from the default registry (python_gc, process_*) leaks in
    assert all(name.startswith("tuner_") for name in got)


def test_info_labels_say_what_runs_and_never_a_path() -> None:
    from tuner.outputs.prometheus import info_labels

    hdr = {"policy": "/home/me/secret-project/policy.toml", "probes": {"cpu": {"available": True},
           "nvidia": {"available": False}, "output": {"available": True}}, "host": "h", "command": ["x"]}  # fmt: skip
    lab = info_labels(hdr)
    assert lab["policy"] == "file" and lab["probes"] == "cpu,output" and set(lab) == {"version", "python", "policy",
                                                                                    "probes"}  # fmt: skip
    assert info_labels({"policy": "interactive"})["policy"] == "interactive"
    assert info_labels({})["policy"] == "none"


def test_bucket_boundaries_are_vllms() -> None:
    """vLLM's lists (``vllm/v1/metrics/loggers.py``): TTFT 0.001..2560 s (22 edges), TPOT/ITL 0.01..80 s (19),
    request latency 0.3..7680 s (21); token counts 1-2-5."""
    assert (len(TTFT_BUCKETS), TTFT_BUCKETS[0], TTFT_BUCKETS[-1]) == (22, 0.001, 2560.0)
    assert (len(TPOT_BUCKETS), TPOT_BUCKETS[0], TPOT_BUCKETS[-1]) == (19, 0.01, 80.0)
    assert (len(REQUEST_BUCKETS), REQUEST_BUCKETS[0], REQUEST_BUCKETS[-1]) == (21, 0.3, 7680.0)
    assert TOKEN_BUCKETS[:7] == (1, 2, 5, 10, 20, 50, 100) and TOKEN_BUCKETS[-1] == 1_000_000
    for b in (TTFT_BUCKETS, TPOT_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS):
        assert list(b) == sorted(set(b))
    assert {h.name for h in HISTOGRAMS} == {
        "req_ttft_seconds", "req_tpot_seconds", "req_queue_seconds", "req_e2e_seconds", "req_prompt_tokens",
        "req_generation_tokens",
    }  # fmt: skip


def test_histograms_get_one_observation_per_finished_request(exporter: PrometheusExporter) -> None:
    reqs = [
        {"ttft_seconds": 0.001, "tpot_seconds": 0.02, "e2e_seconds": 0.3, "queue_seconds": 0.0, "tokens": 1,
         "prompt_tokens": 7},
        {"ttft_seconds": 0.0011, "tpot_seconds": 100.0, "e2e_seconds": 9000.0, "queue_seconds": 0.31, "tokens": 2,
         "prompt_tokens": None},  # no prompt count: not observed there
        {"ttft_seconds": -0.5, "tpot_seconds": None, "e2e_seconds": float("nan"), "queue_seconds": True,
         "tokens": 3},  # a clock that went back, a missing, a NaN, a bool: none observed
    ]  # fmt: skip
    for r in reqs:
        exporter.count_event("request", r)
    exporter.count_event("client_connect", {"ttft_seconds": 1.0})  # not a request: no observation
    text = scrape_text(exporter.port)
    got, typ = parse(text), types(text)
    assert all(typ[f"tuner_{h.name}"] == "histogram" for h in HISTOGRAMS)

    def bucket(name: str, le: str) -> float:
        return next(v for lab, v in got[f"tuner_{name}_bucket"] if lab["le"] == le)

    assert got["tuner_req_ttft_seconds_count"] == [({}, 2.0)]
    assert got["tuner_req_ttft_seconds_sum"][0][1] == pytest.approx(0.0021)
    assert bucket("req_ttft_seconds", "0.001") == 1.0  # le: 0.001 <= 0.001
    assert bucket("req_ttft_seconds", "0.005") == 2.0 and bucket("req_ttft_seconds", "+Inf") == 2.0
    assert bucket("req_tpot_seconds", "80.0") == 1.0 and bucket("req_tpot_seconds", "+Inf") == 2.0
    assert got["tuner_req_e2e_seconds_count"] == [({}, 2.0)] and bucket("req_e2e_seconds", "7680.0") == 1.0
    assert got["tuner_req_queue_seconds_count"] == [({}, 2.0)] and bucket("req_queue_seconds", "0.3") == 1.0
    assert got["tuner_req_generation_tokens_count"] == [({}, 3.0)] and got["tuner_req_generation_tokens_sum"] == [
        ({}, 6.0)]  # fmt: skip
    assert bucket("req_generation_tokens", "2.0") == 2.0
    assert got["tuner_req_prompt_tokens_count"] == [({}, 1.0)]
    les = [lab["le"] for lab, _ in got["tuner_req_ttft_seconds_bucket"]]
    assert len(les) == len(TTFT_BUCKETS) + 1 and les[-1] == "+Inf"


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


def test_cli_refuses_public_address_with_one_line(tmp_path: Path) -> None:
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


# -- promtool: the exposition follows Prometheus' rules ----------------------------------------------


def promtool_or_skip() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus, installed by .ci/run) is not installed")
    return promtool


def promtool_check(promtool: str, text: str) -> None:
    """``promtool check metrics``: exit 0 and nothing said (it prints one line per problem it finds)."""
    cp = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0 and not (cp.stdout + cp.stderr).strip(), cp.stdout + cp.stderr


def every_declared_key() -> tuple[dict[str, float | None], dict[int, dict]]:
    """One tick holding every metric key the probes, the sampler and the agent produce (a real CPU probe
    reading of this process and its per-process fields; the others' declared names, with a device)."""
    import os

    from tuner.commands.replay import KNOB_COLUMNS
    from tuner.core.sampler import _SelfUsage
    from tuner.probes import cgroup, engine, npu, nvidia, output
    from tuner.probes.cpu import CpuProbe

    probe = CpuProbe([os.getpid()], min_window_s=0.0)
    try:
        probe.sample(0.0)
        time.sleep(0.05)
        s = probe.sample(0.1)
    finally:
        probe.close()
    values: dict[str, float | None] = dict(s.values)
    procs = {pid: dict(v) for pid, v in (s.procs or {}).items()}
    declared = [*nvidia.DEVICE_METRICS, *nvidia.TREE_METRICS, *npu.ASCEND_METRICS, ("npu_tree_mem_bytes", "")]
    values.update({f"{name}/0": 1.0 for name, _ in declared})
    values.update(dict.fromkeys(output.METRICS, 1.0))
    values.update(dict.fromkeys((*cgroup.MEM_METRICS, *cgroup.CPU_METRICS, *cgroup.PIDS_METRICS, *cgroup.CGROUP_PSI,
                                 *cgroup.HOST_PSI), 1.0))  # fmt: skip
    values.update(dict.fromkeys(engine.KEYS, 1.0))
    values.update({f"{k}/model_name=m,engine=0": 1.0 for k in engine.PER_DEVICE})
    values.update({f"probe_cost_seconds/{p}": 0.001 for p in ("cpu", "nvidia", "output")})
    self_usage = _SelfUsage()
    try:
        self_usage.read(0.0)
        values.update(self_usage.read(0.1))
    finally:
        self_usage.close()
    values.update(dict.fromkeys(KNOB_COLUMNS, 1.0))
    for v in procs.values():  # what the GPU and NPU probes add per process
        v.update({"gpu_mem_bytes/0": 1.0, "gpu_sm_ratio/0": 0.5, "npu_mem_bytes/0": 1.0})
    return values, procs


def test_no_key_any_probe_declares_ends_in_a_reserved_suffix() -> None:
    """Prometheus keeps ``_count``/``_sum``/``_bucket`` for histograms and summaries, ``_created`` and
    ``_info`` for its own series; a counter must end in ``_total``: true of every key there is, now and for
    whatever a probe adds (it runs on their declared names)."""
    values, procs = every_declared_key()
    names = {k.partition("/")[0] for k in values} | {f.partition("/")[0] for v in procs.values() for f in v}
    assert "tree_cpu_seconds_total" in names and "tree_threads" in names and "cpu_seconds_total" in names
    for n in names:
        assert not n.endswith(("_count", "_sum", "_bucket", "_created", "_info")), n


@pytest.mark.integration
def test_promtool_accepts_every_key_the_tuner_produces(exporter: PrometheusExporter) -> None:
    promtool = promtool_or_skip()
    values, procs = every_declared_key()
    exporter.update(values, procs)
    exporter.count_tick()
    exporter.count_event("request", {"ttft_seconds": 0.1, "tpot_seconds": 0.01, "e2e_seconds": 0.5,
                                     "queue_seconds": 0.0, "tokens": 10, "prompt_tokens": 20})  # fmt: skip
    text = scrape_text(exporter.port)
    assert "tuner_process_gpu_mem_bytes{" in text and 'device="0"' in text
    promtool_check(promtool, text)


@pytest.mark.integration
def test_promtool_on_a_live_sidecar_serving_the_demo_workload(tmp_path: Path) -> None:
    """``tuner run --prometheus`` around the demo workload (the built-in model serving requests through
    ``tuner.client``): its ``/metrics`` passes ``promtool check metrics`` with nothing to say, and each
    histogram counted exactly the finished requests the trace recorded."""
    promtool = promtool_or_skip()
    pytest.importorskip("torch", reason="the demo workload runs the built-in model on torch (the torch extra)")
    n = 6
    port = free_port()
    trace = tmp_path / "t.jsonl"
    # exec: our SIGTERM reaches the sleep itself (a sleep forked by sh outlived it and held our pipes)
    workload = (f"{shlex.quote(sys.executable)} -m tuner.demo.workload --requests {n} --rate 0 "
                "--max-new-tokens 12 >/dev/null; exec sleep 60")  # fmt: skip
    run = tuner_popen("run", "--quiet", "--trace", str(trace), "--prometheus", f"127.0.0.1:{port}",
                      "--", "sh", "-c", workload)  # fmt: skip
    text = ""
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
            try:
                text = scrape_text(port)
            except (urllib.error.URLError, ConnectionError):
                continue
            if f"tuner_req_e2e_seconds_count {float(n)}" in text:
                break
        assert f"tuner_req_e2e_seconds_count {float(n)}" in text, (run.poll(), text[-2000:])
        promtool_check(promtool, text)
    finally:
        run.terminate()
        _, err = run.communicate(timeout=30)
    assert "Traceback" not in err, err
    from tuner.trace import read_trace

    requests = read_trace(trace).requests()
    assert len(requests) == n
    got, typ = parse(text), types(text)
    for h in HISTOGRAMS:  # one observation per finished request that reported the field
        seen = [float(r.data[h.field]) for r in requests if isinstance(r.data.get(h.field), (int, float))]
        assert typ[f"tuner_{h.name}"] == "histogram"
        assert got[f"tuner_{h.name}_count"] == [({}, float(len(seen)))], h.name
        assert got[f"tuner_{h.name}_bucket"][-1] == ({"le": "+Inf"}, float(len(seen)))
        assert got[f"tuner_{h.name}_sum"][0][1] == pytest.approx(sum(seen)), h.name
    for name in ("req_ttft_seconds", "req_e2e_seconds", "req_queue_seconds", "req_generation_tokens",
                 "req_prompt_tokens"):  # fmt: skip
        assert got[f"tuner_{name}_count"] == [({}, float(n))], name  # the demo reports these for every request
    assert got["tuner_req_done_total"] == [({}, float(n))] and typ["tuner_req_done_total"] == "counter"
    assert typ["tuner_tree_cpu_seconds_total"] == "counter" and got["tuner_tree_cpu_seconds_total"][0][1] > 0
    assert not any(k.startswith(("tuner_req_ttft_p", "tuner_tree_cpu_ratio")) for k in got)
    [(info, _)] = got["tuner_info"]
    assert {"cpu", "output"} <= set(info["probes"].split(",")) and info["policy"] == "none"


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
        cpu = server.wait_for("rate(tuner_tree_cpu_seconds_total[5s])")  # a counter Prometheus can rate()
        assert cpu and float(cpu[0]["value"][1]) >= 0
        ticks = query(server.port, "tuner_ticks_total")
        assert ticks and float(ticks[0]["value"][1]) >= 1
        procs = query(server.port, "tuner_process_rss_bytes")
        assert procs and "pid" in procs[0]["metric"]
    finally:
        server.close()
        run.terminate()
        run.wait(timeout=15)
