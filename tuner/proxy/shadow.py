"""Shadow requests: where ``tuner proxy --consistency`` gets the second answer for self-consistency.

For a sampled share of measured requests the proxy sends the *same body* upstream once more, at the same time,
reads the answer and never returns it; when both answers are complete the pair (and the prompt, for relevance)
goes to the quality probe as a ``quality`` message with ``source = "shadow"``.  Only what can be repeated
without side effects is sampled:

- ``/v1/completions`` and ``/v1/chat/completions`` with ``"stream": true`` and ``n`` (and ``best_of``) absent or 1;
- nothing that asks the server to keep state (``"store": true``, ``previous_response_id``, ``conversation``).

The extra load has a budget: a credit of ``rate`` per eligible request, one shadow per whole credit (so shadows
never exceed ``rate`` of the eligible requests, plus one), and at most ``concurrency`` shadows in flight (a
sampled request finding them all busy is not shadowed; its credit is kept).  Shadows take no concurrency slot
and are no requests: no row, so no TTFT, throughput, SLO or batch-policy statistic counts them.  A shadow whose
answer fails is reported without the second answer (relevance only); its original being cut short cancels it.

Off unless the session measures consistency (``--consistency``; the rate is ``--consistency-rate``, default 2%).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Protocol

MAX_TEXT = 200_000
"""Characters of a shadow answer kept (the scorer reads 20,000 at most; the length is reported)."""


class _Upstream(Protocol):
    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Any: ...


def eligible(obj: dict[str, Any], path: str) -> str | None:
    """Why a measured request may not be shadowed (None: it may)."""
    if path not in ("/v1/completions", "/v1/chat/completions"):
        return "not a completion"
    if obj.get("stream") is not True:
        return "not streamed"
    for key in ("n", "best_of"):
        if key in obj and obj[key] not in (None, 1):
            return f"{key} = {obj[key]!r}"
    if obj.get("store") is True or obj.get("previous_response_id") is not None or obj.get("conversation") is not None:
        return "stateful"
    return None


def prompt_text(obj: dict[str, Any]) -> str | None:
    """The prompt relevance is measured against: a completion's prompt (the first, if a list), a chat's last user
    message (its text parts joined)."""
    if "messages" in obj:
        for msg in reversed(obj.get("messages") or []):
            if isinstance(msg, dict) and msg.get("role") == "user":
                content = msg.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
                    return "\n".join(parts) if parts else None
        return None
    p = obj.get("prompt")
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and isinstance(p[0], str):
        return p[0]
    return None


def sse_text(data: bytes) -> tuple[str, bytes]:
    """The generated text in complete SSE lines of ``data`` (choice 0: ``text`` or ``delta.content``) and the
    incomplete rest."""
    lines = data.split(b"\n")
    rest = lines.pop()
    out: list[str] = []
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            ev = json.loads(payload)
        except ValueError:
            continue
        for c in ev.get("choices") or () if isinstance(ev, dict) else ():
            if not isinstance(c, dict) or c.get("index", 0) != 0:
                continue
            text = c.get("text")
            if text is None and isinstance(c.get("delta"), dict):
                text = c["delta"].get("content")
            if isinstance(text, str):
                out.append(text)
    return "".join(out), rest


class Shadow:
    """One sampled request: its shadow's task, and the two answers as they complete."""

    def __init__(self, sampler: ShadowSampler, prompt: str | None, temperature: float | None) -> None:
        self.sampler = sampler
        self.prompt = prompt
        self.temperature = temperature
        self.second: str | None = None
        self.second_chars = 0
        self.error: str | None = None
        self.shadow_done = False
        self.answer: str | None = None
        self.rid: int | None = None
        self.original_done = False
        self.task: asyncio.Task[None] | None = None

    async def run(self, upstream: _Upstream, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> None:
        parts: list[str] = []
        kept = 0
        try:
            resp = await upstream.request(method, target, headers, body)
            try:
                if resp.status_code >= 400:
                    self.error = f"the shadow request got HTTP {resp.status_code}"
                    return
                buf = b""
                async for chunk in resp.aiter_raw():
                    text, buf = sse_text(buf + chunk)
                    if text:
                        self.second_chars += len(text)
                        if kept < MAX_TEXT:
                            parts.append(text)
                            kept += len(text)
                self.second = "".join(parts)
            finally:
                resp.close()
        except asyncio.CancelledError:
            self.error = "cancelled"
            raise
        except Exception as exc:  # the shadow is ours: its failure is a missing second answer, never the client's
            self.error = f"the shadow request failed: {type(exc).__name__}: {exc}"[:300]
        finally:
            self.shadow_done = True
            self.sampler.in_flight -= 1
            self._maybe_post()

    def answered(self, rid: int | None, text: str | None) -> None:
        """The original request ended: recorded as ``rid`` with ``text``, or (None, None) when it did not finish."""
        self.original_done = True
        if rid is None or text is None:
            if self.task is not None and not self.task.done():
                self.task.cancel()
            return
        self.rid, self.answer = rid, text
        self._maybe_post()

    def _maybe_post(self) -> None:
        if not (self.original_done and self.shadow_done) or self.answer is None or self.rid is None:
            return
        if self.error == "cancelled":
            return
        msg: dict[str, Any] = {"type": "quality", "kind": "self", "id": self.rid, "source": "shadow",
                               "answer": self.answer[:20_001], "answer_chars": len(self.answer),
                               "temperature": self.temperature}
        if self.prompt is not None:
            msg.update(prompt=self.prompt[:20_001], prompt_chars=len(self.prompt))
        if self.second is not None:
            msg.update(second=self.second[:20_001], second_chars=self.second_chars)
            self.sampler.completed += 1
        else:
            self.sampler.failed += 1
            msg["shadow_error"] = self.error
        self.sampler.post(msg)


class ShadowSampler:
    """Decides which measured requests get a shadow (the budget and the cap) and starts them (loop thread)."""

    def __init__(self, rate: float, concurrency: int, post: Any) -> None:
        self.rate = rate
        self.concurrency = max(1, concurrency)
        self.post = post
        """Where a finished pair goes (``ProxyChannel.post_quality``)."""
        self.credit = 0.0
        self.eligible = 0
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.skipped_busy = 0
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def maybe_start(self, obj: dict[str, Any], path: str, upstream: _Upstream | None, method: str, target: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes) -> Shadow | None:
        if upstream is None or eligible(obj, path) is not None:
            return None
        self.eligible += 1
        self.credit = min(self.credit + self.rate, 1.0 + self.rate)
        if self.credit < 1.0:
            return None
        if self.in_flight >= self.concurrency:
            self.skipped_busy += 1
            return None
        self.credit -= 1.0
        temp = obj.get("temperature")
        shadow = Shadow(self, prompt_text(obj), float(temp) if isinstance(temp, (int, float))
                        and not isinstance(temp, bool) else None)
        self.in_flight += 1
        self.started += 1
        task = asyncio.get_running_loop().create_task(shadow.run(upstream, method, target, headers, body))
        shadow.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return shadow

    def stats(self) -> dict[str, Any]:
        return {"rate": self.rate, "concurrency": self.concurrency, "eligible": self.eligible, "started":
                self.started, "completed": self.completed, "failed": self.failed, "skipped_busy": self.skipped_busy}

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(BaseException):
                await t
