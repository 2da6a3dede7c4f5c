"""Repetition on the engine's own tokens: when the stream carries ``token_ids`` (vLLM's ``return_token_ids``), the
proxy judges repetition on them, as ``tuner run`` does with a client's ids; without them, on words."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.test_proxy import AppServer, ProxyProcess
from tuner.trace import read_trace

# 24 chunks: the text's words never repeat, the token ids loop over "ab" (byte ids 97, 98) from the start
WORDS = [f"w{i} " for i in range(24)]


async def completions(request: Request) -> Response:
    body = json.loads(await request.body())

    async def gen() -> AsyncIterator[bytes]:
        for i, w in enumerate(WORDS):
            choice = {"index": 0, "text": w, "logprobs": None, "finish_reason": None}
            if body.get("return_token_ids"):
                choice["token_ids"] = [97 + i % 2]
            ev = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}
            yield b"data: " + json.dumps(ev).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def test_repetition_on_the_engines_token_ids_when_the_stream_carries_them(tmp_path: Path) -> None:
    up = AppServer(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]))
    trace = tmp_path / "ids.jsonl"
    proxy = ProxyProcess(up.url, trace, "--no-engine-metrics")
    try:
        for ids in (True, False):
            with httpx.stream(
                "POST",
                proxy.url + "/completions",
                timeout=30,
                json={"model": "m", "prompt": "x", "stream": True, "return_token_ids": ids},
            ) as r:
                text = "".join(r.iter_text())
            assert text.count('"token_ids"') == (24 if ids else 0)  # passed on as the engine wrote them
    finally:
        proxy.stop()
        up.close()
    with_ids, words = [e.data for e in read_trace(trace).events if e.kind == "request"]
    assert with_ids["seq_rep_4"] == 1 - 2 / 21 and with_ids["loop"] is True  # "abab...": 2 distinct 4-grams of 21
    assert words["seq_rep_4"] == 0.0 and words["loop"] is False
