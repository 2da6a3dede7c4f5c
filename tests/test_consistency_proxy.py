"""tuner proxy --consistency: shadow requests (tuner.proxy.shadow) against the demo's real OpenAI-compatible server,
driven by the openai client from this process; what is shadowed, the budget, and what the statistics exclude."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_demo_serve import DemoServer
from tests.test_proxy import ProxyProcess
from tuner.proxy.shadow import eligible, prompt_text, sse_text


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoServer]:
    pytest.importorskip("torch", reason="needs torch (the torch extra): the demo server runs the built-in model")
    s = DemoServer()
    yield s
    s.close()


def test_what_may_be_shadowed() -> None:
    ok = {"model": "m", "prompt": "x", "stream": True}
    assert eligible(ok, "/v1/completions") is None
    assert eligible({**ok, "n": 1}, "/v1/completions") is None
    assert eligible({"model": "m", "messages": [], "stream": True}, "/v1/chat/completions") is None
    assert eligible({**ok, "stream": False}, "/v1/completions") == "not streamed"
    assert eligible({**ok, "n": 2}, "/v1/completions") == "n = 2"
    assert eligible({**ok, "best_of": 3}, "/v1/completions") == "best_of = 3"
    assert eligible({**ok, "store": True}, "/v1/chat/completions") == "stateful"
    assert eligible({**ok, "previous_response_id": "r1"}, "/v1/chat/completions") == "stateful"
    assert eligible(ok, "/v1/embeddings") == "not a completion"
    chat = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url"}]}]}
    assert prompt_text(chat) == "second"
    assert prompt_text({"prompt": ["one", "two"]}) == "one" and prompt_text({"prompt": [1, 2]}) is None
    text, rest = sse_text(b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"index":'
                          b'0,"text":"lo"}]}\n\ndata: [DONE]\n\ndata: {"cho')
    assert text == "Hello" and rest == b'data: {"cho'


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_shadow_requests_within_the_budget_and_outside_the_statistics(demo: DemoServer, tmp_path: Path) -> None:
    trace = tmp_path / "p.jsonl"
    proxy = ProxyProcess(demo.root, trace, "--consistency", "lexical", "--consistency-rate", "0.25",
                         "--no-engine-metrics")
    try:
        client = openai.OpenAI(base_url=proxy.url, api_key="none", max_retries=0, timeout=60)
        answers = []
        for i in range(16):  # eligible: streamed, n = 1
            stream = client.completions.create(model="tuner-demo", prompt=f"The with statement {i}", max_tokens=24,
                                               temperature=0.8, stream=True)
            answers.append("".join(c.choices[0].text for c in stream if c.choices))
        for _ in range(4):  # not eligible: whole answers, and a request the server may keep (store)
            client.completions.create(model="tuner-demo", prompt="A list display", max_tokens=8)
            stored = client.chat.completions.create(model="tuner-demo", stream=True, max_tokens=8, store=True,
                                                    messages=[{"role": "user", "content": "A list display"}])
            "".join(c.choices[0].delta.content or "" for c in stored if c.choices)
        chat = client.chat.completions.create(model="tuner-demo", stream=True, max_tokens=16,
                                              messages=[{"role": "user", "content": "The for statement"}])
        "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    finally:
        err = proxy.stop()
    assert "consistency scorer ready: lexical-chrf" in err
    recs = records(trace)
    reqs = [r["data"] for r in recs if r.get("k") == "event" and r.get("kind") == "request"]
    assert len(reqs) == 16 + 8 + 1  # every client request once; the shadows are no requests
    q = [r["data"] for r in recs if r.get("k") == "event" and r.get("kind") == "quality"]
    end = recs[-1]
    assert end["k"] == "end"
    shadow = end["shadow"]
    assert shadow["eligible"] == 17 and shadow["rate"] == 0.25 and shadow["concurrency"] == 1
    assert 1 <= shadow["started"] <= 0.25 * 17 + 1  # the budget: a credit of 0.25 per eligible request
    assert len(q) == shadow["completed"] + shadow["failed"] == shadow["started"]
    by_id = {r["id"]: r for r in reqs}
    for d in q:
        assert d["source"] == "shadow" and d["backend"] == "lexical-chrf"
        assert d["id"] in by_id and d["temperature"] in (0.8, None)
        assert d["self_consistency"] is not None or "empty answer" in d.get("reason", "")
        assert d["relevance"] is not None or "empty answer" in d.get("reason", "")
    assert "The with statement" not in trace.read_text()  # no text without --record-text
