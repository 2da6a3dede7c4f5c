"""The demo's OpenAI-compatible server, driven by the official ``openai`` client from this (separate) process."""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import openai
import pytest

from tests.cli import ROOT, assert_one_line_error, tuner, tuner_env, tuner_popen
from tuner.trace import read_trace

# tuner demo --serve runs the built-in torch model; CI runs the fast suite on the oldest and newest Python without torch
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (the torch extra)")

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


# -- tuner demo --serve: the model behind the proxy under the sidecar, driven from this separate process ------


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str, queue.Queue[str], queue.Queue[str]]:
    proc = tuner_popen("demo", "--serve", "--listen", "127.0.0.1:0", "--headless", "--trace",
                       str(tmp_path / "serve.jsonl"), *args)
    out, err = line_queue(proc.stdout), line_queue(proc.stderr)
    deadline = time.monotonic() + 150  # loading the model takes seconds on a busy machine
    while time.monotonic() < deadline:
        try:
            line = out.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, list(err.queue)
            continue
        m = re.search(r"API at (http://\S+/v1)", line)
        if m:
            return proc, m.group(1), out, err
    proc.kill()
    raise AssertionError("tuner demo --serve printed no URL")


def _drain(q: queue.Queue[str]) -> str:
    time.sleep(0.1)
    return "".join(q.queue)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_serve_answers_an_openai_client_and_records_its_requests(tmp_path: Path, sig: signal.Signals) -> None:
    import psutil

    proc, url, _out, err = _serve(tmp_path)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("tuner.demo.serve" in " ".join(c.cmdline()) for c in children)  # the model runs in a child
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == [MODEL]
        r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
        assert r.usage is not None and r.usage.completion_tokens == 24
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=24, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].text
    finally:
        proc.send_signal(sig)  # Ctrl-C or a service manager's stop
        rc = proc.wait(timeout=60)
    stderr = _drain(err)
    assert rc == 0, stderr
    assert "Traceback" not in stderr and "trace written to" in stderr, stderr
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # server stopped too
    d = read_trace(tmp_path / "serve.jsonl")
    assert d.header["proxy"]["listen"] + "/v1" == url and d.header["demo"]["server"] == "tuner.demo.serve"
    assert d.end is not None and d.end["server_exit_code"] is not None and d.end["server_died"] is False
    reqs = d.requests()
    assert len(reqs) == 2, [e.data for e in reqs]  # /v1/models is forwarded, not a generation request
    assert sorted(e.data["tokens"] for e in reqs) == [24, 24]
    streamed = [e.data for e in reqs if e.data["ttft_seconds"] is not None]
    assert len(streamed) == 1 and streamed[0]["tpot_seconds"] > 0
    assert np.nanmax(d.column("tree_rss_bytes")) > 100 << 20  # the model server's tree was sampled
    rep = tuner("report", str(tmp_path / "serve.jsonl"), "--json", timeout=60)
    assert rep.returncode == 0, rep.stderr
    summary = json.loads(rep.stdout)
    assert summary["requests"]["count"] == 2, summary["requests"]


def test_demo_serve_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, message in [
        (["--requests", "5"], "--requests drives the built-in workload"),
        (["--leak"], "--leak drives the built-in workload"),
        (["--listen", "8.8.8.8:0"], "not a loopback address"),
        (["--duration", "0"], "--duration 0 must be more than 0 seconds"),
    ]:
        cp = tuner("demo", "--serve", "--headless", "--trace", str(tmp_path / "t.jsonl"), *args, timeout=60)
        assert message in assert_one_line_error(cp), args
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.slow
def test_demo_serve_stops_when_its_model_server_dies(tmp_path: Path) -> None:
    import psutil

    proc, _url, _out, err = _serve(tmp_path)
    try:
        (server,) = [c for c in psutil.Process(proc.pid).children(recursive=True)
                     if "tuner.demo.serve" in " ".join(c.cmdline())]
        server.kill()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = _drain(err)
    assert rc == 1 and "the demo model server exited with code -9" in stderr, stderr
    d = read_trace(tmp_path / "serve.jsonl")
    assert d.end is not None and d.end["server_died"] is True and d.end["server_exit_code"] == -9


@pytest.mark.slow
def test_demo_serve_duration_stops_it_by_itself(tmp_path: Path) -> None:
    proc, url, _out, err = _serve(tmp_path, "--duration", "3")
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    rc = proc.wait(timeout=60)  # no signal: --duration ends it
    stderr = _drain(err)
    assert rc == 0 and "duration reached; stopped; trace written to" in stderr, stderr
    d = read_trace(tmp_path / "serve.jsonl")
    assert d.end is not None and d.end["server_died"] is False and len(d.requests()) == 1
