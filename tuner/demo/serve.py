"""An OpenAI-compatible HTTP server over the demo model: ``python -m tuner.demo.serve --port P``.

It exists so ``tuner proxy`` can be tried (and tested) against a real model on any machine: the official
``openai`` client talks to it as to vLLM or llama.cpp.  Endpoints: ``GET /v1/models``, ``POST
/v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE, ``data: {...}`` chunks then ``data:
[DONE]``) and not; ``usage`` comes in the response, and in a final chunk when the request asks for
``stream_options: {"include_usage": true}``.

Honoured request fields: ``prompt`` (a string, or a list of one string), ``messages`` (the contents joined
by newlines: the demo model is a plain byte-level LM, not a chat model), ``max_tokens`` /
``max_completion_tokens`` (default 16 for completions, 128 for chat; at most 255), ``temperature`` (default
1; 0 = greedy, deterministic), ``top_p``, ``stop`` (a string or up to 4), ``seed``, ``stream``.  ``n > 1``
is refused (400).  A token is a byte; a streamed chunk carries the text of one token once its UTF-8
character is complete (so a chunk may hold more than one token's bytes, never half a character).

One model, one worker thread: requests run one at a time in arrival order (no batching) and the event loop
never blocks on the model.  A client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import concurrent.futures
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL_NAME = "tuner-demo"
MAX_TOKENS_LIMIT = 255
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 128}


class Generator(Protocol):
    """What the server needs from a model: text pieces, one per generated token (``""`` allowed)."""

    def stream(
        self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, stop: list[str], seed: int | None
    ) -> AsyncIterator[str]: ...


class BadRequest(Exception):
    pass


class DemoGenerator:
    """The committed demo model, decoded one token at a time in a single worker thread."""

    def __init__(self, threads: int | None = 1) -> None:
        import torch

        from tuner.demo.model import load
        from tuner.demo.tokenizer import ByteTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model = load()
        self.tok = ByteTokenizer()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-model")

    def _decode(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        put: Any,
        cancelled: threading.Event,
    ) -> None:
        """Worker thread: one ``put(piece)`` per token, then ``put(None)``; an error is put as the exception."""
        import torch

        from tuner.demo.model import BatchDecoder
        from tuner.demo.sampling import SamplingParams, sample
        from tuner.demo.tokenizer import EOS

        try:
            if cancelled.is_set():
                return
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            params = SamplingParams(temperature=temperature, top_p=top_p)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            with torch.inference_mode():
                dec = BatchDecoder(self.model, [self.tok.encode(prompt, bos=True)], max_tokens)
                logits = dec.prefill()
                for i in range(min(max_tokens, dec.max_new_tokens)):
                    if cancelled.is_set():
                        return
                    nxt = sample(logits, params, None, gen)
                    tok = int(nxt[0])
                    if tok == EOS:
                        break
                    put(utf8.decode(bytes([tok])) if tok < 256 else "")
                    if i + 1 >= max_tokens or i + 1 >= dec.max_new_tokens:
                        break
                    logits = dec.step(nxt)
            rest = utf8.decode(b"", final=True)  # a character cut off by the end: U+FFFD
            if rest:
                put(rest)
            put(None)
        except BaseException as exc:  # hand it to the request; the worker thread keeps serving
            put(exc)

    async def stream(
        self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, stop: list[str], seed: int | None
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        self._pool.submit(self._decode, prompt, max_tokens, temperature, top_p, seed, put, cancelled)
        try:
            while True:
                item = await q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()


def _num(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
        raise BadRequest(f"{name} must be a number from {lo:g} to {hi:g}")
    return float(v)


def _params(body: dict[str, Any], kind: str) -> dict[str, Any]:
    n = body.get("n", 1)
    if n not in (None, 1):
        raise BadRequest("n > 1 is not supported by the demo server")
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    if mt is None:
        mt = DEFAULT_MAX_TOKENS[kind]
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise BadRequest("max_tokens must be a positive integer")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = [s for s in stop if s]
    else:
        raise BadRequest("stop must be a string or a list of up to 4 strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer")
    return {
        "max_tokens": min(mt, MAX_TOKENS_LIMIT),
        "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _num(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        "stop": stops,
        "seed": seed,
    }


def _prompt(body: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages must be a non-empty list")
        parts = []
        for m in msgs:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise BadRequest("each message needs a string content")
            parts.append(content)
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    return prompt


class _StopFilter:
    """Cuts the text at the first stop string, holding back a tail that could be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buf += piece
        cut = min((i for s in self.stops if (i := self.buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.stopped = self.buf[:cut], "", True
            return out
        keep = len(self.buf) - self.hold
        if keep <= 0:
            return ""
        out, self.buf = self.buf[:keep], self.buf[keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def build_app(generator: Generator, model_name: str = MODEL_NAME) -> Starlette:
    created = int(time.time())

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tuner"}]}
        )

    async def completions(request: Request) -> Response:
        return await _handle(request, "completions")

    async def chat(request: Request) -> Response:
        return await _handle(request, "chat")

    async def _handle(request: Request, kind: str) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        try:
            prompt = _prompt(body, kind)
            params = _params(body, kind)
        except BadRequest as exc:
            return _error(400, str(exc))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        prompt_tokens = len(prompt.encode("utf-8")) + 1  # + BOS
        if body.get("stream"):
            opts = body.get("stream_options")
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            return StreamingResponse(
                _stream(kind, rid, prompt, prompt_tokens, params, usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        text, n, finish = "", 0, "length"
        stopper = _StopFilter(params["stop"])
        try:
            async for piece in generator.stream(prompt, **params):
                n += 1
                text += stopper.feed(piece)
                if stopper.stopped:
                    finish = "stop"
                    break
            else:
                text += stopper.flush()
                if n < params["max_tokens"]:
                    finish = "stop"
        except Exception as exc:
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        usage_obj = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse(
            {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice],
             "usage": usage_obj}
        )

    async def _stream(
        kind: str, rid: str, prompt: str, prompt_tokens: int, params: dict[str, Any], usage: bool
    ) -> AsyncIterator[bytes]:
        now = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice]})

        if kind == "chat":
            yield chunk("", role=True)
        n, finish = 0, "length"
        stopper = _StopFilter(params["stop"])
        try:
            async for piece in generator.stream(prompt, **params):
                n += 1
                out = stopper.feed(piece)
                if out:
                    yield chunk(out)
                if stopper.stopped:
                    finish = "stop"
                    break
            else:
                rest = stopper.flush()
                if rest:
                    yield chunk(rest)
                if n < params["max_tokens"]:
                    finish = "stop"
        except Exception as exc:
            yield _sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                  "type": "server_error"}})
            return
        yield chunk(None, finish)
        if usage:
            u = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            yield _sse({"id": rid, "object": obj, "created": now, "model": model_name, "choices": [], "usage": u})
        yield b"data: [DONE]\n\n"

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto TCP: asyncio then sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m tuner.demo.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free one; the line printed says which)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--model-name", default=MODEL_NAME, help=f"model id served in /v1/models (default {MODEL_NAME})")
    args = ap.parse_args(argv)
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"tuner.demo.serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    app = build_app(DemoGenerator(threads=args.threads), args.model_name)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"tuner.demo.serve: serving {args.model_name} on http://{shown}:{port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
