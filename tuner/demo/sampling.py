"""Next-token sampling for the demo: temperature, top-k / top-p, repetition penalty, and Mirostat v2.

Temperature 0 is greedy.  The repetition penalty is the CTRL / transformers rule (a seen token's positive
logit is divided by the penalty, a negative one multiplied).  Mirostat v2 (Basu et al. 2021, as llama.cpp
implements it: tau=5, eta=0.1, mu starts at 2*tau) keeps each sequence's observed surprise near tau by
truncating tokens whose surprise exceeds mu; it is the baseline the temperature policy is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tuner.demo.tokenizer import EOS


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off


def mask_specials(logits: Tensor) -> Tensor:
    """Only bytes and EOS can be generated (BOS/PAD/unused ids never)."""
    out = logits.clone()
    out[..., 256:] = float("-inf")
    out[..., EOS] = logits[..., EOS]
    return out


class SeenTokens:
    """Each row's tokens so far as a (rows, vocab) mask, for the repetition penalty: set from the prompts once
    a batch, then one indexed store per decoding step.  It replaced a per-row loop (a set, a tensor and an
    indexed read and write per row per step) whose cost grew with the batch and fell on the penalized runs
    only: the tuned arm of every held-out cell."""

    def __init__(self, history: Sequence[Sequence[int]], vocab: int) -> None:
        self.mask = torch.zeros(len(history), vocab, dtype=torch.bool)
        for row, ids in enumerate(history):
            if ids:
                self.mask[row, torch.tensor(ids, dtype=torch.long)] = True
        self._rows = torch.arange(len(history))

    def add(self, ids: Tensor) -> None:
        """The step's picks, one per row (a finished row's pick is stored too: its output is no longer read)."""
        self.mask[self._rows, ids] = True


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """The CTRL / transformers rule on the tokens ``seen`` marks ((rows, vocab) bool)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    out = logits
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        out = torch.full_like(out, float("-inf")).scatter(-1, order, sorted_logits)
    return out


def sample(
    logits: Tensor,
    params: SamplingParams,
    seen: SeenTokens | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (B, V) -> next ids (B,).  ``seen`` = each row's tokens so far (for the penalty)."""
    x = mask_specials(logits.float())
    if seen is not None:
        x = apply_repetition_penalty(x, seen.mask, params.repetition_penalty)
    if params.temperature <= 0.0:
        return x.argmax(-1)
    x = filter_top_k_top_p(x / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(x.softmax(-1), 1, generator=generator).squeeze(-1)


class Mirostat:
    """Mirostat v2, one ``mu`` per sequence in the batch."""

    def __init__(self, batch: int, tau: float = 5.0, eta: float = 0.1, temperature: float = 1.0) -> None:
        self.tau = tau
        self.eta = eta
        self.temperature = temperature
        self.mu = [2.0 * tau] * batch
        self.surprise: list[list[float]] = [[] for _ in range(batch)]

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = mask_specials(logits.float())
        if self.temperature > 0:
            x = x / self.temperature
        probs = x.softmax(-1)
        out = torch.empty(x.size(0), dtype=torch.long)
        for row in range(x.size(0)):
            p, order = torch.sort(probs[row], descending=True)
            surprise = -torch.log2(p.clamp_min(1e-30))
            keep = int((surprise <= self.mu[row]).sum().item())
            keep = max(1, keep)
            kept = p[:keep] / p[:keep].sum()
            choice = int(torch.multinomial(kept, 1, generator=generator).item())
            observed = -math.log2(max(float(kept[choice]), 1e-30))
            self.surprise[row].append(observed)
            self.mu[row] -= self.eta * (observed - self.tau)
            out[row] = order[choice]
        return out


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    mirostat: Mirostat | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """Batched generation; returns each prompt's new tokens (EOS excluded)."""
    from tuner.demo.model import BatchDecoder, TinyLlama

    assert isinstance(model, TinyLlama)
    params = params or SamplingParams()
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.inference_mode():
        dec = BatchDecoder(model, prompts, max_new_tokens)
        logits = dec.prefill()
        seen = SeenTokens(dec.prompts, logits.size(-1)) if params.repetition_penalty != 1.0 else None
        for i in range(dec.max_new_tokens):
            if mirostat is not None:
                nxt = mirostat.sample(logits, generator)
            else:
                nxt = sample(logits, params, seen, generator)
                if seen is not None:
                    seen.add(nxt)
            for row, tok in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if tok == EOS and stop_at_eos:
                    done[row] = True
                else:
                    outs[row].append(tok)
            if all(done) or i == dec.max_new_tokens - 1:
                break
            logits = dec.step(nxt)
    return outs
