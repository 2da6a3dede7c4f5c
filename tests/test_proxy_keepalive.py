"""``tuner proxy`` against an upstream that drops kept-alive connections: a request sent on a connection the
upstream closed without answering goes once more on a fresh connection, never on another kept-alive one (they
may all be as stale: a server whose keep-alive timer ran out closes them together).  Seen against vLLM on a
loaded host: ``502 ... the upstream closed the connection without answering``."""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_proxy import ProxyProcess
from tuner.trace import read_trace


class _OneAnswerPerConnection(socketserver.BaseRequestHandler):
    """Answers the first request on a connection (keep-alive), then reads the next one and closes without an
    answer: what a client sees when the server closed an idle connection as the request went out."""

    server: _Upstream

    def _read_request(self) -> bytes | None:
        rfile = self.request.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = rfile.readline()
            if not line:
                return None
            head += line
        length = 0
        for ln in head.split(b"\r\n"):
            if ln.lower().startswith(b"content-length:"):
                length = int(ln.split(b":", 1)[1])
        return head + rfile.read(length)

    def handle(self) -> None:
        if self._read_request() is None:
            return
        with self.server.lock:
            self.server.answered += 1
            n = self.server.answered
        self.server.release.wait(10)  # the first answers wait until the test has them all in flight
        body = json.dumps({"id": f"cmpl-{n}", "object": "text_completion", "choices": [
            {"index": 0, "text": "ok", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}).encode()
        self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: keep-alive\r\n\r\n%s" % (len(body), body))
        if self._read_request() is not None:
            with self.server.lock:
                self.server.dropped += 1
        self.request.close()


class _Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OneAnswerPerConnection)
        self.lock = threading.Lock()
        self.answered = 0
        self.dropped = 0
        self.release = threading.Event()


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    srv = _Upstream()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_request_on_connections_the_upstream_dropped_is_answered(upstream: _Upstream, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    root = f"http://127.0.0.1:{upstream.server_address[1]}"
    proxy = ProxyProcess(root, trace)
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    try:
        # three at once: three upstream connections, each kept alive afterwards
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(httpx.post, proxy.url + "/completions", json=body, timeout=30) for _ in range(3)]
            deadline = time.monotonic() + 30
            while upstream.answered < 3:
                assert time.monotonic() < deadline, f"{upstream.answered} of 3 requests reached the upstream"
                time.sleep(0.02)
            upstream.release.set()
            assert [f.result().status_code for f in futs] == [200] * 3
        # the next requests go out on those connections, which the upstream now drops unanswered
        for _ in range(3):
            r = httpx.post(proxy.url + "/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
    finally:
        proxy.stop()
    assert upstream.dropped >= 1  # a kept-alive connection was tried and dropped: the retry was needed
    reqs = [e.data for e in read_trace(trace).events if e.kind == "request"]
    assert len(reqs) == 6
