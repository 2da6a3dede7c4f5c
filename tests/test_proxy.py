"""``tuner proxy`` as a user meets it: the real CLI in a subprocess, the official ``openai`` client in front,
the demo's OpenAI-compatible server (a real model) or a small fake upstream behind."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.cli import assert_one_line_error, tuner, tuner_popen
from tests.test_demo_serve import MODEL, PROMPT, DemoServer, line_queue
from tuner.core.actuator import ChannelActuator, CommandRefused
from tuner.proxy.server import (
    FairLimiter,
    Proxy,
    ProxyChannel,
    ProxyConfig,
    _Measure,
    parse_listen,
    word_ids,
)
from tuner.records import Action, Knobs
from tuner.trace import read_trace

# -- helpers ------------------------------------------------------------------------------------------


class AppServer:
    """A Starlette app served by uvicorn in a thread of the test process, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets NODELAY
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class ProxyProcess:
    """``tuner proxy --listen 127.0.0.1:0 ... --headless`` as a subprocess; ``url`` is its ``/v1`` base."""

    def __init__(self, upstream: str, trace: Path, *args: str) -> None:
        self.trace = trace
        self.proc = tuner_popen("proxy", "--upstream", upstream, "--listen", "127.0.0.1:0", "--trace", str(trace),
                                "--headless", *args)
        self.lines = line_queue(self.proc.stderr)
        self.seen: list[str] = []
        while True:
            line = self.lines.get(timeout=60)
            self.seen.append(line)
            m = re.search(r"proxy listening on (http://\S+)/v1", line)
            if m:
                self.root = m.group(1)
                self.url = self.root + "/v1"
                return
            assert "Traceback" not in line, self.seen

    def stop(self) -> str:
        """Ctrl-C; returns what it printed.  The trace is complete afterwards."""
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=30)
        time.sleep(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        err = "".join(self.seen)
        assert rc == 0, err
        assert "Traceback" not in err, err
        return err


def chat_text(stream: Any) -> str:
    return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoServer]:
    pytest.importorskip("torch", reason="needs torch (the torch extra): the demo server runs the built-in model")
    s = DemoServer()
    yield s
    s.close()


# -- against the demo model ------------------------------------------------------------------------


def test_answers_pass_through_intact_and_are_measured(demo: DemoServer, tmp_path: Path) -> None:
    trace = tmp_path / "proxy.jsonl"
    p = ProxyProcess(demo.root, trace, "--pid", str(demo.proc.pid))  # the server's process tree is sampled too
    direct = openai.OpenAI(base_url=demo.url, api_key="k")
    via = openai.OpenAI(base_url=p.url, api_key="k")
    try:
        assert [m.id for m in via.models.list().data] == [MODEL]
        kw: dict[str, Any] = {"model": MODEL, "max_tokens": 120, "temperature": 0}
        msgs = [{"role": "user", "content": PROMPT}]
        want = direct.completions.create(prompt=PROMPT, **kw)
        got = via.completions.create(prompt=PROMPT, **kw)
        assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
        want_chat = chat_text(direct.chat.completions.create(messages=msgs, stream=True, **kw))  # type: ignore[arg-type]
        streamed = list(via.chat.completions.create(messages=msgs, stream=True, **kw))  # type: ignore[arg-type]
        assert chat_text(streamed) == want_chat == want.choices[0].text
        with_usage = list(via.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                                 **kw))
        assert "".join(c.choices[0].text for c in with_usage if c.choices) == want.choices[0].text
        assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 120
        chat = via.chat.completions.create(messages=msgs, **kw)  # type: ignore[arg-type]
        assert chat.choices[0].message.content == want.choices[0].text
    finally:
        p.stop()
    td = read_trace(trace)
    reqs = [e.data for e in td.events if e.kind == "request"]
    assert len(reqs) == 4, reqs  # /v1/models is forwarded, not a generation request
    assert td.header["proxy"]["upstream"] == demo.root
    non_stream = [r for r in reqs if r["ttft_seconds"] is None]
    streams = [r for r in reqs if r["ttft_seconds"] is not None]
    assert len(non_stream) == 2 and len(streams) == 2
    for r in reqs:
        assert r["e2e_seconds"] > 0 and r["queue_seconds"] >= 0 and r["temperature"] == 0.0
        assert r["seq_rep_4"] is not None and r["rep_32"] is not None  # greedy text of 120 bytes: many words
    for r in streams:
        assert 0 < r["ttft_seconds"] < r["e2e_seconds"]
        assert 0 < r["tpot_seconds"] < r["ttft_seconds"] + 1
    # tokens: the server's usage when the stream carries it, else one per chunk with text
    by_tokens = sorted(r["tokens"] for r in streams)
    assert by_tokens[1] == 120 and 20 < by_tokens[0] <= 120
    assert sorted(r["prompt_tokens"] for r in non_stream) == [19, 19]
    assert sum(1 for r in non_stream if r["tokens"] == 120) == 2
    ttft = td.column("req_ttft_p50_seconds")
    rep = td.column("req_seq_rep_4_ratio")
    assert any(v == v and v is not None for v in ttft) and any(v == v and v is not None for v in rep)
    assert td.column("req_done_total")[-1] == 4
    rss = [v for v in td.column("tree_rss_bytes") if v == v and v is not None]
    assert rss and min(rss) > 10e6  # the demo server holds torch and a 13 MB model
    assert td.header["pid"] == demo.proc.pid
    # the tools read the trace unchanged
    cp = tuner("report", str(trace))
    assert cp.returncode == 0, cp.stderr


def test_repetition_of_a_looping_answer(demo: DemoServer, tmp_path: Path) -> None:
    """Greedy decoding of the demo model loops; the proxy sees it in the text (words)."""
    trace = tmp_path / "loop.jsonl"
    p = ProxyProcess(demo.root, trace)
    try:
        c = openai.OpenAI(base_url=p.url, api_key="k")
        text = chat_text(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                   max_tokens=255, temperature=0, stream=True))
    finally:
        p.stop()
    (r,) = [e.data for e in read_trace(trace).events if e.kind == "request"]
    words = text.split()
    unique4 = len({tuple(words[i : i + 4]) for i in range(len(words) - 3)})
    assert r["seq_rep_4"] == pytest.approx(1 - unique4 / (len(words) - 3))
    assert r["seq_rep_4"] > 0.1 and r["loop"] is True, text  # "the same as the same as the same as ..."


# -- fake upstreams ------------------------------------------------------------------------------------


class Fake:
    """An OpenAI-ish upstream whose behaviour the tests control and observe."""

    def __init__(self, chunks: int = 5, delay: float = 0.0, stall: float = 0.0) -> None:
        self.chunks, self.delay, self.stall = chunks, delay, stall
        self.bodies: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.started: list[str] = []
        self.cancelled = 0
        self.finished = 0
        self.calls: list[tuple[str, str, bytes]] = []
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.chat, methods=["POST"]),
            Route("/metrics", lambda r: Response(b"Not Found", status_code=404), methods=["GET"]),  # no engine page
            Route("/{path:path}", self.other, methods=["GET", "POST", "PUT", "DELETE"]),
        ])

    async def other(self, request: Request) -> Response:
        body = await request.body()
        self.calls.append((request.method, str(request.url.path) + "?" + request.url.query, body))
        return Response(b"raw:" + body, status_code=201, headers={"x-upstream": "yes"}, media_type="text/plain")

    async def chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.bodies.append(body)
        if body.get("user") == "busy":
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429,
                                headers={"retry-after": "7"})
        if self.stall:
            await asyncio.sleep(self.stall)
        if not body.get("stream"):
            text = " ".join(f"w{i}" for i in range(self.chunks))
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": self.chunks, "total_tokens": 8},
                                 "echo": body})
        return StreamingResponse(self._stream(body), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started.append(str(body.get("user")))
        try:
            for i in range(self.chunks):
                if body.get("user") == "die" and i == 2:
                    raise RuntimeError("upstream crashed mid-stream")
                if self.delay:
                    await asyncio.sleep(self.delay)
                ev = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                      "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
                yield b"data: " + json.dumps(ev).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            self.finished += 1
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


@pytest.fixture
def fake() -> Iterator[tuple[Fake, AppServer]]:
    f = Fake()
    s = AppServer(f.app)
    yield f, s
    s.close()


def test_concurrency_limit_holds_under_50_streaming_clients(tmp_path: Path) -> None:
    f = Fake(chunks=10, delay=0.02)
    up = AppServer(f.app)
    p = ProxyProcess(up.url, tmp_path / "c.jsonl", "--max-concurrency", "4")

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        s = await c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            user=str(i))
        return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0, timeout=60)
        return await asyncio.gather(*(one(c, i) for i in range(50)))

    try:
        texts = asyncio.run(main())
    finally:
        p.stop()
        up.close()
    want = "".join(f"w{i} " for i in range(10))
    assert texts == [want] * 50  # none lost, none cut
    assert f.max_active == 4 and f.finished == 50
    reqs = [e.data for e in read_trace(tmp_path / "c.jsonl").events if e.kind == "request"]
    assert len(reqs) == 50
    assert max(r["batch_size"] for r in reqs) <= 4
    queued = sorted(r["queue_seconds"] for r in reqs)
    assert queued[-1] > 0.2  # the last ones waited for ~11 rounds of 4 streams of 0.2 s
    assert all(r["tokens"] == 10 and r["ttft_seconds"] >= r["queue_seconds"] for r in reqs)


def test_a_policy_drives_the_concurrency_limit(tmp_path: Path) -> None:
    """--policy through the real CLI: the agent's batch-size decision reaches the proxy's limiter through the
    same actuator a socket client gets its knobs from.  The policy starts at 8, but the proxy runs with
    --max-concurrency 3: the session narrows the bounds, so the action records 3 (clamped), the limit in force."""
    policy = tmp_path / "b3.toml"
    policy.write_text("[batch_size]\nmin = 3\nmax = 8\nstart = 8\n")
    f = Fake(chunks=5, delay=0.05)
    up = AppServer(f.app)
    trace = tmp_path / "pol.jsonl"
    p = ProxyProcess(up.url, trace, "--policy", str(policy), "--max-concurrency", "3")
    try:
        deadline = time.monotonic() + 10
        while '"k":"action"' not in trace.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)

        async def main() -> list[str]:
            c = openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0, timeout=60)

            async def one() -> str:
                s = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                    stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

            return await asyncio.gather(*(one() for _ in range(12)))

        texts = asyncio.run(main())
    finally:
        p.stop()
        up.close()
    assert texts == ["w0 w1 w2 w3 w4 "] * 12 and f.max_active == 3
    td = read_trace(trace)
    (act,) = [a for a in td.actions if a["knob"] == "batch_size"]
    assert act["value"] == 3 and act["outcome"] == "clamped" and act["result"]["clients"] == 1
    assert {e.data["batch_size"] for e in td.events if e.kind == "request"} <= {1, 2, 3}
    assert [v for v in td.column("knob_batch_size") if v == v and v is not None][-1] == 3
    cp = tuner("replay", str(trace))  # the offline tools take the proxy's trace as any other
    assert cp.returncode == 0 and "1 the same" in cp.stdout + cp.stderr, cp.stdout + cp.stderr


def test_fair_limiter_is_fifo_and_follows_its_limit() -> None:
    async def main() -> tuple[list[int], int]:
        lim = FairLimiter(2)
        order: list[int] = []
        peak = 0

        async def job(i: int) -> None:
            nonlocal peak
            await lim.acquire()
            try:
                order.append(i)
                peak = max(peak, lim.active)
                await asyncio.sleep(0.01)
            finally:
                lim.release()

        tasks = []
        for i in range(20):
            tasks.append(asyncio.create_task(job(i)))
            await asyncio.sleep(0)
        tasks[7].cancel()  # a client that leaves while queued gives up its place, not a slot
        await asyncio.sleep(0.015)
        lim.set_limit(1)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert lim.active == 0 and lim.waiting == 0
        return order, peak

    order, peak = asyncio.run(main())
    assert order == [i for i in range(20) if i != 7] and peak == 2


# -- knobs, in process: the agent's actuator calls the channel ----------------------------------------


class InProcess:
    """The proxy app on a thread (uvicorn), its channel in our hands — what the session's actuator holds."""

    def __init__(self, upstream: str, **config: Any) -> None:
        self.channel = ProxyChannel()
        self.proxy = Proxy(ProxyConfig(upstream=upstream, **config), self.channel, log=lambda m: None)
        self.server = AppServer(self.proxy.app)
        self.url = self.server.url + "/v1"

    def close(self) -> None:
        self.server.close()
        self.channel.close()


def test_temperature_knob_reaches_the_upstream_request(fake: tuple[Fake, AppServer]) -> None:
    f, up = fake
    ip = InProcess(up.url, temperature_bounds=(0.1, 1.2))
    c = openai.OpenAI(base_url=ip.url, api_key="k")
    msgs = [{"role": "user", "content": "hi"}]
    try:
        c.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
        assert "temperature" not in f.bodies[-1]  # no knob: the request goes as sent
        ip.channel.broadcast_knobs(Knobs(temperature=0.35))
        c.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
        assert f.bodies[-1]["temperature"] == 0.35 and f.bodies[-1]["messages"] == msgs
        c.chat.completions.create(model="m", messages=msgs, temperature=0.9)  # type: ignore[arg-type]
        assert f.bodies[-1]["temperature"] == 0.9  # mode unset: the client's own choice stands
        ip.channel.broadcast_knobs(Knobs(temperature=5.0))
        list(c.chat.completions.create(model="m", messages=msgs, stream=True))  # type: ignore[arg-type]
        assert f.bodies[-1]["temperature"] == 1.2  # clamped into the bounds
    finally:
        ip.close()
    ip = InProcess(up.url, temperature_mode="always")
    c = openai.OpenAI(base_url=ip.url, api_key="k")
    try:
        ip.channel.broadcast_knobs(Knobs(temperature=0.5))
        c.chat.completions.create(model="m", messages=msgs, temperature=0.9)  # type: ignore[arg-type]
        assert f.bodies[-1]["temperature"] == 0.5  # mode always: replaced
    finally:
        ip.close()
    ip.channel.drain()
    rows = [m for _, m in ip.channel.drain() if m["type"] == "request"]
    assert rows == []  # drained above; the channel is empty once read


def test_an_agent_on_the_proxy_records_the_values_requests_get(fake: tuple[Fake, AppServer]) -> None:
    """A policy asks for temperature 1.8 and batch 32 behind a proxy started with --temperature-bounds 0-1.2
    and --max-concurrency 6: with the bounds narrowed to the proxy's (as ``tuner proxy`` does), the arbiter
    clamps and the actions record 1.2 and 6 — the temperature the upstream gets and the limit in force —
    instead of 'applied' values the proxy would never use."""
    from tuner.core.agent import Agent
    from tuner.core.arbiter import Arbiter, narrow_bounds
    from tuner.core.window import Window
    from tuner.policies.base import Bounds, Policy

    class Greedy(Policy):
        name = "greedy"
        knobs = ("temperature", "batch_size")
        interval_s = 0.1

        def decide(self, window: Window, knobs: Knobs) -> list[Action]:
            return [] if knobs.temperature is not None else [
                self.act("temperature", 1.8, "hotter"), self.act("batch_size", 32, "wider")]

    class Notes:
        def __init__(self) -> None:
            self.actions: list[Any] = []

        def action(self, a: Any) -> None:
            self.actions.append(a)

        def note(self, *a: Any, **k: Any) -> None:
            pass

    class Tk:
        def __init__(self, t: float) -> None:
            self.t, self.values, self.events = t, {}, []

    f, up = fake
    ip = InProcess(up.url, temperature_bounds=(0.0, 1.2), max_concurrency=6)
    policy_bounds = {"temperature": Bounds(0.1, 2.0), "batch_size": Bounds(1, 64)}
    narrowed = narrow_bounds(policy_bounds, temperature=(0.0, 1.2), batch_max=6)
    assert narrowed["temperature"] == Bounds(0.1, 1.2) and narrowed["batch_size"] == Bounds(1, 6)
    notes = Notes()
    agent = Agent([Greedy()], Arbiter(bounds=narrowed), ChannelActuator(ip.channel), notes)
    c = openai.OpenAI(base_url=ip.url, api_key="k")
    try:
        agent.step(Tk(0.1))  # type: ignore[arg-type]
        got = {a.action.knob: (a.action.value, a.outcome) for a in notes.actions}
        assert got == {"temperature": (1.2, "clamped"), "batch_size": (6, "clamped")}
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])  # type: ignore[arg-type]
        assert f.bodies[-1]["temperature"] == 1.2 and ip.proxy.effective_limit() == 6
    finally:
        ip.close()
    # a policy range the proxy cannot serve at all: nothing to set, rejected rather than 'applied'
    assert Arbiter(bounds=narrow_bounds(policy_bounds, temperature=(0.0, 0.05))).resolve(
        0.0, [Action("greedy", "temperature", 0.5, "r")], Knobs())[0].outcome == "rejected"


def test_batch_size_knob_lowers_the_concurrency_limit() -> None:
    f = Fake(chunks=5, delay=0.02)
    up = AppServer(f.app)
    ip = InProcess(up.url, max_concurrency=6)

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=ip.url, api_key="k", max_retries=0)

        async def one() -> None:
            s = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
            async for _ in s:
                pass

        await asyncio.gather(*(one() for _ in range(12)))

    try:
        asyncio.run(main())
        assert f.max_active == 6
        f.max_active = 0
        ip.channel.broadcast_knobs(Knobs(batch_size=2))
        asyncio.run(main())
        assert f.max_active == 2
        ip.channel.broadcast_knobs(Knobs(batch_size=64))  # the user's --max-concurrency stays the ceiling
        assert ip.proxy.effective_limit() == 6
    finally:
        ip.close()
        up.close()
    msgs = [m for _, m in ip.channel.drain()]
    reqs = [m for m in msgs if m["type"] == "request"]
    assert len(reqs) == 24 and {m["batch_capacity"] for m in reqs} == {6, 2}
    assert msgs[0]["type"] == "client_connect" and msgs[-1]["type"] == "status"


def test_cleanup_command_calls_the_admin_urls_and_precision_is_refused(fake: tuple[Fake, AppServer]) -> None:
    f, up = fake
    ip = InProcess(up.url, cleanup_urls=[("POST", "/reset_prefix_cache"), ("GET", "/health")])
    try:
        httpx.get(ip.url + "/models")  # the app is up and its loop known
        cid = ip.channel.send_command("cleanup", {"steps": ["caches"]})
        assert cid is not None
        deadline = time.monotonic() + 5
        results: list[dict[str, Any]] = []
        while not results and time.monotonic() < deadline:
            results = [m for _, m in ip.channel.drain() if m["type"] == "command_result"]
            time.sleep(0.02)
        (res,) = results
        assert res["id"] == cid and res["ok"] is True and res["cmd"] == "cleanup"
        assert [(c["method"], c["status"]) for c in res["result"]["calls"]] == [("POST", 201), ("GET", 201)]
        assert ("POST", "/reset_prefix_cache?", b"") in f.calls
        # what the proxy cannot do is refused at once: the actuator records failed, never sent-then-refused
        with pytest.raises(CommandRefused, match="precision"):
            ip.channel.send_command("precision", {"precision": "int8"})
        assert ChannelActuator(ip.channel).apply(Action("p", "precision", "int8", "r"), Knobs()) == (
            "failed", {"error": "the proxy cannot change the server's precision (no such call in the OpenAI API)"})
        assert not [m for _, m in ip.channel.drain() if m["type"] == "command_result"]
    finally:
        ip.close()
    off = ProxyChannel()
    try:
        with pytest.raises(CommandRefused, match="--cleanup-url"):  # off by default
            off.send_command("cleanup", {})
        outcome, res = ChannelActuator(off).apply(Action("p", "cleanup", ["caches"], "r"), Knobs())
        assert outcome == "failed" and "--cleanup-url" in res["error"]
    finally:
        off.close()


# -- errors, through the CLI -------------------------------------------------------------------------


def test_error_paths(tmp_path: Path, fake: tuple[Fake, AppServer]) -> None:
    f, up = fake
    p = ProxyProcess(up.url, tmp_path / "e.jsonl", "--max-body-bytes", "4096")
    try:
        r = httpx.post(p.url + "/chat/completions", content=b'{"model": "m", "messages": [', timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(p.url + "/chat/completions", content=b"[1, 2]", timeout=10)
        assert r.status_code == 400
        r = httpx.post(p.url + "/chat/completions", json={"model": "m", "messages": [], "pad": "x" * 5000}, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

        def chunked() -> Iterator[bytes]:  # no content-length: counted while read
            for _ in range(10):
                yield b"x" * 1000

        r = httpx.post(p.url + "/anything", content=chunked(), timeout=10)
        assert r.status_code == 413
        assert f.bodies == [] and f.calls == []  # nothing reached the upstream
        # other paths pass through untouched: method, path, query, body, status, headers
        r = httpx.put(p.root + "/admin/thing?x=1&y=2", content=b"\x00\xffbody", timeout=10)
        assert r.status_code == 201 and r.content == b"raw:\x00\xffbody" and r.headers["x-upstream"] == "yes"
        assert f.calls[-1] == ("PUT", "/admin/thing?x=1&y=2", b"\x00\xffbody")
        # the upstream's own errors pass through as they are
        r = httpx.post(p.url + "/chat/completions", json={"model": "m", "messages": [], "user": "busy"}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["message"] == "slow down" and r.headers["retry-after"] == "7"
        # an upstream that dies mid-stream: the client gets what came, then an SSE error event, then the end
        body = {"model": "m", "messages": [], "user": "die", "stream": True}
        with httpx.stream("POST", p.url + "/chat/completions", json=body, timeout=10) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data:")]
        assert r.status_code == 200 and len(lines) == 3, lines
        assert json.loads(lines[-1][5:])["error"]["type"] == "upstream_unavailable"
    finally:
        p.stop()
    # none finished; the stream the upstream broke off is recorded as aborted, with what it had generated
    (cut,) = [e.data for e in read_trace(tmp_path / "e.jsonl").events if e.kind == "request"]
    assert cut["aborted"] == "upstream" and cut["tokens"] == 2

    # upstream down -> 502
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    p = ProxyProcess(dead, tmp_path / "d.jsonl")
    try:
        c = openai.OpenAI(base_url=p.url, api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as ei:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 502
        r = httpx.post(p.url + "/completions", json={"model": "m", "prompt": "x", "stream": True}, timeout=10)
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_unavailable"
    finally:
        err = p.stop()
    assert len(re.findall(r"upstream \S+ unavailable", err)) == 1, err  # said once, then counted

    # upstream too slow -> 504
    slow = Fake(stall=3.0)
    sup = AppServer(slow.app)
    p = ProxyProcess(sup.url, tmp_path / "s.jsonl", "--timeout", "0.5")
    try:
        t = time.monotonic()
        r = httpx.post(p.url + "/chat/completions", json={"model": "m", "messages": []}, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["type"] == "upstream_timeout"
        assert time.monotonic() - t < 2.5
    finally:
        p.stop()
        sup.close()


def test_a_client_leaving_mid_stream_cancels_the_upstream(tmp_path: Path) -> None:
    f = Fake(chunks=200, delay=0.05)
    up = AppServer(f.app)
    p = ProxyProcess(up.url, tmp_path / "x.jsonl")
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", p.url + "/chat/completions", json=body, timeout=10) as r:
            got = b""
            for chunk in r.iter_bytes():
                got += chunk
                if got.count(b"data:") >= 3:
                    break
        deadline = time.monotonic() + 5
        while f.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert f.cancelled == 1 and f.finished == 0 and f.active == 0
    finally:
        p.stop()
        up.close()
    (r,) = [e.data for e in read_trace(tmp_path / "x.jsonl").events if e.kind == "request"]
    assert r["aborted"] == "client" and 3 <= r["tokens"] < 200  # recorded as aborted, with the tokens so far


def test_listen_address_checks() -> None:
    cp = tuner("proxy", "--upstream", "http://127.0.0.1:9", "--listen", "0.0.0.0:8100")
    err = assert_one_line_error(cp)
    assert "--public" in err
    cp = tuner("proxy", "--upstream", "ftp://x", "--listen", "127.0.0.1:0")
    assert "--upstream" in assert_one_line_error(cp)
    cp = tuner("proxy", "--upstream", "http://127.0.0.1:9", "--max-concurrency", "0")
    assert "--max-concurrency" in assert_one_line_error(cp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        cp = tuner("proxy", "--upstream", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{s.getsockname()[1]}")
        assert "cannot listen" in assert_one_line_error(cp)
    cp = tuner("proxy", "--upstream", "http://127.0.0.1:9", "--tui")
    assert "--tui needs a terminal" in assert_one_line_error(cp)
    cp = tuner("proxy", "--upstream", "http://127.0.0.1:9", "--policy", "no-such-policy")
    assert_one_line_error(cp)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("10.0.0.1:80", public=True) == ("10.0.0.1", 80)


# -- measurement units -----------------------------------------------------------------------------


def _sse(texts: list[str], usage: int | None) -> bytes:
    out = b""
    for t in texts:
        out += b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}).encode() + b"\n\n"
    if usage is not None:
        out += b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": usage}}).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(st.sampled_from("ab \n\"\\é"), min_size=1, max_size=6), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    usage=st.none() | st.integers(0, 100),
)
def test_sse_measurement_does_not_depend_on_how_the_stream_is_cut(texts: list[str], cuts: list[int],
                                                                  usage: int | None) -> None:
    data = _sse(texts, usage)
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    m = _Measure(0.0)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        m.feed_sse(data[a:b], float(i + 1))
    assert m.n == len(texts) and "".join(m.texts) == "".join(texts)
    assert m.completion_tokens == usage
    assert word_ids("".join(m.texts)) == word_ids(" ".join("".join(texts).split()))
    assert m.first is not None and m.last is not None and m.first <= m.last


def test_record_text_puts_the_answer_in_the_trace(fake: tuple[Fake, AppServer], tmp_path: Path) -> None:
    _, up = fake
    for flag, want in (("--record-text", "w0 w1 w2 w3 w4 "), (None, None)):
        trace = tmp_path / f"text{bool(flag)}.jsonl"
        p = ProxyProcess(up.url, trace, *([flag] if flag else []))
        try:
            c = openai.OpenAI(base_url=p.url, api_key="k")
            chat_text(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))
        finally:
            p.stop()
        (r,) = [e.data for e in read_trace(trace).events if e.kind == "request"]
        assert r.get("text") == want  # numbers only unless asked
        assert r["tokens"] == 5 and r["seq_rep_4"] == 0.0


def test_a_client_hanging_up_right_after_done_is_a_finished_request() -> None:
    """The openai client closes a stream as soon as it reads ``[DONE]``; the upstream's end of body may come
    later (here: 1 s later).  The answer was whole, so the request counts, measured; the connection the
    proxy gave up on is closed, not reused."""

    async def chat(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(3):
                ev = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                yield b"data: " + json.dumps(ev).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            await asyncio.sleep(1.0)

        return StreamingResponse(gen(), media_type="text/event-stream")

    up = AppServer(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]))
    ip = InProcess(up.url)
    try:
        body = {"model": "m", "messages": [], "stream": True}
        with httpx.stream("POST", ip.url + "/chat/completions", json=body, timeout=10) as r:
            got = b""
            for chunk in r.iter_bytes():
                got += chunk
                if b"[DONE]" in got:
                    break  # leaving the block closes the connection mid-body
        deadline = time.monotonic() + 5
        rows: list[dict[str, Any]] = []
        while not rows and time.monotonic() < deadline:
            rows = [m for _, m in ip.channel.drain() if m["type"] == "request"]
            time.sleep(0.05)
        assert len(rows) == 1 and rows[0]["tokens"] == 3 and rows[0]["ttft_seconds"] > 0, rows
        assert ip.channel.failed == 0
    finally:
        ip.close()
        up.close()
