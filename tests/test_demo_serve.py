"""The demo's OpenAI-compatible server, driven by the official ``openai`` client from this (separate) process."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

import httpx
import openai
import pytest

from tests.cli import ROOT, tuner_env

MODEL = "tuner-demo"
PROMPT = "The with statement"


def line_queue(stream: IO[str] | None) -> queue.Queue[str]:
    """Lines of a child's pipe, read by a thread (so the pipe never fills and a wait can time out)."""
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert stream is not None
        for line in stream:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


class DemoServer:
    """``python -m tuner.demo.serve --port 0`` as a subprocess; ``url`` is its ``/v1`` base."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tuner.demo.serve", "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=tuner_env(),
            cwd=ROOT,
        )
        lines = line_queue(self.proc.stderr)
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                self.close()
                raise RuntimeError("demo server did not start in 60 s") from None
            m = re.search(r"on (http://\S+/v1)", line)
            if m:
                self.url = m.group(1)
                self.root = self.url[: -len("/v1")]
                return

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoServer]:
    s = DemoServer()
    yield s
    s.close()


def test_models_and_greedy_answers_stream_and_not(demo: DemoServer) -> None:
    c = openai.OpenAI(base_url=demo.url, api_key="unused")
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    text = r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert len(text.encode()) == 40 and text.strip()  # a token is a byte
    # streamed, completions and chat: the same greedy text, usage in the final chunk when asked for
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40 and not chunks[-1].choices
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 10  # really streamed, piece by piece
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                     temperature=0)
    assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
    s = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                  temperature=0, stream=True)
    parts = list(s)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == text
    assert parts[-1].choices[0].finish_reason == "length" and parts[-1].usage is None


def test_sampling_seed_and_stop(demo: DemoServer) -> None:
    c = openai.OpenAI(base_url=demo.url, api_key="unused")
    a = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=7).choices[0].text
    b = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=7).choices[0].text
    assert a == b
    greedy = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = greedy[10:14]
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[: greedy.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == greedy[: greedy.index(stop)]


def test_bad_requests_get_openai_errors(demo: DemoServer) -> None:
    c = openai.OpenAI(base_url=demo.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        c.completions.create(model=MODEL, prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt=PROMPT, temperature=5)
    r = httpx.post(demo.url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(demo.url + "/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400


def test_a_client_that_leaves_does_not_hold_up_the_next(demo: DemoServer) -> None:
    """Generation stops at the next token when the client disconnects: a long stream abandoned after its
    first chunk leaves the single model thread free for the next request quickly."""
    import time

    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 255, "temperature": 0, "stream": True}
    t = time.monotonic()
    full = httpx.post(demo.url + "/completions", json={**body, "stream": False, "stop": None}, timeout=60)
    t_full = time.monotonic() - t
    assert full.json()["usage"]["completion_tokens"] == 255
    with httpx.stream("POST", demo.url + "/completions", json=body, timeout=30) as r:
        for _ in r.iter_bytes():
            break
    t = time.monotonic()
    r2 = httpx.post(demo.url + "/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=30)
    assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] == 5
    assert time.monotonic() - t < 0.5 * t_full  # the abandoned 255-token generation did not run to its end
