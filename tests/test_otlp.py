"""``--otlp URL`` (issue 18 §1): the GenAI conventions' metrics (semantic-conventions v1.41.0), the tuner's
own metrics under ``tuner.``, policy actions as log records — checked in what a receiver process decodes
from the real protobuf with ``opentelemetry-proto`` (``tests/helpers/otlp_receiver.py``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli import assert_one_line_error, tuner, tuner_env
from tuner.errors import UserError
from tuner.outputs.otlp import (
    DURATION_BUCKETS,
    MAX_PENDING_LOGS,
    SCHEMA_URL,
    SERVER_TPOT_BUCKETS,
    SERVER_TTFT_BUCKETS,
    TOKEN_BUCKETS,
    OtlpExporter,
    endpoints,
    otel_name,
)
from tuner.records import Action, Applied
from tuner.trace import TraceWriter, make_header, read_trace

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otlp extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
RECEIVER = ROOT / "tests" / "helpers" / "otlp_receiver.py"


class Receiver:
    """The receiver process on a free loopback port; ``url`` is its base (``/v1/metrics``, ``/v1/logs``)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.out = tmp_path / f"otlp-{time.monotonic_ns()}.jsonl"
        self.proc = subprocess.Popen([sys.executable, str(RECEIVER), str(self.out), *args], stdout=subprocess.PIPE,
                                     text=True, env=tuner_env())  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on"), line
        self.port = int(line.split()[-1])
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self, signal: str) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        rows = [json.loads(x) for x in self.out.read_text().splitlines()]
        return [r for r in rows if r["signal"] == signal]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path)
    yield r
    r.close()


def value(v: dict[str, Any]) -> Any:
    """An OTLP AnyValue as MessageToDict renders it -> a Python value."""
    if "string_value" in v:
        return v["string_value"]
    if "int_value" in v:
        return int(v["int_value"])
    if "double_value" in v:
        return float(v["double_value"])
    if "bool_value" in v:
        return v["bool_value"]
    if "kvlist_value" in v:
        return {kv["key"]: value(kv.get("value", {})) for kv in v["kvlist_value"].get("values", [])}
    if "array_value" in v:
        return [value(x) for x in v["array_value"].get("values", [])]
    return None


def attrs(obj: dict[str, Any]) -> dict[str, Any]:
    return {kv["key"]: value(kv.get("value", {})) for kv in obj.get("attributes", [])}


def metrics_of(req: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [rm] = req["body"]["resource_metrics"]
    [sm] = rm["scope_metrics"]
    return {m["name"]: m for m in sm["metrics"]}


def number(dp: dict[str, Any]) -> float:
    return float(dp["as_double"]) if "as_double" in dp else float(dp.get("as_int", 0))


def expected_buckets(values: list[float], bounds: tuple[float, ...]) -> list[int]:
    out = [0] * (len(bounds) + 1)
    for v in values:
        i = 0
        while i < len(bounds) and v > bounds[i]:
            i += 1
        out[i] += 1
    return out


def check_histogram(m: dict[str, Any], unit: str, bounds: tuple[float, ...]) -> list[dict[str, Any]]:
    assert m["unit"] == unit and "histogram" in m, m
    assert m["histogram"]["aggregation_temporality"] == "AGGREGATION_TEMPORALITY_CUMULATIVE"
    for dp in m["histogram"]["data_points"]:
        assert [float(b) for b in dp["explicit_bounds"]] == list(bounds)
        assert sum(int(c) for c in dp["bucket_counts"]) == int(dp["count"])
    return list(m["histogram"]["data_points"])


# -- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "metrics", "logs"),
    [
        ("http://collector:4318", "http://collector:4318/v1/metrics", "http://collector:4318/v1/logs"),
        ("http://collector:4318/", "http://collector:4318/v1/metrics", "http://collector:4318/v1/logs"),
        ("https://otel.example/otlp/v1/metrics", "https://otel.example/otlp/v1/metrics",
         "https://otel.example/otlp/v1/logs"),
    ],
)  # fmt: skip
def test_endpoints(url: str, metrics: str, logs: str) -> None:
    assert endpoints(url) == (metrics, logs)


@pytest.mark.parametrize(
    ("url", "msg"),
    [("grpc://c:4317", "OTLP/gRPC is not supported"), ("collector:4318", "give an http"),
     ("http://", "give an http"), ("http://c:99999", "is not a URL"), ("http://c:4318/?a=1", "without .query")],
)  # fmt: skip
def test_endpoints_refuse_with_one_line(url: str, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        endpoints(url)


def test_cli_refuses_a_bad_otlp_url_before_starting_anything(tmp_path: Path) -> None:
    err = assert_one_line_error(tuner("run", "--trace", str(tmp_path / "t.jsonl"), "--otlp", "grpc://c:4317", "--",
                                      "true"))  # fmt: skip
    assert "OTLP/gRPC is not supported" in err
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize(
    ("key", "expect"),
    [
        ("tree_rss_bytes", ("tuner.tree_rss", "By", False)),
        ("tree_cpu_seconds_total", ("tuner.tree_cpu", "s", True)),
        ("gpu_util_ratio", ("tuner.gpu_util", "1", False)),
        ("gpu_temp_celsius", ("tuner.gpu_temp", "Cel", False)),
        ("gpu_power_watts", ("tuner.gpu_power", "W", False)),
        ("tree_threads", ("tuner.tree_threads", "1", False)),
        ("cgroup_oom_kills_total", ("tuner.cgroup_oom_kills", "1", True)),
        ("engine_prompt_tokens_per_second", ("tuner.engine_prompt_tokens", "1/s", False)),
        ("knob_precision_bits", ("tuner.knob_precision", "bit", False)),
    ],
)
def test_tuner_metric_names_carry_the_unit_in_the_unit_field(key: str, expect: tuple[str, str, bool]) -> None:
    assert otel_name(key) == expect


# -- in-process: the GenAI server metrics, against the trace --------------------------------------------


def run_with_otlp(tmp_path: Path, url: str, *cmd: str, env: dict[str, str] | None = None,
                  timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], Path]:  # fmt: skip
    trace = tmp_path / "t.jsonl"
    cp = subprocess.run([sys.executable, "-m", "tuner", "run", "--headless", "--trace", str(trace), "--otlp", url,
                         "--", *cmd], capture_output=True, text=True, timeout=timeout,
                        env=tuner_env(OTEL_METRIC_EXPORT_INTERVAL="1000", **(env or {})))  # fmt: skip
    return cp, trace


def test_in_process_run_exports_the_server_metrics_the_trace_records(tmp_path: Path, receiver: Receiver) -> None:
    pytest.importorskip("torch", reason="the demo workload runs the built-in model on torch (the torch extra)")
    n = 6
    cp, trace = run_with_otlp(tmp_path, receiver.url, sys.executable, "-m", "tuner.demo.workload", "--requests",
                              str(n), "--rate", "0", "--max-new-tokens", "12")  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr and "OTLP" not in cp.stderr
    data = read_trace(trace)
    reqs = [e.data for e in data.requests()]
    assert len(reqs) == n
    exports = receiver.requests("metrics")
    assert len(exports) >= 2 and all(r["content_type"] == "application/x-protobuf" for r in exports)
    body = exports[-1]["body"]
    [rm] = body["resource_metrics"]
    assert rm["schema_url"] == SCHEMA_URL and rm["scope_metrics"][0]["schema_url"] == SCHEMA_URL
    assert rm["scope_metrics"][0]["scope"]["name"] == "inference-tuner"
    res = attrs(rm["resource"])
    assert res["service.name"] == "inference-tuner" and res["telemetry.sdk.language"] == "python"
    m = metrics_of(exports[-1])
    genai = {"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "local", "gen_ai.system": "local"}
    cases = (("gen_ai.server.request.duration", "e2e_seconds", DURATION_BUCKETS),
             ("gen_ai.server.time_to_first_token", "ttft_seconds", SERVER_TTFT_BUCKETS),
             ("gen_ai.server.time_per_output_token", "tpot_seconds", SERVER_TPOT_BUCKETS))  # fmt: skip
    for name, field, bounds in cases:
        [dp] = check_histogram(m[name], "s", bounds)
        assert attrs(dp) == genai, name
        seen = [float(r[field]) for r in reqs if isinstance(r.get(field), (int, float))]
        assert int(dp["count"]) == len(seen) == n and float(dp["sum"]) == pytest.approx(sum(seen)), name
        assert [int(c) for c in dp["bucket_counts"]] == expected_buckets(seen, bounds), name
        assert float(dp["min"]) == pytest.approx(min(seen)) and float(dp["max"]) == pytest.approx(max(seen))
    usage = {attrs(dp)["gen_ai.token.type"]: dp for dp in check_histogram(m["gen_ai.client.token.usage"], "{token}",
                                                                           TOKEN_BUCKETS)}  # fmt: skip
    assert float(usage["input"]["sum"]) == sum(r["prompt_tokens"] for r in reqs)
    assert float(usage["output"]["sum"]) == sum(r["tokens"] for r in reqs)
    assert int(usage["output"]["count"]) == n
    # the tuner's own metrics: units in the unit field, counters cumulative from the session's start
    cpu = m["tuner.tree_cpu"]
    assert cpu["unit"] == "s" and cpu["sum"]["is_monotonic"]
    assert cpu["sum"]["aggregation_temporality"] == "AGGREGATION_TEMPORALITY_CUMULATIVE"
    start = int(data.header["started_unix"] * 1e9)
    seen_cpu = []
    for r in exports:
        mm = metrics_of(r)
        if "tuner.tree_cpu" in mm:
            [dp] = mm["tuner.tree_cpu"]["sum"]["data_points"]
            assert int(dp["start_time_unix_nano"]) == start
            seen_cpu.append(number(dp))
    assert seen_cpu == sorted(seen_cpu) and seen_cpu[-1] > 0
    assert m["tuner.self_rss"]["unit"] == "By" and "gauge" in m["tuner.self_rss"]
    assert m["tuner.sys_mem_total"]["unit"] == "By"
    [ticks] = m["tuner.ticks"]["sum"]["data_points"]
    assert data.end is not None and number(ticks) == data.end["ticks"] == len(data.times)
    kinds = {attrs(dp)["tuner.event.kind"]: number(dp) for dp in m["tuner.events"]["sum"]["data_points"]}
    assert kinds["request"] == n
    assert not any(k.startswith("tuner.req_ttft_p") or k == "tuner.tree_cpu_ratio" for k in m)  # left out
    assert any("tuner.process." in k for r in exports for k in metrics_of(r))  # per process, while it ran
    proc = next(metrics_of(r)["tuner.process.rss"] for r in exports if "tuner.process.rss" in metrics_of(r))
    assert {"process.pid", "process.executable.name"} <= set(attrs(proc["gauge"]["data_points"][0]))


def test_opt_in_to_the_latest_conventions_drops_the_deprecated_gen_ai_system(tmp_path: Path,
                                                                              receiver: Receiver) -> None:  # fmt: skip
    hdr = make_header(probes={}, interval_s=0.1)
    for env, expect in (({}, True), ({"OTEL_SEMCONV_STABILITY_OPT_IN": "http,gen_ai_latest_experimental"}, False)):
        exp = OtlpExporter(receiver.url, hdr, interval_s=3600, environ=env)
        exp.count_event("request", {"e2e_seconds": 0.5, "ttft_seconds": 0.1, "tpot_seconds": 0.02, "tokens": 10,
                                    "prompt_tokens": 5})  # fmt: skip
        exp.close()
        m = metrics_of(receiver.requests("metrics")[-1])
        for name in ("gen_ai.server.request.duration", "gen_ai.client.token.usage"):
            for dp in m[name]["histogram"]["data_points"]:
                assert ("gen_ai.system" in attrs(dp)) is expect
                assert attrs(dp)["gen_ai.provider.name"] == "local"


# -- the proxy: the GenAI client metrics ---------------------------------------------------------------


def test_proxy_exports_the_client_metrics_streams_chunks_and_errors(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tuner proxy --otlp`` in front of a fake vLLM 0.32 (tests/test_proxy_engines.py): streaming and whole
    answers on both routes, merged chunks, a stream the engine breaks off and a request it refuses (400)."""
    import openai

    from tests.test_proxy import AppServer
    from tests.test_proxy_engines import MSGS, FakeVllm, start_proxy

    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
    f = FakeVllm(reject="logit_bias")
    up = AppServer(f.app)
    trace = tmp_path / "p.jsonl"
    proxy = start_proxy(up.url, trace, "--otlp", receiver.url)
    try:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        for _ in range(3):
            list(client.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True))  # type: ignore
        list(client.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True, user="merged3"))  # type: ignore
        list(client.completions.create(model="tiny-llama", prompt="Say", stream=True))  # type: ignore
        client.chat.completions.create(model="tiny-llama", messages=MSGS)  # type: ignore  # whole answer
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-llama", messages=MSGS, logit_bias={"1": 1})  # type: ignore
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True, user="die"))  # type: ignore
        time.sleep(1.5)  # a sample drains the requests; an export follows
    finally:
        proxy.stop()
        up.close()
    data = read_trace(trace)
    reqs = [e.data for e in data.events if e.kind == "request"]
    errors = [e.data for e in data.events if e.kind == "request_error"]
    assert len(reqs) == 7 and [e["error"] for e in errors] == ["400"]
    m = metrics_of(receiver.requests("metrics")[-1])
    server = {"server.address": "127.0.0.1", "server.port": int(up.url.rsplit(":", 1)[1])}
    base = {"gen_ai.provider.name": "vllm", "gen_ai.system": "vllm", "gen_ai.request.model": "tiny-llama", **server}
    dur = {(attrs(dp)["gen_ai.operation.name"], attrs(dp).get("error.type")): dp
           for dp in check_histogram(m["gen_ai.client.operation.duration"], "s", DURATION_BUCKETS)}  # fmt: skip
    assert set(dur) == {("chat", None), ("text_completion", None), ("chat", "400"), ("chat", "stream_broken")}
    for (op, err), dp in dur.items():
        expect = {**base, "gen_ai.operation.name": op, **({"error.type": err} if err else {})}
        assert attrs(dp) == expect
    assert int(dur[("chat", None)]["count"]) == 5 and int(dur[("text_completion", None)]["count"]) == 1
    assert int(dur[("chat", "400")]["count"]) == 1 and int(dur[("chat", "stream_broken")]["count"]) == 1
    ok = [r for r in reqs if not r.get("aborted")]
    assert float(dur[("chat", None)]["sum"]) + float(dur[("text_completion", None)]["sum"]) == pytest.approx(
        sum(r["e2e_seconds"] for r in ok))
    # streaming only: time to first chunk, and one observation per output chunk after the first
    ttfc = check_histogram(m["gen_ai.client.operation.time_to_first_chunk"], "s", DURATION_BUCKETS)
    streams = [r for r in reqs if r.get("stream")]
    assert len(streams) == 6 and sum(int(dp["count"]) for dp in ttfc) == 6  # the broken one had its first chunk
    assert sum(float(dp["sum"]) for dp in ttfc) == pytest.approx(sum(r["ttft_seconds"] for r in streams))
    tpoc = check_histogram(m["gen_ai.client.operation.time_per_output_chunk"], "s", DURATION_BUCKETS)
    gaps = [r["chunk_gaps"] for r in streams]
    assert sum(int(dp["count"]) for dp in tpoc) == sum(sum(g["counts"]) for g in gaps)
    per_op = {attrs(dp)["gen_ai.operation.name"]: int(dp["count"]) for dp in tpoc}
    # the captured chat stream has 16 content chunks (15 gaps); merged3 sends them 3 at a time (6 chunks, 5 gaps);
    # the completion stream 16 chunks; the broken one 5 before it died
    assert per_op == {"chat": 3 * 15 + 5 + 4, "text_completion": 15}
    usage = check_histogram(m["gen_ai.client.token.usage"], "{token}", TOKEN_BUCKETS)
    out = sum(float(dp["sum"]) for dp in usage if attrs(dp)["gen_ai.token.type"] == "output")
    assert out == sum(r["tokens"] for r in reqs)


# -- never in the way ---------------------------------------------------------------------------------


def test_a_collector_that_refuses_is_one_line_and_recording_goes_on(tmp_path: Path) -> None:
    r = Receiver(tmp_path, "--status", "503")
    try:
        start = time.monotonic()
        cp, trace = run_with_otlp(tmp_path, r.url, "sleep", "6", env={"OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
        took = time.monotonic() - start
    finally:
        r.close()
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    said = [ln for ln in cp.stderr.splitlines() if "OTLP" in ln]
    assert 1 <= len(said) <= 2, cp.stderr  # once a minute at most (and the end's, if it waited)
    assert said[0].startswith("tuner: OTLP export to http://127.0.0.1:") and "recording go on" in said[0]
    d = read_trace(trace)
    span = float(d.times[-2] - d.times[0])
    assert d.end is not None and span > 1 and len(d.times) - 1 + d.skipped >= span * 10 - 1  # 10 Hz throughout
    assert took < 30


def test_no_collector_at_all_is_the_same(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cp, trace = run_with_otlp(tmp_path, f"http://127.0.0.1:{port}", "sleep", "2",
                              env={"OTEL_EXPORTER_OTLP_TIMEOUT": "1"})  # fmt: skip
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert len([ln for ln in cp.stderr.splitlines() if "OTLP" in ln]) in (1, 2), cp.stderr
    assert read_trace(trace).end is not None


def test_no_collector_and_the_sdks_retries_print_nothing_raw_at_the_end(tmp_path: Path) -> None:
    """With the SDK's own timeout (10 s) the last export is still retrying when the tuner stops waiting (5 s): its
    retry's messages after the end ("Shutdown in progress, aborting retry.", "Exporter already shutdown") stay on
    the one-line route instead of reaching stderr as they are (--quiet: nothing at all)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cp = subprocess.run([sys.executable, "-m", "tuner", "run", "--quiet", "--trace", str(tmp_path / "t.jsonl"),
                         "--otlp", f"http://127.0.0.1:{port}", "--", "sleep", "2"], capture_output=True, text=True,
                        timeout=120, env=tuner_env(OTEL_METRIC_EXPORT_INTERVAL="500"))  # fmt: skip
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr


def test_a_stuck_collector_delays_neither_sampling_nor_the_end(tmp_path: Path) -> None:
    """The collector reads each request and never answers: the sampler goes on at 100 Hz, and the session
    ends at most ``CLOSE_WAIT_S`` after its command."""
    r = Receiver(tmp_path, "--hang")
    try:
        trace = tmp_path / "t.jsonl"
        start = time.monotonic()
        cp = subprocess.run([sys.executable, "-m", "tuner", "run", "--headless", "--interval", "0.01", "--trace",
                             str(trace), "--otlp", r.url, "--", "sleep", "6"], capture_output=True, text=True,
                            timeout=120, env=tuner_env(OTEL_METRIC_EXPORT_INTERVAL="200"))  # fmt: skip
        took = time.monotonic() - start
    finally:
        r.close()
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert "the last export did not finish in 5 s; left behind" in cp.stderr
    d = read_trace(trace)
    span = float(d.times[-2] - d.times[0])  # (the last one is the final tick, taken after the command ended)
    assert d.end is not None and span > 1.0  # (the sidecar's start takes seconds on a loaded machine)
    # at 100 Hz every tick was taken or, when the busy machine made the sampler late, counted: none waited on OTLP
    assert len(d.times) - 1 + d.skipped >= span * 100 - 2
    assert took < 6 + 5 + 15  # (the interpreter's start on a busy machine is the rest)


def test_actions_wait_in_a_bounded_queue_and_drops_are_counted(tmp_path: Path) -> None:
    r = Receiver(tmp_path, "--hang")
    try:
        exp = OtlpExporter(r.url, make_header(probes={}, interval_s=0.1), interval_s=3600)
        line = b'{"k":"action","t":1.0,"policy":"p","knob":"k","value":1,"outcome":"applied"}'
        for _ in range(3 * MAX_PENDING_LOGS):
            exp.trace_line(line, "action")
            exp.trace_line(b"{}", "tick")  # every other kind is ignored at once
        assert exp.dropped_logs >= MAX_PENDING_LOGS  # the export thread is stuck on the first batch
        m = {x.name: x for x in exp.collect().resource_metrics[0].scope_metrics[0].metrics}
        [dp] = m["tuner.otlp.dropped"].data.data_points
        assert dp.value == exp.dropped_logs and dp.attributes == {"tuner.signal": "logs"}
        exp.close()
    finally:
        r.close()


# -- policy actions as log records --------------------------------------------------------------------


def test_policy_actions_are_log_records_with_their_event_name_and_evidence(tmp_path: Path,
                                                                           receiver: Receiver) -> None:  # fmt: skip
    w = TraceWriter(tmp_path / "t.jsonl", make_header(probes={}, interval_s=0.1))
    exp = OtlpExporter(receiver.url, w.header, interval_s=3600)
    w.add_line_listener(exp.trace_line)
    w.action(Applied(2.5, Action("batch_size", "batch_size", 16, "knee search: 16 beats 8",
                                 {"tokens_per_second": 812.5, "window": [8, 16], "limit": "host memory"}),
                     "applied", previous=8, result={"sent": 1}))  # fmt: skip
    w.action(Applied(3.0, Action("precision", "precision", "int8", "memory"), "refused", previous="fp32"))
    w.close()
    deadline = time.monotonic() + 10
    while not receiver.requests("logs") and time.monotonic() < deadline:  # within a second, without waiting
        time.sleep(0.1)  # for the metrics interval (an hour here)
    exp.close()
    [req] = receiver.requests("logs")
    [rl] = req["body"]["resource_logs"]
    assert rl["schema_url"] == SCHEMA_URL
    [sl] = rl["scope_logs"]
    assert sl["scope"]["name"] == "inference-tuner" and sl["schema_url"] == SCHEMA_URL
    first, second = sl["log_records"]
    assert first["event_name"] == second["event_name"] == "tuner.policy.action"
    assert attrs(first) == {"tuner.policy": "batch_size", "tuner.knob": "batch_size", "tuner.outcome": "applied",
                            "tuner.value": 16, "tuner.previous": 8}  # fmt: skip
    assert first["severity_number"] == "SEVERITY_NUMBER_INFO" and second["severity_number"] == "SEVERITY_NUMBER_WARN"
    body = value(first["body"])
    assert body["reason"] == "knee search: 16 beats 8" and body["result"] == {"sent": 1}
    assert body["evidence"] == {"tokens_per_second": 812.5, "window": [8, 16], "limit": "host memory"}
    t0 = w.header["started_unix"]
    assert int(first["time_unix_nano"]) == pytest.approx((t0 + 2.5) * 1e9, abs=1e3)
    assert attrs(second)["tuner.value"] == "int8"


@pytest.mark.slow
def test_tuner_demo_with_a_policy_sends_its_actions(tmp_path: Path, receiver: Receiver) -> None:
    pytest.importorskip("torch", reason="the demo runs the built-in model on torch (the torch extra)")
    trace = tmp_path / "d.jsonl"
    cp = subprocess.run([sys.executable, "-m", "tuner", "demo", "--headless", "--duration", "25", "--policy",
                         "interactive", "--trace", str(trace), "--otlp", receiver.url], capture_output=True,
                        text=True, timeout=400, env=tuner_env(OTEL_METRIC_EXPORT_INTERVAL="2000"))  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    actions = read_trace(trace).actions
    records = [lr for req in receiver.requests("logs") for rl in req["body"]["resource_logs"]
               for sl in rl["scope_logs"] for lr in sl["log_records"]]  # fmt: skip
    assert actions and len(records) == len(actions)
    assert [(attrs(r)["tuner.policy"], attrs(r)["tuner.outcome"]) for r in records] == [
        (a["policy"], a["outcome"]) for a in actions]
    assert all(math.isfinite(float(r["time_unix_nano"])) for r in records)
