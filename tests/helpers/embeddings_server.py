"""An OpenAI-compatible ``/v1/embeddings`` server for tests: a real HTTP server (stdlib) in a thread.

Its vectors are bags of hashed character trigrams (256 dimensions): crude but real similarity, enough for the
scorer's self-check (paraphrases share trigrams with their originals, unrelated pairs few).  ``mode`` switches
misbehaviour on while it runs: ``"slow"`` (sleeps ``delay`` before answering), ``"dim"`` (answers with 128
dimensions), ``"http500"``, ``"garbage"``.  The responses follow vLLM's shape: ``{"object": "list", "data":
[{"object": "embedding", "index": i, "embedding": [...]}], "model": ..., "usage": {...}}``.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DIM = 256


def trigram_vector(text: str, dim: int = DIM) -> list[float]:
    t = f"  {text.lower()}  "
    v = [0.0] * dim
    for i in range(len(t) - 2):
        v[zlib.crc32(t[i : i + 3].encode()) % dim] += 1.0
    return v


class EmbeddingsServer:
    def __init__(self, model: str = "test-embedder") -> None:
        self.model = model
        self.mode = "ok"
        self.delay = 2.0
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, obj: Any, raw: bytes | None = None) -> None:
                body = raw if raw is not None else json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", "0"))
                req = json.loads(self.rfile.read(n))
                outer.calls += 1
                if self.path != "/v1/embeddings":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                mode = outer.mode
                if mode == "slow":
                    time.sleep(outer.delay)
                if mode == "http500":
                    self._send(500, {"error": {"message": "boom"}})
                    return
                if mode == "garbage":
                    self._send(200, None, raw=b"<html>not json</html>")
                    return
                texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
                dim = 128 if mode == "dim" else DIM
                data = [{"object": "embedding", "index": i, "embedding": trigram_vector(t, dim)}
                        for i, t in enumerate(texts)]
                self._send(200, {"object": "list", "data": data, "model": req.get("model"),
                                 "usage": {"prompt_tokens": 0, "total_tokens": 0}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EmbeddingsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":  # python tests/helpers/embeddings_server.py: serve until killed (subprocess tests)
    import sys

    with EmbeddingsServer() as s:
        print(s.url, flush=True)
        if len(sys.argv) > 1:
            s.mode = sys.argv[1]
        threading.Event().wait()
