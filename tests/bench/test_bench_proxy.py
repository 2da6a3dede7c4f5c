"""What ``tuner proxy`` costs a client: added TTFT and lost tokens/s, against direct calls in the same run.

Goals (issue: proxy): <= 2 ms added to TTFT at p50; <= 2% throughput loss at 32 concurrent streams.

Setup: a fake fast upstream (this file run as a script: uvicorn + Starlette in its own process) that
answers a streaming chat request at once and then sends ``TOKENS`` SSE chunks ``PACE_S`` apart, like a
model server decoding at 1/PACE_S tokens/s per stream (default 50 ms: 20 tokens/s a stream, 640 tokens/s
for 32 streams; ``TUNER_BENCH_PACE_MS`` changes it — at 20 ms the client and the upstream alone already
saturate this 2-core machine and the figure measures CPU contention, not the proxy); the real ``tuner
proxy`` CLI in front of it (its own process, sampling and recording a trace as in production); an async
httpx client here.  Direct, proxied and relayed rounds alternate so background load hits all alike.

- TTFT: sequential requests, time from sending to the first chunk with text; the median of paired
  differences (each proxied request against the direct one just before it; the judged figure), and p50 of
  proxied - p50 of direct.  Second baseline: a bare asyncio TCP relay process (no
  HTTP at all) in the same path — what one more process hop costs on this machine.
- Throughput: 32 concurrent streams of ``TOKENS`` chunks; text chunks received / wall time of the round;
  ``TPUT_PAIRS`` pairs of a direct round then a proxied one, the loss taken from the median pair ratio.
- CPU: the proxy process's CPU seconds per request and per streamed token (psutil, all its threads,
  sampler included), and the upstream's per token for scale.

Every figure is taken against the direct baseline of the same run (a difference for TTFT, a ratio for
tokens/s), and both goals are asserted at their own thresholds after the figures are printed (a miss fails
the bench run).  Run it on a quiet machine: on this shared 2-core VM the direct TTFT alone swings 2-8 ms with
the other jobs, and at load 4.6-6.4 the proxy added 3.7-3.9 ms (the bare TCP relay's figure shows how much
of that any extra process hop costs there).  Also asserted: every stream arrives whole through the proxy
and the trace holds every proxied request.

Run: ``.venv/bin/pytest tests/bench/test_bench_proxy.py -m bench --benchmark-enable -s -p no:randomly``
(``TUNER_BENCH_SECONDS`` scales the throughput rounds, default 3 s: one whole 5 s round per side and pair.)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bench.goals import judge

ROOT = Path(__file__).resolve().parents[2]
PACE_S = float(os.environ.get("TUNER_BENCH_PACE_MS", "50")) / 1e3  # 20 tok/s a stream, 640 tok/s at 32 streams
TOKENS = 100
STREAMS = 32
TTFT_ROUNDS = 150
TPUT_PAIRS = 4  # direct round, proxied round; x4
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0}


def fake_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        n = int(body.get("max_tokens") or TOKENS)

        async def gen() -> AsyncIterator[bytes]:
            for i in range(n):
                ev = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                      "choices": [{"index": 0, "delta": {"content": f"tok{i % 50} "}, "finish_reason": None}]}
                yield b"data: " + json.dumps(ev).encode() + b"\n\n"
                if i + 1 < n:
                    await asyncio.sleep(PACE_S)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models)])


def _wait_line(proc: subprocess.Popen[str], pattern: str) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(pattern, line)
        if m:
            return m.group(1)
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"no line matching {pattern}")


async def _first_chunk(c: httpx.AsyncClient, url: str, max_tokens: int = 2) -> float:
    t = time.perf_counter()
    ttft = None
    async with c.stream("POST", url, json={**BODY, "max_tokens": max_tokens}) as r:
        async for chunk in r.aiter_bytes():
            if ttft is None and b"content" in chunk:
                ttft = time.perf_counter() - t
    assert ttft is not None
    return ttft


async def _stream(c: httpx.AsyncClient, url: str) -> int:
    n = 0
    async with c.stream("POST", url, json={**BODY, "max_tokens": TOKENS}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                n += 1
    return n


async def _throughput(c: httpx.AsyncClient, url: str, seconds: float) -> tuple[int, float]:
    """(tokens, seconds) over rounds of STREAMS concurrent streams, for at least ``seconds`` (whole rounds)."""
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        counts = await asyncio.gather(*(_stream(c, url) for _ in range(STREAMS)))
        assert counts == [TOKENS] * STREAMS
        tokens += sum(counts)
    return tokens, time.perf_counter() - t0


@pytest.mark.bench
def test_proxy_overhead(benchmark: Any, tmp_path: Path) -> None:
    seconds = float(os.environ.get("TUNER_BENCH_SECONDS", "3"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TUNER_SOCKET", None)
    up = subprocess.Popen([sys.executable, __file__, "--serve"], stderr=subprocess.PIPE, text=True, env=env)
    proxy = relay = None
    try:
        upstream = _wait_line(up, r"fake upstream on (http://\S+)")
        relay = subprocess.Popen([sys.executable, __file__, "--relay", upstream], stderr=subprocess.PIPE, text=True,
                                 env=env)
        relay_url = _wait_line(relay, r"relay on (http://\S+)") + "/v1/chat/completions"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "tuner", "proxy", "--upstream", upstream, "--listen", "127.0.0.1:0",
             "--trace", str(tmp_path / "bench.jsonl"), "--headless", "--quiet"],
            stderr=subprocess.PIPE, text=True, env=env,
        )
        # --quiet hides the listening line: find the port from the trace header instead
        deadline = time.monotonic() + 60
        listen = None
        while listen is None and time.monotonic() < deadline:
            try:
                header = json.loads((tmp_path / "bench.jsonl").read_text().splitlines()[0])
                listen = header["proxy"]["listen"]
            except (OSError, IndexError, ValueError, KeyError):
                time.sleep(0.05)
        assert listen is not None, "proxy did not start"
        direct_url, proxy_url = upstream + "/v1/chat/completions", listen + "/v1/chat/completions"

        import psutil

        proxy_ps, up_ps = psutil.Process(proxy.pid), psutil.Process(up.pid)

        def cpu(ps: Any = proxy_ps) -> float:
            t = ps.cpu_times()
            return t.user + t.system

        async def measure() -> dict[str, Any]:
            limits = httpx.Limits(max_connections=STREAMS * 2, max_keepalive_connections=STREAMS * 2)
            async with httpx.AsyncClient(timeout=60, limits=limits) as c:
                for u in (direct_url, proxy_url):  # warm up connections and code paths
                    for _ in range(10):
                        await _first_chunk(c, u)
                d, p, b = [], [], []
                for _ in range(5):
                    await _first_chunk(c, relay_url)
                for _ in range(TTFT_ROUNDS):
                    d.append(await _first_chunk(c, direct_url))
                    p.append(await _first_chunk(c, proxy_url))
                    b.append(await _first_chunk(c, relay_url))
                c0 = cpu()  # CPU seconds per proxied request (psutil counts in 10 ms ticks: take many)
                for _ in range(TTFT_ROUNDS):
                    await _first_chunk(c, proxy_url)
                cpu_req = (cpu() - c0) / TTFT_ROUNDS
                tput_d, tput_p = [], []
                cpu_p = cpu_u = 0.0
                tok_d = tok_p = 0
                for _ in range(TPUT_PAIRS):
                    u0 = cpu(up_ps)
                    n, dt = await _throughput(c, direct_url, seconds / TPUT_PAIRS)
                    cpu_u += cpu(up_ps) - u0
                    tok_d += n
                    tput_d.append(n / dt)
                    c0 = cpu()
                    n, dt = await _throughput(c, proxy_url, seconds / TPUT_PAIRS)
                    cpu_p += cpu() - c0
                    tok_p += n
                    tput_p.append(n / dt)
                cpu_tok, cpu_up_tok = cpu_p / tok_p, cpu_u / tok_d
            return {"d": d, "p": p, "b": b, "tput_d": tput_d, "tput_p": tput_p, "cpu_req": cpu_req, "cpu_tok": cpu_tok,
                    "cpu_up_tok": cpu_up_tok}

        r = asyncio.run(measure())
        d, p, b = r["d"], r["p"], r["b"]
        td, tp = statistics.mean(r["tput_d"]), statistics.mean(r["tput_p"])
        # each proxied round against the direct round just before it: the load of the other jobs on this
        # machine drifts over minutes, a pair shares it
        pair_ratios = [y / x for x, y in zip(r["tput_d"], r["tput_p"], strict=True)]
        import importlib.util

        info = {
            "ttft_direct_p50_ms": round(statistics.median(d) * 1e3, 3),
            "ttft_proxy_p50_ms": round(statistics.median(p) * 1e3, 3),
            "ttft_added_p50_ms": round((statistics.median(p) - statistics.median(d)) * 1e3, 3),
            "ttft_added_paired_p50_ms": round(statistics.median(y - x for x, y in zip(d, p, strict=True)) * 1e3, 3),
            "ttft_added_by_bare_tcp_relay_p50_ms": round((statistics.median(b) - statistics.median(d)) * 1e3, 3),
            "ttft_proxy_over_direct_ratio": round(statistics.median(p) / statistics.median(d), 3),
            "tokens_per_s_direct": round(td, 1),
            "tokens_per_s_proxy": round(tp, 1),
            "throughput_loss_pct": round((1 - statistics.median(pair_ratios)) * 100, 2),
            "throughput_proxy_over_direct_ratio": round(statistics.median(pair_ratios), 4),
            "throughput_pair_ratios": [round(x, 4) for x in pair_ratios],
            "throughput_loss_of_means_pct": round((1 - tp / td) * 100, 2),
            "ideal_tokens_per_s": round(STREAMS / PACE_S, 1),
            "proxy_cpu_ms_per_request": round(r["cpu_req"] * 1e3, 3),
            "proxy_cpu_us_per_token": round(r["cpu_tok"] * 1e6, 1),
            "upstream_cpu_us_per_token": round(r["cpu_up_tok"] * 1e6, 1),
            "streams": STREAMS,
            "pace_ms": PACE_S * 1e3,
            "load_avg_1m": os.getloadavg()[0],
            "uvloop": importlib.util.find_spec("uvloop") is not None,  # uvicorn picks them up when installed
            "httptools": importlib.util.find_spec("httptools") is not None,
        }
        benchmark.extra_info.update(info)

        async def one() -> float:
            async with httpx.AsyncClient(timeout=60) as c:
                return await _first_chunk(c, proxy_url)

        benchmark.pedantic(lambda: asyncio.run(one()), rounds=5, iterations=1)
        print(f"\nproxy overhead: {info}")
        # the trace recorded every proxied request
        from tuner.trace import read_trace

        proxy.send_signal(signal.SIGINT)
        proxy.wait(timeout=30)
        reqs = [e for e in read_trace(tmp_path / "bench.jsonl").events if e.kind == "request"]
        assert len(reqs) >= TTFT_ROUNDS
        results = goals(info)
        for goal, met, figure in results:  # print both before the first miss fails the run
            print(f"{goal}: {figure} -> {'met' if met else 'NOT MET'}")
        for goal, met, figure in results:
            judge(goal, met, figure)
    finally:
        for proc in (proxy, relay, up):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def goals(info: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The issue's two goals, each judged on this run's figures against its own direct baseline: the TTFT a
    proxied request adds is the median of its difference from the direct request sent just before it (the
    neighbours' load drifts within a run, a pair shares it; the difference of the two medians is printed too),
    the throughput loss the median of paired rounds' ratios."""
    added, relay = info["ttft_added_paired_p50_ms"], info["ttft_added_by_bare_tcp_relay_p50_ms"]
    loss = info["throughput_loss_pct"]
    return [
        ("proxy: TTFT added at p50 <= 2 ms", added <= 2.0,
         f"{added:.2f} ms, median of paired requests (difference of medians {info['ttft_added_p50_ms']:.2f} ms; a "
         f"bare TCP relay adds {relay:.2f} ms here; direct p50 {info['ttft_direct_p50_ms']:.2f} ms, load "
         f"{info['load_avg_1m']:.1f})"),
        (f"proxy: throughput loss <= 2% at {info['streams']} streams", loss <= 2.0,
         f"{loss:.2f}%, median of paired rounds (means {info['tokens_per_s_proxy']:.0f} vs "
         f"{info['tokens_per_s_direct']:.0f} tokens/s direct)"),
    ]  # fmt: skip


def test_goals_judge_each_goal_at_its_threshold() -> None:
    base = {"ttft_added_p50_ms": 3.0, "ttft_added_by_bare_tcp_relay_p50_ms": 0.7, "ttft_direct_p50_ms": 2.0,
            "load_avg_1m": 1.0, "streams": 32, "tokens_per_s_proxy": 600.0, "tokens_per_s_direct": 610.0}
    ok = goals({**base, "ttft_added_paired_p50_ms": 2.0, "throughput_loss_pct": 2.0})
    assert [m for _, m, _ in ok] == [True, True] and ok[1][2].startswith("2.00%")
    bad = goals({**base, "ttft_added_paired_p50_ms": 2.01, "throughput_loss_pct": 2.01})
    assert [m for _, m, _ in bad] == [False, False] and bad[0][2].startswith("2.01 ms")


def _relay(upstream: str) -> None:
    """A bare TCP relay (no HTTP): the least any proxy process in the path can add on this machine."""
    host, port = upstream.removeprefix("http://").rsplit(":", 1)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(f"relay on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", file=sys.stderr, flush=True)
        await server.serve_forever()

    asyncio.run(main())


def _serve() -> None:
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(f"fake upstream on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(fake_app(), log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    elif sys.argv[1:2] == ["--relay"]:
        _relay(sys.argv[2])
