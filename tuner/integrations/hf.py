"""``model.generate`` of a transformers causal LM, under the tuner.

```python
from tuner.integrations.hf import TunedGenerator
gen = TunedGenerator(model, pad_token_id=tok.pad_token_id, temperature=0.7, batch_size=8)
h = gen.submit(tok("Hello").input_ids)       # queued; the client's queue time starts now
done = gen.step()                             # one batch of up to the batch-size knob; [(handle, new_ids)]
outs = gen.generate(list_of_id_lists)         # submit all, step until none is left
```

Per batch the knobs are read once: ``temperature`` goes into the generation config (0 = greedy),
``repetition_penalty`` likewise (both over the same keys in ``generate_kwargs``, which sets everything else),
``batch_size`` decides how many queued requests are grouped (left-padded).
Tokens reach the client through a streamer as ``generate`` produces them (TTFT and TPOT are real).
With ``tokenizer=`` consistency can be measured (``--consistency``): a sampled request gets a second answer as a
twin row of the same ``generate`` batch (its tokens are not reported: it is no request), both decoded and passed to
the client with the prompt; a precision change answers the canary prompts (``canary_prompts``, or the sidecar's
``--canary`` set) greedily for reference consistency.
Precision commands go through :class:`~tuner.integrations.precision.PrecisionManager` (int8 on CPU via
dynamic quantization); cleanup commands use the client's default (registered caches, gc, empty_cache,
malloc_trim).  Between batches ``step`` calls ``c.poll()`` and reports allocator figures.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuner.integrations.torch_loop import BatchSettings, TorchLoop, TrackedRequest

try:
    from transformers.generation.streamers import BaseStreamer
except ImportError:  # pragma: no cover - transformers is an optional dependency
    BaseStreamer = object  # type: ignore[assignment,misc]


@dataclass
class Handle:
    id: int
    input_ids: list[int]
    req: TrackedRequest
    output: list[int] = field(default_factory=list)
    done: bool = False
    second: list[int] | None = None
    """The second answer's tokens (a sampled request, ``--consistency``): a twin row of the same batch."""


class ClientStreamer(BaseStreamer):  # type: ignore[misc]
    """Receives each decoding step's tokens (B,) and forwards them to each row's client request.

    The first ``put`` is the prompt (B, P) and is skipped.  A row stops at its EOS (not forwarded) and
    every later token of that row (padding) is ignored.
    """

    def __init__(self, handles: Sequence[Handle], eos_ids: set[int], twins: Sequence[Handle] = ()) -> None:
        self.handles = list(handles)
        self.twins = list(twins)
        """Rows after the handles': the second answers of sampled requests (collected, never reported)."""
        self.twin_done = [False] * len(self.twins)
        self.eos_ids = eos_ids
        self.prompt_seen = False
        self.steps = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(len(self.handles) + len(self.twins), -1)[:, -1].tolist()
        self.steps += 1
        for h, tok in zip(self.handles, ids, strict=False):
            if h.done:
                continue
            if tok in self.eos_ids:
                h.done = True
                continue
            h.output.append(int(tok))
            h.req.token(int(tok))
        for i, (h, tok) in enumerate(zip(self.twins, ids[len(self.handles) :], strict=True)):
            if self.twin_done[i] or h.second is None:
                continue
            if tok in self.eos_ids:
                self.twin_done[i] = True
                continue
            h.second.append(int(tok))

    def end(self) -> None:
        for h in self.handles:
            h.done = True


class TunedGenerator:
    """Queue + batcher around ``model.generate`` with the tuner client's knobs and handlers."""

    def __init__(
        self,
        model: nn.Module,
        *,
        client: Any = None,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        temperature: float = 0.7,
        repetition_penalty: float = 1.0,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        generate_kwargs: dict[str, Any] | None = None,
        canary: Callable[[nn.Module], torch.Tensor] | None = None,
        max_kl: float | None = None,
        min_top1: float | None = None,
        caches: Sequence[object] = (),
        tokenizer: Any = None,
        canary_prompts: Sequence[str] = (),
        canary_tokens: int = 64,
    ) -> None:
        cfg = getattr(model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None)
        self.eos_ids: set[int] = set() if eos is None else ({int(eos)} if isinstance(eos, int) else set(eos))
        pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        self.pad_token_id = int(pad)
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = dict(generate_kwargs or {})
        self.tokenizer = tokenizer
        """With a tokenizer, consistency can be measured (``--consistency``): sampled requests get a second answer
        in the same batch, and a precision change answers the canary prompts (greedy, ``canary_tokens``)."""
        self.canary_tokens = canary_tokens
        self.loop = TorchLoop(
            model,
            client=client,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            batch_size=batch_size,
            canary=canary,
            max_kl=max_kl,
            min_top1=min_top1,
            caches=caches,
            canary_answers=self._canary_answers if tokenizer is not None else None,
            canary_prompts=canary_prompts,
        )
        self.queue: deque[Handle] = deque()
        self._ids = itertools.count(1)
        self.last_settings: BatchSettings | None = None
        self.oom_ceiling: int | None = None
        """After an OOM, batches stay below the size that failed (whatever the knob says)."""

    @property
    def model(self) -> nn.Module:
        return self.loop.model

    @property
    def client(self) -> Any:
        return self.loop.client

    def submit(self, input_ids: Sequence[int]) -> Handle:
        ids = [int(i) for i in input_ids]
        if not ids:
            raise ValueError("empty prompt")
        h = Handle(next(self._ids), ids, self.loop.request(len(ids)))
        self.queue.append(h)
        return h

    def _generation_config(self, s: BatchSettings) -> Any:
        from transformers import GenerationConfig

        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.pad_token_id}
        if self.eos_ids:
            kw["eos_token_id"] = sorted(self.eos_ids)
        kw.update(self.generate_kwargs)
        # the knobs last: a knob the sidecar set (and recorded as applied) is the one generate uses, never
        # silently replaced by the same key in generate_kwargs (each request records these settings)
        kw["repetition_penalty"] = s.repetition_penalty
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature)
            kw.setdefault("top_k", 0)
            kw.setdefault("top_p", 1.0)
        else:
            kw.update(do_sample=False)
            for k in ("temperature", "top_k", "top_p"):  # sampling settings greedy decoding would warn about
                kw.pop(k, None)
        return GenerationConfig(**kw)

    def step(self) -> list[tuple[Handle, list[int]]]:
        """Run one batch (up to the batch-size knob) of queued requests; returns the finished ones."""
        s = self.loop.settings()
        if self.oom_ceiling is not None and s.batch_size > self.oom_ceiling:
            s = BatchSettings(s.temperature, s.repetition_penalty, self.oom_ceiling, s.precision)
        self.last_settings = s
        batch = [self.queue.popleft() for _ in range(min(s.batch_size, len(self.queue)))]
        if not batch:
            self.loop.between_batches()
            return []
        twins = [h for h in batch if self.tokenizer is not None and h.req.sampled]
        for h in twins:
            h.second = []
        rows = batch + twins  # a sampled request's twin: the same prompt, decoded in the same batch, unreported
        width = max(len(h.input_ids) for h in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, h in enumerate(rows):
            ids[i, width - len(h.input_ids) :] = torch.tensor(h.input_ids)
            mask[i, width - len(h.input_ids) :] = 1
        for h in batch:
            h.req.started(s, len(batch))
        model: Any = self.loop.model
        device = next(iter(model.parameters())).device
        streamer = ClientStreamer(batch, self.eos_ids, twins)
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=self._generation_config(s),
                    streamer=streamer,
                )
        except Exception as exc:
            error = exc
            if len(batch) == 1 or not self.loop.handle_oom(exc, len(batch)):
                for h in batch:
                    self.loop.finish(h.req, exc)
                raise
            self.oom_ceiling = len(batch) // 2
            for h in reversed(batch):  # OOM: back to the front of the queue, the sidecar was told
                h.output.clear()
                h.second = None
                self.queue.appendleft(h)
            self.loop.between_batches()
            return []
        finally:
            if error is None:
                for h in batch:
                    h.done = True
                    if h.second is not None:
                        self._consistency(h)
                    self.loop.finish(h.req)
        self.loop.between_batches()
        return [(h, h.output) for h in batch]

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _consistency(self, h: Handle) -> None:
        try:
            h.req.consistency(self._decode(h.output), self._decode(h.second or []), self._decode(h.input_ids))
        except Exception:  # a tokenizer that cannot decode these ids: no measurement, never a failed request
            pass

    def _canary_answers(self, model: nn.Module, prompts: Sequence[str]) -> list[str]:
        """Greedy answers to the canary prompts, one at a time (no padding to get wrong)."""
        out = []
        m: Any = model
        device = next(iter(m.parameters())).device
        for p in prompts:
            ids = self.tokenizer(p, return_tensors="pt").input_ids.to(device)
            gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.canary_tokens,
                             do_sample=False, pad_token_id=self.pad_token_id)
            out.append(self._decode(gen[0, ids.shape[1] :].tolist()))
        return out

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Submit every prompt, serve the queue to the end, return the new tokens in prompt order."""
        handles = [self.submit(p) for p in prompts]
        while self.queue:
            self.step()
        return [h.output for h in handles]

    def close(self) -> None:
        self.loop.close()
