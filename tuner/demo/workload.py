"""The demo's inference process: the built-in model serving a Poisson stream of prompts.

``python -m tuner.demo.workload --duration S | --requests N | --serve [--leak] [--seed N] [--rate R]``

- Requests arrive as a Poisson process (``--rate`` per second) with prompts cut from the held-out part of
  the corpus and a response length drawn per request; an arrival thread opens each request with the
  tuner client at its arrival, so queue time is real.  A full queue (``--max-queue``) rejects arrivals.
- ``--workload`` shapes the stream (``steady`` is the plain ``--rate``); the others are set against the
  rate this machine serves *now*: before the first arrival the workload times ``CAPACITY_BATCHES`` batches of
  ``--batch-size`` (after one warm-up batch) and takes their requests per second as the capacity C (or
  ``--capacity C`` pins it, e.g. to give paired runs the same stream: the measured figure is rounded to three
  significant digits, as printed, so passing it back gives the very same arrivals).  With the run's arrival time T:

  * ``step``:  0.5 C, then 1.3 C over the middle third of T, then 0.5 C again (a rate step up and down);
  * ``burst``: 0.5 C with bursts of 2.6 C (twice the over-capacity rate) for 5 s in every 20 s;
  * ``ramp``:  a diurnal cycle over T: 0.5 C at the start and the end, 1.3 C at the middle (raised cosine);
  * ``mix``:   0.8 C throughout; prompts of 16-48 bytes in the first half, 120-160 bytes in the second (a
    shift in the prompt-length mix: the same rate costs more prefill);

  over capacity is 1.3 C, under capacity 0.5 C.  Arrivals are drawn by thinning a Poisson stream at the
  shape's peak rate (the seed fixes the stream for one C).  ``--requests N`` with a shape: T is N / mean rate.
- The serving loop forms static batches of up to ``c.knobs.batch_size`` (default ``--batch-size``),
  samples at ``c.knobs.temperature`` (default ``--temperature``, the user's request) and
  ``c.knobs.repetition_penalty``, streams every token to the client, and between batches calls
  ``c.poll()`` (precision / cleanup commands run there) and reports the C heap's allocator figures.
- ``--leak`` injects a realistic bug: a per-conversation prefix cache (conversation id -> copies of the KV
  tensors of prompt and response, for a follow-up turn; ~1-1.5 MB a request) that is looked up but never
  evicted; it is registered with
  ``c.register_cache`` so the cleanup policy can clear it.  ``--leak unreclaimable``: the same cache, not
  registered (as a leak held where no cleanup step reaches): cleanup gives nothing back, only a smaller batch
  or a lower precision buys time.
- ``--mirostat`` samples with Mirostat v2 (tau 5, eta 0.1) instead of temperature (a policy baseline).
- With ``--duration``, after the last arrival the queue is served for at most ``--drain-seconds``; what is
  left is closed as failed (an overloaded machine must not turn a 20 s demo into minutes).  ``--requests N``
  serves all N.
- Ends with one JSON line on stdout: its own measurements (requests, tokens/s, latencies, repetition,
  RSS, leak size); ``--report PATH`` also writes one JSON line per finished request.

Without ``TUNER_SOCKET`` the client is a no-op and the workload runs the same (the overhead baseline).

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): with the default spinning wait, two
torch threads on two cores shared with other jobs decoded at 36 tok/s instead of 650 (measured here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from types import FrameType
from typing import Any, TextIO

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (libgomp) is loaded: see the docstring
import torch

from tuner.demo.corpus import held_out_prompts
from tuner.demo.curve import LOOP_MAX_N, LOOP_MIN_N, repetition
from tuner.demo.model import BatchDecoder, TinyLlama, load
from tuner.demo.sampling import Mirostat, SamplingParams, SeenTokens, generate, sample
from tuner.demo.tokenizer import EOS, ByteTokenizer
from tuner.integrations.cleanup import rss_bytes
from tuner.integrations.torch_loop import BatchSettings, TorchLoop, TrackedRequest
from tuner.quality.canary import demo_canary


class PrefixCache:
    """The injected leak: conversation id -> copies of its per-layer KV tensors (prompt + response), kept
    so a follow-up turn could skip prefill, and never evicted when the conversation ends.

    It looks like a sensible optimization, but every request is a new conversation and nothing bounds it:
    it grows by ~1-1.5 MB a request until something calls ``clear()``.
    """

    def __init__(self) -> None:
        self._entries: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._bytes = 0
        self.hits = 0
        self.lookups = 0

    def lookup(self, conversation: str) -> bool:
        self.lookups += 1
        hit = conversation in self._entries
        self.hits += hit
        return hit

    def put(self, conversation: str, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if conversation in self._entries:
            return
        self._entries[conversation] = kv
        self._bytes += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


@dataclass
class Job:
    conversation: str
    prompt: str
    ids: list[int]
    max_new_tokens: int
    arrived: float
    req: TrackedRequest
    out: list[int] = field(default_factory=list)
    first_token: float | None = None
    last_token: float | None = None
    started: float | None = None
    done: bool = False
    twin: list[int] | None = None
    """The second answer's tokens (a sampled request: ``--consistency``), decoded in the same batch, unreported."""
    twin_done: bool = False
    answer: str | None = None


@dataclass
class Stats:
    done: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    decode_seconds: float = 0.0
    client_call_seconds: float = 0.0  # main-thread time inside the client's per-token calls
    twins: int = 0  # second answers decoded for consistency (sampled requests)


WORKLOADS: tuple[str, ...] = ("steady", "step", "burst", "ramp", "mix")
OVER, UNDER = 1.3, 0.5
"""Over- and under-capacity, as multiples of the rate the demo measured it serves at the start."""
CAPACITY_BATCHES = 4
MIX_SHORT, MIX_LONG = (16, 48), (120, 160)
"""Prompt lengths (bytes) of the ``mix`` workload's first and second half."""


def shape_rate(shape: str, t: float, period: float, capacity: float) -> float:
    """Arrivals per second of ``shape`` at ``t`` seconds into a stream of ``period`` seconds."""
    x = t / period if period > 0 else 0.0
    if shape == "step":
        return capacity * (OVER if 1 / 3 <= x < 2 / 3 else UNDER)
    if shape == "burst":
        return capacity * (2 * OVER if (t % 20.0) < 5.0 else UNDER)
    if shape == "ramp":
        return capacity * (UNDER + (OVER - UNDER) * 0.5 * (1.0 - math.cos(2.0 * math.pi * x)))
    if shape == "mix":
        return capacity * 0.8
    raise ValueError(f"unknown workload {shape!r}")


def shape_peak(shape: str, capacity: float) -> float:
    return capacity * {"step": OVER, "burst": 2 * OVER, "ramp": OVER, "mix": 0.8}[shape]


def shape_mean(shape: str, capacity: float) -> float:
    """The mean rate over one period (what ``--requests N`` divides by)."""
    return capacity * {"step": (2 * UNDER + OVER) / 3, "burst": 0.25 * 2 * OVER + 0.75 * UNDER,
                       "ramp": (UNDER + OVER) / 2, "mix": 0.8}[shape]


def client_thread_cpu_seconds() -> float | None:
    """CPU time of the tuner client's sender thread (Linux /proc), to separate the client's cost."""
    import threading as th

    total = None
    for t in th.enumerate():
        if t.name == "tuner-client" and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                return None
    return total


class Arrivals(threading.Thread):
    """Poisson arrivals: opens each request with the client as it arrives and queues it."""

    def __init__(self, loop: TorchLoop, prompts: list[str], args: argparse.Namespace, q: queue.Queue[Job],
                 stats: Stats, stop: threading.Event) -> None:
        super().__init__(name="arrivals", daemon=True)
        self.loop = loop
        self.prompts = prompts
        self.args = args
        self.q = q
        self.stats = stats
        self.stop = stop
        self.tok = ByteTokenizer()
        self.rng = random.Random(args.seed)
        self.count = 0
        self.finished = threading.Event()
        self.period = 0.0
        """The shape's period: the arrival time (``--duration``, or ``--requests`` / the mean rate)."""
        if args.workload != "steady":
            self.period = args.duration or (args.requests or 0) / shape_mean(args.workload, args.capacity)
        self.short: list[str] = []
        self.long: list[str] = []
        if args.workload == "mix":
            self.short = held_out_prompts(args.prompts, seed=args.seed, min_bytes=MIX_SHORT[0], max_bytes=MIX_SHORT[1])
            self.long = held_out_prompts(args.prompts, seed=args.seed + 1, min_bytes=MIX_LONG[0],
                                         max_bytes=MIX_LONG[1])

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.finished.set()

    def _next_gap(self, t: float) -> float:
        """Seconds from ``t`` (since the first arrival) to the next arrival: exponential at ``--rate``, or
        at the shape's peak rate thinned down to the shape's rate at that moment."""
        a = self.args
        if a.workload == "steady":
            return self.rng.expovariate(a.rate) if a.rate > 0 else 0.0
        peak = shape_peak(a.workload, a.capacity)
        gap = 0.0
        while True:
            gap += self.rng.expovariate(peak)
            if self.rng.random() * peak <= shape_rate(a.workload, t + gap, self.period, a.capacity):
                return gap

    def _prompt(self, t: float) -> str:
        if self.args.workload == "mix":
            pool = self.short if t < self.period / 2 else self.long
            return pool[self.rng.randrange(len(pool))]
        return self.prompts[self.rng.randrange(len(self.prompts))]

    def _run(self) -> None:
        a = self.args
        t0 = time.monotonic()
        deadline = t0 + a.duration if a.duration else None
        next_at = t0
        while not self.stop.is_set():
            if a.requests is not None and self.count >= a.requests:
                return
            if deadline is not None and next_at >= deadline:
                return
            wait = next_at - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                return
            prompt = self._prompt(next_at - t0)
            ids = self.tok.encode(prompt, bos=True)
            max_new = self.rng.randint(a.min_new_tokens, a.max_new_tokens)
            self.count += 1
            if self.q.qsize() >= a.max_queue:
                self.stats.rejected += 1
            else:
                req = self.loop.request(len(ids))
                self.q.put(Job(f"conv-{self.args.seed}-{self.count}", prompt, ids, max_new, time.monotonic(), req))
            next_at += self._next_gap(next_at - t0)


def measure_capacity(model: TinyLlama, prompts: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """Requests per second this machine serves now at ``--batch-size``: one warm-up batch, then
    ``CAPACITY_BATCHES`` timed ones drawn like the stream's (prompts, response lengths, temperature), decoded
    as the serving loop decodes them (a row ends at its length or at EOS, a batch when its rows have).  Not
    seen by the tuner (no client requests).  Returns (requests/s, seconds timed)."""
    tok = ByteTokenizer()
    rng = random.Random(args.seed + 7919)
    gen = torch.Generator().manual_seed(args.seed + 7919)  # the serving loop's own stream stays as it was
    params = SamplingParams(temperature=args.temperature, repetition_penalty=1.0)

    def one(size: int) -> None:
        ids = [tok.encode(prompts[rng.randrange(len(prompts))], bos=True) for _ in range(size)]
        lens = [rng.randint(args.min_new_tokens, args.max_new_tokens) for _ in ids]
        with torch.inference_mode():
            dec = BatchDecoder(model, ids, max(lens))
            logits = dec.prefill()
            made = [0] * size
            done = [False] * size
            for step in range(dec.max_new_tokens):
                nxt = sample(logits, params, None, gen)
                for row, t in enumerate(nxt.tolist()):
                    if not done[row]:
                        made[row] += 1
                        done[row] = t == EOS or made[row] >= lens[row]
                if all(done) or step == dec.max_new_tokens - 1:
                    break
                logits = dec.step(nxt)

    one(2)  # warm-up: the first calls pay for allocations and kernel choices
    t0 = time.monotonic()
    for _ in range(CAPACITY_BATCHES):
        one(args.batch_size)
    seconds = time.monotonic() - t0
    return CAPACITY_BATCHES * args.batch_size / seconds, seconds


CANARY_TOKENS = 64


def canary_answers(model: torch.nn.Module, prompts: Sequence[str]) -> list[str]:
    """The model's greedy answers (``CANARY_TOKENS`` bytes at most) to the canary prompts: what reference
    consistency compares before and after a precision change (``--consistency``)."""
    tok = ByteTokenizer()
    outs = generate(model, [tok.encode(p, bos=True) for p in prompts], CANARY_TOKENS, SamplingParams(temperature=0.0))
    return [tok.decode(o) for o in outs]


def take_batch(q: queue.Queue[Job], size: int, wait: float) -> list[Job]:
    try:
        jobs = [q.get(timeout=wait)]
    except queue.Empty:
        return []
    while len(jobs) < size:
        try:
            jobs.append(q.get_nowait())
        except queue.Empty:
            break
    return jobs


def run_batch(loop: TorchLoop, jobs: list[Job], s: BatchSettings, args: argparse.Namespace,
              gen: torch.Generator, cache: PrefixCache | None, stats: Stats,
              stop: threading.Event | None = None) -> None:
    """Decode one static batch.  ``stop`` (Ctrl-C / SIGTERM) ends it at the next token: its unfinished
    requests are closed as failed (a batch of 64 can take longer than the supervisor's grace period).

    A sampled request (``--consistency``) gets a twin row: the same prompt at the same settings, decoded in the
    same batch; its tokens are not reported (it is no request: no latency, throughput or batch statistic counts
    it) and its text goes with the answer's to ``consistency()`` once both are done."""
    model = loop.model
    assert isinstance(model, TinyLlama)  # int8 keeps the class; only its Linear layers are swapped
    now = time.monotonic()
    for j in jobs:
        j.started = now
        j.req.started(s, len(jobs))
        if cache is not None:
            cache.lookup(j.conversation)
        if j.req.sampled:
            j.twin = []
    twins = [j for j in jobs if j.twin is not None]
    rows = len(jobs) + len(twins)
    max_new = max(j.max_new_tokens for j in jobs)
    params = SamplingParams(temperature=s.temperature, repetition_penalty=s.repetition_penalty)
    mirostat = Mirostat(rows, tau=args.mirostat_tau, eta=args.mirostat_eta) if args.mirostat else None
    t_batch = time.monotonic()
    with torch.inference_mode():
        dec = BatchDecoder(model, [j.ids for j in jobs] + [j.ids for j in twins], max_new)
        logits = dec.prefill()
        seen = None
        if s.repetition_penalty != 1.0 and mirostat is None:
            seen = SeenTokens([j.ids for j in jobs] + [j.ids for j in twins], logits.size(-1))
        aborted = False
        for step in range(dec.max_new_tokens):
            if stop is not None and stop.is_set():
                aborted = True
                break
            if mirostat is not None:
                nxt = mirostat.sample(logits, gen)
            else:
                nxt = sample(logits, params, seen, gen)
                if seen is not None:
                    seen.add(nxt)
            t = time.monotonic()
            picked = nxt.tolist()
            for row, tok in enumerate(picked[: len(jobs)]):
                j = jobs[row]
                if j.done:
                    continue
                if tok == EOS:
                    finish(loop, j, stats, s, len(jobs))
                    continue
                j.out.append(tok)
                c0 = perf_counter()
                j.req.token(tok)
                stats.client_call_seconds += perf_counter() - c0
                if j.first_token is None:
                    j.first_token = t
                j.last_token = t
                if len(j.out) >= j.max_new_tokens:
                    finish(loop, j, stats, s, len(jobs))
            for j, tok in zip(twins, picked[len(jobs) :], strict=True):
                if j.twin_done:
                    continue
                if tok == EOS or len(j.twin or ()) >= j.max_new_tokens:
                    twin_finished(j)
                    continue
                assert j.twin is not None
                j.twin.append(tok)
                if len(j.twin) >= j.max_new_tokens:
                    twin_finished(j)
            if (all(j.done for j in jobs) and all(j.twin_done for j in twins)) or step == dec.max_new_tokens - 1:
                break
            logits = dec.step(nxt)
        if cache is not None and not aborted:  # keep each conversation's KV (prompt + response) for a follow-up
            for row, j in enumerate(jobs):
                start = dec.prompt_len - len(dec.prompts[row])
                cache.put(j.conversation, dec.cache.prefix(row, start, dec.prompt_len + len(j.out)))
    for j in jobs:
        if not j.done and aborted:
            j.done = True
            stats.failed += 1
            loop.finish(j.req, RuntimeError("stopped before the response was complete"))
        elif not j.done:
            finish(loop, j, stats, s, len(jobs))
        if j.twin is not None and not j.twin_done and not aborted:
            twin_finished(j)
    stats.decode_seconds += time.monotonic() - t_batch
    stats.batches += 1
    stats.batch_sizes.append(len(jobs))
    stats.twins += len(twins)


def twin_finished(j: Job) -> None:
    """The second answer is complete: hand both texts over as soon as the answer is done too."""
    j.twin_done = True
    if j.answer is not None:
        send_consistency(j)


def send_consistency(j: Job) -> None:
    tok = ByteTokenizer()
    j.req.consistency(j.answer or "", tok.decode(j.twin or []), j.prompt)


def finish(loop: TorchLoop, j: Job, stats: Stats, s: BatchSettings, batch_size: int) -> None:
    j.done = True
    end = time.monotonic()
    if getattr(loop.client, "record_text", False):  # decoded only when the trace keeps text
        j.req.response_text(ByteTokenizer().decode(j.out))
    if j.twin is not None:
        j.answer = ByteTokenizer().decode(j.out)
        if j.twin_done:
            send_consistency(j)
    loop.finish(j.req)
    n = len(j.out)
    seq_rep_4, rep_32, looped = repetition(j.out)  # what the sidecar computes from the same ids
    rec: dict[str, Any] = {
        "prompt_tokens": len(j.ids),
        "tokens": n,
        "queue_seconds": (j.started or end) - j.arrived,
        "ttft_seconds": (j.first_token - j.arrived) if j.first_token is not None else None,
        "tpot_seconds": ((j.last_token or 0.0) - (j.first_token or 0.0)) / (n - 1) if n > 1 else None,
        "e2e_seconds": end - j.arrived,
        "seq_rep_4": seq_rep_4,
        "rep_32": rep_32,
        "loop": looped,
        "batch_size": batch_size,
        "temperature": s.temperature,
        "precision": s.precision,
    }
    stats.done.append(rec)


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    vs = sorted(values)
    return vs[min(len(vs) - 1, int(q * len(vs)))]


def summary(stats: Stats, seconds: float, args: argparse.Namespace, rss_start: int,
            cache: PrefixCache | None, loop: TorchLoop, connected: bool) -> dict[str, Any]:
    done = stats.done
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft_seconds"] for r in done if r["ttft_seconds"] is not None]
    tpot = [r["tpot_seconds"] for r in done if r["tpot_seconds"] is not None]
    return {
        "workload": "tuner.demo",
        "client_connected": connected,
        "requests_done": len(done),
        "requests_rejected": stats.rejected,
        "requests_failed": stats.failed,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "decode_seconds": round(stats.decode_seconds, 3),
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "decode_tokens_per_second": tokens / stats.decode_seconds if stats.decode_seconds > 0 else None,
        "batches": stats.batches,
        "consistency_twins": stats.twins,
        "mean_batch_size": statistics.fmean(stats.batch_sizes) if stats.batch_sizes else None,
        "ttft_p50_seconds": _p(ttft, 0.5),
        "ttft_p95_seconds": _p(ttft, 0.95),
        "tpot_p50_seconds": _p(tpot, 0.5),
        "seq_rep_4_mean": statistics.fmean(r["seq_rep_4"] for r in done) if done else None,
        "loop_share": statistics.fmean(1.0 if r["loop"] else 0.0 for r in done) if done else None,
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_bytes(),
        "leak": bool(args.leak),
        "leak_kind": args.leak,
        "leak_entries": len(cache) if cache is not None else 0,
        "leak_bytes": cache.nbytes() if cache is not None else 0,
        "precision": loop.precision.precision,
        "precision_changes": loop.precision_changes,
        "seed": args.seed,
        "shape": args.workload,
        "capacity_rps": args.capacity,
        "capacity_measured": args.capacity_measured,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tuner.demo.workload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, help="seconds of arrivals (then the queue is served and it exits)")
    g.add_argument("--requests", type=int, help="number of arrivals")
    g.add_argument("--serve", action="store_true", help="serve until SIGINT/SIGTERM")
    ap.add_argument("--leak", nargs="?", const="reclaimable", choices=("reclaimable", "unreclaimable"),
                    help="inject the never-evicted prefix cache (unreclaimable: not registered for cleanup)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=5.0,
                    help="steady workload: mean arrivals per second (0 = all at once)")
    ap.add_argument("--workload", choices=WORKLOADS, default="steady",
                    help="shape of the arrivals: steady (--rate), or step, burst, ramp, mix set against the "
                    "capacity measured at the start (see above)")
    ap.add_argument("--capacity", type=float, help="shaped workloads: requests per second taken as the capacity "
                    "instead of measuring it")
    ap.add_argument("--drain-seconds", type=float, default=60.0,
                    help="with --duration: after the last arrival, serve the queue for at most this long "
                    "(default 60); --requests N always serves all N")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size when the knob is unset")
    ap.add_argument("--temperature", type=float, default=0.8, help="the requested temperature (knob default)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--mirostat", action="store_true", help="sample with Mirostat v2 instead of temperature")
    ap.add_argument("--mirostat-tau", type=float, default=5.0,
                    help="target surprise in bits per token (llama.cpp's default 5 is above this byte model's "
                    "own ~1.1 bits, so nothing is truncated: try 0.5-1)")
    ap.add_argument("--mirostat-eta", type=float, default=0.1)
    ap.add_argument("--min-new-tokens", type=int, help="shortest response asked for (default min(32, max))")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="longest response asked for (default 96)")
    ap.add_argument("--max-queue", type=int, default=512, help="arrivals beyond this many queued are rejected")
    ap.add_argument("--prompts", type=int, default=256, help="distinct held-out prompts to draw from")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default="fp32",
                    help="precision to start in (the precision policy may change it)")
    ap.add_argument("--report", metavar="PATH", help="also write one JSON line per finished request here")
    args = ap.parse_args(argv)
    if args.duration is None and args.requests is None and not args.serve:
        args.duration = 120.0
    for name in ("duration", "rate"):
        v = getattr(args, name)
        if v is not None and v < 0:
            ap.error(f"--{name} must be >= 0")
    if args.capacity is not None and not (args.capacity > 0 and math.isfinite(args.capacity)):
        ap.error("--capacity must be more than 0 requests per second")
    if args.capacity is not None and args.workload == "steady":
        ap.error("--capacity sets the shaped workloads' rates; the steady one takes --rate")
    if args.workload != "steady" and args.serve:
        ap.error("--workload shapes need --duration or --requests")
    args.capacity_measured = False
    if args.requests is not None and args.requests < 0:
        ap.error("--requests must be >= 0")
    if args.min_new_tokens is None:
        args.min_new_tokens = min(32, args.max_new_tokens)
    if args.batch_size < 1 or not (1 <= args.min_new_tokens <= args.max_new_tokens <= 200):
        ap.error("need --batch-size >= 1 and 1 <= --min-new-tokens <= --max-new-tokens <= 200")
    return args


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tuner import client as tuner_client

    c = tuner_client.connect()
    c.set_loop_ngrams(LOOP_MIN_N, LOOP_MAX_N)  # byte tokens: "   " or "---" is text, not a loop
    rss_start = rss_bytes()
    model = load()
    tok = ByteTokenizer()
    canary_ids = [tok.encode(p, bos=True) for p in held_out_prompts(8, seed=1000 + args.seed, max_bytes=96)]

    def canary(m: torch.nn.Module) -> torch.Tensor:
        dec = BatchDecoder(m, canary_ids, 1)  # type: ignore[arg-type]  # int8: same class, quantized layers
        return dec.prefill()

    cache = PrefixCache() if args.leak else None
    loop = TorchLoop(model, client=c, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                     batch_size=args.batch_size, canary=canary,
                     caches=[cache] if cache is not None and args.leak == "reclaimable" else [],
                     canary_answers=canary_answers, canary_prompts=demo_canary())
    start_precision = loop.precision.set(args.precision) if args.precision != "fp32" else None
    prompts = held_out_prompts(args.prompts, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    stats = Stats()
    q: queue.Queue[Job] = queue.Queue()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if args.workload != "steady":
        if args.capacity is None:
            measured, secs = measure_capacity(model, prompts, args)
            args.capacity = float(f"{measured:.3g}")  # as printed: --capacity with it gives the very same stream
            args.capacity_measured = True
            how = f"measured over {CAPACITY_BATCHES} batches of {args.batch_size} in {secs:.1f} s"
        else:
            how = "given"
        print(f"tuner demo workload {args.workload}: capacity {args.capacity:g} requests/s ({how}); under "
              f"{UNDER:g}x = {UNDER * args.capacity:.2f}/s, over {OVER:g}x = {OVER * args.capacity:.2f}/s",
              file=sys.stderr, flush=True)
    arrivals = Arrivals(loop, prompts, args, q, stats, stop)
    t0 = time.monotonic()
    cpu0 = time.process_time()  # all threads of this process: the client's sender included
    arrivals.start()
    report = open(args.report, "w") if args.report else None  # noqa: SIM115
    written = 0
    try:
        drain_until: float | None = None
        while True:
            if stop.is_set():
                break
            if args.duration is not None and arrivals.finished.is_set() and drain_until is None:
                drain_until = time.monotonic() + args.drain_seconds
            if drain_until is not None and time.monotonic() > drain_until:
                break  # an overloaded machine: what is still queued is closed as failed below
            s = loop.settings()
            jobs = take_batch(q, s.batch_size, 0.1)
            if not jobs:
                loop.between_batches()  # idle: commands still run promptly
                if arrivals.finished.is_set() and q.empty():
                    break
                continue
            try:
                run_batch(loop, jobs, s, args, gen, cache, stats, stop)
            except Exception as exc:
                if not loop.handle_oom(exc, len(jobs)):
                    raise
                stats.failed += sum(1 for j in jobs if not j.done)
                for j in jobs:
                    if not j.done:
                        j.done = True
                        loop.finish(j.req, exc)
            loop.between_batches()
            if report is not None:
                for rec in stats.done[written:]:
                    report.write(json.dumps(rec) + "\n")
                written = len(stats.done)
    finally:
        stop.set()
        seconds = time.monotonic() - t0
        cpu_seconds = time.process_time() - cpu0
        while True:  # arrivals never served: close them as failed so the client does not keep them open
            try:
                j = q.get_nowait()
            except queue.Empty:
                break
            stats.failed += 1
            j.req.close(RuntimeError("not served before the workload stopped"))
        if report is not None:
            for rec in stats.done[written:]:
                report.write(json.dumps(rec) + "\n")
            report.close()
        connected = bool(getattr(c, "connected", False))
        result = summary(stats, seconds, args, rss_start, cache, loop, connected)
        result["start_precision"] = start_precision
        result["cpu_seconds"] = round(cpu_seconds, 3)
        result["tokens_per_cpu_second"] = result["tokens"] / cpu_seconds if cpu_seconds > 0 else None
        result["client_call_seconds"] = round(stats.client_call_seconds, 6)
        result["client_thread_cpu_seconds"] = client_thread_cpu_seconds()
        result["requests_arrived"] = arrivals.count
        print(json.dumps(result), file=out, flush=True)
        loop.close()
        c.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
