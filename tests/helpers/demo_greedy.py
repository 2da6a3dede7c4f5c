"""The demo model's own greedy continuation (its decoder and sampler, as ``tuner demo`` serves it)."""

from __future__ import annotations

import torch

from tuner.demo.model import BatchDecoder, TinyLlama, load
from tuner.demo.sampling import SamplingParams, SeenTokens, sample
from tuner.demo.tokenizer import EOS

_MODEL: list[TinyLlama] = []


def demo_greedy(prompt_ids: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
    """Up to ``n`` greedy ids after ``prompt_ids`` (BOS included); ends with EOS if the model chose it."""
    if not _MODEL:
        _MODEL.append(load())
    params = SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty)
    out: list[int] = []
    with torch.inference_mode():
        dec = BatchDecoder(_MODEL[0], [prompt_ids], n)
        logits = dec.prefill()
        seen = SeenTokens([prompt_ids], logits.size(-1))
        for i in range(n):
            nxt = sample(logits, params, seen)
            seen.add(nxt)
            out.append(int(nxt[0]))
            if out[-1] == EOS or i == n - 1:
                break
            logits = dec.step(nxt)
    return out
