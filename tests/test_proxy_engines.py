"""``tuner proxy`` in front of a serving engine: counting what the engine counts, knobs in the form each engine
takes, and the engine's own metrics and admin calls.

The upstream here is a fake that speaks vLLM 0.32: it replays the SSE lines of a real vLLM stream
(``tests/data/vllm/stream-0.32.0-cpu.txt``), byte for byte when nothing else is asked, and builds every other
chunk from those lines' own JSON — usage on every chunk when asked ``continuous_usage_stats`` (as vLLM does),
several tokens merged into one chunk (as vLLM does under load), ``reasoning`` deltas, tool-call deltas, a stream
that breaks — and it serves vLLM's captured ``/metrics`` page.  The proxy is the real ``tuner proxy`` CLI in a
subprocess, the client the official ``openai`` package.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.test_proxy import AppServer, ProxyProcess
from tuner.core.actuator import ChannelActuator
from tuner.proxy.server import Proxy, ProxyChannel, ProxyConfig, _without_usage
from tuner.records import Action, Knobs
from tuner.trace import read_trace

DATA = Path(__file__).parent / "data" / "vllm"
CAPTURE = (DATA / "stream-0.32.0-cpu.txt").read_text()
METRICS = (DATA / "metrics-0.32.0-cpu.txt").read_text()
GEN_TOTAL = re.compile(r'^(vllm:generation_tokens_total\{engine="0",model_name="tiny-llama"\} )([0-9.e+]+)$', re.M)


def _section(route: str) -> list[str]:
    """The ``data:`` lines of the captured stream of one route, as vLLM wrote them."""
    part = CAPTURE.split(f"### POST {route}")[1].split("### POST")[0]
    return [line for line in part.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


CHAT_LINES = _section("/v1/chat/completions")
COMPLETION_LINES = _section("/v1/completions")


def _obj(line: str) -> dict[str, Any]:
    return dict(json.loads(line[6:]))


def _dump(ev: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"


class FakeVllm:
    """A vLLM 0.32 look-alike; ``user`` in a request picks the scenario (``merged3``, ``reasoning``,
    ``reasoning_content``, ``tools``, ``loop``, ``die``, ``slow``)."""

    def __init__(self, *, dev_mode: bool = False, reject: str | None = None, metrics: bool = True) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.sent: list[int] = []  # tokens written per stream
        self.dev_mode = dev_mode
        self.reject = reject  # a field answered with vLLM's 400 when present
        self.kv = 0.5
        self.resets = 0
        self.generated = 0  # tokens streamed since start: vLLM's generation_tokens_total counts them
        routes = [
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/reset_prefix_cache", self.reset, methods=["POST", "GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]
        if metrics:
            routes.append(Route("/metrics", self.metrics, methods=["GET"]))
        self.app = Starlette(routes=routes)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "tiny-llama", "object": "model"}]})

    async def metrics(self, request: Request) -> Response:
        page = METRICS.replace('vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0',
                               f'vllm:kv_cache_usage_perc{{engine="0",model_name="tiny-llama"}} {self.kv}')
        page = GEN_TOTAL.sub(lambda m: f"{m.group(1)}{float(m.group(2)) + self.generated}", page)
        return PlainTextResponse(page, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def reset(self, request: Request) -> Response:
        if not self.dev_mode:  # vLLM registers the route only with VLLM_SERVER_DEV_MODE=1
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"detail": "Method Not Allowed"}, status_code=405)
        self.resets += 1
        self.kv = 0.125
        return JSONResponse({"success": True})

    async def generate(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.bodies.append(body)
        if self.reject and self.reject in body:  # vLLM's answer to a field of the wrong type, say
            return JSONResponse({"object": "error", "message": f"[{{'type': 'float_type', 'loc': ('body', "
                                 f"'{self.reject}'), 'msg': 'Input should be a valid number'}}]",
                                 "type": "Bad Request", "param": None, "code": 400}, status_code=400)
        chat = request.url.path.endswith("/chat/completions")
        if not body.get("stream"):
            text = "".join(_obj(x)["choices"][0]["delta"].get("content", "") for x in CHAT_LINES[1:-1]) if chat else ""
            return JSONResponse({"id": "x", "object": "chat.completion", "model": "tiny-llama",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 33, "total_tokens": 49, "completion_tokens": 16}})
            self.generated += 16
        return StreamingResponse(self._stream(body, chat), media_type="text/event-stream; charset=utf-8")

    async def _stream(self, body: dict[str, Any], chat: bool) -> AsyncIterator[bytes]:
        so = body.get("stream_options") or {}
        usage_on, continuous = so.get("include_usage") is True, so.get("continuous_usage_stats") is True
        scenario = str(body.get("user") or "")
        lines = CHAT_LINES if chat else COMPLETION_LINES
        final = _obj(lines[-1])  # the usage-only chunk, as vLLM wrote it
        prompt = final["usage"]["prompt_tokens"]
        if not continuous and scenario == "":
            # exactly what vLLM sent (it was asked include_usage: the usage chunk is its last line)
            for line in lines if usage_on else lines[:-1]:
                yield line.encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            self.sent.append(16)
            self.generated += 16
            return
        pieces: list[tuple[dict[str, Any], int]] = []  # (event, tokens it holds)
        template = _obj(lines[1] if chat else lines[0])
        if chat:
            pieces.append((_obj(lines[0]), 0))  # the role-only first chunk
        texts = [(_obj(x)["choices"][0]["delta"]["content"] if chat else _obj(x)["choices"][0]["text"])
                 for x in lines[(1 if chat else 0):-1]]
        if scenario == "loop":
            texts = [" again"] * 16
        step = 3 if scenario == "merged3" else 1
        for i in range(0, len(texts), step):
            group = texts[i : i + step]
            ev = json.loads(json.dumps(template))
            c = ev["choices"][0]
            if chat:
                if scenario.startswith("reasoning") and i < 6:
                    key = "reasoning" if scenario == "reasoning" else "reasoning_content"
                    c["delta"] = {key: "".join(group)}
                elif scenario == "tools":
                    call: dict[str, Any] = {"index": 0, "function": {"arguments": "".join(group)}}
                    if i == 0:
                        call.update({"id": "chatcmpl-tool-1", "type": "function", "function": {
                            "name": "lookup", "arguments": "".join(group)}})
                    c["delta"] = {"tool_calls": [call]}
                else:
                    c["delta"] = {"content": "".join(group)}
            else:
                c["text"] = "".join(group)
            if i + step >= len(texts):
                c["finish_reason"] = "length"
            pieces.append((ev, len(group)))
        done = 0
        try:
            for n, (ev, k) in enumerate(pieces):
                if scenario == "die" and n == 6:
                    raise RuntimeError("the engine died mid-stream")
                if scenario == "slow":
                    await asyncio.sleep(0.05)
                elif scenario == "merged3" and n:
                    await asyncio.sleep(0.002)  # apart, as decode steps are: chunks read together share one time
                done += k
                self.generated += k
                if continuous:  # vLLM puts usage right after choices, on every chunk
                    ev = {**{key: v for key, v in ev.items() if key != "choices"}, "choices": ev["choices"],
                          "usage": {"prompt_tokens": prompt, "total_tokens": prompt + done,
                                    "completion_tokens": done, "completion_tokens_details": None}}
                yield _dump(ev)
        except BaseException:
            self.sent.append(done)  # what went out before the stream ended early
            raise
        self.sent.append(done)
        if usage_on or continuous:
            final["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt + done, "completion_tokens": done}
            yield _dump(final)
        yield b"data: [DONE]\n\n"


@pytest.fixture
def vllm() -> Iterator[tuple[FakeVllm, AppServer]]:
    f = FakeVllm()
    s = AppServer(f.app)
    yield f, s
    s.close()


def start_proxy(upstream: str, trace: Path, *args: str) -> ProxyProcess:
    """The proxy, once it has read the engine's /metrics (auto: the engine is vLLM)."""
    p = ProxyProcess(upstream, trace, *args)
    deadline = time.monotonic() + 15
    while "engine metrics: vLLM" not in trace.read_text():
        assert time.monotonic() < deadline, trace.read_text()[-2000:]
        time.sleep(0.05)
    return p


def requests_of(trace: Path) -> list[dict[str, Any]]:
    return [e.data for e in read_trace(trace).events if e.kind == "request"]


MSGS = [{"role": "user", "content": "Say hello"}]


# -- counting what the engine counts ----------------------------------------------------------------------


def test_tokens_come_from_usage_and_the_client_sees_only_what_it_asked(vllm: tuple[FakeVllm, AppServer],
                                                                      tmp_path: Path) -> None:
    f, up = vllm
    trace = tmp_path / "u.jsonl"
    p = start_proxy(up.url, trace)
    c = openai.OpenAI(base_url=p.url, api_key="k", max_retries=0)
    try:
        plain = list(c.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True))  # type: ignore[arg-type]
        merged = list(c.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True,  # type: ignore[arg-type]
                                                user="merged3"))
        asked = list(c.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True,  # type: ignore[arg-type]
                                               stream_options={"include_usage": True}))
        both = list(c.completions.create(model="tiny-llama", prompt="def fibonacci(n):", stream=True,
                                         stream_options={"include_usage": True,
                                                         "continuous_usage_stats": True}))  # type: ignore[typeddict-unknown-key]
        cmpl = list(c.completions.create(model="tiny-llama", prompt="def fibonacci(n):", stream=True))
    finally:
        p.stop()
    want = "".join(_obj(x)["choices"][0]["delta"].get("content", "") for x in CHAT_LINES[1:-1])
    for chunks in (plain, merged, asked):
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    # a client that did not ask gets no usage at all: no usage-only chunk (choices == []), no usage per chunk
    for chunks in (plain, merged, cmpl):
        assert all(ch.choices and ch.usage is None for ch in chunks)
    assert len(merged) == 1 + 6  # the role chunk and 16 tokens in 6 chunks
    # one that asked for include_usage gets the final usage chunk, and usage only there
    assert asked[-1].choices == [] and asked[-1].usage is not None and asked[-1].usage.completion_tokens == 16
    assert all(ch.usage is None for ch in asked[:-1])
    # one that asked for continuous usage gets it on every chunk, as vLLM sends it
    assert all(ch.usage is not None for ch in both) and both[-1].usage.completion_tokens == 16  # type: ignore[union-attr]
    # the engine was asked for what the proxy needs
    for body in f.bodies:
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    reqs = requests_of(trace)
    assert [r["tokens"] for r in reqs] == [16, 16, 16, 16, 16]  # merged3: 6 chunks, 16 tokens
    assert all(r.get("aborted") is None and r["prompt_tokens"] in (33, 10) for r in reqs)
    assert reqs[1]["tpot_seconds"] is not None


def test_the_captured_stream_passes_byte_for_byte_without_usage(tmp_path: Path) -> None:
    """No engine known (--no-engine-metrics): the proxy asks only include_usage, takes out the usage chunk the
    client did not ask for, and every other line reaches the client as vLLM wrote it."""
    f = FakeVllm(metrics=False)
    up = AppServer(f.app)
    trace = tmp_path / "b.jsonl"
    p = ProxyProcess(up.url, trace, "--no-engine-metrics")
    try:
        body = {"model": "tiny-llama", "messages": MSGS, "stream": True}
        with httpx.stream("POST", p.url + "/chat/completions", json=body, timeout=10) as r:
            got = r.read()
        assert f.bodies[-1]["stream_options"] == {"include_usage": True}
    finally:
        p.stop()
        up.close()
    lines = [x for x in got.decode().split("\n") if x]
    assert lines == [*CHAT_LINES[:-1], "data: [DONE]"]  # vLLM's own bytes, the usage chunk taken out
    (r,) = requests_of(trace)
    assert r["tokens"] == 16 and r["prompt_tokens"] == 33


def test_usage_is_cut_out_of_an_event_whatever_its_layout() -> None:
    """The usage the client did not ask for leaves each event and nothing else does: vLLM's compact layout (cut
    by finding), a nested ``prompt_tokens_details`` (the regular expression), other spacing (encoded again)."""
    head = b'data: {"id":"c","choices":[{"index":0,"text":"a}{b","token_ids":null}]'
    for usage, tail in ((b',"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}', b"}"),
                        (b',"usage":{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":null}',
                         b',"system_fingerprint":"vllm-0.32.0"}'),
                        (b',"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}', b"}"),
                        (b', "usage": {"prompt_tokens": 3}', b"}")):
        line = head + usage + tail
        got = _without_usage(line, json.loads(line[6:]))
        assert json.loads(got[6:]) == {k: v for k, v in json.loads(line[6:]).items() if k != "usage"}, got
        if not usage.startswith(b", "):
            assert got == head + tail  # the engine's own bytes otherwise


def test_reasoning_and_tool_calls_count_and_ttft_is_the_first_token(vllm: tuple[FakeVllm, AppServer],
                                                                    tmp_path: Path) -> None:
    _f, up = vllm
    trace = tmp_path / "r.jsonl"
    p = start_proxy(up.url, trace, "--record-text")
    c = openai.OpenAI(base_url=p.url, api_key="k", max_retries=0)
    try:
        for user in ("reasoning", "reasoning_content", "tools"):
            chunks = list(c.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True,  # type: ignore[arg-type]
                                                    user=user))
            assert all(ch.usage is None for ch in chunks)
            if user == "tools":
                args = "".join(ch.choices[0].delta.tool_calls[0].function.arguments or ""  # type: ignore[index,union-attr]
                               for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls)
                assert args == "link" * 16
    finally:
        p.stop()
    reqs = requests_of(trace)
    assert [r["tokens"] for r in reqs] == [16, 16, 16]
    for r in reqs[:2]:  # 6 tokens of reasoning first: the answer starts later than the first token
        assert 0 < r["ttft_seconds"] <= r["answer_ttft_seconds"] <= r["e2e_seconds"]
        assert r["text"] == "link" * 16  # reasoning is generated text too
    tools = reqs[2]
    assert tools["ttft_seconds"] == tools["answer_ttft_seconds"] and not tools.get("text")  # arguments: no words


def test_aborted_streams_are_recorded_with_their_tokens(vllm: tuple[FakeVllm, AppServer], tmp_path: Path) -> None:
    f, up = vllm
    trace = tmp_path / "a.jsonl"
    p = start_proxy(up.url, trace)
    try:
        c = openai.OpenAI(base_url=p.url, api_key="k", max_retries=0)
        stream = c.chat.completions.create(model="tiny-llama", messages=MSGS, stream=True, user="slow")  # type: ignore[arg-type]
        got = 0
        for ch in stream:
            got += bool(ch.choices and ch.choices[0].delta.content)
            if got == 4:
                break
        stream.close()  # the user stops reading: the connection closes
        deadline = time.monotonic() + 5
        while len(f.sent) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        # the engine breaks off a stream after 6 chunks
        body = {"model": "tiny-llama", "messages": MSGS, "stream": True, "user": "die"}
        with httpx.stream("POST", p.url + "/chat/completions", json=body, timeout=10) as r:
            tail = [x for x in r.iter_lines() if x.startswith("data:")][-1]
        assert json.loads(tail[5:])["error"]["type"] == "upstream_unavailable"
        time.sleep(0.3)
    finally:
        p.stop()
    client_cut, engine_cut = requests_of(trace)
    assert client_cut["aborted"] == "client" and engine_cut["aborted"] == "upstream"
    # tokens: the engine's own count in the last chunk the proxy saw (continuous usage), not a chunk count
    assert 4 <= client_cut["tokens"] <= f.sent[0] < 16
    assert engine_cut["tokens"] == f.sent[1] == 5  # the role chunk and 5 tokens went out before it died
    assert client_cut["ttft_seconds"] is not None


# -- the repetition penalty ---------------------------------------------------------------------------------


class Live:
    """The proxy app on a thread with its channel, and the agent's actuator on that channel."""

    def __init__(self, upstream: str, **config: Any) -> None:
        self.channel = ProxyChannel()
        self.proxy = Proxy(ProxyConfig(upstream=upstream, **config), self.channel, log=lambda m: None)
        self.server = AppServer(self.proxy.app)
        self.url = self.server.url + "/v1"
        self.actuator = ChannelActuator(self.channel)

    def set_penalty(self, value: float) -> tuple[str, dict[str, Any]]:
        return self.actuator.apply(Action("temperature", "repetition_penalty", value, "test"),
                                   Knobs(repetition_penalty=value))

    def results(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while True:
            out = [m for _, m in self.channel.drain() if m["type"] == "command_result"]
            if out or time.monotonic() > deadline:
                return out
            time.sleep(0.02)

    def close(self) -> None:
        self.server.close()
        self.channel.close()


def test_penalty_goes_in_each_engines_form(vllm: tuple[FakeVllm, AppServer]) -> None:
    f, up = vllm
    for engine, name in (("vllm", "repetition_penalty"), ("sglang", "repetition_penalty"),
                         ("llamacpp", "repeat_penalty")):
        live = Live(up.url, engine=engine)
        c = openai.OpenAI(base_url=live.url, api_key="k", max_retries=0)
        try:
            outcome, res = live.set_penalty(1.15)
            assert outcome == "pending" and res["field"] == name  # no request has carried it yet
            c.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
            assert f.bodies[-1][name] == 1.15
            (r,) = live.results()
            assert r["ok"] and r["result"]["outcome"] == "applied" and r["id"] == res["command_id"]
            assert live.set_penalty(1.2)[0] == "applied"  # the engine took the field: the next change applies
            c.completions.create(model="m", prompt="x")
            assert f.bodies[-1][name] == 1.2
            c.chat.completions.create(model="m", messages=MSGS, extra_body={name: 1.0})  # type: ignore[arg-type]
            assert f.bodies[-1][name] == 1.0  # the client's own value stands
        finally:
            live.close()
    live = Live(up.url, engine="tgi")
    c = openai.OpenAI(base_url=live.url, api_key="k", max_retries=0)
    try:
        assert live.set_penalty(1.1)[0] == "pending"
        c.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
        assert "repetition_penalty" not in f.bodies[-1]  # TGI's chat route has no such field
        assert live.results() == []  # still pending: no request could carry it
        c.completions.create(model="m", prompt="x")
        assert f.bodies[-1]["repetition_penalty"] == 1.1
        assert live.results()[0]["result"]["outcome"] == "applied"
    finally:
        live.close()


def test_penalty_not_supported_or_rejected_is_never_applied(tmp_path: Path) -> None:
    f = FakeVllm(reject="repetition_penalty", metrics=False)
    up = AppServer(f.app)
    try:
        live = Live(up.url)  # auto, and no /metrics: the engine is unknown
        try:
            outcome, res = live.set_penalty(1.1)
            assert outcome == "not supported" and "--engine" in res["error"]
            openai.OpenAI(base_url=live.url, api_key="k").chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
            assert "repetition_penalty" not in f.bodies[-1]
        finally:
            live.close()
        live = Live(up.url, engine="vllm")
        c = openai.OpenAI(base_url=live.url, api_key="k", max_retries=0)
        try:
            assert live.set_penalty(1.1)[0] == "pending"
            got = c.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
            assert got.choices[0].message.content  # the client still got its answer: sent again without the field
            assert "repetition_penalty" in f.bodies[-2] and "repetition_penalty" not in f.bodies[-1]
            (r,) = live.results()
            assert not r["ok"] and r["result"]["outcome"] == "rejected by upstream"
            assert "HTTP 400" in r["error"] and "repetition_penalty" in r["error"]
            outcome, res = live.set_penalty(1.2)
            assert outcome == "rejected by upstream" and "HTTP 400" in res["error"]
            c.chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
            assert "repetition_penalty" not in f.bodies[-1]
        finally:
            live.close()
    finally:
        up.close()


def test_an_upstream_refusing_stream_options_still_answers() -> None:
    """A server that answers 400 naming ``stream_options``: the stream is asked again without it, the client
    gets its answer, tokens fall back to one per chunk, and later streams go without it."""
    f = FakeVllm(reject="stream_options", metrics=False)
    up = AppServer(f.app)
    live = Live(up.url, engine="llamacpp")
    c = openai.OpenAI(base_url=live.url, api_key="k", max_retries=0)
    try:
        for _ in range(2):
            chunks = list(c.chat.completions.create(model="m", messages=MSGS, stream=True))  # type: ignore[arg-type]
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "link" * 16
        assert ["stream_options" in b for b in f.bodies] == [True, False, False]
        time.sleep(0.2)
        rows = [m for _, m in live.channel.drain() if m["type"] == "request"]
        assert [r["tokens"] for r in rows] == [16, 16]  # vLLM's captured stream: one token a chunk
    finally:
        live.close()
        up.close()


def test_a_policy_raising_the_penalty_through_the_cli(vllm: tuple[FakeVllm, AppServer], tmp_path: Path) -> None:
    """The temperature policy pinned at its only temperature with repetition above the band raises the
    penalty: pending, then applied when vLLM took the first request carrying it; the knob column shows it."""
    f, up = vllm
    policy = tmp_path / "t.toml"
    policy.write_text("[temperature]\nmin = 0.7\nmax = 0.7\nmin_requests = 3\nwindow_responses = 0\n")
    trace = tmp_path / "p.jsonl"
    p = start_proxy(up.url, trace, "--policy", str(policy))
    c = openai.OpenAI(base_url=p.url, api_key="k", max_retries=0)
    try:
        deadline = time.monotonic() + 30
        while '"repetition_penalty"' not in trace.read_text() or not any(
                "repetition_penalty" in b for b in f.bodies):
            assert time.monotonic() < deadline, trace.read_text()[-3000:]
            list(c.chat.completions.create(model="m", messages=MSGS, stream=True, temperature=0.7,  # type: ignore[arg-type]
                                           user="loop"))
            time.sleep(0.3)
        list(c.chat.completions.create(model="m", messages=MSGS, stream=True, temperature=0.7, user="loop"))  # type: ignore[arg-type]
        time.sleep(0.5)
    finally:
        p.stop()
    td = read_trace(trace)
    pen = [a for a in td.actions if a["knob"] == "repetition_penalty"]
    assert [a["outcome"] for a in pen[:2]] == ["pending", "applied"], pen
    carried = next(b for b in f.bodies if "repetition_penalty" in b)
    assert pen[0]["value"] == pen[1]["value"] == carried["repetition_penalty"] == 1.05
    col = [v for v in td.column("knob_repetition_penalty") if v == v and v is not None]
    assert col and col[-1] >= 1.05


# -- the engine's metrics and admin call -------------------------------------------------------------------


def test_the_proxy_records_the_engine_metrics_and_cleans_up_through_vllm(tmp_path: Path) -> None:
    for dev in (False, True):
        f = FakeVllm(dev_mode=dev)
        up = AppServer(f.app)
        live = Live(up.url, engine_metrics=up.url + "/metrics")
        try:
            from tuner.probes.engine import EngineProbe

            live.proxy.engine_probe = EngineProbe(up.url + "/metrics", interval=0.2)
            deadline = time.monotonic() + 5
            while live.proxy.engine() != "vllm":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            cid = live.channel.send_command("cleanup", {"steps": ["caches"]})
            (r,) = live.results()
            assert r["id"] == cid
            if not dev:
                assert not r["ok"] and r["result"]["outcome"] == "not supported"
                assert "VLLM_SERVER_DEV_MODE=1" in r["error"]
                # known now: not called again, and recorded as not supported at once
                outcome, res = live.actuator.apply(Action("cleanup", "cleanup", ["caches"], "test"), Knobs())
                assert outcome == "not supported" and "VLLM_SERVER_DEV_MODE=1" in res["error"]
                assert live.results() == []
            else:
                assert r["ok"] and f.resets == 1
                assert r["result"]["kv_cache_usage_before"] == 0.5 and r["result"]["kv_cache_usage_after"] == 0.125
                assert r["result"]["kv_cache_freed_ratio"] == 0.375
            live.proxy.engine_probe.close()
        finally:
            live.close()
            up.close()


def test_engine_metrics_land_in_the_proxy_trace(vllm: tuple[FakeVllm, AppServer], tmp_path: Path) -> None:
    _f, up = vllm
    trace = tmp_path / "m.jsonl"
    p = start_proxy(up.url, trace)
    try:
        time.sleep(1.2)
    finally:
        p.stop()
    td = read_trace(trace)
    kv = [v for v in td.column("engine_kv_cache_usage_ratio") if v == v and v is not None]
    assert kv and kv[-1] == 0.5
    assert td.header["proxy"]["engine_metrics"] == up.url + "/metrics"
    assert re.search(r"engine metrics: vLLM at \S+/metrics, 13 of 92", trace.read_text())
