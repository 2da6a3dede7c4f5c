"""The engine probe on real engine output: vLLM 0.32's own ``/metrics`` (captured), and SGLang, TGI and llama.cpp
pages written from their sources (``tests/data/engines/README.md``), served by a real HTTP server; bad servers
(404, garbage, slow, huge, gone) and restarts; the CLI as a user runs it."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest.mock import ANY

import pytest

from tests.cli import assert_one_line_error, tuner
from tuner.probes.engine import KEYS, EngineProbe, Hist, check_url, metrics_url, parse, quantile
from tuner.trace import read_trace

DATA = Path(__file__).parent / "data"
VLLM_1 = (DATA / "vllm" / "metrics-0.32.0-cpu.txt").read_text()
VLLM_2 = (DATA / "vllm" / "metrics-0.32.0-cpu-with-4xx.txt").read_text()  # an earlier process of that server
SGLANG = (DATA / "engines" / "sglang.txt").read_text()
TGI = (DATA / "engines" / "tgi.txt").read_text()
LLAMACPP = (DATA / "engines" / "llamacpp.txt").read_text()
LLAMACPP_OLD = (DATA / "engines" / "llamacpp-2025-04.txt").read_text()


def raw(text: str, sample: str) -> float:
    """One sample's value read straight from the text (independent of the parser under test)."""
    m = re.search(rf"^{re.escape(sample)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, sample
    return float(m.group(1))


def raw_buckets(text: str, family: str) -> list[tuple[float, float]]:
    return [(float(le), float(v)) for le, v in
            re.findall(rf'^{re.escape(family)}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)$', text, re.M)]


def grown(page: str, more: str) -> str:
    """``page`` after the server counted ``more`` on top: every vLLM counter and histogram sample of ``page``
    plus the same series of ``more`` (gauges and the process start stay ``page``'s).  Its difference from
    ``page`` is a window holding exactly ``more``'s observations."""
    extra = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(vllm:\S+) (\S+)$", more, re.M)}
    out = []
    for line in page.splitlines():
        series, _, value = line.rpartition(" ")
        name = series.split("{")[0]
        if line.startswith("vllm:") and name.endswith(("_total", "_bucket", "_sum", "_count")) and series in extra:
            line = f"{series} {float(value) + extra[series]}"
        out.append(line)
    return "\n".join(out) + "\n"


LATER = grown(VLLM_1, VLLM_2)


def fed(*pages: tuple[str, float], **kw: object) -> EngineProbe:
    """A probe (no thread) that read these pages at these times; its clock stands at the last one."""
    now = [pages[-1][1]]
    p = EngineProbe("http://127.0.0.1:9/metrics", autostart=False, clock=lambda: now[0], **kw)  # type: ignore[arg-type]
    for text, t in pages:
        assert p.feed(text, t), p.error
    return p


def values(p: EngineProbe) -> dict[str, float | None]:
    return dict(p.sample(0.0).values)


# -- mapping, per engine ------------------------------------------------------------------------------------


def test_vllm_capture_maps_to_the_vocabulary() -> None:
    p = fed((VLLM_1, 100.0))
    v = values(p)
    assert p.engine == "vllm" and set(v) == set(KEYS)
    assert v["engine_kv_cache_usage_ratio"] == raw(VLLM_1, "vllm:kv_cache_usage_perc") == 0.0
    assert v["engine_requests_running"] == 0 and v["engine_requests_waiting"] == 0
    assert v["engine_generation_tokens_total"] == raw(VLLM_1, "vllm:generation_tokens_total") == 4968
    assert v["engine_prompt_tokens_total"] == 654 and v["engine_preemptions_total"] == 0
    assert v["engine_generation_tokens_per_second"] is None  # one scrape: no rate yet, and why
    assert "one scrape" in p.reasons()["engine_generation_tokens_per_second"]
    assert p.families == VLLM_1.count("# TYPE ") == 92  # python_*, process_*, http_*, _created: left alone
    assert len(p.recognised) == 13 and p.unsupported == {}


def test_vllm_two_scrapes_give_rates_and_window_percentiles() -> None:
    p = fed((VLLM_1, 100.0), (LATER, 110.0))
    v = values(p)
    assert p.restarts == 0
    # the window holds exactly what VLLM_2's page counted: read it from that page's raw text
    assert v["engine_generation_tokens_per_second"] == pytest.approx(raw(VLLM_2, "vllm:generation_tokens_total") / 10)
    assert v["engine_prompt_tokens_per_second"] == pytest.approx(1014 / 10.0)
    hits, queries = raw(VLLM_2, "vllm:prefix_cache_hits_total"), raw(VLLM_2, "vllm:prefix_cache_queries_total")
    assert v["engine_prefix_cache_hit_ratio"] == pytest.approx(hits / queries)
    for fam, key in (("vllm:time_to_first_token_seconds", "ttft"), ("vllm:inter_token_latency_seconds", "itl"),
                     ("vllm:request_queue_time_seconds", "queue"), ("vllm:e2e_request_latency_seconds", "e2e"),
                     ("vllm:request_time_per_output_token_seconds", "tpot")):
        buckets = raw_buckets(VLLM_2, fam)
        n = buckets[-1][1]
        assert n > 0
        for q, qv in (("p50", 0.5), ("p95", 0.95)):
            got = v[f"engine_{key}_{q}_seconds"]
            assert got is not None
            # inside the bucket where the rank falls (the resolution a histogram has)
            i = next(i for i, (_, c) in enumerate(buckets) if c >= qv * n)
            lo = buckets[i - 1][0] if i else 0.0
            assert lo <= got <= buckets[i][0], (key, q, got, buckets)
        if key in ("ttft", "itl"):
            mean = raw(VLLM_2, fam + "_sum") / raw(VLLM_2, fam + "_count")
            assert v[f"engine_{key}_mean_seconds"] == pytest.approx(mean)
    # the window moves on: a page equal to the last one, 11 s later, counts nothing new
    p.feed(LATER, 121.0)
    v = values(p)
    assert v["engine_generation_tokens_per_second"] == 0 and v["engine_ttft_p95_seconds"] is None


def old_names(page: str) -> str:
    """A page in vLLM's older spelling (V1 <= 0.10: ``gpu_`` cache names; <= 0.10: ``time_per_output_token``)."""
    return (page.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
            .replace("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
            .replace("vllm:prefix_cache_", "vllm:gpu_prefix_cache_"))


def test_older_vllm_names_are_read_too() -> None:
    p = fed((old_names(VLLM_1), 1.0), (old_names(LATER), 2.0))
    assert {"vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds", "vllm:gpu_prefix_cache_hits",
            "vllm:gpu_prefix_cache_queries"} <= set(p.recognised)
    assert values(p) == values(fed((VLLM_1, 1.0), (LATER, 2.0))) | {"engine_scrape_seconds": ANY}
    busy = old_names(VLLM_1).replace('vllm:gpu_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0',
                                     'vllm:gpu_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.25')
    assert values(fed((busy, 1.0)))["engine_kv_cache_usage_ratio"] == 0.25


def test_sglang_tgi_and_llamacpp_pages() -> None:
    v = values(fed((SGLANG, 1.0)))
    assert v["engine_kv_cache_usage_ratio"] == raw(SGLANG, "sglang:token_usage") == 0.0055
    assert v["engine_requests_running"] == 2 and v["engine_requests_waiting"] == 1
    assert v["engine_generation_tokens_total"] == 576 and v["engine_preemptions_total"] is None
    p = fed((SGLANG, 1.0))
    assert "SGLang" in p.unsupported["engine_preemptions_total"]

    p = fed((TGI, 1.0))
    v = values(p)
    assert p.engine == "tgi"
    # TGI declares counters without _total: the parser adds it to the samples; the page still maps
    assert v["engine_requests_running"] == raw(TGI, "tgi_batch_current_size") == 1
    assert v["engine_requests_waiting"] == 0
    assert v["engine_kv_cache_usage_ratio"] == pytest.approx(180 / 16384)
    assert v["engine_generation_tokens_total"] == raw(TGI, "tgi_request_generated_tokens_sum") == 180
    assert "TGI" in p.unsupported["engine_ttft_p95_seconds"]

    p = fed((LLAMACPP, 1.0))
    v = values(p)
    assert p.engine == "llamacpp" and v["engine_requests_running"] == 1 and v["engine_requests_waiting"] == 0
    assert v["engine_kv_cache_usage_ratio"] is None and "#13660" in p.reasons()["engine_kv_cache_usage_ratio"]
    assert v["engine_generation_tokens_total"] == 640
    v = values(fed((LLAMACPP_OLD, 1.0)))
    assert v["engine_kv_cache_usage_ratio"] == 0.289795 and v["engine_requests_waiting"] == 2
    assert v["engine_prompt_tokens_total"] == 1.84322e6  # printed %g: 6 digits


def test_sglang_prefix_hits_and_llamacpp_decode_time_over_a_window() -> None:
    later = SGLANG.replace("sglang:cached_tokens_total{", "sglang:cached_tokens_total{").replace(
        'sglang:cached_tokens_total{model_name="meta-llama/Llama-3.2-1B-Instruct"} 96.0',
        'sglang:cached_tokens_total{model_name="meta-llama/Llama-3.2-1B-Instruct"} 146.0').replace(
        'sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.2-1B-Instruct"} 406.0',
        'sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.2-1B-Instruct"} 606.0')
    assert later != SGLANG
    assert values(fed((SGLANG, 1.0), (later, 2.0)))["engine_prefix_cache_hit_ratio"] == pytest.approx(50 / 200)
    # SGLang writes cached_tokens_total only once there was a hit: absent before means none
    before = "\n".join(x for x in SGLANG.splitlines() if "cached_tokens" not in x)
    assert values(fed((before, 1.0), (later, 2.0)))["engine_prefix_cache_hit_ratio"] == pytest.approx(146 / 200)
    nxt = LLAMACPP.replace("tokens_predicted_total 640", "tokens_predicted_total 740").replace(
        "tokens_predicted_seconds_total 12.874", "tokens_predicted_seconds_total 14.874")
    v = values(fed((LLAMACPP, 1.0), (nxt, 3.0)))
    assert v["engine_itl_mean_seconds"] == pytest.approx(2.0 / 100)
    assert v["engine_generation_tokens_per_second"] == pytest.approx(50.0)


def test_several_engines_keep_their_labels_as_devices() -> None:
    """vLLM with two engines (data parallel): sums over the server, and each engine as a device."""
    lines = []
    for line in VLLM_1.splitlines():  # a second engine's series right after the first's, as vLLM prints them
        lines.append(line)
        if line.startswith(("vllm:num_requests_running{", "vllm:kv_cache_usage_perc{",
                            "vllm:generation_tokens_total{")):
            lines.append(line.replace('engine="0"', 'engine="1"'))
    two = "\n".join(lines)
    two = two.replace('vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0',
                      'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 3.0')
    two = re.sub(r'(vllm:kv_cache_usage_perc\{engine="1",model_name="tiny-llama"\}) 0.0', r"\1 0.5", two)
    v = values(fed((two, 1.0)))
    assert v["engine_requests_running"] == 3 and v["engine_requests_running/0"] == 3
    assert v["engine_requests_running/1"] == 0
    assert v["engine_kv_cache_usage_ratio"] == 0.5 and v["engine_kv_cache_usage_ratio/0"] == 0.0  # the fullest
    assert v["engine_generation_tokens_total"] == 2 * 4968
    assert not any(k.endswith("/tiny-llama") for k in v)  # the model is the same everywhere: not a device part


# -- restarts ------------------------------------------------------------------------------------------------


def test_a_restart_counts_from_the_new_process() -> None:
    """The two captures are two processes of one server (VLLM_2's started 270 s earlier).  Either order is a
    restart: going down (7344 -> 4968 tokens), or up — a new process that has counted past the old one's
    values, which only its start time gives away."""
    for first, second in ((VLLM_2, VLLM_1), (VLLM_1, VLLM_2)):
        p = fed((first, 100.0), (second, 101.0))
        v = values(p)
        assert p.restarts == 1 and any("restarted" in m for m, _ in p.take_notes())
        new = raw(second, "vllm:generation_tokens_total")
        assert v["engine_generation_tokens_per_second"] == pytest.approx(new)  # all counted since the restart
        assert v["engine_generation_tokens_total"] == new  # as the engine prints it
        assert v["engine_ttft_mean_seconds"] == pytest.approx(
            raw(second, "vllm:time_to_first_token_seconds_sum") / raw(second, "vllm:time_to_first_token_seconds_count"))
        p.feed(grown(second, VLLM_2), 102.0)  # and on from there: ordinary deltas again
        assert values(p)["engine_generation_tokens_per_second"] == pytest.approx(7344)
        assert p.restarts == 1
    # without a start time on the page, a counter going down is the sign
    strip = "\n".join(x for x in VLLM_1.splitlines() if "process_start" not in x)
    p = fed(("\n".join(x for x in VLLM_2.splitlines() if "process_start" not in x), 1.0), (strip, 2.0))
    assert p.restarts == 1 and values(p)["engine_generation_tokens_per_second"] == pytest.approx(4968)


def test_llamacpp_process_start_header_resets_the_counters() -> None:
    nxt = LLAMACPP.replace("tokens_predicted_total 640", "tokens_predicted_total 700")
    p = EngineProbe("http://127.0.0.1:9/metrics", autostart=False, clock=lambda: 3.0)
    p.feed(LLAMACPP, 1.0, {"process-start-time-unix": "1700000000"})
    p.feed(nxt, 2.0, {"process-start-time-unix": "1700000000"})
    assert values(p)["engine_generation_tokens_per_second"] == 60
    p.feed(nxt.replace("700", "710"), 3.0, {"process-start-time-unix": "1700000099"})  # a new process: 710 since
    assert values(p)["engine_generation_tokens_per_second"] == 710 and p.restarts == 1


def test_quantile_follows_prometheus() -> None:
    h = Hist((0.1, 0.2, 0.5, float("inf")), [2.0, 6.0, 10.0, 10.0], 2.0, 10.0)
    assert quantile(0.5, h) == pytest.approx(0.1 + 0.1 * (5 - 2) / 4)
    assert quantile(0.1, h) == pytest.approx(0.05)  # the first bucket starts at 0
    h2 = Hist((0.1, float("inf")), [1.0, 4.0], 1.0, 4.0)
    assert quantile(0.95, h2) == 0.1  # in +Inf: the largest finite edge
    assert quantile(0.5, Hist((0.1, float("inf")), [0.0, 0.0], 0.0, 0.0)) is None


# -- a real HTTP endpoint -------------------------------------------------------------------------------------


@dataclass
class Behaviour:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    trickle: float = 0.0  # seconds between 100-byte pieces
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0


class Server:
    def __init__(self) -> None:
        self.b = Behaviour(body=VLLM_1.encode())
        b = self.b

        conns = self.conns = set()

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                conns.add(self.connection)

            def do_GET(self) -> None:
                b.hits += 1
                if b.delay:
                    time.sleep(b.delay)
                self.send_response(b.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                for k, v in b.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(b.body)))
                self.end_headers()
                try:
                    if b.trickle:
                        for i in range(0, len(b.body), 100):
                            self.wfile.write(b.body[i : i + 100])
                            self.wfile.flush()
                            time.sleep(b.trickle)
                    else:
                        self.wfile.write(b.body)
                except OSError:
                    pass

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # type: ignore[method-assign]  # a connection we cut: expected
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Gone like a killed server: the listening socket and every kept-alive connection closed."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_scrapes_in_its_own_thread_on_its_cadence(server: Server) -> None:
    p = EngineProbe(server.url, interval=0.1)
    try:
        wait_for(lambda: p.scrapes >= 3)
        v = values(p)
        assert v["engine_generation_tokens_total"] == 4968 and v["engine_scrape_seconds"] is not None
        assert v["engine_generation_tokens_per_second"] == 0  # the same page twice: nothing generated
        notes = p.take_notes()
        assert any("vLLM" in m and "13 of 92 families" in m for m, _ in notes), notes
        before, t0 = server.b.hits, time.monotonic()
        time.sleep(1.0)
        rate = (server.b.hits - before) / (time.monotonic() - t0)  # the sleep runs long on a loaded box
        assert 3 <= rate <= 13, rate  # ~10 Hz, on deadlines: not a busy loop (hundreds a second), no bunching
    finally:
        p.close()


def test_a_slow_server_never_blocks_sampling_and_goes_stale(server: Server) -> None:
    p = EngineProbe(server.url, interval=0.1, timeout=0.3, stale_after=0.6)
    try:
        wait_for(lambda: p.scrapes >= 1)
        server.b.delay = 2.0  # every scrape now times out
        slowest = 0.0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            t = time.perf_counter()
            s = p.sample(0.0)
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.01)
        assert slowest < 0.01  # sample() returns the last values; it never waits for the engine
        assert all(v is None for v in s.values.values())
        why = p.reasons()["engine_requests_running"]
        assert "stale" in why and "no answer in time" in why, why
        assert any("stale" in m for m, lvl in p.take_notes() if lvl == "warn")
        server.b.delay = 0.0
        wait_for(lambda: values(p)["engine_requests_running"] == 0)
        assert any("fresh again" in m for m, _ in p.take_notes())
    finally:
        p.close()


def test_a_trickling_answer_is_cut_at_the_timeout(server: Server) -> None:
    server.b.trickle = 0.05  # 55 KB in 100-byte pieces: ~27 s
    p = EngineProbe(server.url, autostart=False, timeout=0.5)
    t = time.monotonic()
    assert not p.scrape_once()
    assert time.monotonic() - t < 1.5 and "longer than 0.5 s" in str(p.error)


def test_404_stops_scraping_with_the_flag_to_use(server: Server) -> None:
    server.b.status, server.b.body = 404, b"Not Found"
    p = EngineProbe(server.url, interval=0.05)
    try:
        wait_for(lambda: p.stopped is not None)
        time.sleep(0.3)
        assert server.b.hits == 1  # no retry loop against a page that does not exist
        msg = p.status() or ""
        assert "404" in msg and "--metrics" in msg and "--enable-metrics" in msg and "\n" not in msg
        assert all(v is None for v in values(p).values())
    finally:
        p.close()
    server.b.status = 501  # llama.cpp without --metrics
    server.b.body = (b'{"error":{"code":501,"message":"This server does not support metrics endpoint.",'
                     b'"type":"not_supported_error"}}')
    p = EngineProbe(server.url, autostart=False)
    assert not p.scrape_once() and "501" in str(p.stopped) and "--metrics" in str(p.stopped)


def test_garbage_huge_and_unknown_pages(server: Server) -> None:
    p = EngineProbe(server.url, autostart=False, max_bytes=1 << 16)
    server.b.body = b"<html><body>Welcome to nginx!</body></html>"
    assert not p.scrape_once() and "no vLLM, SGLang, TGI or llama.cpp metrics" in str(p.error)
    server.b.body = b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\" 1\n"
    assert not p.scrape_once() and "not a Prometheus text page" in str(p.error)
    server.b.body = b"# TYPE other_metric gauge\nother_metric 1\n"  # Prometheus, but no engine's
    assert not p.scrape_once() and "(1 families)" in str(p.error)
    server.b.body = VLLM_1.encode() * 2  # 110 KB over a 64 KB cap
    assert not p.scrape_once() and "cap" in str(p.error)
    assert p.scrapes == 0 and all(v is None for v in values(p).values())
    server.b.status = 500
    server.b.body = VLLM_1.encode()
    assert not p.scrape_once() and p.error == "HTTP 500"
    server.b.status = 200
    assert p.scrape_once() and values(p)["engine_prompt_tokens_total"] == 654


def test_a_server_that_goes_away(server: Server) -> None:
    now = [0.0]
    p = EngineProbe(server.url, autostart=False, stale_after=5.0, clock=lambda: now[0])
    assert p.scrape_once()
    server.close()
    now[0] = 1.0
    assert not p.scrape_once() and p.error in ("connection refused", "no answer in time")
    assert values(p)["engine_prompt_tokens_total"] == 654  # the last good values, until they are stale
    now[0] = 5.5
    assert all(v is None for v in values(p).values())
    assert "5.5 s ago" in p.reasons()["engine_prompt_tokens_total"]


def test_urls() -> None:
    assert metrics_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("https://h/base/") == "https://h/metrics"
    assert check_url("http://h:8000") == "http://h:8000/metrics"
    assert check_url("http://h:8000/custom/path") == "http://h:8000/custom/path"
    with pytest.raises(ValueError):
        check_url("h:8000")
    with pytest.raises(ValueError):
        check_url("http://h:port/metrics")
    assert parse("").engine is None


# -- the CLI ------------------------------------------------------------------------------------------------


def test_tuner_probes_shows_what_was_recognised(server: Server) -> None:
    cp = tuner("probes", "--engine-metrics", server.url)
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert "engine" in out and "vLLM at " + server.url + ": 13 of 92 families recognised" in out
    assert "vllm:kv_cache_usage_perc -> engine_kv_cache_usage_ratio" in out
    assert "engine_generation_tokens_total=4968" in out
    cp = tuner("probes", "--json", "--engine-metrics", server.url)
    (eng,) = [p for p in json.loads(cp.stdout)["probes"] if p["name"] == "engine"]
    assert eng["available"] and eng["detail"]["engine"] == "vllm"
    assert eng["detail"]["recognised"]["vllm:num_preemptions"] == "preempt"
    server.b.status = 404
    cp = tuner("probes", "--engine-metrics", server.url)
    line = next(x for x in cp.stdout.splitlines() if x.startswith("engine"))
    assert "unavailable" in line and "--enable-metrics" in line
    err = assert_one_line_error(tuner("probes", "--engine-metrics", "localhost:8000"))
    assert "--engine-metrics" in err


def test_tuner_run_records_the_engine_metrics(server: Server, tmp_path: Path) -> None:
    trace = tmp_path / "run.jsonl"
    cp = tuner("run", "--quiet", "--trace", str(trace), "--engine-metrics", server.url, "--",
               "python", "-c", "import time; time.sleep(2.5)")
    assert cp.returncode == 0, cp.stderr
    td = read_trace(trace)
    assert td.header["probes"]["engine"]["available"] is True
    col = [v for v in td.column("engine_generation_tokens_total") if v == v and v is not None]
    assert col and col[-1] == 4968
    assert any("vLLM" in str(n.get("msg")) for n in td.notes), td.notes
    err = assert_one_line_error(tuner("run", "--engine-metrics", "ftp://x", "--", "true"))
    assert "--engine-metrics" in err
