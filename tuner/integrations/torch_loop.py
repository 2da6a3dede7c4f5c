"""Glue for a hand-written torch decode loop: the tuner client calls in the places they belong.

```python
loop = TorchLoop(model, temperature=0.8, batch_size=8)      # connects; registers precision handling
while serving:
    s = loop.settings()                  # knobs read once per batch (temperature, penalty, batch size)
    batch = queue.take(s.batch_size)
    reqs = [loop.request(len(p), batch_size=len(batch), settings=s) for p in batch]   # already entered
    ... decode with loop.model ...; reqs[i].token(tok)
    for r in reqs: loop.finish(r)
    loop.between_batches()               # runs pending precision/cleanup commands, reports memory
```

``loop.model`` is the model to use: a precision change may replace the module (int8 builds a new one).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuner.integrations.cleanup import malloc_stats
from tuner.integrations.precision import PrecisionManager


@dataclass(frozen=True)
class BatchSettings:
    temperature: float
    repetition_penalty: float
    batch_size: int
    precision: str


class TrackedRequest:
    """A client request opened at submit time (so queue time counts) and closed by :meth:`TorchLoop.finish`."""

    __slots__ = ("_cm", "prompt_tokens", "r", "tokens")

    def __init__(self, cm: Any, prompt_tokens: int) -> None:
        self._cm = cm
        self.r = cm.__enter__()
        self.prompt_tokens = prompt_tokens
        self.tokens = 0

    def started(self, settings: BatchSettings | None = None, batch_size: int | None = None) -> None:
        """Decoding began (ends queue time); records the batch it runs in (size, capacity, temperature,
        precision) when the request was opened before its batch was known."""
        self.r.started()
        if settings is not None:
            for name, value in (("batch_size", batch_size), ("batch_capacity", settings.batch_size),
                                ("temperature", settings.temperature), ("precision", settings.precision)):
                if value is not None and hasattr(self.r, name):
                    setattr(self.r, name, value)

    def token(self, ids: int | list[int]) -> None:
        self.r.token(ids)
        self.tokens += 1 if isinstance(ids, int) else len(ids)

    def response_text(self, text: str) -> None:
        """The decoded response, recorded only when the sidecar runs with ``--record-text``."""
        self.r.response_text(text)

    @property
    def sampled(self) -> bool:
        """The sidecar measures this request's consistency: decode a second answer to its prompt in the same
        batch (not reported as tokens) and pass both to :meth:`consistency`."""
        return bool(getattr(self.r, "sampled", False))

    def consistency(self, answer: str, second: str | None = None, prompt: str | None = None) -> None:
        fn = getattr(self.r, "consistency", None)
        if fn is not None:
            fn(answer, second, prompt)

    def close(self, exc: BaseException | None = None) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(type(exc) if exc else None, exc, None)


class TorchLoop:
    """Owns the client side of a decode loop: knobs, request timing, precision and cleanup handlers.

    ``temperature`` / ``repetition_penalty`` / ``batch_size`` are what the user asked for; the sidecar's knobs
    override them while set.  ``canary`` (``fn(model) -> next-token logits``) turns on the precision quality
    guard (``max_kl`` / ``min_top1``).  ``caches`` are registered for the cleanup policy.  ``extra_allocated``
    is called for bytes the loop holds outside the C heap's view (none on CPU; e.g. pinned buffers).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        client: Any = None,
        temperature: float = 0.8,
        repetition_penalty: float = 1.0,
        batch_size: int = 8,
        max_batch_size: int = 1024,
        canary: Callable[[nn.Module], torch.Tensor] | None = None,
        max_kl: float | None = None,
        min_top1: float | None = None,
        caches: Sequence[object] = (),
        reference: str = "disk",
        canary_answers: Callable[[nn.Module, Sequence[str]], list[str]] | None = None,
        canary_prompts: Sequence[str] = (),
    ) -> None:
        if client is None:
            from tuner import client as tuner_client

            client = tuner_client.connect()
        self.client = client
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.precision = PrecisionManager(model, reference=reference, canary=canary, max_kl=max_kl, min_top1=min_top1)
        self.precision_changes: list[dict[str, Any]] = []
        self.canary_answers = canary_answers
        self.canary_prompts = tuple(canary_prompts)
        self.canary_reference: list[str] | None = None
        """The canary prompts' answers at full precision (made once, at the first precision change)."""
        self.canary_seconds: list[float] = []
        self.memory_interval = 1.0
        self.memory_read_seconds: float | None = None
        self._next_memory = 0.0
        client.on_precision(self._on_precision)
        for cache in caches:
            client.register_cache(cache)

    @property
    def model(self) -> nn.Module:
        return self.precision.model

    def _on_precision(self, precision: str) -> dict[str, Any]:
        previous = self.precision.precision
        prompts = self._canary_set()
        if prompts and self.canary_reference is None:
            self.canary_reference = self._answer_canary(self._full_model(), prompts)
        result = self.precision.set(precision)  # raises PrecisionError with the reason to refuse
        if prompts and self.canary_reference is not None and result.get("changed") and precision != "fp32":
            answers = self._answer_canary(self.model, prompts)
            sent = self.client.report_canary(self.canary_reference, answers, precision=precision, previous=previous,
                                             tag=f"precision:{precision}")
            if sent:  # the sidecar scores them (reference consistency); the policy waits for that figure
                result["canary_answers"] = len(answers)
                result["canary_identical"] = sum(1 for a, b in zip(self.canary_reference, answers, strict=True)
                                                 if a == b)
                result["canary_seconds"] = round(self.canary_seconds[-1], 3)
        self.precision_changes.append(result)
        return result

    def _canary_set(self) -> tuple[str, ...]:
        """The canary prompts to answer, or () when there is nobody to score them: the sidecar's set (``--canary
        FILE``), else the loop's own; only for a sidecar that measures consistency and a loop that can answer."""
        if self.canary_answers is None or not getattr(self.client, "consistency", False):
            return ()
        return tuple(getattr(self.client, "canary_prompts", ()) or self.canary_prompts)

    def _full_model(self) -> nn.Module:
        """The model at full precision: itself when it is fp32, else a fresh fp32 copy of the reference."""
        if self.precision.precision == "fp32":
            return self.model
        return self.precision._full_precision()

    def _answer_canary(self, model: nn.Module, prompts: Sequence[str]) -> list[str]:
        assert self.canary_answers is not None
        t = time.monotonic()
        model.eval()
        with torch.inference_mode():
            answers = [str(a) for a in self.canary_answers(model, prompts)]
        self.canary_seconds.append(time.monotonic() - t)
        return answers

    def settings(self) -> BatchSettings:
        """The knobs for the next batch (read once per batch, never mid-batch)."""
        k = self.client.knobs
        t = k.temperature if k.temperature is not None else self.temperature
        rp = k.repetition_penalty if k.repetition_penalty is not None else self.repetition_penalty
        bs = k.batch_size if k.batch_size is not None else self.batch_size
        return BatchSettings(
            temperature=max(0.0, float(t)),
            repetition_penalty=max(1e-3, float(rp)),
            batch_size=max(1, min(int(bs), self.max_batch_size)),
            precision=self.precision.precision,
        )

    def request(self, prompt_tokens: int, *, batch_size: int | None = None,
                settings: BatchSettings | None = None) -> TrackedRequest:
        s = settings
        cm = self.client.request(
            prompt_tokens=prompt_tokens,
            batch_size=batch_size,
            batch_capacity=s.batch_size if s else None,
            temperature=s.temperature if s else None,
            precision=s.precision if s else self.precision.precision,
        )
        return TrackedRequest(cm, prompt_tokens)

    def finish(self, req: TrackedRequest, exc: BaseException | None = None) -> None:
        req.close(exc)

    def memory(self) -> tuple[int | None, int | None, str | None]:
        """(allocated, reserved) bytes of the framework's allocator and whose they are: CUDA's caching allocator
        (``"cuda"``) when the model is on CUDA, else the C heap (``"host"``, glibc ``mallinfo2``), where torch's
        CPU tensors live."""
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        if dev.type == "cuda":
            return int(torch.cuda.memory_allocated(dev)), int(torch.cuda.memory_reserved(dev)), "cuda"
        stats = malloc_stats()
        if stats is None:
            return None, None, None
        return stats["allocated_bytes"], stats["reserved_bytes"], "host"

    def between_batches(self) -> None:
        """Run the sidecar's pending commands here (never mid-batch) and report allocator figures.

        The figures go at most every ``memory_interval`` seconds, and only to a connected sidecar; reading
        them is paced by its own cost (glibc's ``mallinfo2`` walks every free chunk: ~2 us on a tidy heap,
        ~100 ms on one with 100k free chunks) so it never takes more than 0.1% of the loop's time.
        """
        self.client.poll()
        now = time.monotonic()
        if now < self._next_memory or not getattr(self.client, "connected", False):
            return
        allocated, reserved, heap = self.memory()
        cost = time.monotonic() - now
        self.memory_read_seconds = cost
        self._next_memory = now + max(self.memory_interval, 1000.0 * cost)
        if allocated is not None:
            self.client.report_memory(allocated, reserved, heap)

    def handle_oom(self, exc: BaseException, batch_size: int) -> bool:
        """Call from ``except``: True when ``exc`` is an out-of-memory error (reported, memory freed) and the
        batch may be retried smaller; False when it is something else (re-raise it)."""
        oom = isinstance(exc, torch.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
        )
        if not oom:
            return False
        self.client.report_oom(batch_size)
        gc.collect()
        if "torch" in sys.modules and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def close(self) -> None:
        self.precision.close()
