"""``tuner proxy``: an HTTP proxy in front of any OpenAI-compatible server that measures and tunes it.

A plain ASGI application on uvicorn; the upstream is reached through :class:`Upstream`, keep-alive HTTP/1.1
connections parsed by httptools (llhttp) on asyncio (httpx only makes the rare cleanup calls).  POSTs to
``/v1/chat/completions`` and ``/v1/completions`` are measured and may be rewritten; ``/v1/models`` and every
other request pass through untouched.  Responses are forwarded chunk by chunk as they arrive (never
buffered whole: reading the upstream pauses past 256 KiB the client has not taken); a client that goes away
cancels the upstream request (its connection is closed).

How the proxy reaches the trace: it is an in-process client of the session.  ``ProxyChannel`` has the
channel API the output probe and the actuator use (``drain``, ``clients``, ``stats``, ``set_welcome``,
``broadcast_knobs``, ``send_command``), so ``Session(channel=ProxyChannel())`` records exactly the
``request`` events and ``req_*`` columns ``tuner run`` records, and an agent (``--policy``) drives the
proxy through the same actuator it uses for a socket client.  Each finished request becomes a row in
``tuner.link.channel.ROW_FIELDS`` order, expanded with ``tuner.link.channel.expand_rows`` — the same formulas as
``tuner.client``:

- ``created`` = the request reached the proxy; ``started`` = it got a concurrency slot, so
  ``queue_seconds`` is the wait in the proxy's queue;
- ``first`` / ``last`` = arrival of the first / last chunk holding generated output — answer text, reasoning
  (``delta.reasoning``; ``reasoning_content`` on older vLLM, SGLang, llama.cpp) or tool-call deltas — so TTFT
  (queue included) is the first generated token; ``answer_ttft_seconds`` (in the request event) is the first
  answer text or tool call, later than TTFT for a reasoning model; TPOT = (last - first) / (tokens - tokens
  in the first chunk);
- ``tokens`` = what the engine counted: ``usage.completion_tokens``.  The proxy asks for it on every stream
  (``stream_options.include_usage``; on vLLM also ``continuous_usage_stats``, which puts the running count on
  every chunk, so a stream cut short still has its exact count) and does not pass to a client what it did not
  ask for (the usage-only chunk, ``usage`` on each chunk).  Under load vLLM merges several tokens into one
  chunk: counting chunks would under-count.  Without usage (a server that ignores ``stream_options``): one
  per chunk with output.  Non-streaming responses have no TTFT/TPOT (one piece of text arrives at once);
- a stream cut short — the client left, or the upstream broke it — is a request with ``aborted`` =
  ``client`` / ``upstream`` and the tokens generated until then.  When the client leaves, the proxy half-closes
  the upstream connection (the engine sees the disconnect at once) and reads on for at most ``ABORT_DRAIN_S``:
  the tokens the engine wrote until it noticed are tokens it counted.  Tokens an engine had queued for the
  stream but never wrote stay out (vLLM 0.32 counts them: 0-22 over 6 aborted streams, tests/vllm);
- repetition (seq-rep-4, rep-32, loop, distinct-2, computed by the output probe) is measured on the model's own
  token ids when the stream carries them (vLLM, when the client asks ``return_token_ids``: ``token_ids`` in
  each choice), else on *words*: the generated text (answer and reasoning; tool-call arguments are JSON, not
  words) split on whitespace, each word identified by its CRC-32, whatever the chunking (a word split across
  chunks is one word).  Words make the figures comparable across servers with different tokenizers, but on
  short answers they see little (a 64-byte answer is ~12 words: seq-rep-4 of the demo model behind vLLM read
  0.000 on words where its bytes gave 0.11).

The engine (``--engine``, default ``auto``: recognised by the engine probe on the upstream's ``/metrics``,
which the proxy scrapes by default) decides the forms knobs take.

Knobs (from the agent through ``broadcast_knobs``): ``temperature`` rewrites the request JSON (mode
``unset``: only when the client set none; ``always``: every request, the client's own value replaced);
either way the value sent is clamped into ``temperature_bounds``.  ``repetition_penalty`` goes in the field
each engine takes (``PENALTY_FIELDS``: vLLM and SGLang ``repetition_penalty``, llama.cpp ``repeat_penalty``,
TGI only on ``/v1/completions``), on requests that set none; the actuator records ``not supported`` when the
engine is unknown, ``pending`` until the first request carrying it is answered — then ``applied``, or
``rejected by upstream`` when the answer is a 4xx naming the field (that request is sent again without it, and
the field is not sent there again).  Never ``applied`` for a value no engine took.  ``batch_size`` is a
concurrency limit on measured requests with a FIFO queue (also capped by ``max_concurrency``).  ``cleanup``
runs admin calls against the upstream — ``--cleanup-url``, else the engine's own (vLLM: ``POST
/reset_prefix_cache``, which vLLM serves only with ``VLLM_SERVER_DEV_MODE=1``; a 404/405 is ``not
supported``, recorded as such and not called again) — and measures what they changed in the engine's
KV-cache usage (a scrape right before and after).  ``precision`` cannot be changed over HTTP, nor cleanup
without a call: ``send_command`` refuses at once and the action is recorded as ``failed``.  ``tuner proxy``
narrows the policy's temperature and batch bounds to ``temperature_bounds`` / ``max_concurrency``
(``narrow_bounds``), so what an action records is what requests get.

Errors (JSON bodies ``{"error": {"message", "type"}}``): upstream unreachable 502
``upstream_unavailable``; upstream timeout 504 ``upstream_timeout``; malformed JSON 400; a body over
``max_body_bytes`` 413.  A stream the upstream breaks off after it started ends with an SSE ``error``
event (the status line is already sent).

Cost (tests/bench/test_bench_proxy.py: a fake uvicorn upstream streaming 100 tokens 50 ms apart, the real
``tuner proxy`` CLI recording a trace, every figure against direct calls in the same run; goals printed as
met / not met, not asserted).  Measured on a shared 2-core nested VM where other jobs kept the load at
2-9: the latency figures move with the machine (direct TTFT p50 2.3-4.7 ms; a bare TCP relay process alone
adds 0.4-2.4 ms), so read them with the load the bench prints.  With this code, load 2-3.5: TTFT p50
added 1.65-2.18 ms (paired 1.58-1.84) without httptools, 1.38 ms (paired 1.35) with it; tokens/s at 32
streams 0-1.2 % below direct (median of 4 paired rounds).  At load 4.6-6.4 the same code measured
3.7-3.9 ms and -16 % .. +8 % (noise the size of the effect).  Before the changes below, at load ~3.5-5:
2.3-4.4 ms and 2.2-6.9 %.  The steadier figure is CPU: 113-130 us per streamed token and 2.3-2.4 ms per
request (sampler thread included) against 205-360 us and 4.0 ms before; the upstream spends 64-92 us a
token.  Where it went (cProfile of the loop, strace): httpx/httpcore/anyio per upstream read (a cancel
scope, a pause/resume of the socket = two epoll_ctl), each request sent as two ``send()``s, Starlette's
middleware per chunk and an anyio task group per request.  Now the largest single cost is the ``send()``
system call (~0.2-0.3 ms each on this VM, one per chunk, as in the upstream).  ``httptools`` (in the
``proxy`` extra; uvicorn picks it up) took 0.2-0.65 ms off the added TTFT in A/B runs; ``uvloop`` alone
saved ~6 % CPU and nothing measurable in latency, so it is left out.

CPU per streamed token (tests/bench/test_bench_proxy_cpu.py: vLLM 0.32's completion chunks pre-encoded, one token
an HTTP chunk, 8 streams, the proxy recording a trace; its CPU with the idle sampler's subtracted; 2026-12-03,
load 7-14): 7.0-7.2 us as fast as the upstream writes (chunks merged in reads) against 17.9 us with the h11
client before; 29.9-32.4 us with one token a read (as an engine's decode steps come) against 54.3 us, where a
bare asyncio TCP relay process costs 13.4 us — a wake-up, a read and a write per token are most of it.  Of the
~30: forwarding 24.4, measuring 5.5-7.9 (parsing in ``_Measure.feed_sse`` 3.3, repetition 0.6, recording
0.2).  uvloop took ~10 % off the one-token-a-read figure (33.4 against 37.4 us in A/B runs at load 12-18): left
out again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx
import orjson
from starlette.types import Receive, Scope, Send

from tuner.core.actuator import CommandRefused
from tuner.errors import UserError
from tuner.link.addr import parse_listen as parse_address
from tuner.link.channel import expand_rows
from tuner.probes.engine import ENGINES as ENGINES_SHOWN
from tuner.records import GENAI_DURATION_BUCKETS, ROW_FIELDS, Knobs

MEASURED = ("/v1/chat/completions", "/v1/completions")
DEFAULT_MAX_BODY = 8 << 20
TEXT_KEPT = 1 << 20  # characters of a response kept for repetition; past that only counting goes on
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_ROW_INDEX = {name: i for i, (name, _) in enumerate(ROW_FIELDS)}


# -- addresses -----------------------------------------------------------------------------------------
def parse_listen(text: str, public: bool = False) -> tuple[str, int]:
    """``--listen``: ``tuner.link.addr``'s rules; port 0 takes any free port (the proxy prints its URL)."""
    return parse_address(
        text, public, option="--listen", public_flag="--public", public_means="accept other machines", port_zero=True
    )


def parse_upstream(url: str) -> str:
    """The upstream server's root URL (a trailing ``/v1`` is dropped: request paths already carry it)."""
    try:
        u = httpx.URL(url)
    except Exception:
        raise UserError(f"--upstream {url!r} is not a URL") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise UserError(f"--upstream {url!r}: use http://HOST:PORT (or https://)")
    base = str(u.copy_with(query=None, fragment=None)).rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base


# -- the fair concurrency limit ----------------------------------------------------------------------
class FairLimiter:
    """A semaphore whose waiters are served first come, first served, and whose limit can change.

    Loop thread only.  ``limit=None``: unlimited.  Lowering the limit lets running requests finish; new
    ones wait until ``active`` falls under it.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _free(self) -> bool:
        return self.limit is None or self.active < self.limit

    async def acquire(self) -> None:
        if self._free() and not self._waiters:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: hand the slot on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._free():
            fut = self._waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)


# -- words for repetition ----------------------------------------------------------------------------
def word_ids(text: str) -> list[int]:
    """The repetition "tokens" of a text stream: whitespace-separated words, as CRC-32 ids."""
    return [zlib.crc32(w.encode("utf-8", "replace")) for w in text.split()]


# -- engines ---------------------------------------------------------------------------------------------
ENGINE_NAMES = ("vllm", "sglang", "tgi", "llamacpp")
PENALTY_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vllm": ("repetition_penalty", MEASURED),  # an "extra" sampling field on both routes
    "sglang": ("repetition_penalty", MEASURED),
    "llamacpp": ("repeat_penalty", MEASURED),
    # TGI: /v1/completions takes repetition_penalty; its chat request has no such field (it would be ignored
    # silently) and maps presence_penalty to repetition_penalty = presence_penalty + 2.0: no faithful form
    "tgi": ("repetition_penalty", ("/v1/completions",)),
}
"""The repetition penalty's field per engine, and the routes that take it (sources in ``tuner.probes.engine``'s
notes: vLLM ``protocol.py``, SGLang ``openai/protocol.py``, llama.cpp ``server.cpp``, TGI ``router/src/lib.rs``)."""


ENGINE_CLEANUP: dict[str, tuple[tuple[str, str], ...]] = {"vllm": (("POST", "/reset_prefix_cache"),)}
"""The engines' own admin calls that free memory (vLLM: ``serve/dev/cache/api_router.py``, dev mode only)."""


@dataclass
class _Penalty:
    """The repetition-penalty knob as the proxy carries it (the channel's lock guards it)."""

    pending: tuple[str, float] | None = None
    """(command id, value) of a change no request has carried yet."""
    accepted: set[str] = field(default_factory=set)
    """Engines whose answer to a request carrying the field was a success."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Engine -> why (the upstream's 4xx naming the field); the field is no longer sent there."""


# -- the in-process channel the session reads ---------------------------------------------------------
class ProxyChannel:
    """The channel API (``tuner.link.channel.ChannelServer``'s) for a client living in this process: the proxy.

    Any thread may call it: the loop thread posts finished requests, the sampler thread drains them and
    pushes knobs and commands.
    """

    def __init__(self) -> None:
        # No socket listens here: the path only gives the session a private 0700 directory for its observer
        # socket (it puts that next to the channel's), removed again by close().
        self.directory = tempfile.mkdtemp(prefix="tuner-proxy-")
        self.path = os.path.join(self.directory, "in-process")
        self._lock = threading.Lock()
        self._rows: list[tuple[float, list[Any], dict[str, Any] | None]] = []
        self._control: list[tuple[float, dict[str, Any]]] = []
        self._connected = time.monotonic()
        self._announced = False
        self._received = 0
        self.record_text = False
        self.knobs = Knobs()
        self.failed = 0
        self.consistency_rate = 0.0
        self.active = 0
        self.proxy: Proxy | None = None  # set by the app at start-up (knobs and commands go there)
        self.penalty = _Penalty()

    # channel side (sampler thread)
    def drain(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            rows, self._rows = self._rows, []
            control, self._control = self._control, []
        out: list[tuple[float, dict[str, Any]]] = []
        if not self._announced:
            self._announced = True
            out.append((self._connected, {"type": "client_connect", "pid": os.getpid(), "uid": os.getuid(),
                                          "conn": 0}))
        for arrived, row, extra in rows:
            text = row[_ROW_INDEX["text"]]
            if not row[_ROW_INDEX["ids"]]:  # no token ids in the stream: words, here, off the proxy's event loop
                row[_ROW_INDEX["ids"]] = word_ids(text) if text else []
            if not self.record_text:
                row[_ROW_INDEX["text"]] = None
            for msg in expand_rows({"rows": [row]}):
                msg["pid"] = os.getpid()
                if extra:
                    msg.update(extra)
                out.append((arrived, msg))
        out.extend(control)
        now = time.monotonic()
        out.append((now, {"type": "status", "conn": 0, "pid": os.getpid(), "active": self.active,
                          "dropped": 0, "failed": self.failed, "sent": self._received}))
        return out

    def clients(self) -> list[dict[str, Any]]:
        return [{"pid": os.getpid(), "uid": os.getuid(), "connected_at": self._connected, "conn": 0}]

    def stats(self) -> dict[str, int]:
        return {"malformed": 0, "rejected_peers": 0, "clients": 1, "received": self._received, "dropped": 0}

    def set_welcome(self, **options: Any) -> None:
        if "record_text" in options:
            self.record_text = bool(options["record_text"])
        if "consistency_rate" in options:  # --consistency: the share of requests shadowed (tuner.proxy.shadow)
            self.consistency_rate = float(options["consistency_rate"] or 0.0)

    def broadcast_knobs(self, knobs: Knobs) -> int:
        """The proxy is the one client: it uses the knobs for every request from now on, within its limits
        (``tuner proxy`` narrows the policy bounds to them: ``tuner.core.arbiter.narrow_bounds``)."""
        self.knobs = knobs  # one assignment: the loop reads it per request
        if self.proxy is not None:
            self.proxy.knobs_changed()
        return 1

    def knob_outcome(self, knob: str, value: Any) -> tuple[str, dict[str, Any]] | None:
        """Asked by the actuator before a knob change: None when it simply applies (temperature, batch size,
        a penalty field this upstream has accepted before); else the outcome to record instead of
        ``applied``: ``not supported`` (no form for this engine), ``rejected by upstream`` (it answered 4xx
        naming the field), or ``pending`` with a ``command_id`` — the field goes on the next request and the
        upstream's answer decides (a ``command_result`` follows: ``applied`` or ``rejected by upstream``)."""
        if knob != "repetition_penalty" or value is None:
            return None
        proxy = self.proxy
        engine = proxy.engine() if proxy is not None else None
        if engine is None:
            return "not supported", {"error": "the upstream's engine is not known, so neither is the "
                                     "name of its repetition penalty (tuner proxy --engine vllm|sglang|tgi|llamacpp, "
                                     "or let it read the engine's /metrics)"}
        with self._lock:
            pen = self.penalty
            if pen.rejected.get(engine):
                return "rejected by upstream", {"error": pen.rejected[engine], "engine": engine}
            if engine in pen.accepted:
                return None
            cid = uuid.uuid4().hex[:12]
            old, pen.pending = pen.pending, (cid, float(value))
        if old is not None:  # never carried by a request: the newer value replaces it
            self.post_result(old[0], "repetition_penalty", False,
                             {"outcome": "superseded", "value": old[1]}, "replaced before any request carried it")
        field_name = PENALTY_FIELDS[engine][0]
        return "pending", {"command_id": cid, "engine": engine, "field": field_name,
                           "why": f"sent as {field_name!r} on the next request; the upstream's answer decides"}

    def penalty_for(self, engine: str) -> tuple[bool, str | None]:
        """Whether the penalty field may go to this engine, and the pending change's command id when this
        request is the first to carry it (its answer decides; see ``penalty_answer``)."""
        with self._lock:
            pen = self.penalty
            if engine in pen.rejected:
                return False, None
            if pen.pending is None:
                return True, None
            cid, pen.pending = pen.pending[0], None
            return True, cid

    def penalty_refused(self, engine: str, why: str) -> None:
        with self._lock:
            self.penalty.rejected[engine] = why

    def penalty_answer(self, cid: str, engine: str, name: str, value: float, status: int | None,
                       accepted: bool | None, message: str = "") -> None:
        """The upstream answered the request that carried a pending change: ``accepted`` (2xx), rejected (a 4xx
        naming the field), or None (inconclusive: another error) — the next request carries it again."""
        result: dict[str, Any] = {"engine": engine, "field": name, "value": value, "status": status}
        with self._lock:
            pen = self.penalty
            if accepted is None:
                if pen.pending is None:
                    pen.pending = (cid, value)
                return
            if accepted:
                pen.accepted.add(engine)
            else:
                pen.rejected[engine] = f"rejected by upstream: HTTP {status} naming {name!r}: {message[:200]}"
        if accepted:
            self.post_result(cid, "repetition_penalty", True, {**result, "outcome": "applied"}, None)
        else:
            self.post_result(cid, "repetition_penalty", False, {**result, "outcome": "rejected by upstream"},
                             self.penalty.rejected[engine])

    def send_command(self, cmd: str, args: dict[str, Any]) -> str | None:
        """Cleanup runs the configured admin calls (its result comes back as a ``command_result``); anything
        the proxy cannot do raises ``CommandRefused`` at once, so the action is recorded as failed, never as
        sent and refused later."""
        proxy = self.proxy
        if cmd == "precision":
            raise CommandRefused("the proxy cannot change the server's precision (no such call in the OpenAI API)")
        if cmd != "cleanup":
            raise CommandRefused(f"the proxy does not support {cmd!r}")
        if proxy is None or not proxy.cleanup_calls():
            raise CommandRefused("no cleanup call for this engine (vLLM: POST /reset_prefix_cache; others: tuner "
                                 "proxy --cleanup-url PATH)")
        gone = [proxy.admin_unsupported[f"{m} {t}"] for m, t in proxy.cleanup_calls()
                if f"{m} {t}" in proxy.admin_unsupported]
        if len(gone) == len(proxy.cleanup_calls()):
            raise CommandRefused("not supported: " + "; ".join(gone), outcome="not supported")
        if proxy.loop is None:
            raise CommandRefused("the proxy is not serving yet")
        cid = uuid.uuid4().hex[:12]
        proxy.run_command(cid, cmd, args)
        return cid

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # proxy side (loop thread)
    def post_row(self, row: list[Any], extra: dict[str, Any] | None = None) -> None:
        """A finished request; ``extra`` fields join its ``request`` event (``aborted``, ``answer_ttft_seconds``)."""
        with self._lock:
            self._rows.append((time.monotonic(), row, extra))
            self._received += 1

    def post_quality(self, msg: dict[str, Any]) -> None:
        """A shadowed request's two answers, for the quality probe (``tuner.proxy.shadow``)."""
        with self._lock:
            self._control.append((time.monotonic(), {**msg, "pid": os.getpid(), "conn": 0}))

    def post_error(self, data: dict[str, Any]) -> None:
        """A measured request that failed (``_Forward._failed``): a ``request_error`` message."""
        with self._lock:
            self._control.append((time.monotonic(), {"type": "request_error", "pid": os.getpid(), "conn": 0, **data}))

    def post_result(self, cid: str, cmd: str, ok: bool, result: dict[str, Any] | None, error: str | None) -> None:
        msg = {"type": "command_result", "pid": os.getpid(), "conn": 0, "id": cid, "cmd": cmd, "ok": ok,
               "result": result, "error": error}
        with self._lock:
            self._control.append((time.monotonic(), msg))


# -- configuration -------------------------------------------------------------------------------------
@dataclass
class ProxyConfig:
    upstream: str
    temperature_mode: str = "unset"  # or "always"
    temperature_bounds: tuple[float, float] = (0.0, 2.0)
    max_concurrency: int | None = None
    cleanup_urls: list[tuple[str, str]] = field(default_factory=list)  # (METHOD, path or URL)
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout: float = 600.0
    connect_timeout: float = 5.0
    shadow_concurrency: int = 1
    """Shadow requests (``--consistency``) in flight at most."""
    engine: str = "auto"
    """``vllm``, ``sglang``, ``tgi``, ``llamacpp``, or ``auto``: what the engine probe recognised on /metrics."""
    engine_metrics: str | None = None
    """The engine's Prometheus page, scraped by the session's engine probe (None: not scraped)."""


def parse_cleanup(spec: str) -> tuple[str, str]:
    """``[METHOD ]PATH`` (default POST), e.g. ``/reset_prefix_cache`` or ``"POST /sleep?level=1"``."""
    parts = spec.split()
    if len(parts) == 1:
        method, target = "POST", parts[0]
    elif len(parts) == 2:
        method, target = parts[0].upper(), parts[1]
    else:
        raise UserError(f"--cleanup-url {spec!r}: use [METHOD ]PATH, e.g. /reset_prefix_cache")
    if method not in ("GET", "POST", "PUT", "DELETE"):
        raise UserError(f"--cleanup-url {spec!r}: method must be GET, POST, PUT or DELETE")
    if not (target.startswith("/") or target.startswith(("http://", "https://"))):
        raise UserError(f"--cleanup-url {spec!r}: give a path starting with / (or a full URL)")
    return method, target


class _BodyTooLarge(Exception):
    pass


# -- per request measurement ---------------------------------------------------------------------------
class _Measure:
    """What one measured request saw.  Loop thread; a few attribute writes per chunk.

    Output is anything generated: answer text (``text``, ``delta.content``), reasoning (``delta.reasoning``,
    vLLM >= 0.11's name; ``delta.reasoning_content``: older vLLM, SGLang, llama.cpp) and tool-call deltas.  TTFT
    is the first output of any kind, ``first_answer`` the first answer text or tool call.  Tokens come from
    ``usage.completion_tokens`` (cumulative on every chunk with vLLM's ``continuous_usage_stats``, so a stream
    cut short still has the exact count), else one per chunk with output.

    With ``strip_final`` / ``strip_usage`` (usage the proxy asked for and the client did not) the stream is
    rewritten on the way: the usage-only chunk (``"choices": []``) is dropped, ``usage`` is removed from the
    other chunks; ``feed_sse`` then returns the bytes to forward.
    """

    __slots__ = ("buf", "completion_tokens", "created", "done", "first", "first_answer", "gaps", "gaps_sum",
                 "is_sse", "kept", "last", "model", "n", "n_first", "nonsse", "operation", "prompt_tokens",
                 "reasoning", "rewrite", "started", "stream", "strip_final", "strip_usage", "texts", "token_ids")

    def __init__(self, created: float, strip_final: bool = False, strip_usage: bool = False) -> None:
        self.created = created
        # for the OpenTelemetry GenAI metrics (``tuner.outputs.otlp``): what was asked, and the time between
        # output chunks (SSE events with output) counted in GENAI_DURATION_BUCKETS (+Inf last)
        self.model: str | None = None
        self.operation = "chat"
        self.stream = False
        self.gaps: list[int] | None = None
        self.gaps_sum = 0.0
        self.started: float | None = None
        self.first: float | None = None
        self.first_answer: float | None = None
        self.last: float | None = None
        self.n = 0
        self.n_first = 0
        self.texts: list[str] = []
        self.token_ids: list[int] | None = None  # the engine's own ids, when the stream carries them
        self.kept = 0
        self.buf = b""
        self.is_sse = False
        self.done = False  # the stream's closing ``data: [DONE]`` went through
        self.nonsse: list[bytes] | None = None
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.reasoning = False
        self.strip_final = strip_final
        self.strip_usage = strip_usage
        self.rewrite = strip_final or strip_usage

    def feed_sse(self, chunk: bytes, now: float) -> bytes | None:
        """Measure one piece of the stream.  Returns None (forward the piece as it is) or, when rewriting,
        the whole lines to forward (an unfinished line waits in ``buf`` for the rest of it).

        Per token on the proxy's hot path (tests/bench/test_bench_proxy_cpu.py): events come from orjson, so
        exact ``type(x) is`` checks stand for isinstance, and the common case is inlined."""
        data = self.buf + chunk if self.buf else chunk
        lines = data.split(b"\n")
        self.buf = lines.pop()
        before = self.n
        out: list[bytes] | None = [] if self.rewrite else None
        usage_at: int | None = None
        skip_blank = False
        for line in lines:
            if not line.startswith(b"data:"):
                if skip_blank:
                    skip_blank = False
                    if not line.strip():
                        continue  # the blank line that ended a dropped event
                if out is not None:
                    out.append(line)
                continue
            skip_blank = False
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif payload:
                try:
                    ev = orjson.loads(payload)  # ~15x json.loads on a vLLM chunk (2 us vs 30 here)
                except ValueError:
                    ev = None
                if type(ev) is dict:
                    if self._event(ev) and self.first_answer is None:
                        self.first_answer = now
                    usage = ev.get("usage")
                    if usage is not None:
                        if type(usage) is dict:
                            ct, pt = usage.get("completion_tokens"), usage.get("prompt_tokens")
                            if type(ct) is int:
                                self.completion_tokens = ct
                            if type(pt) is int:
                                self.prompt_tokens = pt
                            if self.first is None:
                                usage_at = self.completion_tokens  # continuous usage: tokens so far in this read
                        if out is not None:
                            if not ev.get("choices"):
                                if self.strip_final:
                                    skip_blank = True
                                    continue
                            elif self.strip_usage:
                                line = _without_usage(line, ev)
            if out is not None:
                out.append(line)
        if self.n > before:
            if self.first is not None:  # a chunk gap since the last output; merged events came at once (0)
                self._gaps(now - (self.last or now), self.n - before)
            elif self.n - before > 1:
                self._gaps(0.0, self.n - before - 1)
            if self.first is None:
                self.first = now
                self.n_first = usage_at if usage_at is not None else self.n
            self.last = now
        if out is None:
            return None
        out.append(b"")
        return b"\n".join(out)

    def _gaps(self, gap: float, n: int) -> None:
        """``n`` output chunks arrived in one read, ``gap`` after the previous output: one gap of ``gap``,
        the rest 0."""
        if self.gaps is None:
            self.gaps = [0] * (len(GENAI_DURATION_BUCKETS) + 1)
        self.gaps[bisect.bisect_left(GENAI_DURATION_BUCKETS, gap)] += 1
        self.gaps[0] += n - 1
        self.gaps_sum += gap

    def _event(self, ev: dict[str, Any]) -> bool:
        """Count one event's output (its usage is read by the caller); True when it held answer text or a
        tool call."""
        answer = False
        choices = ev.get("choices")
        if not choices or type(choices) is not list:
            return False
        for c in choices:
            if type(c) is not dict:
                continue
            ids = c.get("token_ids")
            if ids is not None and type(ids) is list:  # vLLM with return_token_ids: repetition on its own tokens
                self._keep_ids(ids)
            text = c.get("text")
            out = False
            if type(text) is str:  # /v1/completions
                if text:
                    out = answer = True
                    if self.kept < TEXT_KEPT:
                        self.texts.append(text)
                        self.kept += len(text)
            else:
                delta = c.get("delta")
                if type(delta) is not dict:
                    continue
                content = delta.get("content")
                if content and type(content) is str:
                    out = answer = True
                    self._keep(content)
                r = delta.get("reasoning")
                if r is None:
                    r = delta.get("reasoning_content")
                if r and type(r) is str:
                    out = self.reasoning = True
                    self._keep(r)
                if delta.get("tool_calls") or delta.get("function_call"):
                    out = answer = True  # arguments stream as JSON text: output, but not words to judge
            if out:
                self.n += 1
        return answer

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            ct, pt = usage.get("completion_tokens"), usage.get("prompt_tokens")
            if isinstance(ct, int) and not isinstance(ct, bool):
                self.completion_tokens = ct
            if isinstance(pt, int) and not isinstance(pt, bool):
                self.prompt_tokens = pt

    def _keep(self, text: str) -> None:
        if self.kept < TEXT_KEPT:
            self.texts.append(text)
            self.kept += len(text)

    def _keep_ids(self, ids: list[Any]) -> None:
        if self.token_ids is None:
            self.token_ids = []
        if len(self.token_ids) < TEXT_KEPT:
            self.token_ids.extend(i for i in ids if isinstance(i, int) and not isinstance(i, bool))

    def flush(self) -> bytes:
        """What is left of an unfinished last line (rewriting: it was held back)."""
        rest, self.buf = self.buf, b""
        return rest

    def feed_body(self, chunk: bytes) -> None:
        if self.nonsse is not None and self.kept < TEXT_KEPT * 4:
            self.nonsse.append(chunk)
            self.kept += len(chunk)

    def finish_body(self) -> None:
        """A whole (non-streamed) response: its text and usage."""
        if not self.nonsse:
            return
        try:
            obj = json.loads(b"".join(self.nonsse))
        except ValueError:
            return
        self.nonsse, self.kept = None, 0
        if not isinstance(obj, dict):
            return
        for c in obj.get("choices") or ():
            if isinstance(c, dict):
                ids = c.get("token_ids")
                if isinstance(ids, list):
                    self._keep_ids(ids)
                text = c.get("text")
                if text is None:
                    msg = c.get("message")
                    if isinstance(msg, dict):
                        r = msg.get("reasoning") if msg.get("reasoning") is not None else msg.get("reasoning_content")
                        if isinstance(r, str) and r:
                            self.reasoning = True
                            self._keep(r)
                        text = msg.get("content")
                if isinstance(text, str):
                    self._keep(text)
        self._usage(obj.get("usage"))


_USAGE = re.compile(rb',\s*"usage"\s*:\s*\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}')
"""``,"usage":{...}`` (one level of nesting: ``prompt_tokens_details``), as vLLM writes it after ``choices``."""


def _without_usage(line: bytes, ev: dict[str, Any]) -> bytes:
    """The event line without its ``usage``: cut out of the bytes (a regular expression: the rest stays as the
    engine wrote it), or, when the text is laid out otherwise, the event encoded again without it."""
    i = line.find(b',"usage":{')  # vLLM's compact layout, usage numbers (or null) only: cut by finding
    if i > 0:
        j = line.find(b"}", i + 10)
        if j > 0 and line.find(b"{", i + 10, j) < 0:
            return line[:i] + line[j + 1 :]
    cut, n = _USAGE.subn(b"", line, count=1)
    if n:
        return cut
    ev = {k: v for k, v in ev.items() if k != "usage"}
    return b"data: " + json.dumps(ev, separators=(",", ":"), ensure_ascii=False).encode()


# -- upstream connections -----------------------------------------------------------------------------
class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange (-> 502)."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect, or sent no byte, within the configured time (-> 504)."""


_READ_HIGH = 256 << 10  # body bytes parsed but not yet forwarded: past this, stop reading the upstream socket
_READ_LOW = 64 << 10


class _Head:
    """A final response head: status and headers (names lower case)."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers


_END = object()  # the response's body is complete
_CLOSED = object()  # the upstream closed the connection before the response was complete


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the upstream: httptools (llhttp, C) parses responses, events queue
    up for one reader: a :class:`_Head`, body bytes, ``_END`` / ``_CLOSED``, or an exception.

    Body pieces that arrive before the reader takes them are joined: one write to the client and one pass of
    measuring for what one read brought, however many HTTP chunks (tokens) it held.  Reading never stops on its
    own (an idle pooled connection notices the server closing it); it pauses only when a slow client lets more
    than ``_READ_HIGH`` bytes of body pile up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.events: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        # one timer for "no byte in timeout s", re-armed only when it fires (not one timer per wait)
        self._timer: asyncio.TimerHandle | None = None
        self._wait_from = 0.0
        self._timeout = 0.0
        self.buffered = 0
        self.paused = False
        self.closed = False
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self.idle = True  # no exchange in progress: the last response (if any) ended and may be followed
        self.must_close = False  # the connection cannot carry another exchange
        self.head_request = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._until_eof = False  # a body delimited by the connection's end

    # httptools callbacks (inside feed_data)
    def on_message_begin(self) -> None:
        self._headers = []
        self._informational = False
        self._until_eof = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((bytes(name).lower(), bytes(value)))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue and the like: the real answer follows
            return
        names = {k for k, _ in self._headers}
        self._until_eof = (b"content-length" not in names and b"transfer-encoding" not in names
                           and status not in (204, 304) and not self.head_request)
        if self._until_eof or not self.parser.should_keep_alive():
            self.must_close = True
        self.events.append(_Head(status, self._headers))
        if self.head_request:  # no body follows a HEAD answer, whatever its headers say (llhttp cannot know)
            self.must_close = True
            self.events.append(_END)

    def on_body(self, body: bytes) -> None:
        if self._informational or self.head_request or not body:
            return
        self.buffered += len(body)
        events = self.events
        if events and type(events[-1]) is bytes:
            events[-1] += body
        else:
            events.append(bytes(body))

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self.head_request:
            self.events.append(_END)
        if not self.parser.should_keep_alive():
            self.must_close = True
        self.idle = True

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (create_connection)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols (not supported)"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad HTTP from the upstream: {exc}"))
            return
        if self.buffered > _READ_HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if not self.idle:
            if self._until_eof:  # the end of the connection ends the body
                self.events.append(_END)
                self.idle = True
            else:
                self.events.append(_CLOSED)
        self.must_close = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(UpstreamError(f"the upstream closed the connection{f': {exc}' if exc else ''}"))

    def _fail(self, exc: Exception) -> None:
        self.events.append(exc)
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.waiter is None or self.waiter.done():
            return  # nobody waits: the next wait arms it again
        due = self._wait_from + self._timeout
        if self.loop.time() >= due:
            self._wake()  # with no event: the reader raises UpstreamTimeout
        else:
            self._timer = self.loop.call_at(due, self._check_timeout)

    # the reader's side
    async def next_event(self, timeout: float) -> Any:
        """The next event (body ``bytes``, a ``_Head``, ``_END``, ``_CLOSED``), or the exception that ended the
        exchange; waits at most ``timeout`` s for it."""
        while not self.events:
            if self.closed:
                raise UpstreamError("the upstream closed the connection")
            loop = self.loop
            self.waiter = loop.create_future()
            self._wait_from = loop.time()
            self._timeout = timeout
            if self._timer is None:
                self._timer = loop.call_at(self._wait_from + timeout, self._check_timeout)
            try:
                await self.waiter
            finally:
                self.waiter = None
            if not self.events:
                raise UpstreamTimeout(f"no data from the upstream in {timeout:g} s")
        ev = self.events.popleft()
        if type(ev) is bytes:
            self.buffered -= len(ev)
            if self.paused and self.buffered < _READ_LOW and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
        elif isinstance(ev, Exception):
            self.events.appendleft(ev)  # stays failed
            raise ev
        return ev

    def send_request(self, data: bytes, head_request: bool) -> None:
        assert self.transport is not None
        self.idle = False
        self.head_request = head_request
        self.transport.write(data)

    def reusable(self) -> bool:
        return (self.idle and not self.must_close and not self.closed and not self.events
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


def _request_bytes(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 request, head and body in one piece; names and values that would break the framing are
    refused (the client's own headers came through uvicorn's parser; this guards the ones added here)."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    if not target or any(c in target for c in (b" ", b"\r", b"\n")):
        raise UpstreamError(f"the request cannot be sent: bad target {target[:80]!r}")
    for k, v in headers:
        if not k or b":" in k or b"\r" in k or b"\n" in k or b"\r" in v or b"\n" in v:
            raise UpstreamError(f"the request cannot be sent: bad header {k[:40]!r}")
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


class UpstreamResponse:
    """Status, headers (names lower case) and the body as it arrives, on one pooled connection."""

    def __init__(self, pool: Upstream, conn: _Conn, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status_code = status
        self.headers = headers

    def header(self, name: bytes) -> str:
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return ""

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body bytes (de-chunked, not decompressed) as they arrive: what has arrived since the last piece
        was taken, in one piece."""
        conn = self._conn
        timeout = self._pool.read_timeout
        while conn is not None:
            ev = await conn.next_event(timeout)
            if type(ev) is bytes:
                yield ev
            elif ev is _END:
                self._release()
                return
            elif ev is _CLOSED:
                raise UpstreamError("the upstream closed the connection mid-response")

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable():
            self._pool.put_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Give up on the rest of the body: the connection is closed, which stops the upstream's work."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Upstream:
    """Keep-alive HTTP/1.1 connections to one upstream server (asyncio + httptools, loop thread only).

    Lean on purpose: the proxy's per-request and per-chunk path was dominated by httpx/httpcore/anyio
    layers (per read: a cancel scope and a pause/resume of the socket; request head and body as two
    sends).  Here one ``write`` carries the whole request and each chunk is one ``data_received``.
    """

    def __init__(self, base: str, *, read_timeout: float, connect_timeout: float, max_idle: int = 64,
                 keepalive_s: float = 30.0) -> None:
        u = httpx.URL(base)
        self.scheme = u.scheme
        self.host = u.host
        self.port = u.port or (443 if u.scheme == "https" else 80)
        default = (self.scheme == "https" and self.port == 443) or (self.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default else f"{host}:{self.port}").encode("ascii")
        self.prefix = u.raw_path.split(b"?")[0].rstrip(b"/")
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.keepalive_s = keepalive_s
        self._idle: list[_Conn] = []
        self._ssl: Any = httpx.create_ssl_context() if self.scheme == "https" else None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop), self.host, self.port, ssl=self._ssl,
                                       server_hostname=self.host if self._ssl else None),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamError(exc.strerror or str(exc)) from None
        conn.transport = transport  # (uvloop may call connection_made only after create_connection returns)
        return conn

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable() and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def put_back(self, conn: _Conn) -> None:
        if len(self._idle) >= self.max_idle or not conn.reusable():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.received = False
        self._idle.append(conn)

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> UpstreamResponse:
        """Send one request (``target`` = path and query); returns once the response head has arrived."""
        hdrs = [(b"host", self.host_header), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append((b"content-length", str(len(body)).encode("ascii")))
        for attempt in (0, 1):
            # the retry is on a fresh connection: the other idle ones may be as stale (a server that closes idle
            # connections after its keep-alive closes them all at once; under load their ends are not read yet)
            conn = self._take_idle() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                data = _request_bytes(method, self.prefix + target, hdrs, body)
            except UpstreamError:
                conn.close()
                raise
            conn.send_request(data, method == "HEAD")  # head and body in one write
            try:
                while True:
                    ev = await conn.next_event(self.read_timeout)
                    if type(ev) is _Head:
                        return UpstreamResponse(self, conn, ev.status, ev.headers)
                    if ev is _CLOSED:
                        raise UpstreamError("the upstream closed the connection without answering")
            except UpstreamTimeout:
                conn.close()
                raise
            except UpstreamError:
                conn.close()
                # a kept-alive connection the server had just closed: once more on a fresh one
                if reused and not conn.received and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


# -- the proxy -----------------------------------------------------------------------------------------
class Proxy:
    """Holds the upstream client, the limiter and the channel; ``app`` is the ASGI application."""

    def __init__(self, config: ProxyConfig, channel: ProxyChannel | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.channel = channel if channel is not None else ProxyChannel()
        self.channel.proxy = self
        self.log = log or (lambda msg: print(f"tuner: {msg}", file=sys.stderr, flush=True))
        self.limiter = FairLimiter(config.max_concurrency)
        self.upstream: Upstream | None = None
        self.admin: httpx.AsyncClient | None = None  # cleanup calls only (rare, small): httpx
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine_probe: Any = None
        """The session's ``tuner.probes.engine.EngineProbe`` on the upstream (``--engine auto`` reads it)."""
        self.usage_refused: dict[str, str] = {}
        """Engine -> why: it answered 4xx naming ``stream_options``; the proxy no longer adds it there."""
        self.admin_unsupported: dict[str, str] = {}
        """Admin call -> why it is not supported (404/405 once: not called again)."""
        self._next_id = 0
        self.shadow: Any = None
        """Shadow requests for self-consistency (``tuner.proxy.shadow``), with ``--consistency``."""
        self._errors_logged: set[str] = set()
        self._notes_once: set[str] = set()
        self.app = self  # (an object with an async __call__: uvicorn detects ASGI 3 from that)

    def engine(self) -> str | None:
        """The upstream's engine: ``--engine``, else what its /metrics showed (None until known)."""
        if self.config.engine != "auto":
            return self.config.engine
        probe = self.engine_probe
        return getattr(probe, "engine", None) if probe is not None else None

    def note_once(self, key: str, message: str) -> None:
        """A trace note (and a line on stderr), once per ``key``."""
        if key not in self._notes_once:
            self._notes_once.add(key)
            self.log(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application: POSTs to ``MEASURED`` paths are measured, everything else passes through.

        Plain ASGI rather than a framework's router and middleware: those wrapped every chunk sent in two
        more coroutine calls and every request in a task group (measured: ~15% of the proxy's CPU).
        """
        kind = scope["type"]
        if kind == "http":
            if scope["method"] == "POST" and scope["path"] in MEASURED:
                await self._measured(scope, receive, send)
            else:
                await self._passthrough(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        c = self.config
        self.loop = asyncio.get_running_loop()
        self.upstream = Upstream(c.upstream, read_timeout=c.timeout, connect_timeout=c.connect_timeout)
        if self.channel.consistency_rate > 0:
            from tuner.proxy.shadow import ShadowSampler

            self.shadow = ShadowSampler(self.channel.consistency_rate, c.shadow_concurrency, self.channel.post_quality)
        self.knobs_changed()

    async def stop(self) -> None:
        if self.shadow is not None:
            await self.shadow.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.admin is not None:
            await self.admin.aclose()

    # -- knobs and commands (called from the sampler thread) ----------------------------------------------
    def effective_limit(self) -> int | None:
        knob, cap = self.channel.knobs.batch_size, self.config.max_concurrency
        if knob is not None and knob >= 1:
            return min(knob, cap) if cap is not None else knob
        return cap

    def knobs_changed(self) -> None:
        loop = self.loop
        if loop is None:
            return
        limit = self.effective_limit()
        if limit != self.limiter.limit:
            loop.call_soon_threadsafe(self.limiter.set_limit, limit)

    def run_command(self, cid: str, cmd: str, args: dict[str, Any]) -> None:
        if self.loop is None:
            self.channel.post_result(cid, cmd, False, None, "the proxy is not running")
            return
        asyncio.run_coroutine_threadsafe(self._cleanup(cid), self.loop)

    def cleanup_calls(self) -> list[tuple[str, str]]:
        """The admin calls a cleanup makes: ``--cleanup-url``, else the engine's own (vLLM: ``POST
        /reset_prefix_cache``, served only when vLLM runs with ``VLLM_SERVER_DEV_MODE=1``)."""
        if self.config.cleanup_urls:
            return list(self.config.cleanup_urls)
        return list(ENGINE_CLEANUP.get(self.engine() or "", ()))

    async def _cleanup(self, cid: str) -> None:
        """Run the admin calls, and measure what they changed in the engine's KV-cache usage (a scrape of its
        /metrics right before and right after).  A call answered 404/405 is ``not supported`` (recorded as
        such, and not made again)."""
        c = self.config
        if self.admin is None:
            self.admin = httpx.AsyncClient(timeout=httpx.Timeout(c.timeout, connect=c.connect_timeout),
                                           trust_env=False, follow_redirects=False)
        todo = self.cleanup_calls()
        gone = self.admin_unsupported
        before = await self._kv_now()
        calls, ok = [], True
        for method, target in todo:
            if f"{method} {target}" in gone:
                continue
            url = target if target.startswith(("http://", "https://")) else c.upstream + target
            t = time.monotonic()
            entry: dict[str, Any] = {"method": method, "url": url}
            try:
                r = await self.admin.request(method, url)
                entry["status"] = r.status_code
                entry["ok"] = r.is_success
                if r.is_success:
                    with contextlib.suppress(ValueError):
                        answer = r.json()
                        if isinstance(answer, dict) and answer.get("success") is False:  # vLLM 0.32: blocks held
                            entry["ok"] = False
                            entry["error"] = "answered success: false (blocks still in use; it may be retried)"
                elif r.status_code in (404, 405, 501):
                    why = f"{method} {target} answered {r.status_code}"
                    if target == "/reset_prefix_cache":
                        why += " (vLLM serves it only when started with VLLM_SERVER_DEV_MODE=1)"
                    entry["error"] = "not supported: " + why
                    self.admin_unsupported[f"{method} {target}"] = why
            except httpx.HTTPError as exc:
                entry["status"] = None
                entry["ok"] = False
                entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["seconds"] = time.monotonic() - t
            ok = ok and bool(entry["ok"])
            calls.append(entry)
        result: dict[str, Any] = {"calls": calls}
        if calls and all(str(x.get("error", "")).startswith("not supported") for x in calls):
            result["outcome"] = "not supported"
        if before is not None:
            after = await self._kv_now()
            result["kv_cache_usage_before"] = before
            result["kv_cache_usage_after"] = after
            if after is not None:
                result["kv_cache_freed_ratio"] = before - after
        failed = [f"{x['method']} {x['url']} -> {x.get('error') or x.get('status')}" for x in calls if not x["ok"]]
        self.channel.post_result(cid, "cleanup", ok, result, "; ".join(failed) or None)

    async def _kv_now(self) -> float | None:
        """The engine's KV-cache usage from a fresh scrape of its /metrics (off the loop), or None."""
        probe = self.engine_probe
        if probe is None or getattr(probe, "stopped", None):
            return None
        try:
            good = await asyncio.to_thread(probe.scrape_once)
        except Exception:
            return None
        if not good:
            return None
        v = probe.sample(0.0).values.get("engine_kv_cache_usage_ratio")
        return float(v) if isinstance(v, (int, float)) else None

    # -- request handling ----------------------------------------------------------------------------
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole request body (bounded); ``None`` when the client went away first."""
        limit = self.config.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                raise _BodyTooLarge
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None  # http.disconnect
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, send: Send) -> None:
        await _send_json(send, 413, "request_too_large", f"request body over {self.config.max_body_bytes} bytes")

    @staticmethod
    def _headers(scope: Scope, identity: bool) -> list[tuple[bytes, bytes]]:
        out = [(k, v) for k, v in scope["headers"] if k.decode("latin-1") not in HOP_BY_HOP]
        if identity:  # the proxy reads the stream: ask for it uncompressed
            out = [(k, v) for k, v in out if k != b"accept-encoding"]
            out.append((b"accept-encoding", b"identity"))
        return out

    @staticmethod
    def _target(scope: Scope) -> bytes:
        """Path and query exactly as the client sent them (raw bytes)."""
        path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        q: bytes = scope.get("query_string") or b""
        return path + b"?" + q if q else path

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await self._read_body(scope, receive)
        except _BodyTooLarge:
            return await self._too_large(send)
        if body is None:
            return
        req = _Request(scope["method"], self._target(scope), self._headers(scope, False), body)
        await _Forward(self, req, None).serve(receive, send)

    async def _measured(self, scope: Scope, receive: Receive, send: Send) -> None:
        created = time.monotonic()
        try:
            body = await self._read_body(scope, receive)
        except _BodyTooLarge:
            return await self._too_large(send)
        if body is None:
            return
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return await _send_json(send, 400, "invalid_request_error", f"the request body is not valid JSON: {exc}")
        if not isinstance(obj, dict):
            return await _send_json(send, 400, "invalid_request_error", "the request body must be a JSON object")
        plan = self._plan(obj, scope["path"])
        if plan.changed:
            body = plan.body()
        headers = [(k, v) for k, v in self._headers(scope, True) if k != b"content-type"]
        headers.append((b"content-type", b"application/json"))
        req = _Request("POST", self._target(scope), headers, body, plan)
        if self.shadow is not None:
            req.shadow = self.shadow.maybe_start(obj, scope["path"], self.upstream, "POST", req.target, headers, body)
        m = _Measure(created, strip_final=plan.usage, strip_usage=plan.continuous)
        model = obj.get("model")
        m.model = model[:200] if isinstance(model, str) else None
        m.operation = "text_completion" if scope["path"].rstrip("/").endswith("/v1/completions") else "chat"
        m.stream = obj.get("stream") is True
        await _Forward(self, req, m, temperature=_float_or_none(obj.get("temperature"))).serve(receive, send)

    def _plan(self, obj: dict[str, Any], path: str) -> _Plan:
        """What the proxy adds to a generation request: the knobs' values, and the usage it needs to count
        tokens as the engine does (``stream_options.include_usage``; on vLLM also ``continuous_usage_stats``,
        so a stream cut short still carries its exact count)."""
        plan = _Plan(obj)
        plan.changed = self._apply_temperature(obj) is not None
        engine = self.engine()
        knob = self.channel.knobs.repetition_penalty
        if engine is not None and knob is not None:
            name, routes = PENALTY_FIELDS[engine]
            if path not in routes:
                self.note_once(f"penalty-route-{engine}-{path}",
                               f"repetition_penalty not sent on {path}: {ENGINES_SHOWN[engine]} has no such field "
                               f"there (only on {', '.join(routes)})")
            elif name not in obj:
                usable, plan.penalty_cid = self.channel.penalty_for(engine)
                if usable:
                    obj[name] = float(knob)
                    plan.penalty, plan.engine, plan.changed = name, engine, True
        if obj.get("stream") is True and engine not in self.usage_refused:
            so = obj.get("stream_options")
            mine = dict(so) if isinstance(so, dict) else {}
            plan.client_so = so
            if mine.get("include_usage") is not True:
                mine["include_usage"] = True
                plan.usage = True
            if engine == "vllm" and mine.get("continuous_usage_stats") is not True:
                mine["continuous_usage_stats"] = True
                plan.continuous = True
            if plan.usage or plan.continuous:
                obj["stream_options"] = mine
                plan.engine = engine
                plan.changed = True
        return plan

    def _apply_temperature(self, obj: dict[str, Any]) -> float | None:
        """Rewrite ``obj["temperature"]`` per the mode; returns the new value when the body changed."""
        knob = self.channel.knobs.temperature
        lo, hi = self.config.temperature_bounds
        have = obj.get("temperature")
        if self.config.temperature_mode == "always":
            value = knob if knob is not None else (have if _float_or_none(have) is not None else None)
        else:
            value = knob if knob is not None and have is None else None
        if value is None:
            return None
        value = min(max(float(value), lo), hi)
        if have == value and type(have) is float:
            return None
        obj["temperature"] = value
        return value

    def note_error(self, kind: str, message: str) -> None:
        if kind not in self._errors_logged:  # once per kind: a dead upstream must not flood the terminal
            self._errors_logged.add(kind)
            self.log(f"{message} (further {kind} errors are counted, not printed)")

    def record(self, m: _Measure, end: float, temperature: float | None, batch_size: int,
               capacity: int | None, aborted: str | None = None) -> int:
        tokens = m.completion_tokens if m.completion_tokens is not None else m.n
        if m.n == 0 and m.completion_tokens is None:
            tokens = len(word_ids("".join(m.texts)))
        self._next_id += 1
        row: list[Any] = [None] * len(ROW_FIELDS)
        row[_ROW_INDEX["id"]] = self._next_id
        row[_ROW_INDEX["prompt_tokens"]] = m.prompt_tokens
        row[_ROW_INDEX["tokens"]] = tokens
        row[_ROW_INDEX["created"]] = m.created
        row[_ROW_INDEX["started"]] = m.started
        row[_ROW_INDEX["first"]] = m.first
        row[_ROW_INDEX["last"]] = m.last if m.first is not None else None
        # TPOT counts the tokens after the first chunk; with usage the total is the server's count
        row[_ROW_INDEX["n_first"]] = min(m.n_first, tokens)
        row[_ROW_INDEX["end"]] = end
        row[_ROW_INDEX["ids"]] = m.token_ids or []  # else words, computed off the loop (drain)
        row[_ROW_INDEX["batch_size"]] = batch_size
        row[_ROW_INDEX["batch_capacity"]] = capacity
        row[_ROW_INDEX["temperature"]] = temperature
        row[_ROW_INDEX["text"]] = "".join(m.texts)
        extra: dict[str, Any] = request_labels(m, self.engine())
        if m.gaps is not None and m.stream:
            extra["chunk_gaps"] = {"counts": m.gaps, "sum": m.gaps_sum}
        if aborted:
            extra["aborted"] = aborted
        if m.first_answer is not None:
            extra["answer_ttft_seconds"] = m.first_answer - m.created
        self.channel.post_row(row, extra or None)
        return self._next_id


def request_labels(m: _Measure, engine: str | None) -> dict[str, Any]:
    """What a request event carries for the GenAI metrics' attributes: the operation, the model asked for,
    whether it streamed, the engine behind the proxy (when known)."""
    out: dict[str, Any] = {"operation": m.operation, "stream": m.stream}
    if m.model is not None:
        out["model"] = m.model
    if engine is not None:
        out["engine"] = engine
    return out


def _float_or_none(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


@dataclass
class _Plan:
    """A measured request as the client sent it and what the proxy added to it."""

    obj: dict[str, Any]
    changed: bool = False
    engine: str | None = None
    penalty: str | None = None
    """The penalty field the proxy added (its name for this engine)."""
    penalty_cid: str | None = None
    """The pending penalty change this request is the first to carry."""
    usage: bool = False
    """``stream_options.include_usage`` added (the client did not ask: its usage chunk is not forwarded)."""
    continuous: bool = False
    """``stream_options.continuous_usage_stats`` added (vLLM: ``usage`` is removed from each chunk forwarded)."""
    client_so: Any = None

    def body(self) -> bytes:
        return json.dumps(self.obj, separators=(",", ":"), ensure_ascii=False).encode()

    def named(self, message: str) -> list[str]:
        """The added fields an error message names."""
        out = []
        if self.penalty is not None and self.penalty in message:
            out.append(self.penalty)
        if (self.usage or self.continuous) and any(
                w in message for w in ("stream_options", "include_usage", "continuous_usage_stats")):
            out.append("stream_options")
        return out

    def drop(self, names: list[str]) -> None:
        """Take the named additions out again (the client's own values stay)."""
        if self.penalty is not None and self.penalty in names:
            self.obj.pop(self.penalty, None)
            self.penalty = None
        if "stream_options" in names:
            if self.client_so is None:
                self.obj.pop("stream_options", None)
            else:
                self.obj["stream_options"] = self.client_so
            self.usage = self.continuous = False


@dataclass
class _Request:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    plan: _Plan | None = None
    shadow: Any = None
    """The request's shadow (``tuner.proxy.shadow.Shadow``) when it was sampled for consistency."""


class _Forward:
    """Sends one request upstream and streams the answer back; measures it when ``m`` is given.

    Runs inside the ASGI call with a watcher task on ``receive``: a client that disconnects — while queued
    for a slot or mid-stream — cancels the exchange, which closes the upstream connection.
    """

    __slots__ = ("m", "proxy", "req", "temperature")

    def __init__(self, proxy: Proxy, req: _Request, m: _Measure | None, temperature: float | None = None):
        self.proxy = proxy
        self.req = req
        self.m = m
        self.temperature = temperature

    async def serve(self, receive: Receive, send: Send) -> None:
        me = asyncio.current_task()
        assert me is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            me.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._run(send)
        except asyncio.CancelledError:
            if not gone:
                raise  # cancelled from outside (shutdown): not ours to swallow
            if hasattr(me, "uncancel"):  # Python >= 3.11: this cancellation is handled
                me.uncancel()
        finally:
            watcher.cancel()

    async def _run(self, send: Send) -> None:
        proxy, m = self.proxy, self.m
        limiter = proxy.limiter
        if m is not None:
            await limiter.acquire()
        batch = limiter.active
        try:
            if m is not None:
                m.started = time.monotonic()
                proxy.channel.active += 1
            await self._exchange(send, batch)
        finally:
            if m is not None:
                proxy.channel.active -= 1
                limiter.release()

    async def _send_upstream(self) -> UpstreamResponse:
        """The request, and once more without what the proxy added when the upstream's 4xx names it (a
        field this engine refuses must never cost the client its answer)."""
        proxy, req = self.proxy, self.req
        assert proxy.upstream is not None
        resp = await proxy.upstream.request(req.method, req.target, req.headers, req.body)
        plan = req.plan
        if plan is None or not 400 <= resp.status_code < 500 or not (plan.penalty or plan.usage or plan.continuous):
            return resp
        try:
            body = await _read_capped(resp, ERROR_BODY_KEPT)
        finally:
            resp.close()
        text = body.decode("utf-8", "replace")
        named = plan.named(text)
        if not named:
            return _Replay(resp, body)
        message = _error_message(text)
        engine = plan.engine or "unknown"
        if plan.penalty in named and plan.penalty is not None:
            if plan.penalty_cid is not None:
                proxy.channel.penalty_answer(plan.penalty_cid, engine, plan.penalty,
                                             float(plan.obj.get(plan.penalty) or 0.0), resp.status_code, False,
                                             message)
                plan.penalty_cid = None
            else:
                proxy.channel.penalty_refused(engine, f"rejected by upstream: HTTP {resp.status_code} naming "
                                                      f"{plan.penalty!r}: {message[:200]}")
            proxy.note_once(f"penalty-rejected-{engine}", f"the upstream refused {plan.penalty!r} "
                            f"(HTTP {resp.status_code}: {message[:120]}); it is no longer sent")
        if "stream_options" in named:
            proxy.usage_refused[engine] = f"HTTP {resp.status_code}: {message[:200]}"
            proxy.note_once(f"usage-refused-{engine}", f"the upstream refused stream_options (HTTP "
                            f"{resp.status_code}: {message[:120]}); tokens are counted one per chunk with text")
        plan.drop(named)
        req.body = plan.body()
        return await proxy.upstream.request(req.method, req.target, req.headers, req.body)

    async def _exchange(self, send: Send, batch: int) -> None:
        proxy, m, req = self.proxy, self.m, self.req
        plan = req.plan
        try:
            resp = await self._send_upstream()
        except UpstreamTimeout as exc:
            proxy.channel.failed += m is not None
            self._failed("timeout")
            self._penalty_unsettled(None)
            proxy.note_error("timeout", f"upstream {proxy.config.upstream} timed out: {exc}")
            await _send_json(send, 504, "upstream_timeout", f"the upstream server did not answer in time ({exc})")
            return
        except UpstreamError as exc:
            proxy.channel.failed += m is not None
            self._failed("upstream_unavailable")
            self._penalty_unsettled(None)
            proxy.note_error("unavailable", f"upstream {proxy.config.upstream} unavailable: {exc}")
            await _send_json(send, 502, "upstream_unavailable",
                             f"cannot reach the upstream server {proxy.config.upstream}: {exc}")
            return
        if plan is not None and plan.penalty_cid is not None and plan.penalty is not None:
            if resp.status_code < 400:  # the upstream took a request carrying the field
                proxy.channel.penalty_answer(plan.penalty_cid, plan.engine or "unknown", plan.penalty,
                                             float(plan.obj[plan.penalty]), resp.status_code, True)
                plan.penalty_cid = None
            else:
                self._penalty_unsettled(resp.status_code)
        completed = False
        aborted: str | None = "client"
        rewrite = False
        try:
            headers = [(k, v) for k, v in resp.headers if k.decode("latin-1") not in HOP_BY_HOP
                       or k == b"content-length"]
            measuring = m is not None and resp.status_code < 400
            if measuring and m is not None:
                ctype = resp.header(b"content-type")
                m.is_sse = ctype.startswith("text/event-stream")
                if not m.is_sse:
                    m.nonsse = []
                rewrite = m.is_sse and m.rewrite
                headers = [(k, v) for k, v in headers if k != b"content-length"] if m.is_sse else headers
            await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
            try:
                async for chunk in resp.aiter_raw():
                    now = time.monotonic()
                    if rewrite and m is not None:
                        out = m.feed_sse(chunk, now)
                        if out:
                            await send({"type": "http.response.body", "body": out, "more_body": True})
                        continue
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if measuring and m is not None:
                        if m.is_sse:
                            m.feed_sse(chunk, now)
                        else:
                            m.feed_body(chunk)
                if rewrite and m is not None and m.buf:
                    await send({"type": "http.response.body", "body": m.flush(), "more_body": True})
            except UpstreamError as exc:
                aborted = "upstream"
                kind = "timeout" if isinstance(exc, UpstreamTimeout) else "broken"
                proxy.note_error(kind, f"upstream stream ended early: {type(exc).__name__}: {exc}")
                if m is not None and m.is_sse:
                    err = {"error": {"message": f"upstream stream ended early: {exc}",
                                     "type": "upstream_timeout" if kind == "timeout" else "upstream_unavailable"}}
                    await send({"type": "http.response.body", "body": b"data: " + json.dumps(err).encode() + b"\n\n",
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            completed = True
        finally:
            if m is not None:
                end = time.monotonic()
                if not completed and aborted == "client" and m.is_sse and not m.done and resp.status_code < 400:
                    await _count_the_rest(resp, m)
            resp.close()  # when the body did not end (a disconnect, an error), this closes the upstream connection
            if m is not None:
                # A client may hang up as soon as it has read ``[DONE]`` (the openai client does), before the
                # upstream's end of body reaches us: the answer was complete, so it counts as finished.
                shadow = self.req.shadow
                if (completed or (m.is_sse and m.done)) and resp.status_code < 400:
                    if not m.is_sse:
                        m.finish_body()
                    rid = proxy.record(m, end, self.temperature, batch, proxy.limiter.limit)
                    if shadow is not None:
                        shadow.answered(rid, "".join(m.texts))
                elif m.is_sse and resp.status_code < 400:
                    # a stream cut short (the client left, or the upstream broke it): recorded as aborted, with
                    # the tokens generated so far (exact with vLLM's continuous usage)
                    proxy.record(m, end, self.temperature, batch, proxy.limiter.limit, aborted=aborted)
                else:
                    proxy.channel.failed += 1
                    error = str(resp.status_code) if resp.status_code >= 400 else (
                        "stream_broken" if aborted == "upstream" else "cancelled")
                    self._failed(error, end)
                if shadow is not None and not shadow.original_done:
                    shadow.answered(None, None)  # not finished: its shadow is of no use

    def _failed(self, error: str, end: float | None = None) -> None:
        """A measured request that ended in an error: a ``request_error`` event (``error``: the upstream's
        HTTP status, ``timeout``, ``upstream_unavailable``, ``stream_broken``, ``cancelled``: the client left
        a whole-body answer) for the error-rate metrics."""
        m = self.m
        if m is not None:
            end = time.monotonic() if end is None else end
            labels = request_labels(m, self.proxy.engine())
            self.proxy.channel.post_error({"error": error, "e2e_seconds": end - m.created, **labels})

    def _penalty_unsettled(self, status: int | None) -> None:
        """The request carrying a pending penalty change got no verdict on it: the next one carries it."""
        plan = self.req.plan
        if plan is not None and plan.penalty_cid is not None and plan.penalty is not None:
            self.proxy.channel.penalty_answer(plan.penalty_cid, plan.engine or "unknown", plan.penalty,
                                              float(plan.obj[plan.penalty]), status, None)
            plan.penalty_cid = None


ERROR_BODY_KEPT = 64 << 10
ABORT_DRAIN_S = 2.0


async def _count_the_rest(resp: UpstreamResponse, m: _Measure) -> None:
    """The client left mid-stream: tell the engine at once (half-close: the request is written, nothing more
    comes) and read, for at most ``ABORT_DRAIN_S``, what it generated until it noticed, for its usage count —
    tokens an engine produced after the last chunk the client took are tokens it counted (vLLM's
    ``generation_tokens_total``).  Nothing of it is forwarded; the request's timings stay those the client saw."""
    conn = resp._conn
    transport = conn.transport if conn is not None else None
    if transport is None or transport.is_closing() or not transport.can_write_eof():
        return  # (TLS cannot half-close: the connection is closed, as before)
    first, last, n_first = m.first, m.last, m.n_first
    try:
        transport.write_eof()

        async def rest() -> None:
            async for chunk in resp.aiter_raw():
                m.feed_sse(chunk, 0.0)

        await asyncio.wait_for(rest(), ABORT_DRAIN_S)
    except (UpstreamError, asyncio.TimeoutError, OSError):
        pass
    finally:
        m.first, m.last, m.n_first = first, last, n_first
        m.done = False  # a [DONE] the client never read


async def _read_capped(resp: UpstreamResponse, limit: int) -> bytes:
    parts, size = [], 0
    async for chunk in resp.aiter_raw():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message"}}`` or ``{"message"}``), else the text."""
    try:
        obj = json.loads(text)
    except ValueError:
        return " ".join(text.split())
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if isinstance(obj.get(key), str):
                return str(obj[key])
    return " ".join(text.split())


class _Replay(UpstreamResponse):
    """An error answer already read whole (to look for the fields it names), forwarded as it came."""

    def __init__(self, resp: UpstreamResponse, body: bytes) -> None:
        self.status_code = resp.status_code
        self.headers = [(k, v) for k, v in resp.headers if k != b"content-length"]
        self.headers.append((b"content-length", str(len(body)).encode("ascii")))
        self._pool = resp._pool
        self._conn = None
        self._body = body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._body:
            yield self._body

    def close(self) -> None:
        pass


async def _send_json(send: Send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
