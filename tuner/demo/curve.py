"""Repetition of the demo model against temperature, on held-out prompts.

``python -m tuner.demo.curve [--prompts 32] [--tokens 128] [--seed 0]`` prints a Markdown table of
seq-rep-4 (1 - unique 4-grams / 4-grams of a response; Welleck et al. 2019), rep-32 (share of tokens equal
to one of the previous 32) and the share of responses with a loop (some n-gram, n >= 4, three times in a
row), per temperature, plus the Mirostat v2 baseline.  Tokens are bytes, so rep-32 has a high floor
(letters recur within 32 bytes in any English text); seq-rep-4 is the figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from tuner.demo.corpus import held_out_prompts
from tuner.demo.model import TinyLlama, load
from tuner.demo.sampling import Mirostat, SamplingParams, generate
from tuner.demo.tokenizer import ByteTokenizer
from tuner.probes.repetition import response_repetition

TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4)


LOOP_MIN_N, LOOP_MAX_N = 4, 40
"""Loop n-gram sizes for byte tokens: shorter repeats (``"   "``, ``"---"``, ``"=="``) are ordinary text."""


def seq_rep_n(tokens: Sequence[int], n: int = 4) -> float:
    """seq-rep-n of one response (0.0 when it has no n-gram); n = 4 is the sidecar's own computation."""
    if n == 4:
        v = response_repetition(tokens, loop_min_n=LOOP_MIN_N, loop_max_n=LOOP_MAX_N).seq_rep_4
        return v if v is not None else 0.0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rep_w(tokens: Sequence[int], w: int = 32) -> float:
    """Share of tokens after the first equal to one of the previous ``w`` (denominator n - 1; the sidecar's
    rep-32, which ``measure`` reports, counts the first token in the denominator too)."""
    if len(tokens) < 2:
        return 0.0
    hits = sum(1 for i in range(1, len(tokens)) if tokens[i] in tokens[max(0, i - w) : i])
    return hits / (len(tokens) - 1)


def has_loop(tokens: Sequence[int], min_n: int = LOOP_MIN_N, max_n: int = LOOP_MAX_N) -> bool:
    """Some n-gram (min_n <= n <= max_n) occurs three times back to back."""
    return response_repetition(tokens, loop_min_n=min_n, loop_max_n=max_n).loop


def repetition(tokens: Sequence[int]) -> tuple[float, float, bool]:
    """(seq-rep-4, rep-32, loop) of one response in one pass: the figures the sidecar computes for it."""
    r = response_repetition(tokens, loop_min_n=LOOP_MIN_N, loop_max_n=LOOP_MAX_N)
    return (r.seq_rep_4 or 0.0, r.rep_32 or 0.0, r.loop)


def measure(
    model: TinyLlama,
    prompts: list[list[int]],
    tokens: int,
    temperature: float | None,
    seed: int,
    batch: int = 16,
) -> dict[str, float]:
    """Mean seq-rep-4, rep-32 and loop share over the prompts; ``temperature=None`` = Mirostat v2."""
    gen = torch.Generator().manual_seed(seed)
    outs: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        if temperature is None:
            outs += generate(model, chunk, tokens, mirostat=Mirostat(len(chunk)), generator=gen, stop_at_eos=False)
        else:
            outs += generate(model, chunk, tokens, SamplingParams(temperature=temperature), generator=gen,
                             stop_at_eos=False)
    reps = [repetition(o) for o in outs]
    return {
        "seq_rep_4": statistics.fmean(r[0] for r in reps),
        "rep_32": statistics.fmean(r[1] for r in reps),
        "loop": statistics.fmean(1.0 if r[2] else 0.0 for r in reps),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", action="store_true", help="also print one continuation per temperature")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    tok = ByteTokenizer()
    model = load()
    texts = held_out_prompts(args.prompts, seed=args.seed)
    prompts = [tok.encode(t, bos=True) for t in texts]
    t0 = time.monotonic()
    print(f"{args.prompts} held-out prompts, {args.tokens} new tokens each, seed {args.seed}\n")
    print("| temperature | seq-rep-4 | rep-32 | loops |")
    print("|---|---|---|---|")
    for temp in (*TEMPERATURES, None):
        m = measure(model, prompts, args.tokens, temp, args.seed)
        name = "Mirostat v2 (tau 5, eta 0.1)" if temp is None else f"{temp:.1f}"
        print(f"| {name} | {m['seq_rep_4']:.3f} | {m['rep_32']:.3f} | {m['loop']:.2f} |", flush=True)
    print(f"\n({time.monotonic() - t0:.0f} s)")
    if args.samples:
        gen = torch.Generator().manual_seed(args.seed)
        for temp in (0.0, 0.8, 1.4):
            out = generate(model, prompts[:1], args.tokens, SamplingParams(temperature=temp), generator=gen)[0]
            print(f"\n--- T={temp}: {texts[0]!r} ->\n{tok.decode(out)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
