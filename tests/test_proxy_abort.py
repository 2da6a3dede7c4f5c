"""A client that hangs up mid-stream: the engine is told at once, and the tokens it generated until it noticed are
counted, as the engine counts them (vLLM's ``generation_tokens_total``).

The engine here is a bare asyncio server shaped like vLLM's streaming loop: each step generates a token (counted
at once) and writes its chunk with the running usage (``continuous_usage_stats``); whether its client is gone it
sees only after that, as vLLM's engine runs a step ahead of the server noticing a disconnect.  So the token of the
step during which the proxy lets go exists on the engine's side; closing the connection outright loses it,
half-closing and reading on does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from tests.test_proxy import ProxyProcess
from tuner.trace import read_trace


class SteppingEngine:
    def __init__(self, step_s: float = 0.01, max_tokens: int = 2000) -> None:
        self.step_s = step_s
        self.max_tokens = max_tokens
        self.generated: list[int] = []  # per finished stream
        self.stopped_at: list[float] = []
        self.bodies: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start() -> None:
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(start())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        body = json.loads(await r.readexactly(int(m.group(1)))) if m else {}
        self.bodies.append(body)
        if not head.startswith(b"POST /v1/completions"):
            w.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await w.drain()
            w.close()
            return
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        eof = asyncio.ensure_future(r.read())  # b"" once the client half-closed or closed
        n = 0
        try:
            while n < self.max_tokens:
                n += 1  # generated: counted before it is written, as an engine counts a step's token
                ev = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 0,
                    "model": "m",
                    "choices": [{"index": 0, "text": f"t{n} ", "logprobs": None, "finish_reason": None}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3 + n, "completion_tokens": n},
                }
                data = b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"
                w.write(b"%x\r\n%s\r\n" % (len(data), data))
                await w.drain()
                if eof.done():  # noticed only now: this step's token was generated (and sent) regardless
                    break
                await asyncio.sleep(self.step_s)
        except ConnectionError:
            pass
        finally:
            self.generated.append(n)
            self.stopped_at.append(time.monotonic())
            eof.cancel()
            w.close()

    def close(self) -> None:
        def stop() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(timeout=10)


async def _read_then_hang_up(root: str, chunks: int) -> tuple[int, float]:
    host, port = root.removeprefix("http://").rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    data = json.dumps({"model": "m", "prompt": "x", "stream": True, "max_tokens": 2000}).encode()
    w.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: p\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(data), data)
    )
    buf = b""
    while buf.count(b'"text":') < chunks:
        buf += await r.read(65536)
    w.close()
    return buf.count(b'"text":'), time.monotonic()


def test_an_aborted_stream_counts_what_the_engine_generated_until_it_noticed(tmp_path: Path) -> None:
    engine = SteppingEngine()
    trace = tmp_path / "abort.jsonl"
    proxy = ProxyProcess(engine.url, trace, "--engine", "vllm", "--no-engine-metrics")
    try:
        seen, left = [], []
        for chunks in (5, 12, 30):
            n, t = asyncio.run(_read_then_hang_up(proxy.root, chunks))
            seen.append(n)
            left.append(t)
            deadline = time.monotonic() + 10
            while len(engine.generated) < len(seen):
                assert time.monotonic() < deadline, "the engine was not told"
                time.sleep(0.01)
    finally:
        proxy.stop()
        engine.close()
    assert all(
        b.get("stream_options") == {"include_usage": True, "continuous_usage_stats": True} for b in engine.bodies
    )
    assert all(s - t < 1.0 for s, t in zip(engine.stopped_at, left, strict=True))  # told at once
    assert all(g < 200 for g in engine.generated), engine.generated  # (2000 if it had run on)
    reqs = [e.data for e in read_trace(trace).events if e.kind == "request"]
    assert [r["aborted"] for r in reqs] == ["client"] * 3
    assert [r["tokens"] for r in reqs] == engine.generated  # every token the engine generated, none more
    assert all(g >= s for g, s in zip(engine.generated, seen, strict=True))
